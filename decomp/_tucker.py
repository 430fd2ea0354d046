"""Tucker and partial Tucker decompositions by truncated HOSVD or HOOI.

A Tucker decomposition writes a tensor as a small core multiplied along some of its modes by
matrices with orthonormal columns,

.. math::

    T \\approx G \\times_{m_1} U_1 \\times_{m_2} U_2 \\cdots, \\qquad U_i^\\top U_i = I_{r_i},

where :math:`\\times_m` is the mode-:math:`m` product. Decomposing only some modes (e.g. the two
channel modes of a conv kernel, "Tucker-2") leaves the others uncompressed.
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Sequence, Union

import torch

from ._checks import (
    as_sequence,
    check_choice,
    check_fraction,
    check_generator,
    check_int,
    check_rank,
    check_real,
    check_result_finite,
    check_tensor,
    to_compute,
    unit_scaled,
)
from ._rsvd import rsvd

SubspaceSolver = Callable[[torch.Tensor, int], torch.Tensor]
Ranks = Union[int, float, Sequence[Union[int, float]]]

_METHODS = ("hooi", "hosvd")
_SVD_METHODS = ("auto", "full", "gram", "randomized")
# largest share of the left-out energy that a float32 eigh of a Gram matrix may lose
_FLOAT32_EIGH_LOSS_SHARE = 1e-4


class Tucker(NamedTuple):
    """Result of :func:`tucker`: ``core`` and one orthonormal factor per decomposed mode.

    ``factors[i]`` has shape ``(T.shape[modes[i]], r_i)``; ``core`` has ``T``'s shape with each
    decomposed mode ``modes[i]`` replaced by ``r_i``. ``modes`` are non-negative, in the order
    the caller gave them.
    """

    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    modes: tuple[int, ...]

    def to_tensor(self) -> torch.Tensor:
        """The reconstruction :math:`G \\times_{m_1} U_1 \\times_{m_2} U_2 \\cdots`.

        Half-precision parts are multiplied in fp32 and the result returned in ``core``'s dtype.
        Cost: :math:`O(\\sum_i d_i r_i \\prod_{j \\ne i} s_j)` with :math:`s` the shape at that
        step; the products run in increasing order of :math:`d_i / r_i`, so the intermediates grow
        as late as possible.

        >>> g = torch.Generator().manual_seed(0)
        >>> T = torch.randn(4, 5, 6, generator=g)
        >>> tucker(T, (4, 5, 6)).to_tensor().shape
        torch.Size([4, 5, 6])
        """
        result = to_compute(self.core)
        # The least-expanding products first keep the intermediate tensors small.
        pairs = sorted(zip(self.factors, self.modes), key=lambda pair: pair[0].shape[0] / pair[0].shape[1])
        for factor, mode in pairs:
            result = _mode_product(result, to_compute(factor), mode)
        return result.to(self.core.dtype)


def tucker(
    T: torch.Tensor,
    ranks: Ranks,
    *,
    modes: Sequence[int] | None = None,
    method: str = "hooi",
    n_iter: int = 100,
    tol: float = 1e-4,
    svd: str | SubspaceSolver = "auto",
    generator: torch.Generator | None = None,
    check_finite: bool = True,
) -> Tucker:
    r"""Tucker decomposition of ``T`` over ``modes`` by truncated HOSVD or HOOI.

    Finds a core :math:`G` and factors :math:`U_i \in \mathbb{R}^{d_i \times r_i}` with
    orthonormal columns minimising :math:`\|T - G \times_{m_1} U_1 \cdots\|_F`; for fixed
    factors the optimal core is :math:`G = T \times_{m_1} U_1^\top \times_{m_2} U_2^\top \cdots`,
    so :math:`\|T - \hat T\|_F^2 = \|T\|_F^2 - \|G\|_F^2`.

    * ``method="hosvd"`` (truncated HOSVD): :math:`U_i` = the top :math:`r_i` left singular
      vectors of the mode-:math:`m_i` unfolding :math:`T_{(m_i)}`. Quasi-optimal: its error is
      at most :math:`\sqrt{N}` times the best, for :math:`N` decomposed modes.
    * ``method="hooi"`` (higher-order orthogonal iteration, the default): HOSVD start, then
      sweeps :math:`U_i \leftarrow U_{r_i}\big((T \times_{j \ne i} U_j^\top)_{(m_i)}\big)` over
      the decomposed modes. Each update maximises :math:`\|G\|_F` given the other factors, so
      the error never increases (up to rounding); HOOI is a local method, not a global optimum.
      It stops after ``n_iter`` sweeps or once the relative error
      :math:`e_k = \sqrt{\|T\|^2 - \|G_k\|^2} / \|T\|` changes by at most ``tol`` between sweeps
      (at least two sweeps run). That test reads one scalar back from the device per sweep.

    A mode with :math:`r_i = d_i` is not compressed: its factor is the identity and its mode
    products are skipped (exact and much cheaper; e.g. the spatial modes of a conv kernel).

    **Scale.** ``T`` is first divided by a power of two that brings its largest magnitude into
    :math:`[1/2, 1)`, and the core multiplied back. Both steps are exact, so on ordinary input
    nothing changes (the kernels are scale-equivariant up to rounding: a float32 ``eigh`` of a
    Gram far from unit scale can differ in the last bit), and no Gram matrix, squared norm or
    energy can overflow or underflow at any scale: energy ranks, the HOOI stopping test and the
    Gram precision test are the same for ``T * 1e19`` or ``T * 1e-30`` as for ``T``. Only a core
    beyond the largest number of ``T``'s dtype cannot be returned; then ``ValueError`` is raised
    (with ``check_finite``).

    Args:
        T: real floating tensor, ``ndim >= 2``, shape :math:`(d_0, \dots, d_{N-1})`.
        ranks: an ``int`` used for every decomposed mode (each must be :math:`\le d_{m_i}`);
            a sequence with one entry per decomposed mode, each an ``int`` in
            :math:`[1, d_{m_i}]` or a ``float`` fraction; or a ``float`` fraction in
            :math:`(0, 1]` for every mode. A fraction :math:`f` picks the smallest :math:`r`
            with :math:`\sum_{j<r} s_j^2 \ge f \sum_j s_j^2` for the singular values
            :math:`s` of the mode's unfolding :math:`T_{(m_i)}`: a per-mode HOSVD energy, **not**
            a bound on the total error (which sums the per-mode losses, up to
            :math:`N (1 - f)\|T\|^2`). Each fraction costs one extra singular-value
            computation and a host sync to fix the shape.
        modes: distinct mode indices to decompose (negative allowed), in the order ``factors``
            follows; ``None`` decomposes all modes.
        method: ``"hooi"`` or ``"hosvd"``.
        n_iter: maximum number of HOOI sweeps, ``>= 1`` (ignored by ``"hosvd"``).
        tol: stop HOOI when the relative error changes by at most this, ``>= 0``. The defaults
            ``n_iter=100, tol=1e-4`` are tensorly's (``n_iter_max=100, tol=10e-5``): same HOSVD
            start, same stopping rule (tensorly runs at least three sweeps, we at least two),
            so the same error; the speed comes from cheaper sweeps. HOOI never does worse with
            more sweeps, so a smaller ``tol`` can only lower the error: on a Gaussian
            (256, 256, 3, 3) at ranks (64, 64, 3, 3), ``1e-5`` lowers it by 0.05% for 3x the
            sweeps; conv-like tensors with decaying spectra converge in 2--3 sweeps either way.
        svd: how to get the top-:math:`r` left singular vectors of an unfolding
            :math:`X \in \mathbb{R}^{m \times n}`:

            * ``"full"``: ``torch.linalg.svd``, :math:`O(m n \min(m, n))`.
            * ``"gram"``: eigenvectors of :math:`X X^\top`, :math:`O(m^2 n + m^3)`, fast when
              :math:`X` is wide. The Gram matrix is accumulated in float64: squaring the
              singular values in float32 would lose every direction with
              :math:`s_i / s_1 < \sqrt{\epsilon_{32}} \approx 3 \cdot 10^{-4}`, which a full
              SVD keeps. Its eigendecomposition runs in float32 (2x faster) only when that
              provably loses at most :math:`10^{-4}` of the energy left out (at most 0.005%
              more error: :math:`4 r \epsilon_{32} \lambda_1 \le 10^{-4}`
              :math:`(\operatorname{tr} X X^\top - \sum_{i \le r} \lambda_i)`), else in
              float64, where the loss sits below fp32 resolution: fp32 results match a full
              SVD's. That check reads one scalar back per eigendecomposition. For fp64 input
              everything is float64, and directions below :math:`\sqrt{\epsilon_{64}} s_1`
              are still lost.
            * ``"randomized"``: :func:`decomp.rsvd` with ``generator``; only worth it for large
              unfoldings with decaying spectra.
            * ``"auto"`` (default): ``"gram"`` when :math:`n \ge m` and the compute dtype is
              float32 (fp32, fp16, bf16 input), else ``"full"``; fp64 input gets the full
              SVD so that it keeps all its digits.
            * a callable ``(matrix, k) -> U`` returning :math:`m \times k` orthonormal columns,
              with :math:`k \le \min(m, n)`.

            When :math:`r > n` (an unfolding with fewer columns than the rank) the basis is
            completed with orthonormal columns from a QR. That happens in HOOI sweeps when a
            rank exceeds the product of the other modes' ranks (a non-admissible multilinear
            rank): the completed directions are arbitrary (tensorly draws them at random), so
            such ranks can steer HOOI to a different local optimum than tensorly's. Unlike
            tensorly, whose HOOI sweeps ignore its ``svd`` argument, ours is used at the start
            and in every sweep.
        generator: random source for ``svd="randomized"``; unused otherwise.
        check_finite: check ``T`` for NaN/Inf and the core for overflow of ``T``'s dtype (one
            device sync each); ``False`` skips both.

    Returns:
        :class:`Tucker` ``(core, factors, modes)`` in ``T``'s dtype and device; fp16/bf16 input
        is computed in fp32.

    Raises:
        TypeError: ``T`` is not a real floating tensor; ``ranks``, ``modes``, ``n_iter`` or
            ``tol`` has the wrong type; a ``svd`` callable returns a non-tensor.
        ValueError: ``T`` has ``ndim < 2``, no elements or NaN/Inf; a rank is outside
            :math:`[1, d_{m_i}]` (the message names the mode) or a fraction outside
            :math:`(0, 1]`; ``ranks`` has the wrong length; ``modes`` is empty, repeats a mode
            or is out of range; unknown ``method`` or ``svd``; ``n_iter < 1``; ``tol < 0``;
            a ``svd`` callable returns the wrong shape; the core overflows ``T``'s dtype.

    Complexity per HOOI sweep, with :math:`N` decomposed modes: :math:`N` projections
    :math:`O(N \cdot \mathrm{numel}(T) \cdot \max_i r_i)` plus one Gram (or SVD) per mode on an
    unfolding of :math:`d_i \times \prod_{j \ne i} r_j` columns (uncompressed modes keep their
    full size).

    Differences from tensorly's ``tucker``/``partial_tucker``: one function for both; ``modes``
    in any order (tensorly's ``partial_tucker`` needs them sorted: its ``multi_mode_dot`` applies
    ``skip`` after sorting); ``ranks`` per mode, a float being an energy fraction rather than
    tensorly's fraction of parameters; identity factors for uncompressed modes; no HOSVD factor
    for the first HOOI mode, which the first sweep would discard (same result, one SVD fewer).

    >>> g = torch.Generator().manual_seed(0)
    >>> W = torch.randn(16, 8, 3, 3, generator=g)        # a conv kernel
    >>> t = tucker(W, (4, 2), modes=(0, 1))              # Tucker-2 over the channels
    >>> t.core.shape, [f.shape for f in t.factors], t.modes
    (torch.Size([4, 2, 3, 3]), [torch.Size([16, 4]), torch.Size([8, 2])], (0, 1))
    >>> t.to_tensor().shape
    torch.Size([16, 8, 3, 3])
    >>> torch.allclose(tucker(W, 1.0).to_tensor(), W, atol=1e-5)   # all energy kept: exact
    True
    """
    check_tensor(T, "T", min_ndim=2, check_finite=check_finite)
    modes = _check_modes(modes, T.ndim)
    check_choice(method, "method", _METHODS)
    if not callable(svd):
        check_choice(svd, "svd", _SVD_METHODS)
    n_iter = check_int(n_iter, "n_iter", low=1)
    tol = check_real(tol, "tol", low=0.0, low_inclusive=True)
    generator = check_generator(generator)
    requested = _check_ranks(ranks, modes, T.shape)

    X, scale = unit_scaled(T, range(T.ndim))
    ranks_by_mode = {
        mode: _energy_rank(_unfold(X, mode), rank) if isinstance(rank, float) else rank
        for mode, rank in zip(modes, requested)
    }
    # HOOI sweeps in increasing mode order whatever order `modes` lists them in (as tensorly's
    # partial_tucker does for sorted modes), so the result does not depend on how modes are listed.
    compressed = sorted(mode for mode in modes if ranks_by_mode[mode] < T.shape[mode])

    def leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
        return _leading_left_vectors(matrix, rank, svd, generator)

    # With one compressed mode the HOSVD factor is already optimal, so HOOI has nothing to do.
    # Otherwise HOOI's first update of the first compressed mode ignores that mode's own start
    # factor, so it is not computed.
    alternate = method == "hooi" and len(compressed) > 1
    factors = {
        mode: leading(_unfold(X, mode), ranks_by_mode[mode])
        for mode in (compressed[1:] if alternate else compressed)
    }
    if alternate:
        core = _hooi(X, factors, compressed, ranks_by_mode, leading, n_iter, tol)
    else:
        core = _project(X, factors, compressed)
    core = (core * scale).to(T.dtype)
    if check_finite:
        check_result_finite(core, "the core entries of T's Tucker decomposition", "T")

    return Tucker(
        core=core,
        factors=tuple(
            factors[mode].to(T.dtype) if mode in factors
            else torch.eye(T.shape[mode], dtype=T.dtype, device=T.device)
            for mode in modes
        ),
        modes=modes,
    )


def _hooi(
    X: torch.Tensor,
    factors: dict[int, torch.Tensor],
    compressed: list[int],
    ranks_by_mode: dict[int, int],
    leading: Callable[[torch.Tensor, int], torch.Tensor],
    n_iter: int,
    tol: float,
) -> torch.Tensor:
    """HOOI sweeps over ``compressed`` modes, updating ``factors`` in place; returns the core."""
    # Squared norms in float64: the error is a difference of two nearly equal squared norms.
    norm_squared = _squared_norm(X)
    tolerance = tol * norm_squared.sqrt()
    previous_residual = None
    for _ in range(n_iter):
        for mode in compressed:
            others = [other for other in compressed if other != mode]
            partial = _project(X, factors, others)
            factors[mode] = leading(_unfold(partial, mode), ranks_by_mode[mode])
        core = _project(partial, factors, [compressed[-1]])
        residual = (norm_squared - _squared_norm(core)).clamp_min(0).sqrt()
        if previous_residual is not None and bool((previous_residual - residual).abs() <= tolerance):
            break
        previous_residual = residual
    return core


def _leading_left_vectors(
    matrix: torch.Tensor, rank: int, svd: str | SubspaceSolver, generator: torch.Generator | None
) -> torch.Tensor:
    """``rank`` orthonormal columns spanning the top left singular subspace of ``matrix``."""
    rows, cols = matrix.shape
    if svd == "auto":
        svd = "gram" if cols >= rows and matrix.dtype == torch.float32 else "full"
    if svd == "gram":
        wide = matrix.to(torch.float64)
        # all `rows` eigenvectors exist, so rank > cols needs no completion
        vectors = _top_eigenvectors(wide @ wide.T, rank, try_float32=matrix.dtype == torch.float32)
        return vectors.to(matrix.dtype)
    attainable = min(rank, cols)
    if svd == "full":
        basis = torch.linalg.svd(matrix, full_matrices=False).U[:, :attainable]
    elif svd == "randomized":
        basis = rsvd(matrix, attainable, generator=generator, check_finite=False).U
    else:
        basis = svd(matrix, attainable)
        if not isinstance(basis, torch.Tensor):
            raise TypeError(f"svd callable must return a torch.Tensor, got {type(basis).__name__}")
        if tuple(basis.shape) != (rows, attainable):
            raise ValueError(
                f"svd callable must return shape (rows, k) = {(rows, attainable)}, "
                f"got {tuple(basis.shape)}"
            )
    return _complete_orthonormal(basis.to(matrix.dtype), rank)


def _top_eigenvectors(gram: torch.Tensor, rank: int, *, try_float32: bool) -> torch.Tensor:
    """The ``rank`` leading eigenvectors (descending) of the PSD float64 matrix ``gram``.

    With ``try_float32`` a float32 eigh (about 2x faster) is tried first and kept only when the
    energy it can lose is negligible. It solves ``gram + E`` with ``||E|| <= 2 eps32 lambda_1``
    (rounding to float32, plus eigh's backward error, ``eps ||G||`` in practice per the LAPACK
    Users' Guide, section 4.7). By Weyl's inequality its top-``rank`` subspace then captures at
    most ``4 rank eps32 lambda_1`` less energy than the exact one, and that must be at most 1e-4 of
    the energy left out, so the error grows by at most 0.005% relative. Near-exact
    decompositions fail the test and get the float64 eigh. The test reads one scalar back (eigh
    synchronizes a CUDA device anyway).
    """
    if try_float32:
        values, vectors = torch.linalg.eigh(gram.to(torch.float32))
        values = values.to(torch.float64)
        left_out = gram.diagonal().sum() - values[-rank:].sum()
        possible_loss = 4 * rank * torch.finfo(torch.float32).eps * values[-1]
        if bool(possible_loss <= _FLOAT32_EIGH_LOSS_SHARE * left_out):
            return vectors[:, -rank:].flip(-1)
    # eigh returns ascending eigenvalues
    return torch.linalg.eigh(gram).eigenvectors[:, -rank:].flip(-1)


def _complete_orthonormal(basis: torch.Tensor, columns: int) -> torch.Tensor:
    """Extend orthonormal ``basis`` (m x k) to ``columns`` orthonormal columns, deterministically.

    The new columns are those of the complete QR factor :math:`H_1 \\cdots H_k` of ``basis``,
    formed by applying its ``k`` Householder reflectors to the needed columns only: memory
    :math:`O(m \\cdot \\mathrm{columns})`, not the :math:`m \\times m` of a complete QR (40 GB for
    a mode of size 100000).
    """
    rows, have = basis.shape
    if have >= columns:
        return basis
    reflectors, scales = torch.geqrf(basis)
    padded = torch.cat([reflectors, reflectors.new_zeros(rows, columns - have)], dim=1)
    complement = torch.linalg.householder_product(padded, scales)[:, have:]
    return torch.cat([basis, complement], dim=1)


def _energy_rank(unfolding: torch.Tensor, fraction: float) -> int:
    """Smallest r with sum_{j<r} s_j^2 >= fraction * sum_j s_j^2 (reads r back to the host)."""
    energy = torch.linalg.svdvals(unfolding).to(torch.float64).square()
    cumulative = energy.cumsum(0)
    return int((cumulative < fraction * cumulative[-1]).sum()) + 1


def _unfold(X: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: rows indexed by that mode (column order as in tensorly)."""
    return X.movedim(mode, 0).reshape(X.shape[mode], -1)


def _mode_product(X: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``X x_mode matrix``: contracts ``X``'s ``mode`` with ``matrix``'s columns."""
    return torch.tensordot(X, matrix, dims=([mode], [1])).movedim(-1, mode)


def _project(X: torch.Tensor, factors: dict[int, torch.Tensor], modes: list[int]) -> torch.Tensor:
    """``X x_m U_m^T`` over ``modes``, most compressing first to shrink the tensor early."""
    order = sorted(modes, key=lambda mode: factors[mode].shape[1] / factors[mode].shape[0])
    for mode in order:
        X = torch.tensordot(X, factors[mode], dims=([mode], [0])).movedim(-1, mode)
    return X


def _squared_norm(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(X, dtype=torch.float64).square()


def _check_modes(modes: object, ndim: int) -> tuple[int, ...]:
    if modes is None:
        return tuple(range(ndim))
    sequence = as_sequence(modes, "modes")
    if sequence is None:
        raise TypeError(f"modes must be a sequence of ints or None, got {type(modes).__name__}")
    modes = sequence
    if len(modes) == 0:
        raise ValueError("modes must name at least one mode, got an empty sequence")
    normalized = tuple(
        check_int(mode, f"modes[{index}]", low=-ndim, high=ndim - 1) % ndim
        for index, mode in enumerate(modes)
    )
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"modes must be distinct, got {tuple(modes)} (ndim {ndim})")
    return normalized


def _check_ranks(ranks: object, modes: tuple[int, ...], shape: torch.Size) -> list[int | float]:
    """One int (validated against the mode size) or float fraction per decomposed mode."""
    sequence = as_sequence(ranks, "ranks")
    if sequence is None and not isinstance(ranks, numbers.Real):
        raise TypeError(
            f"ranks must be an int, a float or a sequence of them, got {type(ranks).__name__}"
        )
    if sequence is not None:
        ranks = sequence
        if len(ranks) != len(modes):
            raise ValueError(
                f"ranks must have one entry per decomposed mode ({len(modes)}, modes {modes}), "
                f"got {len(ranks)}"
            )
        entries = list(ranks)
    else:
        entries = [ranks] * len(modes)
    checked: list[int | float] = []
    for mode, rank in zip(modes, entries):
        name = f"ranks for mode {mode} (size {shape[mode]})"
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
            checked.append(check_rank(rank, name, shape[mode]))
        elif isinstance(rank, numbers.Real) and not isinstance(rank, bool):
            checked.append(check_fraction(rank, name))
        else:
            raise TypeError(f"{name} must be an int or a float fraction, got {type(rank).__name__}")
    return checked


