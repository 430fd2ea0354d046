"""Files written before an option existed load with what they meant (``saved_defaults``).

An option added to a class, whose default (a rule) differs from what the class did before, must
be listed in ``saved_defaults``: an adapter file or peft ``adapter_config.json`` that lacks the
key then loads with the old meaning, not with the new default silently rescaling trained factors
(a review after issue 12 found AtomParam's level-2 scale added without it). Each class that
declares saved defaults has a case here, built where the old meaning and the default differ.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from decomp.adapters import apply, load_adapter, save_adapter
from decomp.adapters.registry import registered
from tests.adapters.strategies import adapter_of, seeded


def kron_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(48, 20))


def atom_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))


def snell_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 12))


def ldu_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(24, 10))


# class name -> (model, options besides the late ones, an input, the late options with what files
# without them meant); built so that each late option's default changes the function (the rule's
# value differs from the old meaning on this layer)
CASES = {
    "KronParam": (kron_model, {}, lambda: torch.randn(3, 48, generator=seeded(1)), {"scale": 1.0}),
    "AtomParam": (
        atom_model, {"levels": 2}, lambda: torch.randn(2, 8, 6, 6, generator=seeded(1)), {"scale": 1.0}
    ),
    "LDUParam": (ldu_model, {}, lambda: torch.randn(3, 24, generator=seeded(1)), {"scale_rule": "fan_in"}),
    "SNELLParam": (
        snell_model, {}, lambda: torch.randn(3, 16, generator=seeded(1)), {"scale_rule": "fan_in"}
    ),
}


def test_every_class_with_saved_defaults_has_a_case_and_declares_its_late_options():
    declaring = {name: dict(cls.saved_defaults) for name, cls in registered().items() if cls.saved_defaults}
    assert declaring == {name: case[3] for name, case in CASES.items()}


def perturb(model: nn.Module) -> None:
    generator = seeded(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def trained(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(the pretrained model, a copy adapted with the saved defaults and perturbed, an input)."""
    make, options, make_input, old = CASES[name]
    cls = registered()[name]
    torch.manual_seed(0)
    plain = make()
    model = apply(copy.deepcopy(plain), cls, target=["0"], **old, **options)
    perturb(model)
    return plain, model, make_input()


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_default_differs_from_the_saved_meaning_on_the_case(name):
    """Else the tests below could not fail. The trained tensors are loaded without the buffers
    the class rebuilds from the weight (LDU's s0 is one, rebuilt and fingerprint-checked by
    peft's files): the rule's value is what those files would be compared with."""
    plain, model, x = trained(name)
    cls = registered()[name]
    ruled = apply(copy.deepcopy(plain), cls, target=["0"], **CASES[name][1])
    trained_state = {
        key: value for key, value in model.state_dict().items() if key.rsplit(".", 1)[-1] not in cls.rebuilt_buffers
    }
    ruled.load_state_dict(trained_state, strict=False)
    assert not torch.allclose(ruled(x), model(x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_adapter_file_without_the_options_loads_with_their_saved_defaults(name, tmp_path: Path):
    plain, model, x = trained(name)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), "pt") as handle:  # rewritten as the release before the options wrote it
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    layers = json.loads(metadata["decomp.adapters"])
    old = CASES[name][3]
    for layer in layers:
        for key in old:
            del layer["config"][key]
    metadata["decomp.adapters"] = json.dumps(layers)
    save_file(tensors, str(path), metadata=metadata)
    loaded = load_adapter(copy.deepcopy(plain), path)
    for key, value in old.items():
        assert getattr(adapter_of(loaded[0]), key) == value
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_peft_config_without_the_options_loads_with_their_saved_defaults(name, tmp_path: Path):
    from peft import PeftModel, get_peft_model

    from decomp.adapters.peft import DecompConfig

    make, options, make_input, old = CASES[name]
    torch.manual_seed(0)
    plain = make()
    config = DecompConfig(method=name, options={**old, **options}, target_modules=["0"])
    model = get_peft_model(copy.deepcopy(plain), config)
    perturb(model)
    x = make_input()
    expected = model(x)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    written = json.loads(config_path.read_text())
    for key in old:
        del written["options"][key]
    config_path.write_text(json.dumps(written))
    assert {key: DecompConfig.from_pretrained(tmp_path).options[key] for key in old} == old
    loaded = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
