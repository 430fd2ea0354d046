"""The contract every adapter meets, run over every entry of ``registry.ADAPTER_CASES``, which
covers every registered adapter class.

Identity at init (and, where documented, its absence) over hypothesis-drawn layers (Linear,
Conv1d/2d/3d with groups, dilation, stride and every padding mode), the closed-form trainable
count, merge equivalence after a training step, gradients reaching only adapter tensors, the
linear branch forward against the weight path, adapter
save -> load into a fresh model, an atomic load (a file missing a tensor changes nothing),
``copy.deepcopy`` independence, bf16 and fp16 layers, the ``state_dict`` round trip, and the
adapter's own refusal of a weight outside its ndim range, and the one-learning-rate rule: the
first AdamW step of each default configuration within a factor 3 of LoRA r=8's.

Example counts are per adapter case and kept small so that the file stays fast as cases are
added; ``HYPOTHESIS_PROFILE=dev`` does not raise them (the per-test settings win), so explore with
``--hypothesis-seed`` or by raising them locally.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import (
    adapter_state_dict,
    apply,
    load_adapter,
    merge,
    registered,
    save_adapter,
    trainable_parameters,
)

from tests.adapters.strategies import adapter_of, default_fits, layers, seeded

from .first_step import LORA_RANK, median_first_step_over_loras
from .registry import ADAPTER_CASES, AdapterCase

IDS = [case.name for case in ADAPTER_CASES]


class LayerBank(nn.Module):
    """One layer of each supported kind, each fed its own input; the output is all outputs, flat."""

    def __init__(self, kinds: frozenset[str], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            available = {
                "linear": lambda: nn.Linear(8, 6),
                "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"),
                "conv2d": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"),
                "conv3d": lambda: nn.Conv3d(2, 4, 2, dilation=2, padding=1, padding_mode="replicate"),
            }
            self.layers = nn.ModuleDict({kind: available[kind]() for kind in sorted(kinds)}).to(dtype)
        shapes = {"linear": (3, 8), "conv1d": (2, 4, 7), "conv2d": (2, 4, 5, 5), "conv3d": (2, 2, 4, 4, 4)}
        self.inputs = {kind: torch.randn(*shapes[kind], generator=seeded(1)).to(dtype) for kind in self.layers}

    def forward(self) -> torch.Tensor:
        return torch.cat([layer(self.inputs[kind]).flatten() for kind, layer in self.layers.items()])


def adapt(model: nn.Module, case: AdapterCase) -> nn.Module:
    return apply(model, lambda name, module: case.factory(), target=r".*")


def train_step(model: nn.Module, seed: int = 0) -> None:
    """One Adam step on a random linear loss: any non-zero gradient moves every adapter tensor."""
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    output = model()
    direction = torch.randn(output.shape, generator=seeded(seed)).to(output.dtype)
    (output * direction).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    difference = torch.linalg.vector_norm((approx - exact).double())
    return float(difference / torch.linalg.vector_norm(exact.double()).clamp_min(1e-30))


def test_every_registered_adapter_class_has_a_case():
    covered = {type(case.factory()) for case in ADAPTER_CASES}
    assert sorted(name for name, cls in registered().items() if cls not in covered) == []


# --------------------------------------------------------------------------------------------
# One learning rate for all (issue 12)

# Layers every default configuration adapts at full budget (no channel or rank capped below
# LoRA's 8 by a 1-channel input), linear and conv, square, wide and tall (11 x 91 and 70 x 11:
# where LDUParam's first rule stepped 4.7 and 0.35 times LoRA's).
FIRST_STEP_SHAPES = [
    (32, 32, 3, 3), (64, 32, 3, 3), (64, 32, 1, 1), (64, 64), (256, 64), (64, 256), (16, 8, 3), (11, 91), (70, 11),
]  # fmt: skip
KIND_OF_NDIM = {2: "linear", 3: "conv1d", 4: "conv2d"}


ONE_LR_CASES = [case for case in ADAPTER_CASES if case.first_step_like_loras]


@pytest.mark.parametrize("case", ONE_LR_CASES, ids=[case.name for case in ONE_LR_CASES])
def test_the_first_step_is_within_a_factor_3_of_loras(case):
    """The one-learning-rate rule, as a property of every default configuration: the first AdamW
    step moves W' within a factor 3 of LoRA r=8's step on the same weight (median over an iid and
    a rank-one gradient, two seeds each). A factor 3 is one step of the benchmark's lr grid
    (1e-3, 3e-3, 1e-2, ...). Before the rules (issue 12) the ratios spread from 1/1000 to 70;
    TuckerParam's fixed scale 1 gave 0.31 to 2.6 here (0.22 on a 512 x 512 layer). SNELLParam
    under 1/sqrt(n), 0.4 here, was inside the band; test_snella holds its tighter regression."""
    ratios = {
        shape: median_first_step_over_loras(case.factory, shape)
        for shape in FIRST_STEP_SHAPES
        if KIND_OF_NDIM[len(shape)] in case.layers
    }
    outside = {shape: ratio for shape, ratio in ratios.items() if not 1 / 3 <= ratio <= 3}
    assert ratios and not outside, outside


@st.composite
def moderate_weight_shapes(draw, kinds: frozenset[str]) -> tuple[int, ...]:
    """A linear, conv1d, conv2d or conv3d weight shape with 8 to 96 channels a side, an aspect ratio
    (fan-in over outputs, or the inverse) of at most 16 and room for LoRA r=8. Beyond it some defaults step several
    times LoRA's (measured on an (8, 134, 5, 5) weight, fan-in 419 times the outputs: DCT 12.6,
    SVD 4.4, SNELLA 3.9; DCT's n = m + n_in coefficients step by sqrt(3 (1 + n_in / m) / 8)
    times LoRA's)."""
    kind = draw(st.sampled_from(sorted(kinds)))
    d_out, d_in = draw(st.integers(8, 96)), draw(st.integers(8, 96))
    kernel = {"linear": (), "conv1d": draw(st.sampled_from([(1,), (3,), (5,), (7,)])),
              "conv2d": draw(st.sampled_from([(1, 1), (3, 3), (3, 1), (5, 5), (7, 7)])),
              "conv3d": draw(st.sampled_from([(1, 1, 1), (3, 3, 3)]))}[kind]  # fmt: skip
    fan_in = d_in * math.prod(kernel)
    assume(max(fan_in / d_out, d_out / fan_in) <= 16)
    # the reference must fit the layer, as every adapter's default budget does: LoRA r=8 trains
    # 8 (d_out + fan_in) numbers (an 8 x 10 layer would hold fewer than LoRA trains)
    assume(LORA_RANK * (d_out + fan_in) <= d_out * fan_in)
    return (d_out, d_in, *kernel)


