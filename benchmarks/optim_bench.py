"""Benchmark the optimizers of :mod:`optim` against torch's AdamW and galore-torch's GaLoreAdamW.

Three parts, each a function of its settings (``--only micro,lm,cnn``):

1. ``micro`` -- one optimizer step on a single ``n x n`` fp32 parameter (``n = 4096``) whose
   gradient is fixed: torch AdamW (foreach and fused), ``GaLoreAdamW`` at rank 128, and our
   ``SVDProjectedAdam`` (randomized SVD) and ``DCTProjectedAdam`` at the same rank and scale. A
   projected optimizer's *refresh* step (a new subspace: GaLore's full SVD, our rsvd or DCT
   scores) is timed with a refresh gap of 1, its *steady* step (the cached subspace) with a gap
   larger than the run. Medians over ``--repeats`` steps after one untimed step (``--svd-repeats``
   for GaLore's refresh, about 17 s each on two CPU threads), and the optimizer-state bytes.
2. ``lm`` -- pretraining a byte-level LLaMA (:mod:`benchmarks.optim_data`, about 14M parameters)
   on the CPython standard library for a fixed token budget with AdamW, GaLoreAdamW,
   SVDProjectedAdam, DCTProjectedAdam, ARO and RotatedAdam: final train loss, validation loss,
   tokens/s, optimizer-step time, optimizer-state bytes and loss curves. The attention and MLP
   weights are the *hidden matrices*, the only parameters the methods treat differently; the
   embeddings, norms and head take AdamW at the base rate in every method (``rank=None`` groups
   in ours, a plain group in GaLore's, a second ``torch.optim.AdamW`` beside ARO/RotatedAdam).
3. ``cnn`` -- the adapters benchmark's CNN (:mod:`benchmarks.adapters_data`), pretrained on
   digits 0-4, fine-tuned on ``--cnn-shots`` examples per class of digits 5-9: AdamW full
   fine-tuning against DCTProjectedAdam and SVDProjectedAdam projecting the 4-D conv weights'
   gradients (viewed as ``(c_out, -1)``), and head-only AdamW for scale. Accuracy (mean +- std
   over seeds), optimizer-state bytes, step time.

Results go to a JSON file (``--out``); the docs section ``optim`` of ``docs/benchmarks.md`` and
its plots (``docs/img/optim_micro.png``, ``docs/img/optim_lm_loss.png``) are rendered from it.
A part that does not run keeps its earlier results from the JSON, and ``--merge FILE`` brings in
parts run elsewhere, so the CPU micro-benchmark and a GPU LM run end up on one page. Targets
are evaluated on what ran; misses are reported as measured and the script exits 0.
A method that cannot run is reported, not skipped silently: galore-torch imports bitsandbytes
(and transformers) when it is imported, and where either is missing its rows read "not
available".

Usage::

    python benchmarks/optim_bench.py --only micro,cnn --threads 2
    python benchmarks/optim_bench.py --only lm --device cuda --out lm.json --no-page
    python benchmarks/optim_bench.py --render --merge lm.json   # page from both runs
    python benchmarks/optim_bench.py --quick --threads 1        # smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file: make the repository root importable, as under ``python -m``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.adapters_data import (
    DigitsSplit,
    SmallResNet,
    accuracy,
    few_shot,
    load_checkpoint,
    load_digits_split,
    pretrain,
    save_checkpoint,
)
from benchmarks.harness import (
    Comparison,
    Environment,
    Target,
    Timing,
    cpu_model,
    environment,
    plot_ratios,
    render_section,
    set_threads,
    timeit,
    write_section,
)
from benchmarks.optim_data import (
    Corpus,
    LlamaShape,
    batch_starts,
    build_llama,
    gather_windows,
    load_corpus,
    split_tail,
    validation_windows,
)
from optim import DCTProjectedAdam, SVDProjectedAdam

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_JSON = RESULTS / "optim_bench.json"
DEFAULT_PAGE = REPO_ROOT / "docs" / "benchmarks.md"
# The adapters benchmark's checkpoint: both benchmarks fine-tune the same pretrained network.
CNN_CHECKPOINT = RESULTS / "adapters_pretrained.pt"
# The adapters benchmark's pretraining default, used if this script has to write the checkpoint.
CNN_PRETRAIN_EPOCHS = 10
SECTION = "optim"
PARTS = ("micro", "lm", "cnn")
MICRO_PLOT = "optim_micro.png"
LM_PLOT = "optim_lm_loss.png"

# The optimizers' targets.
MIN_REFRESH_SPEEDUP = 50.0
MAX_STEADY_RATIO = 1.0
MAX_STATE_RATIO = 1.1
MAX_LM_LOSS_RATIO = 1.02

# A refresh gap no run reaches: every step after the first reuses the first step's subspace.
STEADY_GAP = 10**9
MAX_CURVE_POINTS = 128
FINETUNE_CLASSES = 5

Optimizers = list[torch.optim.Optimizer]


# --------------------------------------------------------------------------- shared helpers


def state_tensors(value: object) -> list[torch.Tensor]:
    """The tensors an optimizer-state entry holds.

    A tensor is itself; galore-torch keeps its basis on a Python object in the state
    (``GaLoreProjector.ortho_matrix``, a tensor, or a list of two for ``proj_type="full"``),
    which counts too. Integers and other objects hold no tensor memory.
    """
    if isinstance(value, torch.Tensor):
        return [value]
    ortho = getattr(value, "ortho_matrix", None)
    if isinstance(ortho, torch.Tensor):
        return [ortho]
    if isinstance(ortho, (list, tuple)):
        return [tensor for tensor in ortho if isinstance(tensor, torch.Tensor)]
    return []


def state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> tuple[int, int]:
    """``(tensor bytes, storage bytes)`` of every optimizer's per-parameter state.

    Tensor bytes sum ``numel * element_size`` of each state tensor. Storage bytes sum the
    distinct storages behind them, which is what the state keeps alive: a view keeps its whole
    base (galore-torch's basis of an fp32 gradient is ``Vh[:rank]``, a view of the full
    ``n x n`` ``Vh``).
    """
    tensor_total = 0
    storages: dict[tuple[str, int], int] = {}
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                for tensor in state_tensors(value):
                    tensor_total += tensor.nbytes
                    storage = tensor.untyped_storage()
                    if storage.nbytes():
                        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return tensor_total, sum(storages.values())


def galore_adamw() -> type[torch.optim.Optimizer]:
    """galore-torch's ``GaLoreAdamW``; raises ImportError where it (or bitsandbytes) is missing."""
    from galore_torch import GaLoreAdamW  # imported on use: it pulls in transformers

    return GaLoreAdamW


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for the device's queued work (CUDA), or nothing (CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_model()})"


def run_record(device: torch.device, library_threads: str, quick: bool) -> dict[str, Any]:
    """What every part records about the run that produced it."""
    return {
        "env": asdict(environment(library_threads)),
        "device": describe_device(device),
        "quick": quick,
    }


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class TargetCheck:
    """One target that is not a time ratio (or is, restated): measured, met or not."""

    description: str
    measured: str
    met: bool | None  # None: its inputs did not run


