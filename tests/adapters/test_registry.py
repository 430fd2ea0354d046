"""decomp.adapters.register: an adapter class defined outside the package, registered, works everywhere.

``ScaledLowRank`` below is such a class (tests/contracts/registry.py puts it under the adapter
contract with one line). Registered, it goes through ``apply`` -> ``save_adapter`` ->
``load_adapter`` into a fresh, unadapted model and through peft's ``save_pretrained`` ->
``from_pretrained``; unregistered, the same file is refused. Registration errors: a class that is
not an adapter (``TypeError``), a second class under a taken or deprecated name (``ValueError``).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import decomp.adapters as adapters
from decomp._checks import check_int, check_real
from decomp.adapters import AdapterParam, apply, load_adapter, option, register, registered, save_adapter


@register
class ScaledLowRank(AdapterParam):
    r"""A low-rank update of the matrix view, :math:`\Delta W = \frac{s}{r} B A`, :math:`B = 0` at init."""

    rank: int = option(2, check_int, low=1)
    scale: float = option(1.0, check_real)

    def _count(self, shape: tuple[int, ...]) -> int:
        rows, columns = shape[0], math.prod(shape[1:])
        return min(self.rank, rows, columns) * (rows + columns)

    def _build(self, weight: torch.Tensor) -> None:
        rows, columns = weight.shape[0], weight[0].numel()
        rank = min(self.rank, rows, columns)
        generator = torch.Generator(device=weight.device).manual_seed(0)
        down = torch.randn(rank, columns, generator=generator, device=weight.device) / math.sqrt(columns)
        self.down = nn.Parameter(down.to(weight.dtype))
        self.up = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype, device=weight.device))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        update = self.up.to(weight.dtype) @ self.down.to(weight.dtype)
        return (self.scale / self.down.shape[0]) * update.reshape(weight.shape)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale / self.down.shape[0]) * (x @ self.down.to(x.dtype).T) @ self.up.to(x.dtype).T


class UnregisteredLowRank(ScaledLowRank):
    """The same adapter under a name nobody registered."""


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()


IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES)


def perturb(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("cls", [ScaledLowRank, UnregisteredLowRank], ids=["registered", "unregistered"])
def test_saved_adapter_loads_into_a_fresh_plain_model_only_when_registered(cls, tmp_path):
    base = small_net()
    model = apply(copy.deepcopy(base), cls, target=["0", "3"], rank=3, scale=2.0)
    perturb(model)
    assert not torch.equal(outputs(model), outputs(base))
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = copy.deepcopy(base)
    if cls is UnregisteredLowRank:
        with pytest.raises(ValueError, match=r"\['UnregisteredLowRank'\].*decomp.adapters.register"):
            load_adapter(fresh, path)
        assert torch.equal(outputs(fresh), outputs(base))
        return
    load_adapter(fresh, path)
    assert torch.equal(outputs(fresh), outputs(model))
    assert [type(m.parametrizations.weight[0]) for m in (fresh[0], fresh[3])] == [ScaledLowRank] * 2
    assert fresh[0].parametrizations.weight[0].config() == {"rank": 3, "scale": 2.0}


def test_peft_saves_and_loads_a_registered_class_by_its_name(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from decomp.adapters.peft import DecompConfig

    config = DecompConfig(method="ScaledLowRank", options={"rank": 3}, target_modules=["0", "3"])
    assert config.method == "ScaledLowRank" and config.options == {"rank": 3, "scale": 1.0}
    assert DecompConfig(method=ScaledLowRank, target_modules=["0"]).method == "ScaledLowRank"
    base = small_net()
    model = get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    assert not torch.equal(outputs(model), outputs(base))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "ScaledLowRank"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(outputs(loaded), outputs(model))


def test_registered_holds_every_public_adapter_class_and_is_a_copy():
    public = {
        name: value
        for name, value in vars(adapters).items()
        if isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam
    }
    listed = registered()
    assert public.items() <= listed.items() and listed["ScaledLowRank"] is ScaledLowRank
    assert "UnregisteredLowRank" not in listed and "SNELL" not in listed
    listed.clear()
    assert registered()["ScaledLowRank"] is ScaledLowRank
    assert register(ScaledLowRank) is ScaledLowRank  # again: nothing changes


@pytest.mark.parametrize(
    "value",
    [nn.Linear, AdapterParam, ScaledLowRank(), "ScaledLowRank"],
    ids=["module", "base", "instance", "name"],
)
def test_register_refuses_what_is_not_an_adapter_class(value):
    before = registered()
    with pytest.raises(TypeError, match="register takes an AdapterParam subclass"):
        register(value)
    assert registered() == before


@pytest.mark.parametrize("name", ["ScaledLowRank", "AtomParam", "SNELL"])
def test_register_refuses_a_second_class_under_a_taken_or_deprecated_name(name):
    before = registered()
    impostor = type(name, (ScaledLowRank,), {})
    with pytest.raises(ValueError, match=f"cannot register .* as '{name}'"):
        register(impostor)
    assert registered() == before
