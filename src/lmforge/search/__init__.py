"""lmforge.search (layer 5): architecture and hyperparameter search; the only package that imports Optuna.

- ``space``: the YAML search-space format over dotted config paths (conditional blocks, grids);
  ``default_space.yaml`` is the shipped space.
- ``budget``: time/token budgets, their split between the pipeline's steps, the trials' token fidelity.
- ``sizing``: parameter counts, a throughput measurement, the size cap that narrows the default space.
- ``study``: storages, samplers and pruners by name, recovery of interrupted trials.
- ``objective``: one trial (space -> config -> train with a reporting callback -> objective values).
- ``worker``: :func:`~lmforge.search.worker.run_worker`, the loop taking trials from a shared study.
- ``pipeline``: ``lmforge tune`` (:func:`~lmforge.search.pipeline.run_pipeline`), resumable step by step.
- ``leaderboard``, ``disk``, ``splits``: the trial table, the checkpoint disk cap, test/CV splits.

Nothing is imported here, so that ``import lmforge.search`` stays cheap (Optuna and torch load on use).
"""