def targets_table(checks: Sequence[TargetCheck]) -> str:
    verdict = {True: "yes", False: "**no**", None: "not run"}
    return markdown_table(
        ("Target", "Measured", "Met"),
        [(check.description, check.measured, verdict[check.met]) for check in checks],
    )


# --------------------------------------------------------------------------- 1. micro-benchmark


@dataclass(frozen=True)
class MicroSettings:
    """The micro-benchmark's parameter size ``n`` (an ``n x n`` matrix), rank and repeats."""

    size: int = 4096
    rank: int = 128
    scale: float = 0.25
    repeats: int = 9
    svd_repeats: int = 3
    seed: int = 0


MICRO_QUICK = MicroSettings(size=256, rank=16, repeats=2, svd_repeats=1)

MicroBuilder = Callable[[nn.Parameter, MicroSettings], torch.optim.Optimizer]


def _galore_micro(gap: int) -> MicroBuilder:
    def build(param: nn.Parameter, settings: MicroSettings) -> torch.optim.Optimizer:
        group = {
            "params": [param],
            "rank": settings.rank,
            "update_proj_gap": gap,
            "scale": settings.scale,
            "proj_type": "std",
        }
        return galore_adamw()([group], lr=1e-3, no_deprecation_warning=True)

    return build


def _ours_micro(cls: type[torch.optim.Optimizer], gap: int) -> MicroBuilder:
    def build(param: nn.Parameter, settings: MicroSettings) -> torch.optim.Optimizer:
        return cls([param], lr=1e-3, rank=settings.rank, update_gap=gap, scale=settings.scale)

    return build


# Every optimizer the micro-benchmark times, by row name.
MICRO_ROWS: dict[str, MicroBuilder] = {
    "AdamW (foreach)": lambda param, settings: torch.optim.AdamW([param], foreach=True),
    "AdamW (fused)": lambda param, settings: torch.optim.AdamW([param], fused=True),
    "GaLoreAdamW refresh": _galore_micro(1),
    "GaLoreAdamW steady": _galore_micro(STEADY_GAP),
    "SVDProjectedAdam refresh": _ours_micro(SVDProjectedAdam, 1),
    "SVDProjectedAdam steady": _ours_micro(SVDProjectedAdam, STEADY_GAP),
    "DCTProjectedAdam refresh": _ours_micro(DCTProjectedAdam, 1),
    "DCTProjectedAdam steady": _ours_micro(DCTProjectedAdam, STEADY_GAP),
}

# (ours, anchor, target): the rows of the timing table, in order.
MICRO_COMPARISONS: tuple[tuple[str, str, Target | None], ...] = (
    ("DCTProjectedAdam refresh", "GaLoreAdamW refresh", Target.speedup(MIN_REFRESH_SPEEDUP)),
    ("DCTProjectedAdam steady", "GaLoreAdamW steady", Target.ratio(MAX_STEADY_RATIO)),
    ("SVDProjectedAdam refresh", "GaLoreAdamW refresh", None),
    ("SVDProjectedAdam steady", "GaLoreAdamW steady", None),
    ("DCTProjectedAdam steady", "AdamW (foreach)", None),
    ("DCTProjectedAdam steady", "AdamW (fused)", None),
    ("GaLoreAdamW steady", "AdamW (foreach)", None),
)


