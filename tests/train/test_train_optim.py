"""Optimizers: each one learns, parameter groups, Muon's split, and bitwise resume through weights_only state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.config import OptimConfig, ScheduleConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.train.optim import CombinedOptimizer, OptimizerError, build_optimizer, split_muon_params
from lmforge.train.schedule import build_scheduler

V, D = 16, 8
NAMES = ["gd", "sgd", "momentum", "adam", "adamw", "muon"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LRS = {"gd": 0.5, "sgd": 0.5, "momentum": 0.2, "adam": 0.02, "adamw": 0.02, "muon": 0.02}


class TinyLM(nn.Module):
    """Embedding -> hidden Linear -> LayerNorm -> head (tied or not); a stand-in with every parameter kind."""

    def __init__(self, tied: bool = False, head_name: str = "lm_head") -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.hidden = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        setattr(self, head_name, nn.Linear(D, V, bias=False))
        self.head_name = head_name
        if tied:
            getattr(self, head_name).weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)  # (B, T, D)
        x = x + torch.tanh(self.hidden(x))
        return getattr(self, self.head_name)(self.norm(x))  # (B, T, V)


def _data(seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (8, 6), generator=g).to(device)
    return x, (x * 3 + 1) % V  # a learnable token map


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


def _model(seed: int = 0, device: str = "cpu", **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_reduces_the_loss(name: str, device: str) -> None:
    model = _model(device=device)
    opt = build_optimizer(model, OptimConfig(name=name, lr=LRS[name], muon_lr=0.05, weight_decay=0.01))
    if name in ("adam", "adamw"):
        assert opt.defaults["fused"]
    x, y = _data(device=device)
    start = _loss(model, x, y).item()
    for _ in range(25):
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.step()
    end = _loss(model, x, y).item()
    assert math.isfinite(end) and end < 0.8 * start, (name, start, end)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    x, y = _data()
    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gd_step_is_plain_gradient_descent_with_l2_on_matrices_only() -> None:
    model = _model()
    lr, wd = 0.3, 0.1
    opt = build_optimizer(model, OptimConfig(name="gd", lr=lr, weight_decay=wd))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model)
    opt.step()
    for n, p in model.named_parameters():
        decay = wd if p.dim() >= 2 else 0.0
        expected = before[n] - lr * (grads[n] + decay * before[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=n)


def test_nesterov_momentum_matches_the_textbook_update() -> None:
    model = _model()
    lr, mu = 0.1, 0.9
    opt = build_optimizer(model, OptimConfig(name="momentum", lr=lr, momentum=mu, nesterov=True, weight_decay=0.0))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf: dict[str, torch.Tensor] = {}
    for _ in range(3):
        grads = _grads(model)
        opt.step()
        for n, g in grads.items():
            buf[n] = g.clone() if n not in buf else mu * buf[n] + g
            params[n] = params[n] - lr * (g + mu * buf[n])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n], rtol=1e-5, atol=1e-6, msg=n)


def test_adamw_first_step_matches_the_formula() -> None:
    model = _model()
    lr, wd, eps = 0.01, 0.1, 1e-8
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=lr, weight_decay=wd, eps=eps, beta1=0.8, beta2=0.95))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _grads(model)
    opt.step()
    for n, p in model.named_parameters():
        decay = wd if p.dim() >= 2 else 0.0
        g = grads[n]
        # bias-corrected first step: m_hat = g, v_hat = g^2
        expected = before[n] * (1 - lr * decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=n)


def test_adam_vs_adamw_weight_decay_differs() -> None:
    # adam: L2 added to the gradient (a zero gradient still moves by ~lr); adamw: decoupled p *= 1 - lr*wd
    results = {}
    for name in ("adam", "adamw"):
        p = nn.Parameter(torch.full((2, 2), 2.0))
        model = nn.Module()
        model.w = p
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.1, weight_decay=0.5))
        p.grad = torch.zeros_like(p)
        opt.step()
        results[name] = p.detach()[0, 0].item()
    assert results["adam"] == pytest.approx(2.0 - 0.1, rel=1e-5)
    assert results["adamw"] == pytest.approx(2.0 * (1 - 0.1 * 0.5), rel=1e-6)


def test_weight_decay_groups_follow_nanogpt() -> None:
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.2))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"decay", "no_decay"}
    ids = {n: id(p) for n, p in model.named_parameters()}
    decay_ids = {id(p) for p in by_name["decay"]["params"]}
    assert decay_ids == {ids["emb.weight"], ids["hidden.weight"], ids["lm_head.weight"]}
    assert {id(p) for p in by_name["no_decay"]["params"]} == {ids["hidden.bias"], ids["norm.weight"], ids["norm.bias"]}
    assert by_name["decay"]["weight_decay"] == 0.2 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)


def test_frozen_parameters_are_left_out() -> None:
    model = _model()
    model.emb.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(name="sgd"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.emb.weight) not in in_opt and id(model.hidden.weight) in in_opt


@pytest.mark.parametrize("tied", [False, True])
def test_muon_split_takes_hidden_matrices_only(tied: bool) -> None:
    model = _model(tied=tied)
    muon, rest = split_muon_params(model)
    assert [n for n, _ in muon] == ["hidden.weight"]
    expected_rest = {"emb.weight", "hidden.bias", "norm.weight", "norm.bias"} | (set() if tied else {"lm_head.weight"})
    assert {n for n, _ in rest} == expected_rest


def test_muon_split_finds_a_head_by_vocab_size() -> None:
    model = _model(head_name="proj")
    model.config = TransformerConfig(vocab_size=V, max_seq_len=8, d_model=D, n_head=2)
    assert [n for n, _ in split_muon_params(model)[0]] == ["hidden.weight"]


@pytest.mark.parametrize("tie", [True, False])
def test_muon_split_on_the_transformer(tie: bool) -> None:
    cfg = TransformerConfig(n_layer=2, d_model=16, n_head=2, vocab_size=V, max_seq_len=8, tie_embeddings=tie)
    model = build_model(cfg)
    muon, rest = split_muon_params(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head") and id(m.weight) not in embeddings
    }
    assert {id(p) for _, p in muon} == hidden and hidden
    assert all(p.dim() == 2 for _, p in muon)
    assert all(id(p) not in hidden for _, p in rest)
    assert len(muon) + len(rest) == len(list(model.parameters()))


def test_muon_combined_optimizer_groups_and_update() -> None:
    model = _model()
    cfg = OptimConfig(name="muon", lr=0.01, muon_lr=0.05, weight_decay=0.0, momentum=0.9)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.optimizers[0], torch.optim.Muon) and isinstance(opt.optimizers[1], torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["muon"]["lr"] == 0.05 and groups["decay"]["lr"] == 0.01
    assert [id(p) for p in groups["muon"]["params"]] == [id(model.hidden.weight)]

    w0 = model.hidden.weight.detach().clone()
    e0 = model.emb.weight.detach().clone()
    grads = _grads(model)
    opt.step()
    # Muon: orthogonalised update, singular values ~1 (Newton-Schulz gives roughly 0.5..1.5)
    update = (w0 - model.hidden.weight.detach()) / 0.05  # square matrix: no shape adjustment
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.3 and s.max() < 1.7, s
    # AdamW part: first step moves each entry by lr * sign(g)
    expected = e0 - 0.01 * grads["emb.weight"] / (grads["emb.weight"].abs() + cfg.eps)
    torch.testing.assert_close(model.emb.weight.detach(), expected, rtol=1e-5, atol=1e-6)

    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_muon_param_groups_reach_the_parts_and_torch_schedulers_work() -> None:
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=0.01, muon_lr=0.04))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02)
    assert opt.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.005)


def test_muon_needs_a_hidden_matrix() -> None:
    model = nn.Sequential(nn.Embedding(V, D))
    with pytest.raises(OptimizerError, match="no 2-D hidden weight"):
        build_optimizer(model, OptimConfig(name="muon"))


def test_combined_state_from_another_optimizer_is_refused() -> None:
    model = _model()
    adamw_state = build_optimizer(model, OptimConfig(name="adamw")).state_dict()
    with pytest.raises(OptimizerError, match="optim.name"):
        build_optimizer(model, OptimConfig(name="muon")).load_state_dict(adamw_state)


def _train(model, opt, sched, steps: range) -> list[float]:
    lrs = []
    for i in steps:
        x, y = _data(seed=i, device=next(model.parameters()).device.type)
        opt.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_through_weights_only_gives_bitwise_identical_updates(
    name: str, device: str, tmp_path
) -> None:
    ocfg = OptimConfig(name=name, lr=LRS[name], weight_decay=0.05, nesterov=name in ("momentum", "muon"))
    scfg = ScheduleConfig(name="cosine", warmup_steps=2, min_lr=1e-4)

    def fresh():
        model = _model(seed=3, device=device)
        opt = build_optimizer(model, ocfg)
        return model, opt, build_scheduler(opt, scfg, 10, ocfg.lr)

    ref_model, ref_opt, ref_sched = fresh()
    ref_lrs = _train(ref_model, ref_opt, ref_sched, range(8))

    model, opt, sched = fresh()
    lrs = _train(model, opt, sched, range(4))
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        tmp_path / "state.pt",
    )
    state = torch.load(tmp_path / "state.pt", map_location=device, weights_only=True)
    model, opt, sched = fresh()  # a new process would start like this
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    lrs += _train(model, opt, sched, range(4, 8))

    assert lrs == ref_lrs
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q), n
