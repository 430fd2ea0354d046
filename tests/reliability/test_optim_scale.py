"""Mechanism 6 for the optimizers: every basis or subspace choice is scale-free.

Each choice the optimizers make from a gradient (the DCT projector's top columns, the
continual-learning sketch and the directions ``consolidate`` protects, ARO's base maps and QR,
RotatedAdam's eigenbases) depends only on the gradient's direction. Computed on raw squares, a
float32 gradient of ``2**70`` (squares beyond the dtype) or ``2**-100`` (squares below it) made
arbitrary choices, zero updates, or 1e6-sized ones. Scaling a gradient by a power of two now
gives the unit-scale choice bit for bit, or a clear error where a statistic the algorithm keeps
(SOAP's Gram matrices) cannot be represented. Also here: a rank-deficient momentum, whose
rounding noise ARO's normalisations used to blow up to most of the update.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optim import ARO, ProjectedAdam, RotatedAdam
from optim.projectors import DCTProjector

from ..contracts.optimizers import assert_same, snapshot

# Powers of two whose squares leave float32 (2**70: 2**140 overflows; 2**-100: 2**-200 is zero),
# while the scaled gradient's entries stay normal numbers, so scaling them is exact.
SCALES = [2.0**-100, 2.0**-70, 2.0**70, 2.0**100]


def gaussian(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40)
@given(
    norm=st.sampled_from(["l2", "l1"]),
    method=st.sampled_from(["fft", "matmul"]),
    scale=st.sampled_from(SCALES),
    rows=st.integers(1, 12),
    dim=st.integers(2, 12),
    seed=st.integers(0, 2**16),
)
def test_dct_projector_picks_the_columns_it_picks_at_unit_scale(norm, method, scale, rows, dim, seed):
    """Regression: L2 scores of a 1e20 gradient were all inf, of a 1e-30 one all zero, and
    top-k then returned arbitrary columns."""
    grad = gaussian((rows, dim), seed) * torch.linspace(0.2, 3.0, dim)
    projector = DCTProjector(norm, method)
    rank = max(1, dim // 3)
    state = {"index": torch.arange(rank)}
    low, chosen = projector.select(grad, state, rank)
    scaled_low, scaled_chosen = projector.select(grad * scale, state, rank)
    assert torch.equal(scaled_chosen["index"], chosen["index"])
    assert torch.equal(scaled_low, low * scale)


def train(optimizer, params, grads, scale: float) -> None:
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad * scale
        optimizer.step()


@pytest.mark.parametrize("projector", ["dct", "svd", "random"])
@pytest.mark.parametrize("scale", SCALES)
def test_protect_sketches_and_protects_the_same_directions_at_every_scale(projector, scale):
    """Regression: the sketch's energies overflowed at 2**70 (LinAlgError inside the step) and
    underflowed to zero at 2**-100 (consolidate silently protected nothing)."""
    shapes = [(8, 6), (5, 9)]
    grads = [[gaussian(shape, 10 * step + i) for i, shape in enumerate(shapes)] for step in range(3)]
    runs = []
    for factor in (1.0, scale):
        params = [nn.Parameter(gaussian(shape, i)) for i, shape in enumerate(shapes)]
        optimizer = ProjectedAdam(
            params, rank=2, update_gap=1, projector=projector, protect=True, weight_decay=0.0
        )
        train(optimizer, params, grads, factor)
        sketches = [optimizer.state[param]["sketch"].clone() for param in params]
        counts = optimizer.consolidate()
        runs.append((params, optimizer, sketches, counts))
    (params, optimizer, sketches, counts) = runs[0]
    (scaled_params, scaled_optimizer, scaled_sketches, scaled_counts) = runs[1]
    assert counts == scaled_counts and all(count > 0 for count in counts.values())
    for sketch, scaled_sketch in zip(sketches, scaled_sketches):
        torch.testing.assert_close(scaled_sketch, sketch * scale, rtol=1e-5, atol=0)
    for param, scaled_param in zip(params, scaled_params):
        torch.testing.assert_close(
            scaled_optimizer.state[scaled_param]["protected"].abs(),
            optimizer.state[param]["protected"].abs(),
            rtol=0,
            atol=1e-5,
        )


@settings(max_examples=30)
@given(
    base=st.sampled_from(["sinkhorn", "row_norm", "sign"]),
    shape=st.sampled_from([(6, 4), (4, 7), (5, 5)]),
    scale=st.sampled_from([2.0**-90, 2.0**70, 2.0**90]),
    seed=st.integers(0, 2**16),
)
def test_aro_steps_as_at_unit_scale(base, shape, scale, seed):
    """Regression: row norms of a 1e20 momentum overflowed (a zero update), of a 1e-30 one
    underflowed (``row_norm`` moved the weight by 1e6)."""
    grads = [[gaussian(shape, seed + step)] for step in range(3)]
    weights = []
    for factor in (1.0, scale):
        param = nn.Parameter(gaussian(shape, seed - 1))
        train(ARO([param], lr=0.05, base=base), [param], grads, factor)
        weights.append(param.detach())
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-6)


def range_residual(update: torch.Tensor, basis: torch.Tensor) -> float:
    """The part of ``update``'s columns outside the span of ``basis``'s columns, relatively."""
    q = torch.linalg.qr(basis.double()).Q
    update = update.double()
    return float((update - q @ (q.T @ update)).norm() / update.norm())


@settings(max_examples=30)
@given(
    base=st.sampled_from(["sinkhorn", "row_norm", "sign"]),
    shape=st.sampled_from([(6, 10), (10, 6), (16, 24), (24, 16), (1, 5), (5, 1)]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_aro_on_a_rank_one_momentum_moves_only_its_own_direction(base, shape, scale, seed):
    """Regression: on a rank-1 gradient (a first step on one sample) the QR completes the
    rotation with directions orthogonal to it; their rows of R^T M are rounding noise, which the
    base maps normalised to full size: 50-95% of the update lay outside the gradient's span (and
    torch.compile, rounding otherwise, stepped elsewhere). Exact arithmetic makes those rows
    zero, and so do rows at the rounding level now: the rotated side stays in the span."""
    rows, cols = shape
    left, right = gaussian((rows, 1), seed) * scale, gaussian((1, cols), seed + 1)
    for rotate in ("rows", "smaller"):
        param = nn.Parameter(torch.zeros(shape))
        optimizer = ARO(
            [param], lr=1.0, weight_decay=0.0, base=base, adjust_lr="none", rotate=rotate
        )
        for _ in range(2):
            param.grad = left @ right
            optimizer.step()
        update = -param.detach()
        # The rotated side: the rows' span, or with "smaller" the columns' for a tall weight.
        rows_rotated = rotate == "rows" or rows <= cols
        residual = (
            range_residual(update, left) if rows_rotated else range_residual(update.T, right.T)
        )
        assert residual < 1e-5


def test_rotated_adam_refuses_a_gram_that_overflows_and_changes_nothing():
    """Regression: a finite 5e18 gradient (Adam's moments hold it) overflowed SOAP's Gram
    matrices; the next refresh's QR made every basis NaN, and every weight NaN from then on,
    with check_finite=True. Now that refresh raises before anything is written."""
    param = nn.Parameter(gaussian((12, 8), 0))
    optimizer = RotatedAdam([param], basis="eigen", update_gap=2)
    train(optimizer, [param], [[gaussian((12, 8), 1)], [gaussian((12, 8), 2)]], 1.0)
    before = snapshot(optimizer)
    param.grad = gaussian((12, 8), 3) * 5e18
    with pytest.raises(ValueError, match=r"left Gram statistics of .* are not finite .* left unchanged"):
        optimizer.step()
    assert_same(before, snapshot(optimizer))
    train(optimizer, [param], [[gaussian((12, 8), 4)]] * 3, 1.0)
    assert torch.isfinite(param).all()


@pytest.mark.parametrize("check_finite", [True, False])
def test_rotated_adam_first_step_on_an_overflowing_gram(check_finite):
    """Regression: eigh of an inf Gram raised LinAlgError ("failed to converge") from inside the
    first step. With check_finite the error says what overflowed; either way no state is left."""
    param = nn.Parameter(gaussian((6, 4), 0))
    optimizer = RotatedAdam([param], basis="eigen", check_finite=check_finite)
    param.grad = gaussian((6, 4), 1) * 1e20
    error = ValueError if check_finite else torch.linalg.LinAlgError
    with pytest.raises(error, match="Gram statistics" if check_finite else None):
        optimizer.step()
    assert not optimizer.state.get(param)


@pytest.mark.parametrize("scale", [2.0**-40, 2.0**50])
def test_rotated_adam_eigenbases_are_those_of_unit_scale(scale):
    """Where the Grams fit the dtype, their eigenbases and refreshes do not depend on the scale."""
    grads = [[gaussian((6, 4), step)] for step in range(5)]
    states = []
    for factor in (1.0, scale):
        param = nn.Parameter(gaussian((6, 4), 9))
        optimizer = RotatedAdam([param], basis="eigen", update_gap=2)
        train(optimizer, [param], grads, factor)
        states.append(optimizer.state[param])
    for key in ("basis_left", "basis_right"):
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=1e-6)