@pytest.mark.parametrize("case", ONE_LR_CASES, ids=[case.name for case in ONE_LR_CASES])
@settings(max_examples=10)
@given(data=st.data())
def test_the_first_step_is_within_a_factor_3_of_loras_on_drawn_layers(case, data):
    """The same band on drawn layer shapes. LDUParam's first rule, s0 = 1/sqrt(n), left it on
    such shapes (4.7 on 11 x 91, 0.35 on 70 x 11): its factors are not of order 1 on a wide
    matrix."""
    shape = data.draw(moderate_weight_shapes(case.layers))
    try:
        ratio = median_first_step_over_loras(case.factory, shape)
    except ValueError as error:  # a default budget that does not fit the layer (Kron on a few shapes)
        assume("does not fit" not in str(error))
        raise
    assert 1 / 3 <= ratio <= 3, (shape, ratio)


# --------------------------------------------------------------------------------------------
# Properties over drawn layers


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
@settings(max_examples=20)
@given(data=st.data())
def test_identity_at_init_exactly_where_documented(case, data):
    """Registration leaves the output unchanged, except for the cases documented to start away
    from the pretrained weight (``expect_identity_at_init=False``), which must really differ."""
    layer, x = data.draw(layers(case.layers, torch.float32))
    assume(default_fits(case.factory(), layer))
    with torch.no_grad():
        before = layer(x)
        parametrize.register_parametrization(layer, "weight", case.factory())
        after = layer(x)
    identity_tolerance = 1e-6  # LoRA-XS's documented normal init moves the output by ~1e-5
    if case.expect_identity_at_init:
        assert relative_error(after, before) <= identity_tolerance
    else:
        assert relative_error(after, before) > identity_tolerance


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
@settings(max_examples=10)
@given(data=st.data())
def test_trainable_count_equals_closed_form(case, data):
    layer, _ = data.draw(layers(case.layers, torch.float32))
    assume(default_fits(case.factory(), layer))
    parametrize.register_parametrization(layer, "weight", case.factory())
    adapter = adapter_of(layer)
    expected = type(adapter).trainable_count(tuple(adapter.weight_shape), **adapter.config())
    assert adapter.num_trainable() == expected > 0


