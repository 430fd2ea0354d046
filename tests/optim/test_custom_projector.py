"""A projector written outside the package: the ``Projector`` protocol as ``ProjectedAdam``'s
extension point.

``CoordinateProjector`` keeps the ``r`` coordinates of largest gradient energy (the identity
basis's columns, as the DCT projector keeps DCT columns). One line in
``tests/contracts/optimizers.py`` (the ``"custom-coordinate"`` case) runs the whole optimizer
contract on it; the tests here check what only a projector object has: its option forms, its
name in the ``state_dict`` and the errors.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from optim import ProjectedAdam
from optim.projectors import StateSpec, integer


@dataclasses.dataclass(frozen=True)
class CoordinateProjector:
    name = "coordinate"
    keys = ("index",)

    def init_state(self, dim: int, rank: int, like: torch.Tensor, seed: int) -> dict:
        return {"index": torch.arange(rank, device=like.device)}

    def select(self, grad, state, rank, reduce=None, *, transposed=False):
        scores = grad.square().sum(0)
        if reduce is not None:
            scores = reduce(scores)
        index = scores.topk(rank).indices.sort().values
        return grad[:, index], {"index": index}

    def basis(self, state, dim: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        index = state["index"].to(like.device)
        return like.new_zeros(dim, rank).scatter_(0, index[None], 1.0)

    def layout(self, dim: int, rank: int) -> dict[str, StateSpec]:
        return {"index": integer(rank)}

    def state_problem(self, state, dim: int) -> str | None:
        index = state["index"]
        return None if bool(((index >= 0) & (index < dim)).all()) else "has 'index' out of range"


def _stepped(projector) -> ProjectedAdam:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 6)
    optimizer = ProjectedAdam(
        model.parameters(), lr=1e-2, rank=2, update_gap=2, projector=projector
    )
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        optimizer.step()
    return optimizer


def test_the_contract_suite_runs_the_custom_projector() -> None:
    from ..contracts.optimizers import OPTIMIZER_CASES

    case = next(case for case in OPTIMIZER_CASES if case.name == "custom-coordinate")
    optimizer = case.factory([torch.nn.Parameter(torch.randn(4, 4))], 1e-2)
    assert isinstance(optimizer.param_groups[0]["projector"], CoordinateProjector)


def test_object_factory_and_class_are_the_same_projector() -> None:
    runs = [
        _stepped(form)
        for form in (CoordinateProjector(), CoordinateProjector, lambda: CoordinateProjector())
    ]
    for optimizer in runs[1:]:
        for ours, theirs in zip(optimizer.state.values(), runs[0].state.values()):
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_step_moves_only_the_selected_coordinates() -> None:
    weight = torch.nn.Parameter(torch.randn(6, 8))  # compressed side: its 6 rows
    optimizer = ProjectedAdam([weight], lr=1e-2, rank=2, projector=CoordinateProjector())
    before = weight.detach().clone()
    weight.grad = torch.randn(6, 8)
    optimizer.step()
    index = optimizer.state[weight]["index"]
    moved = (weight.detach() != before).any(1).nonzero().flatten()
    assert index.dtype == torch.int64 and torch.equal(moved, index)
    assert torch.equal(index, weight.grad.square().sum(1).topk(2).indices.sort().values)


def test_state_dict_saves_the_name_and_loads_weights_only() -> None:
    optimizer = _stepped(CoordinateProjector())
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["projector"] == "coordinate"
    assert isinstance(optimizer.param_groups[0]["projector"], CoordinateProjector)  # untouched
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    fresh = ProjectedAdam(params, lr=1e-2, rank=2, update_gap=2, projector=CoordinateProjector)
    fresh.load_state_dict(reloaded)
    assert isinstance(fresh.param_groups[0]["projector"], CoordinateProjector)
    for param in params:
        for key, value in optimizer.state[param].items():
            assert torch.equal(fresh.state[param][key], value), key


def test_load_refuses_another_projectors_name() -> None:
    saved = _stepped(CoordinateProjector()).state_dict()
    other = ProjectedAdam(
        [torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(6))],
        rank=2,
        projector=CoordinateProjector(),
    )
    saved["param_groups"][0]["projector"] = "dct"
    with pytest.raises(ValueError, match="saved with projector 'dct'.*named 'coordinate'"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"one of \['dct', 'svd', 'random'\], a Projector"):
        saved_group = {**saved["param_groups"][0], "projector": "coordinate", "params": [0]}
        builtin = ProjectedAdam([torch.nn.Parameter(torch.randn(6, 8))], rank=2)
        builtin.load_state_dict({"state": {}, "param_groups": [saved_group]})


class _NoBasis:
    name = "no-basis"
    keys = ("index",)

    def init_state(self, dim, rank, like, seed):
        return {}


@pytest.mark.parametrize(
    ("projector", "message"),
    [
        (_NoBasis(), r"_NoBasis lacks select, basis, layout, state_problem$"),
        (lambda: 3, r"int \(returned by the factory .*\) lacks name \(a str\), keys"),
        (42, r"int lacks name \(a str\), keys \(a tuple of str\), init_state"),
    ],
)
def test_an_object_missing_the_protocol_raises_type_error_naming_it(projector, message) -> None:
    with pytest.raises(TypeError, match=message):
        ProjectedAdam([torch.nn.Parameter(torch.randn(4, 4))], projector=projector)


def test_a_custom_projector_may_not_take_a_builtin_name() -> None:
    impostor = type("Impostor", (CoordinateProjector,), {"name": "dct"})()
    with pytest.raises(ValueError, match="named 'dct', the name of the built-in DCTProjector"):
        ProjectedAdam([torch.nn.Parameter(torch.randn(4, 4))], projector=impostor)
