"""Mechanisms 1 and 8: ``load_adapter`` is atomic, and a malformed adapter file says what is wrong.

One property over every adapter of the contract registry, both ways into ``load_adapter`` (a model
without adapters, which it adapts as the file describes, and a model already adapted the same
way) and every fault a file can carry: a tensor missing, extra, of another shape or of another
kind of dtype, or holding NaN/Inf; metadata missing, not JSON, of the wrong structure, with
missing, unknown or mistyped fields, an unknown adapter class, a config the class rejects, a
repeated entry, a layer the model lacks or of another weight shape, another format tag; bytes that
are not safetensors, a truncated file, no file. Each raises the documented error and leaves the model exactly as it was
(values, Parameter objects, ``requires_grad`` flags, classes, parametrizations), and the clean file
then still loads and reproduces the saved model.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from decomp.adapters import AtomParam, adapter_state_dict, apply, load_adapter, save_adapter
from decomp.adapters.model import adapted_layers

from tests.contracts.registry import AdapterCase

from .adapter_helpers import (
    Bank,
    Metadata,
    Snapshot,
    Tensors,
    adapter_cases,
    edit_entries,
    factory,
    read_file,
    train_step,
)

Draw = Callable[[st.SearchStrategy[Any]], Any]
ATOM = AdapterCase("atom", lambda: AtomParam())


class Fault(NamedTuple):
    """A corruption of a valid adapter file and the error it must raise."""

    name: str
    corrupt: Callable[[Tensors, Metadata, Draw], tuple[Tensors, Metadata]]
    message: str  # regex, searched in the error message
    error: type[Exception] = ValueError


def _one_key(tensors: Tensors, draw: Draw) -> str:
    return draw(st.sampled_from(sorted(tensors)))


def _drop_tensor(tensors: Tensors, metadata: Metadata, draw: Draw) -> tuple[Tensors, Metadata]:
    key = _one_key(tensors, draw)
    return {k: v for k, v in tensors.items() if k != key}, metadata


def _extra_tensor(tensors: Tensors, metadata: Metadata, draw: Draw) -> tuple[Tensors, Metadata]:
    owner = draw(st.sampled_from([_one_key(tensors, draw).rsplit(".", 1)[0], "nowhere.parametrizations.weight.0"]))
    return {**tensors, f"{owner}.surplus": torch.zeros(2)}, metadata


def _reshape_tensor(tensors: Tensors, metadata: Metadata, draw: Draw) -> tuple[Tensors, Metadata]:
    key = _one_key(tensors, draw)
    value = tensors[key]
    shape = draw(st.sampled_from([(value.numel() + 1,), (*value.shape, 2), (0,)]))
    return {**tensors, key: torch.zeros(shape, dtype=value.dtype)}, metadata


def _retype_tensor(tensors: Tensors, metadata: Metadata, draw: Draw) -> tuple[Tensors, Metadata]:
    key = _one_key(tensors, draw)
    value = tensors[key]
    other = draw(st.sampled_from([torch.int64, torch.bool] if value.is_floating_point() else [torch.float32, torch.bool]))
    return {**tensors, key: torch.zeros(value.shape, dtype=other)}, metadata


def _poison_tensor(tensors: Tensors, metadata: Metadata, draw: Draw) -> tuple[Tensors, Metadata]:
    key = draw(st.sampled_from(sorted(key for key, value in tensors.items() if value.is_floating_point())))
    value = tensors[key].clone(memory_format=torch.contiguous_format)
    value.view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return {**tensors, key: value}, metadata


def _entry_edit(edit: Callable[[dict[str, Any], Draw], None]) -> Callable[[Tensors, Metadata, Draw], tuple[Tensors, Metadata]]:
    def corrupt(tensors: Tensors, metadata: Metadata, draw: Draw) -> tuple[Tensors, Metadata]:
        def apply_edit(entries: list[dict[str, Any]]) -> None:
            edit(entries[draw(st.integers(0, len(entries) - 1))], draw)

        return tensors, edit_entries(metadata, apply_edit)

    return corrupt


def _metadata(value: Callable[[Metadata, Draw], Metadata]) -> Callable[[Tensors, Metadata, Draw], tuple[Tensors, Metadata]]:
    return lambda tensors, metadata, draw: (tensors, value(metadata, draw))


def _mistype_field(entry: dict[str, Any], draw: Draw) -> None:
    field, bad = draw(
        st.sampled_from(
            [
                ("name", 3),
                ("index", -1),
                ("index", "0"),
                ("index", True),
                ("adapter", None),
                ("config", []),
                ("weight_shape", [0, 3]),
                ("weight_shape", [8]),
                ("weight_shape", "8x8"),
                ("weight_shape", [2.0, 3]),
            ]
        )
    )
    entry[field] = bad


def _reject_config(entry: dict[str, Any], draw: Draw) -> None:
    options = sorted(entry["config"])
    key = draw(st.sampled_from(options + ["no_such_option"]))
    entry["config"][key] = "bogus-value"


def _truncate(path: Path, draw: Draw) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])


FILE_FAULTS: list[Fault] = [
    Fault("tensor missing", _drop_tensor, "only in the model"),
    Fault("tensor extra", _extra_tensor, "only in the file"),
    Fault("tensor of another shape", _reshape_tensor, r"tensor '.*': shape"),
    Fault("tensor of another dtype kind", _retype_tensor, r"tensor '.*': dtype"),
    Fault("tensor with NaN or Inf", _poison_tensor, r"tensor '.*' contains NaN or Inf \(as torch.float32\)"),
    Fault("no layer list", _metadata(lambda m, d: {"format": m["format"]}), "lacks the 'decomp.adapters' entry"),
    Fault("layer list not JSON", _metadata(lambda m, d: {**m, "decomp.adapters": m["decomp.adapters"][:-1]}), "is not valid JSON"),
    Fault(
        "layer list not a list",
        _metadata(lambda m, d: {**m, "decomp.adapters": d(st.sampled_from(["{}", "[]", "3", "null", '"x"']))}),
        "expected a non-empty list of layer entries",
    ),
    Fault("entry not an object", _metadata(lambda m, d: edit_entries(m, lambda e: e + [[1, 2]])), r"entry \d+ is a list, not an object"),
    Fault("entry field missing", _entry_edit(lambda e, d: e.pop(d(st.sampled_from(sorted(e))))), r"entry \d+ lacks \['"),
    Fault("entry field unknown", _entry_edit(lambda e, d: e.update(rank=4)), r"unknown keys \['rank'\]"),
    Fault("entry field mistyped", _entry_edit(_mistype_field), r"entry \d+: \w+ must be"),
    Fault("unknown adapter class", _entry_edit(lambda e, d: e.update(adapter="LoRAParam")), r"unknown to decomp.adapters: \['LoRAParam'\]"),
    Fault("config rejected", _entry_edit(_reject_config), "rejects the config"),
    Fault("entry repeated", _metadata(lambda m, d: edit_entries(m, lambda e: e + e[:1])), "repeats layer"),
    Fault("layer the model lacks", _entry_edit(lambda e, d: e.update(name="nowhere")), "does not have|adapted in the file but not in the model"),
    Fault(
        "layer of another weight shape",
        _entry_edit(lambda e, d: e["weight_shape"].__setitem__(0, e["weight_shape"][0] + 1)),
        "weight shape",
    ),
    Fault("format tag missing", _metadata(lambda m, d: {"decomp.adapters": m["decomp.adapters"]}), "not an adapter file written by"),
    Fault("format of another version", _metadata(lambda m, d: {**m, "format": "decomp.adapters/99"}), "format 'decomp.adapters/99'"),
]
BYTE_FAULTS: list[tuple[str, Callable[[Path, Draw], None], str, type[Exception]]] = [
    ("not safetensors", lambda path, draw: path.write_bytes(b"\x93NUMPY" + bytes(40)), "not a readable safetensors file", ValueError),
    ("truncated", _truncate, "not a readable safetensors file", ValueError),
    ("no file", lambda path, draw: path.unlink(), "No such file", FileNotFoundError),
]
FAULT_NAMES = [fault.name for fault in FILE_FAULTS] + [name for name, *_ in BYTE_FAULTS]


def saved_adapter(case, kinds, directory: Path) -> tuple[nn.Module, Path]:
    model = apply(Bank(kinds), factory(case), target=r".*")
    train_step(model)
    path = directory / "adapter.safetensors"
    save_adapter(model, path)
    return model, path


def target_model(case, kinds, adapted: bool) -> nn.Module:
    return apply(Bank(kinds), factory(case), target=r".*") if adapted else Bank(kinds)


@pytest.mark.parametrize("adapted", [False, True], ids=["into-unadapted", "into-adapted"])
@pytest.mark.parametrize("fault_name", FAULT_NAMES)
@settings(max_examples=4)
@given(data=st.data())
def test_a_faulty_file_raises_and_changes_nothing(fault_name, adapted, data):
    case = data.draw(adapter_cases(2 * FAULT_NAMES.index(fault_name) + adapted), label="adapter")
    with tempfile.TemporaryDirectory() as directory:
        source, clean = saved_adapter(case, case.layers, Path(directory))
        faulty = Path(directory) / "faulty.safetensors"
        faulty.write_bytes(clean.read_bytes())
        file_faults = {fault.name: fault for fault in FILE_FAULTS}
        if fault_name in file_faults:
            fault = file_faults[fault_name]
            tensors, metadata = fault.corrupt(*read_file(clean), data.draw)
            save_file(tensors, str(faulty), metadata=metadata)
            error, message = fault.error, fault.message
        else:
            _, corrupt, message, error = next(item for item in BYTE_FAULTS if item[0] == fault_name)
            corrupt(faulty, data.draw)

        model = target_model(case, case.layers, adapted)
        before = Snapshot(model)
        with pytest.raises(error, match=message):
            load_adapter(model, faulty)
        before.assert_unchanged(model)

        load_adapter(model, clean)
        torch.testing.assert_close(model(), source(), rtol=0, atol=0)


def test_regression_missing_tensor_leaves_a_plain_model_plain(tmp_path):
    # Seen: the model came back adapted with fresh adapters and every base parameter frozen.
    model = apply(Bank({"conv2d", "linear"}), AtomParam, target=r".*", levels=2)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    tensors, metadata = read_file(path)
    tensors.pop("layers.linear.parametrizations.weight.0.sub_coeffs")
    save_file(tensors, str(path), metadata=metadata)
    plain = Bank({"conv2d", "linear"})
    with pytest.raises(ValueError, match="'layers.linear.parametrizations.weight.0.sub_coeffs' only in the model"):
        load_adapter(plain, path)
    assert adapted_layers(plain) == []
    assert all(parameter.requires_grad for parameter in plain.parameters())
    assert type(plain.layers["linear"]) is nn.Linear


def test_every_mismatch_is_listed_at_once(tmp_path):
    model = apply(Bank({"conv1d", "linear"}), AtomParam, target=r".*")
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    tensors, metadata = read_file(path)
    metadata = edit_entries(metadata, lambda entries: [dict(entry, rank=1, adapter=7) for entry in entries])
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError) as raised:
        load_adapter(Bank({"conv1d", "linear"}), path)
    message = str(raised.value)
    assert message.count("unknown keys ['rank']") == 2 and message.count("adapter must be a class name, got 7") == 2


def test_a_layer_the_file_cannot_adapt_is_refused_before_building(tmp_path):
    # The file matches by name and shape, but the model's layer is an Embedding: ValueError, nothing built.
    source = nn.Sequential(nn.Linear(4, 6))
    path = tmp_path / "adapter.safetensors"
    save_adapter(apply(source, AtomParam, target=r".*"), path)
    impostor = nn.Sequential(nn.Embedding(6, 4))
    before = Snapshot(impostor)
    with pytest.raises(ValueError, match=r"adapts '0' \(Embedding\); adapters support nn.Linear"):
        load_adapter(impostor, path)
    before.assert_unchanged(impostor)


def test_a_layer_that_rejects_its_adapter_while_building_rolls_back(tmp_path):
    # num_atoms=9 is a valid config for a 3x3 conv; in a model whose second conv is a depthwise
    # 1x1 (a (4, 1) matrix: scalar atoms) the adapter fails while building, after the first layer
    # was registered.
    source = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3))
    path = tmp_path / "adapter.safetensors"
    save_adapter(apply(source, AtomParam, target=r".*", num_atoms=9), path)
    tensors, metadata = read_file(path)
    metadata = edit_entries(metadata, lambda entries: entries[1].update(weight_shape=[4, 1, 1, 1]))
    save_file(tensors, str(path), metadata=metadata)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 1, groups=4))
    before = Snapshot(model)
    with pytest.raises(ValueError, match="num_atoms") as raised:
        load_adapter(model, path)
    assert "while registering AtomParam on layer '1'" in raised.value.__notes__
    before.assert_unchanged(model)


def test_a_file_stacking_adapters_is_refused_for_an_unadapted_model(tmp_path):
    conv = nn.Conv2d(2, 4, 3)
    model = apply(nn.Sequential(conv), AtomParam, target=r".*")
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    tensors, metadata = read_file(path)
    metadata = edit_entries(metadata, lambda entries: entries[0].update(index=1))
    save_file(tensors, str(path), metadata=metadata)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3))
    before = Snapshot(plain)
    with pytest.raises(ValueError, match=r"stacks several parametrizations on \['0'\]"):
        load_adapter(plain, path)
    before.assert_unchanged(plain)


def test_a_file_into_a_partly_adapted_model_is_refused_unchanged(tmp_path):
    _, path = saved_adapter(ATOM, frozenset({"conv1d", "linear"}), tmp_path)
    partial = apply(Bank({"conv1d", "linear"}), AtomParam, target=r"layers\.linear")
    before = Snapshot(partial)
    with pytest.raises(ValueError, match="'layers.conv1d' is adapted in the file but not in the model"):
        load_adapter(partial, path)
    before.assert_unchanged(partial)


def test_dtype_of_the_same_kind_is_cast(tmp_path):
    # bf16 tensors in the file, an fp32 model: the documented cast, not a fault.
    _, path = saved_adapter(ATOM, frozenset({"conv1d", "linear"}), tmp_path)
    tensors, metadata = read_file(path)
    save_file({key: value.to(torch.bfloat16) for key, value in tensors.items()}, str(path), metadata=metadata)
    fresh = load_adapter(Bank({"conv1d", "linear"}), path)
    loaded = adapter_state_dict(fresh)
    # The file leaves out the atom coefficients, rebuilt from the weight (in fp32).
    assert loaded.keys() == tensors.keys() | {key for key in loaded if key.endswith(".coeffs")}
    for key, value in tensors.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.to(torch.bfloat16).float())
