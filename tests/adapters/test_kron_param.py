"""KronParam (SoKA-style): exact zero at init, Kronecker formula, KPSVD start, peft LoKr counts, the
one-learning-rate scale, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from decomp import kpsvd
from decomp.adapters import KronParam, apply, load_adapter, save_adapter
from tests.adapters.strategies import adapter_of, default_fits, layers, seeded
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
    expected = weight + adapter.applied_scale * change.reshape(weight.shape)
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
        ({"scale": 0.0}, ValueError, "scale must be a float > 0"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"scale": "1"}, TypeError, "scale must be a float > 0, got str"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        KronParam(**kwargs)


def test_shapes_that_do_not_tile_the_weight_raise():
    with pytest.raises(ValueError, match=r"must multiply to the weight's matrix view \(d_out, d_in\*K\) = \(6, 36\)"):
        KronParam.from_weight(torch.randn(6, 4, 3, 3), b_shape=(3, 6), c_shape=(2, 5))


def fits(weight: torch.Tensor, rank: int | None) -> bool:
    """Whether ``KronParam(rank)`` builds on ``weight`` at the default shapes (``build`` checks the errors)."""
    if not default_fits(KronParam(rank), weight):
        return False
    (m1, n1), (m2, n2) = KronParam.from_weight(weight, rank=1).term_shapes
    return rank is None or rank <= min(m1 * n1, m2 * n2)


def rule_scale(rank: int, b_shape: tuple[int, int], c_shape: tuple[int, int]) -> float:
    """The documented ``scale=None`` rule, written out from the docstring's formula."""
    p, q = b_shape[0] * b_shape[1], c_shape[0] * c_shape[1]
    energy = min(1.0, rank * (p**-0.5 + q**-0.5) ** 2)
    return math.sqrt(2 * rank / (energy * (p + q)))


def unscaled_delta(adapter: KronParam, weight: torch.Tensor) -> torch.Tensor:
    """The update as the class computed it before ``scale`` existed (the code of then, verbatim)."""
    (m1, n1), (m2, n2) = adapter.term_shapes

    def rearranged(S: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        rank = S.shape[0]
        scaled = (S.to(weight.dtype)[:, None] * B.to(weight.dtype).reshape(rank, -1)).T
        return scaled @ C.to(weight.dtype).reshape(rank, -1)

    change = rearranged(adapter.S, adapter.B, adapter.C) - rearranged(adapter.S0, adapter.B0, adapter.C0)
    matrix = change.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)
    return matrix.reshape(weight.shape)


@given(layers(dtype=torch.float32), RANKS, SEEDS)
def test_scale_one_is_the_unscaled_update_bitwise(case, rank, seed):
    """Adapters saved with ``scale=1.0`` (and files from before the option, loaded as 1.0) compute
    exactly what they did."""
    layer, _ = case
    weight = layer.weight.detach()
    assume(fits(weight, rank))
    adapter = KronParam.from_weight(weight, rank=rank, scale=1.0)
    perturb(adapter, seed)
    with torch.no_grad():
        assert torch.equal(adapter.delta(weight), unscaled_delta(adapter, weight))


@given(layers(), RANKS, st.floats(0.01, 100.0), SEEDS)
def test_scale_multiplies_the_update_and_the_default_is_the_rule(case, rank, scale, seed):
    layer, _ = case
    weight = layer.weight.detach()
    assume(fits(weight, rank))
    default, scaled = KronParam.from_weight(weight, rank=rank), KronParam.from_weight(weight, rank=rank, scale=scale)
    assert default.applied_scale == pytest.approx(rule_scale(default.S.numel(), *default.term_shapes), rel=1e-12)
    assert scaled.applied_scale == scale
    perturb(scaled, seed)
    with torch.no_grad():
        torch.testing.assert_close(scaled.delta(weight), scale * unscaled_delta(scaled, weight), rtol=1e-9, atol=1e-12)
    assert KronParam.trainable_count(tuple(weight.shape), rank=rank, scale=scale) == default.num_trainable()


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (1024, 256), (64, 32, 3, 3), (64, 3, 7, 7)])
def test_the_rules_first_adam_step_is_lora_r8s(shape):
    """The derivation of the rule: one Adam step at lr eta (every entry of S, B, C moves by +-eta)
    on a weight of RMS 1/sqrt(n) moves it by about eta * sqrt(2r) of its norm (sqrt(8) eta at
    r = 4, LoRA r=8's on a default-initialised layer); scale=1 moved it 2 to 9 times more."""
    generator = seeded(0)
    weight = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    lr = 1e-3
    ratios = []
    for scale in (None, 1.0):
        adapter = KronParam.from_weight(weight, scale=scale)
        optimizer = torch.optim.Adam(adapter.parameters(), lr=lr)
        (adapter(weight) * torch.randn(shape, generator=seeded(1))).sum().backward()
        optimizer.step()
        with torch.no_grad():
            ratios.append(float(adapter.delta(weight).norm() / weight.norm()))
    target = lr * math.sqrt(2 * adapter.S.numel())
    assert 0.8 * target < ratios[0] < 1.25 * target, (ratios, target)
    assert ratios[1] > 1.9 * ratios[0]


def test_config_round_trip_keeps_the_scale():
    for scale in (None, 0.25, 1.0):
        adapter = KronParam(2, b_shape=(4, 6), c_shape=(5, 8), scale=scale)
        config = adapter.config()
        assert config == {"rank": 2, "b_shape": [4, 6], "c_shape": [5, 8], "scale": scale}
        again = KronParam(**config)
        weight = torch.randn(20, 48, generator=seeded(0))
        assert KronParam.from_weight(weight, **config).applied_scale == again.from_weight(weight, **config).applied_scale


def test_a_file_saved_before_scale_existed_loads_with_scale_one(tmp_path: Path):
    """Regression: such a file has no 'scale' in its config; its factors trained the unscaled update."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(48, 20))
    state = {key: value.clone() for key, value in pretrained.state_dict().items()}
    trained = apply(pretrained, KronParam, target=["0"], scale=1.0)
    perturb(adapter_of(trained[0]), 0)
    x = torch.randn(3, 48, generator=seeded(1))
    path = tmp_path / "kron.safetensors"
    save_adapter(trained, path)
    with safe_open(str(path), "pt") as handle:  # rewritten as an older version wrote it
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    layers_metadata = json.loads(metadata["decomp.adapters"])
    for layer in layers_metadata:
        del layer["config"]["scale"]
    metadata["decomp.adapters"] = json.dumps(layers_metadata)
    save_file(tensors, str(path), metadata=metadata)
    fresh = nn.Sequential(nn.Linear(48, 20))
    fresh.load_state_dict(state)
    load_adapter(fresh, path)
    assert adapter_of(fresh[0]).applied_scale == 1.0
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    ruled = apply(nn.Sequential(nn.Linear(48, 20)), KronParam, target=["0"])  # scale=None: the rule
    ruled[0].parametrizations.weight.original.data.copy_(state["0.weight"])
    with pytest.raises(ValueError, match="'scale': 1.0"):
        load_adapter(ruled, path)
