"""An adapter under FSDP2 with accelerate: two ranks train it like one process, and save it.

A tiny Llama language model (random init, seeded) gets ``LieParam`` adapters on every linear
layer but the LM head (``decomp.adapters.apply(model, LieParam, "all-linear")``) and is sharded
with FSDP2 (``fully_shard``) the way accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2,
auto_wrap_policy="transformer_based_wrap")`` shards it: each ``LlamaDecoderLayer``, then the root.
``--ranks`` processes (default 2) each train on their share of a fixed batch, with
``accelerator.backward`` and the optimizer ``accelerator.prepare`` wraps; then

* the trained adapter tensors, gathered, equal the single-process run on the whole batch (fp32
  rounding: FSDP averages the ranks' gradients);
* ``save_adapter`` on the sharded model (every rank calls it: it gathers only the adapter
  tensors, rank 0 writes) gives a file that ``load_adapter`` puts into a fresh, unsharded copy
  of the pretrained model, whose logits are the single-process run's.

On GPUs (one per rank) the plugin itself shards the model: ``accelerator.prepare(model,
optimizer)``. On CPU it cannot: accelerate 1.16 turns the plugin on only for accelerator
devices (``DistributedType.MULTI_GPU``, ``MULTI_XPU``, ...); a CPU run (``Accelerator(cpu=True)``,
gloo) is ``DistributedType.MULTI_CPU``, where the plugin is ignored without a warning and
``prepare(model)`` would wrap the model in ``DistributedDataParallel``. So on CPU this example
calls ``fully_shard`` itself, as the plugin would, and hands accelerate only the optimizer.

Run ``.venv/bin/python examples/accelerate_fsdp.py`` (two CPU processes, gloo, about 10 s); the
processes are started with ``torch.multiprocessing`` and the environment variables
``accelerate launch``/``torchrun`` would set.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from decomp.adapters import LieParam, apply, load_adapter, save_adapter, trainable_parameters

VOCAB = 64
LENGTH = 8
PER_RANK = 2
STEPS = 3
LR = 1e-2
# FSDP averages the ranks' gradients where one process averages the whole batch: equal up to
# fp32 rounding, which Adam's normalised steps can grow by a few ulps per step.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def pretrained() -> LlamaForCausalLM:
    """A seeded random init, the same in every process."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config)


def adapted() -> nn.Module:
    torch.manual_seed(1)  # adapters with a random init draw it alike in every process
    return apply(pretrained(), LieParam, "all-linear", rank=2)


def tokens(world: int) -> torch.Tensor:
    """The whole batch; rank ``r`` trains on rows ``r * PER_RANK`` to ``(r + 1) * PER_RANK``."""
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCAB, (world * PER_RANK, LENGTH), generator=generator)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole: FSDP2's shards (DTensors) gathered, a collective."""
    return {
        name: (param.full_tensor() if isinstance(param, DTensor) else param).detach().cpu().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def shard_like_the_plugin(model: nn.Module, device_type: str) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root: the plugin's transformer_based_wrap."""
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    accelerator = Accelerator(cpu=not on_gpu, fsdp_plugin=plugin)
    model = adapted()
    if accelerator.distributed_type == DistributedType.FSDP:
        # prepare shards the model and points the optimizer at the sharded parameters.
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        # fully_shard replaces each Parameter by a sharded one: the optimizer comes after it.
        model = shard_like_the_plugin(model, accelerator.device.type)
        optimizer = accelerator.prepare(torch.optim.AdamW(trainable_parameters(model), lr=LR))
    batch = tokens(world)[rank * PER_RANK : (rank + 1) * PER_RANK].to(accelerator.device)
    for _ in range(STEPS):
        optimizer.zero_grad()
        accelerator.backward(lm_loss(model, batch))
        optimizer.step()
    result = {"tensors": trained(model), "distributed_type": str(accelerator.distributed_type)}
    save_adapter(model, os.path.join(out, "adapter.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(result, os.path.join(out, "sharded.pt"))
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def one_process(world: int) -> nn.Module:
    """The oracle: the whole batch in one process (the mean of the ranks' equal-sized losses)."""
    model = adapted()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR)
    batch = tokens(world)
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses = [lm_loss(model, part) for part in batch.split(PER_RANK)]
        (sum(losses) / world).backward()
        optimizer.step()
    return model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(world: int, out: Path) -> dict[str, object]:
    mp.spawn(worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    sharded = torch.load(out / "sharded.pt", weights_only=True)
    oracle = one_process(world)
    expected = trained(oracle)
    assert sharded["tensors"].keys() == expected.keys()
    initial = trained(adapted())
    moved = max(float((expected[name] - initial[name]).abs().max()) for name in expected)
    assert moved > 1e-3, "training did not move the adapters: the comparison would be vacuous"
    for name, value in expected.items():
        torch.testing.assert_close(sharded["tensors"][name], value, **TOLERANCE, msg=name)
    reloaded = load_adapter(pretrained(), out / "adapter.safetensors")
    with torch.no_grad():
        batch = tokens(world)
        gap = float((reloaded(input_ids=batch).logits - oracle(input_ids=batch).logits).abs().max())
    assert gap < 1e-4, f"reloaded adapter's logits differ from the single process's by {gap}"
    return {
        "distributed_type": sharded["distributed_type"],
        "trained": len(expected),
        "adapter_bytes": (out / "adapter.safetensors").stat().st_size,
        "logit_gap": gap,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error("--ranks must be at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        result = run(args.ranks, Path(scratch))
    print(f"{args.ranks} ranks ({result['distributed_type']}), FSDP2: {result['trained']} adapter "
          "tensors trained like one process")
    print(f"adapter saved from the sharded model: {result['adapter_bytes']:,} bytes; in a fresh "
          f"pretrained model its logits are within {result['logit_gap']:.1e} of one process's")
    return result


if __name__ == "__main__":
    main()
