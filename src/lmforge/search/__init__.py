"""lmforge.search (layer 5): architecture and hyperparameter search; the only package that imports Optuna.

- ``space``: the YAML search-space format over dotted config paths (conditional blocks, grids);
  ``default_space.yaml`` is the shipped space.
- ``budget``: time/token budgets, their split between the pipeline's steps, the trials' token fidelity, and
  the one "budget spent" rule every strategy uses (:func:`~lmforge.search.budget.budget_spent`).
- ``options``: :class:`~lmforge.search.options.TuneOptions`, validated and parsed once.
- ``sizing``, ``plan``: parameter counts and throughput; the capacity plan (fidelity, size cap, narrowed space).
- ``study``: storages, samplers and pruners by name, heartbeats, recovery of interrupted trials.
- ``context``: the search context stored in the study, the search data, a trial's config and directory.
- ``objective``: one trial (space -> config -> train with a reporting callback -> objective values).
- ``strategies``: the search step's strategies (``worker`` processes, ``evolution``, ``ray_backend``), one
  signature, chosen from a table.
- ``new_run``, ``final``, ``evaluation``, ``summary``: the first run's setup, the final training, the
  held-out evaluation, ``summary.json`` and the best trial.
- ``pipeline``: ``lmforge tune`` (:func:`~lmforge.search.pipeline.run_pipeline`): the step sequence, resume, lock.
- ``leaderboard``, ``disk``, ``splits``, ``failure``: the trial table, the checkpoint disk cap, test/CV
  splits, a failed trial's one-line reason.

The HTML report of a run is :mod:`lmforge.report` (layer 6). Nothing is imported here, so that
``import lmforge.search`` stays cheap (Optuna and torch load on use).
"""
