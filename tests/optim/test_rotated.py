"""Oracles and properties of :mod:`optim.rotated`: ARO and RotatedAdam (DCT and SOAP bases).

The oracles are independent numpy float64 re-statements of the update rules (ARO's QR step, Adam
in a fixed orthonormal basis with ``scipy.fft.dctn``, SOAP's eigenbasis schedule), run for a few
steps on fixed gradient sequences and compared with the optimizers on float64 parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from optim import rotated
from optim.rotated import ARO, RotatedAdam
from tests.strategies import SEEDS, gaussian

BASES = ("sinkhorn", "row_norm", "sign")
ADJUST = ("fan_in", "rms_norm", "spectral_norm", "none")


# --- shared helpers ---------------------------------------------------------------------------


def normal(shape: tuple[int, ...], seed: int, dtype=torch.float64) -> torch.Tensor:
    """:func:`gaussian`, scalars (shape ``()``) included."""
    return gaussian((max(1, int(np.prod(shape))),), seed, dtype).reshape(shape)


def parameters(shapes, seed: int, dtype=torch.float64) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(normal(s, seed + i, dtype)) for i, s in enumerate(shapes)]


def gradients(params, steps: int, seed: int) -> list[list[torch.Tensor]]:
    """``steps`` rounds of fixed Gaussian gradients, one per parameter (float64)."""
    return [
        [normal(tuple(p.shape), seed + 1000 * k + i) for i, p in enumerate(params)]
        for k in range(steps)
    ]


def run(optimizer: torch.optim.Optimizer, params, grads) -> None:
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.to(param.dtype)
        optimizer.step()


def matrices(grads) -> list[np.ndarray]:
    """A single parameter's gradient sequence as float64 ``(shape[0], -1)`` arrays."""
    return [g.reshape(g.shape[0], -1).numpy() for (g,) in grads]


def positive_qr(a: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(a)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


# --- ARO --------------------------------------------------------------------------------------


def np_normalized(x: np.ndarray, axis: int, target: float) -> np.ndarray:
    """Rows (axis 1) or columns (axis 0) to L2 norm ``target``; zero ones stay zero."""
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return target * x / np.where(norms > 0, norms, np.inf)


def np_base_map(x: np.ndarray, base: str, iters: int) -> np.ndarray:
    rows, cols = x.shape
    if base == "sign":
        return np.sign(x)
    if base == "row_norm":
        return np_normalized(x, 1, np.sqrt(cols))
    for _ in range(iters):
        x = np_normalized(np_normalized(x, 1, np.sqrt(cols)), 0, np.sqrt(rows))
    return x


def aro_reference(
    w0, grads, *, lr, momentum, weight_decay, base, iters, adjust_lr, rotate="rows", nesterov=True
):
    """ARO rotating the rows (rotation m^2), or with ``rotate="smaller"`` the smaller side
    (rotation min(m, n)^2, the step on W^T when m > n). Rows rotated on a tall weight: the rows
    past the n-th of R^T M are zero (rank bound; the QR's trailing columns then complete R
    arbitrarily and only its first n columns are determined).

    Returns the weight, the rotation and whether every step was well posed: a QR input whose
    first min(m, n) columns have full rank, and (for ``sign``) no entry within rounding of a sign
    change.
    """
    w = w0.reshape(w0.shape[0], -1).numpy().copy()
    rows, cols = w.shape
    scale = {
        "fan_in": 1 / np.sqrt(cols), "rms_norm": 0.2 * np.sqrt(max(rows, cols)), "spectral_norm": np.sqrt(rows / cols)
    }
    scale = scale.get(adjust_lr, 1.0)
    m = np.zeros_like(w)
    flip = rotate == "smaller" and rows > cols
    rotation = np.eye(cols if flip else rows)
    well_posed = True
    for g in matrices(grads):
        m = momentum * m + (1 - momentum) * g
        stepped = momentum * m + (1 - momentum) * g if nesterov else m
        x = stepped.T if flip else stepped
        bound = min(x.shape)
        framed_old = rotation.T @ x
        framed_old[bound:] = 0
        cross = x @ np_base_map(framed_old, base, iters).T
        rotation = positive_qr(cross)
        framed = rotation.T @ x
        framed[bound:] = 0
        u = rotation @ np_base_map(framed, base, iters)
        u = u.T if flip else u
        w = w * (1 - lr * weight_decay) - lr * scale * u
        well_posed &= np.linalg.cond(cross[:, :bound]) < 1e8
        if base == "sign":
            margin = min(np.abs(framed_old).min(), np.abs(framed).min())
            well_posed &= margin > 1e-9 * np.abs(x).max()
    return torch.from_numpy(w).reshape(w0.shape), torch.from_numpy(rotation), well_posed


@given(
    rows=st.integers(1, 7),
    cols=st.integers(1, 7),
    seed=SEEDS,
    base=st.sampled_from(BASES),
    iters=st.integers(1, 6),
    adjust_lr=st.sampled_from(ADJUST),
    rotate=st.sampled_from(["rows", "smaller"]),
    nesterov=st.booleans(),
)
def test_aro_matches_numpy_reference(rows, cols, seed, base, iters, adjust_lr, rotate, nesterov):
    options = {
        "lr": 0.03,
        "momentum": 0.9,
        "weight_decay": 0.1,
        "adjust_lr": adjust_lr,
        "rotate": rotate,
        "nesterov": nesterov,
    }
    (w,) = parameters([(rows, cols)], seed)
    w0 = w.detach().clone()
    grads = gradients([w], 3, seed)
    opt = ARO([w], base=base, sinkhorn_iters=iters, **options)
    run(opt, [w], grads)
    expected, rotation, well_posed = aro_reference(w0, grads, base=base, iters=iters, **options)
    # With base="sign" a small C = M sign(R^T M)^T is often singular (the QR's trailing columns
    # are then any orthonormal completion) and R^T M can have exact zeros whose computed sign is
    # rounding: such steps have no single answer to compare with.
    assume(well_posed)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-9)
    determined = min(rows, cols)  # R's columns past min(m, n) complete it arbitrarily
    torch.testing.assert_close(opt.state[w]["rotation"][:, :determined], rotation[:, :determined], rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(3, 2, 2), (2, 3, 1, 2), (5, 300)])
