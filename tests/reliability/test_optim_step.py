"""Mechanism 3 for the optimizers: every step validates (and computes what can fail) before it writes.

A step that fails -- a sparse gradient, a NaN/Inf gradient that reaches a basis computation, a
failing decomposition, a state that no longer fits its parameter or options -- raises before any
parameter or any state of that step changes, whichever parameter of whichever group is at fault.
A step that does not raise gives the documented answer (non-finite gradients between refreshes
propagate as in ``torch.optim.Adam``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optim import ARO, DCTProjectedAdam, ProjectedAdam, RotatedAdam, SVDProjectedAdam

from ..contracts.optimizers import (
    PROJECTED,
    RELIABILITY_FACTORIES,
    assert_same,
    raises_on_nonfinite,
    snapshot,
)

SHAPES = [(6, 4), (3, 5), (6,)]  # a tall matrix, a wide one, a vector (AdamW)
NAMES = sorted(RELIABILITY_FACTORIES)


def make_params(shapes, seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def set_grads(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)


def run(optimizer: torch.optim.Optimizer, params, steps: range) -> None:
    for step in steps:
        set_grads(params, step)
        optimizer.step()


def _floating_key(state: dict[str, torch.Tensor]) -> str:
    return next(key for key, value in state.items() if value.is_floating_point() and value.ndim)


def _layout_option(name: str) -> dict[str, object] | None:
    """A group option whose change no longer fits a started state."""
    if name in PROJECTED:
        return {"rank": 1}
    if name == "rotated-eigen":
        return {"max_dim": 4}  # the 6- and 5-long sides lose their eigenbases
    if name == "rotated-dct":
        return {"basis": "eigen"}
    return None


FAULTS = ["sparse", "nan", "inf", "state shape", "state key", "option changed"]


@settings(max_examples=30)
@given(
    name=st.sampled_from(NAMES),
    fault=st.sampled_from(FAULTS),
    steps=st.integers(0, 3),
    j=st.integers(0, len(SHAPES) - 1),
    seed=st.integers(0, 2**16),
)
def test_a_failing_step_changes_nothing_and_a_passing_one_is_documented(
    name, fault, steps, j, seed
):
    params = make_params(SHAPES, seed)
    optimizer = RELIABILITY_FACTORIES[name](params)
    run(optimizer, params, range(seed, seed + steps))
    set_grads(params, seed + steps)
    state = optimizer.state.get(params[j])
    if fault == "sparse":
        params[j].grad = params[j].grad.to_sparse()
        expected = (RuntimeError, "sparse")
    elif fault in ("nan", "inf"):
        params[j].grad[0] = float(fault)
        raises = raises_on_nonfinite(name, steps, matrix=params[j].ndim == 2)
        expected = (ValueError, "NaN or Inf") if raises else None
    elif fault in ("state shape", "state key"):
        if not state:
            return  # no state yet to damage
        key = _floating_key(state)
        if fault == "state key":
            del state[key]
        else:
            state[key] = torch.cat([state[key], state[key][:1]])
        expected = (ValueError, rf"param_groups\[0\]\['params'\]\[{j}\]")
    else:
        change = _layout_option(name)
        if change is None or steps == 0:
            return  # ARO has no layout option; a fresh optimizer has no state to misfit
        optimizer.param_groups[0].update(change)
        expected = (ValueError, "expected")
    before = snapshot(optimizer)
    if expected is None:
        optimizer.step()
        assert not torch.isfinite(params[j]).all()  # propagated, as torch.optim.Adam does
        assert all(torch.isfinite(p).all() for i, p in enumerate(params) if i != j)
        return
    with pytest.raises(expected[0], match=expected[1]):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


# ------------------------------------------------------------------------------ regressions


# "compressed side changed" keeps the projected state's shapes ((6, 4) -> (6, 5): moments 6 x r,
# r indices or a seed), so only the recorded side tells; "parameter converted" (model.double())
# keeps every shape: both passed the check before the review after issue 12.
IN_PLACE_EDITS = [
    "resize", "extra key", "parameter reshaped", "compressed side changed", "parameter converted", "option replaced"
]
# ARO has no option that changes its state's layout.
EDIT_CASES = [
    (name, edit)
    for name in NAMES
    for edit in IN_PLACE_EDITS
    if edit != "option replaced" or _layout_option(name) is not None
]


@pytest.mark.parametrize(("name", "edit"), EDIT_CASES)
def test_regression_an_edit_after_a_step_that_passed_its_check_is_still_caught(name, edit):
    """The step skips the layout check of a state whose entries, options and parameter shape
    are the very objects it last found fitting; every edit that keeps those objects but changes
    what the check reads must still raise, and change nothing."""
    params = make_params(SHAPES, 0)
    optimizer = RELIABILITY_FACTORIES[name](params)
    run(optimizer, params, range(3))  # the third step's check found the state fitting
    state = optimizer.state[params[0]]
    if edit == "resize":
        key = _floating_key(state)
        state[key].resize_(state[key].shape[0] + 1, *state[key].shape[1:])
    elif edit == "extra key":
        state["extra"] = torch.zeros(1)
    elif edit == "parameter reshaped":
        params[0].data = torch.randn(7, 4)
    elif edit == "compressed side changed":
        params[0].data = torch.randn(6, 5)
    elif edit == "parameter converted":
        params[0].data = params[0].data.double()
    else:
        optimizer.param_groups[0].update(_layout_option(name))
    set_grads(params, 3)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="expected"):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


def twins(factory, shape=(6, 4), seed=0):
    """The same parameter twice, each with its own optimizer from ``factory``."""
    first, second = (nn.Parameter(p.detach().clone()) for p in make_params([shape], seed) * 2)
    return (first, factory([first])), (second, factory([second]))


def nan_gradient(shape, seed: int) -> torch.Tensor:
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    grad[0, 0] = float("nan")
    return grad


@pytest.mark.parametrize("check_finite", [True, False])
def test_regression_eigen_nan_on_the_first_step_is_not_a_silent_switch_to_adam(check_finite):
    """RotatedAdam(basis="eigen") with a NaN on its first step used to raise from eigh, keep the
    NaN statistics and run as plain Adam (no basis) from then on. Now the step raises before any
    state exists, and the next finite step is a true first step."""
    factory = lambda p: RotatedAdam(p, basis="eigen", update_gap=2, check_finite=check_finite)
    (param, optimizer), (twin, reference) = twins(factory)
    param.grad = nan_gradient(param.shape, 0)
    error = ValueError if check_finite else torch.linalg.LinAlgError
    with pytest.raises(error):
        optimizer.step()
    assert not optimizer.state.get(param) and torch.equal(param, twin)
    run(optimizer, [param], range(1, 6))
    run(reference, [twin], range(1, 6))
    assert torch.equal(param, twin)
    assert {"basis_left", "basis_right"} <= optimizer.state[param].keys()


def test_regression_eigen_nan_at_a_later_refresh_changes_nothing():
    """SOAP's power-iteration refresh (a QR) would turn NaN statistics into NaN bases."""
    (param, optimizer), _ = twins(lambda p: RotatedAdam(p, basis="eigen", update_gap=2))
    run(optimizer, [param], range(2))  # the next step is Adam step 2: a refresh
    before = snapshot(optimizer)
    param.grad = nan_gradient(param.shape, 5)
    with pytest.raises(ValueError, match="NaN or Inf at a basis update"):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