class Wrapped(nn.Module):
    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.x = x

    def forward(self) -> torch.Tensor:
        return self.layer(self.x)


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
@settings(max_examples=8)
@given(data=st.data())
def test_training_step_changes_output_and_merge_keeps_it(case, data):
    layer, x = data.draw(layers(case.layers, torch.float32))
    assume(default_fits(case.factory(), layer))
    model = adapt(Wrapped(layer, x), case)
    before = model().detach()
    train_step(model)
    with torch.no_grad():
        trained = model()
        assert not torch.equal(trained, before), "a training step left the output unchanged"
        merge(model)
        assert not parametrize.is_parametrized(model.layer)
        assert relative_error(model(), trained) <= 1e-5


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
@settings(max_examples=8)
@given(data=st.data())
def test_gradients_reach_only_adapter_tensors(case, data):
    layer, x = data.draw(layers(case.layers, torch.float32))
    assume(default_fits(case.factory(), layer))
    model = adapt(Wrapped(layer, x), case)
    adapter_ids = {id(p) for p in adapter_of(model.layer).parameters()}
    assert {id(p) for p in trainable_parameters(model)} == adapter_ids
    output = model()
    (output * torch.randn(output.shape, generator=seeded(0))).sum().backward()
    for name, parameter in model.named_parameters():
        if id(parameter) in adapter_ids:
            continue
        assert parameter.grad is None and not parameter.requires_grad, name
    gradients = [p.grad for p in adapter_of(model.layer).parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in gradients)


