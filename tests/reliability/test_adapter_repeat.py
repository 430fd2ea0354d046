"""Mechanism 5: repeated calls compose, heads cover their submodules, adapters never stack.

* ``apply`` called up to three times (drawn adapters, targets and heads, a container as a head):
  after every call exactly the adapters' Parameters and every call's heads are trainable, the
  earlier adapters keep their flags, no head or head descendant is adapted, and every adapted
  layer's pretrained weight and bias are frozen -- but a tensor another module holds (a bias
  shared with an earlier head) keeps its flag; a factory returning one adapter for two layers is
  refused.
* A layer that already carries an adapter, a ``weight_norm``/``spectral_norm`` parametrization or
  the old hook-based ``weight_norm``/``spectral_norm``, reached through ``apply`` (default or
  explicit target), ``load_adapter`` or a verbatim ``register_parametrization``: the documented
  error, saying what to do, and the model unchanged.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import AdapterParam, AtomParam, LieParam, apply, load_adapter, save_adapter

from tests.contracts.registry import ADAPTER_CASES

from .adapter_helpers import Snapshot, adapter_cases, factory, parametrized_layers, train_step

LAYERS = ["features.0", "features.2", "fc", "fc2"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
            self.fc = nn.Linear(4, 6)
            # 4 outputs, not 3: a (3, 6) weight holds 18 numbers, fewer than SNELLA's smallest
            # default budget (21), which then refuses the layer by design
            self.fc2 = nn.Linear(6, 4)
        self.x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))

    def forward(self) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc(self.features(self.x).mean((2, 3)))))


def pattern(names: set[str]) -> str:
    return "|".join(re.escape(name) for name in sorted(names))


def layers_under(names: set[str]) -> set[str]:
    """The layers a set of heads covers (a container covers its submodules)."""
    return {layer for layer in LAYERS if any(layer == name or layer.startswith(name + ".") for name in names)}


def adapter_flags(model: nn.Module) -> dict[str, bool]:
    return {
        name: parameter.requires_grad
        for module_name, module in model.named_modules()
        if isinstance(module, AdapterParam)
        for name, parameter in module.named_parameters(prefix=module_name)
    }


@settings(max_examples=25)
@given(data=st.data())
def test_repeated_apply_composes(data):
    model = Net()
    adapted: set[str] = set()
    heads: set[str] = set()
    flags: dict[str, bool] = {}
    for _ in range(data.draw(st.integers(1, 3), label="calls")):
        free = [layer for layer in LAYERS if layer not in adapted | heads]
        if not free:
            break
        targets = data.draw(st.sets(st.sampled_from(free), min_size=1), label="targets")
        head_pool = [name for name in LAYERS + ["features"] if not layers_under({name}) & (adapted | targets)]
        call_heads = data.draw(st.sets(st.sampled_from(head_pool)) if head_pool else st.just(set()), label="heads")
        case = data.draw(st.sampled_from(ADAPTER_CASES), label="adapter")
        apply(model, factory(case), target=pattern(targets), train_heads=pattern(call_heads) or None)
        adapted |= targets
        heads |= layers_under(call_heads)

        assert set(parametrized_layers(model)) == adapted
        now = adapter_flags(model)
        assert all(now[name] == flag for name, flag in flags.items()), "a later call changed an adapter's flags"
        assert any(now[name] for name in now if name not in flags), "the new adapters are not trainable"
        flags = now
        for name, parameter in model.named_parameters():
            if name in flags:
                continue
            layer = name.split(".parametrizations.")[0] if ".parametrizations." in name else name.rsplit(".", 1)[0]
            assert parameter.requires_grad == (layer in heads), name
    train_step(model)


def test_regression_second_apply_keeps_the_first_heads_trainable():
    model = apply(Net(), AtomParam, target=r"features\.0", train_heads="fc2")
    apply(model, LieParam, target="fc")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert {"fc2.weight", "fc2.bias"} <= trainable
    assert not model.fc.bias.requires_grad and not model.features[2].weight.requires_grad


class SharedBiasNet(Net):
    """Net whose fc2 computes 6 outputs with fc's bias: one bias Parameter held by two layers."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(2)
            self.fc2 = nn.Linear(6, 6)
        self.fc2.bias = self.fc.bias


def test_a_later_apply_keeps_a_tensor_it_shares_with_an_earlier_head_trainable():
    # Seen: fc2 was a head of the first call, and adapting fc (whose bias IS fc2's) in the second
    # call froze fc2's bias with it. A tensor another module holds keeps its flag, as every
    # tensor outside the new layers does.
    model = apply(SharedBiasNet(), AtomParam, target=r"features\.0", train_heads="fc2")
    apply(model, LieParam, target="fc")
    assert model.fc2.bias is model.fc.bias
    assert model.fc2.weight.requires_grad and model.fc2.bias.requires_grad
    assert not model.fc.parametrizations.weight.original.requires_grad
    # the first call behaves the same way: the head's shared bias stays trainable
    first = apply(SharedBiasNet(), LieParam, target="fc", train_heads="fc2")
    assert first.fc2.bias.requires_grad


