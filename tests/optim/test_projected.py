"""The projected-Adam engine: a float64 numpy oracle, subspace properties, param groups, the
subspace across a dtype-changing load, edge-value options, NaN gradients and training.
What every optimizer meets (torch.optim behaviour, tensor-only state and bit-identical resume,
half precision, foreach, typed errors for each option) is
``tests/contracts/test_optimizer_contract.py``'s.

The oracle re-implements DCT-projected Adam from its formula (module docstring of
:mod:`optim.projected`) with ``scipy.fft.dct`` as the basis, so the engine's orientation, refresh
schedule, moment policies, bias correction, scale and weight decay are all checked against an
independent implementation.
"""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp import dct_matrix
from optim import DCTProjectedAdam, ProjectedAdam, SVDProjectedAdam
from optim.projectors import DCTProjector, RandomProjector
from optim.rotated import ARO, RotatedAdam
from tests.strategies import SEEDS, gaussian

PROJECTORS = ("dct", "svd", "random")
MOMENTS = ("keep", "rotate", "reset")
# (rows, cols) or a conv kernel: tall compresses columns, wide compresses rows, conv is (3, 8).
SHAPES = ((9, 5), (4, 7), (6, 6), (3, 2, 2, 2))


def oriented(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The engine's view of a weight-shaped tensor: (shape[0], -1), transposed if wide."""
    view = matrix.reshape(shape[0], -1)
    return view.mT if view.shape[0] < view.shape[1] else view


def basis_of(optimizer: ProjectedAdam, param: torch.Tensor) -> torch.Tensor:
    """The current P of ``param``, rebuilt from its state independently of the engine."""
    state = optimizer.state[param]
    group = next(
        group for group in optimizer.param_groups if any(p is param for p in group["params"])
    )
    dim = min(param.shape[0], param[0].numel())
    rank = state["exp_avg"].shape[1]
    if group["projector"] == "dct":
        return dct_matrix(dim, dtype=state["exp_avg"].dtype)[state["index"]].T
    if group["projector"] == "svd":
        return state["basis"]
    return RandomProjector().basis(state, dim, rank, state["exp_avg"])


def state_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    return {
        index: {key: value.clone() for key, value in state.items()}
        for index, state in optimizer.state_dict()["state"].items()
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for index, state in a.items():
        assert state.keys() == b[index].keys()
        for key, value in state.items():
            assert value.dtype == b[index][key].dtype, (index, key)
            assert torch.equal(value, b[index][key]), (index, key)


# ----------------------------------------------------------------------------------------------
# Oracle: DCT-projected Adam in numpy float64


def reference_dct_adam(
    weight: np.ndarray,
    grads: list[np.ndarray],
    *,
    rank: int,
    gap: int,
    moments: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
) -> list[np.ndarray]:
    beta1, beta2 = betas
    shape = weight.shape
    rows = shape[0]
    cols = weight.size // rows
    transposed = rows < cols
    weight = weight.copy()
    index, exp_avg, exp_avg_sq, moment_step, path = None, None, None, 0, []
    for step, grad in enumerate(grads):
        X = grad.reshape(rows, cols)
        X = X.T if transposed else X
        dim = X.shape[1]
        r = min(rank, dim)
        coefficients = scipy.fft.dct(X, norm="ortho", axis=1)
        if step % gap == 0:
            chosen = np.sort(np.argsort(-np.square(coefficients).sum(0))[:r])
            if index is None:
                exp_avg, exp_avg_sq = np.zeros((X.shape[0], r)), np.zeros((X.shape[0], r))
            elif moments == "reset":
                exp_avg, exp_avg_sq, moment_step = np.zeros_like(exp_avg), np.zeros_like(exp_avg), 0
            elif moments == "rotate":
                # DCT bases: a kept column keeps its moments, a new one starts with a zero
                # first moment and its row's mean second moment.
                kept = {int(j): c for c, j in enumerate(index)}
                new_avg = np.zeros_like(exp_avg)
                new_avg_sq = np.repeat(exp_avg_sq.mean(1, keepdims=True), r, axis=1)
                for c, j in enumerate(chosen):
                    if int(j) in kept:
                        new_avg[:, c] = exp_avg[:, kept[int(j)]]
                        new_avg_sq[:, c] = exp_avg_sq[:, kept[int(j)]]
                exp_avg, exp_avg_sq = new_avg, new_avg_sq
            index = chosen
        low = coefficients[:, index]
        moment_step += 1
        exp_avg = beta1 * exp_avg + (1 - beta1) * low
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * low**2
        direction = (exp_avg / (1 - beta1**moment_step)) / (
            np.sqrt(exp_avg_sq / (1 - beta2**moment_step)) + eps
        )
        full = np.zeros_like(coefficients)
        full[:, index] = direction
        update = scale * scipy.fft.idct(full, norm="ortho", axis=1)
        update = update.T if transposed else update
        weight = weight * (1 - lr * weight_decay) - lr * update.reshape(shape)
        path.append(weight)
    return path


@settings(max_examples=30)
@given(
    shape=st.sampled_from(SHAPES),
    seed=SEEDS,
    rank=st.integers(1, 8),
    gap=st.integers(1, 4),
    moments=st.sampled_from(MOMENTS),
    weight_decay=st.sampled_from([0.0, 0.1]),
    scale=st.sampled_from([1.0, 0.25]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
)
def test_dct_engine_matches_the_numpy_oracle(
    shape, seed, rank, gap, moments, weight_decay, scale, betas
):
    """Includes rank >= dimension (clamped; then Adam in the full DCT basis)."""
    steps = 7
    weight = gaussian(shape, seed)
    grads = [gaussian(shape, seed + 1 + step) for step in range(steps)]
    options = {
        "lr": 0.05,
        "betas": betas,
        "eps": 1e-8,
        "weight_decay": weight_decay,
        "scale": scale,
    }
    expected = reference_dct_adam(
        weight.numpy(), [g.numpy() for g in grads], rank=rank, gap=gap, moments=moments, **options
    )
    param = torch.nn.Parameter(weight.clone())
    optimizer = ProjectedAdam([param], rank=rank, update_gap=gap, moments=moments, **options)
    for grad, want in zip(grads, expected):
        param.grad = grad.clone()
        optimizer.step()
        np.testing.assert_allclose(param.detach().numpy(), want, rtol=0, atol=1e-11)
    dim = min(shape[0], weight[0].numel())
    assert optimizer.state[param]["exp_avg"].shape == (
        max(shape[0], weight[0].numel()),
        min(rank, dim),
    )


# ----------------------------------------------------------------------------------------------
# Subspace properties of every projector


@pytest.mark.parametrize("projector", PROJECTORS)
@settings(max_examples=12)
@given(shape=st.sampled_from(SHAPES), seed=SEEDS, rank=st.integers(1, 4))
def test_keep_updates_lie_in_the_selected_subspace(projector, shape, seed, rank):
    param = torch.nn.Parameter(gaussian(shape, seed))
    optimizer = ProjectedAdam([param], lr=0.1, rank=rank, projector=projector, update_gap=100)
    for step in range(4):
        param.grad = gaussian(shape, seed + 1 + step)
        before = param.detach().clone()
        optimizer.step()
        P = basis_of(optimizer, param)
        delta = oriented(param.detach() - before, shape)
        assert float(delta.abs().max()) > 1e-3
        residual = delta - delta @ P @ P.mT
        assert float(residual.abs().max()) <= 1e-12


@pytest.mark.parametrize("projector", PROJECTORS)
@settings(max_examples=12)
@given(shape=st.sampled_from(SHAPES), seed=SEEDS, rank=st.integers(1, 4))
def test_rotate_conserves_the_moments_projection(projector, shape, seed, rank):
    """At a refresh, m P_new^T = m_old P_old^T P_new P_new^T (first moment), read back from the
    state after the step by removing the step's own gradient contribution."""
    beta1, beta2 = 0.9, 0.99
    param = torch.nn.Parameter(gaussian(shape, seed))
    optimizer = ProjectedAdam(
        [param],
        lr=0.0,
        rank=rank,
        projector=projector,
        update_gap=2,
        moments="rotate",
        betas=(beta1, beta2),
    )
    for step in range(2):
        param.grad = gaussian(shape, seed + 1 + step)
        optimizer.step()
    state = optimizer.state[param]
    old_avg, old_avg_sq, old_basis = (
        state["exp_avg"].clone(),
        state["exp_avg_sq"].clone(),
        basis_of(optimizer, param),
    )
    old_index = state["index"].clone() if projector == "dct" else None
    grad = gaussian(shape, seed + 7)
    param.grad = grad
    optimizer.step()  # step 2: a refresh
    basis = basis_of(optimizer, param)
    low = oriented(grad, shape) @ basis
    rotated = (state["exp_avg"] - (1 - beta1) * low) / beta1
    rotated_sq = (state["exp_avg_sq"] - (1 - beta2) * low.square()) / beta2
    torch.testing.assert_close(
        rotated @ basis.mT, old_avg @ old_basis.mT @ basis @ basis.mT, atol=1e-10, rtol=0
    )
    if projector == "dct":
        old_columns = {int(j): c for c, j in enumerate(old_index)}
        for c, j in enumerate(state["index"].tolist()):
            if j in old_columns:
                torch.testing.assert_close(
                    rotated[:, c], old_avg[:, old_columns[j]], atol=1e-10, rtol=0
                )
                torch.testing.assert_close(
                    rotated_sq[:, c], old_avg_sq[:, old_columns[j]], atol=1e-10, rtol=0
                )
            else:
                assert float(rotated[:, c].abs().max()) <= 1e-10
                torch.testing.assert_close(
                    rotated_sq[:, c], old_avg_sq.mean(1), atol=1e-10, rtol=1e-12
                )


@pytest.mark.parametrize("projector", PROJECTORS)
def test_reset_zeroes_the_moments_and_restarts_bias_correction(projector):
    shape, lr, eps, betas = (8, 5), 0.1, 1e-8, (0.9, 0.999)
    param = torch.nn.Parameter(gaussian(shape, 0))
    optimizer = ProjectedAdam(
        [param],
        lr=lr,
        rank=2,
        projector=projector,
        update_gap=3,
        moments="reset",
        betas=betas,
        eps=eps,
    )
    for step in range(3):
        param.grad = gaussian(shape, 1 + step)
        optimizer.step()
    state = optimizer.state[param]
    assert int(state["moment_step"]) == 3
    grad = gaussian(shape, 10)
    param.grad = grad
    before = param.detach().clone()
    optimizer.step()  # step 3: a refresh
    assert int(state["step"]) == 4 and int(state["moment_step"]) == 1
    low = grad @ basis_of(optimizer, param)
    torch.testing.assert_close(state["exp_avg"], (1 - betas[0]) * low, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(state["exp_avg_sq"], (1 - betas[1]) * low**2, atol=1e-14, rtol=1e-12)
    # The first step after a reset is Adam's first step: the sign-like low / (|low| + eps).
    expected = before - lr * (low / (low.abs() + eps)) @ basis_of(optimizer, param).mT
    torch.testing.assert_close(param.detach(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("moments", ["keep", "rotate"])
def test_keep_and_rotate_do_not_restart_bias_correction(moments):
    param = torch.nn.Parameter(gaussian((6, 4), 0))
    optimizer = ProjectedAdam([param], rank=2, update_gap=2, moments=moments)
    for step in range(5):
        param.grad = gaussian((6, 4), 1 + step)
        optimizer.step()
        assert int(optimizer.state[param]["moment_step"]) == step + 1


@pytest.mark.parametrize("gap", [1, 3, 4])
def test_dct_refreshes_at_steps_0_T_2T(gap):
    shape, rank = (10, 12), 3
    param = torch.nn.Parameter(gaussian(shape, 0))
    optimizer = DCTProjectedAdam([param], lr=0.01, rank=rank, update_gap=gap)
    index = None
    for step in range(3 * gap + 1):
        grad = gaussian(shape, 100 + step)  # a different dominant subspace every step
        param.grad = grad
        optimizer.step()
        new_index = optimizer.state[param]["index"]
        if step % gap == 0:
            X = oriented(grad, shape)
            _, chosen = DCTProjector().select(X, DCTProjector().init_state(12, rank, X, 0), rank)
            assert torch.equal(new_index, chosen["index"])
        else:
            assert torch.equal(new_index, index)
        index = new_index.clone()


# ----------------------------------------------------------------------------------------------
# Which parameters are projected, and how


@pytest.mark.parametrize(
    ("shape", "moment_shape"),
    [
        ((9, 5), (9, 3)),
        ((4, 7), (7, 3)),
        ((6, 6), (6, 3)),
        ((3, 2, 2, 2), (8, 3)),
        ((8, 2, 3), (8, 3)),
    ],
)
@pytest.mark.parametrize("projector", PROJECTORS)
def test_side_rule_compresses_the_smaller_side(shape, moment_shape, projector):
    param = torch.nn.Parameter(gaussian(shape, 0, torch.float32))
    optimizer = ProjectedAdam([param], rank=3, projector=projector)
    param.grad = gaussian(shape, 1, torch.float32)
    optimizer.step()
    state = optimizer.state[param]
    assert state["exp_avg"].shape == moment_shape
    assert state["exp_avg_sq"].shape == moment_shape
    assert state["step"].dtype == torch.int64 and state["step"].device.type == "cpu"


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((33,), {"rank": 2}),
        ((3, 40), {"rank": 2, "max_dim": 32}),
        ((6, 5), {"rank": None}),
        ((2, 3, 3, 3), {"rank": None}),
    ],
    ids=["1-D", "above-max_dim", "rank-None", "conv-rank-None"],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_unprojected_parameters_follow_torch_adamw_exactly(shape, options, weight_decay):
    param = torch.nn.Parameter(gaussian(shape, 0, torch.float32))
    reference = torch.nn.Parameter(param.detach().clone())
    hyper = {"lr": 0.03, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": weight_decay}
    optimizer = ProjectedAdam([param], **options, **hyper)
    adamw = torch.optim.AdamW([reference], foreach=False, **hyper)
    for step in range(5):
        grad = gaussian(shape, 1 + step, torch.float32)
        param.grad, reference.grad = grad.clone(), grad.clone()
        optimizer.step()
        adamw.step()
        assert torch.equal(param, reference), f"step {step}: {(param - reference).abs().max()}"
    assert "index" not in optimizer.state[param]


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_many_unprojected_parameters_step_together_as_torch_adamw_exactly(weight_decay, foreach):
    """The AdamW parameters of a group step with multi-tensor kernels: bitwise torch.optim.AdamW
    per parameter, a parameter whose state starts later included; a bf16 one (fp32 moments,
    unlike torch's) steps as it does alone."""
    shapes = [(33,), (2, 3, 3, 3), (6, 5), (7,)]
    params = [torch.nn.Parameter(gaussian(shape, i, torch.float32)) for i, shape in enumerate(shapes)]
    half = torch.nn.Parameter(gaussian((9,), 9, torch.float32).bfloat16())
    references = [torch.nn.Parameter(param.detach().clone()) for param in params]
    half_alone = torch.nn.Parameter(half.detach().clone())
    hyper = {"lr": 0.03, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": weight_decay}
    optimizer = ProjectedAdam([*params, half], rank=None, foreach=foreach, **hyper)
    adamw = torch.optim.AdamW(references, foreach=False, **hyper)
    alone = ProjectedAdam([half_alone], rank=None, **hyper)
    for step in range(5):
        for i, (param, reference) in enumerate(zip(params, references)):
            late = i == 3 and step < 2  # no gradient for the first two steps: a later state
            grad = None if late else gaussian(param.shape, 10 * step + i, torch.float32)
            param.grad = grad
            reference.grad = None if grad is None else grad.clone()
        half.grad = gaussian((9,), 100 + step, torch.float32).bfloat16()
        half_alone.grad = half.grad.clone()
        optimizer.step()
        adamw.step()
        alone.step()
        for param, reference in zip(params, references):
            assert torch.equal(param, reference), f"step {step}: {(param - reference).abs().max()}"
        assert torch.equal(half, half_alone)
    assert int(optimizer.state[params[3]]["step"]) == 3


def test_float_rank_is_a_fraction_and_large_ranks_are_clamped():
    tall = torch.nn.Parameter(torch.zeros(20, 10))
    wide = torch.nn.Parameter(torch.zeros(3, 50))
    optimizer = ProjectedAdam([{"params": [tall], "rank": 0.25}, {"params": [wide], "rank": 1000}])
    tall.grad, wide.grad = torch.randn(20, 10), torch.randn(3, 50)
    optimizer.step()
    assert optimizer.state[tall]["exp_avg"].shape == (20, 2)
    assert optimizer.state[wide]["exp_avg"].shape == (50, 3)


# ----------------------------------------------------------------------------------------------
# torch.optim behaviour


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 2),  # weight (6, 2, 2, 2): a (6, 8) matrix, rows compressed
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 12),  # (12, 96): rows compressed
        torch.nn.Tanh(),
        torch.nn.Linear(12, 3),  # (3, 12)
    ).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(8, 2, 5, 5, generator=generator).to(dtype)
    return inputs, torch.randint(0, 3, (8,), generator=generator)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    inputs, labels = batch(step, next(model.parameters()).dtype)
    return torch.nn.functional.cross_entropy(model(inputs), labels)


def train(model, optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        optimizer.zero_grad()
        loss = loss_of(model, step)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def make(kind: str, model: torch.nn.Module, **options) -> ProjectedAdam:
    if kind == "dct":
        return DCTProjectedAdam(model.parameters(), lr=1e-2, rank=2, **options)
    if kind == "svd":
        return SVDProjectedAdam(model.parameters(), lr=1e-2, rank=2, **options)
    return ProjectedAdam(model.parameters(), lr=1e-2, rank=2, projector=kind, **options)


def test_wrappers_configure_the_engine():
    """DCT-AdamW rotates its moments by default (exact for DCT bases); GaLore keeps them."""
    param = torch.nn.Parameter(torch.zeros(4, 4))
    dct_group = DCTProjectedAdam([param]).param_groups[0]
    svd_group = SVDProjectedAdam([param]).param_groups[0]
    assert (dct_group["projector"], dct_group["moments"]) == ("dct", "rotate")
    assert (svd_group["projector"], svd_group["moments"]) == ("svd", "keep")
    assert DCTProjectedAdam([param], moments="reset").param_groups[0]["moments"] == "reset"


def test_param_groups_keep_their_own_rank_and_projector():
    model = tiny_model()
    conv, _, first, _, last = model
    optimizer = ProjectedAdam(
        [
            {"params": [conv.weight], "rank": 1, "projector": "svd", "moments": "reset"},
            {"params": [first.weight], "rank": 4},
            {"params": [last.weight, conv.bias, first.bias, last.bias], "rank": None, "lr": 0.0},
        ],
        lr=1e-2,
        rank=2,
        projector="dct",
    )
    train(model, optimizer, range(2))
    assert optimizer.state[conv.weight]["basis"].shape == (6, 1)
    assert optimizer.state[first.weight]["index"].shape == (4,)
    assert optimizer.state[last.weight]["exp_avg"].shape == (3, 12)
    assert [group["rank"] for group in optimizer.param_groups] == [1, 4, None]


def test_add_param_group_fills_defaults():
    """(Bad group options are the optimizer contract's error inputs.)"""
    model = tiny_model()
    conv, _, first, _, last = model
    optimizer = ProjectedAdam([conv.weight], lr=1e-2, rank=2, update_gap=5)
    optimizer.add_param_group({"params": [first.weight], "rank": 3})
    assert optimizer.param_groups[1]["update_gap"] == 5 and optimizer.param_groups[1]["rank"] == 3
    with pytest.raises(TypeError):
        optimizer.add_param_group({"params": [torch.zeros(3, 3, dtype=torch.complex64)]})
    assert len(optimizer.param_groups) == 2


def saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("kind", PROJECTORS)
def test_fp32_checkpoint_continues_in_the_same_subspace_in_float64(kind):
    """Loaded into a float64 model, the next step (step 3 is not a refresh: update_gap=2) matches
    the float32 run's: the subspace and moments carry over. (The dtype casts themselves are the
    optimizer contract's.)"""
    model = tiny_model()
    optimizer = make(kind, model, update_gap=2)
    train(model, optimizer, range(3))
    checkpoint = torch.load(
        saved({"model": model.state_dict(), "optimizer": optimizer.state_dict()}), weights_only=True
    )
    wide = tiny_model(dtype=torch.float64)
    wide.load_state_dict(checkpoint["model"])
    resumed = make(kind, wide, update_gap=2)
    resumed.load_state_dict(checkpoint["optimizer"])
    train(wide, resumed, range(3, 4))
    train(model, optimizer, range(3, 4))
    for a, b in zip(wide.parameters(), model.parameters()):
        torch.testing.assert_close(a, b.double(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Bad input (the optimizer contract runs each option's error input; these are edge values)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"rank": -1}, ValueError),
        ({"rank": 1.5}, ValueError),
        ({"rank": 0.0}, ValueError),
        ({"rank": True}, TypeError),
        ({"rank": "8"}, TypeError),
        ({"update_gap": 2.0}, TypeError),
        ({"scale": float("nan")}, ValueError),
        ({"protect_energy": 0.0}, ValueError),
    ],
)
def test_rejects_bad_options(options, error):
    with pytest.raises(error):
        ProjectedAdam([torch.nn.Parameter(torch.zeros(4, 4))], **options)


@pytest.mark.parametrize("kind", PROJECTORS)
def test_nan_gradient_at_a_refresh_raises_and_leaves_the_state_intact(kind):
    param = torch.nn.Parameter(gaussian((6, 4), 0))
    optimizer = make(kind, torch.nn.ParameterList([param]), update_gap=2, moments="rotate")
    for step in range(2):
        param.grad = gaussian((6, 4), 1 + step)
        optimizer.step()
    before, weight = state_snapshot(optimizer), param.detach().clone()
    bad = gaussian((6, 4), 5)
    bad[2, 1] = float("nan")
    param.grad = bad
    with pytest.raises(ValueError, match="NaN"):
        optimizer.step()
    assert_same_state(state_snapshot(optimizer), before)
    assert torch.equal(param, weight)


@pytest.mark.parametrize("kind", PROJECTORS)
def test_nan_gradient_in_one_parameter_leaves_every_parameter_intact(kind):
    """The failing check of the last parameter must not leave the others half-stepped."""
    model = tiny_model()
    optimizer = make(kind, model, update_gap=2, moments="rotate")
    train(model, optimizer, range(2))
    before = state_snapshot(optimizer)
    weights = [param.detach().clone() for param in model.parameters()]
    optimizer.zero_grad()
    loss_of(model, 2).backward()
    model[4].weight.grad[0, 0] = float("inf")
    with pytest.raises(ValueError):
        optimizer.step()
    assert_same_state(state_snapshot(optimizer), before)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))


def test_nan_gradient_on_the_first_step_does_not_poison_the_next():
    shape = (6, 4)
    param = torch.nn.Parameter(gaussian(shape, 0))
    twin = torch.nn.Parameter(gaussian(shape, 0))
    optimizer, reference = (DCTProjectedAdam([p], rank=2) for p in (param, twin))
    bad = gaussian(shape, 1)
    bad[0, 0] = float("nan")
    param.grad = bad
    with pytest.raises(ValueError):
        optimizer.step()
    for step in range(3):
        param.grad, twin.grad = gaussian(shape, 2 + step), gaussian(shape, 2 + step)
        optimizer.step()
        reference.step()
    assert torch.equal(param, twin)


def test_check_finite_false_lets_nan_through():
    param = torch.nn.Parameter(gaussian((6, 4), 0))
    optimizer = DCTProjectedAdam([param], rank=2, check_finite=False)
    param.grad = torch.full((6, 4), float("nan"), dtype=torch.float64)
    optimizer.step()
    assert bool(param.isnan().any())


# ----------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("kind", PROJECTORS)
@pytest.mark.parametrize("moments", MOMENTS)
def test_least_squares_loss_decreases(kind, moments):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 16, generator=generator)
    targets = inputs @ torch.randn(16, 12, generator=generator)
    layer = torch.nn.Linear(16, 12)
    optimizer = ProjectedAdam(
        layer.parameters(), lr=0.05, rank=4, projector=kind, moments=moments, update_gap=10
    )
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = (layer(inputs) - targets).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kind", PROJECTORS)
def test_classification_loss_decreases(kind):
    model = tiny_model()
    optimizer = make(kind, model, update_gap=10)
    losses = train(model, optimizer, [0] * 40)
    assert losses[-1] < 0.5 * losses[0]


class _CountingList(list):
    """A param list that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


def test_first_step_walks_the_parameters_a_bounded_number_of_times():
    # Regression: the seed offset of each parameter came from a scan of every group, so a
    # first step walked the parameter list once per parameter (O(P^2)).
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(200)]
    optimizer = ProjectedAdam(params, lr=1e-2, rank=1, projector="random")
    optimizer.param_groups[0]["params"] = _CountingList(params)
    for param in params:
        param.grad = torch.ones_like(param)
    _CountingList.walks = 0
    optimizer.step()
    assert _CountingList.walks <= 5
    assert [int(optimizer.state[param]["seed"]) for param in params[:3]] == [1, 2, 3]


def test_seed_offsets_follow_parameters_added_after_a_step():
    first, second = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3, 4))
    together = ProjectedAdam([{"params": [first]}, {"params": [second]}], rank=1, projector="random")
    stepwise = ProjectedAdam([first], rank=1, projector="random")
    first.grad = second.grad = torch.ones(3, 4)
    stepwise.step()
    stepwise.add_param_group({"params": [second]})
    stepwise.step()
    together.step()
    assert int(stepwise.state[second]["seed"]) == int(together.state[second]["seed"]) == 2


# what the wrappers pin or default differently
_FIXED = {
    DCTProjectedAdam: {"projector": "dct", "moments": "rotate"},
    SVDProjectedAdam: {"projector": "svd"},
}


@pytest.mark.parametrize(
    "cls", [ProjectedAdam, DCTProjectedAdam, SVDProjectedAdam, ARO, RotatedAdam]
)
def test_defaults_are_the_signature_defaults_in_signature_order(cls):
    # The constructors build their defaults from their own arguments (options_of(locals())).
    lr = 0.25
    optimizer = cls([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr)
    signature = inspect.signature(ProjectedAdam.__init__ if cls in _FIXED else cls.__init__)
    expected = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name not in ("self", "params")
    }
    expected.update(lr=lr, **_FIXED.get(cls, {}))
    assert list(optimizer.defaults.items()) == list(expected.items())