LINEAR_CASES = [case for case in ADAPTER_CASES if "linear" in case.layers]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[case.name for case in LINEAR_CASES])
@settings(max_examples=8)
@given(data=st.data())
def test_branch_forward_computes_the_weight_path(case, data):
    """``apply``'s default branch forward on ``nn.Linear`` (classes with a branch form) equals the
    weight path (``branch=False``): exactly at init where the update is zero, and up to rounding
    after a training step, in the output and in every adapter gradient. A class without a branch
    form keeps ``nn.Linear.forward``."""
    layer, x = data.draw(layers(frozenset({"linear"}), torch.float64))
    assume(default_fits(case.factory(), layer))
    pretrained = layer(x).detach()
    branched = apply(Wrapped(copy.deepcopy(layer), x), lambda name, module: case.factory(), target=r".*")
    weighted = apply(Wrapped(layer, x), lambda name, module: case.factory(), target=r".*", branch=False)
    weighted.load_state_dict(branched.state_dict())
    adapter = adapter_of(branched.layer)
    assert (type(branched.layer).forward is not nn.Linear.forward) == adapter.has_branch
    assert type(weighted.layer).forward is nn.Linear.forward
    if case.expect_identity_at_init and adapter.has_branch:
        assert torch.equal(branched().detach(), pretrained)
    train_step(branched)
    weighted.load_state_dict(branched.state_dict())
    direction = torch.randn(pretrained.shape, generator=seeded(3), dtype=torch.float64)
    for model in (branched, weighted):
        (model() * direction).sum().backward()
    torch.testing.assert_close(branched(), weighted(), rtol=1e-9, atol=1e-12)
    for mine, theirs in zip(adapter.parameters(), adapter_of(weighted.layer).parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
    if adapter.has_branch:
        delta = adapter.delta(weighted.layer.parametrizations.weight.original)
        torch.testing.assert_close(adapter.branch(x), x @ delta.T, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Model-level behaviour on a bank of every supported layer kind


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_save_then_load_into_fresh_model_reproduces_outputs(case, tmp_path):
    pretrained = LayerBank(case.layers)
    model = adapt(copy.deepcopy(pretrained), case)
    train_step(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = adapt(copy.deepcopy(pretrained), case)
    assert not torch.equal(fresh().detach(), model().detach())
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(), model(), rtol=0, atol=0)
    saved = adapter_state_dict(model)
    assert all(torch.equal(adapter_state_dict(fresh)[key], value) for key, value in saved.items())


@pytest.mark.parametrize("adapted", [False, True], ids=["into-plain", "into-adapted"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_loading_a_file_missing_a_tensor_changes_nothing(case, adapted, tmp_path):
    pretrained = LayerBank(case.layers)
    model = adapt(copy.deepcopy(pretrained), case)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    missing = sorted(tensors)[-1]
    save_file({key: value for key, value in tensors.items() if key != missing}, str(path), metadata=metadata)
    target = adapt(copy.deepcopy(pretrained), case) if adapted else copy.deepcopy(pretrained)
    state = {key: value.clone() for key, value in target.state_dict().items()}
    flags = [parameter.requires_grad for parameter in target.parameters()]
    classes = [type(module) for module in target.modules()]
    with pytest.raises(ValueError, match=f"tensor '{missing}' only in the model"):
        load_adapter(target, path)
    assert [type(module) for module in target.modules()] == classes
    assert [parameter.requires_grad for parameter in target.parameters()] == flags
    assert target.state_dict().keys() == state.keys()
    assert all(torch.equal(target.state_dict()[key], value) for key, value in state.items())


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_state_dict_round_trip(case):
    pretrained = LayerBank(case.layers)
    model = adapt(copy.deepcopy(pretrained), case)
    train_step(model)
    fresh = adapt(copy.deepcopy(pretrained), case)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(), model(), rtol=0, atol=0)


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_deepcopy_is_independent(case):
    model = adapt(LayerBank(case.layers), case)
    train_step(model)
    replica = copy.deepcopy(model)
    reference = model().detach()
    # parametrize's own removal, not merge(): on a class shared with the original it would
    # delete the original's `.weight` property too.
    for layer in replica.layers.values():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    torch.testing.assert_close(replica(), reference, rtol=1e-5, atol=1e-6)
    assert all(parametrize.is_parametrized(layer, "weight") for layer in model.layers.values())
    torch.testing.assert_close(model(), reference, rtol=0, atol=0)
    train_step(model, seed=1)
    assert not torch.equal(model().detach(), reference)
    torch.testing.assert_close(replica(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_half_layer_keeps_its_dtype(case, dtype):
    """Adapter tensors take the layer's dtype; identity cases keep the half weight bit for bit."""
    pretrained = LayerBank(case.layers, dtype=dtype)
    model = adapt(copy.deepcopy(pretrained), case)
    for kind, layer in model.layers.items():
        assert layer.weight.dtype == dtype
        if case.expect_identity_at_init:
            assert torch.equal(layer.weight, pretrained.layers[kind].weight), kind
        floating = [p for p in adapter_of(layer).parameters() if p.is_floating_point()]
        assert all(p.dtype == dtype for p in floating), kind
    output = model()
    assert output.dtype == dtype
    output.float().square().sum().backward()
    assert all(p.grad is not None for p in trainable_parameters(model))


@pytest.mark.parametrize("shape", [(6,), (2,) * 6], ids=["1d", "6d"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_adapter_refuses_a_weight_outside_its_ndim_range_and_stays_unbuilt(case, shape):
    """The adapter's own check; ``apply`` refuses unsupported layer types before building any
    adapter (tests/adapters/test_model.py)."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.randn(shape, generator=seeded(0)))
    weight = holder.weight
    adapter = case.factory()
    assert not adapter.min_ndim <= len(shape) <= adapter.max_ndim, f"{case.name} takes {shape}"
    ndim_range = rf"\[{adapter.min_ndim}, {adapter.max_ndim}\]"
    with pytest.raises(ValueError, match=f"weight must have ndim in {ndim_range}"):
        parametrize.register_parametrization(holder, "weight", adapter)
    assert not adapter.is_built and not parametrize.is_parametrized(holder)
    assert holder.weight is weight
