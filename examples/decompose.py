"""Decompose every conv and linear weight of a small trained network with each `decomp` method.

The network is a ResNet-style CNN (3x3 convs, depthwise 3x3 convs, 1x1 convs) feeding a
transformer block (q/k/v/o projections and an MLP), trained for a few seconds on scikit-learn's
8x8 digits (shipped with scikit-learn, no download). Every weight is then approximated with

* ``rsvd``   -- truncated randomized SVD of the matrix view ``(c_out, c_in * k * k)``;
* ``tucker`` -- Tucker-2 over the two channel modes of a conv kernel, spatial modes kept whole (as
  tltorch's ``fixed_rank_modes='spatial'`` and LyCORIS's ``use_tucker``). Skipped for linear and
  1x1 conv weights, where Tucker-2 is the truncated SVD plus an r x r core, and for kernels with
  one input channel per group (depthwise, the stem), which have only one channel mode;
* ``kpsvd``  -- a sum of Kronecker products of the matrix view, factor shapes from ``kron_shapes``;
* ``atoms``  -- filter atoms, for convs with a spatial kernel;
* ``dct``    -- the 2-D orthonormal DCT of the matrix view, keeping the largest coefficients
  (``params`` counts their values, not their positions);
* ``ldu``    -- the exact pivoted LDU factorisation: its error is a sanity check (rounding only).

The budget is ``--energy`` (default): each method keeps that fraction of each weight's energy
(rsvd through its fixed-precision mode, atoms, kpsvd and dct by the smallest rank or coefficient
count that holds it, tucker per mode), so their ``params`` can be compared at equal error. Or
``--rank-fraction``: a fixed fraction of each method's maximum rank. ``--delta`` decomposes the
training update ``W - W_init`` instead of ``W``: a few hundred steps barely move a freshly
initialised network, whose weights are close to full rank, while the update is far more
compressible (the observation behind LoRA).

The table reports, per method and layer, the stored numbers of the factors (``params``, which can
exceed the dense weight when the budget needs a high rank), the relative Frobenius error and the
time of the decomposition; the summary adds the test accuracy of the network with every
decomposed weight replaced by its reconstruction.

Run ``make demo-decompose`` or ``.venv/bin/python examples/decompose.py --help``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm import tqdm

import decomp

METHODS = ("rsvd", "tucker", "kpsvd", "atoms", "dct", "ldu")


# --------------------------------------------------------------------------------------------
# The network


class ResidualBlock(nn.Module):
    """3x3 conv -> depthwise 3x3 conv -> 1x1 conv, with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3x3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv3x3(x)))
        h = F.relu(self.norm2(self.depthwise(h)))
        return F.relu(x + self.norm3(self.pointwise(h)))


class TransformerBlock(nn.Module):
    """Pre-norm multi-head self-attention with separate q/k/v/o projections, then an MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        h = self.norm1(tokens)
        q, k, v = (projection(h).view(batch, length, self.heads, -1).transpose(1, 2)
                   for projection in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)
        tokens = tokens + self.o(attended.transpose(1, 2).reshape(batch, length, width))
        return tokens + self.fc2(F.gelu(self.fc1(self.norm2(tokens))))


class DigitsNet(nn.Module):
    """A conv stem and two residual blocks on 8x8 images, then 2x2 patches as 16 tokens through
    one transformer block, mean-pooled into a linear classifier."""

    def __init__(self, width: int, d_model: int, heads: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.block1 = ResidualBlock(width)
        self.block2 = ResidualBlock(width)
        self.patchify = nn.Conv2d(width, d_model, 2, stride=2)
        self.transformer = TransformerBlock(d_model, heads)
        self.head = nn.Linear(d_model, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.block2(self.block1(F.relu(self.stem(images))))
        tokens = self.patchify(features).flatten(2).transpose(1, 2)
        return self.head(self.transformer(tokens).mean(dim=1))


class Digits(NamedTuple):
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits_split(generator: torch.Generator, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's 1797 8x8 digits (shipped with the package, no download), scaled to [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=generator)
    split = int(len(labels) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return Digits(images[train], labels[train], images[test], labels[test])


def train(
    model: nn.Module, data: Digits, steps: int, generator: torch.Generator, batch_size: int = 64
) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(data.train_labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    predictions = model(data.test_images).argmax(dim=1)
    return float((predictions == data.test_labels).float().mean())


def decomposable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every conv and linear weight, by module name."""
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


