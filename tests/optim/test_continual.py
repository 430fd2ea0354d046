"""The protected-subspace option (:mod:`optim.continual`): the Frequent-Directions guarantee,
``extend_basis``, and ``protect=True`` / ``consolidate()`` in the projected-Adam engine."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optim import ProjectedAdam
from optim.continual import extend_basis, frequent_directions
from tests.strategies import SEEDS, gaussian, orthonormal

PROJECTORS = ("dct", "svd", "random")


def oriented(matrix: torch.Tensor) -> torch.Tensor:
    """The engine's view of a weight-shaped tensor: (shape[0], -1), transposed if wide."""
    view = matrix.reshape(matrix.shape[0], -1)
    return view.mT if view.shape[0] < view.shape[1] else view


# ----------------------------------------------------------------------------------------------
# Frequent Directions


@st.composite
def streams(draw):
    """``(A, size, batch)``: rows with a decaying spectrum, fed ``batch`` rows at a time."""
    dim = draw(st.integers(1, 10))
    count = draw(st.integers(1, 30))
    size = draw(st.integers(1, 8))
    decay = draw(st.sampled_from([0.3, 0.7, 1.0]))
    seed = draw(SEEDS)
    A = gaussian((count, dim), seed) * decay ** torch.arange(dim, dtype=torch.float64)
    return A, size, draw(st.integers(1, 5))


@given(streams())
def test_frequent_directions_guarantee(stream):
    r"""Liberty / Ghashami et al.: :math:`0 \preceq A^\top A - S^\top S` and, for every
    :math:`k < \ell`, :math:`\lVert A^\top A - S^\top S \rVert_2 \le \lVert A - A_k \rVert_F^2 / (\ell - k)`."""
    A, size, batch = stream
    sketch = torch.zeros(size, A.shape[1], dtype=A.dtype)
    for start in range(0, A.shape[0], batch):
        sketch = frequent_directions(sketch, A[start : start + batch])
        assert sketch.shape == (size, A.shape[1])
    error = A.T @ A - sketch.T @ sketch
    eigenvalues = torch.linalg.eigvalsh(error)
    scale = float(A.square().sum())
    assert float(eigenvalues[0]) >= -1e-10 * scale
    tail = torch.linalg.svdvals(A).square().flip(0).cumsum(0).flip(0)  # ||A - A_k||_F^2 at k
    for k in range(min(size, tail.shape[0])):
        assert float(eigenvalues[-1]) <= float(tail[k]) / (size - k) + 1e-10 * scale


@given(dim=st.integers(1, 8), seed=SEEDS, data=st.data())
def test_frequent_directions_is_exact_while_the_stream_fits(dim, seed, data):
    size = data.draw(st.integers(1, 8))
    A = gaussian((data.draw(st.integers(1, size)), dim), seed)
    sketch = frequent_directions(torch.zeros(size, dim, dtype=A.dtype), A)
    torch.testing.assert_close(sketch.T @ sketch, A.T @ A, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------
# extend_basis


@given(dim=st.integers(2, 12), seed=SEEDS, data=st.data())
def test_extend_basis_is_orthonormal_and_respects_energy_and_room(dim, seed, data):
    existing = data.draw(st.integers(0, dim - 1))
    basis = (
        orthonormal(dim, existing, seed) if existing else torch.zeros(dim, 0, dtype=torch.float64)
    )
    max_columns = data.draw(st.integers(existing, dim))
    energy = data.draw(st.floats(0.05, 1.0))
    rows = data.draw(st.integers(1, 8))
    sketch = gaussian((rows, dim), seed + 1) * 0.5 ** torch.arange(dim, dtype=torch.float64)
    extended = extend_basis(basis, sketch, energy, max_columns)
    count = extended.shape[1]
    assert existing <= count <= max_columns
    assert torch.equal(extended[:, :existing], basis)  # old columns stay, first
    torch.testing.assert_close(
        extended.mT @ extended, torch.eye(count, dtype=torch.float64), atol=1e-10, rtol=0
    )
    singular = torch.linalg.svdvals(sketch).square()
    needed = int((singular.cumsum(0) / singular.sum() < energy - 1e-12).sum()) + 1
    if existing == 0:
        # The fewest leading directions holding ``energy`` of the sketch, unless out of room.
        assert count == min(needed, max_columns)
        captured = float((sketch @ extended).square().sum() / sketch.square().sum())
        if count == needed:
            assert captured >= energy - 1e-9
    elif needed <= max_columns - existing:
        # Room for them: everything of the leading directions outside the old basis was added.
        leading = torch.linalg.svd(sketch, full_matrices=False).Vh[:needed]
        leftover = leading.mT - extended @ (extended.mT @ leading.mT)
        assert float(leftover.abs().max()) <= 1e-9


def test_extend_basis_adds_nothing_already_protected_or_from_an_empty_sketch():
    basis = orthonormal(6, 2, 0)
    inside = gaussian((3, 2), 1) @ basis.mT  # rows in span(basis)
    assert torch.equal(extend_basis(basis, inside, 0.99, 6), basis)
    assert torch.equal(extend_basis(basis, torch.zeros(4, 6, dtype=torch.float64), 0.99, 6), basis)
    assert torch.equal(extend_basis(basis, gaussian((3, 6), 2), 0.99, 2), basis)  # no room


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