def test_aro_matches_numpy_reference_nd_and_long(shape):
    options = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.01, "adjust_lr": "rms_norm"}
    (w,) = parameters([shape], 7)
    w0 = w.detach().clone()
    grads = gradients([w], 3, 7)
    run(ARO([w], **options), [w], grads)
    expected, _, _ = aro_reference(w0, grads, base="sinkhorn", iters=5, **options)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-9)


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    seed=SEEDS,
    base=st.sampled_from(BASES),
    rotate=st.sampled_from(["rows", "smaller"]),
)
def test_aro_rotation_stays_orthogonal(rows, cols, seed, base, rotate):
    (w,) = parameters([(rows, cols)], seed, torch.float32)
    opt = ARO([w], base=base, rotate=rotate)
    run(opt, [w], gradients([w], 6, seed))
    rotation = opt.state[w]["rotation"]
    side = rows if rotate == "rows" else min(rows, cols)
    assert rotation.shape == (side, side) and rotation.dtype == torch.float32
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(side), rtol=0, atol=1e-5)
    assert torch.all(torch.isfinite(w))


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("n", [1, 4])
def test_aro_diagonal_gradients_keep_identity_rotation(base, n):
    """Diagonal M: C = M f(M)^T is a positive diagonal, so R = I and U = f(M) = c sign(M)."""
    lr, weight_decay = 0.05, 0.1
    w = torch.nn.Parameter(gaussian((n, n), 0))
    w0 = w.detach().clone()
    diagonal = torch.tensor([1.5, -0.25, 3.0, -2.0][:n], dtype=torch.float64)
    w.grad = torch.diag(diagonal)
    opt = ARO([w], lr=lr, weight_decay=weight_decay, base=base, adjust_lr="none")
    opt.step()
    assert torch.equal(opt.state[w]["rotation"], torch.eye(n, dtype=torch.float64))
    magnitude = 1.0 if base == "sign" else n**0.5
    expected = w0 * (1 - lr * weight_decay) - lr * magnitude * torch.diag(diagonal.sign())
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 6), (6, 1)])
def test_aro_sinkhorn_on_a_vector_is_sign_descent(shape):
    """A single row (or, rotating the smaller side, column) has a 1 x 1 rotation, and Sinkhorn
    maps it to its sign."""
    w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    grad = gaussian(shape, 3)
    w.grad = grad
    ARO([w], lr=0.1, weight_decay=0.0, adjust_lr="none", rotate="smaller").step()
    torch.testing.assert_close(w.detach(), -0.1 * grad.sign(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "adjust_lr, scale", [("fan_in", 3**-0.5), ("rms_norm", 0.2 * 6**0.5), ("spectral_norm", 2**0.5)]
)
def test_aro_lr_adjustment_scales_the_update(adjust_lr, scale):
    params = parameters([(6, 3), (6, 3)], 4)
    grads = gradients(params[:1], 1, 4)
    grads = [[grads[0][0], grads[0][0]]]
    starts = [p.detach().clone() for p in params]
    run(ARO([params[0]], weight_decay=0.0, adjust_lr=adjust_lr), params[:1], [grads[0][:1]])
    run(ARO([params[1]], weight_decay=0.0, adjust_lr="none"), params[1:], [grads[0][1:]])
    adjusted, plain = (p.detach() - s for p, s in zip(params, starts))
    torch.testing.assert_close(adjusted, scale * plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("base", BASES)
def test_aro_zero_gradient_only_decays(base):
    w = torch.nn.Parameter(gaussian((3, 5), 1))
    w0 = w.detach().clone()
    opt = ARO([w], lr=0.1, weight_decay=0.5, base=base)
    run(opt, [w], [[torch.zeros(3, 5, dtype=torch.float64)]] * 2)
    torch.testing.assert_close(w.detach(), w0 * 0.95**2, rtol=1e-15, atol=0)
    assert torch.all(torch.isfinite(opt.state[w]["rotation"]))


@given(rows=st.integers(1, 10), cols=st.integers(1, 10), seed=SEEDS, iters=st.integers(1, 6))
def test_sinkhorn_normalises_columns_and_is_a_diagonal_scaling(rows, cols, seed, iters):
    x = gaussian((rows, cols), seed)
    out = rotated._sinkhorn(x, iters)
    # The last half-step normalises the columns exactly.
    torch.testing.assert_close(
        torch.linalg.vector_norm(out, dim=0), torch.full((cols,), rows**0.5, dtype=x.dtype)
    )
    # out = D_1 x D_2 with positive diagonals: the ratio out / x is a positive rank-1 matrix.
    ratio = out / x
    assert torch.all(ratio > 0)
    torch.testing.assert_close(
        ratio * ratio[:1, :1], ratio[:, :1] * ratio[:1, :], rtol=1e-10, atol=0
    )
    # Row and column sign flips pass through (why the QR sign convention cannot change ARO).
    signs_r = torch.where(gaussian((rows, 1), seed + 1) < 0, -1.0, 1.0).double()
    signs_c = torch.where(gaussian((1, cols), seed + 2) < 0, -1.0, 1.0).double()
    flipped = rotated._sinkhorn(signs_r * x * signs_c, iters)
    torch.testing.assert_close(flipped, signs_r * out * signs_c, rtol=1e-12, atol=1e-12)


@given(rows=st.integers(2, 8), cols=st.integers(2, 8), seed=SEEDS)
def test_sinkhorn_converges_to_row_and_column_norms(rows, cols, seed):
    out = rotated._sinkhorn(gaussian((rows, cols), seed), 300)
    row_norms = torch.linalg.vector_norm(out, dim=1)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, cols**0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("base", BASES)
def test_base_maps_send_zero_rows_and_columns_to_zero(base):
    x = gaussian((4, 5), 2)
    x[1] = 0
    x[:, 3] = 0
    out = rotated._BASE_MAPS[base](x, 5)
    assert torch.all(torch.isfinite(out))
    assert torch.all(out[1] == 0) and torch.all(out[:, 3] == 0)
    assert torch.equal(rotated._BASE_MAPS[base](torch.zeros(3, 2), 5), torch.zeros(3, 2))


@pytest.mark.parametrize("base", BASES)
def test_base_maps_map_each_matrix_of_a_batch_on_its_own(base):
    """ARO batches the matrices of one shape: a batch must be the stack of single maps (scales,
    rounding floors and zero rows per matrix, not per batch)."""
    small = torch.zeros(5, 3, dtype=torch.float64)
    small[:, 0] = torch.tensor([0.5, 5e-15, 0.3, 0.2, 0.1])  # row 1 just above its own floor
    batch = torch.stack([small, torch.full((5, 3), 0.9, dtype=torch.float64), gaussian((5, 3), 1)])
    batch[2, 2] = 0  # a zero row in one matrix only
    single = torch.stack([rotated._BASE_MAPS[base](matrix, 5) for matrix in batch])
    torch.testing.assert_close(rotated._BASE_MAPS[base](batch, 5), single, rtol=1e-12, atol=0)
    # a floor over the whole batch (set by the 0.9 matrix's rows) would have zeroed row 1
    assert torch.all(single[0, 1, 0] != 0) and torch.all(single[2, 2] == 0)


SHAPES_TO_BATCH = [(6, 4), (6, 4), (6, 4), (4, 6), (4, 6), (8, 3), (2, 3, 2), (6,)]


@pytest.mark.parametrize("rotate", ["smaller", "rows"])
def test_aro_steps_each_matrix_of_a_batch_as_alone(rotate):
    """One optimizer over matrices of shared shapes (stepped as batches) against one optimizer
    per parameter: the same parameters and states after 4 steps."""
    together = parameters(SHAPES_TO_BATCH, 0)
    alone = parameters(SHAPES_TO_BATCH, 0)
    grads = gradients(together, 4, 7)
    run(ARO(together, lr=0.01, weight_decay=0.1, rotate=rotate), together, grads)
    optimizers = [ARO([param], lr=0.01, weight_decay=0.1, rotate=rotate) for param in alone]
    for step_grads in grads:
        for optimizer, param, grad in zip(optimizers, alone, step_grads):
            param.grad = grad
            optimizer.step()
    for first, second in zip(together, alone):
        torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-14)


def test_aro_batches_stay_under_the_element_cap(monkeypatch):
    """A cap of one 6 x 4 momentum per batch steps the three 6 x 4 matrices one by one, with
    the result of the uncapped batch."""
    shapes = [(6, 4)] * 3
    reference = parameters(shapes, 3)
    grads = gradients(reference, 3, 5)
    run(ARO(reference, lr=0.01), reference, grads)
    sizes = []
    step_batch = ARO._step_batch

    def spy(self, pairs, group):
        sizes.append(len(pairs))
        return step_batch(self, pairs, group)

    monkeypatch.setattr(rotated, "_ARO_BATCH_ELEMENTS", 24)
    monkeypatch.setattr(ARO, "_step_batch", spy)
    capped = parameters(shapes, 3)
    run(ARO(capped, lr=0.01), capped, grads)
    assert sizes == [1] * 9
    for first, second in zip(reference, capped):
        torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-14)