# --------------------------------------------------------------------------------------------
# One function per method: (weight, settings) -> Approximation, or None where it does not apply


class Approximation(NamedTuple):
    reconstruction: torch.Tensor
    parameters: int


@dataclass(frozen=True)
class Settings:
    """The budget: a fraction of each weight's energy, or (if set) of each method's maximum rank."""

    energy: float
    rank_fraction: float | None
    seed: int


def fraction_of(maximum: int, fraction: float) -> int:
    """``fraction`` of a maximum rank, at least 1."""
    return max(1, min(maximum, round(fraction * maximum)))


def count_for_energy(energies: torch.Tensor, fraction: float) -> int:
    """Smallest ``r`` such that the first ``r`` of the descending ``energies`` hold ``fraction``
    of their sum."""
    cumulative = energies.cumsum(0)
    return min(int((cumulative < fraction * cumulative[-1]).sum()) + 1, energies.numel())


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """``(c_out, c_in_g * prod(kernel))``: the view every matrix method works on."""
    return weight.reshape(weight.shape[0], -1)


def rsvd_method(weight: torch.Tensor, settings: Settings) -> Approximation:
    matrix = matrix_view(weight)
    generator = torch.Generator().manual_seed(settings.seed)
    if settings.rank_fraction is None:
        # Fixed precision: relative error sqrt(1 - energy) is exactly "keep that energy".
        result = decomp.rsvd(matrix, tol=math.sqrt(1 - settings.energy), generator=generator)
    else:
        rank = fraction_of(min(matrix.shape), settings.rank_fraction)
        result = decomp.rsvd(matrix, rank, generator=generator)
    parameters = sum(part.numel() for part in result)
    return Approximation(result.to_matrix().reshape(weight.shape), parameters)


def tucker_method(weight: torch.Tensor, settings: Settings) -> Approximation | None:
    # Tucker-2 needs two channel modes and a spatial kernel: a depthwise or single-input-channel
    # kernel has one channel mode, and on a matrix (linear, 1x1 conv) Tucker-2 is the truncated
    # SVD plus an r x r core, which rsvd already covers with fewer numbers.
    if weight.ndim < 3 or weight.shape[1] == 1 or weight.shape[2:].numel() == 1:
        return None
    if settings.rank_fraction is None:
        ranks = settings.energy  # per-mode HOSVD energy; the total error can be somewhat larger
    else:
        ranks = tuple(fraction_of(weight.shape[mode], settings.rank_fraction) for mode in (0, 1))
    result = decomp.tucker(weight, ranks, modes=(0, 1))
    parameters = result.core.numel() + sum(factor.numel() for factor in result.factors)
    return Approximation(result.to_tensor(), parameters)


def kpsvd_method(weight: torch.Tensor, settings: Settings) -> Approximation:
    matrix = matrix_view(weight)
    b_shape, c_shape = decomp.kron_shapes(*matrix.shape)
    max_rank = min(math.prod(b_shape), math.prod(c_shape))
    if settings.rank_fraction is None:
        # All terms (exact SVD of the rearrangement), then the fewest that hold the energy: the
        # error of the first r terms is the tail of S, as for a truncated SVD.
        full = decomp.kpsvd(matrix, b_shape, c_shape, max_rank, method="exact")
        rank = count_for_energy(full.S.square(), settings.energy)
        result = decomp.KronSum(full.S[:rank], full.B[:rank], full.C[:rank])
    else:
        rank = fraction_of(max_rank, settings.rank_fraction)
        result = decomp.kpsvd(matrix, b_shape, c_shape, rank)
    parameters = sum(part.numel() for part in result)
    return Approximation(result.to_matrix().reshape(weight.shape), parameters)


def atoms_method(weight: torch.Tensor, settings: Settings) -> Approximation | None:
    kernel_size = weight.shape[2:].numel() if weight.ndim > 2 else 1
    if kernel_size == 1:
        return None  # no spatial kernel: nothing for atoms to share
    if settings.rank_fraction is None:
        # The atom error is the singular-value tail of the (filters, kernel) unfolding.
        singular_values = torch.linalg.svdvals(weight.reshape(-1, kernel_size))
        num_atoms = count_for_energy(singular_values.square(), settings.energy)
    else:
        num_atoms = fraction_of(kernel_size, settings.rank_fraction)
    result = decomp.atoms(weight, num_atoms)
    return Approximation(result.to_weight(), result.num_parameters)


