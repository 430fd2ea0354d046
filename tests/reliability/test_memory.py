"""Mechanism 10: no function allocates more than O(its input + its output).

Peak allocation is measured with the torch profiler's memory events (CPU allocator), so a hidden
``m x m`` intermediate shows up even when it is freed before the call returns. Each entry point
runs on inputs with one long side, where any ``O(m^2)`` term dwarfs the input and output; the
bound is a small multiple of their bytes plus a fixed slack for LAPACK workspaces. The headline
cases of the issue run at full size: ``ldu`` of a 100000 x 1 column (a dense permutation would be
40 GB) and ``LDUParam`` on a 32000-row head (4 GB).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.profiler import ProfilerActivity, profile

from decomp import atoms, dct, idct, kpsvd, ldu, rsvd, tucker
from decomp.adapters import LDUParam
from tests.strategies import gaussian, relative_error
from tests.test_contracts import tensors_in

# Workspaces and bookkeeping that do not grow with the input.
SLACK_BYTES = 1 << 20
# Scaled copy, factorisation copy, factors and their casts: a few input-sized buffers at most.
FACTOR = 8


def peak_allocated_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """The largest number of bytes ``fn`` held at once, beyond what was live when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, result


def nbytes(result: object) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(result))


CASES = {
    "rsvd tall": ((20000, 3), lambda x: rsvd(x, 2, generator=torch.Generator().manual_seed(0))),
    "rsvd wide": ((3, 20000), lambda x: rsvd(x, 2, generator=torch.Generator().manual_seed(0))),
    "rsvd tol": ((5000, 20), lambda x: rsvd(x, tol=0.5, generator=torch.Generator().manual_seed(0))),
    "tucker completion": ((20000, 2), lambda x: tucker(x, (2, 1))),
    "tucker 3-d completion": ((20000, 2, 2), lambda x: tucker(x, (3, 1, 2))),
    "tucker energy": ((20000, 3, 2), lambda x: tucker(x, 0.9)),
    "kpsvd": ((20000, 4), lambda x: kpsvd(x, (10000, 2), (2, 2), 2)),
    "ldu tall": ((20000, 2), ldu),
    "ldu wide": ((2, 20000), ldu),
    "ldu batched tall": ((3, 5000, 2), ldu),
    "atoms": ((500, 30, 3, 3), lambda x: atoms(x, 4, levels=2)),
    "atoms dct": ((500, 30, 3, 3), lambda x: atoms(x, 4, method="dct")),
    "atoms dct large kernel": ((1, 1, 64, 64), lambda x: atoms(x, 4, method="dct")),
    "dct": ((20000, 3), lambda x: dct(x, 0)),
    "idct": ((3, 20000), lambda x: idct(x, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_peak_allocation_is_linear_in_input_and_output(name):
    shape, call = CASES[name]
    x = gaussian(shape, seed=0, dtype=torch.float32)
    call(x)  # warm the DCT caches (bounded: at most 224 x 224 per size) and lazy imports
    peak, result = peak_allocated_bytes(lambda: call(x))
    bound = FACTOR * (nbytes(x) + nbytes(result)) + SLACK_BYTES
    assert peak <= bound, f"{name}: peak {peak} > {bound} bytes (in {nbytes(x)}, out {nbytes(result)})"


def test_ldu_of_a_long_column_returns_an_index_permutation():
    """Regression: the dense 100000 x 100000 P tried to allocate 40 GB."""
    A = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(1))
    peak, factors = peak_allocated_bytes(lambda: ldu(A))
    assert factors.perm.shape == (100_000,) and factors.perm.dtype == torch.int64
    assert factors.L.shape == (100_000, 1) and factors.D.shape == (1,) and factors.U.shape == (1, 1)
    assert nbytes(factors) <= 2 * nbytes(A) + 8 * A.shape[0] + 64  # L, D, U and int64 perm
    assert peak <= FACTOR * (nbytes(A) + nbytes(factors)) + SLACK_BYTES
    torch.testing.assert_close(factors.to_matrix(), A)
    assert int(factors.perm[A.abs().argmax()]) == 0  # the pivot row is eliminated first


def test_ldu_param_on_a_large_head_keeps_index_sized_buffers():
    """Regression: building LDUParam on a 32000-row head formed a 4 GB permutation matrix."""
    rows, columns = 32_000, 64
    layer = nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(gaussian((rows, columns), seed=2, dtype=torch.float32))
    weight = layer.weight.detach().clone()
    peak, _ = peak_allocated_bytes(
        lambda: parametrize.register_parametrization(layer, "weight", LDUParam())
    )
    adapter = layer.parametrizations.weight[0]
    buffer_elements = sum(b.numel() for b in adapter.buffers())
    k = min(rows, columns)
    assert buffer_elements <= rows * k + k * columns + k + 1  # left, right, pivots, scale
    assert peak <= FACTOR * weight.numel() * weight.element_size() + SLACK_BYTES
    assert torch.equal(layer.weight, weight)  # still the identity at init
    x = gaussian((3, columns), seed=3, dtype=torch.float32)
    with torch.no_grad():
        assert relative_error(layer(x), x @ weight.T) <= 1e-6