# --- RotatedAdam: Adam in a fixed orthonormal basis (DCT) -------------------------------------


def adam_in_basis_reference(w0, grads, forward, backward, *, lr, betas, eps, weight_decay):
    """AdamW on ``forward(G)``, its direction mapped back by ``backward`` (numpy float64)."""
    beta1, beta2 = betas
    w = w0.reshape(w0.shape[0], -1).numpy().copy()
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(matrices(grads), start=1):
        g_hat = forward(g)
        m = beta1 * m + (1 - beta1) * g_hat
        v = beta2 * v + (1 - beta2) * g_hat**2
        u = (m / (1 - beta1**t)) / (np.sqrt(v) / np.sqrt(1 - beta2**t) + eps)
        w = w * (1 - lr * weight_decay) - lr * backward(u)
    return torch.from_numpy(w).reshape(w0.shape)


ADAM_OPTIONS = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def dctn(x: np.ndarray) -> np.ndarray:
    return scipy.fft.dctn(x, norm="ortho")


def idctn(x: np.ndarray) -> np.ndarray:
    return scipy.fft.idctn(x, norm="ortho")


def identity(x: np.ndarray) -> np.ndarray:
    return x


def test_adam_in_identity_basis_reference_is_torch_adamw():
    """The reference helper itself: with Q = I it must be torch.optim.AdamW."""
    (w,) = parameters([(4, 5)], 11)
    w0 = w.detach().clone()
    grads = gradients([w], 4, 11)
    run(torch.optim.AdamW([w], **ADAM_OPTIONS), [w], grads)
    expected = adam_in_basis_reference(w0, grads, identity, identity, **ADAM_OPTIONS)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


