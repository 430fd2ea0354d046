"""Every adapter of the contract registry under FSDP2 and DDP: gloo, two CPU processes.

One launch of two processes runs every ``registry.ADAPTER_CASES`` entry: a small conv + MLP network
adapted on each layer the case supports, sharded with ``fully_shard`` (each adapted layer, then the
root) or wrapped in DDP, trained ``STEPS`` AdamW steps on a fixed batch split over the ranks, its
trainable tensors gathered, and its adapter saved from the sharded model (``save_adapter``) and
loaded back into a fresh sharded one (``load_adapter``). The test process compares each with the
single-process run on the whole batch and loads each file into the plain network.

The fast properties at the end need no process group: every adapter builds only contiguous,
at-least-1-D Parameters (what FSDP2 can shard), and the base class refuses an adapter that would not.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import (
    SNELLAParam,
    AdapterParam,
    LDUParam,
    adapter_state_dict,
    apply,
    load_adapter,
    save_adapter,
    trainable_parameters,
)

from tests.adapters.strategies import default_fits, layers
from tests.contracts.registry import ADAPTER_CASES, AdapterCase
from tests.optim.test_distributed import init_process_group

WORLD = 2
STEPS = 3
PER_RANK = 3
LR = 1e-2
# Each rank averages its own half, FSDP/DDP average the halves: the same gradient as the whole
# batch's mean up to rounding, which AdamW's normalised steps can grow far beyond a few ulps where a
# gradient entry is a near-cancellation (seen in fp32: 1.75e-6 on a LieParam factor after 3 steps).
# The network runs in float64, so the comparison sees the math, not fp32 noise.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
CASES = {case.name: case for case in ADAPTER_CASES}
KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}

distributed = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is unavailable",
)
# Every test here shares one 2-rank launch (or spawns its own).
pytestmark = pytest.mark.slow


def network() -> nn.Module:
    """A conv (4 x 2 x 3 x 3), a 8 x 64 and a 5 x 8 linear: the last splits unevenly over 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 8),
        nn.Tanh(),
        nn.Linear(8, 5),
    ).double()


def adapted(case: AdapterCase) -> nn.Module:
    """The network with the case's adapter on every layer kind it supports (same seed everywhere)."""
    model = network()
    torch.manual_seed(1)  # adapters with a random init draw it alike on every rank
    return apply(
        model,
        lambda name, module: case.factory(),
        target=lambda name, module: KINDS.get(type(module)) in case.layers,
    )


def batch(ranks: range | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and targets of ``ranks``; the single process takes every rank's."""
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(WORLD * PER_RANK, 2, 4, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(WORLD * PER_RANK, 5, generator=generator, dtype=torch.float64)
    rows = torch.cat([torch.arange(rank * PER_RANK, (rank + 1) * PER_RANK) for rank in ranks])
    return inputs[rows], targets[rows]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, ranks) -> None:
    inputs, targets = batch(ranks)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor gathered (a collective), a plain one as it is."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(param) for name, param in model.named_parameters() if param.requires_grad}


def one_process(case: AdapterCase) -> nn.Module:
    """The oracle: the whole batch in one process."""
    model = adapted(case)
    train(model, torch.optim.AdamW(trainable_parameters(model), lr=LR), range(WORLD))
    return model


# ------------------------------------------------------------------------------ the two ranks


def sharded(case: AdapterCase, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = adapted(case)
    for module in model:
        if parametrize.is_parametrized(module):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def case_run(case: AdapterCase, rank: int, mesh, out: str) -> dict[str, Any]:
    model = sharded(case, mesh)
    train(model, torch.optim.AdamW(trainable_parameters(model), lr=LR), (rank,))
    result: dict[str, Any] = {"fsdp": trained(model)}
    result["placements"] = sorted(
        {str(param.placements) for param in model.parameters() if param.requires_grad}
    )
    path = os.path.join(out, f"{case.name}.safetensors")
    save_adapter(model, path)  # every rank gathers; rank 0 writes
    dist.barrier()
    # The file loads into a fresh sharded model: each rank keeps its own shard of every tensor.
    reloaded = load_adapter(sharded(case, mesh), path)
    result["reloaded"] = trained(reloaded)

    model = adapted(case)
    ddp = nn.parallel.DistributedDataParallel(model)
    train(ddp, torch.optim.AdamW(trainable_parameters(model), lr=LR), (rank,))
    result["ddp"] = trained(model)
    del ddp
    return result


def worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    init_process_group(rank, store)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {case.name: case_run(case, rank, mesh, out) for case in ADAPTER_CASES}
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        # Free the DDP reducers while the process group is registered (see tests/optim).
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict[str, Any], Any]:
    out = tmp_path_factory.mktemp("adapters-distributed")
    mp.spawn(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "results.pt", weights_only=True), out


@pytest.fixture(scope="module")
def oracles() -> dict[str, nn.Module]:
    return {case.name: one_process(case) for case in ADAPTER_CASES}


def assert_trained_alike(found: dict[str, torch.Tensor], model: nn.Module, name: str) -> None:
    expected = trained(model)
    assert found.keys() == expected.keys(), name
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], **TOLERANCE, msg=f"{name}: {key}")
    initial = trained(adapted(CASES[name]))
    moved = max(float((expected[key] - initial[key]).abs().max()) for key in expected)
    assert moved > 1e-3, f"{name}: training did not move the adapters"


