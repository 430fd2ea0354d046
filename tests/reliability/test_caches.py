"""Mechanism 7: nothing the library caches or returns can be corrupted from outside.

For every public entry point of :mod:`decomp` (and the DCT cache's consumers), a drawn fault is
applied to every tensor it returned: in-place writes (``zero_``, ``mul_``, NaN fill), or wrapping
it as an ``nn.Parameter`` and taking an optimizer step. Afterwards the caller's input is unchanged
(no result aliases it) and every later call, of the same function and of the cache's other users
(``dct``/``idct`` on both algorithms, ``atoms(method="dct")``, ``DCTParam``), returns exactly
what it returned before the fault.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp import atoms, dct, dct_matrix, idct, kpsvd, ldu, rsvd, tucker
from decomp.adapters import DCTParam
from tests.strategies import SEEDS, gaussian
from tests.test_contracts import tensors_in


class Entry(NamedTuple):
    name: str
    shape: tuple[int, ...]
    call: Callable[[torch.Tensor], object]


ENTRIES = [
    Entry("dct_matrix", (), lambda x: dct_matrix(8, dtype=torch.float64)),
    Entry("dct_matrix float32", (), lambda x: dct_matrix(9, dtype=torch.float32)),
    Entry("dct matmul", (8, 3), lambda x: dct(x, dim=0)),
    Entry("idct matmul", (3, 9), lambda x: idct(x, dim=1)),
    Entry("dct fft", (300, 2), lambda x: dct(x, dim=0)),
    Entry("idct fft", (2, 300), lambda x: idct(x, dim=1)),
    Entry("rsvd", (9, 7), lambda x: rsvd(x, 3, generator=torch.Generator().manual_seed(0))),
    Entry("rsvd tol", (9, 7), lambda x: rsvd(x, tol=0.2, generator=torch.Generator().manual_seed(0))),
    Entry("tucker", (4, 5, 3), lambda x: tucker(x, (2, 3, 2))),
    Entry("tucker uncompressed", (4, 5, 3), lambda x: tucker(x, (4, 5, 3))),
    Entry("kpsvd", (6, 6), lambda x: kpsvd(x, (2, 3), (3, 2), 2)),
    Entry("ldu", (6, 4), ldu),
    Entry("atoms svd", (4, 3, 3, 3), lambda x: atoms(x, 4, levels=2)),
    Entry("atoms dct", (4, 3, 3, 3), lambda x: atoms(x, 5, method="dct")),
    Entry("atoms dct 1-d", (4, 3, 8), lambda x: atoms(x, 8, method="dct")),
]

FAULTS = ("zero", "scale", "nan", "parameter step")


def snapshot(result: object) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors_in(result)]


def corrupt(t: torch.Tensor, fault: str) -> None:
    """Apply ``fault`` to ``t`` in place, as a careless caller would."""
    if fault == "zero" or not t.is_floating_point():
        t.zero_()
    elif fault == "scale":
        t.mul_(-7.0)
    elif fault == "nan":
        t.fill_(float("nan"))
    else:
        # Train the returned tensor: nn.Parameter shares its storage, the step writes into it.
        parameter = nn.Parameter(t)
        optimizer = torch.optim.SGD([parameter], lr=0.5)
        (parameter.square().sum() + parameter.sum()).backward()
        optimizer.step()


def dct_param_layer() -> nn.Linear:
    layer = nn.Linear(9, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(gaussian((8, 9), seed=1, dtype=torch.float32))
    parametrize.register_parametrization(layer, "weight", DCTParam(num_coefficients=5))
    with torch.no_grad():
        layer.parametrizations.weight[0].coefficients.copy_(torch.arange(1.0, 6.0))
    return layer


def cache_consumers() -> list[torch.Tensor]:
    """Everything the DCT cache feeds, on fixed inputs: later calls must reproduce it exactly."""
    x8, x9 = gaussian((8, 3), seed=2), gaussian((3, 9), seed=3, dtype=torch.float32)
    long = gaussian((300, 2), seed=4)
    return [
        dct_matrix(8, dtype=torch.float64),
        dct_matrix(9, dtype=torch.float32),
        dct(x8, dim=0),
        idct(x8, dim=0),
        dct(x9, dim=1),
        idct(x9, dim=1),
        dct(long, dim=0),
        idct(long, dim=0),
        atoms(gaussian((4, 3, 3, 3), seed=5), 5, method="dct").atoms,
        atoms(gaussian((4, 3, 8), seed=6), 8, method="dct").atoms,
        dct_param_layer().weight.detach(),
    ]


@settings(max_examples=40)
@given(entry=st.sampled_from(ENTRIES), fault=st.sampled_from(FAULTS), seed=SEEDS)
def test_corrupting_a_result_changes_no_later_call(entry, fault, seed):
    x = gaussian(entry.shape, seed) if entry.shape else torch.empty(0)
    x_before = x.clone()
    expected = snapshot(entry.call(x))
    consumers = cache_consumers()

    for t in tensors_in(entry.call(x)):
        corrupt(t, fault)

    assert torch.equal(x, x_before), "a result aliased the caller's input"
    for got, want in zip(tensors_in(entry.call(x)), expected, strict=True):
        assert torch.equal(got, want), f"{entry.name} changed after its result was corrupted"
    for got, want in zip(cache_consumers(), consumers, strict=True):
        assert torch.equal(got, want), "a cache consumer changed"


def test_dct_matrix_trained_as_a_parameter_breaks_nothing():
    """Regression: dct_matrix(16) handed out the cached tensor; training it broke every dct."""
    x = gaussian((16, 4), seed=7, dtype=torch.float32)
    before = (dct(x, dim=0), idct(x, dim=0), dct_param_layer().weight.detach())
    basis = nn.Parameter(dct_matrix(16))
    optimizer = torch.optim.Adam([basis], lr=1.0)
    for _ in range(2):
        optimizer.zero_grad()
        (basis @ x).square().sum().backward()
        optimizer.step()
    assert not torch.allclose(basis.detach(), dct_matrix(16))  # the user's copy did train
    torch.testing.assert_close(dct_matrix(16) @ x, before[0], rtol=0, atol=1e-5)
    assert torch.equal(dct(x, dim=0), before[0])
    assert torch.equal(idct(x, dim=0), before[1])
    assert torch.equal(dct_param_layer().weight.detach(), before[2])


@pytest.mark.parametrize("n", [4, 200])
def test_every_dct_matrix_call_is_a_fresh_tensor(n):
    first, second = dct_matrix(n), dct_matrix(n)
    assert torch.equal(first, second)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