@given(rows=st.integers(1, 8), cols=st.integers(1, 8), seed=SEEDS)
def test_dct_adam_matches_scipy_reference(rows, cols, seed):
    (w,) = parameters([(rows, cols)], seed)
    w0 = w.detach().clone()
    grads = gradients([w], 3, seed)
    opt = RotatedAdam([w], basis="dct", **ADAM_OPTIONS)
    run(opt, [w], grads)
    expected = adam_in_basis_reference(w0, grads, dctn, idctn, **ADAM_OPTIONS)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-10)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("shape", [(3, 2, 2), (2, 300), (257, 3)])
def test_dct_adam_is_adamw_on_rotated_coordinates(shape):
    """Adam with fixed DCT bases = torch.optim.AdamW on the coordinates D_m W D_n^T."""
    (w,) = parameters([shape], 5)
    matrix_shape = (shape[0], -1)
    rotated_w = torch.nn.Parameter(torch.from_numpy(dctn(w.detach().reshape(matrix_shape).numpy())))
    grads = gradients([w], 3, 5)
    rotated_grads = [[torch.from_numpy(dctn(g.reshape(matrix_shape).numpy()))] for (g,) in grads]
    run(RotatedAdam([w], basis="dct", **ADAM_OPTIONS), [w], grads)
    run(torch.optim.AdamW([rotated_w], **ADAM_OPTIONS), [rotated_w], rotated_grads)
    expected = torch.from_numpy(idctn(rotated_w.detach().numpy())).reshape(shape)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-10)


