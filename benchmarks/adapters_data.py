"""The adapters benchmark's task: offline digits, a small ResNet-style CNN and its pretraining.

Data: scikit-learn's handwritten digits (1797 grey 8x8 images, shipped with the package, so
nothing is downloaded), upsampled to 32x32 bilinearly and normalised by the mean and standard
deviation of the pretraining images. Digits 0-4 pretrain the network (80% train / 20% test per
class); digits 5-9, relabelled 0-4, are the downstream task: half of each class is the pool the
few-shot sampler draws ``shots`` examples per class from, the other half a fixed test set. Every
split is a fixed function of :data:`SPLIT_SEED`, so only the few-shot draw depends on the run's
seed.

Model: :class:`SmallResNet` -- a strided conv stem, two basic residual blocks (3x3 convs + BN, the
second downsampling with a 1x1 projection shortcut), a depthwise-separable residual block (3x3
depthwise conv + 1x1 pointwise conv), global average pooling and a linear head. Every conv and
linear type the adapters claim to handle is there except dilation, which peft's LoRA cannot run.

:func:`pretrained` loads the checkpoint both fine-tuning benchmarks start from
(``benchmarks/results/``, gitignored), pretraining and writing it on first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGE_SIZE",
    "SPLIT_SEED",
    "Dataset",
    "DigitsSplit",
    "SmallResNet",
    "accuracy",
    "few_shot",
    "fine_tuning_model",
    "pretrained",
    "load_checkpoint",
    "load_digits_split",
    "pretrain",
    "save_checkpoint",
    "validation_set",
]

SPLIT_SEED = 0
IMAGE_SIZE = 32
PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
FINETUNE_DIGITS = (5, 6, 7, 8, 9)
PRETRAIN_TRAIN_FRACTION = 0.8
FINETUNE_POOL_FRACTION = 0.5


@dataclass(frozen=True)
class Dataset:
    """Images ``(n, 1, IMAGE_SIZE, IMAGE_SIZE)`` float32 and labels ``(n,)`` int64 in ``0..4``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass(frozen=True)
class DigitsSplit:
    """The four fixed splits: pretraining train/test on digits 0-4, fine-tuning pool/test on 5-9."""

    pretrain_train: Dataset
    pretrain_test: Dataset
    finetune_pool: Dataset
    finetune_test: Dataset


def _split_per_class(images: torch.Tensor, labels: torch.Tensor, first_fraction: float) -> tuple[Dataset, Dataset]:
    """Split every class at ``first_fraction`` of its (seeded, shuffled) examples."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    first, second = [], []
    for label in labels.unique(sorted=True):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        cut = round(first_fraction * members.numel())
        first.append(members[:cut])
        second.append(members[cut:])
    first_index, second_index = torch.cat(first), torch.cat(second)
    return (Dataset(images[first_index], labels[first_index]), Dataset(images[second_index], labels[second_index]))


def load_digits_split(image_size: int = IMAGE_SIZE) -> DigitsSplit:
    """sklearn's digits, upsampled to ``image_size`` squared and normalised, in the four splits.

    Fine-tuning labels are the digit minus 5, so both tasks are 5-way with labels ``0..4``.

    >>> split = load_digits_split()
    >>> split.finetune_test.images.shape[1:], sorted(split.finetune_pool.labels.unique().tolist())
    (torch.Size([1, 32, 32]), [0, 1, 2, 3, 4])
    """
    from sklearn.datasets import load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8), got {image_size!r}")
    pixels, digits = load_digits(return_X_y=True)
    small = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    digits = torch.as_tensor(digits, dtype=torch.int64)
    is_pretrain = digits < len(PRETRAIN_DIGITS)
    mean, std = images[is_pretrain].mean(), images[is_pretrain].std()
    images = (images - mean) / std
    pretrain_train, pretrain_test = _split_per_class(
        images[is_pretrain], digits[is_pretrain], PRETRAIN_TRAIN_FRACTION
    )
    finetune_pool, finetune_test = _split_per_class(
        images[~is_pretrain], digits[~is_pretrain] - len(PRETRAIN_DIGITS), FINETUNE_POOL_FRACTION
    )
    return DigitsSplit(pretrain_train, pretrain_test, finetune_pool, finetune_test)


def _drawn(pool: Dataset, first: int, stop: int, seed: int) -> Dataset:
    """Positions ``first:stop`` of a seeded random order of every class of ``pool``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(int(pool.labels.max()) + 1):
        members = torch.nonzero(pool.labels == label).flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[first:stop]])
    index = torch.cat(chosen)
    return Dataset(pool.images[index], pool.labels[index])


