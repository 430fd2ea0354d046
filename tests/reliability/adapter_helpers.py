"""Shared by the tests/reliability/test_adapter_*.py files: tiny models and a "nothing changed" check.

``Snapshot`` records everything an adapter helper could change in a model -- every tensor value,
which Parameter object sits in each slot, every ``requires_grad`` flag, every module's class and the
parametrizations on its weight -- and ``assert_unchanged`` compares a model against it after a call
that raised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import AdapterParam, trainable_parameters

from tests.contracts.registry import ADAPTER_CASES, AdapterCase

Tensors = dict[str, torch.Tensor]
Metadata = dict[str, str]
_INPUT_SHAPES = {"linear": (3, 8), "conv1d": (2, 4, 7), "conv2d": (2, 4, 5, 5), "conv3d": (2, 2, 4, 4, 4)}


class Bank(nn.Module):
    """One small layer per kind, each fed its own fixed input; the output is every output, flat."""

    def __init__(self, kinds: frozenset[str] | set[str], seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            available: dict[str, Callable[[], nn.Module]] = {
                "linear": lambda: nn.Linear(8, 6),
                "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1),
                "conv2d": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
                "conv3d": lambda: nn.Conv3d(2, 4, 2, padding=1),
            }
            self.layers = nn.ModuleDict({kind: available[kind]() for kind in sorted(kinds)})
            self.inputs = {kind: torch.randn(_INPUT_SHAPES[kind]) for kind in self.layers}

    def forward(self) -> torch.Tensor:
        return torch.cat([layer(self.inputs[kind]).flatten() for kind, layer in self.layers.items()])


def adapter_cases(start: int = 0) -> st.SearchStrategy[AdapterCase]:
    """The registry's adapter cases, the simplest (first-tried) being ``ADAPTER_CASES[start]``.

    A test parametrized over faults passes a different ``start`` per fault, so that under the
    derandomized ci profile every adapter meets some fault in its first example.
    """
    start %= len(ADAPTER_CASES)
    return st.sampled_from(ADAPTER_CASES[start:] + ADAPTER_CASES[:start])


@st.composite
def cases_and_banks(draw: st.DrawFn, start: int = 0) -> tuple[AdapterCase, frozenset[str]]:
    """An adapter case of the contract registry and a non-empty set of layer kinds it supports."""
    case = draw(adapter_cases(start))
    kinds = draw(st.sets(st.sampled_from(sorted(case.layers)), min_size=1))
    return case, frozenset(kinds)


def factory(case: AdapterCase) -> Callable[[str, nn.Module], AdapterParam]:
    return lambda name, module: case.factory()


def train_step(model: nn.Module, seed: int = 0, *inputs: torch.Tensor) -> None:
    """One Adam step on a random linear loss, so that every adapter tensor moves off its init."""
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    output = model(*inputs)
    direction = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed))
    (output * direction).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def parametrized_layers(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Qualified name -> class names of the parametrizations on its weight, for every such module."""
    return {
        name: tuple(type(item).__name__ for item in module.parametrizations.weight)
        for name, module in model.named_modules(remove_duplicate=False)
        if parametrize.is_parametrized(module, "weight")
    }


class Snapshot:
    """Everything about ``model`` an adapter helper may change, copied now."""

    def __init__(self, model: nn.Module) -> None:
        self.values = {key: value.detach().clone() for key, value in model.state_dict().items()}
        parameters = list(model.named_parameters(remove_duplicate=False))
        self.identities = {name: id(parameter) for name, parameter in parameters}
        self.flags = {name: parameter.requires_grad for name, parameter in parameters}
        self.classes = {name: type(module) for name, module in model.named_modules(remove_duplicate=False)}
        self.parametrized = parametrized_layers(model)

    def assert_unchanged(self, model: nn.Module) -> None:
        now = Snapshot(model)
        assert now.classes == self.classes, "a module's class changed"
        assert now.parametrized == self.parametrized, "the parametrized layers changed"
        assert now.identities == self.identities, "a Parameter was replaced"
        assert now.flags == self.flags, "a requires_grad flag changed"
        assert now.values.keys() == self.values.keys(), "the state_dict keys changed"
        for key, value in self.values.items():
            assert torch.equal(now.values[key], value), f"{key} changed"


def read_file(path: Path) -> tuple[Tensors, Metadata]:
    """The tensors and metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata())


def edit_entries(metadata: Metadata, edit: Callable[[list[dict[str, Any]]], Any]) -> Metadata:
    """``metadata`` with its layer list passed through ``edit`` (in place, or returning a new list)."""
    entries = json.loads(metadata["decomp.adapters"])
    edited = edit(entries)
    return {**metadata, "decomp.adapters": json.dumps(entries if edited is None else edited)}


def tiny_llama(*, tied: bool, layers: int = 1) -> nn.Module:
    """A randomly initialised transformers ``LlamaForCausalLM`` of width 32 and vocabulary 64."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)
