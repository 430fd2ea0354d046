"""Mechanism 4: tied and shared weights -- the right answer or an error naming the tie.

Three ways a weight can be shared, each over every adapter of the contract registry:

* a weight ``Parameter`` held by two modules (an LM head tied to its embedding; two Linear or two
  Conv1d layers sharing one Parameter): ``apply`` and ``load_adapter`` refuse to adapt it, naming
  both holders, and change nothing; adapting the other layers leaves the tie intact. An adapter
  registered on it by hand trains, and ``merge`` then reproduces the adapted outputs without
  rewriting the other holder;
* one module reachable under two names (a layer used twice): it is one layer, adapted once under
  its first name (whichever name ``target`` matched), and trains, saves, loads and merges as one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import SVDParam, apply, load_adapter, merge, report, save_adapter
from decomp.adapters.model import adapted_layers

from .adapter_helpers import (
    Snapshot,
    adapter_cases,
    factory,
    parametrized_layers,
    tiny_llama,
    train_step,
)


class TiedLM(nn.Module):
    """Embedding -> Linear -> Linear head whose weight IS the embedding's (tie_word_embeddings)."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.emb = nn.Embedding(10, 6)
            self.mid = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.tokens = torch.tensor([0, 3, 9, 4, 4, 1])

    def forward(self) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(self.tokens))))


class SharedPair(nn.Module):
    """Two layers of one kind holding one weight Parameter (each its own bias), and a free layer."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            make = (lambda: nn.Linear(6, 6)) if kind == "linear" else (lambda: nn.Conv1d(6, 6, 3, padding=1))
            self.first, self.second, self.free = make(), make(), make()
        self.second.weight = self.first.weight
        self.x = torch.randn((2, 6) if kind == "linear" else (2, 6, 5), generator=torch.Generator().manual_seed(2))

    def forward(self) -> torch.Tensor:
        return self.free(torch.tanh(self.second(torch.tanh(self.first(self.x)))))


class Reused(nn.Module):
    """One layer applied twice, reachable as ``block.0`` and ``block.2``, then a free head."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(3)
            layer = nn.Linear(6, 6) if kind == "linear" else nn.Conv1d(6, 6, 3, padding=1)
            self.block = nn.Sequential(layer, nn.Tanh(), layer)
            self.head = nn.Linear(6, 4) if kind == "linear" else nn.Conv1d(6, 4, 1)
        self.x = torch.randn((2, 6) if kind == "linear" else (2, 6, 5), generator=torch.Generator().manual_seed(4))

    def forward(self) -> torch.Tensor:
        return self.head(self.block(self.x))


def tied_model(tie: str) -> tuple[nn.Module, dict[str, str]]:
    """The model and, per tied layer, the qualified name of the other holder of its weight."""
    if tie == "lm_head":
        return TiedLM(), {"head": "emb.weight"}
    kind = tie.split("-")[1]
    return SharedPair(kind), {"first": "second.weight", "second": "first.weight"}


TIES = ["lm_head", "pair-linear", "pair-conv1d"]


@pytest.mark.parametrize("tie", TIES)
@settings(max_examples=8)
@given(data=st.data())
def test_apply_refuses_a_shared_weight_naming_both_holders(tie, data):
    case = data.draw(adapter_cases(7 * TIES.index(tie)), label="adapter")
    model, partners = tied_model(tie)
    tied_layer = data.draw(st.sampled_from(sorted(partners)))
    target = data.draw(st.sampled_from([[tied_layer], tied_layer, "mid|head|first|second|free"]))
    before = Snapshot(model)
    with pytest.raises(ValueError, match="tied weights") as raised:
        apply(model, factory(case), target=target)
    assert f"the weight of layer {tied_layer!r} is shared with {partners[tied_layer]!r}" in str(raised.value)
    before.assert_unchanged(model)


@pytest.mark.parametrize("tie", TIES)
@settings(max_examples=5)
@given(data=st.data())
def test_adapting_around_a_tie_keeps_it(tie, data):
    case = data.draw(adapter_cases(7 * TIES.index(tie)), label="adapter")
    model, partners = tied_model(tie)
    shared = model.get_submodule(next(iter(partners))).weight
    pretrained = shared.detach().clone()
    free = "mid" if tie == "lm_head" else "free"
    apply(model, factory(case), target=free)
    train_step(model)
    adapted = model().detach()
    merge(model)
    torch.testing.assert_close(model(), adapted, rtol=1e-5, atol=1e-5)
    assert all(model.get_submodule(name).weight is shared for name in partners)
    assert torch.equal(shared, pretrained)


