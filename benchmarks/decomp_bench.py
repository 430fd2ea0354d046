"""Decompositions against the libraries they replace: five cases, fp32 on CPU.

Each case times ours and its anchors as the median of ``--repeats`` calls after one untimed call
(whose result gives the error column), with the same thread count for every library. What each
case builds and why it is a fair comparison is on the page (``docs/benchmarks.md``).

Usage::

    python benchmarks/decomp_bench.py [--threads 2] [--repeats 9] [--only 'rsvd,dct'] [--quick]
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

if __package__ in (None, ""):
    # Run as a file (``make bench``): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import scipy.fft
import tensorly
import tensorly.decomposition
import torch
import torch_dct
from sklearn.utils.extmath import randomized_svd

import decomp
from benchmarks.harness import Area, Case, Comparison, Context, Part, Timing, main, timeit
from benchmarks.targets import target

SEED = 0
# One sketch size for our rsvd and the svd_lowrank it is held against.
OVERSAMPLE, POWER_ITERS = 10, 2
# kpsvd's anchor (a full SVD of a 4096x4096 matrix) takes seconds a call: time it fewer times.
SVD_REPEATS = 3


@dataclass(frozen=True)
class Sizes:
    rsvd_n: int
    rsvd_rank: int
    tucker_shape: tuple[int, ...]
    tucker_ranks: tuple[int, ...]
    dct_n: int
    kron_block: tuple[int, int]
    kron_rank: int
    ldu_n: int


FULL = Sizes(2048, 32, (256, 256, 3, 3), (64, 64, 3, 3), 4096, (64, 64), 8, 2048)
QUICK = Sizes(256, 8, (32, 32, 3, 3), (8, 8, 3, 3), 256, (16, 16), 4, 256)
Result = TypeVar("Result")


def sizes(context: Context) -> Sizes:
    return QUICK if context.quick else FULL


def svd_repeats(context: Context) -> int:
    return min(context.repeats, SVD_REPEATS)


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||reference - approximation||_F / ||reference||_F``, computed in fp64."""
    reference = reference.double()
    return float(torch.linalg.norm(reference - approximation.double()) / torch.linalg.norm(reference))


def max_abs_difference(reference: torch.Tensor, value: torch.Tensor | np.ndarray) -> float:
    """Largest entrywise deviation of ``value`` (a tensor or a numpy result) from ``reference``."""
    return float((torch.as_tensor(value).double() - reference.double()).abs().max())


def measure(fn: Callable[[], Result], repeats: int) -> tuple[Result, Timing]:
    """One untimed call (the warm-up, whose result the error column uses), then ``repeats`` timed."""
    result = fn()
    return result, timeit(fn, repeats=repeats, warmup=0)


def versus(
    name: str, ours: tuple[Timing, float], anchor_name: str, anchor: tuple[Timing, float], target_key: str | None = None,
) -> Comparison:
    """A row from ``(timing, error)`` of each side; its target from :mod:`benchmarks.targets` (none: information)."""
    bound = None if target_key is None else target(target_key)
    return Comparison(name, ours[0], anchor_name, anchor[0], bound, ours[1], anchor[1])


def defaults(function: Callable[..., object], *names: str) -> str:
    """``name=default`` of ``function``'s keyword defaults, read from its signature so notes stay true."""
    parameters = inspect.signature(function).parameters
    return ", ".join(f"{name}={parameters[name].default!r}" for name in names)


def orthonormal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q


def polynomial_spectrum(n: int) -> torch.Tensor:
    return 1.0 / torch.arange(1, n + 1, dtype=torch.float64)


# --------------------------------------------------------------------------- 1. rsvd