def dct_method(weight: torch.Tensor, settings: Settings) -> Approximation:
    matrix = matrix_view(weight)
    spectrum = decomp.dct(decomp.dct(matrix, dim=0), dim=1)
    # The 2-D DCT is orthonormal: the energy kept is the energy of the kept coefficients, so
    # keeping the largest ones until they hold the budget leaves error sqrt(1 - energy).
    energies, order = spectrum.square().flatten().sort(descending=True)
    if settings.rank_fraction is None:
        kept = count_for_energy(energies, settings.energy)
    else:
        kept = fraction_of(energies.numel(), settings.rank_fraction)
    mask = torch.zeros_like(energies, dtype=torch.bool)
    mask[order[:kept]] = True
    truncated = spectrum * mask.view_as(spectrum)
    reconstruction = decomp.idct(decomp.idct(truncated, dim=1), dim=0)
    return Approximation(reconstruction.reshape(weight.shape), kept)


def ldu_method(weight: torch.Tensor, settings: Settings) -> Approximation:
    matrix = matrix_view(weight)
    result = decomp.ldu(matrix)
    return Approximation(result.to_matrix().reshape(weight.shape), matrix.numel())


METHOD_FUNCTIONS: dict[str, Callable[[torch.Tensor, Settings], Approximation | None]] = {
    "rsvd": rsvd_method,
    "tucker": tucker_method,
    "kpsvd": kpsvd_method,
    "atoms": atoms_method,
    "dct": dct_method,
    "ldu": ldu_method,
}


# --------------------------------------------------------------------------------------------
# Running and reporting


class Row(NamedTuple):
    method: str
    layer: str
    shape: tuple[int, ...]
    parameters: int
    total: int
    relative_error: float
    milliseconds: float


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    difference = torch.linalg.vector_norm(approximation.double() - exact.double())
    return float(difference / torch.linalg.vector_norm(exact.double()))


def decompose_all(
    weights: dict[str, torch.Tensor], methods: list[str], settings: Settings, show_progress: bool
) -> tuple[list[Row], dict[str, dict[str, torch.Tensor]]]:
    """Run every method on every weight; return the table rows and the reconstructions."""
    jobs = [(method, name) for method in methods for name in weights]
    rows, reconstructions = [], {method: {} for method in methods}
    progress = tqdm(jobs, desc="decomposing", unit="layer", disable=not show_progress,
                    file=sys.stderr)
    for method, name in progress:
        weight = weights[name]
        start = time.perf_counter()
        approximation = METHOD_FUNCTIONS[method](weight, settings)
        milliseconds = 1e3 * (time.perf_counter() - start)
        if approximation is None:
            continue
        reconstructions[method][name] = approximation.reconstruction
        error = relative_error(approximation.reconstruction, weight)
        rows.append(Row(method, name, tuple(weight.shape), approximation.parameters, weight.numel(),
                        error, milliseconds))
    return rows, reconstructions


def warm_up(methods: list[str], settings: Settings) -> None:
    """Call each method once on a small kernel, so the first timed layer does not pay for
    torch's lazy initialisation of its linear-algebra backends."""
    weight = torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    for method in methods:
        METHOD_FUNCTIONS[method](weight, settings)


@torch.no_grad()
def accuracy_with(model: nn.Module, replacements: dict[str, torch.Tensor], data: Digits) -> float:
    """Test accuracy with some weights swapped for their reconstructions, then restored."""
    modules = dict(model.named_modules())
    originals = {name: modules[name].weight.detach().clone() for name in replacements}
    for name, weight in replacements.items():
        modules[name].weight.copy_(weight)
    try:
        return accuracy(model, data)
    finally:
        for name, weight in originals.items():
            modules[name].weight.copy_(weight)


