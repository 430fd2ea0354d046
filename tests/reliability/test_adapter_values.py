"""Mechanism 1: the values an adapter loads are checked by ``load_adapter`` and ``load_state_dict``.

Shapes and dtypes are not enough: a tensor can fit and still be wrong. Every adapter refuses NaN/Inf
in a floating tensor (judged in the dtype it will take, so an fp32 value that overflows an fp16
model counts), and adapters with index-like state refuse what their forward cannot use (a SNELL
kept count outside ``[0, n]``, DCT locations outside the spectrum or repeated, which would let one
coefficient silently overwrite another). Both ways in raise, naming the tensor, and leave the
adapter as it was: ``load_adapter`` before anything changes; ``nn.Module.load_state_dict`` through
the adapter's load pre-hook (torch's ``RuntimeError`` lists the refused entries, which keep their
values).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from decomp.adapters import (
    SNELLParam,
    SNELLAParam,
    AdapterParam,
    DCTParam,
    LieParam,
    adapter_state_dict,
    apply,
    load_adapter,
    option,
    save_adapter,
)

from .adapter_helpers import Bank, Snapshot, cases_and_banks, factory, parametrized_layers, read_file, train_step


def _poisoned(state: dict[str, torch.Tensor], keys: list[str], data: st.DataObject) -> tuple[dict[str, torch.Tensor], str]:
    key = data.draw(st.sampled_from(keys), label="key")
    value = state[key].clone(memory_format=torch.contiguous_format)
    value.view(-1)[data.draw(st.integers(0, value.numel() - 1), label="entry")] = data.draw(
        st.sampled_from([math.nan, math.inf, -math.inf]), label="value"
    )
    return {**state, key: value}, key


@settings(max_examples=20)
@given(drawn=cases_and_banks(), data=st.data())
def test_load_state_dict_refuses_a_non_finite_adapter_tensor_unchanged(drawn, data):
    case, kinds = drawn
    model = apply(Bank(kinds), factory(case), target=r".*")
    train_step(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    floating = sorted(key for key, value in adapter_state_dict(model).items() if value.is_floating_point())
    state, key = _poisoned(state, floating, data)
    before = Snapshot(model)
    with pytest.raises(RuntimeError, match=rf"{re.escape(key)}: contains NaN or Inf \(as torch.float32\)"):
        model.load_state_dict(state)
    before.assert_unchanged(model)


@pytest.mark.parametrize("route", ["load_adapter into unadapted", "load_adapter into adapted", "load_state_dict"])
def test_a_value_that_overflows_the_models_dtype_is_refused(tmp_path, route):
    # 1e6 is finite in the fp32 file and inf once cast to the fp16 model.
    source = apply(nn.Sequential(nn.Linear(4, 3)), LieParam, target=r".*", rank=2)
    key = "0.parametrizations.weight.0.out_factor"
    with torch.no_grad():
        source[0].parametrizations.weight[0].out_factor.fill_(1e6)
    path = tmp_path / "adapter.safetensors"
    save_adapter(source, path)
    adapted = route != "load_adapter into unadapted"
    model = nn.Sequential(nn.Linear(4, 3))
    model = (apply(model, LieParam, target=r".*", rank=2) if adapted else model).half()
    before = Snapshot(model)
    message = rf"'?{re.escape(key)}'?:? contains NaN or Inf \(as torch.float16\)"
    if route == "load_state_dict":
        with pytest.raises(RuntimeError, match=message):
            model.load_state_dict({**model.state_dict(), key: source.state_dict()[key]})
    else:
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
    before.assert_unchanged(model)


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5))


def _kernel_model(cls: type[AdapterParam]) -> nn.Module:
    return apply(_plain(), cls, target=r".*", rank=2)


def _dct_model(cls: type[AdapterParam]) -> nn.Module:
    return apply(_plain(), cls, target=r".*", num_coefficients=4)


# (adapter class, model, buffer, bad value, message); 30 = the 5x6 weight's entries
INVARIANTS = [
    (SNELLParam, _kernel_model, "kept_entries", torch.tensor(-1), r"must be in \[0, 30\], got -1"),
    (SNELLAParam, _kernel_model, "kept_entries", torch.tensor(31), r"must be in \[0, 30\], got 31"),
    (DCTParam, _dct_model, "locations", torch.tensor([2, 2, 7, 9]), r"must be distinct, got \[2\] more than once"),
    (DCTParam, _dct_model, "locations", torch.tensor([2, 5, 7, 30]), r"must be flat indices in \[0, 30\), got 2 to 30"),
    (DCTParam, _dct_model, "locations", torch.tensor([-1, 5, 7, 9]), r"must be flat indices in \[0, 30\), got -1 to 9"),
]


@pytest.mark.parametrize("route", ["load_adapter into unadapted", "load_adapter into adapted", "load_state_dict"])
@pytest.mark.parametrize(
    ("cls", "make", "buffer", "bad", "message"),
    INVARIANTS,
    ids=[f"{cls.__name__}.{buffer}={bad.tolist()}" for cls, _, buffer, bad, _ in INVARIANTS],
)
def test_an_adapter_refuses_index_state_its_forward_cannot_use(tmp_path, route, cls, make, buffer, bad, message):
    # Seen: a kept count of -3 loaded silently and failed at the next forward with "keep must be
    # in [0, 48]"; repeated DCT locations loaded and trained as fewer coefficients than configured.
    source = make(cls)
    key = f"0.parametrizations.weight.0.{buffer}"
    clean, faulty = tmp_path / "clean.safetensors", tmp_path / "faulty.safetensors"
    save_adapter(source, clean)
    tensors, metadata = read_file(clean)
    save_file({**tensors, key: bad}, str(faulty), metadata=metadata)
    model = make(cls) if route != "load_adapter into unadapted" else _plain()
    before = Snapshot(model)
    if route == "load_state_dict":
        with pytest.raises(RuntimeError, match=rf"{re.escape(key)}: {message}"):
            model.load_state_dict({**source.state_dict(), key: bad})
    else:
        with pytest.raises(ValueError, match=rf"tensor '{re.escape(key)}' {message}"):
            load_adapter(model, faulty)
    before.assert_unchanged(model)
    load_adapter(model, clean)
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


class ScaleParam(AdapterParam):
    """A user's own adapter: W' = W + s W with one trainable scalar."""

    init: float = option(0.0)

    def _count(self, shape: tuple[int, ...]) -> int:
        return 1

    def _build(self, weight: torch.Tensor) -> None:
        self.s = nn.Parameter(torch.full((1,), self.init, dtype=weight.dtype, device=weight.device))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self.s * weight


def test_an_adapter_class_of_your_own_loads_into_a_model_carrying_it(tmp_path):
    # Regression: every class not exported by decomp.adapters was refused, even into a model
    # adapted with it (the file's class is the model's own).
    source = apply(nn.Sequential(nn.Linear(4, 3)), ScaleParam, target=r".*")
    with torch.no_grad():
        source[0].parametrizations.weight[0].s.fill_(0.5)
    path = tmp_path / "adapter.safetensors"
    save_adapter(source, path)
    model = apply(nn.Sequential(nn.Linear(4, 3)), ScaleParam, target=r".*")
    load_adapter(model, path)
    assert float(model[0].parametrizations.weight[0].s.detach()) == 0.5

    plain = nn.Sequential(nn.Linear(4, 3))
    before = Snapshot(plain)
    with pytest.raises(ValueError, match=r"unknown to decomp.adapters: \['ScaleParam'\].*apply it first, then load"):
        load_adapter(plain, path)
    before.assert_unchanged(plain)


def test_configs_are_compared_as_the_class_reads_them(tmp_path):
    # A file whose config leaves an option at its default (an older writer, a hand edit) is the
    # same adapter; another value of that option is still a mismatch.
    source = apply(nn.Sequential(nn.Linear(4, 3)), LieParam, target=r".*", rank=2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(source, path)
    tensors, metadata = read_file(path)
    entries = metadata["decomp.adapters"].replace(', "scale": null', "")
    assert entries != metadata["decomp.adapters"]
    save_file(tensors, str(path), metadata={**metadata, "decomp.adapters": entries})
    load_adapter(apply(nn.Sequential(nn.Linear(4, 3)), LieParam, target=r".*", rank=2), path)

    other = apply(nn.Sequential(nn.Linear(4, 3)), LieParam, target=r".*", rank=2, scale=2.0)
    before = Snapshot(other)
    with pytest.raises(ValueError, match=r"config \{'rank': 2, 'scale': None, 'order': None\} in the file"):
        load_adapter(other, path)
    before.assert_unchanged(other)


@pytest.mark.parametrize("route", ["apply", "load_adapter"])
def test_a_model_on_the_meta_device_is_refused_unchanged(tmp_path, route):
    # Seen: "Tensor.item() cannot be called on meta tensors" from inside an adapter's build.
    path = tmp_path / "adapter.safetensors"
    save_adapter(apply(nn.Sequential(nn.Linear(4, 3)), LieParam, target=r".*"), path)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    weight = model[0].weight
    with pytest.raises(ValueError, match=r"layer '0' has its weight on the meta device.*to_empty"):
        apply(model, LieParam, target=r".*") if route == "apply" else load_adapter(model, path)
    assert parametrized_layers(model) == {} and model[0].weight is weight and weight.requires_grad


@pytest.mark.parametrize("fault", ["nan", "kept count"])
def test_save_adapter_writes_no_file_that_load_adapter_would_refuse(tmp_path, fault):
    # Seen: a diverged adapter saved silently; the file then failed (or, before the value checks,
    # loaded NaN outputs) wherever it was loaded.
    model = _kernel_model(SNELLParam)
    adapter = model[0].parametrizations.weight[0]
    with torch.no_grad():
        if fault == "nan":
            adapter.in_points[0, 0, 0] = math.nan
        else:
            adapter.kept_entries.fill_(31)
    path = tmp_path / "adapter.safetensors"
    expected = "in_points' contains NaN or Inf" if fault == "nan" else r"kept_entries' must be in \[0, 30\], got 31"
    with pytest.raises(ValueError, match=rf"save_adapter: .* was not written: tensor '0\.parametrizations\.weight\.0\.{expected}"):
        save_adapter(model, path)
    assert not path.exists()
