"""The CUDA path: compiled equals eager, bf16 autocast tracks fp32, fused AdamW equals the CPU reference,
SDPA's flash kernel equals the math kernel. Skipped without a CUDA device (benchmarks/device_check.sh runs
them on a GPU machine)."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import OptimConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.train.device import autocast_context, to_device
from lmforge.train.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
V, T, B = 96, 64, 8


def _model(device: str = "cuda") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layer=2, n_head=4, d_model=128, dropout=0.0)
    return build_model(cfg, vocab_size=V, max_seq_len=T).to(device)


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(n)]


def _train(model: torch.nn.Module, fwd, dtype: str, batches) -> list[float]:
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, eps=1e-4))
    dev = next(model.parameters()).device
    losses = []
    for xb, yb in batches:
        with autocast_context(dev, dtype):
            _, loss = fwd(to_device(xb, dev), to_device(yb, dev))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_compiled_cuda_training_equals_eager() -> None:
    a = _model()
    b = copy.deepcopy(a)
    eager = _train(a, a, "float32", _batches())
    compiled = _train(b, torch.compile(b), "float32", _batches())
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=1e-3, atol=1e-4)


def test_bf16_autocast_tracks_fp32() -> None:
    a = _model()
    b = copy.deepcopy(a)
    fp32 = _train(a, a, "float32", _batches())
    bf16 = _train(b, b, "auto", _batches())  # auto = bf16 autocast on CUDA
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_fused_cuda_adamw_equals_the_cpu_reference() -> None:
    a = _model("cpu")
    b = copy.deepcopy(a).cuda()
    opt_b = build_optimizer(b, OptimConfig(name="adamw", lr=1e-3, eps=1e-4))
    assert opt_b.defaults["fused"]
    cpu = _train(a, a, "float32", _batches(3))
    gpu = _train(b, b, "float32", _batches(3))
    assert gpu == pytest.approx(cpu, rel=1e-3, abs=1e-4)


def test_sdpa_flash_kernel_equals_math_kernel() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model().to(torch.bfloat16).eval()
    x, y = (t.cuda() for t in _batches(1)[0])
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot run this call
            _, flash = model(x, y)
        with sdpa_kernel(SDPBackend.MATH):
            _, math_ = model(x, y)
    assert float(flash) == pytest.approx(float(math_), rel=1e-2)


def test_pinned_copy_reaches_the_device_unchanged() -> None:
    x = torch.randint(0, V, (B, T))
    y = to_device(x, torch.device("cuda"))
    torch.cuda.synchronize()
    assert y.is_cuda and torch.equal(y.cpu(), x)