# --- RotatedAdam: SOAP eigenbases -------------------------------------------------------------


def soap_reference(w0, grads, *, lr, betas, eps, weight_decay, shampoo_beta, update_gap, max_dim):
    """SOAP (optimizers spec section 3.2) in numpy, AdamW-form update and decay before it."""
    beta1, beta2 = betas
    w = w0.reshape(w0.shape[0], -1).numpy().copy()
    rows, cols = w.shape
    grams = [np.zeros((s, s)) if s <= max_dim else None for s in (rows, cols)]
    bases = [np.eye(rows), np.eye(cols)]  # identity stands for "not rotated"
    m, v = np.zeros_like(w), np.zeros_like(w)
    for k, g in enumerate(matrices(grads)):
        if k > 0:
            g_hat = bases[0].T @ g @ bases[1]
            m = beta1 * m + (1 - beta1) * g_hat
            v = beta2 * v + (1 - beta2) * g_hat**2
            u = (m / (1 - beta1**k)) / (np.sqrt(v) / np.sqrt(1 - beta2**k) + eps)
            w = w * (1 - lr * weight_decay) - lr * bases[0] @ u @ bases[1].T
        for side, outer in enumerate((g @ g.T, g.T @ g)):
            if grams[side] is not None:
                grams[side] = shampoo_beta * grams[side] + (1 - shampoo_beta) * outer
        if k == 0:
            for side, gram in enumerate(grams):
                if gram is not None:
                    bases[side] = np.linalg.eigh(gram)[1][:, ::-1]
        elif k % update_gap == 0:
            m_original = bases[0] @ m @ bases[1].T
            for side, gram in enumerate(grams):
                if gram is None:
                    continue
                estimates = np.diag(bases[side].T @ gram @ bases[side])
                order = np.argsort(-estimates, kind="stable")
                v = np.take(v, order, axis=side)
                bases[side] = positive_qr(gram @ bases[side][:, order])
            m = bases[0].T @ m_original @ bases[1]
    return torch.from_numpy(w).reshape(w0.shape)


@st.composite
def near_square(draw):
    # |m - n| <= 1: the first Gram of the longer side has a null space of dimension <= 1, so its
    # eigenbasis is unique up to signs (which SOAP's update does not see) in any LAPACK.
    rows = draw(st.integers(1, 6))
    return rows, max(1, rows + draw(st.integers(-1, 1)))


@given(
    shape=near_square(),
    seed=SEEDS,
    update_gap=st.integers(1, 3),
    shampoo_beta=st.sampled_from([None, 0.5, 0.9]),
)
def test_eigen_adam_matches_soap_reference(shape, seed, update_gap, shampoo_beta):
    options = dict(ADAM_OPTIONS, update_gap=update_gap, shampoo_beta=shampoo_beta, max_dim=10000)
    (w,) = parameters([shape], seed)
    w0 = w.detach().clone()
    grads = gradients([w], 7, seed)
    opt = RotatedAdam([w], basis="eigen", **options)
    run(opt, [w], grads)
    if shampoo_beta is None:
        options["shampoo_beta"] = ADAM_OPTIONS["betas"][1]
    expected = soap_reference(w0, grads, **options)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-8)
    for side in ("left", "right"):
        basis = opt.state[w][f"basis_{side}"]
        eye = torch.eye(basis.shape[0], dtype=basis.dtype)
        torch.testing.assert_close(basis.T @ basis, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (3, 2, 2)])
