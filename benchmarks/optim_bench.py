"""The optimizers of :mod:`optim` against torch's AdamW and galore-torch's GaLoreAdamW.

Four kinds of case (what each measures, and why so, is on the page):

* ``micro``: one optimizer step on a single ``n x n`` fp32 parameter with a fixed gradient, every
  optimizer of :data:`MICRO_ROWS`; a projected optimizer's *refresh* step (gap 1) and *steady*
  step (a gap no run reaches), and the optimizer-state bytes; the steady steps again on the LM
  case's hidden matrices.
* ``lm:<method>``: pretraining a byte-level LLaMA (:mod:`benchmarks.optim_data`) on the CPython
  standard library for a fixed token budget, one case per entry of :data:`LM_METHODS`.
* ``energy``: the share of the LM's hidden-matrix gradients that GaLore's and DCTProjectedAdam's
  rank-r subspaces keep, at every refresh step of an AdamW run (:func:`subspace_energy`).
* ``cnn:<method>``: few-shot fine-tuning of the adapters benchmark's pretrained CNN, one case per
  entry of :data:`CNN_METHODS`.

A method that cannot run (galore-torch imports bitsandbytes and transformers) is a row that says
so. Usage::

    python benchmarks/optim_bench.py --only 'micro,cnn:*' --threads 2
    python benchmarks/optim_bench.py --only 'lm:*' --device cuda --out lm.json --no-page
    python benchmarks/optim_bench.py --render --merge lm.json   # the page from both runs
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file: make the repository root importable, as under ``python -m benchmarks...``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.adapters_data import (
    SmallResNet,
    accuracy,
    few_shot,
    fine_tuning_model,
    load_digits_split,
    pretrained,
)
from benchmarks.harness import (
    Area,
    Case,
    Check,
    Comparison,
    Context,
    Part,
    Timing,
    cases,
    main,
    timeit,
)
from benchmarks.optim_data import (
    LlamaShape,
    batch_starts,
    build_llama,
    gather_windows,
    load_corpus,
    split_tail,
    validation_windows,
)
from benchmarks.targets import target
from decomp import dct
from optim import ARO, DCTProjectedAdam, SVDProjectedAdam

# A refresh gap no run reaches: every step after the first reuses the first step's subspace.
STEADY_GAP = 10**9
MAX_CURVE_POINTS = 128
FINETUNE_CLASSES = 5
LM_TABLE = "Byte-level LLaMA pretraining"
CNN_TABLE = "Few-shot CNN fine-tuning on digits 5-9"

Optimizers = list[torch.optim.Optimizer]


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def failure(error: Exception) -> str:
    """A row's status for a method that could not run."""
    if isinstance(error, ImportError):
        return f"not available: {error}"
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


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


# --------------------------------------------------------------------------- micro


@dataclass(frozen=True)
class MicroSettings:
    """The parameter's side ``n``, the projection rank and scale, GaLore refresh repeats, and
    the steps per timed sample of the LM-size rows."""

    size: int = 4096
    rank: int = 128
    scale: float = 0.25
    # GaLore's refresh is a full SVD, about 17 s a step on two CPU threads: timed fewer times.
    svd_repeats: int = 3
    # A steady step of the LM's 28 small matrices takes a few ms: each sample times a block of
    # steps, so that one descheduling of the process does not make a sample.
    lm_steps_per_sample: int = 20


MICRO_QUICK = MicroSettings(size=256, rank=16, svd_repeats=1, lm_steps_per_sample=2)
MicroBuilder = Callable[[list[nn.Parameter], int, float], torch.optim.Optimizer]


