"""Fine-tune a transformers model with an adapter under ``Trainer``: save, resume, reload.

A tiny Llama sequence classifier (random init, seeded: it stands in for ``from_pretrained``)
gets ``LieParam`` adapters on its attention projections (``decomp.adapters.apply``) and a
trained classification head (``train_heads=["score"]``). ``Trainer`` runs ``--steps`` steps and
saves a checkpoint every ``--save-every``; :class:`decomp.adapters.hf.AdapterCheckpointCallback`
writes ``adapter.safetensors`` (adapters + head) into each checkpoint folder. Then

1. resume: a second ``Trainer`` on a fresh adapted model resumes from the first checkpoint; its
   losses after the checkpoint and its final parameters equal the uninterrupted run's, bit for
   bit;
2. reload: the last checkpoint's adapter file loads (``load_adapter``) into a fresh copy of the
   pretrained model, which then gives the tuned model's logits exactly.

The table compares the adapter file with ``Trainer``'s whole-model checkpoint.

Run ``.venv/bin/python examples/trainer_adapter.py`` (a few seconds on one core).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from decomp.adapters import LieParam, apply, load_adapter
from decomp.adapters.hf import AdapterCheckpointCallback

VOCAB = 64
LENGTH = 8
CLASSES = 2


def pretrained() -> LlamaForSequenceClassification:
    """The "pretrained" network: a seeded random init, the same at every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def adapted() -> LlamaForSequenceClassification:
    return apply(pretrained(), LieParam, target=["q_proj", "v_proj"], train_heads=["score"], rank=2)


class FirstTokenTask(torch.utils.data.Dataset):
    """Token sequences (no padding token) labelled by which half of the vocabulary starts them."""

    def __init__(self, size: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(1, VOCAB, (size, LENGTH), generator=generator)
        self.labels = (self.tokens[:, 0] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.labels[index]}


def make_trainer(model: torch.nn.Module, output_dir: Path, steps: int, save_every: int) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        save_steps=save_every,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        seed=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=FirstTokenTask(),
        callbacks=[AdapterCheckpointCallback()],
    )


def step_losses(trainer: Trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def run(output_dir: Path, steps: int, save_every: int) -> dict[str, object]:
    tuned = adapted()
    uninterrupted = make_trainer(tuned, output_dir, steps, save_every)
    uninterrupted.train()

    resumed_model = adapted()
    resumed = make_trainer(resumed_model, output_dir / "resumed", steps, save_every)
    resumed.train(resume_from_checkpoint=str(output_dir / f"checkpoint-{save_every}"))
    losses, continued = step_losses(uninterrupted), step_losses(resumed)
    after = [step for step in losses if step > save_every]
    assert [continued[step] for step in after] == [losses[step] for step in after], "losses differ"
    resumed_state = resumed_model.state_dict()
    for name, value in tuned.state_dict().items():
        assert torch.equal(value, resumed_state[name]), f"resumed run differs in {name}"

    checkpoint = Path(get_last_checkpoint(str(output_dir)))
    reloaded = load_adapter(pretrained(), checkpoint / "adapter.safetensors")
    inputs = FirstTokenTask().tokens[:16]
    tuned.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, tuned(inputs).logits), "reloaded model differs"
    return {
        "losses": losses,
        "adapter_bytes": (checkpoint / "adapter.safetensors").stat().st_size,
        "checkpoint_bytes": (checkpoint / "model.safetensors").stat().st_size,
        "checkpoint": checkpoint.name,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    parser.add_argument("--save-every", type=int, default=4, help="checkpoint interval (default 4)")
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
        result = run(args.output_dir or Path(scratch), args.steps, args.save_every)
    losses = result["losses"]
    print(f"loss {losses[1]:.4f} (step 1) -> {losses[args.steps]:.4f} (step {args.steps})")
    print(
        f"resumed from checkpoint-{args.save_every}: "
        "losses and parameters equal the uninterrupted run"
    )
    print(
        f"{result['checkpoint']}/adapter.safetensors in a fresh pretrained model: "
        "the tuned logits"
    )
    print(f"{'file':<20} {'bytes':>10}")
    print(f"{'adapter.safetensors':<20} {result['adapter_bytes']:>10,}")
    print(f"{'model.safetensors':<20} {result['checkpoint_bytes']:>10,}")
    return result


if __name__ == "__main__":
    main()
