"""Architecture mutations: function preservation against the parent's own logits, weight bookkeeping against
the parent's tensors, trainability of the new parts, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.config import RCNNConfig, RecurrentConfig, TransformerConfig
from lmforge.models import build_model
from lmforge.models.mutate import (
    MutationError,
    add_layer,
    change_options,
    remove_layer,
    set_connection,
    widen,
)
from lmforge.models.transformer import mlp_hidden

V, D, T = 40, 32, 12

CONFIGS = {
    "transformer": TransformerConfig(n_layer=2, d_model=D, n_head=4, vocab_size=V, max_seq_len=T),
    "transformer-swiglu-parallel-rope": TransformerConfig(
        n_layer=2,
        d_model=D,
        n_head=4,
        vocab_size=V,
        max_seq_len=T,
        mlp="swiglu",
        layout="parallel",
        position="rope",
        norm="rmsnorm",
        bias=False,
        n_kv_head=2,
    ),
    "lstm": RecurrentConfig(family="lstm", n_layer=2, d_model=D, residual=True, vocab_size=V),
    "gru-untied": RecurrentConfig(
        family="gru", n_layer=2, d_model=D, residual=True, vocab_size=V, tie_embeddings=False
    ),
    "rcnn-gru": RCNNConfig(n_layer=2, d_model=D, vocab_size=V, kernel_size=3),
    "rcnn-lstm": RCNNConfig(n_layer=2, d_model=D, vocab_size=V, rnn="lstm", tie_embeddings=False),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(CONFIGS[name]).eval()
    with torch.no_grad():  # biases and norm gains start at 0 / 1: perturb them so that copying them matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def decode_logits(model, idx):
    """Logits of an incremental decode (prefill of 4 tokens, then one token at a time)."""
    with torch.no_grad():
        state = model.init_state(idx.size(0))
        out, state = model.step(idx[:, :4], state)
        outs = [out]
        for t in range(4, idx.size(1)):
            o, state = model.step(idx[:, t : t + 1], state)
            outs.append(o)
    return torch.cat(outs, dim=1)


def layers(model):
    """The module list of layers/blocks of any family."""
    return next(getattr(model, n) for n in ("h", "layers", "blocks") if hasattr(model, n))


@pytest.fixture
def idx():
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- add_layer
@pytest.mark.parametrize("name", list(CONFIGS))
def test_add_layer_computes_the_parent_function_at_every_index(name, idx):
    parent = make(name)
    before = copy.deepcopy(parent.state_dict())
    ref = logits(parent, idx)
    low = 1 if parent.config.family in ("lstm", "gru") else 0
    for i in range(low, parent.config.n_layer + 1):
        child = add_layer(parent, i)
        assert child.config.n_layer == parent.config.n_layer + 1 and child is not parent
        torch.testing.assert_close(logits(child, idx), ref, atol=1e-5, rtol=0)
        # the incremental state path of the child agrees too (the new layer takes part in decoding)
        torch.testing.assert_close(decode_logits(child, idx), ref, atol=1e-4, rtol=0)
        new = layers(child)[i]
        assert any(p.abs().sum() > 0 for p in new.parameters())  # not an all-zero layer: it can learn
    for k, v in parent.state_dict().items():  # the parent is left untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_remove_layer_undoes_add_layer_exactly(name, idx):
    parent = make(name)
    i = 1
    back = remove_layer(add_layer(parent, i), i)
    assert back.config == parent.config
    sd, ref = back.state_dict(), parent.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


@pytest.mark.parametrize("name", ["transformer", "lstm", "rcnn-gru"])
def test_remove_layer_keeps_the_other_layers_weights(name):
    parent = make(name)
    parent = add_layer(parent, exact=True)  # three layers
    child = remove_layer(parent, 1)
    assert child.config.n_layer == 2
    for j_child, j_parent in ((0, 0), (1, 2)):
        for (n_c, p_c), (n_p, p_p) in zip(
            layers(child)[j_child].named_parameters(), layers(parent)[j_parent].named_parameters(), strict=True
        ):
            assert n_c == n_p and torch.equal(p_c, p_p), (j_child, n_c)
    assert torch.equal(child.wte.weight, parent.wte.weight)


def test_remove_layer_changes_the_function_and_default_is_the_last(idx):
    parent = make("transformer")
    child = remove_layer(parent)
    assert child.config.n_layer == 1
    assert torch.equal(child.h[0].attn.c_attn.weight, parent.h[0].attn.c_attn.weight)
    assert not torch.allclose(logits(child, idx), logits(parent, idx), atol=1e-3)


# ----------------------------------------------------------------------------------------------- widen
@pytest.mark.parametrize("name", ["transformer", "transformer-swiglu-parallel-rope"])
@pytest.mark.parametrize("method", ["net2net", "zero"])
def test_widen_transformer_mlp_is_function_preserving(name, method, idx):
    parent = make(name)
    child = widen(parent, 1.5, method=method)
    h = mlp_hidden(parent.config)
    assert mlp_hidden(child.config) == round(1.5 * h)
    assert child.h[0].mlp.c_proj.weight.shape == (D, round(1.5 * h))
    torch.testing.assert_close(logits(child, idx), logits(parent, idx), atol=1e-5, rtol=0)
    child2 = widen(parent, width=h + 7, method=method)
    assert mlp_hidden(child2.config) == h + 7
    torch.testing.assert_close(logits(child2, idx), logits(parent, idx), atol=1e-5, rtol=0)


def test_net2net_copies_units_and_splits_their_outgoing_weights_unequally():
    parent = make("transformer").requires_grad_(False)
    h = mlp_hidden(parent.config)
    child = widen(parent, width=2 * h).requires_grad_(False)
    pf, cf = parent.h[0].mlp.c_fc.weight, child.h[0].mlp.c_fc.weight
    pp, cp = parent.h[0].mlp.c_proj.weight, child.h[0].mlp.c_proj.weight
    for k in range(h, 2 * h):  # every new unit is a copy of an old one ...
        j = int(torch.nonzero((pf == cf[k]).all(dim=1))[0])
        # ... whose outgoing column is a positive share of the original's
        share = cp[:, k] / pp[:, j]
        assert torch.allclose(share, share[0].expand_as(share), atol=1e-4) and 0 < float(share[0]) < 1
    copies = cp[:, h:]
    assert not torch.allclose(copies[:, :1].expand_as(copies), copies)  # shares differ: symmetry broken
    # the shares of each original unit (its own column and its copies) sum to the original column
    total = cp[:, :h].clone()
    for k in range(h, 2 * h):
        j = int(torch.nonzero((pf == cf[k]).all(dim=1))[0])
        total[:, j] += cp[:, k]
    torch.testing.assert_close(total, pp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["lstm", "gru-untied"])
@pytest.mark.parametrize("residual", [True, False])
def test_widen_recurrent_d_model_is_function_preserving(name, residual, idx):
    torch.manual_seed(0)
    cfg = CONFIGS[name].model_copy(update={"residual": residual})
    parent = build_model(cfg).eval()
    child = widen(parent, width=D + 16)
    assert child.config.d_model == D + 16 and child.wte.weight.shape == (V, D + 16)
    torch.testing.assert_close(logits(child, idx), logits(parent, idx), atol=1e-5, rtol=0)
    torch.testing.assert_close(decode_logits(child, idx), logits(parent, idx), atol=1e-4, rtol=0)


def test_widen_refusals():
    with pytest.raises(MutationError, match="rcnn"):
        widen(make("rcnn-gru"), 2)
    with pytest.raises(MutationError, match="increase"):
        widen(make("transformer"), 0.5)
    with pytest.raises(MutationError, match="exactly one"):
        widen(make("transformer"), 2, width=300)
    with pytest.raises(MutationError, match="method"):
        widen(make("transformer"), 2, method="copy")


# ------------------------------------------------------------------------------------------ refusals
def test_add_layer_refusals():
    lstm = make("lstm")
    with pytest.raises(MutationError, match="index 0"):
        add_layer(lstm, 0)
    with pytest.raises(MutationError, match="out of range"):
        add_layer(lstm, 5)
    plain = build_model(RecurrentConfig(family="gru", n_layer=2, d_model=D, residual=False, vocab_size=V))
    with pytest.raises(MutationError, match="residual off"):
        add_layer(plain)
    loose = add_layer(plain, 1, exact=False)  # allowed when asked: a fresh layer, another function
    assert loose.config.n_layer == 3
    with pytest.raises(MutationError, match="at least one"):
        remove_layer(build_model(RCNNConfig(n_layer=1, d_model=D, vocab_size=V)))


# -------------------------------------------------------------------------------- connection / options
def test_set_connection_rewires_and_copies_every_weight(idx):
    parent = make("lstm")
    child = set_connection(parent, residual=False)
    assert child.config.residual is False
    for (n, p), (_, q) in zip(parent.named_parameters(), child.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not torch.allclose(logits(child, idx), logits(parent, idx), atol=1e-4)

    tr = make("transformer")
    par = set_connection(tr, layout="parallel")
    assert par.config.layout == "parallel" and par.h[0].ln_2 is None
    assert torch.equal(par.h[1].mlp.c_fc.weight, tr.h[1].mlp.c_fc.weight)
    seq = set_connection(par, layout="sequential")
    assert torch.equal(seq.h[0].ln_2.weight, par.h[0].ln_1.weight)  # the MLP's norm starts as the shared one
    with pytest.raises(MutationError, match="always residual"):
        set_connection(tr, residual=False)
    with pytest.raises(MutationError, match="no layout"):
        set_connection(parent, layout="parallel")


def test_change_options_copies_tensors_whose_shape_is_unchanged(idx):
    parent = make("transformer")
    child = change_options(parent, n_head=2)  # same tensor shapes, other head split
    for (n, p), (_, q) in zip(parent.named_parameters(), child.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert child.config.n_head == 2
    drop = change_options(parent, dropout=0.3)  # no tensor changes: the function in eval mode is the same
    torch.testing.assert_close(logits(drop.eval(), idx), logits(parent, idx), atol=0, rtol=0)
    rc = change_options(make("rcnn-gru"), kernel_size=5)
    assert rc.blocks[0].conv.dw.weight.shape[-1] == 5
    with pytest.raises(MutationError, match="n_head"):
        change_options(parent, n_head=5)  # 32 is not divisible by 5: the config's own rule
    with pytest.raises(MutationError, match="no option"):
        change_options(parent, residual=True)
    with pytest.raises(MutationError, match="lstm <-> gru"):
        change_options(make("lstm"), family="transformer")
    gru = change_options(make("lstm"), family="gru")
    assert gru.config.family == "gru" and isinstance(gru.layers[0], torch.nn.GRU)


def test_child_follows_the_parent_device_dtype_and_mode():
    parent = make("gru-untied").double().train()
    child = add_layer(parent, 2)
    assert next(child.parameters()).dtype == torch.float64 and child.training


# ------------------------------------------------------------------------------------------ training
def _train_steps(model, idx, steps=12, lr=3e-3):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("name", "mutation"),
    [
        ("transformer", lambda m: add_layer(m, 1)),
        ("transformer-swiglu-parallel-rope", lambda m: widen(m, 2)),
        ("lstm", lambda m: add_layer(m, 2)),
        ("gru-untied", lambda m: widen(m, width=48)),
        ("rcnn-lstm", lambda m: add_layer(m, 0)),
    ],
)
def test_children_train_and_their_new_parts_learn(name, mutation):
    torch.manual_seed(3)
    data = torch.randint(0, V, (8, T + 1))
    child = mutation(make(name))
    start = {n: p.detach().clone() for n, p in child.named_parameters()}
    losses = _train_steps(child, data)
    assert losses[-1] < losses[0] - 0.05, losses
    # every tensor, the zero-initialized output projections / candidate rows included, has moved
    frozen = [n for n, p in child.named_parameters() if torch.equal(p, start[n])]
    assert not frozen, frozen


def test_zero_initialized_parts_get_gradients_at_once():
    torch.manual_seed(0)
    child = add_layer(make("transformer"), 1).train()
    data = torch.randint(0, V, (4, T + 1))
    _, loss = child(data[:, :-1], data[:, 1:])
    loss.backward()
    assert child.h[1].attn.c_proj.weight.grad.abs().sum() > 0
    assert child.h[1].mlp.c_proj.weight.grad.abs().sum() > 0