def _galore_micro(gap: int) -> MicroBuilder:
    def build(params: list[nn.Parameter], rank: int, scale: float) -> torch.optim.Optimizer:
        group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": scale}
        return galore_adamw()([{**group, "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)

    return build


def _ours_micro(cls: type[torch.optim.Optimizer], gap: int) -> MicroBuilder:
    def build(params: list[nn.Parameter], rank: int, scale: float) -> torch.optim.Optimizer:
        return cls(params, lr=1e-3, rank=rank, update_gap=gap, scale=scale)

    return build


# Every optimizer the micro-benchmark times on the one large matrix, by row name.
MICRO_ROWS: dict[str, MicroBuilder] = {
    "AdamW (foreach)": lambda params, rank, scale: torch.optim.AdamW(params, foreach=True),
    "AdamW (fused)": lambda params, rank, scale: torch.optim.AdamW(params, fused=True),
    "GaLoreAdamW refresh": _galore_micro(1),
    "GaLoreAdamW steady": _galore_micro(STEADY_GAP),
    "SVDProjectedAdam refresh": _ours_micro(SVDProjectedAdam, 1),
    "SVDProjectedAdam steady": _ours_micro(SVDProjectedAdam, STEADY_GAP),
    "DCTProjectedAdam refresh": _ours_micro(DCTProjectedAdam, 1),
    "DCTProjectedAdam steady": _ours_micro(DCTProjectedAdam, STEADY_GAP),
}
# The steady rows again on the LM case's hidden matrices (:func:`lm_matrix_shapes`), named with
# this suffix: per-matrix costs that one large matrix hides.
LM_SIZE = ", LM matrices"
# The rotated optimizers against torch's Muon, timed on the LM's hidden matrices only.
LM_SIZE_ROWS: dict[str, MicroBuilder] = {
    "ARO rotate='smaller'": lambda params, rank, scale: ARO(params, rotate="smaller"),
    "ARO rotate='rows'": lambda params, rank, scale: ARO(params, rotate="rows"),
    "torch.optim.Muon": lambda params, rank, scale: torch.optim.Muon(params),
}

# (ours, anchor, key of the target in benchmarks.targets or None): the timing rows, in order.
MICRO_COMPARISONS: tuple[tuple[str, str, str | None], ...] = (
    ("DCTProjectedAdam refresh", "GaLoreAdamW refresh", "optim: DCT refresh vs GaLore refresh"),
    ("DCTProjectedAdam steady", "GaLoreAdamW steady", "optim: DCT steady vs GaLore steady"),
    (
        "DCTProjectedAdam steady" + LM_SIZE,
        "GaLoreAdamW steady" + LM_SIZE,
        "optim: DCT steady vs GaLore steady at LM size",
    ),
    ("SVDProjectedAdam refresh", "GaLoreAdamW refresh", None),
    ("SVDProjectedAdam steady", "GaLoreAdamW steady", None),
    ("SVDProjectedAdam steady" + LM_SIZE, "GaLoreAdamW steady" + LM_SIZE, None),
    ("ARO rotate='smaller'" + LM_SIZE, "torch.optim.Muon" + LM_SIZE, None),
    ("ARO rotate='rows'" + LM_SIZE, "torch.optim.Muon" + LM_SIZE, None),
    ("DCTProjectedAdam steady", "AdamW (foreach)", None),
    ("DCTProjectedAdam steady", "AdamW (fused)", None),
    ("GaLoreAdamW steady", "AdamW (foreach)", None),
)
STATE_ROWS = ("AdamW (foreach)", "GaLoreAdamW steady", "SVDProjectedAdam steady", "DCTProjectedAdam steady")


def lm_matrix_shapes(shape: LlamaShape) -> list[tuple[int, int]]:
    """The ``(out, in)`` shapes of the LLaMA's attention and MLP matrices, layer by layer.

    >>> lm_matrix_shapes(LlamaShape(hidden=8, layers=1, heads=2, intermediate=24))
    [(8, 8), (8, 8), (8, 8), (8, 8), (24, 8), (24, 8), (8, 24)]
    """
    hidden, mlp = shape.hidden, shape.intermediate
    # q, k, v, o (no grouped-query attention); gate, up; down
    return ([(hidden, hidden)] * 4 + [(mlp, hidden)] * 2 + [(hidden, mlp)]) * shape.layers


def _fresh_params(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> list[nn.Parameter]:
    """Copies of the ``(weight, gradient)`` pairs as parameters holding their gradients."""
    params = []
    for weight, grad in tensors:
        param = nn.Parameter(weight.clone())
        param.grad = grad.clone()
        params.append(param)
    return params


def time_micro_rows_interleaved(
    builds: dict[str, MicroBuilder],
    tensors: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    scale: float,
    repeats: int,
    context: Context,
    steps_per_sample: int = 1,
) -> dict[str, tuple[Timing, int, int] | str]:
    """Median per-step ``step()`` time of each row's fresh optimizer on copies of the ``(weight,
    gradient)`` pairs, and its state's ``(tensor, storage)`` bytes after the timed steps; each
    sample times ``steps_per_sample`` steps, and the rows' samples are interleaved.

    Every row's optimizer is built and takes its untimed first step (creating its state and any
    first subspace); then round ``k`` of
    ``repeats`` times one sample of every row, in an order rotated by ``k``, so a drift of the
    machine's speed over the run reaches every row alike instead of biasing the ratio of two rows
    timed minutes apart. A row that fails (building or stepping) holds its failure text.

    >>> rows = time_micro_rows_interleaved(
    ...     {"a": lambda p, r, s: torch.optim.SGD(p, lr=0.1), "b": lambda p, r, s: 1 / 0},
    ...     [(torch.zeros(2, 2), torch.ones(2, 2))], 1, 1.0, 3,
    ...     Context(quick=True, repeats=3, threads=1, device=torch.device("cpu")))
    >>> rows["a"][0].repeats, rows["b"]
    (3, 'failed: ZeroDivisionError: division by zero')
    """
    results: dict[str, tuple[Timing, int, int] | str] = {}
    live: dict[str, torch.optim.Optimizer] = {}
    for name, build in builds.items():
        try:
            optimizer = build(_fresh_params(tensors), rank, scale)
            optimizer.step()  # untimed: creates the state and any first subspace
            live[name] = optimizer
        except Exception as error:  # noqa: BLE001 -- a report: one failing row must not end the run
            results[name] = failure(error)
    samples: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    for round_index in range(repeats):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            if name in results:
                continue
            optimizer = live[name]

            def steps() -> None:
                for _ in range(steps_per_sample):
                    optimizer.step()

            try:
                sample = timeit(steps, repeats=1, warmup=0, sync=context.sync).median_ms
            except Exception as error:  # noqa: BLE001
                results[name] = failure(error)
                continue
            samples[name].append(sample / steps_per_sample)
    for name in names:
        if name not in results:
            results[name] = (Timing.from_samples(samples[name]), *state_bytes([live[name]]))
    return results


def _report(rows: dict[str, tuple[Timing, int, int] | str]) -> None:
    """Print each row's status as it is measured."""
    for name, row in rows.items():
        print(f"  micro {name}: {row if isinstance(row, str) else 'ok'}", flush=True)


def measure_micro(context: Context) -> Part:
    """Every row of :data:`MICRO_ROWS`, and its steady rows and :data:`LM_SIZE_ROWS` on the LM
    case's hidden matrices; the comparisons whose two sides both ran."""
    settings = MICRO_QUICK if context.quick else MicroSettings()
    lm = LM_QUICK if context.quick else LMSettings()
    generator = torch.Generator().manual_seed(0)
    n = settings.size
    weight = torch.randn(n, n, generator=generator).div_(n**0.5).to(context.device)
    grad = torch.randn(n, n, generator=generator).to(context.device)
    matrices = [
        (
            torch.randn(shape, generator=generator).div_(shape[1] ** 0.5).to(context.device),
            torch.randn(shape, generator=generator).to(context.device),
        )
        for shape in lm_matrix_shapes(lm.shape)
    ]
    rows: dict[str, tuple[Timing, int, int] | str] = {}
    for name, build in MICRO_ROWS.items():
        slow = name == "GaLoreAdamW refresh"
        repeats = min(settings.svd_repeats, context.repeats) if slow else context.repeats
        large = [(weight, grad)]
        # one row at a time: the large rows' optimizers are not all kept alive at once
        row = time_micro_rows_interleaved({name: build}, large, settings.rank, settings.scale, repeats, context)
        _report(row)
        rows.update(row)
    steady = {name: build for name, build in MICRO_ROWS.items() if name.endswith(" steady")}
    lm_size = time_micro_rows_interleaved(
        {name + LM_SIZE: build for name, build in {**steady, **LM_SIZE_ROWS}.items()},
        matrices, lm.galore_rank, lm.scale, context.repeats, context, settings.lm_steps_per_sample,
    )  # fmt: skip
    _report(lm_size)
    rows.update(lm_size)
    ran = {name: row for name, row in rows.items() if not isinstance(row, str)}
    shapes = sorted(set(lm_matrix_shapes(lm.shape)))
    part = Part(
        facts=[
            f"micro: parameter {n}x{n}, rank {settings.rank}, scale {settings.scale:g}.",
            f"micro{LM_SIZE}: the lm case's {len(matrices)} attention and MLP matrices "
            f"({', '.join(f'{rows_}x{cols}' for rows_, cols in shapes)}), rank {lm.galore_rank}, "
            f"scale {lm.scale:g}; each sample times {settings.lm_steps_per_sample} steps, and the rows' "
            f"samples are interleaved (one of each row per round, in a rotating order).",
        ]
    )
    for ours, anchor, key in MICRO_COMPARISONS:
        if ours in ran and anchor in ran:
            part.comparisons.append(
                Comparison(ours, ran[ours][0], anchor, ran[anchor][0], None if key is None else target(key))
            )
    galore = ran.get("GaLoreAdamW steady")
    cells = []
    for name in STATE_ROWS:
        if name not in ran:
            cells.append((name.removesuffix(" steady"), rows.get(name, "not run"), "-", "-"))
            continue
        versus = "-" if galore is None else f"{ran[name][1] / galore[1]:.3g}x"
        cells.append((name.removesuffix(" steady"), mib(ran[name][1]), mib(ran[name][2]), versus))
    header = ("Optimizer", "State MiB (tensors)", "State MiB (storage kept alive)", "vs GaLoreAdamW")
    part.table("Optimizer state", header, cells)
    if galore is not None and "DCTProjectedAdam steady" in ran:
        ratio = ran["DCTProjectedAdam steady"][1] / galore[1]
        bound = target("optim: DCT state bytes vs GaLore")
        part.checks.append(Check("DCTProjectedAdam state bytes", ratio, bound, f"{ratio:.3g}x"))
    return part


# --------------------------------------------------------------------------- lm


@dataclass(frozen=True)
class LMSettings:
    """The LM run: model, budget, and every optimizer's hyper-parameters (same schedule for all).

    The default is sized for two shared CPU cores (a run takes about a minute on one thread, so
    every method's sweep and seeds take under an hour): a 0.92M-parameter model, 200 steps of
    2,048 tokens.
    """

    shape: LlamaShape = dataclasses.field(
        default_factory=lambda: LlamaShape(hidden=128, layers=4, heads=4, intermediate=384, seq_len=128)
    )
    batch_size: int = 16
    tokens: int = 200 * 16 * 128
    # Embeddings, norms and the head, in every method but AdamW (which sweeps one rate for all).
    base_lr: float = 1e-3
    rank_fraction: float = 0.25
    scale: float = 0.25
    # Four subspaces in the 200 steps; GaLore's reference gap of 200 would leave only the first.
    update_gap: int = 50
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    clip_norm: float = 1.0
    val_fraction: float = 0.01
    # Held-out windows of each of the two held-out sets (tuning and validation).
    max_val_windows: int = 256
    tail_steps: int = 50
    # Seed of the sweep's runs; the best rate is rerun with seeds 1..seeds-1.
    seed: int = 0
    seeds: int = 3
    autocast: bool = False

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
    batch_size=4, tokens=4 * 32 * 12, update_gap=4, max_val_windows=8, tail_steps=4, seeds=2,
)  # fmt: skip


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


Params = list[nn.Parameter]
Builder = Callable[[Params, Params, LMSettings, float], Optimizers]


def adamw(params: Params, settings: LMSettings, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with the shared betas and eps, weight decay 0, at ``lr`` (default: the base rate)."""
    lr = settings.base_lr if lr is None else lr
    return torch.optim.AdamW(params, lr=lr, betas=settings.betas, eps=settings.eps, weight_decay=0.0)


def build_galore(hidden: Params, rest: Params, settings: LMSettings, lr: float) -> Optimizers:
    """galore-torch's GaLoreAdamW: projected hidden matrices, a plain group for the rest."""
    projected = {"params": hidden, "lr": lr, "rank": settings.galore_rank, "update_proj_gap": settings.update_gap}
    groups = [{**projected, "scale": settings.scale, "proj_type": "std"}, {"params": rest}]
    options = {"betas": settings.betas, "eps": settings.eps, "weight_decay": 0.0, "no_deprecation_warning": True}
    return [galore_adamw()(groups, lr=settings.base_lr, **options)]


def projected(cls: type[torch.optim.Optimizer], **options: Any) -> Builder:
    """One of our projected optimizers: hidden matrices projected, the rest in a ``rank=None`` group."""

    def build(hidden: Params, rest: Params, settings: LMSettings, lr: float) -> Optimizers:
        groups = [{"params": hidden, "lr": lr}, {"params": rest, "rank": None}]
        shared = {"rank": settings.rank_fraction, "update_gap": settings.update_gap, "scale": settings.scale}
        adam = {"betas": settings.betas, "eps": settings.eps, "weight_decay": 0.0}
        return [cls(groups, lr=settings.base_lr, **{**shared, **adam, **options})]

    return build


def beside_adamw(make: Callable[[Params, LMSettings, float], torch.optim.Optimizer]) -> Builder:
    """A matrix optimizer on the hidden matrices, AdamW at the base rate on the rest."""
    return lambda hidden, rest, settings, lr: [make(hidden, settings, lr), adamw(rest, settings)]


def muon(params: Params, settings: LMSettings, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Muon`` at its defaults (Nesterov momentum 0.95, 5 Newton-Schulz steps, the
    original ``sqrt(max(1, m/n))`` lr adjustment) but weight decay 0, as every method here."""
    return torch.optim.Muon(params, lr=lr, weight_decay=0.0)


def aro(rotate: str, adjust_lr: str, nesterov: bool) -> Callable[[Params, LMSettings, float], torch.optim.Optimizer]:
    """:class:`~optim.ARO` at its defaults but weight decay 0, rotating ``rotate`` with step scale
    ``adjust_lr`` and momentum ``nesterov`` (all named in every case, so a case's meaning does not
    follow the defaults)."""

    def make(params: Params, settings: LMSettings, lr: float) -> torch.optim.Optimizer:
        from optim import ARO

        return ARO(params, lr=lr, weight_decay=0.0, rotate=rotate, adjust_lr=adjust_lr, nesterov=nesterov)

    return make


def rotated(basis: str) -> Callable[[Params, LMSettings, float], torch.optim.Optimizer]:
    """:class:`~optim.RotatedAdam` with ``basis`` at its own defaults for that basis (SOAP's betas
    (0.95, 0.95) for ``"eigen"``) but weight decay 0."""

    def make(params: Params, settings: LMSettings, lr: float) -> torch.optim.Optimizer:
        from optim import RotatedAdam

        return RotatedAdam(params, lr=lr, basis=basis, weight_decay=0.0)

    return make


@dataclass(frozen=True)
class LMMethod:
    """A row of the LM benchmark: its label, the hidden matrices' learning rates to sweep, its
    optimizers (built from the hidden matrices, the rest, the settings and one rate of ``grid``)."""

    label: str
    grid: tuple[float, ...]
    build: Builder

    def __post_init__(self) -> None:
        if not self.grid or any(not (math.isfinite(lr) and lr > 0) for lr in self.grid):
            raise ValueError(f"grid must hold at least one finite rate > 0, got {self.grid!r}")


# Every coarse grid spans a factor of about 30 around the rate its authors recommend (nanoGPT's
# AdamW 1e-3, Muon's usual 2e-2, GaLore's 1e-2 with scale 0.25, SOAP's 3e-3). ARO's grids get a
# fifth point because its default is chosen from these sweeps: with the paper's scale
# (adjust_lr='rms_norm', step RMS 0.2 sqrt(max(m, n)) lr, 2.3x to 3.9x lr here) around its 1e-2
# and below; with adjust_lr='fan_in' (step RMS lr / sqrt(n), torch.optim.Muon's) Muon's grid and
# one point below. Every sweep then adds refinement()'s rates.
ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
PROJECTED_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
MUON_GRID = (1e-2, 2e-2, 4e-2, 8e-2)
ARO_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
ARO_FAN_IN_GRID = (5e-3, *MUON_GRID)
LM_METHODS: dict[str, LMMethod] = {
    "adamw": LMMethod("AdamW", ADAM_GRID, lambda hidden, rest, settings, lr: [adamw(hidden + rest, settings, lr)]),
    "muon": LMMethod("torch.optim.Muon (hidden) + AdamW", MUON_GRID, beside_adamw(muon)),
    "galore": LMMethod("GaLoreAdamW", PROJECTED_GRID, build_galore),
    "dct": LMMethod("DCTProjectedAdam", PROJECTED_GRID, projected(DCTProjectedAdam)),
    "dct-ef": LMMethod(
        "DCTProjectedAdam (error_feedback=True)", PROJECTED_GRID, projected(DCTProjectedAdam, error_feedback=True)
    ),
    # The largest rank whose state stays within GaLore's at rank fraction 0.25: DCT keeps r indices
    # where GaLore keeps an m x r projector, so at equal bytes it affords rank 40 of 128 (not 32).
    "dct-bytes": LMMethod(
        "DCTProjectedAdam (rank fraction 0.3125: GaLore's state bytes)", PROJECTED_GRID,
        projected(DCTProjectedAdam, rank=0.3125),
    ),
    "aro": LMMethod(
        "ARO (hidden) + AdamW; rotate='rows' (the paper's), adjust_lr='fan_in', Nesterov", ARO_FAN_IN_GRID,
        beside_adamw(aro("rows", "fan_in", nesterov=True)),
    ),
    "aro-smaller": LMMethod(
        "ARO (hidden) + AdamW; rotate='smaller', adjust_lr='fan_in', Nesterov", ARO_FAN_IN_GRID,
        beside_adamw(aro("smaller", "fan_in", nesterov=True)),
    ),
    "aro-rms-norm": LMMethod(
        "ARO (hidden) + AdamW; rotate='smaller', adjust_lr='rms_norm' (the paper's)", ARO_GRID,
        beside_adamw(aro("smaller", "rms_norm", nesterov=False)),
    ),
    "soap": LMMethod("SOAP: RotatedAdam(basis='eigen') (hidden) + AdamW", ADAM_GRID, beside_adamw(rotated("eigen"))),
    "rotated-dct": LMMethod(
        "RotatedAdam(basis='dct') (hidden) + AdamW; no published method", ADAM_GRID, beside_adamw(rotated("dct"))
    ),
}


def _autocast(settings: LMSettings, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.autocast)


def next_byte_loss(model: nn.Module, windows: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting every byte of ``windows`` but the first from its prefix."""
    logits = model(input_ids=windows).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, settings: LMSettings, device: torch.device) -> float:
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
    starts = range(0, len(losses), chunk)
    tokens = [min(start + chunk, len(losses)) * tokens_per_step for start in starts]
    return {"tokens": tokens, "loss": [statistics.fmean(losses[start : start + chunk]) for start in starts]}


def warm_up(settings: LMSettings, train: torch.Tensor, device: torch.device) -> nn.Module:
    """Two untimed AdamW steps and a validation pass on a throwaway model; returns the model.

    The device's lazy initialisation (CUDA context, library handles, kernel selection) is then
    paid here rather than by whichever method runs first.
    """
    model = build_llama(settings.shape, settings.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.base_lr)
    starts = batch_starts(train.numel(), settings.shape.seq_len, settings.batch_size, 1, settings.seed)
    windows = gather_windows(train, starts[0], settings.shape.seq_len).to(device)
    for _ in range(2):
        with _autocast(settings, device):
            next_byte_loss(model, windows).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    validation_loss(model, windows, settings, device)
    return model


def train_lm(
    method: LMMethod, lr: float, settings: LMSettings, train: torch.Tensor, held_out: HeldOut, device: torch.device
) -> dict[str, Any]:
    """Pretrain a fresh model with ``method`` at hidden-matrix rate ``lr``; score it on both held-out sets.

    The initial weights and the batches are functions of ``settings.seed`` alone, so every method
    and rate of one seed starts from the same model and sees the same bytes.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_llama(settings.shape, settings.seed).to(device)
    optimizers = method.build(*hidden_and_rest(model), settings, lr)
    steps = settings.steps
    factor = functools.partial(lr_factor, steps=steps, warmup=settings.warmup_steps, final=settings.final_lr_fraction)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for optimizer in optimizers]
    starts = batch_starts(train.numel(), settings.shape.seq_len, settings.batch_size, steps, settings.seed)
    losses = torch.full((steps,), math.nan, device=device)
    step_ms, status, done = [], "ok", steps
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
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        losses[step] = loss.detach()
        # One host read every 50 steps: a diverged run stops instead of burning its budget.
        if ((step + 1) % 50 == 0 or step + 1 == steps) and not torch.isfinite(losses[step]):
            status, done = f"diverged: non-finite loss by step {step + 1}", step + 1
            break
    sync()
    elapsed = time.perf_counter() - start
    history = losses[:done].tolist()
    ok = status == "ok"
    return {
        "status": status,
        "train_loss": statistics.fmean(history[-min(settings.tail_steps, done) :]) if ok else math.nan,
        "tune_loss": validation_loss(model, held_out.tune, settings, device) if ok else math.nan,
        "val_loss": validation_loss(model, held_out.validation, settings, device) if ok else math.nan,
        "tokens_per_s": done * settings.tokens_per_step / elapsed,
        "optimizer_step": Timing.from_samples(step_ms),
        "state_bytes": state_bytes(optimizers)[0],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "curve": loss_curve(history, settings.tokens_per_step),
    }


def subspace_energy(matrices: Iterable[torch.Tensor], rank: int) -> tuple[float, float, float]:
    r"""Mean fraction of each gradient's energy :math:`\lVert X \rVert_F^2` inside the rank-``rank``
    subspace of its compressed side, for GaLore's choice (the top right singular vectors),
    DCTProjectedAdam's (the ``rank`` DCT columns of most energy, its ``"l2"`` scores) and a
    random subspace (in expectation, ``rank / d``).

    Each gradient is oriented as the projected optimizers do, :math:`X = G` or :math:`G^\top`
    so that its compressed side :math:`d = \min(m, n)` is last; float64.

    >>> svd, dct_columns, random = subspace_energy([torch.outer(torch.ones(4), torch.arange(4.0))], 1)
    >>> round(svd, 6), round(random, 2)
    (1.0, 0.25)
    """
    svd, columns, random = [], [], []
    for matrix in matrices:
        x = matrix.double() if matrix.shape[0] >= matrix.shape[1] else matrix.double().mT
        total = x.square().sum()
        svd.append(float(torch.linalg.svdvals(x)[:rank].square().sum() / total))
        energies = dct(x, dim=-1).square().sum(0)
        columns.append(float(energies.topk(min(rank, energies.numel())).values.sum() / total))
        random.append(min(rank, x.shape[1]) / x.shape[1])
    return statistics.fmean(svd), statistics.fmean(columns), statistics.fmean(random)


ENERGY_TABLE = "Gradient energy inside each projector's subspace at the refresh steps (AdamW run, seed 0)"


def measure_energy(context: Context) -> Part:
    """The share of the hidden matrices' gradient energy that each projector's rank-r subspace
    keeps, at every refresh step of an AdamW run of the LM case (why DCT trails GaLore in loss)."""
    settings, train, _, facts = lm_data(context.quick, context.device)
    model = build_llama(settings.shape, settings.seed).to(context.device)
    hidden, _ = hidden_and_rest(model)
    optimizer = adamw(list(model.parameters()), settings)
    starts = batch_starts(train.numel(), settings.shape.seq_len, settings.batch_size, settings.steps, settings.seed)
    rows = []
    for step in range(settings.steps):
        windows = gather_windows(train, starts[step], settings.shape.seq_len).to(context.device)
        next_byte_loss(model, windows).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        if step % settings.update_gap == 0:
            svd, columns, random = subspace_energy((param.grad for param in hidden), settings.galore_rank)
            rows.append((step, f"{svd:.3f}", f"{columns:.3f}", f"{random:.3f}"))
            print(f"  energy step {step}: SVD {svd:.3f}, DCT columns {columns:.3f}", flush=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    part = Part(facts=facts)
    header = ("Step", "GaLore: top singular vectors", "DCTProjectedAdam: DCT columns of most energy",
              "A random subspace (expected)")  # fmt: skip
    part.table(ENERGY_TABLE, header, rows)
    part.facts.append(
        f"energy: mean over the {len(hidden)} hidden matrices of the share of |X|_F^2 in a rank-{settings.galore_rank} "
        f"subspace of the compressed side, AdamW at lr {settings.base_lr:g} on every parameter."
    )
    return part


@dataclass(frozen=True)
class HeldOut:
    """The two held-out sets: ``tune`` chooses each method's rate, ``validation`` scores the choice.

    Both are ``(windows, seq_len)`` int64, consecutive windows of the held-out tail, ``tune`` first.
    """

    tune: torch.Tensor
    validation: torch.Tensor


@functools.cache
def lm_data(quick: bool, device: torch.device) -> tuple[LMSettings, torch.Tensor, HeldOut, list[str]]:
    """Settings, train tokens, the held-out sets and the run's facts, once per process.

    The device is warmed up here (see :func:`warm_up`), so no method pays its lazy setup.
    """
    settings = LM_QUICK if quick else LMSettings()
    settings = dataclasses.replace(settings, autocast=device.type == "cuda")
    corpus = load_corpus()
    train, val = split_tail(corpus.tokens, settings.val_fraction)
    windows = validation_windows(val, settings.shape.seq_len, 2 * settings.max_val_windows)
    if windows.shape[0] < 2:
        raise ValueError(f"the held-out tail ({val.numel()} tokens) holds fewer than two windows")
    half = windows.shape[0] // 2
    held_out = HeldOut(windows[:half], windows[half : 2 * half])
    model = warm_up(settings, train, device)
    hidden, _ = hidden_and_rest(model)
    shape, described = settings.shape, corpus.describe()
    facts = [
        f"lm model: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, MLP {shape.intermediate}, "
        f"context {shape.seq_len}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in hidden):,} in the attention and MLP matrices; "
        + ("bf16 autocast." if settings.autocast else "fp32."),
        f"lm corpus: {described['files']} files, {described['bytes']:,} bytes (sha256 {described['sha256'][:12]}...); "
        f"held out: {held_out.tune.numel():,} bytes to choose the rate, the next {held_out.validation.numel():,} "
        "to report the validation loss.",
        f"lm budget: {settings.steps} steps x {settings.tokens_per_step} tokens; warm-up {settings.warmup_steps} steps; "
        f"rank {settings.galore_rank}, scale {settings.scale:g}, refresh every {settings.update_gap} steps; "
        f"embeddings, norms and head on AdamW at lr {settings.base_lr:g} (but in the AdamW row); "
        f"sweep on seed {settings.seed}, the best rate rerun on seeds {settings.seed}..{settings.seed + settings.seeds - 1}.",
    ]
    return settings, train, held_out, facts


LM_HEADER = (
    "Optimizer", "Best hidden-matrix lr", "Validation loss (mean ± std)", "Final train loss", "Tokens/s",
    "Optimizer step ms", "State MiB", "Peak GPU MiB", "Status",
)  # fmt: skip
SWEEP_TABLE = "Learning-rate sweep (seed 0): held-out tuning loss per hidden-matrix lr, best in bold"
SWEEP_HEADER = ("Optimizer", "lr: tuning loss", "Best lr", "Best at the grid's edge")


def choose_lr(grid: tuple[float, ...], losses: list[float]) -> float:
    """The rate of the lowest loss; a NaN loss (a diverged run) never wins, ties go to the first.

    >>> choose_lr((1e-3, 1e-2, 1e-1), [2.0, 1.5, float("nan")])
    0.01
    """
    if len(grid) != len(losses) or not grid:
        raise ValueError(f"grid and losses must have one entry per rate, got {len(grid)} and {len(losses)}")
    return grid[min(range(len(grid)), key=lambda index: (math.isnan(losses[index]), losses[index]))]


def refinement(grid: tuple[float, ...], best: float) -> tuple[float, ...]:
    """The rates a sweep adds after its coarse grid: the geometric midpoint between ``best`` and
    each of its neighbours on ``grid`` (sorted), and at an edge of the grid one coarse step
    beyond it with its midpoint too, each rounded to two significant digits (the rate trained
    is the rate shown). Every method's sweep refines by this one rule.

    >>> refinement((1e-3, 3e-3, 1e-2), 3e-3)
    (0.0017, 0.0055)
    >>> refinement((1e-2, 2e-2, 4e-2), 4e-2)
    (0.028, 0.057, 0.08)
    """
    rates = sorted(grid)
    if len(rates) < 2:
        return ()
    index = rates.index(best)
    neighbours = [rates[i] for i in (index - 1, index + 1) if 0 <= i < len(rates)]
    beyond = [best * best / neighbours[0]] if index in (0, len(rates) - 1) else []
    points = [math.sqrt(best * other) for other in neighbours + beyond] + beyond
    return tuple(sorted({float(f"{point:.2g}") for point in points} - set(rates)))


def measure_lm(key: str, context: Context) -> Part:
    """One method of :data:`LM_METHODS`: its rate sweep on the first seed (the coarse grid, then
    :func:`refinement` around its best), then the best rate of the sweep on every seed, on the
    shared corpus, batches and initial weights."""
    method = LM_METHODS[key]
    settings, train, held_out, facts = lm_data(context.quick, context.device)
    part = Part(facts=list(facts))
    try:

        def tuned(lr: float) -> dict[str, Any]:
            run = train_lm(method, lr, settings, train, held_out, context.device)
            print(f"  {method.label} lr {lr:g}: tuning loss {run['tune_loss']:.4f} ({run['status']})", flush=True)
            return run

        sweep = {lr: tuned(lr) for lr in method.grid}
        coarse_best = choose_lr(method.grid, [sweep[lr]["tune_loss"] for lr in method.grid])
        sweep.update({lr: tuned(lr) for lr in refinement(method.grid, coarse_best)})
        grid = tuple(sorted(sweep))
        best = choose_lr(grid, [sweep[lr]["tune_loss"] for lr in grid])
        runs = [sweep[best]]
        for seed in range(settings.seed + 1, settings.seed + settings.seeds):
            runs.append(train_lm(method, best, dataclasses.replace(settings, seed=seed), train, held_out, context.device))
    except Exception as error:  # noqa: BLE001 -- a report: one failing method must not end it
        part.table(LM_TABLE, LM_HEADER, [(method.label, *("-",) * 7, failure(error))])
        return part
    losses = [run["val_loss"] for run in runs]
    statuses = sorted({run["status"] for run in runs})
    mean, spread = statistics.fmean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0
    step = Timing.from_samples([run["optimizer_step"].median_ms for run in runs])
    tokens_per_s = statistics.median(run["tokens_per_s"] for run in runs)
    peak = runs[0]["peak_memory_bytes"]
    row = (
        method.label, f"{best:g}", f"{mean:.4f} ± {spread:.4f}",
        f"{statistics.fmean(run['train_loss'] for run in runs):.4f}", f"{tokens_per_s:,.0f}",
        f"{step.median_ms:.2f}", mib(runs[0]["state_bytes"]), "-" if peak is None else mib(peak), "; ".join(statuses),
    )  # fmt: skip
    part.table(LM_TABLE, LM_HEADER, [row])
    cells = ", ".join(
        (f"**{lr:g}: {sweep[lr]['tune_loss']:.4f}**" if lr == best else f"{lr:g}: {sweep[lr]['tune_loss']:.4f}")
        for lr in grid
    )
    edge = "yes" if len(grid) > 1 and best in (grid[0], grid[-1]) else "no"
    part.table(SWEEP_TABLE, SWEEP_HEADER, [(method.label, cells, f"{best:g}", edge)])
    part.data = {
        "label": method.label, "lr": best, "val_loss": mean, "val_loss_std": spread,
        "val_losses": losses, "state_bytes": runs[0]["state_bytes"], "curve": runs[0]["curve"],
        "sweep": {"lr": list(grid), "tune_loss": [sweep[lr]["tune_loss"] for lr in grid]},
    }  # fmt: skip
    return part


def _line_plot(
    lines: list[tuple[str, list[float], list[float]]], path: Path, *, title: str, xlabel: str, ylabel: str,
    log_x: bool = False, log_y: bool = False, marker: str | None = None,
) -> None:  # fmt: skip
    """One ``(label, xs, ys)`` line per entry of ``lines`` on shared axes, saved to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    figure = Figure(figsize=(11.0, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, xs, ys in lines:
        axes.plot(xs, ys, label=label, linewidth=1.2, marker=marker)
    if log_x:
        axes.set_xscale("log")
    if log_y:
        axes.set_yscale("log")
        # Plain numbers on the log axis: the default 5x10^0 style is unreadable for losses near 1-5.
        axes.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        axes.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    # Beside the axes: ten methods' legend inside them hid a curve.
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def plot_lr_sweeps(sweeps: list[tuple[str, dict[str, list[float]]]], path: Path, *, title: str) -> None:
    """Held-out tuning loss against the hidden-matrix rate, one line per method (log x); a
    diverged run's NaN loss is left out of its line."""
    lines = []
    for label, sweep in sweeps:
        finite = [(lr, loss) for lr, loss in zip(sweep["lr"], sweep["tune_loss"]) if math.isfinite(loss)]
        if finite:
            lines.append((label, [lr for lr, _ in finite], [loss for _, loss in finite]))
    _line_plot(lines, path, title=title, xlabel="hidden-matrix learning rate (log scale)",
               ylabel="held-out tuning loss (nats per byte), seed 0", log_x=True, marker="o")  # fmt: skip


def plot_lm_curves(curves: list[tuple[str, dict[str, list[float]]]], path: Path, *, title: str) -> None:
    """Train-loss curves of every method that ran, against tokens (log-scale loss)."""
    lines = [(label, [count / 1e6 for count in curve["tokens"]], curve["loss"]) for label, curve in curves]
    _line_plot(lines, path, title=title, xlabel="training tokens (millions)",
               ylabel="train loss (nats per byte, log scale)", log_y=True)  # fmt: skip


# --------------------------------------------------------------------------- cnn


@dataclass(frozen=True)
class CNNSettings:
    """Few-shot fine-tuning of the adapters benchmark's CNN; every method trains the new head."""

    shots: int = 10
    steps: int = 100
    seeds: int = 3
    head_lr: float = 3e-3
    backbone_lr: float = 3e-4
    rank: float = 0.25
    update_gap: int = 20


CNN_QUICK = CNNSettings(shots=2, steps=4, seeds=1, update_gap=2)


def backbone_and_head(model: SmallResNet) -> tuple[Params, Params]:
    head = list(model.head.parameters())
    return [param for param in model.parameters() if all(param is not h for h in head)], head


def cnn_adamw(model: SmallResNet, settings: CNNSettings) -> torch.optim.Optimizer:
    backbone, head = backbone_and_head(model)
    groups = [{"params": backbone, "lr": settings.backbone_lr}, {"params": head}]
    return torch.optim.AdamW(groups, lr=settings.head_lr, weight_decay=0.0)


def cnn_projected(cls: type[torch.optim.Optimizer]) -> Callable[[SmallResNet, CNNSettings], torch.optim.Optimizer]:
    def build(model: SmallResNet, settings: CNNSettings) -> torch.optim.Optimizer:
        backbone, head = backbone_and_head(model)
        # The 4-D conv kernels are projected; BatchNorm's 1-D parameters take the AdamW fallback,
        # the new head (a plain 2-D weight) is kept out of the projection by its rank=None group.
        groups = [{"params": backbone, "lr": settings.backbone_lr}, {"params": head, "rank": None}]
        return cls(groups, lr=settings.head_lr, rank=settings.rank, update_gap=settings.update_gap, weight_decay=0.0)

    return build


def cnn_head_only(model: SmallResNet, settings: CNNSettings) -> torch.optim.Optimizer:
    backbone, head = backbone_and_head(model)
    for param in backbone:
        param.requires_grad_(False)
    return torch.optim.AdamW(head, lr=settings.head_lr, weight_decay=0.0)


CNN_METHODS: dict[str, tuple[str, Callable[[SmallResNet, CNNSettings], torch.optim.Optimizer]]] = {
    "adamw": ("AdamW (full fine-tuning)", cnn_adamw),
    "dct": ("DCTProjectedAdam (conv kernels projected)", cnn_projected(DCTProjectedAdam)),
    "svd": ("SVDProjectedAdam (conv kernels projected)", cnn_projected(SVDProjectedAdam)),
    "head": ("AdamW, head only", cnn_head_only),
}


def fine_tune_cnn(
    build: Callable[[SmallResNet, CNNSettings], torch.optim.Optimizer],
    settings: CNNSettings,
    seed: int,
    context: Context,
) -> dict[str, Any]:
    """Fine-tune a fresh copy of the pretrained CNN (new head, BatchNorm in eval mode); score it."""
    # BatchNorm keeps its pretrained statistics, as in the adapters benchmark.
    model = fine_tuning_model(context.quick, FINETUNE_CLASSES, seed).to(context.device).eval()
    split = load_digits_split()
    optimizer = build(model, settings)
    shots = few_shot(split.finetune_pool, settings.shots, seed)
    images, labels = shots.images.to(context.device), shots.labels.to(context.device)
    sync = context.sync or (lambda: None)
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
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    return {"accuracy": accuracy(model, split.finetune_test), "step_ms": step_ms,
            "state_bytes": state_bytes([optimizer])[0], "trainable": trainable}  # fmt: skip


CNN_HEADER = ("Method", "Test accuracy %", "Trained parameters", "State KiB", "Step ms", "Status")


def measure_cnn(key: str, context: Context) -> Part:
    """One method of :data:`CNN_METHODS` over the seeds: accuracy mean ± sample std, state, step."""
    label, build = CNN_METHODS[key]
    settings = CNN_QUICK if context.quick else CNNSettings()
    _, width, pretraining = pretrained(context.quick)
    facts = [
        f"cnn: SmallResNet width {width} pretrained {pretraining.get('epochs')} epochs on digits 0-4 "
        f"({float(pretraining.get('test_accuracy', math.nan)):.1f}% held out); {settings.shots} shots per class, "
        f"{settings.steps} steps, seeds 0..{settings.seeds - 1}; lr {settings.backbone_lr:g} backbone, "
        f"{settings.head_lr:g} head; projected rank {settings.rank:g}, refresh every {settings.update_gap} steps.",
    ]
    part = Part(facts=facts)
    try:
        runs = [fine_tune_cnn(build, settings, seed, context) for seed in range(settings.seeds)]
    except Exception as error:  # noqa: BLE001 -- a report: one failing method must not end it
        part.table(CNN_TABLE, CNN_HEADER, [(label, "-", "-", "-", "-", failure(error))])
        return part
    accuracies = [run["accuracy"] for run in runs]
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    step_ms = [ms for run in runs for ms in run["step_ms"]]
    step = f"{Timing.from_samples(step_ms).median_ms:.2f}" if step_ms else "-"
    row = (
        label, f"{statistics.fmean(accuracies):.1f} ± {spread:.1f}", f"{runs[0]['trainable']:,}",
        f"{runs[0]['state_bytes'] / 2**10:.1f}", step, "ok",
    )  # fmt: skip
    part.table(CNN_TABLE, CNN_HEADER, [row])
    return part


# --------------------------------------------------------------------------- the area


# The LM loss targets: (ours, anchor, key in benchmarks.targets), each the ratio of the two methods'
# mean validation losses at their own best rates.
LM_LOSS_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("lm:aro", "lm:muon", "optim: ARO validation loss vs Muon"),
    ("lm:aro", "lm:adamw", "optim: ARO validation loss vs AdamW"),
    ("lm:aro-smaller", "lm:muon", "optim: ARO validation loss vs Muon"),
    ("lm:aro-smaller", "lm:adamw", "optim: ARO validation loss vs AdamW"),
    ("lm:aro-rms-norm", "lm:muon", "optim: ARO validation loss vs Muon"),
    ("lm:aro-rms-norm", "lm:adamw", "optim: ARO validation loss vs AdamW"),
    ("lm:soap", "lm:adamw", "optim: SOAP validation loss vs AdamW"),
    ("lm:dct", "lm:adamw", "optim: DCT validation loss vs AdamW"),
    ("lm:dct", "lm:galore", "optim: DCT validation loss vs GaLore"),
    ("lm:dct-ef", "lm:galore", "optim: DCT validation loss vs GaLore"),
    ("lm:dct-bytes", "lm:galore", "optim: DCT validation loss vs GaLore"),
)
# State bytes in the LM run against GaLore's: the bound on "DCT <= GaLore's loss at <= its bytes".
LM_STATE_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("lm:dct", "lm:galore", "optim: DCT LM state bytes vs GaLore"),
    ("lm:dct-ef", "lm:galore", "optim: DCT LM state bytes vs GaLore"),
    ("lm:dct-bytes", "lm:galore", "optim: DCT LM state bytes vs GaLore"),
)


def summary(parts: dict[str, Part]) -> Part:
    """The LM targets between methods that both ran: validation-loss ratios and state bytes."""
    ran = {name: part.data for name, part in parts.items() if part.data.get("val_loss") is not None}
    checks = []
    for ours, anchor, key in LM_LOSS_TARGETS:
        if ours in ran and anchor in ran:
            mine, theirs = ran[ours]["val_loss"], ran[anchor]["val_loss"]
            shown = f"{mine:.4f} / {theirs:.4f} = {mine / theirs:.4f}x"
            checks.append(Check(f"{ran[ours]['label']} vs {ran[anchor]['label']}: validation loss", mine / theirs,
                                target(key), shown))  # fmt: skip
    for ours, anchor, key in LM_STATE_TARGETS:
        if ours in ran and anchor in ran and "state_bytes" in ran[ours] and "state_bytes" in ran[anchor]:
            ratio = ran[ours]["state_bytes"] / ran[anchor]["state_bytes"]
            checks.append(Check(f"{ran[ours]['label']} vs {ran[anchor]['label']}: state bytes", ratio, target(key),
                                f"{ratio:.3g}x"))  # fmt: skip
    return Part(checks=checks)


def plot(parts: dict[str, Part]) -> dict[str, Callable[[Path], None]]:
    """The LM loss curves (seed 0 at the best rate) and the rate sweeps, for the methods that ran."""
    curves = [(part.data["label"], part.data["curve"]) for part in parts.values() if part.data.get("curve")]
    sweeps = [(part.data["label"], part.data["sweep"]) for part in parts.values() if part.data.get("sweep")]
    figures: dict[str, Callable[[Path], None]] = {}
    if curves:
        figures["lm_loss"] = functools.partial(plot_lm_curves, curves, title="Byte-level LLaMA: train loss")
    if sweeps:
        title = "Byte-level LLaMA: learning-rate sweeps"
        figures["lm_lr"] = functools.partial(plot_lr_sweeps, sweeps, title=title)
    return figures


AREA = Area(
    section="optim",
    title="Optimizers",
    cases=(Case("micro", measure_micro), *cases(measure_lm, LM_METHODS, "lm:"), Case("energy", measure_energy),
           *cases(measure_cnn, CNN_METHODS, "cnn:")),  # fmt: skip
    summary=summary,
    plot=plot,
)

if __name__ == "__main__":
    sys.exit(main(AREA))
