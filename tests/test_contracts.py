"""One contract every public decomposition meets, run over a registry of all of them.

A new decomposition gets the whole suite by adding one line to ``DECOMPOSITIONS``: typed errors
for non-tensors, integer/complex dtypes, empty and non-finite input; half-precision input computed
in fp32 and returned in the input dtype; a documented, example-carrying docstring.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import pytest
import torch

import decomp


class Case(NamedTuple):
    name: str
    call: Callable[[torch.Tensor], object]
    shape: tuple[int, ...]


DECOMPOSITIONS = [
    Case("rsvd", lambda x: decomp.rsvd(x, 2, generator=torch.Generator().manual_seed(0)), (6, 5)),
    Case("tucker", lambda x: decomp.tucker(x, 2), (4, 5, 3)),
    Case("kpsvd", lambda x: decomp.kpsvd(x, (2, 3), (3, 2), 1), (6, 6)),
    Case("ldu", lambda x: decomp.ldu(x), (5, 4)),
    Case("atoms", lambda x: decomp.atoms(x, 3), (4, 3, 3, 3)),
    Case("dct", lambda x: decomp.dct(x, dim=0), (8, 3)),
    Case("idct", lambda x: decomp.idct(x, dim=-1), (3, 8)),
]
IDS = [case.name for case in DECOMPOSITIONS]


def tensors_in(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in tensors_in(item)]
    return []


def well_conditioned(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("case", DECOMPOSITIONS, ids=IDS)
def test_rejects_non_tensor(case):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        case.call(well_conditioned(case.shape).tolist())


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
@pytest.mark.parametrize("case", DECOMPOSITIONS, ids=IDS)
def test_rejects_non_real_float(case, dtype):
    with pytest.raises(TypeError, match="real floating dtype"):
        case.call(torch.ones(case.shape, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("case", DECOMPOSITIONS, ids=IDS)
def test_rejects_non_finite(case, bad):
    x = well_conditioned(case.shape)
    x.view(-1)[-1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        case.call(x)


@pytest.mark.parametrize("case", DECOMPOSITIONS, ids=IDS)
def test_rejects_empty(case):
    with pytest.raises(ValueError, match="empty"):
        case.call(torch.ones((0,) + case.shape[1:]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", DECOMPOSITIONS, ids=IDS)
def test_returns_input_dtype_and_device(case, dtype):
    x = well_conditioned(case.shape, dtype)
    outputs = tensors_in(case.call(x))
    assert outputs
    for out in outputs:
        # Floating outputs in the input's dtype; index outputs (ldu's perm) stay int64.
        assert out.dtype == (dtype if out.is_floating_point() else torch.int64)
        assert out.device == x.device
        if out.is_floating_point():
            assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("case", DECOMPOSITIONS, ids=IDS)
def test_public_function_is_documented(case):
    fn = getattr(decomp, case.name)
    doc = inspect.getdoc(fn) or ""
    assert ">>>" in doc, f"{case.name} has no example"
    assert "Raises" in doc or "raises" in doc.lower(), f"{case.name} does not document its errors"
    hints = inspect.get_annotations(fn)
    assert "return" in hints, f"{case.name} has no return annotation"


def test_every_public_callable_is_under_contract():
    covered = {case.name for case in DECOMPOSITIONS} | {"dct_matrix", "kron_shapes"}
    public = {name for name in decomp.__all__ if callable(getattr(decomp, name)) and name[0].islower()}
    assert public == covered
