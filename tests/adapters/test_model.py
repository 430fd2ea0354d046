"""Model-level helpers: apply (targeting, heads, all-or-nothing), report, merge, adapter files,
deepcopy independence, torch.compile and a 2-process DDP run.

Every adapter goes through the same properties in tests/contracts/test_adapter_contract.py; this
file checks the helpers themselves, with AtomParam as the adapter.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import (
    AtomParam,
    adapter_state_dict,
    apply,
    load_adapter,
    merge,
    report,
    save_adapter,
    trainable_parameters,
)


class SmallNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1),
        )
        self.fc = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc(self.features(x).mean((2, 3)))))


def pretrained(seed: int = 0) -> SmallNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SmallNet()


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def adapted_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if parametrize.is_parametrized(module, "weight")]


def train(model: nn.Module, steps: int = 2, seed: int = 0) -> None:
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    for step in range(steps):
        loss = model(batch(seed + step)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --------------------------------------------------------------------------------------------
# apply


def test_default_target_adapts_every_supported_layer_but_the_output_one_and_freezes_the_rest():
    model = apply(pretrained(), AtomParam)
    assert adapted_names(model) == ["features.0", "features.2", "features.4", "fc"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.parametrizations.weight.0.atom_delta" for name in adapted_names(model)}
    every = apply(pretrained(), AtomParam, target=r".*")
    assert adapted_names(every) == ["features.0", "features.2", "features.4", "fc", "fc2"]


def test_string_target_is_a_full_match():
    model = apply(pretrained(), AtomParam, target="fc")
    assert adapted_names(model) == ["fc"]
    model = apply(pretrained(), AtomParam, target=r"features\.\d")
    assert adapted_names(model) == ["features.0", "features.2", "features.4"]


def test_callable_target_and_heads_stay_trainable():
    model = apply(
        pretrained(),
        AtomParam,
        target=lambda name, module: isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3),
        train_heads="fc2",
    )
    assert adapted_names(model) == ["features.0", "features.2"]
    assert model.fc2.weight.requires_grad and model.fc2.bias.requires_grad
    assert not model.fc.weight.requires_grad and not model.features[4].weight.requires_grad
    heads_never_adapted = apply(pretrained(), AtomParam, train_heads=r"fc\d?")
    assert adapted_names(heads_never_adapted) == ["features.0", "features.2", "features.4"]


def test_factory_gets_the_name_and_module():
    seen = []

    def factory(name: str, module: nn.Module) -> AtomParam:
        seen.append(name)
        return AtomParam(levels=2) if isinstance(module, nn.Conv2d) else AtomParam()

    model = apply(pretrained(), factory)
    assert seen == adapted_names(model)
    assert model.features[0].parametrizations.weight[0].levels == 2


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: apply(m, AtomParam(), "fc"), TypeError, "got an instance of AtomParam"),
        (lambda m: apply(m, "AtomParam"), TypeError, "adapter must be an AdapterParam subclass or a factory"),
        (lambda m: apply(m, lambda n, mod: AtomParam(), num_atoms=3), TypeError, r"keyword arguments \['num_atoms'\]"),
        (lambda m: apply(m, lambda n, mod: nn.Identity()), TypeError, "returned Identity .*not an AdapterParam"),
        (lambda m: apply(m, AtomParam, target=3), TypeError, "target must be a regex string"),
        (lambda m: apply(m, AtomParam, train_heads=3), TypeError, "train_heads must be a regex string"),
        (lambda m: apply(m, AtomParam, target="classifier"), ValueError, "target='classifier' matched no"),
        (lambda m: apply(m, AtomParam, target="features"), ValueError, "target='features' matched no"),
        (lambda m: apply(m, AtomParam, levels=2, sub_atoms=10), ValueError, r"sub_atoms must be in \[1, K\] = \[1, 9\]"),
    ],
)
def test_bad_calls_raise_and_leave_the_model_untouched(call, error, message):
    model = pretrained()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        call(model)
    assert adapted_names(model) == []
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


@pytest.mark.parametrize(
    "call",
    [
        lambda m: apply(m, AtomParam),
        lambda m: merge(m),
        lambda m: report(m),
        lambda m: trainable_parameters(m),
        lambda m: adapter_state_dict(m),
        lambda m: save_adapter(m, "unused.safetensors"),
        lambda m: load_adapter(m, "unused.safetensors"),
    ],
    ids=["apply", "merge", "report", "trainable_parameters", "adapter_state_dict", "save_adapter", "load_adapter"],
)
def test_a_model_that_is_not_a_module_is_refused(call):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        call({"fc.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize(
    "layer", [nn.Embedding(10, 4), nn.ConvTranspose2d(4, 4, 3)], ids=["embedding", "conv_transpose"]
)
def test_a_targeted_unsupported_layer_is_refused_before_any_registration(layer):
    """(An adapter's own refusal of a weight it cannot take is the adapter contract's.)"""
    model = nn.Sequential(pretrained(), copy.deepcopy(layer))
    message = rf"'1' of type {type(layer).__name__}; adapters support nn.Linear and nn.Conv1d/2d/3d"
    with pytest.raises(TypeError, match=message):
        apply(model, AtomParam, target=r".*")
    assert adapted_names(model) == []
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_failure_after_some_registrations_rolls_them_back():
    # The 3x3 convs features.0 and features.2 ignore block=3; the 1x1 features.4, an 8x8 matrix
    # in the block view, rejects it.
    model = pretrained()
    first_weight = model.features[0].weight
    with pytest.raises(ValueError, match="block must divide"):
        apply(model, AtomParam, target=r"features\.\d", block=3)
    assert adapted_names(model) == []
    assert type(model.features[0]) is nn.Conv2d and model.features[0].weight is first_weight


def test_a_second_apply_keeps_the_first_adapters_trainable():
    model = apply(pretrained(), AtomParam, target="fc")
    apply(model, AtomParam, target=r"features\.0", levels=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "fc.parametrizations.weight.0.atom_delta",
        "features.0.parametrizations.weight.0.sub_atom_delta",
        "features.0.parametrizations.weight.0.sub_coeffs",
    }


def test_already_adapted_layer_is_refused():
    model = apply(pretrained(), AtomParam, target="fc")
    with pytest.raises(ValueError, match="layer 'fc' is already adapted"):
        apply(model, AtomParam)
    assert adapted_names(model) == ["fc"]


# --------------------------------------------------------------------------------------------
# report, merge


def test_report_rows_and_table():
    model = apply(pretrained(), AtomParam, train_heads="fc2", num_atoms=1)
    rows = report(model)
    assert [row.name for row in rows] == ["features.0", "features.2", "features.4", "fc"]
    conv = rows[0]
    assert (conv.layer_type, conv.weight_shape, conv.trainable, conv.frozen) == ("Conv2d", (8, 3, 3, 3), 9, 8 * 27 + 8)
    assert rows[3].trainable == 16  # 8x8 linear: 4x4 tiles, one atom
    assert rows[2].trainable == 16  # 8x8 pointwise conv: the block view, as the 8x8 linear
    assert rows.model_trainable == 9 + 9 + 16 + 16 + (8 * 3 + 3)
    assert rows.model_total == rows.model_trainable + sum(p.numel() for p in pretrained().parameters()) - 27
    table = str(rows)
    assert table.splitlines()[0].split() == ["layer", "type", "weight", "shape", "adapter", "trainable", "frozen"]
    assert f"trainable {rows.model_trainable:,} of {rows.model_total:,} parameters" in table


def test_merge_gives_plain_layers_with_the_same_outputs():
    model = apply(pretrained(), AtomParam, levels=2)
    train(model)
    x = batch(7)
    adapted = model(x).detach()
    merge(model)
    assert adapted_names(model) == []
    assert type(model.features[2]) is nn.Conv2d and type(model.fc) is nn.Linear
    assert set(model.state_dict()) == set(pretrained().state_dict())
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# adapter files


def test_adapter_state_dict_has_only_adapter_tensors_with_model_keys():
    model = apply(pretrained(), AtomParam, levels=2, target="fc")
    state = adapter_state_dict(model)
    prefix = "fc.parametrizations.weight.0."
    assert set(state) == {prefix + "coeffs", prefix + "sub_coeffs", prefix + "sub_atom_delta"}
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_save_load_round_trip_restores_buffers_too(tmp_path):
    model = apply(pretrained(), AtomParam)
    train(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, factors=True)  # factors stored: the file's, not the model's, count
    fresh = apply(pretrained(), AtomParam)
    with torch.no_grad():  # stand-in for an SVD whose signs came out differently elsewhere
        fresh.fc.parametrizations.weight[0].coeffs.neg_()
    optimizer_tensors = trainable_parameters(fresh)
    load_adapter(fresh, path)
    assert all(a is b for a, b in zip(trainable_parameters(fresh), optimizer_tensors))
    x = batch(3)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: apply(pretrained(), AtomParam, target="fc"), "layer 'fc2' is adapted in the file but not in the model"),
        (lambda: apply(pretrained(), AtomParam, r".*", num_atoms=1), r"config \{.*'num_atoms': None.*\} in the file"),
        (lambda: apply(SmallNet(classes=5), AtomParam, r".*"), r"layer 'fc2': weight shape \[3, 8\] in the file, \[5, 8\]"),
    ],
)
def test_loading_a_file_for_another_model_lists_the_mismatch(tmp_path, other, message):
    path = tmp_path / "adapter.safetensors"
    save_adapter(apply(pretrained(), AtomParam, r".*"), path)
    model = other()
    before = {key: value.clone() for key, value in adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(model, path)
    assert all(torch.equal(adapter_state_dict(model)[key], value) for key, value in before.items())


def test_foreign_file_and_unadapted_model_are_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an adapter file written by decomp.adapters.save_adapter"):
        load_adapter(apply(pretrained(), AtomParam), path)
    with pytest.raises(ValueError, match="model has no adapters to save"):
        save_adapter(pretrained(), tmp_path / "empty.safetensors")


# --------------------------------------------------------------------------------------------
# copies, compile, DDP


def test_deepcopy_then_merge_or_remove_on_the_copy_leaves_the_original_working():
    model = apply(pretrained(), AtomParam)
    train(model)
    x = batch(1)
    expected = model(x).detach()
    replica = copy.deepcopy(model)
    assert type(replica.fc) is not type(model.fc)
    parametrize.remove_parametrizations(replica.fc, "weight", leave_parametrized=True)
    merge(replica)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(replica(x), expected, rtol=1e-5, atol=1e-6)
    nested = copy.deepcopy(copy.deepcopy(model))
    merge(nested)
    assert adapted_names(model) == ["features.0", "features.2", "features.4", "fc"]


def test_merge_protects_the_original_of_a_hand_registered_copy():
    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", AtomParam())
    replica = copy.deepcopy(conv)  # parametrize's own deepcopy: the class is shared
    assert type(replica) is type(conv)
    merge(replica)
    assert parametrize.is_parametrized(conv, "weight") and conv.weight.shape == (4, 3, 3, 3)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_on_an_adapted_model(backend):
    model = apply(pretrained(), AtomParam, levels=2)
    train(model, steps=1)
    x = batch(2)
    expected = model(x)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    output = compiled(x)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    output.square().sum().backward()
    assert all(p.grad is not None for p in trainable_parameters(model))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor's CPU backend needs a C++ compiler")
def test_torch_compile_with_inductor_matches_eager():
    # ~10 s on two CPU cores: the one inductor test.
    network = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))
    model = apply(network, AtomParam, levels=2)
    x = batch(5)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    output = compiled(x)
    torch.testing.assert_close(output, model(x), rtol=1e-5, atol=1e-5)
    output.sum().backward()
    assert all(p.grad is not None for p in trainable_parameters(model))


def _ddp_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = apply(pretrained(), AtomParam, levels=2, train_heads="fc2")
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
        for step in range(3):
            loss = ddp(batch(100 * rank + step)).square().mean()  # different data on each rank
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save({key: value.clone() for key, value in model.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_train_identical_adapters(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    initial = apply(pretrained(), AtomParam, levels=2, train_heads="fc2").state_dict()
    delta_key = "fc.parametrizations.weight.0.sub_atom_delta"
    assert not torch.equal(rank0[delta_key], initial[delta_key])
    assert torch.equal(rank0["fc.parametrizations.weight.original"], initial["fc.parametrizations.weight.original"])


def test_load_into_an_unadapted_model_registers_the_described_adapters(tmp_path):
    model = apply(pretrained(), AtomParam, target=r"features\.[02]", levels=2, num_atoms=4)
    train(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = load_adapter(pretrained(), path)
    assert adapted_names(fresh) == ["features.0", "features.2"]
    assert fresh.features[2].parametrizations.weight[0].config() == model.features[2].parametrizations.weight[0].config()
    x = batch(4)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"adapts layers the model does not have: \['features.0', 'features.2'\]"):
        load_adapter(nn.Sequential(nn.Linear(2, 2)), path)
    narrower = nn.Module()
    narrower.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match=r"features.0: \[8, 3, 3, 3\] in the file, \[4, 3, 3, 3\] in the"):
        load_adapter(narrower, path)
    assert adapted_names(narrower) == []