def _check_count(name: str, value: object, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an int in [1, {high}] (the smallest class of the pool), got {value!r}")


def few_shot(pool: Dataset, shots: int, seed: int) -> Dataset:
    """``shots`` examples of every class of ``pool``, without replacement; a function of ``seed``.

    >>> split = load_digits_split()
    >>> len(few_shot(split.finetune_pool, 3, seed=1))
    15
    """
    _check_count("shots", shots, int(torch.bincount(pool.labels).min()))
    return _drawn(pool, 0, shots, seed)


def validation_set(pool: Dataset, shots: int, per_class: int, seed: int) -> Dataset:
    """``per_class`` examples of every class of ``pool`` that :func:`few_shot` ``(pool, shots,
    seed)`` did not draw: the next ones of the same random order, so the two sets are disjoint.

    Learning rates are chosen on this set (as VTAB-1k's 200 validation images beside its 800
    training ones), never on the test set.

    >>> split = load_digits_split()
    >>> len(validation_set(split.finetune_pool, 3, 4, seed=1))
    20
    """
    smallest = int(torch.bincount(pool.labels).min())
    _check_count("shots", shots, smallest)
    _check_count("shots + per_class", shots + per_class if isinstance(per_class, int) else per_class, smallest)
    return _drawn(pool, shots, shots + per_class, seed)


# --------------------------------------------------------------------------- the network


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (1x1 projection if the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DepthwiseBlock(nn.Module):
    """Depthwise 3x3 conv (``groups = channels``), pointwise 1x1 conv, each with BN; residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.depthwise(x)))
        return F.relu(self.bn2(self.pointwise(out)) + x)


class SmallResNet(nn.Module):
    """A ResNet-style CNN for ``(n, 1, H, W)`` images: logits ``(n, num_classes)``.

    Layers (``w = width``): ``stem`` conv 1->w 3x3, stride 2 (it halves the cost of every later
    layer; the upsampled digits carry no detail at full resolution); ``block1`` basic block w->w;
    ``block2`` basic block w->2w, stride 2; ``block3`` depthwise-separable block on 2w; global
    average pool; ``head`` linear 2w->num_classes (the only linear layer, replaced for the
    downstream task).

    >>> SmallResNet(num_classes=5, width=8)(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 5])
    """

    def __init__(self, num_classes: int = 5, width: int = 32) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.width = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width, stride=2)
        self.block3 = DepthwiseBlock(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled ``(n, 2 * width)`` features the head reads."""
        return self.block3(self.block2(self.block1(self.stem(x)))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in percent (the model's train/eval mode is kept)."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.images[start : start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == data.labels[start : start + batch_size]).sum())
    return 100.0 * correct / len(data)


def pretrain(
    split: DigitsSplit,
    *,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
) -> tuple[SmallResNet, float]:
    """Train a :class:`SmallResNet` on digits 0-4; returns it (in eval mode) and its test accuracy.

    Adam with a cosine learning-rate schedule; the weights and the batch order are functions of
    ``seed`` (and of the thread count, through floating-point summation order).
    """
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=len(PRETRAIN_DIGITS), width=width)
    data = split.pretrain_train
    steps_per_epoch = math.ceil(len(data) / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.images[batch]), data.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, accuracy(model, split.pretrain_test)


def save_checkpoint(model: SmallResNet, path: str | Path, **metadata: float | str) -> None:
    """Write ``model``'s state dict, width and class count (and ``metadata``) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "width": model.width,
            "num_classes": model.head.out_features,
            "metadata": dict(metadata),
        },
        path,
    )


def load_checkpoint(path: str | Path) -> tuple[SmallResNet, dict[str, float | int | str]]:
    """The pretrained model (eval mode) and the metadata saved with it; ``weights_only`` loading."""
    checkpoint = torch.load(Path(path), weights_only=True)
    model = SmallResNet(num_classes=checkpoint["num_classes"], width=checkpoint["width"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint["metadata"]


CHECKPOINT = Path(__file__).resolve().parent / "results" / "adapters_pretrained.pt"
PRETRAIN_EPOCHS = 10


@functools.cache
def pretrained(quick: bool) -> tuple[dict[str, torch.Tensor], int, dict[str, float | int | str]]:
    """The pretrained CNN both fine-tuning benchmarks start from: state dict, width, metadata.

    A full run loads :data:`CHECKPOINT`, pretraining (seed 0, :data:`PRETRAIN_EPOCHS` epochs) and
    saving it first if it is missing; ``quick`` pretrains a width-8 network for one epoch in
    memory. Built once per process; callers load the state into a fresh :class:`SmallResNet`.
    """
    split = load_digits_split()
    if quick:
        model, test_accuracy = pretrain(split, epochs=1, width=8)
        return model.state_dict(), model.width, {"epochs": 1, "test_accuracy": test_accuracy}
    if not CHECKPOINT.exists():
        print(f"pretraining on digits 0-4 (no checkpoint at {CHECKPOINT}) ...", flush=True)
        model, test_accuracy = pretrain(split, epochs=PRETRAIN_EPOCHS)
        save_checkpoint(model, CHECKPOINT, test_accuracy=test_accuracy, epochs=PRETRAIN_EPOCHS, seed=0)
    model, metadata = load_checkpoint(CHECKPOINT)
    return model.state_dict(), model.width, dict(metadata)


def fine_tuning_model(quick: bool, num_classes: int, seed: int) -> SmallResNet:
    """A fresh copy of the pretrained backbone with a new ``num_classes`` head drawn from ``seed``."""
    state, width, _ = pretrained(quick)
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=num_classes, width=width)
    backbone = {key: value for key, value in state.items() if not key.startswith("head.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(not key.startswith("head.") for key in missing):
        raise RuntimeError(f"the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    return model