def time_micro_row(
    build: MicroBuilder,
    settings: MicroSettings,
    weight: torch.Tensor,
    grad: torch.Tensor,
    repeats: int,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """Median ``step()`` time of a fresh optimizer on a copy of ``weight`` with gradient ``grad``.

    The untimed first step creates the state (and, for every projected optimizer, computes the
    first subspace); the state bytes are read after the timed steps.
    """
    param = nn.Parameter(weight.clone())
    param.grad = grad.clone()
    optimizer = build(param, settings)
    timing = timeit(optimizer.step, repeats=repeats, warmup=1, sync=sync)
    tensor_bytes, storage = state_bytes([optimizer])
    return {
        "status": "ok",
        "timing": asdict(timing),
        "state_bytes": tensor_bytes,
        "storage_bytes": storage,
    }


def run_micro(settings: MicroSettings, device: torch.device) -> dict[str, Any]:
    """Every row of :data:`MICRO_ROWS` on one ``size x size`` fp32 parameter on ``device``.

    A row whose optimizer is missing (galore-torch not installed) or fails records why.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    weight = torch.randn(settings.size, settings.size, generator=generator).div_(settings.size**0.5)
    grad = torch.randn(settings.size, settings.size, generator=generator)
    weight, grad = weight.to(device), grad.to(device)
    sync = synchronizer(device)
    rows: dict[str, dict[str, Any]] = {}
    for name, build in MICRO_ROWS.items():
        repeats = settings.svd_repeats if name == "GaLoreAdamW refresh" else settings.repeats
        print(f"micro: {name} ...", flush=True)
        try:
            rows[name] = time_micro_row(build, settings, weight, grad, repeats, sync)
        except ImportError as error:
            rows[name] = {"status": f"not available: {error}"}
        except Exception as error:  # noqa: BLE001 -- a report: one failing row must not end the run
            rows[name] = {"status": f"failed: {type(error).__name__}: {error}"}
        print(f"  {rows[name]['status']}", flush=True)
    return {"settings": asdict(settings), "rows": rows}


def _timing(rows: dict[str, Any], name: str) -> Timing | None:
    row = rows.get(name, {})
    return Timing(**row["timing"]) if row.get("status") == "ok" else None


def micro_comparisons(micro: dict[str, Any]) -> list[Comparison]:
    """The timing rows of :data:`MICRO_COMPARISONS` whose two sides both ran."""
    rows = micro["rows"]
    comparisons = []
    for ours, anchor, target in MICRO_COMPARISONS:
        ours_timing, anchor_timing = _timing(rows, ours), _timing(rows, anchor)
        if ours_timing is not None and anchor_timing is not None:
            comparisons.append(Comparison(ours, ours_timing, anchor, anchor_timing, target))
    return comparisons


def micro_checks(micro: dict[str, Any] | None) -> list[TargetCheck]:
    """Refresh speed-up, steady ratio and state bytes of DCTProjectedAdam against GaLoreAdamW."""
    rows = {} if micro is None else micro["rows"]
    checks = []
    for ours, anchor, target in MICRO_COMPARISONS[:2]:
        description = f"{ours} step: {target.describe()} vs {anchor}"
        ours_timing, anchor_timing = _timing(rows, ours), _timing(rows, anchor)
        if ours_timing is None or anchor_timing is None:
            checks.append(TargetCheck(description, "not run", None))
            continue
        comparison = Comparison(ours, ours_timing, anchor, anchor_timing, target)
        measured = (
            f"{comparison.speedup:.3g}x" if target.kind == "speedup" else f"{comparison.ratio:.3g}"
        )
        checks.append(TargetCheck(description, measured, comparison.met))
    description = f"DCTProjectedAdam state bytes <= {MAX_STATE_RATIO:g}x GaLoreAdamW's"
    dct, galore = rows.get("DCTProjectedAdam steady", {}), rows.get("GaLoreAdamW steady", {})
    if dct.get("status") == "ok" and galore.get("status") == "ok":
        ratio = dct["state_bytes"] / galore["state_bytes"]
        checks.append(TargetCheck(description, f"{ratio:.3g}x", ratio <= MAX_STATE_RATIO))
    else:
        checks.append(TargetCheck(description, "not run", None))
    return checks


def micro_state_table(micro: dict[str, Any]) -> str:
    """Optimizer-state MiB per optimizer (the steady instance of the projected ones)."""
    rows = micro["rows"]
    names = (
        "AdamW (foreach)",
        "GaLoreAdamW steady",
        "SVDProjectedAdam steady",
        "DCTProjectedAdam steady",
    )
    galore = rows.get("GaLoreAdamW steady", {})
    cells = []
    for name in names:
        row = rows.get(name, {})
        if row.get("status") != "ok":
            cells.append((name.removesuffix(" steady"), row.get("status", "not run"), "-", "-"))
            continue
        versus = "-"
        if galore.get("status") == "ok":
            versus = f"{row['state_bytes'] / galore['state_bytes']:.3g}x"
        cells.append(
            (
                name.removesuffix(" steady"),
                mib(row["state_bytes"]),
                mib(row["storage_bytes"]),
                versus,
            )
        )
    return markdown_table(
        ("Optimizer", "State MiB (tensors)", "State MiB (storage kept alive)", "vs GaLoreAdamW"),
        cells,
    )


def micro_notes(micro: dict[str, Any]) -> list[str]:
    settings = MicroSettings(**micro["settings"])
    n, rank = settings.size, settings.rank
    return [
        (
            f"One fp32 parameter W ({n}x{n}, Gaussian / sqrt(n)) with a fixed Gaussian gradient; "
            "each row times `optimizer.step()` of a fresh optimizer at lr 1e-3 and default "
            f"betas/eps. Projected optimizers: rank {rank}, scale {settings.scale:g}; GaLoreAdamW "
            "as in its reference (`proj_type='std'`, a full `torch.linalg.svd` per refresh); "
            "SVDProjectedAdam with its default randomized SVD (`decomp.rsvd`); DCTProjectedAdam "
            "with its defaults (L2 column scores by FFT, `moments='rotate'`)."
        ),
        (
            "*refresh*: refresh gap 1, so every step picks a new subspace; *steady*: gap "
            f"{STEADY_GAP:g}, so every timed step reuses the first step's subspace. GaLore's "
            f"refresh is timed over {settings.svd_repeats} steps, every other row over "
            f"{settings.repeats}."
        ),
        (
            "State bytes: the tensors in `optimizer.state` after the timed steps, plus "
            "galore-torch's projector basis, which it keeps on a Python object in the state. "
            "*Storage kept alive* counts the distinct storages behind them: galore-torch's basis "
            "for an fp32 gradient is `Vh[:rank]`, a view that keeps the whole n x n `Vh` of its "
            "SVD alive."
        ),
    ]


# --------------------------------------------------------------------------- 2. LM pretraining


@dataclass(frozen=True)
class LMSettings:
    """The LM run: model, budget, and every optimizer's hyper-parameters (same schedule for all)."""

    shape: LlamaShape = dataclasses.field(default_factory=LlamaShape)
    batch_size: int = 32
    # 512 steps: all six methods in about 5 minutes on one H100 (bf16 autocast), ARO and
    # RotatedAdam taking about half of it.
    tokens: int = 2**22
    # AdamW's rate: the best of 1e-3, 2e-3 and 4e-3 in a probe at this budget (H100, seed 0).
    base_lr: float = 1e-3
    # GaLore's reference LLaMA recipe: lr 0.01 with scale 0.25 on the projected matrices.
    projected_lr: float = 1e-2
    aro_lr: float = 1e-3
    rotated_lr: float = 1e-3
    rank_fraction: float = 0.25
    scale: float = 0.25
    update_gap: int = 200
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    clip_norm: float = 1.0
    val_fraction: float = 0.01
    max_val_windows: int = 256
    tail_steps: int = 50
    seed: int = 0
    autocast: bool = False
    methods: tuple[str, ...] = ("adamw", "galore", "svd", "dct", "aro", "rotated")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.shape.seq_len

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))

    @property
    def galore_rank(self) -> int:
        # Every hidden matrix has ``hidden`` as its smaller side (intermediate >= hidden), so this
        # is the rank our optimizers resolve from the fraction.
        return max(1, int(self.rank_fraction * self.shape.hidden))


LM_QUICK = LMSettings(
    shape=LlamaShape(hidden=32, layers=2, heads=2, intermediate=64, seq_len=32),
    batch_size=4,
    tokens=4 * 32 * 12,
    update_gap=4,
    max_val_windows=8,
    tail_steps=4,
)


def lr_factor(step: int, steps: int, warmup: int, final: float) -> float:
    r"""The schedule every method shares: linear warm-up, then cosine decay to ``final``.

    .. math::

        f(t) = \frac{t+1}{w}\ (t < w), \qquad
        f(t) = f_\infty + (1 - f_\infty)\,\tfrac12\big(1 + \cos(\pi \tfrac{t-w}{T-w})\big)

    >>> [round(lr_factor(t, 10, 2, 0.1), 3) for t in (0, 1, 2, 10)]
    [0.5, 1.0, 1.0, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def hidden_and_rest(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The attention and MLP weight matrices (GaLore's reference targets), and everything else."""
    hidden, rest = [], []
    for name, param in model.named_parameters():
        is_hidden = param.ndim == 2 and (".self_attn." in name or ".mlp." in name)
        (hidden if is_hidden else rest).append(param)
    return hidden, rest


def _aux_adamw(rest: list[nn.Parameter], settings: LMSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        rest, lr=settings.base_lr, betas=settings.betas, eps=settings.eps, weight_decay=0.0
    )


def build_lm_adamw(
    hidden: list[nn.Parameter], rest: list[nn.Parameter], settings: LMSettings
) -> Optimizers:
    return [_aux_adamw(hidden + rest, settings)]


def build_lm_galore(
    hidden: list[nn.Parameter], rest: list[nn.Parameter], settings: LMSettings
) -> Optimizers:
    projected = {
        "params": hidden,
        "lr": settings.projected_lr,
        "rank": settings.galore_rank,
        "update_proj_gap": settings.update_gap,
        "scale": settings.scale,
        "proj_type": "std",
    }
    optimizer = galore_adamw()(
        [projected, {"params": rest}],
        lr=settings.base_lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=0.0,
        no_deprecation_warning=True,
    )
    return [optimizer]