def test_regression_aro_nan_never_reaches_the_rotation():
    """ARO's QR of a NaN cross matrix returns NaN silently, and the rotation never recovers."""
    (param, optimizer), (twin, reference) = twins(lambda p: ARO(p, lr=0.01))
    run(optimizer, [param], range(2))
    run(reference, [twin], range(2))
    before = snapshot(optimizer)
    param.grad = nan_gradient(param.shape, 5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        optimizer.step()
    assert_same(before, snapshot(optimizer))
    run(optimizer, [param], range(2, 5))
    run(reference, [twin], range(2, 5))
    assert torch.equal(param, twin)


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: SVDProjectedAdam(p, rank=2, svd="exact", check_finite=False),
        lambda p: SVDProjectedAdam(p, rank=2, check_finite=False),
    ],
    ids=["svd-exact", "svd-rsvd"],
)
def test_a_failing_decomposition_of_the_second_parameter_changes_nothing(factory):
    """With check_finite=False the SVD of a NaN gradient fails inside the step: after the first
    parameter was prepared, before anything is written."""
    params = make_params([(6, 4), (5, 3)], 0)
    optimizer = factory(params)
    run(optimizer, params, range(1))
    optimizer.param_groups[0]["update_gap"] = 1  # every step refreshes
    set_grads(params, 1)
    params[1].grad[0, 0] = float("nan")
    before = snapshot(optimizer)
    with pytest.raises(torch.linalg.LinAlgError):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


