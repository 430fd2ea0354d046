"""KronParam (SoKA-style): exact zero at init, Kronecker formula, KPSVD start, peft LoKr counts, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp import kpsvd
from decomp.adapters import KronParam
from tests.adapters.strategies import default_fits, layers
from tests.adapters.test_tucker_param import perturb
from tests.strategies import SEEDS, relative_error

RANKS = st.one_of(st.none(), st.integers(1, 3))


def kron_sum(S: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The oracle: the Kronecker products written out with torch.kron."""
    return sum(s * torch.kron(b, c) for s, b, c in zip(S, B, C))


def build(layer: nn.Module, rank: int | None) -> KronParam | None:
    """Register KronParam(rank) on ``layer``; ``None`` (after checking the error) if rank is too big."""
    shape = layer.weight.shape
    b_shape, c_shape = KronParam.from_weight(layer.weight.detach(), rank=1).term_shapes
    max_rank = min(b_shape[0] * b_shape[1], c_shape[0] * c_shape[1])
    if rank is not None and rank > max_rank:
        with pytest.raises(ValueError, match=rf"rank .*must be in \[1, {max_rank}\]"):
            parametrize.register_parametrization(layer, "weight", KronParam(rank))
        assert not parametrize.is_parametrized(layer), f"half-registered on {tuple(shape)}"
        return None
    adapter = KronParam(rank)
    assume(default_fits(adapter, layer))
    parametrize.register_parametrization(layer, "weight", adapter)
    return adapter


@given(layers(), RANKS)
def test_identity_at_init_is_exact(case, rank):
    layer, x = case
    before = layer(x)
    if build(layer, rank) is not None:
        assert torch.equal(layer(x), before)


@given(layers(), RANKS, SEEDS)
def test_delta_is_the_change_of_the_kronecker_sum_and_merge_matches(case, rank, seed):
    layer, x = case
    adapter = build(layer, rank)
    if adapter is None:
        return
    perturb(adapter, seed)
    weight = layer.parametrizations.weight.original.detach()
    with torch.no_grad():
        change = kron_sum(adapter.S, adapter.B, adapter.C) - kron_sum(adapter.S0, adapter.B0, adapter.C0)
    expected = weight + change.reshape(weight.shape)
    assert relative_error(layer.weight.detach(), expected) < 1e-10
    unmerged = layer(x).detach()
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert relative_error(layer(x).detach(), unmerged) < 1e-10


@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from([(), (3,), (3, 3), (1, 1)]), SEEDS)
def test_the_start_is_the_weights_kpsvd(rows, cols, kernel, seed):
    weight = torch.randn(rows, cols, *kernel, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assume(default_fits(KronParam(), weight))
    adapter = KronParam.from_weight(weight)
    matrix = weight.reshape(rows, -1)
    best = kpsvd(matrix, *adapter.term_shapes, adapter.S.numel(), method="exact").to_matrix()
    start = kron_sum(adapter.S0, adapter.B0, adapter.C0)
    assert relative_error(start, best) < 1e-8 or torch.allclose(start, best, atol=1e-10)
    assert torch.equal(adapter.S.detach(), adapter.S0) and torch.equal(adapter.B.detach(), adapter.B0)


@given(layers(dtype=torch.float32), RANKS)
def test_trainable_count_is_the_closed_form(case, rank):
    layer, _ = case
    adapter = build(layer, rank)
    if adapter is None:
        return
    (m1, n1), (m2, n2) = adapter.term_shapes
    r = adapter.S.numel()
    assert adapter.num_trainable() == KronParam.trainable_count(tuple(layer.weight.shape), rank=rank)
    assert adapter.num_trainable() == r * (m1 * n1 + m2 * n2 + 1)
    assert sum(buffer.numel() for buffer in adapter.buffers()) == adapter.num_trainable()


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(48, 20), nn.Linear(768, 3072), nn.Conv1d(12, 20, 3), nn.Conv2d(12, 20, 3), nn.Conv2d(64, 128, 1)],
    ids=["linear", "linear-vit-mlp", "conv1d", "conv2d", "conv2d-1x1"],
)
def test_rank_one_count_is_peft_lokr_full_factors_plus_the_scale(layer):
    """The oracle: peft's LoKr with full factors has our default shapes, so ours = its count + 1."""
    peft = pytest.importorskip("peft")
    shape = tuple(layer.weight.shape)
    model = peft.get_peft_model(nn.Sequential(layer), peft.LoKrConfig(r=4096, target_modules=["0"]))
    lokr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert KronParam.trainable_count(shape, rank=1) == lokr + 1


def test_given_shapes_split_the_matrix_view():
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)  # matrix view (6, 36)
    adapter = KronParam.from_weight(weight, rank=2, b_shape=(3, 6), c_shape=(2, 6))
    assert adapter.B.shape == (2, 3, 6) and adapter.C.shape == (2, 2, 6)
    full = KronParam.from_weight(weight, rank=12, b_shape=(3, 6), c_shape=(2, 6))
    # all terms kept: the start reproduces the weight
    assert torch.allclose(kron_sum(full.S0, full.B0, full.C0), weight.reshape(6, 36), atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": 1.0}, TypeError, "rank must be an int"),
        ({"b_shape": (2, 3)}, ValueError, "b_shape and c_shape must be given together"),
        ({"b_shape": (2, 3, 1), "c_shape": (1, 1)}, TypeError, "b_shape must be a pair"),
        ({"b_shape": (0, 3), "c_shape": (1, 1)}, ValueError, r"b_shape\[0\] must be >= 1"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        KronParam(**kwargs)


def test_shapes_that_do_not_tile_the_weight_raise():
    with pytest.raises(ValueError, match=r"must multiply to the weight's matrix view \(d_out, d_in\*K\) = \(6, 36\)"):
        KronParam.from_weight(torch.randn(6, 4, 3, 3), b_shape=(3, 6), c_shape=(2, 5))