def _build_lm_projected(
    cls: type[torch.optim.Optimizer], **options: Any
) -> Callable[..., Optimizers]:
    def build(
        hidden: list[nn.Parameter], rest: list[nn.Parameter], settings: LMSettings
    ) -> Optimizers:
        groups = [{"params": hidden, "lr": settings.projected_lr}, {"params": rest, "rank": None}]
        settings_options = {
            "lr": settings.base_lr,
            "rank": settings.rank_fraction,
            "update_gap": settings.update_gap,
            "scale": settings.scale,
            "betas": settings.betas,
            "eps": settings.eps,
            "weight_decay": 0.0,
        }
        optimizer = cls(groups, **{**settings_options, **options})
        return [optimizer]

    return build


def build_lm_aro(
    hidden: list[nn.Parameter], rest: list[nn.Parameter], settings: LMSettings
) -> Optimizers:
    from optim.rotated import ARO

    return [ARO(hidden, lr=settings.aro_lr, weight_decay=0.0), _aux_adamw(rest, settings)]


def build_lm_rotated(
    hidden: list[nn.Parameter], rest: list[nn.Parameter], settings: LMSettings
) -> Optimizers:
    from optim.rotated import RotatedAdam

    rotated = RotatedAdam(
        hidden, lr=settings.rotated_lr, betas=settings.betas, eps=settings.eps, weight_decay=0.0
    )
    return [rotated, _aux_adamw(rest, settings)]


@dataclass(frozen=True)
class LMMethod:
    label: str
    lr_field: str  # the LMSettings field holding this method's hidden-matrix learning rate
    build: Callable[[list[nn.Parameter], list[nn.Parameter], LMSettings], Optimizers]


LM_METHODS: dict[str, LMMethod] = {
    "adamw": LMMethod("AdamW", "base_lr", build_lm_adamw),
    "galore": LMMethod("GaLoreAdamW", "projected_lr", build_lm_galore),
    "svd": LMMethod("SVDProjectedAdam", "projected_lr", _build_lm_projected(SVDProjectedAdam)),
    "dct": LMMethod("DCTProjectedAdam", "projected_lr", _build_lm_projected(DCTProjectedAdam)),
    "dct-keep": LMMethod(
        "DCTProjectedAdam (moments='keep')",
        "projected_lr",
        _build_lm_projected(DCTProjectedAdam, moments="keep"),
    ),
    "dct-gap50": LMMethod(
        "DCTProjectedAdam (update_gap=50)",
        "projected_lr",
        _build_lm_projected(DCTProjectedAdam, update_gap=50),
    ),
    "aro": LMMethod("ARO", "aro_lr", build_lm_aro),
    "rotated": LMMethod("RotatedAdam (DCT basis)", "rotated_lr", build_lm_rotated),
}


def _autocast(settings: LMSettings, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.autocast)