def test_a_factory_returning_one_adapter_for_two_layers_is_refused():
    # Seen: both layers were registered with the same adapter object, built from the first
    # layer's weight; after training the second layer applied the first one's update.
    model = Net()
    shared = LieParam()
    before = Snapshot(model)
    with pytest.raises(ValueError, match="returned the same adapter for 'fc' and 'fc2'; return a new one per layer"):
        apply(model, lambda name, module: shared, target="fc|fc2")
    before.assert_unchanged(model)
    assert not shared.is_built


@settings(max_examples=10)
@given(case=st.sampled_from(ADAPTER_CASES), target=st.sampled_from([None, ".*"]))
def test_a_container_head_covers_its_submodules(case, target):
    # Seen: train_heads="features" adapted features.0 and features.2 and left their pretrained
    # weights trainable (they are parameters of the container).
    model = apply(Net(), factory(case), target=target, train_heads="features")
    # The default leaves the output layer, fc2, out.
    assert set(parametrized_layers(model)) == ({"fc"} if target is None else {"fc", "fc2"})
    assert all(parameter.requires_grad for parameter in model.features.parameters())
    assert not any(parameter.requires_grad for parameter in (model.fc.bias, model.fc2.bias))


def test_a_target_inside_a_head_is_named():
    model = Net()
    before = Snapshot(model)
    with pytest.raises(ValueError, match=r"matched only train_heads modules or their submodules \['features.0'\]"):
        apply(model, AtomParam, target=r"features\.0", train_heads="features")
    before.assert_unchanged(model)


def test_a_head_holding_an_adapted_layer_is_refused():
    model = apply(Net(), AtomParam, target=r"features\.0")
    before = Snapshot(model)
    with pytest.raises(ValueError, match="train_heads matched 'features', which holds the adapted layer 'features.0'"):
        apply(model, AtomParam, target="fc", train_heads="features")
    before.assert_unchanged(model)


# --------------------------------------------------------------------------------------------
# A layer whose weight is already parametrized or computed by a hook

OBSTACLES = ["adapter", "weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"]
ROUTES = ["apply-default", "apply-target", "load_adapter", "verbatim"]


def obstruct(model: Net, name: str, obstacle: str) -> None:
    layer = model.get_submodule(name)
    if obstacle == "adapter":
        apply(model, AtomParam, target=re.escape(name))
    elif obstacle == "weight_norm":
        nn.utils.parametrizations.weight_norm(layer)
    elif obstacle == "spectral_norm":
        nn.utils.parametrizations.spectral_norm(layer)
    elif obstacle == "old_weight_norm":
        with pytest.warns(FutureWarning):
            nn.utils.weight_norm(layer)
    else:
        nn.utils.spectral_norm(layer)


def expected_error(obstacle: str, route: str, name: str) -> tuple[type[Exception], str]:
    if route == "verbatim":
        if obstacle.startswith("old_"):
            # torch refuses before any adapter code runs: the weight is no Parameter.
            return ValueError, "does not have a parameter, a buffer, or a parametrized element"
        return RuntimeError, r"not built yet.*already parametrized.*adapters do not stack"
    if obstacle == "adapter":
        if route == "load_adapter":
            return ValueError, "is adapted in the file but not in the model"
        return ValueError, rf"layer '{re.escape(name)}' is already adapted \(AtomParam\).*merge\(model\)"
    if obstacle.startswith("old_"):
        hook = "WeightNorm" if obstacle == "old_weight_norm" else "SpectralNorm"
        return ValueError, rf"'{re.escape(name)}' computes its weight in a forward pre-hook \({hook}.*remove the hook"
    kind = "_WeightNorm" if obstacle == "weight_norm" else "_SpectralNorm"
    return ValueError, rf"'{re.escape(name)}' has its weight parametrized by {kind}.*remove it first"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("obstacle", OBSTACLES)
@settings(max_examples=3)
@given(data=st.data())
def test_an_obstructed_layer_is_refused_and_nothing_changes(obstacle, route, data):
    case = data.draw(adapter_cases(len(ROUTES) * OBSTACLES.index(obstacle) + ROUTES.index(route)), label="adapter")
    name = data.draw(st.sampled_from(["features.2", "fc"]), label="layer")
    model = Net().eval()  # spectral_norm's power iteration would move its buffers on any read
    obstruct(model, name, obstacle)
    if route == "load_adapter":
        source = apply(Net(), factory(case), target=pattern({name, "fc2"}))
        directory = tempfile.TemporaryDirectory()
        path = Path(directory.name) / "adapter.safetensors"
        save_adapter(source, path)
    error, message = expected_error(obstacle, route, name)
    before = Snapshot(model)
    with pytest.raises(error, match=message):
        if route == "apply-default":
            apply(model, factory(case), target=r".*")
        elif route == "apply-target":
            apply(model, factory(case), target=re.escape(name))
        elif route == "load_adapter":
            load_adapter(model, path)
        else:
            parametrize.register_parametrization(model.get_submodule(name), "weight", case.factory())
    before.assert_unchanged(model)
    if route == "load_adapter":
        directory.cleanup()


def test_an_unchecked_verbatim_stack_fails_at_first_use_with_the_same_advice():
    # unsafe=True skips torch's checks, so nothing calls the adapter at registration: it is
    # appended unbuilt, and the first forward says what to do.
    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", AtomParam())
    parametrize.register_parametrization(conv, "weight", AtomParam(), unsafe=True)
    with pytest.raises(RuntimeError, match=r"not built yet.*adapters do not stack"):
        conv(torch.randn(1, 3, 5, 5))