def test_a_failing_sketch_of_the_second_parameter_changes_nothing():
    """With check_finite=False a NaN gradient enters the second parameter's update energies;
    the sketch's SVD at the next refresh fails inside the step, before anything is written."""
    params = make_params([(6, 4), (5, 3)], 0)
    optimizer = DCTProjectedAdam(params, rank=2, protect=True, check_finite=False)
    run(optimizer, params, range(1))
    optimizer.param_groups[0]["update_gap"] = 1  # every step refreshes
    set_grads(params, 1)
    params[1].grad[0, 0] = float("nan")
    optimizer.step()
    set_grads(params, 2)
    before = snapshot(optimizer)
    with pytest.raises(torch.linalg.LinAlgError):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


@pytest.mark.parametrize("name", NAMES)
def test_regression_sparse_gradient_in_a_later_group_moves_no_earlier_parameter(name):
    first, vector, second = make_params(SHAPES, 0)
    optimizer = RELIABILITY_FACTORIES[name]([{"params": [first, vector]}, {"params": [second]}])
    run(optimizer, [first, vector, second], range(2))
    set_grads([first, vector, second], 2)
    second.grad = second.grad.to_sparse()
    before = snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"sparse gradients .*param_groups\[1\]"):
        optimizer.step()
    assert_same(before, snapshot(optimizer))


def test_consolidate_is_atomic():
    params = make_params([(6, 4), (5, 3)], 0)
    optimizer = DCTProjectedAdam(params, rank=2, protect=True)
    run(optimizer, params, range(3))
    optimizer.state[params[1]]["sketch"][0, 0] = float("nan")
    before = snapshot(optimizer)
    with pytest.raises(torch.linalg.LinAlgError):
        optimizer.consolidate()
    assert_same(before, snapshot(optimizer))


def test_an_option_changed_after_construction_is_caught_at_the_step():
    """protect=True with no room, set on a live group: the step names it before writing."""
    params = make_params([(6, 4)], 0)
    optimizer = ProjectedAdam(params, rank=2, protect=True)
    optimizer.param_groups[0]["rank"] = 4
    set_grads(params, 0)
    with pytest.raises(ValueError, match="protect=True would protect nothing"):
        optimizer.step()
    assert not optimizer.state.get(params[0])


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_parameter_steps_as_adamw_beside_the_others(name):
    """Regression: an empty weight (a Linear with no inputs, a fully pruned layer) made the
    projected and DCT-rotated optimizers raise from inside decomp ("x must not be empty"); as
    in torch.optim.Adam it now takes a (trivial) AdamW step and the others step normally."""
    *others, empty = make_params([*SHAPES, (4, 0)], 0)
    optimizer = RELIABILITY_FACTORIES[name]([*others, empty])
    reference = RELIABILITY_FACTORIES[name]([nn.Parameter(p.detach().clone()) for p in others])
    for step in range(3):
        empty.grad = torch.zeros(4, 0)
        set_grads(others, step)
        set_grads(reference.param_groups[0]["params"], step)
        optimizer.step()
        reference.step()
    assert set(optimizer.state[empty]) == {"step", "exp_avg", "exp_avg_sq"}
    for param, twin in zip(others, reference.param_groups[0]["params"]):
        assert torch.equal(param, twin)
    RELIABILITY_FACTORIES[name]([*others, empty]).load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_a_compiled_step_is_the_eager_step(name):
    """Regression: torch.compile(optimizer.step) stepped silently elsewhere (inductor, torch 2.13:
    `W.add_(A @ B, alpha=-lr)` lost its alpha, a lerp from fresh zeros to a matmul its weight):
    weights off by 1-9 after four steps. The step now runs eagerly under torch.compile."""
    params = make_params(SHAPES, 0)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    optimizer, reference = RELIABILITY_FACTORIES[name](params), RELIABILITY_FACTORIES[name](twins)
    compiled = torch.compile(optimizer.step)
    for step in range(3):
        set_grads(params, step)
        set_grads(twins, step)
        compiled()
        reference.step()
    for param, twin in zip(params, twins):
        assert torch.equal(param, twin)
