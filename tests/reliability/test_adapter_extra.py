"""``save_adapter``/``load_adapter`` carry what a tuned model needs besides its adapters.

A BatchNorm network adapted with a trained head (``train_heads``) and trained in ``train()`` mode
changes its head and its running statistics; the adapter file holds both (``extra=True``, the
default), so loading it into a fresh copy of the pretrained network reproduces the tuned outputs
exactly, while ``extra=False`` (adapters only, the old files) does not. Explicit module names (peft's
``modules_to_save``) work on a transformers model. Every fault an extra tensor can carry (not in the
model, another shape, another kind of dtype, NaN/Inf, trainable but a buffer in the model, malformed
metadata) raises ``ValueError`` and leaves the model exactly as it was, both ways into
``load_adapter``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from decomp.adapters import AtomParam, LieParam, apply, load_adapter, save_adapter

from .adapter_helpers import Metadata, Snapshot, Tensors, read_file, tiny_llama

EXTRA = "decomp.adapters.extra"


def _pretrained() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def _adapt(model: nn.Module) -> nn.Module:
    return apply(model, AtomParam, target=r"^(0|3)$", train_heads=r"^8$")


def _tuned(pretrained: nn.Module) -> nn.Module:
    """Three AdamW steps in train mode: adapters, head and BatchNorm statistics all change."""
    model = _adapt(copy.deepcopy(pretrained)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        inputs = torch.randn(6, 3, 8, 8, generator=generator) * 2 + 1
        labels = torch.randint(0, 5, (6,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, Path, Path]:
    pretrained = _pretrained()
    tuned = _tuned(pretrained)
    folder = tmp_path_factory.mktemp("extra")
    save_adapter(tuned, folder / "full.safetensors")
    save_adapter(tuned, folder / "adapters_only.safetensors", extra=False)
    return pretrained, tuned, folder / "full.safetensors", folder / "adapters_only.safetensors"


INPUTS = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("into", ["unadapted", "adapted"])
def test_batchnorm_network_round_trips_exactly(setting: Any, into: str) -> None:
    pretrained, tuned, full, _ = setting
    fresh = copy.deepcopy(pretrained)
    if into == "adapted":
        fresh = _adapt(fresh)
    loaded = load_adapter(fresh, full).eval()
    with torch.no_grad():
        assert torch.equal(loaded(INPUTS), tuned(INPUTS))
    trainable = sorted(name for name, p in loaded.named_parameters() if p.requires_grad)
    assert trainable == sorted(name for name, p in tuned.named_parameters() if p.requires_grad)
    assert {"8.weight", "8.bias"} <= set(trainable)
    assert not loaded[1].weight.requires_grad  # a frozen norm layer stays frozen; its stats load
    assert torch.equal(loaded[1].num_batches_tracked, tuned[1].num_batches_tracked)


def test_metadata_lists_heads_and_statistics(setting: Any) -> None:
    _, _, full, adapters_only = setting
    tensors, metadata = read_file(full)
    listed = {entry["key"]: entry for entry in json.loads(metadata[EXTRA])}
    norm_keys = {f"{i}.{b}" for i in (1, 4) for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(listed) == {"8.weight", "8.bias"} | norm_keys
    assert all(listed[key]["trainable"] for key in ("8.weight", "8.bias"))
    assert not any(listed[key]["trainable"] for key in norm_keys)
    assert all(listed[key]["shape"] == list(tensors[key].shape) for key in listed)
    only_tensors, only_metadata = read_file(adapters_only)
    assert EXTRA not in only_metadata and not set(listed) & set(only_tensors)


def test_adapters_only_file_loads_as_before_and_misses_the_tuning(setting: Any) -> None:
    """The old behaviour, measured: the head and statistics are the pretrained ones."""
    pretrained, tuned, _, adapters_only = setting
    loaded = load_adapter(copy.deepcopy(pretrained), adapters_only).eval()
    with torch.no_grad():
        difference = (loaded(INPUTS) - tuned(INPUTS)).abs().max().item()
    assert difference > 1e-2
    assert not any(p.requires_grad for p in loaded[8].parameters())  # as before: heads frozen


def test_save_refuses_a_nonfinite_head(tmp_path: Path) -> None:
    model = _tuned(_pretrained())
    with torch.no_grad():
        model[4].running_var[0] = float("inf")
    with pytest.raises(ValueError, match=r"'4.running_var' holds NaN or Inf"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    save_adapter(model, tmp_path / "a.safetensors", extra=False)  # the adapters alone are fine


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ("8", TypeError, "extra must be True, False or a list of module names"),
        ([8], TypeError, "extra must be True, False or a list of module names"),
        (None, TypeError, "extra must be True, False or a list of module names"),
        (["head"], ValueError, r"extra names modules the model does not have: \['head'\]"),
    ],
)
def test_save_checks_extra(tmp_path: Path, extra: Any, error: type, message: str) -> None:
    model = _adapt(_pretrained())
    with pytest.raises(error, match=message):
        save_adapter(model, tmp_path / "a.safetensors", extra=extra)
    assert not (tmp_path / "a.safetensors").exists()


def _rename(tensors: Tensors, metadata: Metadata, key: str, draw: Callable) -> tuple[Tensors, Metadata]:
    tensors = dict(tensors)
    tensors["9." + key] = tensors.pop(key)
    return tensors, _edit_extra(metadata, lambda entries: [
        {**entry, "key": "9." + key} if entry["key"] == key else entry for entry in entries
    ])


def _reshape(tensors: Tensors, metadata: Metadata, key: str, draw: Callable) -> tuple[Tensors, Metadata]:
    value = torch.cat([tensors[key].reshape(-1), tensors[key].reshape(-1)[:1]])
    return {**tensors, key: value}, _edit_extra(metadata, lambda entries: [
        {**entry, "shape": list(value.shape)} if entry["key"] == key else entry for entry in entries
    ])


def _nonfinite(tensors: Tensors, metadata: Metadata, key: str, draw: Callable) -> tuple[Tensors, Metadata]:
    value = tensors[key].clone()
    if not value.is_floating_point():
        value = value.double()  # an integer statistic cannot hold NaN: make it a float one
    value.view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(
        st.sampled_from([float("nan"), float("inf"), -float("inf")])
    )
    return {**tensors, key: value}, metadata


def _overflow(tensors: Tensors, metadata: Metadata, key: str, draw: Callable) -> tuple[Tensors, Metadata]:
    """Finite in the file, infinite once cast to the model's float32."""
    value = tensors[key].double() * 0 + 1e300
    return {**tensors, key: value}, metadata


