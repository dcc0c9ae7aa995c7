"""Optimizers from :class:`~lmforge.config.OptimConfig` (layer 3).

Parameter groups follow nanoGPT: every parameter with ``dim >= 2`` (matrices, embeddings) gets weight
decay, biases and norm gains do not. ``muon`` runs :class:`torch.optim.Muon` on the 2-D hidden weight
matrices (not the embeddings, not the output head) and AdamW on everything else; the two are wrapped in
one :class:`CombinedOptimizer` so the loop and the LR schedule see a single optimizer.

Every group records its starting learning rate in ``group["initial_lr"]`` and its role in
``group["name"]`` (``decay``, ``no_decay``, ``muon``); a schedule scales ``group["lr"]`` relative to
``initial_lr``. All state dicts hold tensors and plain python values only, so they load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lmforge.config import LmforgeError, OptimConfig

HEAD_NAMES = ("lm_head", "head", "output", "output_head", "out_head")
"""Module names (last component) treated as the output head, which Muon leaves to AdamW."""


class OptimizerError(LmforgeError, ValueError):
    """A model/optimizer combination that cannot work; the message names the parameter or option."""


# ------------------------------------------------------------------------------ parameter split
def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters() yields a tied (shared) parameter once, under its first name
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise OptimizerError(f"{type(model).__name__} has no trainable parameters")
    return params


def decay_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's split: ``dim >= 2`` decays, biases and norm gains (``dim < 2``) do not; empty groups are dropped."""
    params = list(params)
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _head_params(model: nn.Module) -> set[int]:
    """ids of the output-head parameters: HF ``get_output_embeddings()`` or modules named like a head
    (:data:`HEAD_NAMES`); only when neither exists, a Linear producing ``config.vocab_size`` outputs
    (a hidden layer may have that width too, so this is the last resort)."""
    ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            ids.update(id(p) for p in head.parameters())
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            ids.update(id(p) for p in module.parameters(recurse=False))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not ids and vocab is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.out_features == vocab:
                ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def split_muon_params(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (Muon: 2-D hidden weight matrices, AdamW: everything else).

    Embeddings are recognised by module type (:class:`nn.Embedding`), so a head tied to the token
    embedding is excluded too; an untied head by :func:`_head_params`.
    """
    excluded = _head_params(model)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    muon: list[tuple[str, nn.Parameter]] = []
    rest: list[tuple[str, nn.Parameter]] = []
    for name, p in _trainable(model):
        (muon if p.dim() == 2 and id(p) not in excluded else rest).append((name, p))
    return muon, rest


# ------------------------------------------------------------------------------------ combined
class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters behaving as one.

    ``param_groups`` is the concatenation of the parts' groups (the same dict objects, so setting
    ``group["lr"]`` reaches the part); ``state_dict()`` is ``{"optimizers": [part state dicts]}``.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        # Optimizer.__init__ would copy the groups; set up only what the base class' hooks need.
        if not optimizers:
            raise OptimizerError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        """Read-only merged view of the parts' per-parameter state."""
        merged: dict[torch.Tensor, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise OptimizerError("CombinedOptimizer: add the group to one of .optimizers instead")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            found = len(parts) if isinstance(parts, list) else "no"
            raise OptimizerError(
                f"optimizer state holds {found} optimizer part(s), this CombinedOptimizer has "
                f"{len(self.optimizers)} (was the checkpoint saved with another optim.name?)"
            )
        for opt, sd in zip(self.optimizers, parts, strict=True):
            opt.load_state_dict(sd)

    def __repr__(self) -> str:
        return "CombinedOptimizer(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"


# -------------------------------------------------------------------------------------- builder
def _device_kwargs(params: list[nn.Parameter]) -> dict[str, Any]:
    """The fused (single-kernel) step where torch has one for every parameter's device (CUDA and CPU
    among them: on the 2-core CPU, AdamW's fused step took 3.5-10 ms against 22-29 ms for foreach at the
    4x128 benchmark shape); the multi-tensor ``foreach`` step otherwise. Same update, within float
    rounding (tests/train/test_train_compile.py)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = {p.device.type for p in params}
    if params and all(p.is_floating_point() for p in params) and devices <= set(
        _get_fused_kernels_supported_devices()
    ):
        return {"fused": True}
    return {"foreach": True} if params else {}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """An optimizer for ``model``'s trainable parameters as ``cfg`` describes.

    ``gd`` and ``sgd`` are both plain SGD (``gd`` expects the loop to feed the full-batch gradient);
    ``momentum`` is SGD with ``cfg.momentum``/``cfg.nesterov``; ``adam``/``adamw`` use
    ``(beta1, beta2)`` and ``eps``; ``muon`` returns a :class:`CombinedOptimizer` (Muon with
    ``muon_lr``, ``momentum``, ``nesterov`` on 2-D hidden weights; AdamW with ``lr`` on the rest).
    """
    named = _trainable(model)
    params = [p for _, p in named]
    name = cfg.name
    if name in ("gd", "sgd", "momentum"):
        momentum = cfg.momentum if name == "momentum" else 0.0
        nesterov = cfg.nesterov and name == "momentum"
        if nesterov and momentum == 0.0:
            raise OptimizerError("optim.nesterov needs optim.momentum > 0")
        opt: torch.optim.Optimizer = torch.optim.SGD(
            decay_groups(named, cfg.weight_decay), lr=cfg.lr, momentum=momentum, nesterov=nesterov,
            **_device_kwargs(params),
        )
    elif name in ("adam", "adamw"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        opt = cls(
            decay_groups(named, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            **_device_kwargs(params),
        )
    elif name == "muon":
        muon_named, rest = split_muon_params(model)
        if not muon_named:
            raise OptimizerError(
                f"optim.name 'muon': {type(model).__name__} has no 2-D hidden weight matrices "
                "(embeddings and the output head are left to AdamW); use optim.name 'adamw'"
            )
        parts: list[torch.optim.Optimizer] = [
            torch.optim.Muon(
                [{"params": [p for _, p in muon_named], "name": "muon"}],
                lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.momentum,
                nesterov=cfg.nesterov,
            )
        ]
        if rest:
            parts.append(
                torch.optim.AdamW(
                    decay_groups(rest, cfg.weight_decay),
                    lr=cfg.lr,
                    betas=(cfg.beta1, cfg.beta2),
                    eps=cfg.eps,
                    **_device_kwargs([p for _, p in rest]),
                )
            )
        opt = CombinedOptimizer(parts)
    else:  # pragma: no cover - OptimConfig rejects other names
        raise OptimizerError(f"optim.name = {name!r}: unknown")
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt
