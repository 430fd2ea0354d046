"""Mechanisms 1 and 2 for the optimizers: every load is atomic, and state must fit its parameters.

``load_state_dict`` of every optimizer (and ``Allocator.load_state_dict``) validates all of the
state before it replaces anything: a state whose entries do not fit the parameters they land on
(another order, another shape, missing or extra keys, wrong kinds, out-of-range counters and
indices, bad options, other group structure) raises and leaves parameters, state and param groups
bit-identical. A state that fits loads exactly, through the user's pre- and post-hooks.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from decomp.adapters import Allocator, SNELLAParam
from optim import DCTProjectedAdam, ProjectedAdam

from ..contracts.optimizers import (
    PROJECTED,
    RELIABILITY_FACTORIES,
    assert_same,
    snapshot,
)

SHAPES = [(6, 4), (3, 5), (6,)]  # a tall matrix, a wide one, a vector (AdamW): every path
NAMES = sorted(RELIABILITY_FACTORIES)


def make_params(shapes: list[tuple[int, ...]], seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def train(optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(1000 + seed)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()


def trained(name: str, steps: int, seed: int, shapes=SHAPES, **options) -> torch.optim.Optimizer:
    optimizer = RELIABILITY_FACTORIES[name](make_params(shapes, seed), **options)
    train(optimizer, steps, seed)
    return optimizer


def round_trip(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------- faults
# Each fault edits a deep copy of a saved state_dict (``state`` keyed 0, 1, 2 like SHAPES) for
# parameter ``j``; ``None`` where it does not apply to that optimizer.

Fault = Callable[[dict[str, Any], str, int], dict[str, Any] | None]


def _edit_state(edit: Callable[[dict[str, torch.Tensor]], None]) -> Fault:
    def fault(state_dict: dict[str, Any], name: str, j: int) -> dict[str, Any]:
        edit(state_dict["state"][j])
        return state_dict

    return fault


def _first_floating(state: dict[str, torch.Tensor]) -> str:
    return next(key for key, value in state.items() if value.is_floating_point() and value.ndim)


def _grow(state: dict[str, torch.Tensor]) -> None:
    key = _first_floating(state)
    state[key] = torch.cat([state[key], state[key][:1]])


def _drop_param(state_dict: dict[str, Any], name: str, j: int) -> dict[str, Any]:
    state_dict["param_groups"][0]["params"].pop()
    state_dict["state"].pop(len(SHAPES) - 1)
    return state_dict


def _layout_option(state_dict: dict[str, Any], name: str, j: int) -> dict[str, Any] | None:
    group = state_dict["param_groups"][0]
    if name in PROJECTED:
        group["rank"] = 1
    elif name.startswith("rotated"):
        group["basis"] = "dct" if group["basis"] == "eigen" else "eigen"
    else:
        return None  # ARO has no option that changes its state's layout
    return state_dict


def _dct_index(state_dict: dict[str, Any], name: str, j: int) -> dict[str, Any] | None:
    if state_dict["param_groups"][0].get("projector") != "dct":
        return None
    state_dict["state"][0]["index"] = torch.tensor([1, 4])  # column 4 of a 4-point basis
    return state_dict


def _set_group(key: str, value: Any) -> Fault:
    def fault(state_dict: dict[str, Any], name: str, j: int) -> dict[str, Any]:
        state_dict["param_groups"][0][key] = value
        return state_dict

    return fault


STATE_FAULTS: dict[str, Fault] = {
    "missing key": _edit_state(lambda state: state.pop(_first_floating(state))),
    "unexpected key": _edit_state(lambda state: state.update(bogus=torch.zeros(1))),
    "wrong shape": _edit_state(_grow),
    "float counter": _edit_state(lambda state: state.update(step=state["step"].double())),
    "integer moment": _edit_state(
        lambda state: state.update({_first_floating(state): state[_first_floating(state)].long()})
    ),
    "not a tensor": _edit_state(lambda state: state.update(step=int(state["step"]))),
    "negative counter": _edit_state(lambda state: state.update(step=torch.tensor(-1))),
    "extra group": lambda sd, name, j: {
        **sd,
        "param_groups": [*sd["param_groups"], copy.deepcopy(sd["param_groups"][0])],
    },
    "short group": _drop_param,
    "unknown parameter id": lambda sd, name, j: {**sd, "state": {**sd["state"], 99: sd["state"][j]}},
    "bad option value": _set_group("lr", -1.0),
    "bad option type": _set_group("eps", "tiny"),
    "layout option": _layout_option,
    "index out of range": _dct_index,
    "no state section": lambda sd, name, j: {"param_groups": sd["param_groups"]},
}
TARGET_FAULTS: dict[str, list[tuple[int, ...]]] = {
    "permuted parameters": SHAPES[::-1],
    "other shape": [(7, 4), (3, 5), (6,)],
}


@settings(max_examples=30)
@given(
    name=st.sampled_from(NAMES),
    fault=st.sampled_from(sorted(STATE_FAULTS) + sorted(TARGET_FAULTS)),
    steps=st.integers(1, 3),
    j=st.integers(0, len(SHAPES) - 1),
    seed=st.integers(0, 2**16),
)
def test_a_state_that_does_not_fit_raises_and_changes_nothing(name, fault, steps, j, seed):
    saved = round_trip(trained(name, steps, seed).state_dict())
    target_shapes = TARGET_FAULTS.get(fault, SHAPES)
    if fault in STATE_FAULTS:
        saved = STATE_FAULTS[fault](copy.deepcopy(saved), name, j)
    if saved is None:
        return  # the fault does not apply to this optimizer
    target = trained(name, 1, seed + 1, shapes=target_shapes)
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError)) as raised:
        target.load_state_dict(saved)
    assert_same(before, snapshot(target))
    if fault in ("bad option value", "bad option type"):
        assert ("lr" if "value" in fault else "eps") in str(raised.value)
    if fault in ("missing key", "wrong shape", "permuted parameters", "other shape"):
        assert "param_groups[0]['params']" in str(raised.value)  # names the parameter


@settings(max_examples=20)
@given(name=st.sampled_from(NAMES), steps=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_a_state_that_fits_loads_exactly_and_continues_bit_identically(name, steps, seed):
    source = trained(name, steps, seed)
    target = trained(name, 1, seed + 1)
    target.load_state_dict(round_trip(source.state_dict()))
    for a, b in zip(source.param_groups[0]["params"], target.param_groups[0]["params"]):
        assert_same(source.state[a], target.state[b])
        with torch.no_grad():
            b.copy_(a)
    train(source, 2, seed + 2)
    train(target, 2, seed + 2)
    for a, b in zip(source.param_groups[0]["params"], target.param_groups[0]["params"]):
        assert torch.equal(a, b)


def test_regression_projected_optimizers_refuse_each_others_moments_and_subspaces():
    """The issue's example: a state saved for [W1, W2] loaded into [W2, W1] stepped silently.

    (8, 3) and (5, 8) both keep 8 x 2 moments and 2 indices: the recorded compressed side (3
    for the first, 5 for the second) tells them apart (before it was recorded, the indices'
    range did, and only where it happened to exceed the smaller side).
    """
    first, second = make_params([(8, 3), (5, 8)], 0)
    optimizer = DCTProjectedAdam([first, second], rank=2)
    train(optimizer, 1, 0)
    swapped = DCTProjectedAdam([second, first], rank=2)
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(5, 8\)\) was made for a compressed side d = 3, expected d = 5",
    ):
        swapped.load_state_dict(optimizer.state_dict())
    assert not swapped.state
    reordered = DCTProjectedAdam([make_params([(7, 3)], 1)[0], second], rank=2)
    with pytest.raises(ValueError, match=r"'exp_avg' of shape \(8, 2\), expected \(7, 2\)"):
        reordered.load_state_dict(optimizer.state_dict())
    assert not reordered.state


def test_named_parameters_in_another_order_raise():
    """Same shapes cannot tell a permutation; the names of named_parameters() can."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    optimizer = ProjectedAdam(model.named_parameters(), rank=2)
    train(optimizer, 1, 0)
    saved = optimizer.state_dict()
    reordered = ProjectedAdam(list(model.named_parameters())[::-1], rank=2)
    before = snapshot(reordered)
    with pytest.raises(ValueError, match="another order"):
        reordered.load_state_dict(saved)
    assert_same(before, snapshot(reordered))


# --------------------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("name", NAMES)
def test_pre_hook_edits_are_honoured_and_post_hooks_see_the_loaded_state(name):
    source = trained(name, 2, 0)
    target = trained(name, 0, 1)

    def double_first_moment(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        values = state_dict["state"][0]
        key = _first_floating(values)
        values[key] = values[key] * 2
        return state_dict

    seen = []
    target.register_load_state_dict_pre_hook(double_first_moment)
    target.register_load_state_dict_post_hook(
        lambda optimizer: seen.append({k: v.clone() for k, v in optimizer.state[first].items()})
    )
    first = target.param_groups[0]["params"][0]
    target.load_state_dict(source.state_dict())
    source_state = source.state[source.param_groups[0]["params"][0]]
    key = _first_floating(source_state)
    assert torch.equal(target.state[first][key], source_state[key] * 2)
    assert_same(seen[0], target.state[first])


@pytest.mark.parametrize("name", NAMES)
def test_a_pre_hook_that_breaks_the_state_raises_and_changes_nothing(name):
    target = trained(name, 1, 1)
    saved = trained(name, 2, 0).state_dict()
    target.register_load_state_dict_pre_hook(
        lambda optimizer, state_dict: {**state_dict, "state": {0: {"step": torch.tensor(1)}}}
    )
    before = snapshot(target)
    with pytest.raises(ValueError, match="missing"):
        target.load_state_dict(saved)
    assert_same(before, snapshot(target))


@pytest.mark.parametrize("name", NAMES)
def test_options_a_saved_group_lacks_take_the_defaults_and_other_keys_stay(name):
    saved = trained(name, 2, 0).state_dict()
    for key in ("maximize", "check_finite", "fused", "capturable", "differentiable"):
        del saved["param_groups"][0][key]
    saved["param_groups"][0]["initial_lr"] = 0.5  # an LR scheduler's bookkeeping
    target = RELIABILITY_FACTORIES[name](make_params(SHAPES, 1), check_finite=False)
    target.load_state_dict(saved)
    group = target.param_groups[0]
    assert group["check_finite"] is False and group["maximize"] is False
    assert group["fused"] is None and group["initial_lr"] == 0.5


def test_load_rejects_what_is_not_a_state_dict():
    optimizer = trained("dct", 1, 0)
    before = snapshot(optimizer)
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        optimizer.load_state_dict([("state", {})])
    assert_same(before, snapshot(optimizer))


@pytest.mark.parametrize("source, target", [("dct", "svd"), ("svd", "dct"), ("projected-svd", "dct")])
def test_a_class_that_fixes_its_projector_refuses_another_one(source, target):
    """Regression: a DCTProjectedAdam state loaded into SVDProjectedAdam replaced its groups'
    projector, so an object of one class silently stepped as the other. A load (or a param
    group) with another projector now raises and changes nothing."""
    saved = trained(source, 2, 0).state_dict()
    optimizer = trained(target, 1, 1)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"fixes projector=.*use ProjectedAdam\(projector=\.\.\.\)"):
        optimizer.load_state_dict(saved)
    assert_same(before, snapshot(optimizer))
    other = "svd" if optimizer.param_groups[0]["projector"] == "dct" else "dct"
    with pytest.raises(ValueError, match="fixes projector"):
        optimizer.add_param_group({"params": make_params([(4, 3)], 2), "projector": other})
    assert_same(before, snapshot(optimizer))
    ProjectedAdam(make_params(SHAPES, 0), rank=2, update_gap=2).load_state_dict(saved)


# ----------------------------------------------------------------------------------- Allocator


def allocator_model(seed: int) -> tuple[nn.Module, Allocator]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    for layer in model:
        nn.utils.parametrize.register_parametrization(layer, "weight", SNELLAParam(rank=2))
    allocator = Allocator(model, target_sparsity=0.5, total_steps=4)
    model(torch.randn(7, 6)).square().sum().backward()
    allocator.step()
    allocator.update_budget(2)
    return model, allocator


def allocator_snapshot(allocator: Allocator) -> dict[str, Any]:
    return {
        "state": allocator.state_dict(),
        "kept": [adapter.kept_entries.clone() for adapter in allocator.adapters],
    }


ALLOCATOR_FAULTS: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    "missing key": lambda state: state.pop("1.out.uncertainty"),
    "unexpected key": lambda state: state.update({"2.in.importance": torch.zeros(2)}),
    "wrong shape": lambda state: state.update({"0.in.importance": torch.zeros(3, 3)}),
    "count above the cap": lambda state: state["keep_counts"].fill_(10**6),
    "negative count": lambda state: state["keep_counts"].fill_(-1),
    "float counts": lambda state: state.update(keep_counts=state["keep_counts"].double()),
    "adapter count": lambda state: state.update(keep_counts=state["keep_counts"][:1]),
    "NaN EMA": lambda state: state["1.in.uncertainty"].fill_(float("nan")),
    "negative EMA": lambda state: state["0.out.importance"].fill_(-1.0),
    "integer EMA": lambda state: state.update({"0.out.importance": state["0.out.importance"].long()}),
}


@settings(max_examples=20)
@given(fault=st.sampled_from(sorted(ALLOCATOR_FAULTS)), seed=st.integers(0, 2**16))
def test_allocator_load_of_a_state_that_does_not_fit_changes_nothing(fault, seed):
    _, source = allocator_model(seed)
    _, target = allocator_model(seed + 1)
    state = copy.deepcopy(source.state_dict())
    ALLOCATOR_FAULTS[fault](state)
    before = allocator_snapshot(target)
    with pytest.raises(ValueError):
        target.load_state_dict(state)
    assert_same(before, allocator_snapshot(target))


def test_allocator_load_of_a_fitting_state_restores_it():
    _, source = allocator_model(0)
    _, target = allocator_model(1)
    target.load_state_dict(round_trip(source.state_dict()))
    assert_same(allocator_snapshot(source), allocator_snapshot(target))
