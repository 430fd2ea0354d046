"""The optimizer benchmark's language-model task: a byte-level corpus and a small LLaMA.

Corpus: the source files of the running Python's standard library (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, recursively, without ``site-packages``/``dist-packages``),
read as bytes in the order of their sorted relative paths and concatenated. Every byte is a
token (vocabulary 256), so there is no tokenizer and nothing to download. The last
``val_fraction`` of the bytes is held out for validation. The corpus depends on the Python
version, so :class:`Corpus` records its file count, size and SHA-256 for the report.

Batches: ``batch_size`` windows of ``seq_len`` tokens at start offsets drawn uniformly from the
training split by a generator seeded with the run's seed (:func:`batch_starts`), so every
optimizer sees the same batches in the same order. Validation: consecutive non-overlapping
windows from the start of the held-out tail (:func:`validation_windows`).

Model: ``transformers``' ``LlamaForCausalLM`` from a :class:`LlamaShape` (untied embeddings), its
weights a function of the seed (:func:`build_llama`).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "EXCLUDED_DIRECTORIES",
    "VOCAB_SIZE",
    "Corpus",
    "LlamaShape",
    "batch_starts",
    "build_llama",
    "gather_windows",
    "load_corpus",
    "split_tail",
    "stdlib_sources",
    "validation_windows",
]

VOCAB_SIZE = 256
# Third-party packages installed into the interpreter's tree are not the standard library.
EXCLUDED_DIRECTORIES = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """The concatenated bytes as a ``(n,)`` uint8 tensor, and where they came from."""

    tokens: torch.Tensor
    files: int
    sha256: str
    root: str

    def describe(self) -> dict[str, object]:
        """The corpus's provenance for the results file (no tensor)."""
        return {
            "root": self.root,
            "files": self.files,
            "bytes": self.tokens.numel(),
            "sha256": self.sha256,
        }


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """Every ``*.py`` file under ``root`` (default: the standard library), sorted by relative path.

    Files inside :data:`EXCLUDED_DIRECTORIES` are skipped.

    >>> sources = stdlib_sources()
    >>> any(path.name == "argparse.py" for path in sources)
    True
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise ValueError(f"root must be a directory, got {str(root)!r}")
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if path.is_file() and not EXCLUDED_DIRECTORIES.intersection(relative.parts[:-1]):
            found.append((relative.as_posix(), path))
    return [path for _, path in sorted(found)]


def load_corpus(root: str | Path | None = None) -> Corpus:
    """The bytes of :func:`stdlib_sources` concatenated in order; raises if there are none."""
    sources = stdlib_sources(root)
    if not sources:
        raise ValueError(f"no *.py files under {str(root)!r}")
    data = b"".join(path.read_bytes() for path in sources)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    resolved = sysconfig.get_paths()["stdlib"] if root is None else str(root)
    return Corpus(tokens, len(sources), hashlib.sha256(data).hexdigest(), resolved)


def split_tail(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)``: the last ``round(val_fraction * n)`` tokens are held out.

    >>> train, val = split_tail(torch.arange(10), 0.2)
    >>> train.tolist(), val.tolist()
    ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    held_out = round(val_fraction * tokens.numel())
    if held_out < 1 or held_out >= tokens.numel():
        raise ValueError(
            f"val_fraction {val_fraction} of {tokens.numel()} tokens leaves an empty split"
        )
    cut = tokens.numel() - held_out
    return tokens[:cut], tokens[cut:]


def batch_starts(length: int, seq_len: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size)`` int64 window starts, uniform in ``[0, length - seq_len]``; seeded.

    >>> starts = batch_starts(100, 10, 4, 3, seed=0)
    >>> starts.shape, bool((starts >= 0).all() and (starts <= 90).all())
    (torch.Size([3, 4]), True)
    """
    if seq_len > length:
        raise ValueError(f"seq_len {seq_len} is longer than the split ({length} tokens)")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, length - seq_len + 1, (steps, batch_size), generator=generator)


def gather_windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ``(len(starts), seq_len)`` int64 windows ``tokens[s : s + seq_len]``.

    >>> gather_windows(torch.arange(10), torch.tensor([0, 5]), 3).tolist()
    [[0, 1, 2], [5, 6, 7]]
    """
    index = starts[:, None] + torch.arange(seq_len, device=starts.device)
    return tokens[index].long()


def validation_windows(tokens: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to ``max_windows`` consecutive non-overlapping windows from the start of ``tokens``.

    >>> validation_windows(torch.arange(10), 3, 2).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    count = min(tokens.numel() // seq_len, max_windows)
    if count < 1:
        raise ValueError(
            f"the validation split ({tokens.numel()} tokens) is shorter than seq_len {seq_len}"
        )
    return tokens[: count * seq_len].reshape(count, seq_len).long()


@dataclass(frozen=True)
class LlamaShape:
    """A LLaMA's size: width, depth, heads (no grouped-query attention), MLP width, context."""

    hidden: int = 384
    layers: int = 8
    heads: int = 6
    intermediate: int = 1024
    seq_len: int = 256


def build_llama(shape: LlamaShape, seed: int) -> nn.Module:
    """A random byte-level ``LlamaForCausalLM`` (fp32, CPU), its weights a function of ``seed``.

    >>> model = build_llama(LlamaShape(hidden=16, layers=1, heads=2, intermediate=32, seq_len=8), 0)
    >>> model(torch.zeros(1, 8, dtype=torch.long)).logits.shape
    torch.Size([1, 8, 256])
    """
    from transformers import LlamaConfig, LlamaForCausalLM  # imported on use: it takes seconds

    if shape.hidden % shape.heads:
        raise ValueError(f"hidden {shape.hidden} must be a multiple of heads {shape.heads}")
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
