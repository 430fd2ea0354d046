"""Fine-tune through peft: our adapters next to peft's LoRA, in one plain torch loop.

A tiny ConvNeXt classifier (transformers config, random init, seeded: it stands in for
``from_pretrained``) is fine-tuned on a fixed synthetic batch, once per peft config:

* peft's LoRA on the pointwise linear layers (``pwconv1``, ``pwconv2``);
* ``LDUParam`` on the same layers, through peft (``DecompConfig``);
* ``AtomParam`` on the depthwise 7x7 convs (``dwconv``), where LoRA raises (its rank must be
  divisible by the conv's groups).

Each run trains the classifier in full (``modules_to_save``), then ``save_pretrained`` ->
``PeftModel.from_pretrained`` into a fresh pretrained model (the logits must be equal) and
``merge_and_unload`` (a plain ConvNeXt again). The table shows trainable numbers, the loss before
and after, the adapter folder's size and both checks.

Run ``.venv/bin/python examples/peft_finetune.py`` (a few seconds on one core).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import ConvNextConfig, ConvNextForImageClassification

from decomp.adapters.peft import DecompConfig

CLASSES = 4


def pretrained() -> ConvNextForImageClassification:
    """The "pretrained" network: a seeded random init, the same at every call."""
    torch.manual_seed(0)
    config = ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=CLASSES, layer_scale_init_value=1.0
    )
    return ConvNextForImageClassification(config)


def configs() -> dict[str, PeftConfig]:
    pointwise = ["pwconv1", "pwconv2"]
    return {
        "LoRA r=4 (peft)": LoraConfig(r=4, target_modules=pointwise, modules_to_save=["classifier"]),
        "LDUParam (ours, via peft)": DecompConfig(
            method="LDUParam", target_modules=pointwise, modules_to_save=["classifier"]
        ),
        "AtomParam on dwconv (ours, via peft)": DecompConfig(
            method="AtomParam", options={"num_atoms": 9}, target_modules=["dwconv"],
            modules_to_save=["classifier"],
        ),
    }


def fine_tune(name: str, config: PeftConfig, steps: int, folder: Path) -> dict[str, object]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 32, 32, generator=generator)
    labels = torch.randint(0, CLASSES, (16,), generator=generator)
    model = get_peft_model(pretrained(), config)
    trainable = model.get_nb_trainable_parameters()[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        tuned = model(images).logits
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(pretrained(), folder).eval()
        reload_equal = torch.equal(reloaded(images).logits, tuned)
        merged = model.merge_and_unload()
        merge_error = (merged(images).logits - tuned).abs().max().item()
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    return {
        "method": name, "trainable": trainable, "first loss": losses[0], "last loss": losses[-1],
        "folder bytes": size, "reload equal": reload_equal, "merge max error": merge_error,
        "plain model": type(merged).__name__,
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for index, (name, config) in enumerate(configs().items()):
            rows.append(fine_tune(name, config, args.steps, Path(root) / str(index)))
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        cells = [f"{value:.4g}" if isinstance(value, float) else str(value) for value in row.values()]
        print(" | ".join(cells))
    return rows


if __name__ == "__main__":
    main()