def format_table(header: list[str], rows: list[list[str]], text_columns: int) -> str:
    """Plain-text table: the first ``text_columns`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) if i < text_columns else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths)))

    rule = line(["-" * width for width in widths])
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def print_report(
    rows: list[Row], accuracies: dict[str, float], baseline_accuracy: float | None
) -> None:
    print(format_table(
        ["method", "layer", "shape", "params", "of", "kept", "rel. error", "ms"],
        [[row.method, row.layer, "x".join(map(str, row.shape)), str(row.parameters),
          str(row.total), f"{100 * row.parameters / row.total:.1f}%", f"{row.relative_error:.2e}",
          f"{row.milliseconds:.2f}"]
         for row in rows],
        text_columns=3,
    ))
    print()
    summary = []
    for method in dict.fromkeys(row.method for row in rows):
        mine = [row for row in rows if row.method == method]
        kept = sum(row.parameters for row in mine) / sum(row.total for row in mine)
        worst = max(row.relative_error for row in mine)
        accuracy_cell = f"{100 * accuracies[method]:.1f}%" if method in accuracies else "-"
        summary.append([method, str(len(mine)), f"{100 * kept:.1f}%", f"{worst:.2e}",
                        f"{sum(row.milliseconds for row in mine):.1f}", accuracy_cell])
    header = ["method", "layers", "params kept", "worst rel. error", "total ms", "test acc."]
    print(format_table(header, summary, text_columns=1))
    if baseline_accuracy is not None:
        print(f"\ntest accuracy of the undecomposed network: {100 * baseline_accuracy:.1f}%")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--energy", type=float, default=0.95,
                        help="keep this fraction of each weight's energy (squared Frobenius norm), "
                             "in (0, 1); rsvd, kpsvd, atoms and dct then have relative error "
                             "<= sqrt(1 - energy) (default 0.95)")
    budget.add_argument("--rank-fraction", type=float, default=None,
                        help="instead, use this fraction of each method's maximum rank (of the DCT "
                             "coefficients for dct), in (0, 1]")
    parser.add_argument("--width", type=int, default=32, help="CNN channels (default 32)")
    parser.add_argument("--d-model", type=int, default=64,
                        help="transformer width, a multiple of 4 (default 64)")
    parser.add_argument("--train-steps", type=int, default=150,
                        help="Adam steps on the digits before decomposing; 0 keeps the random init "
                             "(default 150)")
    parser.add_argument("--delta", action="store_true",
                        help="decompose the training update W - W_init (what an adapter learns) "
                             "instead of W")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these layers are too small "
                             "to gain from more)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the init, the data split and the sketches (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    args.methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods must be a comma-separated subset of {list(METHODS)}, "
                     f"got {args.methods}")
    if not 0 < args.energy < 1:
        parser.error(f"--energy must be in (0, 1), got {args.energy}")
    if args.rank_fraction is not None and not 0 < args.rank_fraction <= 1:
        parser.error(f"--rank-fraction must be in (0, 1], got {args.rank_fraction}")
    if args.delta and not args.train_steps:
        parser.error("--delta needs --train-steps > 0: without training the update is zero")
    if args.width < 1 or args.d_model < 4 or args.d_model % 4:
        parser.error("--width must be >= 1 and --d-model a positive multiple of 4")
    if args.train_steps < 0 or args.threads < 1:
        parser.error("--train-steps must be >= 0 and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads_before)


def run(args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = DigitsNet(args.width, args.d_model).eval()
    initial = {name: weight.clone() for name, weight in decomposable_weights(model).items()}
    data = load_digits_split(generator)

    baseline_accuracy = None
    if args.train_steps:
        start = time.perf_counter()
        train(model, data, args.train_steps, generator)
        baseline_accuracy = accuracy(model, data)
        print(f"trained {args.train_steps} steps on sklearn digits in "
              f"{time.perf_counter() - start:.1f} s, test accuracy {100 * baseline_accuracy:.1f}%")

    weights = decomposable_weights(model)
    targets = {name: weights[name] - initial[name] for name in weights} if args.delta else weights
    settings = Settings(args.energy, args.rank_fraction, args.seed)
    what = "training update W - W_init" if args.delta else "weight"
    budget = (f"{args.energy:.0%} of each {what}'s energy" if args.rank_fraction is None
              else f"{args.rank_fraction:.0%} of each method's maximum rank, on each {what}")
    print(f"budget: {budget}\n")
    warm_up(args.methods, settings)
    rows, reconstructions = decompose_all(
        targets, args.methods, settings, show_progress=not args.no_progress
    )
    if args.delta:
        reconstructions = {
            method: {name: initial[name] + update for name, update in updates.items()}
            for method, updates in reconstructions.items()
        }
    accuracies = {}
    if args.train_steps:
        accuracies = {method: accuracy_with(model, replaced, data)
                      for method, replaced in reconstructions.items()}
    print_report(rows, accuracies, baseline_accuracy)
    if not args.delta and args.train_steps:
        print("A few steps barely move a fresh network, whose weights are close to full rank;\n"
              "--delta decomposes the training update W - W_init, the part an adapter learns.")
    return rows


if __name__ == "__main__":
    main()