@pytest.mark.parametrize("tie", TIES)
@settings(max_examples=8)
@given(data=st.data())
def test_merge_of_a_hand_registered_tied_layer_keeps_the_other_holder(tie, data):
    case = data.draw(adapter_cases(7 * TIES.index(tie) + 3), label="adapter")
    model, partners = tied_model(tie)
    registered = data.draw(st.sets(st.sampled_from(sorted(partners)), min_size=1))
    shared = model.get_submodule(next(iter(partners))).weight
    for name in sorted(registered):
        parametrize.register_parametrization(model.get_submodule(name), "weight", case.factory())
    train_step(model)  # trains the shared weight too: nothing froze it
    trained = shared.detach().clone()
    adapted = model().detach()
    merge(model)
    assert parametrized_layers(model) == {}
    torch.testing.assert_close(model(), adapted, rtol=1e-5, atol=1e-5)
    # Every holder without an adapter still holds the shared Parameter, with its trained value.
    untouched = {"emb"} if tie == "lm_head" else set(partners) - registered
    for name in untouched:
        assert model.get_submodule(name).weight is shared
        assert torch.equal(shared, trained), f"merge rewrote the weight {name!r} shares"


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@settings(max_examples=10)
@given(data=st.data())
def test_a_module_used_twice_is_one_layer_everywhere(kind, data):
    case = data.draw(adapter_cases(10 * (kind == "conv1d")), label="adapter")
    model = Reused(kind)
    target = data.draw(st.sampled_from([None, r"block\.0", r"block\.2", r"block\.\d"]))
    apply(model, factory(case), target=target)
    expected = {"block.0", "block.2"}  # the default leaves the output layer, head, out
    assert set(parametrized_layers(model)) == expected
    assert len(model.block[0].parametrizations.weight) == 1
    layers = [layer.name for layer in adapted_layers(model)]
    assert layers == sorted(expected - {"block.2"}) and [row.name for row in report(model)] == layers
    train_step(model)
    adapted = model().detach()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "adapter.safetensors"
        save_adapter(model, path)
        fresh = load_adapter(Reused(kind), path)
    assert fresh.block[0] is fresh.block[2]
    torch.testing.assert_close(fresh(), adapted, rtol=0, atol=0)
    merge(model)
    assert parametrized_layers(model) == {} and model.block[0] is model.block[2]
    torch.testing.assert_close(model(), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", TIES)
def test_load_adapter_refuses_a_tied_layer_unchanged(tmp_path, tie):
    # The file comes from the same architecture without the tie.
    if tie == "lm_head":
        untied, tied, layer, partner = TiedLM(tied=False), TiedLM(), "head", "emb.weight"
    else:
        kind = tie.split("-")[1]
        untied, tied, layer, partner = SharedPair(kind), SharedPair(kind), "second", "first.weight"
        untied.second.weight = nn.Parameter(untied.first.weight.detach().clone())
    path = tmp_path / "adapter.safetensors"
    save_adapter(apply(untied, SVDParam, target=layer), path)
    before = Snapshot(tied)
    with pytest.raises(ValueError, match=rf"the weight of layer '{layer}' is shared with '{partner}'"):
        load_adapter(tied, path)
    before.assert_unchanged(tied)


def test_regression_svd_on_a_tied_lm_head():
    # Seen: apply adapted the head, one step, merge rewrote the embedding; the merged output
    # differed from the adapted one by 2e5.
    model = TiedLM()
    with pytest.raises(ValueError, match=r"'head' is shared with 'emb.weight' \(tied weights\)"):
        apply(model, SVDParam, target=["head"])
    assert parametrized_layers(model) == {} and model.head.weight is model.emb.weight

    parametrize.register_parametrization(model.head, "weight", SVDParam())
    train_step(model)
    embedding = model.emb.weight.detach().clone()
    adapted = model().detach()
    merge(model)
    assert torch.equal(model.emb.weight, embedding)
    torch.testing.assert_close(model(), adapted, rtol=1e-5, atol=1e-5)


def test_transformers_tied_lm_head_is_named():
    pytest.importorskip("transformers")
    model = tiny_llama(tied=True)
    before = Snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head' is shared with 'model.embed_tokens.weight'"):
        apply(model, SVDParam, target=["q_proj", "lm_head"], rank=2)
    before.assert_unchanged(model)
    apply(model, SVDParam, target=r".*\.(q_proj|v_proj)", rank=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
