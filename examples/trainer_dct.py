"""Train a transformers model with ``DCTProjectedAdam`` under ``Trainer``: save, resume, equal runs.

A tiny Llama language model (random init, seeded) is trained with
``DCTProjectedAdam(optim.param_groups(model, "all-linear", rank=..., update_gap=...))``: every
linear weight but the LM head steps in a ``rank``-column DCT subspace refreshed every
``update_gap`` steps, everything else (embeddings, norms, LM head) as AdamW. This is what
transformers' ``optim_target_modules`` does for its GaLore optimizers, here passed to ``Trainer``
as ``optimizers=(optimizer, None)`` (``Trainer`` adds its linear learning-rate schedule).

``Trainer`` saves a checkpoint every ``--save-every`` steps (its ``optimizer.pt`` holds the
projector state as tensors). A second ``Trainer``, with a fresh model and optimizer, resumes from
the first checkpoint: its losses after the checkpoint and its final parameters equal the
uninterrupted run's, bit for bit, also where the resume point falls between two subspace
refreshes.

Run ``.venv/bin/python examples/trainer_dct.py`` (a few seconds on one core).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from optim import DCTProjectedAdam, param_groups

VOCAB = 64
LENGTH = 16


def pretrained() -> LlamaForCausalLM:
    """A seeded random init, the same at every call."""
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


class CountingTask(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: next-token prediction."""

    def __init__(self, size: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, VOCAB, (size, 1), generator=generator)
        self.tokens = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def make_trainer(
    output_dir: Path, steps: int, save_every: int, rank: int, update_gap: int
) -> tuple[Trainer, LlamaForCausalLM]:
    model = pretrained()
    optimizer = DCTProjectedAdam(
        param_groups(model, "all-linear", rank=rank, update_gap=update_gap), lr=1e-2
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        save_steps=save_every,
        per_device_train_batch_size=8,
        logging_steps=1,
        seed=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=CountingTask(), optimizers=(optimizer, None)
    )
    return trainer, model


def step_losses(trainer: Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def run(
    output_dir: Path, steps: int, save_every: int, rank: int, update_gap: int
) -> dict[str, object]:
    uninterrupted, model = make_trainer(output_dir, steps, save_every, rank, update_gap)
    uninterrupted.train()

    resumed, resumed_model = make_trainer(
        output_dir / "resumed", steps, save_every, rank, update_gap
    )
    resumed.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{save_every}"))
    losses, continued = step_losses(uninterrupted), step_losses(resumed)
    after = [step for step in losses if step > save_every]
    assert [continued[step] for step in after] == [losses[step] for step in after], "losses differ"
    resumed_state = resumed_model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed_state[name]), f"resumed run differs in {name}"
    projected = sum(param.numel() for param in uninterrupted.optimizer.param_groups[0]["params"])
    total = sum(param.numel() for param in model.parameters())
    return {"losses": losses, "projected": projected, "total": total}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    parser.add_argument("--save-every", type=int, default=5, help="checkpoint interval (default 5)")
    parser.add_argument("--rank", type=int, default=4, help="DCT subspace rank (default 4)")
    parser.add_argument(
        "--update-gap", type=int, default=3, help="steps between refreshes (default 3)"
    )
    parser.add_argument(
        "--output-dir", type=Path, help="where checkpoints go (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.save_every < args.steps:
        parser.error("--save-every must be in (0, --steps): the resume needs an earlier checkpoint")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or Path(scratch)
        result = run(output_dir, args.steps, args.save_every, args.rank, args.update_gap)
    losses = result["losses"]
    print(
        f"{result['projected']:,} of {result['total']:,} parameters step in "
        f"rank-{args.rank} DCT subspaces"
    )
    print(f"loss {losses[1]:.4f} (step 1) -> {losses[args.steps]:.4f} (step {args.steps})")
    print(
        f"resumed from checkpoint-{args.save_every} (refreshes every {args.update_gap} steps): "
        "losses and parameters equal the uninterrupted run"
    )
    return result


if __name__ == "__main__":
    main()
