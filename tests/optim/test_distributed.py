"""The projected optimizers under DDP and FSDP2: gloo, two CPU processes, oracle runs in one process.

Each scenario spawns its two processes once (``torch.multiprocessing.spawn``, a file store);
rank 0 saves what both ranks gathered and the test compares it with a single-process run of the
same model on the same total batch. Under DDP the ranks average their gradients and the optimizer
communicates nothing; under FSDP2 the parameters are row-sharded DTensors and the DCT projector
needs only an all-reduce of each weight's column scores per refresh (never a gather).
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optim import DCTProjectedAdam, ProjectedAdam, SVDProjectedAdam

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="torch.distributed with the gloo backend is unavailable",
    ),
    pytest.mark.slow,
]

WORLD = 2
STEPS = 8
PER_RANK = 4
RESUME_AT = 5  # DDP: rank 1 reloads rank 0's checkpoint here (between refreshes 3 and 6)
OPTIONS = {"lr": 1e-2, "update_gap": 3}  # refreshes at steps 0, 3 and 6

# (input shape, output size) of each model's data.
IMAGES = ((3, 6, 6), 24)
VECTORS = ((16,), 32)
WIDE = ((3, 6, 6), 1)

DDP_RUNS: dict[str, tuple[type[ProjectedAdam], dict[str, Any]]] = {
    "dct": (DCTProjectedAdam, {"rank": 4, "weight_decay": 0.01}),
    # The randomized SVD's generator is seeded per refresh: every rank draws the same sketch.
    "svd-rsvd": (SVDProjectedAdam, {"rank": 4, "weight_decay": 0.01}),
}
FSDP_RUNS: dict[str, tuple[type[ProjectedAdam], dict[str, Any]]] = {
    "dct": (DCTProjectedAdam, {"rank": 4, "weight_decay": 0.01}),
    "dct-l1-keep-protect": (
        DCTProjectedAdam,
        {"rank": 0.25, "score_norm": "l1", "moments": "keep", "protect": True},
    ),
    "random": (ProjectedAdam, {"rank": 4, "projector": "random", "moments": "reset"}),
    # the residual lives on each rank's own rows: no collective of its own
    "dct-error-feedback": (DCTProjectedAdam, {"rank": 4, "error_feedback": True}),
}
CONSOLIDATE_AFTER = 4  # protect=True runs end a "task" after this many steps


def image_model() -> nn.Module:
    """Conv (4 x 27 matrix, wide), Linear 16 x 64 (wide), Linear 24 x 16 (tall), three biases."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 24)
    )


def tall_model() -> nn.Module:
    """Weights with rows >= cols (32 x 16, 32 x 32): FSDP's row shards keep the compressed side."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32))


def wide_model() -> nn.Module:
    """Wide weights only: conv 8 x 27 and a 1 x 128 head, whose one row leaves rank 1 empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(128, 1))


def batch(step: int, ranks: range | tuple[int, ...], data: tuple[tuple[int, ...], int]):
    """The inputs and targets of ``ranks`` at ``step``; the single process takes every rank's."""
    shape, outputs = data
    parts = []
    for rank in ranks:
        generator = torch.Generator().manual_seed(1000 * step + rank)
        parts.append(
            (
                torch.randn(PER_RANK, *shape, generator=generator),
                torch.randn(PER_RANK, outputs, generator=generator),
            )
        )
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def loss_at(model: nn.Module, step: int, ranks, data) -> torch.Tensor:
    inputs, targets = batch(step, ranks, data)
    return nn.functional.mse_loss(model(inputs), targets)


def train_one_process(
    model: nn.Module, optimizer: ProjectedAdam, data, *, consolidate_after: int | None = None
) -> torch.Tensor:
    """The oracle: every rank's batch in one process, ``STEPS`` steps; the flat parameters."""
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_at(model, step, range(WORLD), data).backward()
        optimizer.step()
        if step + 1 == consolidate_after:
            optimizer.consolidate()
    return flat(model.parameters())


