"""The protected-subspace option (:mod:`optim.continual`): ``protect=True`` / ``consolidate()`` in
the projected-Adam engine (Frequent Directions and ``extend_basis`` themselves: tests/test_linalg.py)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optim import ProjectedAdam
from optim.continual import project_off
from tests.strategies import SEEDS, gaussian, orthonormal

PROJECTORS = ("dct", "svd", "random")


def oriented(matrix: torch.Tensor) -> torch.Tensor:
    """The engine's view of a weight-shaped tensor: (shape[0], -1), transposed if wide."""
    view = matrix.reshape(matrix.shape[0], -1)
    return view.mT if view.shape[0] < view.shape[1] else view


# ----------------------------------------------------------------------------------------------
# The engine with protect=True


def task_gradients(shape: tuple[int, ...], task: int, dtype: torch.dtype):
    """Gradients of one task: a fixed low-rank structure (per task) plus small noise."""
    view = (shape[0], int(torch.tensor(shape[1:]).prod()))
    left = gaussian((view[0], 2), 10 * task, dtype)
    right = gaussian((2, view[1]), 10 * task + 1, dtype)
    for step in range(1000):
        noise = 0.1 * gaussian(view, 1000 * task + step, dtype)
        yield (left @ right + noise).reshape(shape)


def run_task(param, optimizer, task: int, steps: int) -> list[torch.Tensor]:
    """Step through one task; returns the oriented update of every step."""
    updates = []
    for _, grad in zip(range(steps), task_gradients(tuple(param.shape), task, param.dtype)):
        before = param.detach().clone()
        param.grad = grad
        optimizer.step()
        updates.append(oriented(param.detach() - before))
    return updates


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("shape", [(12, 6), (5, 10), (4, 2, 2, 2)], ids=["tall", "wide", "conv"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_updates_after_consolidate_are_orthogonal_to_the_protected_basis(projector, shape, dtype):
    param = torch.nn.Parameter(gaussian(shape, 0, dtype))
    optimizer = ProjectedAdam(
        [param],
        lr=0.05,
        rank=2,
        projector=projector,
        update_gap=3,
        protect=True,
        protect_energy=0.9,
    )
    run_task(param, optimizer, task=1, steps=6)  # the second task starts with a refresh
    counts = optimizer.consolidate()
    protected = optimizer.state[param]["protected"]
    assert counts == {str(tuple(shape)): protected.shape[1]}
    assert protected.shape[1] >= 1
    updates = run_task(param, optimizer, task=2, steps=7)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for update in updates:
        assert float(update.abs().max()) > 1e-3  # the second task does train
        assert float((update @ protected).abs().max()) <= tolerance * max(
            1.0, float(update.abs().max())
        )


@pytest.mark.parametrize("projector", PROJECTORS)
def test_training_resumes_right_after_consolidate(projector):
    """A task may end between two refreshes. The subspace then in use is, by construction, the
    one just protected; the next task must not wait for the next refresh (up to ``update_gap``
    steps) to move the weights."""
    shape, lr = (12, 6), 0.05
    param = torch.nn.Parameter(gaussian(shape, 0))
    optimizer = ProjectedAdam(
        [param],
        lr=lr,
        rank=2,
        projector=projector,
        update_gap=10,
        protect=True,
        protect_energy=0.9,
    )
    run_task(param, optimizer, task=1, steps=5)
    optimizer.consolidate()
    first = run_task(param, optimizer, task=2, steps=1)[0]
    assert float(first.abs().max()) > 0.1 * lr


@pytest.mark.parametrize("projector", PROJECTORS)
def test_protected_directions_accumulate_and_stay_orthonormal(projector):
    shape = (16, 8)
    param = torch.nn.Parameter(gaussian(shape, 0))
    optimizer = ProjectedAdam(
        [param], lr=0.05, rank=2, projector=projector, update_gap=2, protect=True
    )
    run_task(param, optimizer, task=1, steps=6)
    optimizer.consolidate()
    first = optimizer.state[param]["protected"].clone()
    run_task(param, optimizer, task=2, steps=6)
    optimizer.consolidate()
    both = optimizer.state[param]["protected"]
    assert first.shape[1] >= 1 and both.shape[1] > first.shape[1]
    assert both.shape[1] <= 8 - 2  # room: the dimension less the rank
    assert torch.equal(both[:, : first.shape[1]], first)
    torch.testing.assert_close(
        both.mT @ both, torch.eye(both.shape[1], dtype=both.dtype), atol=1e-10, rtol=0
    )
    # The third task's updates avoid both tasks' directions.
    for update in run_task(param, optimizer, task=3, steps=4):
        assert float((update @ both).abs().max()) <= 1e-12


def test_consolidate_skips_groups_without_protect_and_idle_parameters():
    protected, plain, idle = (torch.nn.Parameter(gaussian((8, 4), seed)) for seed in range(3))
    optimizer = ProjectedAdam(
        [{"params": [protected, idle], "protect": True}, {"params": [plain]}], lr=0.05, rank=2
    )
    for param in (protected, plain):
        param.grad = gaussian((8, 4), 5)
    optimizer.step()
    counts = optimizer.consolidate()
    assert list(counts) == ["(8, 4)"] and counts["(8, 4)"] >= 1
    assert "protected" not in optimizer.state[plain] and not optimizer.state.get(idle)


@pytest.mark.parametrize("projector", PROJECTORS)
def test_protected_state_survives_a_weights_only_round_trip(projector):
    shape = (10, 6)

    def build(weight):
        param = torch.nn.Parameter(weight.clone())
        return param, ProjectedAdam(
            [param], lr=0.05, rank=2, projector=projector, update_gap=3, protect=True
        )

    param, optimizer = build(gaussian(shape, 0))
    run_task(param, optimizer, task=1, steps=5)
    optimizer.consolidate()
    run_task(param, optimizer, task=2, steps=2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_param, resumed = build(param.detach())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for key in ("protected", "sketch"):
        assert torch.equal(resumed.state[resumed_param][key], optimizer.state[param][key])
    # Continue both through a refresh and a second consolidation: bit-identical.
    for p, opt in ((param, optimizer), (resumed_param, resumed)):
        run_task(p, opt, task=2, steps=3)
        opt.consolidate()
    assert torch.equal(resumed_param, param)
    assert torch.equal(
        resumed.state[resumed_param]["protected"], optimizer.state[param]["protected"]
    )


@settings(max_examples=10)
@given(seed=SEEDS, rank=st.integers(1, 3))
def test_without_protect_no_sketch_is_kept(seed, rank):
    param = torch.nn.Parameter(gaussian((6, 5), seed))
    optimizer = ProjectedAdam([param], lr=0.05, rank=rank)
    param.grad = gaussian((6, 5), seed + 1)
    optimizer.step()
    assert "sketch" not in optimizer.state[param] and optimizer.consolidate() == {}



@given(seed=SEEDS, rows=st.integers(1, 6), dim=st.integers(1, 6), data=st.data())
@settings(max_examples=20)
def test_project_off_columns_is_the_row_projection_of_the_transpose(seed, rows, dim, data):
    matrix = gaussian((rows, dim), seed)
    basis = orthonormal(dim, data.draw(st.integers(0, dim), label="protected directions"), seed + 1)
    projected = project_off(matrix, basis)
    torch.testing.assert_close(project_off(matrix.mT.contiguous(), basis, columns=True), projected.mT)
    assert torch.allclose(projected @ basis, torch.zeros(rows, basis.shape[1], dtype=basis.dtype), atol=1e-12)