def test_eigen_adam_skips_sides_above_max_dim(shape):
    options = dict(ADAM_OPTIONS, update_gap=2, shampoo_beta=0.9, max_dim=5)
    (w,) = parameters([shape], 9)
    w0 = w.detach().clone()
    grads = gradients([w], 6, 9)
    opt = RotatedAdam([w], basis="eigen", **options)
    run(opt, [w], grads)
    expected = soap_reference(w0, grads, **options)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-8)
    rows, cols = w.reshape(shape[0], -1).shape
    assert ("basis_left" in opt.state[w]) == (rows <= 5)
    assert ("basis_right" in opt.state[w]) == (cols <= 5)


def test_eigen_adam_without_rotated_sides_is_adamw_after_the_first_step():
    """max_dim below both sides: Q = I, so after SOAP's accumulate-only step it is AdamW."""
    (w,) = parameters([(4, 3)], 2)
    reference = torch.nn.Parameter(w.detach().clone())
    grads = gradients([w], 5, 2)
    run(RotatedAdam([w], basis="eigen", max_dim=2, **ADAM_OPTIONS), [w], grads)
    run(torch.optim.AdamW([reference], **ADAM_OPTIONS), [reference], grads[1:])
    torch.testing.assert_close(w.detach(), reference.detach(), rtol=0, atol=1e-12)


def test_eigen_adam_diagonal_gradients_are_adamw_after_the_first_step():
    """Diagonal Grams have signed-permutation eigenbases, in which Adam is AdamW."""
    w = torch.nn.Parameter(gaussian((3, 3), 6))
    reference = torch.nn.Parameter(w.detach().clone())
    grads = [[torch.diag(gaussian((3,), 50 + k))] for k in range(6)]
    run(RotatedAdam([w], basis="eigen", update_gap=2, **ADAM_OPTIONS), [w], grads)
    run(torch.optim.AdamW([reference], **ADAM_OPTIONS), [reference], grads[1:])
    # Rounding in the bases leaves ~1e-17 off-diagonal rotated gradients, which Adam's eps=1e-8
    # turns into ~1e-11 steps; a wrong basis or permutation would be off by ~lr.
    torch.testing.assert_close(w.detach(), reference.detach(), rtol=0, atol=1e-9)


def test_eigen_adam_first_step_only_accumulates():
    weight, bias = parameters([(4, 3), (4,)], 8)
    before = weight.detach().clone(), bias.detach().clone()
    opt = RotatedAdam([weight, bias], basis="eigen", lr=0.1)
    run(opt, [weight, bias], gradients([weight, bias], 1, 8))
    assert torch.equal(weight.detach(), before[0])
    assert not torch.equal(bias.detach(), before[1])  # 1-D params step from the first call
    assert int(opt.state[weight]["step"]) == 1 and torch.all(opt.state[weight]["exp_avg"] == 0)
    for side in ("left", "right"):
        basis, gram = opt.state[weight][f"basis_{side}"], opt.state[weight][f"gram_{side}"]
        spectrum = basis.T @ gram @ basis  # an eigenbasis, eigenvalues in descending order
        torch.testing.assert_close(spectrum, torch.diag(spectrum.diagonal()), rtol=0, atol=1e-12)
        assert torch.all(spectrum.diagonal().diff() <= 1e-12)
    run(opt, [weight, bias], gradients([weight, bias], 1, 9))
    assert not torch.equal(weight.detach(), before[0])


# --- both optimizers: edge values of options ---------------------------------------------------
# (the optimizer contract runs one error input per option, the checkpoints, dtypes, AdamW
# fallback and training of every configuration: tests/contracts/optimizers.py)

BAD_OPTIONS = [
    (ARO, {"momentum": -0.5}),
    (ARO, {"betas": (1.0, 0.9)}),
    (ARO, {"betas": (0.9,)}),
    (RotatedAdam, {"betas": (0.9, -0.1)}),
    (RotatedAdam, {"weight_decay": float("nan")}),
]