def flat(tensors) -> torch.Tensor:
    return torch.cat([tensor.detach().reshape(-1) for tensor in tensors])


def step_recording_collectives(optimizer: ProjectedAdam) -> dict[str, Any]:
    """``optimizer.step()``; the collectives it issued (c10d and DTensor's) and all-reduce sizes."""
    from torch.distributed.tensor.debug import CommDebugMode

    sizes: list[int] = []
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sizes.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording_all_reduce
    mode = CommDebugMode()
    try:
        with mode:
            optimizer.step()
    finally:
        dist.all_reduce = all_reduce
    counts = {str(op): count for op, count in mode.get_comm_counts().items() if count}
    return {"counts": counts, "all_reduce_sizes": sizes}


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def spawn(worker: Callable[..., None], tmp_path) -> dict[str, Any]:
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    return torch.load(tmp_path / "results.pt", weights_only=True)


def init_process_group(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    # A finite timeout: ranks that disagree fail the test instead of hanging it.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )


# ----------------------------------------------------------------------------------------- DDP


def ddp_run(name: str, rank: int, out: str) -> dict[str, Any]:
    """``STEPS`` DDP steps on this rank's data; rank 1 resumes from rank 0's checkpoint."""
    optimizer_class, options = DDP_RUNS[name]
    model = image_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = optimizer_class(model.parameters(), **OPTIONS, **options)
    collectives = []
    for step in range(STEPS):
        if step == RESUME_AT:
            checkpoint = os.path.join(out, f"{name}.pt")
            if rank == 0:
                torch.save(optimizer.state_dict(), checkpoint)
            dist.barrier()
            if rank == 1:  # a fresh optimizer, resumed from rank 0's state
                optimizer = optimizer_class(model.parameters(), **OPTIONS, **options)
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
                optimizer.load_state_dict(state)
        optimizer.zero_grad()
        loss_at(ddp, step, (rank,), IMAGES).backward()  # different data on each rank
        collectives.append(step_recording_collectives(optimizer))
    return {"params": gather(flat(model.parameters())), "collectives": collectives}


def ddp_worker(rank: int, store: str, out: str) -> None:
    init_process_group(rank, store)
    try:
        results = {name: ddp_run(name, rank, out) for name in DDP_RUNS}
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        # Free the DDP reducers while the process group is registered: a reducer freed after
        # destroy_process_group destroys the group itself while holding the GIL, which can
        # deadlock with gloo's worker thread (it needs the GIL to free a finished collective).
        gc.collect()
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical_match_one_process_and_resume_from_rank_0(tmp_path):
    results = spawn(ddp_worker, tmp_path)
    initial = flat(image_model().parameters())
    for name, (optimizer_class, options) in DDP_RUNS.items():
        rank0, rank1 = results[name]["params"]
        # Rank 1 resumed from rank 0's checkpoint mid-run and still agrees bit for bit.
        assert torch.equal(rank0, rank1), name
        model = image_model()
        expected = train_one_process(
            model, optimizer_class(model.parameters(), **OPTIONS, **options), IMAGES
        )
        torch.testing.assert_close(rank0, expected, rtol=0, atol=1e-6, msg=name)
        assert (rank0 - initial).abs().max() > 1e-2, f"{name}: the parameters did not move"
        # Every rank already holds the averaged gradient: the optimizer needs no collective.
        assert all(not step["counts"] for step in results[name]["collectives"]), name


# ---------------------------------------------------------------------------------------- FSDP


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if list(layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def projected_weights(model: nn.Module) -> list[torch.Tensor]:
    return [param for param in model.parameters() if param.ndim >= 2]


def subspace(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The projector's choice: the DCT column indices, or the random projector's seed."""
    return state["index"] if "index" in state else state["seed"].reshape(1)


def fsdp_run(
    model: nn.Module,
    optimizer: ProjectedAdam,
    data,
    *,
    consolidate_after: int | None = None,
    fixed_batch: bool = False,
) -> dict[str, Any]:
    """``STEPS`` FSDP steps on this rank's half of each batch; what the test compares."""
    rank = dist.get_rank()
    collectives = []
    for step in range(STEPS):
        optimizer.zero_grad()
        # Each rank's mean loss; FSDP averages the gradients over the ranks.
        loss_at(model, 0 if fixed_batch else step, (rank,), data).backward()
        state = optimizer.state[projected_weights(model)[0]]
        due = "step" not in state or int(state["step"]) % optimizer.defaults["update_gap"] == 0
        collectives.append({"refresh": due, **step_recording_collectives(optimizer)})
        if step + 1 == consolidate_after:
            optimizer.consolidate()
    local_shapes = [
        (tuple(param.to_local().shape), tuple(optimizer.state[param]["exp_avg"].shape))
        for param in model.parameters()
    ]
    every_rank_shapes: list[Any] = [None] * WORLD
    dist.all_gather_object(every_rank_shapes, local_shapes)
    return {
        "params": flat(param.full_tensor() for param in model.parameters()),
        "placements": [str(param.placements) for param in model.parameters()],
        "collectives": collectives,
        "subspaces": [gather(subspace(optimizer.state[p])) for p in projected_weights(model)],
        "local_shapes": every_rank_shapes,
    }


def fsdp_worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    init_process_group(rank, store)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results: dict[str, Any] = {}
        for name, (optimizer_class, options) in FSDP_RUNS.items():
            model = shard(tall_model(), mesh)
            optimizer = optimizer_class(model.parameters(), **OPTIONS, **options)
            consolidate_after = CONSOLIDATE_AFTER if options.get("protect") else None
            results[name] = fsdp_run(model, optimizer, VECTORS, consolidate_after=consolidate_after)

        # Wide weights compress their columns under FSDP; HSDP over a (2, 1) mesh holds every
        # row on every rank with the same forced side, so the two runs must agree.
        for name, wide_mesh in (
            ("wide-fsdp", mesh),
            ("wide-hsdp", init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("rep", "shard"))),
        ):
            model = shard(wide_model(), wide_mesh)
            optimizer = DCTProjectedAdam(model.parameters(), rank=4, **OPTIONS)
            before = loss_at(model, 0, (rank,), WIDE).detach().reshape(1)
            results[name] = fsdp_run(model, optimizer, WIDE, fixed_batch=True)
            after = loss_at(model, 0, (rank,), WIDE).detach().reshape(1)
            dist.all_reduce(before)
            dist.all_reduce(after)
            results[name]["losses"] = (before / WORLD, after / WORLD)

        # GaLore's SVD needs the whole gradient.
        model = shard(tall_model(), mesh)
        loss_at(model, 0, (rank,), VECTORS).backward()
        with pytest.raises(ValueError, match="needs the whole gradient"):
            SVDProjectedAdam(model.parameters(), rank=4).step()

        # NaN in rank 0's shard only, at a refresh: both ranks raise (neither waits for the
        # other in a collective) and no parameter or state changes.
        model = shard(tall_model(), mesh)
        optimizer = DCTProjectedAdam(model.parameters(), rank=4, **OPTIONS)
        for step in range(OPTIONS["update_gap"]):
            optimizer.zero_grad()
            loss_at(model, step, (rank,), VECTORS).backward()
            optimizer.step()
        optimizer.zero_grad()
        loss_at(model, OPTIONS["update_gap"], (rank,), VECTORS).backward()
        if rank == 0:
            model[2].weight.grad.to_local()[0, 0] = float("nan")
        snapshot = [
            (param.to_local().clone(), {key: value.clone() for key, value in state.items()})
            for param, state in optimizer.state.items()
        ]
        with pytest.raises(ValueError, match="NaN or Inf"):
            optimizer.step()
        for (param, state), (local, saved) in zip(optimizer.state.items(), snapshot):
            assert torch.equal(param.to_local(), local)
            assert state.keys() == saved.keys()
            assert all(torch.equal(state[key], saved[key]) for key in saved)

        # Shardings other than by rows are refused, as are gradients sharded unlike their param.
        columns = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(1)]))
        columns.grad = distribute_tensor(torch.ones(4, 4), mesh, [Shard(1)])
        with pytest.raises(ValueError, match=r"sharded by rows \(Shard\(0\)"):
            DCTProjectedAdam([columns], rank=2).step()
        rows = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
        rows.grad = distribute_tensor(torch.ones(4, 4), mesh, [Replicate()])
        with pytest.raises(ValueError, match="placements"):
            DCTProjectedAdam([rows], rank=2).step()

        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict[str, Any]:
    return spawn(fsdp_worker, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("name", FSDP_RUNS)
def test_fsdp_row_shards_match_one_process(fsdp_results, name):
    optimizer_class, options = FSDP_RUNS[name]
    result = fsdp_results[name]
    model = tall_model()
    optimizer = optimizer_class(model.parameters(), **OPTIONS, **options)
    consolidate_after = CONSOLIDATE_AFTER if options.get("protect") else None
    expected = train_one_process(model, optimizer, VECTORS, consolidate_after=consolidate_after)
    assert set(result["placements"]) == {"(Shard(dim=0),)"}
    torch.testing.assert_close(result["params"], expected, rtol=0, atol=1e-5)
    assert (expected - flat(tall_model().parameters())).abs().max() > 1e-2
    for (subspace0, subspace1), param in zip(result["subspaces"], projected_weights(model)):
        assert torch.equal(subspace0, subspace1)
        # Every rank's columns are the single process's columns.
        assert torch.equal(subspace0, subspace(optimizer.state[param]))
    # Weights: local rows x r moments; biases: AdamW moments shaped like the local shard.
    local_shapes = [
        (
            (param.shape[0] // WORLD, *param.shape[1:]),
            (param.shape[0] // WORLD, *optimizer.state[param]["exp_avg"].shape[1:]),
        )
        for param in model.parameters()
    ]
    assert result["local_shapes"] == [local_shapes] * WORLD


@pytest.mark.parametrize("name", FSDP_RUNS)
def test_fsdp_step_never_gathers_and_all_reduces_only_column_scores(fsdp_results, name):
    columns = {param.shape[1] for param in projected_weights(tall_model())}
    smallest_weight = min(param.numel() for param in projected_weights(tall_model()))
    for step, collectives in enumerate(fsdp_results[name]["collectives"]):
        sizes = collectives["all_reduce_sizes"]
        if not collectives["refresh"]:
            assert collectives["counts"] == {} and sizes == [], step
            continue
        # Every collective is a c10d all-reduce of at most n entries (column scores, finiteness
        # counts, protect's energies): no all-gather, no DTensor redistribution.
        assert collectives["counts"] == {"c10d.allreduce_": len(sizes)}, step
        assert max(sizes) <= max(columns) and sum(sizes) < smallest_weight, (step, sizes)
        if name != "random":  # the random projector's basis needs no scores
            assert columns <= set(sizes), (step, sizes)


def test_fsdp_wide_weights_compress_columns_and_ranks_agree(fsdp_results):
    fsdp, hsdp = fsdp_results["wide-fsdp"], fsdp_results["wide-hsdp"]
    for result in (fsdp, hsdp):
        for index0, index1 in result["subspaces"]:
            assert torch.equal(index0, index1)
            assert index0.shape == (4,)  # rank 4 of the columns; the 1 x 128 head has one row
        before, after = result["losses"]
        assert after < 0.9 * before, (before, after)
    assert set(hsdp["placements"]) == {"(Replicate(), Shard(dim=0))"}
    # Rank 1 holds no row of the head (an empty shard) and still joins each score all-reduce.
    assert [shapes[2] for shapes in fsdp["local_shapes"]] == [
        ((1, 128), (1, 4)),
        ((0, 128), (0, 4)),
    ]
    torch.testing.assert_close(fsdp["params"], hsdp["params"], rtol=0, atol=1e-5)
    for (fsdp_index, _), (hsdp_index, _) in zip(fsdp["subspaces"], hsdp["subspaces"]):
        assert torch.equal(fsdp_index, hsdp_index)