def bench_rsvd(context: Context) -> Part:
    n, rank = sizes(context).rsvd_n, sizes(context).rsvd_rank
    generator = torch.Generator().manual_seed(SEED)
    spectrum = polynomial_spectrum(n)
    matrix = ((orthonormal(n, generator) * spectrum) @ orthonormal(n, generator).T).float()
    matrix_numpy = matrix.numpy()
    optimal_error = float(spectrum[rank:].norm() / spectrum.norm())
    name = f"rsvd rank {rank}, {n}x{n}"

    def low_rank(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        return (u[:, :rank] * s[:rank]) @ vh[:rank]

    sketch_generator = torch.Generator().manual_seed(SEED)
    ours, ours_time = measure(
        lambda: decomp.rsvd(
            matrix, rank, oversample=OVERSAMPLE, power_iters=POWER_ITERS, generator=sketch_generator
        ),
        context.repeats,
    )
    ours_error = relative_error(matrix, ours.to_matrix())

    # svd_lowrank samples from the global generator (it takes none), so seed that instead.
    torch.manual_seed(SEED)
    same_sketch, same_sketch_time = measure(
        lambda: torch.svd_lowrank(matrix, q=rank + OVERSAMPLE, niter=POWER_ITERS), context.repeats
    )
    u, s, v = same_sketch
    same_sketch_error = relative_error(matrix, low_rank(u, s, v.mT))

    torch.manual_seed(SEED)
    default_call, default_call_time = measure(lambda: torch.svd_lowrank(matrix, q=rank), context.repeats)
    u, s, v = default_call
    default_call_error = relative_error(matrix, low_rank(u, s, v.mT))

    sklearn_result, sklearn_time = measure(
        lambda: randomized_svd(matrix_numpy, rank, random_state=SEED), context.repeats
    )
    sklearn_error = relative_error(matrix, low_rank(*(torch.from_numpy(part) for part in sklearn_result)))

    ours = (ours_time, ours_error)
    comparisons = [
        versus(name, ours, f"torch.svd_lowrank(q=k+{OVERSAMPLE}, niter={POWER_ITERS})",
               (same_sketch_time, same_sketch_error), "decomp: rsvd vs svd_lowrank"),
        versus(name, ours, "torch.svd_lowrank(q=k)", (default_call_time, default_call_error)),
        versus(name, ours, "sklearn randomized_svd defaults", (sklearn_time, sklearn_error)),
    ]  # fmt: skip
    facts = [
        f"rsvd: optimal (Eckart-Young) rank-{rank} error {optimal_error:.3e}; scikit-learn defaults "
        f"{defaults(randomized_svd, 'n_oversamples', 'n_iter', 'power_iteration_normalizer')}.",
    ]
    return Part(comparisons, facts=facts)


# --------------------------------------------------------------------------- 2. tucker


def bench_tucker(context: Context) -> Part:
    shape, ranks = sizes(context).tucker_shape, sizes(context).tucker_ranks
    generator = torch.Generator().manual_seed(SEED)
    # A conv-weight-like tensor: Gaussian, then each channel mode shaped to a 1/i spectrum.
    gaussian = torch.randn(*shape, generator=generator, dtype=torch.float64)
    out_mixing, in_mixing = (
        (orthonormal(size, generator) * polynomial_spectrum(size)) @ orthonormal(size, generator).T
        for size in shape[:2]
    )
    # Two mode products one at a time: a single three-operand einsum may build an I^4 intermediate.
    tensor = torch.einsum("bj,aj...->ab...", in_mixing, torch.einsum("ai,i...->a...", out_mixing, gaussian))
    tensor = tensor.float()
    name = f"tucker ranks {ranks}, {shape}"

    ours, ours_time = measure(lambda: decomp.tucker(tensor, ranks), context.repeats)
    ours_error = relative_error(tensor, ours.to_tensor())

    with tensorly.backend_context("pytorch"):
        anchor, anchor_time = measure(
            lambda: tensorly.decomposition.tucker(tensor, rank=list(ranks)), context.repeats
        )
        anchor_error = relative_error(tensor, tensorly.tucker_to_tensor(anchor))

    anchor_name = "tensorly tucker (pytorch backend)"
    ours, anchor = (ours_time, ours_error), (anchor_time, anchor_error)
    comparisons = [versus(name, ours, anchor_name, anchor, "decomp: tucker vs tensorly")]
    facts = [
        f"tucker defaults: ours {defaults(decomp.tucker, 'method', 'n_iter', 'tol', 'svd')}; tensorly "
        f"{defaults(tensorly.decomposition.tucker, 'init', 'n_iter_max', 'tol', 'svd')}.",
    ]
    return Part(comparisons, facts=facts)


# --------------------------------------------------------------------------- 3. dct


def bench_dct(context: Context) -> Part:
    n, workers = sizes(context).dct_n, context.threads
    generator = torch.Generator().manual_seed(SEED)
    signal = torch.randn(n, n, generator=generator)
    signal_numpy = signal.numpy()
    reference = torch.from_numpy(scipy.fft.dct(signal.double().numpy(), axis=0, norm="ortho"))
    inverse_reference = torch.from_numpy(scipy.fft.idct(signal.double().numpy(), axis=0, norm="ortho"))
    basis = decomp.dct_matrix(n, dtype=torch.float32)
    name = f"dct dim 0, {n}x{n}"

    ours, ours_time = measure(lambda: decomp.dct(signal, dim=0), context.repeats)
    scipy_result, scipy_time = measure(
        lambda: scipy.fft.dct(signal_numpy, axis=0, norm="ortho", workers=workers), context.repeats
    )
    # torch_dct transforms the last dim only: transpose in and out for dim-0 semantics.
    torch_dct_result, torch_dct_time = measure(lambda: torch_dct.dct(signal.T, norm="ortho").T, context.repeats)
    matmul_result, matmul_time = measure(lambda: basis @ signal, context.repeats)
    inverse, inverse_time = measure(lambda: decomp.idct(signal, dim=0), context.repeats)
    scipy_inverse, scipy_inverse_time = measure(
        lambda: scipy.fft.idct(signal_numpy, axis=0, norm="ortho", workers=workers), context.repeats
    )

    ours = (ours_time, max_abs_difference(reference, ours))
    scipy_side = (scipy_time, max_abs_difference(reference, scipy_result))
    torch_dct_side = (torch_dct_time, max_abs_difference(reference, torch_dct_result))
    inverse_sides = [(timing, max_abs_difference(inverse_reference, result))
                     for timing, result in ((inverse_time, inverse), (scipy_inverse_time, scipy_inverse))]
    comparisons = [
        versus(name, ours, "scipy.fft.dct", scipy_side, "decomp: dct vs scipy"),
        versus(name, ours, "torch_dct.dct (transposed)", torch_dct_side, "decomp: dct vs torch_dct"),
        versus(name, ours, "dct_matrix(n) @ x", (matmul_time, max_abs_difference(reference, matmul_result))),
        versus(f"idct dim 0, {n}x{n}", inverse_sides[0], "scipy.fft.idct", inverse_sides[1]),
    ]  # fmt: skip
    return Part(comparisons, facts=[f"dct: scipy.fft runs with workers={workers}."])


# --------------------------------------------------------------------------- 4. kpsvd


def rearrange(matrix: torch.Tensor, b_shape: tuple[int, int], c_shape: tuple[int, int]) -> torch.Tensor:
    """Van Loan-Pitsianis rearrangement: kron(B, C) maps to vec(B) vec(C)^T (row-major vec)."""
    (b_rows, b_cols), (c_rows, c_cols) = b_shape, c_shape
    blocks = matrix.reshape(b_rows, c_rows, b_cols, c_cols).permute(0, 2, 1, 3)
    return blocks.reshape(b_rows * b_cols, c_rows * c_cols)


def unrearrange(rearranged: torch.Tensor, b_shape: tuple[int, int], c_shape: tuple[int, int]) -> torch.Tensor:
    (b_rows, b_cols), (c_rows, c_cols) = b_shape, c_shape
    blocks = rearranged.reshape(b_rows, b_cols, c_rows, c_cols).permute(0, 2, 1, 3)
    return blocks.reshape(b_rows * c_rows, b_cols * c_cols)


def bench_kpsvd(context: Context) -> Part:
    block, rank = sizes(context).kron_block, sizes(context).kron_rank
    # B and C share one shape, so A is (b_rows^2) x (b_cols^2).
    rows, cols = block[0] ** 2, block[1] ** 2
    generator = torch.Generator().manual_seed(SEED)
    terms = 8
    weights = 2.0 ** -torch.arange(terms, dtype=torch.float64)
    unit_norm = (block[0] * block[1]) ** 0.5
    left = torch.randn(terms, *block, generator=generator, dtype=torch.float64) / unit_norm
    right = torch.randn(terms, *block, generator=generator, dtype=torch.float64) / unit_norm
    structured = unrearrange(
        torch.einsum("r,rij,rkl->ijkl", weights, left, right).reshape(block[0] * block[1], -1), block, block
    )
    noise = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    matrix = (structured + 1e-2 * noise * structured.norm() / noise.norm()).float()
    name = f"kpsvd rank {rank}, {rows}x{cols}, B,C {block}"

    def full_svd_route() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(rearrange(matrix, block, block), full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]

    sketch_generator = torch.Generator().manual_seed(SEED)
    ours, ours_time = measure(
        lambda: decomp.kpsvd(matrix, block, block, rank, generator=sketch_generator), context.repeats
    )
    ours_error = relative_error(matrix, ours.to_matrix())
    (u, s, vh), anchor_time = measure(full_svd_route, svd_repeats(context))
    anchor_error = relative_error(matrix, unrearrange((u * s) @ vh, block, block))

    anchor_name = "full SVD of rearranged A, truncated"
    ours, anchor = (ours_time, ours_error), (anchor_time, anchor_error)
    comparisons = [versus(name, ours, anchor_name, anchor, "decomp: kpsvd vs full SVD")]
    facts = [f"kpsvd defaults: {defaults(decomp.kpsvd, 'method', 'oversample', 'power_iters')}."]
    return Part(comparisons, facts=facts)


# --------------------------------------------------------------------------- 5. ldu


def bench_ldu(context: Context) -> Part:
    n = sizes(context).ldu_n
    generator = torch.Generator().manual_seed(SEED)
    matrix = torch.randn(n, n, generator=generator)
    name = f"ldu {n}x{n}"

    ours, ours_time = measure(lambda: decomp.ldu(matrix), context.repeats)
    ours_error = relative_error(matrix, ours.to_matrix())
    (permutation, lower, upper), anchor_time = measure(lambda: torch.linalg.lu(matrix), context.repeats)
    anchor_error = relative_error(matrix, permutation @ lower @ upper)

    ours, anchor = (ours_time, ours_error), (anchor_time, anchor_error)
    comparisons = [versus(name, ours, "torch.linalg.lu", anchor, "decomp: ldu vs torch.linalg.lu")]
    return Part(comparisons)


AREA = Area(
    section="decomp",
    title="Decompositions vs anchors",
    cases=(Case("rsvd", bench_rsvd), Case("tucker", bench_tucker), Case("dct", bench_dct),
           Case("kpsvd", bench_kpsvd), Case("ldu", bench_ldu)),  # fmt: skip
)

if __name__ == "__main__":
    sys.exit(main(AREA))