@pytest.mark.parametrize("cls, options", BAD_OPTIONS)
def test_bad_options_raise_value_error(cls, options):
    (name,) = options
    with pytest.raises(ValueError, match=name):
        cls(parameters([(3, 2)], 0), **options)
    opt = cls(parameters([(3, 2)], 0))
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": parameters([(2, 2)], 1), **options})
    assert len(opt.param_groups) == 1


# --- issue 12: ARO's rotated side, SOAP's defaults ---------------------------------------------


@pytest.mark.parametrize("shape", [(48, 16), (96, 32), (200, 40)])
@pytest.mark.parametrize("seed", range(3))
def test_aro_rows_on_a_tall_weight_steps_inside_the_momentums_column_space(shape, seed):
    """Regression: R^T M has rank <= n, and the QR of the first step's cross matrix left its
    rows past the n-th at about 1e-4 of the largest (float32), which Sinkhorn normalised to full
    rows: 24-46% of the update's norm lay in directions no gradient has. They are zeroed by the
    rank bound (the official code's Sinkhorn keeps them: 82% at 384 x 128)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.nn.Parameter(torch.zeros(shape))
    optimizer = ARO([w], lr=1.0, adjust_lr="none", rotate="rows")
    low_rank = torch.randn(rows, 8, generator=generator) @ torch.randn(8, cols, generator=generator)
    for _ in range(3):
        w.grad = low_rank + 0.5 * torch.randn(shape, generator=generator)
        before = w.detach().clone()
        optimizer.step()
        update = (before - w.detach()).double()
        # the matrix the step is on: with Nesterov momentum (the default) mu M + (1 - mu) G
        stepped = optimizer.state[w]["momentum"].double().lerp(w.grad.double(), 0.05)
        column_space, _ = torch.linalg.qr(stepped)
        outside = update - column_space @ (column_space.T @ update)
        assert outside.norm() < 1e-2 * update.norm()


def test_aro_rotates_the_smaller_side_by_default():
    """Behaviour change (issue 12, measured): a tall weight's rotation is min(m, n) x min(m, n)
    again; "rows" (the paper's) gives the m x m one."""
    (w,) = parameters([(7, 3)], 0)
    w.grad = gaussian((7, 3), 1)
    default, rows = ARO([w]), ARO([w], rotate="rows")
    default.step()
    rows.step()
    assert default.state[w]["rotation"].shape == (3, 3)
    assert rows.state[w]["rotation"].shape == (7, 7)


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"basis": "eigen"}, (3e-3, (0.95, 0.95), 0.95)),
        ({"basis": "dct"}, (1e-3, (0.9, 0.999), 0.999)),
        ({"basis": "eigen", "lr": 1e-2}, (1e-2, (0.95, 0.95), 0.95)),
        ({"basis": "eigen", "betas": (0.9, 0.99)}, (3e-3, (0.9, 0.99), 0.99)),
    ],
)
def test_rotated_adam_resolves_lr_and_betas_from_the_basis(given, expected):
    """SOAP's defaults for "eigen" (lr 3e-3, betas (0.95, 0.95), shampoo beta = beta2); a value
    given wins; the group holds numbers (as LR schedulers expect)."""
    (w,) = parameters([(4, 3)], 0)
    group = RotatedAdam([w], **given).param_groups[0]
    assert (group["lr"], group["betas"], rotated._shampoo_beta(group)) == expected


def test_rotated_adam_resolves_each_group_from_its_own_basis():
    """A group's basis picks its defaults, whatever the constructor's basis; a load keeps them."""
    first, second = parameters([(4, 3), (4, 3)], 0)
    optimizer = RotatedAdam([{"params": [first]}, {"params": [second], "basis": "eigen"}])
    optimizer.add_param_group({"params": parameters([(3, 3)], 1), "basis": "eigen", "lr": 5e-4})
    lrs = [(group["basis"], group["lr"], group["betas"]) for group in optimizer.param_groups]
    assert lrs == [
        ("dct", 1e-3, (0.9, 0.999)),
        ("eigen", 3e-3, (0.95, 0.95)),
        ("eigen", 5e-4, (0.95, 0.95)),
    ]
    optimizer.load_state_dict(optimizer.state_dict())
    assert [(g["basis"], g["lr"], g["betas"]) for g in optimizer.param_groups] == lrs
    with pytest.raises(ValueError, match="basis must be one of"):
        RotatedAdam([first], basis="svd")