@distributed
@pytest.mark.parametrize("name", CASES)
def test_fsdp2_trains_like_one_process(two_ranks, oracles, name):
    results, _ = two_ranks
    assert_trained_alike(results[name]["fsdp"], oracles[name], name)
    assert results[name]["placements"] == ["(Shard(dim=0),)"]


@distributed
@pytest.mark.parametrize("name", CASES)
def test_ddp_trains_like_one_process(two_ranks, oracles, name):
    results, _ = two_ranks
    assert_trained_alike(results[name]["ddp"], oracles[name], name)


@distributed
@pytest.mark.parametrize("name", CASES)
def test_adapter_saved_from_a_sharded_model_loads_anywhere(two_ranks, oracles, name):
    results, out = two_ranks
    path = out / f"{name}.safetensors"
    saved = load_file(path)
    # Whole tensors (gathered), exactly the sharded model's, and only the adapters' (the factors
    # rebuilt from the weight at load are left out).
    assert saved.keys() <= adapter_state_dict(oracles[name]).keys()
    assert set(trained_adapter_tensors(results[name]["fsdp"])) <= saved.keys()
    for key, value in trained_adapter_tensors(results[name]["fsdp"]).items():
        assert torch.equal(saved[key], value), key
    # Loaded back into a fresh sharded model: its shards hold exactly the saved tensors.
    for key, value in trained_adapter_tensors(results[name]["reloaded"]).items():
        assert torch.equal(value, saved[key]), key
    # Loaded into the plain network: the single process's outputs, to fp32 rounding.
    plain = load_adapter(network(), path)
    inputs, _ = batch(range(WORLD))
    with torch.no_grad():
        torch.testing.assert_close(plain(inputs), oracles[name](inputs), **TOLERANCE)


def trained_adapter_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's own trained tensors (the heads have none here: every layer is adapted)."""
    return {key: value for key, value in tensors.items() if ".parametrizations.weight.0." in key}


# ------------------------------------------------------------------------- without processes


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[case.name for case in ADAPTER_CASES])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_parameter_is_contiguous_and_at_least_1d(case, data):
    layer, _ = data.draw(layers(case.layers, data.draw(st.sampled_from([torch.float32, torch.float64]))))
    assume(default_fits(case.factory(), layer))
    parametrize.register_parametrization(layer, "weight", case.factory())
    adapter = layer.parametrizations.weight[0]
    assert list(adapter.parameters()), case.name
    for key, param in adapter.named_parameters():
        # Row-major strides even on size-1 dims: what DDP's gradient buckets lay out.
        row_major = torch.empty(param.shape).stride()
        assert param.ndim >= 1 and param.stride() == row_major, (key, tuple(param.shape), param.stride())


class _Transposed(AdapterParam):
    def _build(self, weight: torch.Tensor) -> None:
        self.factor = nn.Parameter(torch.zeros(weight.shape[1], weight.shape[0]).T)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self.factor


class _Size1Strides(AdapterParam):
    def _build(self, weight: torch.Tensor) -> None:
        # is_contiguous() is True (size-1 dims), yet the strides are not row-major.
        self.gains = nn.Parameter(torch.zeros(1, weight.shape[0]).T)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self.gains * weight


class _Scalar(AdapterParam):
    def _build(self, weight: torch.Tensor) -> None:
        self.gain = nn.Parameter(torch.zeros(()))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self.gain * weight


@pytest.mark.parametrize(
    ("adapter_class", "message"),
    [
        (_Transposed, r"Parameter 'factor' of shape \(4, 3\) that is not contiguous"),
        (_Size1Strides, r"'gains' .*strides \(1, 4\), expected \(1, 1\)"),
        (_Scalar, "'gain' .* 0-d"),
    ],
)
def test_base_class_refuses_a_parameter_fsdp2_cannot_shard(adapter_class, message):
    layer = nn.Linear(3, 4)
    with pytest.raises(RuntimeError, match=message):
        parametrize.register_parametrization(layer, "weight", adapter_class())
    assert not parametrize.is_parametrized(layer)


def linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _with_0d_scalars(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as written when the scalars were 0-d tensors."""
    return {key: value.reshape(()) if value.shape == (1,) else value for key, value in state.items()}


@pytest.mark.parametrize("adapter_class", [LDUParam, SNELLAParam])
def test_state_with_0d_scalars_from_older_versions_still_loads(adapter_class, tmp_path):
    model = apply(nn.Sequential(nn.Linear(6, 4)), adapter_class, target=linear)
    with torch.no_grad():
        for param in trainable_parameters(model):
            param.add_(0.25)
    state = adapter_state_dict(model)
    assert any(value.shape == (1,) for value in state.values())
    old = _with_0d_scalars({key: value.clone() for key, value in state.items()})

    fresh = apply(nn.Sequential(nn.Linear(6, 4)), adapter_class, target=linear)
    fresh.load_state_dict({**fresh.state_dict(), **old})
    for key, value in adapter_state_dict(fresh).items():
        assert torch.equal(value, state[key]), key

    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, factors=True)  # the Linear layers below are unseeded
    save_file(_with_0d_scalars(load_file(path)), path, metadata=_metadata(path))
    loaded = load_adapter(nn.Sequential(nn.Linear(6, 4)), path)
    for key, value in adapter_state_dict(loaded).items():
        assert torch.equal(value, state[key]), key


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()