def next_byte_loss(
    model: nn.Module, windows: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of predicting every byte of ``windows`` but the first from its prefix."""
    logits = model(input_ids=windows).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction=reduction
    )


@torch.no_grad()
def validation_loss(
    model: nn.Module, windows: torch.Tensor, settings: LMSettings, device: torch.device
) -> float:
    """Mean next-byte cross-entropy (nats) over every validation window."""
    total = torch.zeros((), device=device)
    for chunk in windows.split(settings.batch_size):
        with _autocast(settings, device):
            total += next_byte_loss(model, chunk.to(device), reduction="sum")
    return float(total) / (windows.shape[0] * (windows.shape[1] - 1))


def loss_curve(losses: list[float], tokens_per_step: int) -> dict[str, list[float]]:
    """At most :data:`MAX_CURVE_POINTS` means of consecutive steps' losses, at their last token.

    >>> loss_curve([4.0, 2.0, 3.0], tokens_per_step=10)
    {'tokens': [10, 20, 30], 'loss': [4.0, 2.0, 3.0]}
    """
    chunk = max(1, math.ceil(len(losses) / MAX_CURVE_POINTS))
    tokens, means = [], []
    for start in range(0, len(losses), chunk):
        part = losses[start : start + chunk]
        tokens.append((start + len(part)) * tokens_per_step)
        means.append(statistics.fmean(part))
    return {"tokens": tokens, "loss": means}


def warm_up(settings: LMSettings, train: torch.Tensor, device: torch.device) -> nn.Module:
    """Two untimed AdamW steps and a validation pass on a throwaway model; returns the model.

    The device's lazy initialisation (CUDA context, library handles, kernel selection) is then
    paid here rather than by whichever method runs first.
    """
    model = build_llama(settings.shape, settings.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.base_lr)
    starts = batch_starts(
        train.numel(), settings.shape.seq_len, settings.batch_size, 1, settings.seed
    )
    windows = gather_windows(train, starts[0], settings.shape.seq_len).to(device)
    for _ in range(2):
        with _autocast(settings, device):
            loss = next_byte_loss(model, windows)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    validation_loss(model, windows, settings, device)
    synchronizer(device)()
    return model


def train_lm(
    method: LMMethod,
    settings: LMSettings,
    train: torch.Tensor,
    val_windows: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """Pretrain a fresh model (the same init for every method) with ``method``; score it."""
    sync = synchronizer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_llama(settings.shape, settings.seed).to(device)
    hidden, rest = hidden_and_rest(model)
    optimizers = method.build(hidden, rest, settings)
    steps = settings.steps

    def factor(step: int) -> float:
        return lr_factor(step, steps, settings.warmup_steps, settings.final_lr_fraction)

    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for optimizer in optimizers]
    starts = batch_starts(
        train.numel(), settings.shape.seq_len, settings.batch_size, steps, settings.seed
    )
    losses = torch.full((steps,), math.nan, device=device)
    step_ms = []
    status, done = "ok", steps
    model.train()
    sync()
    start = time.perf_counter()
    for step in range(steps):
        windows = gather_windows(train, starts[step], settings.shape.seq_len).to(device)
        with _autocast(settings, device):
            loss = next_byte_loss(model, windows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        sync()
        step_start = time.perf_counter()
        for optimizer in optimizers:
            optimizer.step()
        sync()
        step_ms.append((time.perf_counter() - step_start) * 1e3)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        for scheduler in schedulers:
            scheduler.step()
        losses[step] = loss.detach()
        # One host read every 50 steps: a diverged run stops instead of burning its budget.
        checkpoint = (step + 1) % 50 == 0 or step + 1 == steps
        if checkpoint and not torch.isfinite(losses[step]):
            status, done = f"diverged: non-finite loss by step {step + 1}", step + 1
            break
    sync()
    elapsed = time.perf_counter() - start
    history = losses[:done].tolist()
    tail = history[-min(settings.tail_steps, done) :]
    tensor_bytes, storage = state_bytes(optimizers)
    result = {
        "label": method.label,
        "status": status,
        "hidden_lr": getattr(settings, method.lr_field),
        "steps": done,
        "train_loss": statistics.fmean(tail) if status == "ok" else math.nan,
        "val_loss": validation_loss(model, val_windows, settings, device)
        if status == "ok"
        else math.nan,
        "tokens_per_s": done * settings.tokens_per_step / elapsed,
        "optimizer_step": asdict(Timing.from_samples(step_ms)),
        "state_bytes": tensor_bytes,
        "storage_bytes": storage,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "curve": loss_curve(history, settings.tokens_per_step),
    }
    return result


def run_lm(
    settings: LMSettings, device: torch.device, corpus: Corpus | None = None
) -> dict[str, Any]:
    """Every method of ``settings.methods`` on the same corpus, batches and initial weights."""
    corpus = load_corpus() if corpus is None else corpus
    train, val = split_tail(corpus.tokens, settings.val_fraction)
    val_windows = validation_windows(val, settings.shape.seq_len, settings.max_val_windows)
    model = warm_up(settings, train, device)
    hidden, _ = hidden_and_rest(model)
    parameters = sum(param.numel() for param in model.parameters())
    hidden_parameters = sum(param.numel() for param in hidden)
    del model, hidden
    methods: dict[str, dict[str, Any]] = {}
    for key in settings.methods:
        method = LM_METHODS[key]
        print(f"lm: {method.label}, {settings.steps} steps ...", flush=True)
        try:
            methods[key] = train_lm(method, settings, train, val_windows, device)
        except ImportError as error:
            methods[key] = {"label": method.label, "status": f"not available: {error}"}
        except Exception as error:  # noqa: BLE001 -- a report: one failing method must not end it
            methods[key] = {
                "label": method.label,
                "status": f"failed: {type(error).__name__}: {error}",
            }
        result = methods[key]
        summary = result["status"]
        if "val_loss" in result:
            summary += f", val loss {result['val_loss']:.4f}, {result['tokens_per_s']:.0f} tokens/s"
        print(f"  {summary}", flush=True)
    return {
        "settings": asdict(settings),
        "corpus": {
            **corpus.describe(),
            "train_tokens": train.numel(),
            "val_tokens_scored": val_windows.numel(),
        },
        "parameters": parameters,
        "hidden_parameters": hidden_parameters,
        "methods": methods,
    }


def lm_checks(lm: dict[str, Any] | None) -> list[TargetCheck]:
    """DCTProjectedAdam's validation loss within 2% of AdamW's and no worse than GaLoreAdamW's."""
    methods = {} if lm is None else lm["methods"]

    def loss(key: str) -> float | None:
        result = methods.get(key, {})
        return result["val_loss"] if result.get("status") == "ok" else None

    dct, adamw, galore = loss("dct"), loss("adamw"), loss("galore")
    within = f"DCTProjectedAdam validation loss <= {MAX_LM_LOSS_RATIO:g}x AdamW's"
    no_worse = "DCTProjectedAdam validation loss <= GaLoreAdamW's"
    checks = []
    if dct is not None and adamw is not None:
        ratio = dct / adamw
        checks.append(TargetCheck(within, f"{ratio:.4f}x", ratio <= MAX_LM_LOSS_RATIO))
    else:
        checks.append(TargetCheck(within, "not run", None))
    if dct is not None and galore is not None:
        checks.append(TargetCheck(no_worse, f"{dct:.4f} vs {galore:.4f}", dct <= galore))
    else:
        checks.append(TargetCheck(no_worse, "not run", None))
    return checks


def lm_table(lm: dict[str, Any]) -> str:
    methods = lm["methods"]
    adamw = methods.get("adamw", {})
    rows = []
    for result in methods.values():
        if "val_loss" not in result:
            rows.append((result["label"], *("-",) * 8, result["status"]))
            continue
        versus = "-"
        if adamw.get("status") == "ok" and result["status"] == "ok":
            versus = f"{result['val_loss'] / adamw['val_loss']:.4f}"
        peak = result["peak_memory_bytes"]
        rows.append(
            (
                result["label"],
                f"{result['hidden_lr']:g}",
                f"{result['train_loss']:.4f}",
                f"{result['val_loss']:.4f}",
                versus,
                f"{result['tokens_per_s']:,.0f}",
                f"{Timing(**result['optimizer_step']).median_ms:.2f}",
                mib(result["state_bytes"]),
                "-" if peak is None else mib(peak),
                result["status"],
            )
        )
    header = (
        "Optimizer",
        "Hidden-matrix lr",
        "Final train loss",
        "Validation loss",
        "Val. loss / AdamW's",
        "Tokens/s",
        "Optimizer step ms",
        "State MiB",
        "Peak GPU MiB",
        "Status",
    )
    return markdown_table(header, rows)


def lm_notes(lm: dict[str, Any]) -> list[str]:
    settings = lm["settings"]
    shape, corpus = settings["shape"], lm["corpus"]
    steps = max(1, settings["tokens"] // (settings["batch_size"] * shape["seq_len"]))
    warmup = max(1, round(settings["warmup_fraction"] * steps))
    tokens_per_step = settings["batch_size"] * shape["seq_len"]
    precision = "bf16 autocast for forward and backward" if settings["autocast"] else "fp32"
    galore_rank = max(1, int(settings["rank_fraction"] * shape["hidden"]))
    return [
        (
            f"Model: byte-level LlamaForCausalLM (transformers), hidden {shape['hidden']}, "
            f"{shape['layers']} layers, {shape['heads']} heads, MLP {shape['intermediate']}, "
            f"context {shape['seq_len']}, untied embeddings: {lm['parameters']:,} parameters, "
            f"{lm['hidden_parameters']:,} in the attention and MLP matrices; random init with seed "
            f"{settings['seed']}, identical for every optimizer. Parameters fp32, {precision}."
        ),
        (
            f"Corpus: {corpus['files']} `*.py` files of the running Python's standard library "
            f"({corpus['bytes']:,} bytes, sha256 {corpus['sha256'][:12]}...), one token per byte; "
            f"the last {settings['val_fraction']:g} of the bytes held out. Validation loss: mean "
            f"next-byte cross-entropy (nats) over {corpus['val_tokens_scored']:,} held-out bytes "
            "in non-overlapping windows."
        ),
        (
            f"Budget: {steps} steps x {tokens_per_step} tokens ({settings['batch_size']} random "
            f"windows of {shape['seq_len']} bytes per step, the same draws for every optimizer) = "
            f"{steps * tokens_per_step:,} tokens. Final train loss: mean over the last "
            f"{min(settings['tail_steps'], steps)} steps."
        ),
        (
            f"Schedule (every optimizer): linear warm-up over {warmup} steps, cosine decay to "
            f"{settings['final_lr_fraction']:g} of the peak, gradients clipped to norm "
            f"{settings['clip_norm']:g}, weight decay 0, Adam betas {tuple(settings['betas'])}, "
            f"eps {settings['eps']:g}. Embeddings, norms and the head: AdamW at lr "
            f"{settings['base_lr']:g} in every method. The hidden matrices take the lr in the "
            "table."
        ),
        (
            f"Projected methods: rank {galore_rank} (= hidden/4; ours as the fraction "
            f"{settings['rank_fraction']:g}), scale {settings['scale']:g}, refresh every "
            f"{settings['update_gap']} steps (GaLore's reference LLaMA recipe: lr 0.01, scale "
            "0.25, gap 200). GaLoreAdamW: `proj_type='std'`, its own AdamW (eps added to sqrt(v) "
            "before the bias correction, as it ships). SVDProjectedAdam: randomized SVD; "
            "DCTProjectedAdam: its defaults (L2 scores, `moments='rotate'`). ARO: its defaults "
            "(Sinkhorn base map, momentum 0.95, `adjust_lr='rms_norm'`) but weight decay 0. "
            "RotatedAdam: DCT basis on both sides."
        ),
        (
            "Tokens/s: training tokens over the wall time of the training loop (validation "
            "excluded); the device is synchronised around every optimizer step to time it "
            "(*Optimizer step ms*, median). State MiB: tensors of every optimizer's state "
            "(galore-torch's projector basis included); peak GPU MiB: "
            "`torch.cuda.max_memory_allocated` over the run."
        ),
    ]


def plot_lm_curves(lm: dict[str, Any], path: Path, *, title: str) -> None:
    """Train-loss curves of every method that ran, against tokens (log-scale loss)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    figure = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for result in lm["methods"].values():
        curve = result.get("curve")
        if not curve or not curve["tokens"]:
            continue
        tokens = [count / 1e6 for count in curve["tokens"]]
        axes.plot(tokens, curve["loss"], label=result["label"], linewidth=1.2)
    axes.set_yscale("log")
    # Plain numbers on the log axis: the default 5x10^0 style is unreadable for losses near 1-5.
    axes.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    axes.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    axes.set_xlabel("training tokens (millions)")
    axes.set_ylabel("train loss (nats per byte, log scale)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# --------------------------------------------------------------------------- 3. CNN fine-tuning


@dataclass(frozen=True)
class CNNSettings:
    """Few-shot fine-tuning of the adapters benchmark's CNN; every method trains the new head."""

    shots: int = 10
    steps: int = 100
    seeds: int = 3
    seed: int = 0
    head_lr: float = 3e-3
    backbone_lr: float = 3e-4
    rank: float = 0.25
    update_gap: int = 20
    methods: tuple[str, ...] = ("adamw", "dct", "svd", "head")


CNN_QUICK = CNNSettings(shots=2, steps=4, seeds=1, update_gap=2)


def _split_backbone(model: SmallResNet) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    head = list(model.head.parameters())
    return [param for param in model.parameters() if all(param is not h for h in head)], head


def build_cnn_adamw(model: SmallResNet, settings: CNNSettings) -> torch.optim.Optimizer:
    backbone, head = _split_backbone(model)
    groups = [{"params": backbone, "lr": settings.backbone_lr}, {"params": head}]
    return torch.optim.AdamW(groups, lr=settings.head_lr, weight_decay=0.0)


def _build_cnn_projected(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    def build(model: SmallResNet, settings: CNNSettings) -> torch.optim.Optimizer:
        backbone, head = _split_backbone(model)
        # The 4-D conv kernels are projected; BatchNorm's 1-D parameters take the AdamW fallback,
        # the new head (a plain 2-D weight) is kept out of the projection by its rank=None group.
        groups = [{"params": backbone, "lr": settings.backbone_lr}, {"params": head, "rank": None}]
        return cls(
            groups,
            lr=settings.head_lr,
            rank=settings.rank,
            update_gap=settings.update_gap,
            weight_decay=0.0,
        )

    return build


def build_cnn_head(model: SmallResNet, settings: CNNSettings) -> torch.optim.Optimizer:
    backbone, head = _split_backbone(model)
    for param in backbone:
        param.requires_grad_(False)
    return torch.optim.AdamW(head, lr=settings.head_lr, weight_decay=0.0)


CNN_METHODS: dict[str, tuple[str, Callable[[SmallResNet, CNNSettings], torch.optim.Optimizer]]] = {
    "adamw": ("AdamW (full fine-tuning)", build_cnn_adamw),
    "dct": ("DCTProjectedAdam (conv kernels projected)", _build_cnn_projected(DCTProjectedAdam)),
    "svd": ("SVDProjectedAdam (conv kernels projected)", _build_cnn_projected(SVDProjectedAdam)),
    "head": ("AdamW, head only", build_cnn_head),
}


def fine_tune_cnn(
    build: Callable[[SmallResNet, CNNSettings], torch.optim.Optimizer],
    pretrained: dict[str, torch.Tensor],
    width: int,
    split: DigitsSplit,
    settings: CNNSettings,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Fine-tune a fresh copy of the pretrained CNN (new head, BatchNorm in eval mode); score it."""
    torch.manual_seed(seed)
    model = SmallResNet(num_classes=FINETUNE_CLASSES, width=width)
    backbone = {key: value for key, value in pretrained.items() if not key.startswith("head.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(not key.startswith("head.") for key in missing):
        raise RuntimeError(
            f"the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    model.to(
        device
    ).eval()  # BatchNorm keeps its pretrained statistics, as in the adapters benchmark
    optimizer = build(model, settings)
    shots = few_shot(split.finetune_pool, settings.shots, seed)
    images, labels = shots.images.to(device), shots.labels.to(device)
    sync = synchronizer(device)
    step_ms = []
    for step in range(settings.steps):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        sync()
        if step:  # the first step allocates the state and picks the first subspaces
            step_ms.append((time.perf_counter() - start) * 1e3)
    tensor_bytes, _ = state_bytes([optimizer])
    return {
        "accuracy": accuracy(model, split.finetune_test),
        "step_ms": step_ms,
        "state_bytes": tensor_bytes,
        "trainable": sum(param.numel() for param in model.parameters() if param.requires_grad),
    }


def run_cnn(
    settings: CNNSettings,
    pretrained: dict[str, torch.Tensor],
    width: int,
    split: DigitsSplit,
    device: torch.device,
    pretraining: dict[str, Any],
) -> dict[str, Any]:
    """Every method of ``settings.methods`` over ``settings.seeds`` seeds."""
    methods: dict[str, dict[str, Any]] = {}
    seeds = range(settings.seed, settings.seed + settings.seeds)
    for key in settings.methods:
        label, build = CNN_METHODS[key]
        print(f"cnn: {label} ...", flush=True)
        try:
            runs = [
                fine_tune_cnn(build, pretrained, width, split, settings, seed, device)
                for seed in seeds
            ]
        except Exception as error:  # noqa: BLE001 -- a report: one failing method must not end it
            methods[key] = {"label": label, "status": f"failed: {type(error).__name__}: {error}"}
            print(f"  {methods[key]['status']}", flush=True)
            continue
        accuracies = [run["accuracy"] for run in runs]
        step_ms = [ms for run in runs for ms in run["step_ms"]]
        methods[key] = {
            "label": label,
            "status": "ok",
            "accuracies": accuracies,
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "step": asdict(Timing.from_samples(step_ms)) if step_ms else None,
            "state_bytes": runs[0]["state_bytes"],
            "trainable": runs[0]["trainable"],
        }
        print(f"  accuracy {methods[key]['accuracy_mean']:.1f}%", flush=True)
    return {
        "settings": asdict(settings),
        "width": width,
        "pretraining": pretraining,
        "test_images": len(split.finetune_test),
        "methods": methods,
    }


def cnn_table(cnn: dict[str, Any]) -> str:
    rows = []
    for result in cnn["methods"].values():
        if result["status"] != "ok":
            rows.append((result["label"], "-", "-", "-", "-", result["status"]))
            continue
        step = result["step"]
        rows.append(
            (
                result["label"],
                f"{result['accuracy_mean']:.1f} ± {result['accuracy_std']:.1f}",
                f"{result['trainable']:,}",
                f"{result['state_bytes'] / 2**10:.1f}",
                "-" if step is None else f"{Timing(**step).median_ms:.2f}",
                "ok",
            )
        )
    header = ("Method", "Test accuracy %", "Trained parameters", "State KiB", "Step ms", "Status")
    return markdown_table(header, rows)


def cnn_notes(cnn: dict[str, Any]) -> list[str]:
    settings, pretraining = cnn["settings"], cnn["pretraining"]
    last_seed = settings["seed"] + settings["seeds"] - 1
    return [
        (
            f"Task: SmallResNet (width {cnn['width']}) pretrained on digits 0-4 "
            f"(epochs: {pretraining.get('epochs')}, "
            f"{float(pretraining.get('test_accuracy', math.nan)):.1f}% held-out accuracy), new "
            f"5-way head, {settings['shots']} examples per class of digits 5-9 (full batch), "
            f"{settings['steps']} steps, seeds {settings['seed']}..{last_seed} (a seed fixes the "
            f"draw and the head); test set {cnn['test_images']} images; BatchNorm in eval mode."
        ),
        (
            f"Learning rates: {settings['backbone_lr']:g} on the pretrained weights, "
            f"{settings['head_lr']:g} on the head, weight decay 0, for every method. Projected "
            f"methods: rank {settings['rank']:g} of each kernel's smaller side of its (c_out, c_in "
            f"* k * k) view, refresh every {settings['update_gap']} steps, scale 1; BatchNorm "
            "parameters take their AdamW fallback."
        ),
        (
            "Accuracy: mean ± sample std over seeds. State KiB: tensors of the optimizer state. "
            "Step ms: median of forward, backward and optimizer step over every step but each "
            "run's first."
        ),
    ]


def cnn_pretrained(
    quick: bool, checkpoint: Path, seed: int, split: DigitsSplit
) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
    """The pretrained CNN's state, width and pretraining metadata.

    Full runs load the adapters benchmark's checkpoint, pretraining and saving it first if it is
    missing (with that benchmark's defaults); ``quick`` pretrains a width-8 network for one
    epoch in memory.
    """
    if quick:
        model, test_accuracy = pretrain(split, seed=seed, epochs=1, width=8)
        return model.state_dict(), model.width, {"epochs": 1, "test_accuracy": test_accuracy}
    if not checkpoint.exists():
        print(f"cnn: pretraining on digits 0-4 (no checkpoint at {checkpoint}) ...", flush=True)
        model, test_accuracy = pretrain(split, seed=seed, epochs=CNN_PRETRAIN_EPOCHS)
        save_checkpoint(
            model, checkpoint, test_accuracy=test_accuracy, epochs=CNN_PRETRAIN_EPOCHS, seed=seed
        )
    model, metadata = load_checkpoint(checkpoint)
    return model.state_dict(), model.width, dict(metadata)


# --------------------------------------------------------------------------- the page


def _heading(title: str, part: dict[str, Any]) -> str:
    return f"{title} (quick smoke test)" if part.get("quick") else title


def _run_lines(part: dict[str, Any]) -> list[str]:
    env = Environment(**part["env"])
    return [f"Run: {env.describe()}; device: {part['device']}.", "", f"Command: `{env.command}`"]


def _image(path: Path, page: Path) -> str:
    return os.path.relpath(path.resolve(), page.resolve().parent)


def render(results: dict[str, Any], page: Path | None) -> str:
    """The Markdown of the ``optim`` section from ``results``; with ``page``, also its plots.

    Plots go to ``img/`` beside the page and are linked relative to it.
    """
    images = None if page is None else page.parent / "img"
    blocks = []
    micro, lm, cnn = (results.get(part) for part in PARTS)
    if micro is not None:
        settings = micro["settings"]
        title = _heading(
            f"Optimizers: one step on a {settings['size']}x{settings['size']} parameter, "
            f"rank {settings['rank']}",
            micro,
        )
        comparisons = micro_comparisons(micro)
        image = None
        if images is not None and comparisons:
            plot_ratios(comparisons, images / MICRO_PLOT, title=title)
            image = _image(images / MICRO_PLOT, page)
        notes = [f"Device: {micro['device']}.", *micro_notes(micro)]
        env = Environment(**micro["env"])
        blocks.append(render_section(comparisons, title=title, env=env, notes=notes, image=image))
        blocks.append("### Optimizer state\n\n" + micro_state_table(micro))
    if lm is not None:
        title = _heading("Optimizers: byte-level LLaMA pretraining on the standard library", lm)
        lines = [f"## {title}", "", *_run_lines(lm), "", lm_table(lm)]
        if images is not None and any(result.get("curve") for result in lm["methods"].values()):
            plot_lm_curves(lm, images / LM_PLOT, title="Byte-level LLaMA: train loss")
            lines += ["", f"![train loss against tokens]({_image(images / LM_PLOT, page)})"]
        lines += ["", "Notes:", "", *(f"- {note}" for note in lm_notes(lm))]
        blocks.append("\n".join(lines))
    if cnn is not None:
        title = _heading("Optimizers: few-shot CNN fine-tuning on digits 5-9", cnn)
        lines = [f"## {title}", "", *_run_lines(cnn), "", cnn_table(cnn)]
        lines += ["", "Notes:", "", *(f"- {note}" for note in cnn_notes(cnn))]
        blocks.append("\n".join(lines))
    checks = micro_checks(micro) + lm_checks(lm)
    blocks.append("## Optimizers: targets\n\n" + targets_table(checks))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------- results file


def load_results(path: Path | None) -> dict[str, Any]:
    """The parts stored at ``path`` (none if there is no file)."""
    if path is None or not path.exists():
        return {}
    results = json.loads(path.read_text())
    unknown = sorted(set(results) - set(PARTS))
    if unknown:
        raise ValueError(f"{path}: unknown parts {unknown}; expected some of {list(PARTS)}")
    return results


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(scratch, path)


# --------------------------------------------------------------------------- command line


def _names(
    text: str, choices: Sequence[str], option: str, parser: argparse.ArgumentParser
) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(choices))
    if unknown or not names:
        parser.error(f"{option} must name some of {list(choices)}, got {text!r}")
    return names


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default {','.join(PARTS)})",
    )
    add(
        "--quick",
        action="store_true",
        help="tiny sizes; writes nothing unless --out/--page are given",
    )
    add("--threads", type=int, default=2, help="threads for every library (default 2)")
    add(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="device of every part (default cpu)",
    )
    add("--seed", type=int, default=0, help="seed of weights, data and draws (default 0)")
    add(
        "--out",
        type=Path,
        default=None,
        help=f"results JSON (default {DEFAULT_JSON}; none with --quick)",
    )
    add(
        "--page",
        type=Path,
        default=None,
        help=f"page to write (default {DEFAULT_PAGE}; none with --quick)",
    )
    add("--no-page", action="store_true", help="write the JSON only")
    add(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="take the parts stored in this JSON (repeatable)",
    )
    add("--render", action="store_true", help="run nothing: merge and render the page only")
    add("--size", type=int, default=None, help="micro: parameter side n (default 4096)")
    add("--rank", type=int, default=None, help="micro: projection rank (default 128)")
    add("--repeats", type=int, default=None, help="micro: timed steps per row (default 9)")
    add(
        "--svd-repeats",
        type=int,
        default=None,
        help="micro: timed GaLore refresh steps (default 3)",
    )
    add("--tokens", type=int, default=None, help=f"lm: token budget (default {LMSettings.tokens})")
    add(
        "--batch-size",
        type=int,
        default=None,
        help=f"lm: windows per step (default {LMSettings.batch_size})",
    )
    add("--lm-methods", default=None, help=f"lm: subset of {','.join(LM_METHODS)}")
    for name in ("base", "projected", "aro", "rotated"):
        add(
            f"--lr-{name}",
            type=float,
            default=None,
            help=f"lm: {name}_lr (default {getattr(LMSettings, name + '_lr')})",
        )
    add(
        "--update-gap",
        type=int,
        default=None,
        help=f"lm: refresh gap (default {LMSettings.update_gap})",
    )
    add(
        "--autocast",
        choices=("auto", "none", "bf16"),
        default="auto",
        help="lm: bf16 autocast (auto: on cuda)",
    )
    add("--cnn-methods", default=None, help=f"cnn: subset of {','.join(CNN_METHODS)}")
    add("--cnn-seeds", type=int, default=None, help=f"cnn: seeds (default {CNNSettings.seeds})")
    add("--cnn-steps", type=int, default=None, help=f"cnn: steps (default {CNNSettings.steps})")
    add(
        "--cnn-shots",
        type=int,
        default=None,
        help=f"cnn: examples per class (default {CNNSettings.shots})",
    )
    add(
        "--checkpoint",
        type=Path,
        default=CNN_CHECKPOINT,
        help=f"cnn: pretrained CNN (default {CNN_CHECKPOINT})",
    )
    arguments = parser.parse_args(argv)

    arguments.parts = () if arguments.render else _names(arguments.only, PARTS, "--only", parser)
    if arguments.threads < 1:
        parser.error(f"--threads must be >= 1, got {arguments.threads}")
    arguments.device = torch.device(arguments.device)
    if arguments.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    quick = arguments.quick

    def positive(option: str) -> None:
        value = getattr(arguments, option)
        if value is not None and not value >= 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")

    for option in ("size", "rank", "repeats", "svd_repeats", "tokens", "batch_size", "update_gap"):
        positive(option)
    for option in ("cnn_seeds", "cnn_shots"):
        positive(option)
    if arguments.cnn_steps is not None and arguments.cnn_steps < 2:
        parser.error("--cnn-steps must be >= 2: the first step is untimed")

    micro = MICRO_QUICK if quick else MicroSettings()
    micro_overrides = {
        key: value
        for key, value in (
            ("size", arguments.size),
            ("rank", arguments.rank),
            ("repeats", arguments.repeats),
            ("svd_repeats", arguments.svd_repeats),
        )
        if value is not None
    }
    arguments.micro = dataclasses.replace(micro, seed=arguments.seed, **micro_overrides)

    lm = LM_QUICK if quick else LMSettings()
    autocast = (
        arguments.device.type == "cuda"
        if arguments.autocast == "auto"
        else arguments.autocast == "bf16"
    )
    lm_overrides: dict[str, Any] = {"seed": arguments.seed, "autocast": autocast}
    for option, field_name in (
        ("tokens", "tokens"),
        ("batch_size", "batch_size"),
        ("lr_base", "base_lr"),
        ("lr_projected", "projected_lr"),
        ("lr_aro", "aro_lr"),
        ("lr_rotated", "rotated_lr"),
        ("update_gap", "update_gap"),
    ):
        value = getattr(arguments, option)
        if value is not None:
            if option.startswith("lr_") and not (math.isfinite(value) and value > 0):
                parser.error(
                    f"--{option.replace('_', '-')} must be a finite number > 0, got {value}"
                )
            lm_overrides[field_name] = value
    if arguments.lm_methods is not None:
        lm_overrides["methods"] = _names(
            arguments.lm_methods, tuple(LM_METHODS), "--lm-methods", parser
        )
    arguments.lm = dataclasses.replace(lm, **lm_overrides)

    cnn = CNN_QUICK if quick else CNNSettings()
    cnn_overrides: dict[str, Any] = {"seed": arguments.seed}
    for option, field_name in (
        ("cnn_seeds", "seeds"),
        ("cnn_steps", "steps"),
        ("cnn_shots", "shots"),
    ):
        if getattr(arguments, option) is not None:
            cnn_overrides[field_name] = getattr(arguments, option)
    if arguments.cnn_methods is not None:
        cnn_overrides["methods"] = _names(
            arguments.cnn_methods, tuple(CNN_METHODS), "--cnn-methods", parser
        )
    arguments.cnn = dataclasses.replace(cnn, **cnn_overrides)

    if arguments.out is None and not quick:
        arguments.out = DEFAULT_JSON
    if arguments.no_page:
        arguments.page = None
    elif arguments.page is None and not quick:
        arguments.page = DEFAULT_PAGE
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    results = load_results(arguments.out)
    for path in arguments.merge:
        results.update(load_results(path))
    library_threads = set_threads(arguments.threads)
    device = arguments.device
    if "micro" in arguments.parts:
        results["micro"] = run_record(device, library_threads, arguments.quick) | run_micro(
            arguments.micro, device
        )
    if "lm" in arguments.parts:
        results["lm"] = run_record(device, library_threads, arguments.quick) | run_lm(
            arguments.lm, device
        )
    if "cnn" in arguments.parts:
        split = load_digits_split()
        pretrained, width, pretraining = cnn_pretrained(
            arguments.quick, arguments.checkpoint, arguments.seed, split
        )
        results["cnn"] = run_record(device, library_threads, arguments.quick) | run_cnn(
            arguments.cnn, pretrained, width, split, device, pretraining
        )
    if arguments.out is not None:
        save_results(arguments.out, results)
        print(f"\nwrote {arguments.out}")
    if not results:
        print("nothing to render: no part ran and none was stored")
        return 0
    body = render(results, arguments.page)
    print("\n" + body)
    if arguments.page is not None:
        write_section(arguments.page, SECTION, body)
        print(f"\nwrote section {SECTION!r} of {arguments.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
