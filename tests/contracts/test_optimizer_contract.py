"""One contract for every optimizer in ``optimizers.OPTIMIZER_CASES``.

torch.optim behaviour (closure, zero_grad, grad-less parameters, param groups), tensor-only state
that ``torch.load(weights_only=True)`` reads, a bit-identical continuation after save -> load in
the middle of a run, a load cast to another dtype, half-precision parameters with fp32 state,
AdamW on 1-D and 0-D parameters, typed errors for bad parameters and for each case's
``error_inputs`` (at construction and in ``add_param_group``), bitwise-equal steps with
``foreach=True`` and ``False``, and progress on a problem.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from .optimizers import OPTIMIZER_CASES, OptimizerCase, assert_same, snapshot

CASES = [pytest.param(case, id=case.name) for case in OPTIMIZER_CASES]
ERROR_INPUTS = [
    pytest.param(case, option, id=f"{case.name}-{option}")
    for case in OPTIMIZER_CASES
    for option in case.error_inputs
]
FOREACH_CASES = [pytest.param(case, id=case.name) for case in OPTIMIZER_CASES if case.foreach]


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5)
    ).to(dtype)


def _batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(8, 2, 6, 6, generator=generator).to(dtype)
    return inputs, torch.randint(0, 5, (8,), generator=generator)


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    inputs, targets = _batch(step, dtype)
    return torch.nn.functional.cross_entropy(model(inputs).float(), targets)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        optimizer.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _reload(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("split", [4, 5], ids=["at-refresh", "between-refreshes"])
@pytest.mark.parametrize("case", CASES)
def test_state_is_tensors_only_and_resume_is_bit_identical(case: OptimizerCase, split: int) -> None:
    """The cases refresh every 2 steps: the step after ``split=4`` steps refreshes, after 5 not."""
    reference = _model()
    reference_opt = case.factory(reference.parameters(), 1e-2, weight_decay=0.01)
    _train(reference, reference_opt, range(8))

    model = _model()
    optimizer = case.factory(model.parameters(), 1e-2, weight_decay=0.01)
    _train(model, optimizer, range(split))
    for values in optimizer.state_dict()["state"].values():
        assert all(isinstance(value, torch.Tensor) for value in values.values())
    saved_model, saved_state = copy.deepcopy(model.state_dict()), _reload(optimizer.state_dict())

    resumed = _model()
    resumed.load_state_dict(saved_model)
    resumed_opt = case.factory(resumed.parameters(), 1e-2, weight_decay=0.01)
    resumed_opt.load_state_dict(saved_state)
    _train(resumed, resumed_opt, range(split, 8))
    for ours, theirs in zip(resumed.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)
    assert_same(resumed_opt.state_dict(), reference_opt.state_dict())


@pytest.mark.parametrize("case", CASES)
def test_load_casts_floating_state_and_keeps_integers(case: OptimizerCase) -> None:
    model = _model()
    optimizer = case.factory(model.parameters(), 1e-2)
    _train(model, optimizer, range(3))
    wide = _model(torch.float64)
    wide.load_state_dict(model.state_dict())
    wide_opt = case.factory(wide.parameters(), 1e-2)
    wide_opt.load_state_dict(_reload(optimizer.state_dict()))
    for param in wide.parameters():
        for key, value in wide_opt.state[param].items():
            before = optimizer.state[dict(zip(wide.parameters(), model.parameters()))[param]][key]
            expected = torch.float64 if before.is_floating_point() else before.dtype
            assert value.dtype == expected, key
    _train(wide, wide_opt, range(3, 6))
    assert all(torch.isfinite(param).all() for param in wide.parameters())


@pytest.mark.parametrize("case", CASES)
def test_loss_decreases(case: OptimizerCase) -> None:
    model = _model()
    optimizer = case.factory(model.parameters(), 1e-2)
    first = _loss(model, 0).item()
    for _ in range(30):
        optimizer.zero_grad()
        _loss(model, 0).backward()
        optimizer.step()
    assert _loss(model, 0).item() < 0.7 * first


@pytest.mark.parametrize("case", CASES)
def test_closure_zero_grad_and_parameters_without_gradient(case: OptimizerCase) -> None:
    model = _model()
    frozen = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = case.factory([*model.parameters(), frozen], 1e-2)
    before = frozen.detach().clone()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    with torch.no_grad():  # step runs the closure with grad enabled, as torch.optim
        start = _loss(model, 0)
        loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert torch.equal(loss.detach(), start)  # the loss before the step
    assert torch.equal(frozen, before) and frozen not in optimizer.state
    optimizer.zero_grad()
    assert all(param.grad is None for param in model.parameters())

    # a parameter with state but no gradient this step: neither it nor its state moves
    conv = model[0].weight
    conv_before, state_before = conv.detach().clone(), copy.deepcopy(optimizer.state[conv])
    _loss(model, 1).backward()
    conv.grad = None
    optimizer.step()
    assert torch.equal(conv, conv_before)
    assert_same(dict(optimizer.state[conv]), dict(state_before))


@pytest.mark.parametrize("case", CASES)
def test_vectors_and_scalars_take_adamw(case: OptimizerCase) -> None:
    adam = {"betas": (0.85, 0.99), "eps": 1e-6, "weight_decay": 0.05}
    params = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(()))]
    twins = [torch.nn.Parameter(param.detach().clone()) for param in params]
    optimizer = case.factory(params, 1e-2, **adam)
    reference = torch.optim.AdamW(twins, lr=1e-2, **adam)
    for step in range(4):
        generator = torch.Generator().manual_seed(step)
        for param, twin in zip(params, twins):
            param.grad = torch.randn(param.shape, generator=generator)
            twin.grad = param.grad.clone()
        optimizer.step()
        reference.step()
    assert all(torch.equal(param, twin) for param, twin in zip(params, twins))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters_keep_their_dtype_with_fp32_state(
    case: OptimizerCase, dtype: torch.dtype
) -> None:
    model = _model(dtype)
    optimizer = case.factory(model.parameters(), 1e-2)
    first = _loss(model, 0).item()
    _train(model, optimizer, [0] * 20)
    for param in model.parameters():
        assert param.dtype == dtype and torch.isfinite(param).all()
        for value in optimizer.state[param].values():
            assert not value.is_floating_point() or value.dtype == torch.float32
    assert _loss(model, 0).item() < 0.8 * first  # the half-precision steps are not rounded away


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_rejects_non_real_floating_parameters(case: OptimizerCase, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="real floating"):
        case.factory([torch.zeros(3, 3, dtype=dtype)], 1e-2)


@pytest.mark.parametrize("case", CASES)
def test_rejected_param_group_leaves_the_optimizer_unchanged(case: OptimizerCase) -> None:
    model = _model()
    optimizer = case.factory(model.parameters(), 1e-2)
    groups = len(optimizer.param_groups)
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 3))], "lr": -1.0})
    assert len(optimizer.param_groups) == groups
    with pytest.raises(ValueError, match="lr"):
        case.factory(model.parameters(), -1.0)


@pytest.mark.parametrize(("case", "option"), ERROR_INPUTS)
def test_bad_option_is_refused_at_construction_and_in_add_param_group(
    case: OptimizerCase, option: str
) -> None:
    bad = case.error_inputs[option]
    with pytest.raises(bad.error, match=bad.match):
        case.factory([torch.nn.Parameter(torch.zeros(3, 3))], 1e-2, **{option: bad.value})
    if option not in case.factory([torch.nn.Parameter(torch.zeros(1))], 1e-2).defaults:
        return  # not an option of this optimizer: nothing a param group could set
    optimizer = case.factory(_model().parameters(), 1e-2)
    before = snapshot(optimizer)
    new_group = {"params": [torch.nn.Parameter(torch.zeros(3, 3))], option: bad.value}
    with pytest.raises(bad.group_error or bad.error, match=bad.match):
        optimizer.add_param_group(new_group)
    assert_same(snapshot(optimizer), before)


@pytest.mark.parametrize("case", FOREACH_CASES)
def test_foreach_and_for_loop_steps_are_bitwise_equal(case: OptimizerCase) -> None:
    runs = []
    for foreach in (False, True):
        model = _model()
        optimizer = case.factory(model.parameters(), 1e-2, foreach=foreach)
        _train(model, optimizer, range(5))
        runs.append((list(model.parameters()), list(optimizer.state.values())))
    (params, states), (foreach_params, foreach_states) = runs
    assert all(torch.equal(a, b) for a, b in zip(params, foreach_params))
    for state, foreach_state in zip(states, foreach_states):
        assert state.keys() == foreach_state.keys()
        assert all(torch.equal(state[key], foreach_state[key]) for key in state)


@pytest.mark.parametrize("case", CASES)
def test_sparse_gradients_are_rejected_before_any_parameter_moves(case: OptimizerCase) -> None:
    dense, bias, sparse = (torch.nn.Parameter(torch.randn(*shape)) for shape in ((5, 4), (4,), (5, 4)))
    optimizer = case.factory([dense, bias, sparse], 1e-2)
    for param in (dense, bias, sparse):
        param.grad = torch.randn_like(param)
    optimizer.step()
    before = [param.detach().clone() for param in (dense, bias, sparse)]
    state = copy.deepcopy(optimizer.state_dict())
    sparse.grad = torch.eye(5, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip((dense, bias, sparse), before))
    after = optimizer.state_dict()["state"]
    assert all(
        torch.equal(value, after[key][name])
        for key, values in state["state"].items()
        for name, value in values.items()
    )


@pytest.mark.parametrize("case", CASES)
def test_runs_are_deterministic(case: OptimizerCase) -> None:
    runs = []
    for _ in range(2):
        model = _model()
        _train(model, case.factory(model.parameters(), 1e-2), range(5))
        runs.append([param.detach().clone() for param in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
