"""Mechanism 11 (adapter files): a wrapped model is the model it wraps, under the same names.

``torch.compile`` (an ``OptimizedModule`` whose keys start with ``_orig_mod.``), ``nn.DataParallel``
and ``DistributedDataParallel`` (``module.``) are looked through by every helper: an adapter saved
from any of them loads into any other or into the plain model and reproduces its outputs, and
``adapted_layers``/``report``/``adapter_state_dict`` give the plain model's names. Files written
with a wrapper's prefix (by an older version) load too, unless the prefix names a real submodule.
``apply`` and ``load_adapter`` into an unadapted model refuse DDP (it would never synchronise the
new parameters), and leave it unchanged.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from decomp.adapters import AtomParam, adapter_state_dict, apply, load_adapter, merge, report, save_adapter
from decomp.adapters.model import adapted_layers

from .adapter_helpers import Bank, Snapshot, cases_and_banks, edit_entries, factory, read_file, train_step

WRAPPERS = {
    "plain": lambda model: model,
    # backend="eager" keeps it fast; nothing here calls the compiled forward but one test.
    "compile": lambda model: torch.compile(model, backend="eager"),
    "data_parallel": nn.DataParallel,
    "compile(data_parallel)": lambda model: torch.compile(nn.DataParallel(model), backend="eager"),
}


@pytest.mark.parametrize("loaded_into", sorted(WRAPPERS))
@pytest.mark.parametrize("saved_from", sorted(WRAPPERS))
@settings(max_examples=2)
@given(data=st.data())
def test_an_adapter_crosses_wrappers(saved_from, loaded_into, data):
    start = 4 * sorted(WRAPPERS).index(saved_from) + sorted(WRAPPERS).index(loaded_into)
    case, kinds = data.draw(cases_and_banks(start), label="adapter and layers")
    adapted = data.draw(st.booleans(), label="into an adapted model")
    source = apply(Bank(kinds), factory(case), target=r".*")
    train_step(source)
    wrapped_source = WRAPPERS[saved_from](source)
    names = [layer.name for layer in adapted_layers(source)]
    assert [layer.name for layer in adapted_layers(wrapped_source)] == names
    assert [row.name for row in report(wrapped_source)] == names
    assert adapter_state_dict(wrapped_source).keys() == adapter_state_dict(source).keys()
    target = Bank(kinds)
    if adapted:
        apply(WRAPPERS[loaded_into](target), factory(case), target=r".*")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "adapter.safetensors"
        save_adapter(wrapped_source, path)
        load_adapter(WRAPPERS[loaded_into](target), path)
    torch.testing.assert_close(target(), source(), rtol=0, atol=0)


def test_compiled_model_apply_save_load_merge():
    model = Bank({"conv2d", "linear"})
    compiled = torch.compile(model, backend="eager")
    before = compiled().detach()
    assert apply(compiled, AtomParam, target=r"layers\.linear", levels=2) is compiled
    torch.testing.assert_close(compiled(), before, rtol=0, atol=0)
    train_step(compiled)
    adapted = model().detach()
    torch.testing.assert_close(compiled(), adapted, rtol=1e-6, atol=1e-6)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "adapter.safetensors"
        save_adapter(compiled, path)
        assert [entry["name"] for entry in json.loads(read_file(path)[1]["decomp.adapters"])] == ["layers.linear"]
        plain = load_adapter(Bank({"conv2d", "linear"}), path)
    torch.testing.assert_close(plain(), adapted, rtol=0, atol=0)
    merge(compiled)
    assert adapted_layers(compiled) == []
    torch.testing.assert_close(compiled(), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", ["_orig_mod", "module", "_orig_mod.module"])
def test_a_file_with_a_wrapper_prefix_loads_into_the_plain_model(tmp_path, prefix):
    # What save_adapter wrote for a wrapped model before it looked through wrappers.
    source = apply(Bank({"conv1d", "linear"}), AtomParam, target=r".*")
    train_step(source)
    path = tmp_path / "adapter.safetensors"
    save_adapter(source, path)
    tensors, metadata = read_file(path)
    metadata = edit_entries(metadata, lambda entries: [dict(entry, name=f"{prefix}.{entry['name']}") for entry in entries])
    save_file({f"{prefix}.{key}": value for key, value in tensors.items()}, str(path), metadata=metadata)
    for target in (Bank({"conv1d", "linear"}), apply(Bank({"conv1d", "linear"}), AtomParam, target=r".*")):
        load_adapter(target, path)
        torch.testing.assert_close(target(), source(), rtol=0, atol=0)


def test_a_prefix_that_names_a_real_submodule_is_kept(tmp_path):
    # A model with a child called "module": "module.x" is that child's layer, not a DDP prefix.
    source = nn.Sequential()
    source.add_module("module", nn.Linear(4, 4))
    path = tmp_path / "adapter.safetensors"
    save_adapter(apply(source, AtomParam, target=r".*"), path)
    assert json.loads(read_file(path)[1]["decomp.adapters"])[0]["name"] == "module"
    other = nn.Sequential()
    other.add_module("module", nn.Sequential(nn.Linear(4, 4)))
    before = Snapshot(other)
    with pytest.raises(ValueError, match=r"adapts 'module' \(Sequential\)"):
        load_adapter(other, path)
    before.assert_unchanged(other)


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_refuses_new_parameters_and_looks_through_otherwise(process_group, tmp_path):
    source = apply(Bank({"conv1d", "linear"}), AtomParam, target=r".*")
    train_step(source)
    path = tmp_path / "adapter.safetensors"
    save_adapter(nn.parallel.DistributedDataParallel(source), path)
    assert {entry["name"] for entry in json.loads(read_file(path)[1]["decomp.adapters"])} == {"layers.conv1d", "layers.linear"}

    plain = nn.parallel.DistributedDataParallel(Bank({"conv1d", "linear"}))
    before = Snapshot(plain)
    with pytest.raises(TypeError, match="apply adds parameters .* before wrapping it in DistributedDataParallel"):
        apply(plain, AtomParam, target=r".*")
    with pytest.raises(TypeError, match=r"load_adapter \(into a model without adapters\) adds parameters"):
        load_adapter(plain, path)
    before.assert_unchanged(plain)

    bank = apply(Bank({"conv1d", "linear"}), AtomParam, target=r".*")
    adapted = nn.parallel.DistributedDataParallel(bank)
    load_adapter(adapted, path)
    torch.testing.assert_close(adapted.module(), source(), rtol=0, atol=0)
    assert [row.name for row in report(adapted)] == ["layers.conv1d", "layers.linear"]