def _other_kind(tensors: Tensors, metadata: Metadata, key: str, draw: Callable) -> tuple[Tensors, Metadata]:
    value = tensors[key]
    other = value.to(torch.int64) if value.is_floating_point() else value.to(torch.float32)
    return {**tensors, key: other}, metadata


def _buffer_as_trainable(
    tensors: Tensors, metadata: Metadata, key: str, draw: Callable
) -> tuple[Tensors, Metadata]:
    return tensors, _edit_extra(metadata, lambda entries: [
        {**entry, "trainable": True} if entry["key"] == "1.running_mean" else entry
        for entry in entries
    ])


def _malformed(tensors: Tensors, metadata: Metadata, key: str, draw: Callable) -> tuple[Tensors, Metadata]:
    broken = draw(st.sampled_from([
        "{not json",
        json.dumps({"key": key}),
        json.dumps([{"key": key}]),
        json.dumps([{"key": "absent", "shape": [1], "trainable": True}]),
        json.dumps([{"key": key, "shape": [123], "trainable": True}]),
        json.dumps([{"key": key, "shape": list(tensors[key].shape), "trainable": "yes"}]),
    ]))
    return tensors, {**metadata, EXTRA: broken}


def _edit_extra(metadata: Metadata, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Metadata:
    return {**metadata, EXTRA: json.dumps(edit(json.loads(metadata[EXTRA])))}


FAULTS = {
    "missing in the model": (_rename, r"extra tensor '9\..*' is not a parameter or buffer of the model"),
    "another shape": (_reshape, r"extra tensor .*: shape .* in the file, .* in the model"),
    "NaN/Inf": (_nonfinite, r"extra tensor .* holds NaN or Inf|dtype .* in the file"),
    "overflows the model dtype": (_overflow, r"extra tensor .* holds NaN or Inf|dtype .* in the file"),
    "another kind of dtype": (_other_kind, r"extra tensor .*: dtype .* in the file, .* in the model"),
    "trainable but a buffer": (_buffer_as_trainable, r"is a trainable parameter in the file, a buffer"),
    "malformed metadata": (_malformed, r"metadata 'decomp.adapters.extra'"),
}


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_a_faulty_extra_tensor_changes_nothing(setting: Any, data: st.DataObject) -> None:
    pretrained, tuned, full, _ = setting
    tensors, metadata = read_file(full)
    keys = sorted(entry["key"] for entry in json.loads(metadata[EXTRA]))
    fault = data.draw(st.sampled_from(sorted(FAULTS)), label="fault")
    key = data.draw(st.sampled_from(keys), label="key")
    corrupt, message = FAULTS[fault]
    bad_tensors, bad_metadata = corrupt(tensors, metadata, key, data.draw)
    into = data.draw(st.sampled_from(["unadapted", "adapted"]), label="into")
    model = copy.deepcopy(pretrained)
    if into == "adapted":
        model = _adapt(model)
    before = Snapshot(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bad.safetensors"
        save_file(bad_tensors, str(path), metadata=bad_metadata)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
    before.assert_unchanged(model)
    with torch.no_grad():
        assert torch.equal(load_adapter(model, full).eval()(INPUTS), tuned(INPUTS))


def test_explicit_module_names_on_a_transformers_model(tmp_path: Path) -> None:
    """peft's modules_to_save: names are qualified names or dotted suffixes ("norm" is model.norm)."""
    pretrained = tiny_llama(tied=False)
    tuned = apply(copy.deepcopy(pretrained), LieParam, target=["q_proj", "v_proj"])
    tuned.lm_head.weight.requires_grad_(True)
    with torch.no_grad():
        for _, tensor in tuned.named_parameters():
            if tensor.requires_grad:
                tensor.add_(0.05 * torch.randn_like(tensor))
        tuned.model.norm.weight.mul_(1.5)
    path = tmp_path / "llama.safetensors"
    save_adapter(tuned, path, extra=["lm_head", "norm"])
    _, metadata = read_file(path)
    saved = {entry["key"]: entry["trainable"] for entry in json.loads(metadata[EXTRA])}
    assert saved == {"lm_head.weight": True, "model.norm.weight": False}
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    for fresh in (copy.deepcopy(pretrained), apply(copy.deepcopy(pretrained), LieParam, target=["q_proj", "v_proj"])):
        loaded = load_adapter(fresh, path)
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, tuned(tokens).logits)
        assert loaded.lm_head.weight.requires_grad and not loaded.model.norm.weight.requires_grad
    # Without the extra tensors, the tuned head is lost.
    save_adapter(tuned, path, extra=False)
    with torch.no_grad():
        assert not torch.equal(load_adapter(copy.deepcopy(pretrained), path)(tokens).logits, tuned(tokens).logits)


def test_nothing_extra_writes_an_empty_list(tmp_path: Path) -> None:
    pretrained = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model = apply(copy.deepcopy(pretrained), AtomParam, target=r"^0$")
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    assert json.loads(read_file(path)[1][EXTRA]) == []
    # The same pretrained weight: the atom coefficients are rebuilt from it.
    load_adapter(copy.deepcopy(pretrained), path)
