"""decomp.adapters.peft: every adapter through peft's workflow, against native apply and peft's methods.

(a) On tiny random transformers ViT, ConvNeXt, ResNet and Llama models, for every adapter class:
    peft's path equals ``decomp.adapters.apply`` at init and after the same change of the trainable
    tensors; ``save_pretrained`` -> ``PeftModel.from_pretrained`` gives equal outputs and the same
    adapters; ``merge_and_unload`` gives the plain architecture with the adapted outputs and the
    weights native ``merge`` writes.
(b) peft's workflow features (disable, unload, several adapters, unmerge) on our method.
(c) Oracle: conv layers where peft's LoRA/LoHa/LoKr raise or compute something other than the
    layer's own forward, and where ours is exact.
(d) The feature table of docs/adapters/peft.md: one check per cell, and the page must say ✓
    exactly where the check passes.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import decomp.adapters as adapters  # noqa: E402
from decomp.adapters import AdapterParam, AtomParam, KronParam, LDUParam, apply  # noqa: E402
from decomp.adapters.model import adapted_layers  # noqa: E402
from decomp.adapters.peft import DecompConfig, DecompLayer, adapter_class  # noqa: E402
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "adapters" / "peft.md"


def public_adapter_classes() -> dict[str, type[AdapterParam]]:
    """Each adapter class of decomp.adapters once, under its own public name (aliases skipped)."""
    classes: dict[str, type[AdapterParam]] = {}
    for name in adapters.__all__:
        value = getattr(adapters, name)
        if isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam:
            if value not in classes.values() or name == value.__name__:
                classes = {key: cls for key, cls in classes.items() if cls is not value}
                classes[name] = value
    return classes


ADAPTER_CLASSES = public_adapter_classes()
# A non-default option where one is valid on every layer of the models below (a depthwise 7x7
# conv, 1x1 convs), so the tests also show that options travel through config, JSON file and back.
OPTIONS: dict[str, dict] = {
    "LDUParam": {"rank": 2},
    "DCTParam": {"num_coefficients": 8},
    "SVDParam": {"rank": 2},
}


def options_of(cls: type[AdapterParam]) -> dict:
    return dict(OPTIONS.get(cls.__name__, {}))


# ------------------------------------------------------------------ tiny transformers models
def tiny_vit() -> tuple[nn.Module, torch.Tensor, list[str]]:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        image_size=8, patch_size=4, num_labels=3,
    )
    return transformers.ViTForImageClassification(config), torch.randn(2, 3, 8, 8), [
        "projection", "q_proj", "v_proj", "fc1",
    ]


def tiny_convnext() -> tuple[nn.Module, torch.Tensor, list[str]]:
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
        layer_scale_init_value=1.0,  # the default 1e-6 would hide every block's change
    )
    return transformers.ConvNextForImageClassification(config), torch.randn(2, 3, 16, 16), [
        "dwconv", "pwconv1",
    ]


def tiny_resnet() -> tuple[nn.Module, torch.Tensor, list[str]]:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3,
    )
    return transformers.ResNetForImageClassification(config), torch.randn(2, 3, 16, 16), ["convolution"]


def tiny_llama() -> tuple[nn.Module, torch.Tensor, list[str]]:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config), torch.randint(0, 64, (2, 6)), [
        "q_proj", "v_proj", "down_proj",
    ]


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, list[str]]]] = {
    "vit": tiny_vit, "convnext": tiny_convnext, "resnet": tiny_resnet, "llama": tiny_llama,
}


@pytest.fixture(scope="module")
def pretrained() -> dict[str, tuple[nn.Module, torch.Tensor, list[str]]]:
    built = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model, inputs, targets = make()
        built[name] = (model.eval(), inputs, targets)
    return built


def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits


def ours(model: nn.Module, adapter_name: str = "default") -> dict[str, AdapterParam]:
    """Our adapters in a peft model by the layer names of the unwrapped model."""
    return {
        name.removeprefix("base_model.model."): module.decomp_adapters[adapter_name]
        for name, module in model.named_modules()
        if isinstance(module, DecompLayer) and adapter_name in module.decomp_adapters
    }


def trainable(adapter: AdapterParam) -> list[tuple[str, nn.Parameter]]:
    return [(key, p) for key, p in adapter.named_parameters() if p.requires_grad]


def native_trainable_count(native: nn.Module) -> int:
    return sum(p.numel() for p in adapters.trainable_parameters(native))


def perturb_identically(native: nn.Module, peft_model: nn.Module) -> None:
    """The same random change of every trainable adapter tensor in both models."""
    generator = torch.Generator().manual_seed(2)
    through_peft = ours(peft_model)
    native_layers = adapted_layers(native)
    assert sorted(layer.name for layer in native_layers) == sorted(through_peft)
    with torch.no_grad():
        for layer in native_layers:
            native_tensors, peft_tensors = trainable(layer.adapter), trainable(through_peft[layer.name])
            assert [key for key, _ in native_tensors] == [key for key, _ in peft_tensors]
            for (_, native_tensor), (_, peft_tensor) in zip(native_tensors, peft_tensors):
                change = 0.05 * torch.randn(native_tensor.shape, generator=generator)
                native_tensor.add_(change)
                peft_tensor.add_(change)


# ------------------------------------------------------------------ (a) against the native path
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", list(ADAPTER_CLASSES))
def test_peft_path_equals_native_apply_save_load_and_merge(pretrained, model_name, method, tmp_path):
    base, inputs, targets = pretrained[model_name]
    cls = ADAPTER_CLASSES[method]
    options = options_of(cls)
    torch.manual_seed(1)
    native = apply(copy.deepcopy(base), cls, target=targets, **options)
    torch.manual_seed(1)
    config = DecompConfig(method=method, options=options, target_modules=targets)
    model = get_peft_model(copy.deepcopy(base), config)

    assert model.get_nb_trainable_parameters()[0] == native_trainable_count(native)
    torch.testing.assert_close(logits(model, inputs), logits(native, inputs), rtol=1e-5, atol=1e-6)
    perturb_identically(native, model)
    adapted = logits(model, inputs)
    torch.testing.assert_close(adapted, logits(native, inputs), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, logits(base, inputs), atol=1e-6)  # the change reaches the output

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["method"]) == ("DECOMP", method)
    assert saved["options"] == json.loads(json.dumps(cls(**options).config()))  # every option
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, inputs), adapted)
    for name, adapter in ours(loaded).items():
        assert adapter.config() == ours(model)[name].config()

    merged = model.merge_and_unload()
    assert type(merged) is type(base) and merged.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-4, atol=1e-5)
    natively_merged = adapters.merge(native).state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, natively_merged[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ (b) peft's workflow on our method
def small_convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, dilation=2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).eval()


IMAGES = torch.randn(2, 3, 8, 8)


def perturb(model: nn.Module, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES)


@pytest.mark.parametrize("method", list(ADAPTER_CLASSES))
def test_unmerge_restores_the_pretrained_weight(method):
    base = small_convnet()
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method=method, target_modules=["0", "2"]))
    perturb(model)
    adapted = outputs(model)
    model.merge_adapter()
    torch.testing.assert_close(outputs(model), adapted, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    for key in ("0.weight", "2.weight"):
        restored = model.get_base_model().get_submodule(key.replace(".weight", "")).base_layer.weight
        torch.testing.assert_close(restored, base.state_dict()[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs(model), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(ADAPTER_CLASSES))
def test_files_hold_rebuilt_buffers_as_fingerprints(method, tmp_path):
    base = small_convnet()
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method=method, target_modules=["0", "2"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    expected, numbers = set(), 0  # the keys and numbers the file should hold
    for name, adapter in ours(model).items():
        rebuilt = adapter.rebuilt_state()
        for key, tensor in adapter.state_dict().items():
            stem = f"base_model.model.{name}.decomp_adapters.{key}"
            expected.add(stem + ".fingerprint" if key in rebuilt else stem)
            numbers += 9 if key in rebuilt else tensor.numel()  # a fingerprint is 9 numbers
    assert set(saved) == expected
    assert sum(tensor.numel() for tensor in saved.values()) == numbers
    rebuilt_numbers = sum(
        buffer.numel() for adapter in ours(model).values() for buffer in adapter.rebuilt_state().values()
    )
    if rebuilt_numbers:
        torch.manual_seed(5)
        other = nn.Sequential(*[copy.deepcopy(layer) for layer in base])
        with torch.no_grad():
            for parameter in other.parameters():
                parameter.normal_()
        with pytest.raises(ValueError, match="frozen factors rebuilt from the model's weights differ"):
            PeftModel.from_pretrained(other, tmp_path)


def test_disable_unload_and_trainable_count():
    base = small_convnet()
    config = DecompConfig(method="AtomParam", options={"num_atoms": 4}, target_modules=["0", "2"])
    model = get_peft_model(copy.deepcopy(base), config)
    native = apply(copy.deepcopy(base), AtomParam, target=["0", "2"], num_atoms=4)
    assert model.get_nb_trainable_parameters()[0] == native_trainable_count(native)
    perturb(model)
    adapted = outputs(model)
    with model.disable_adapter():
        assert torch.equal(outputs(model), outputs(base))
    assert torch.equal(outputs(model), adapted)
    unloaded = model.unload()
    assert type(unloaded) is nn.Sequential and torch.equal(outputs(unloaded), outputs(base))


def test_several_named_adapters(tmp_path):
    base = small_convnet()
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method="AtomParam", target_modules=["0", "2"]))
    model.add_adapter("ldu", DecompConfig(method="LDUParam", options={"rank": 2}, target_modules=["2"]))
    assert all(p.requires_grad == (".default." in n) for n, p in model.named_parameters() if "decomp" in n)
    model.set_adapter("ldu")
    assert all(p.requires_grad == (".ldu." in n) for n, p in model.named_parameters() if "decomp" in n)
    perturb(model)
    with_ldu = outputs(model)
    native = apply(copy.deepcopy(base), LDUParam, target=["2"], rank=2)
    with torch.no_grad():
        for layer in adapted_layers(native):
            layer.adapter.load_state_dict(ours(model, "ldu")[layer.name].state_dict())
    torch.testing.assert_close(with_ldu, outputs(native), rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)  # both adapters: default at the top, ldu in its folder
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "ldu", adapter_name="ldu")
    loaded.set_adapter("ldu")
    assert torch.equal(outputs(loaded), with_ldu)
    model.set_adapter("default")
    model.delete_adapter("ldu")
    assert list(model.peft_config) == ["default"] and not ours(model, "ldu")
    assert torch.equal(outputs(model), outputs(base))  # default was never changed: identity at init


def test_a_first_adapter_with_another_name_trains(tmp_path):
    base = small_convnet()
    config = DecompConfig(method="LDUParam", target_modules=["0", "2"])
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="task")
    native = apply(copy.deepcopy(base), LDUParam, target=["0", "2"])
    assert model.get_nb_trainable_parameters()[0] == native_trainable_count(native)
    perturb(model)
    model.save_pretrained(tmp_path)  # a non-default first adapter is saved in its own folder
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "task", adapter_name="task")
    assert torch.equal(outputs(loaded), outputs(model))


def test_active_adapters_compose_in_order_as_merging_does():
    base = small_convnet()
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method="LieParam", target_modules=["2"]))
    model.add_adapter("dct", DecompConfig(method="DCTParam", target_modules=["2"]))
    for name in ("default", "dct"):
        model.set_adapter(name)
        perturb(model, 0.2)
    model.base_model.set_adapter(["default", "dct"])
    both = outputs(model)
    assert not torch.allclose(both, outputs(base), atol=1e-4)
    merged = model.merge_and_unload(adapter_names=["default", "dct"])
    torch.testing.assert_close(outputs(merged), both, rtol=1e-5, atol=1e-6)


def test_linear_layers_with_branch_adapters_run_the_branch_and_equal_the_weight_path():
    """Two branch adapters active on a linear layer: base output plus both branches, equal to the
    chain of adapted weights (and to the merged model); with a Lie adapter in the chain the layer
    computes the adapted weight instead."""
    base = small_convnet()
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method="SVDParam", target_modules=["4"]))
    model.add_adapter("dct", DecompConfig(method="DCTParam", target_modules=["4"]))
    model.add_adapter("lie", DecompConfig(method="LieParam", target_modules=["4"]))
    for name in ("default", "dct", "lie"):
        model.set_adapter(name)
        perturb(model, 0.2)
    layer = next(module for module in model.modules() if isinstance(module, DecompLayer))
    x = torch.randn(3, layer.base_layer.in_features)
    for names in (["default", "dct"], ["default", "dct", "lie"]):
        model.base_model.set_adapter(names)
        weighted = torch.nn.functional.linear(x, layer.adapted_weight(), layer.base_layer.bias)
        torch.testing.assert_close(layer(x), weighted, rtol=1e-5, atol=1e-6)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer(x.requires_grad_())
        weight_sized = [t for t in saved if t.shape == layer.base_layer.weight.shape]
        assert (weight_sized == []) == (names == ["default", "dct"])
    model.base_model.set_adapter(["default", "dct"])
    both = outputs(model)
    merged = model.merge_and_unload(adapter_names=["default", "dct"])
    torch.testing.assert_close(outputs(merged), both, rtol=1e-5, atol=1e-6)


def test_inject_adapter_in_model_and_peft_state_dicts():
    base = small_convnet()
    config = DecompConfig(method="LDUParam", target_modules=["0", "2"])
    injected = peft.inject_adapter_in_model(config, copy.deepcopy(base))
    assert isinstance(injected[0], DecompLayer) and torch.equal(outputs(injected), outputs(base))
    perturb(injected)
    state = peft.get_peft_model_state_dict(injected)
    assert all(".decomp_adapters." in key and ".default." not in key for key in state)
    fresh = peft.inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(base))
    result = peft.set_peft_model_state_dict(fresh, state)
    assert not result.unexpected_keys
    assert torch.equal(outputs(fresh), outputs(injected))


def test_low_cpu_mem_usage_load(tmp_path):
    base = small_convnet()
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method="SVDParam", target_modules=["0", "2"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(outputs(loaded), outputs(model))


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bfloat16_weights(autocast_adapter_dtype):
    base = small_convnet().to(torch.bfloat16)
    native = apply(copy.deepcopy(base), adapters.SVDParam, target=["0", "2"])
    model = get_peft_model(
        copy.deepcopy(base), DecompConfig(method="SVDParam", target_modules=["0", "2"]),
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32 if autocast_adapter_dtype else torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(IMAGES.bfloat16()), native(IMAGES.bfloat16()))


def test_target_modules_none_is_the_native_default(pretrained):
    base, _, _ = pretrained["convnext"]
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method="DCTParam"))
    native = apply(copy.deepcopy(base), adapters.DCTParam)
    assert sorted(ours(model)) == sorted(layer.name for layer in adapted_layers(native))
    assert "classifier" not in ours(model)
    model.add_adapter("second", DecompConfig(method="AtomParam"))  # the same layers get a second one
    assert sorted(ours(model, "second")) == sorted(ours(model))


def test_config_errors():
    with pytest.raises(ValueError, match="names no adapter class.*AtomParam"):
        DecompConfig(method="AtomParm", target_modules=["0"])
    with pytest.raises(ValueError, match="needs method="):
        DecompConfig(target_modules=["0"])
    with pytest.raises(TypeError, match="did you mean 'num_atoms'"):
        DecompConfig(method="AtomParam", options={"num_atom": 2}, target_modules=["0"])
    with pytest.raises(TypeError, match="JSON values only"):
        DecompConfig(method="AtomParam", options={"num_atoms": object()}, target_modules=["0"])
    with pytest.raises(ValueError, match="target_parameters"):
        DecompConfig(method="AtomParam", target_parameters=["0.weight"])
    with pytest.raises(TypeError, match="adapts nn.Linear and nn.Conv1d/2d/3d layers, got LayerNorm"):
        get_peft_model(nn.Sequential(nn.LayerNorm(4)), DecompConfig(method="AtomParam", target_modules=["0"]))


def test_deprecated_names_are_stored_under_the_current_ones():
    renamed = [old for old in ("SNELL", "SNELLA") if old not in ADAPTER_CLASSES]
    for old in renamed:
        with pytest.warns(DeprecationWarning):
            config = DecompConfig(method=old, target_modules=["0"])
        assert config.method == adapter_class(config.method).__name__ != old
    with pytest.warns(DeprecationWarning):
        config = DecompConfig(method="DCTParam", options={"alpha": 2.0}, target_modules=["0"])
    assert config.options["scale"] == 2.0 and "alpha" not in config.options


class ThirdPartyParam(AdapterParam):
    """A third-party adapter: scales the weight by a trainable scalar (zero change at init)."""

    def _build(self, weight: torch.Tensor) -> None:
        self.gain = nn.Parameter(torch.zeros(1, dtype=weight.dtype))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self.gain.to(weight.dtype) * weight


def test_a_third_party_adapter_class_by_qualified_name(tmp_path):
    config = DecompConfig(method=ThirdPartyParam, target_modules=["0"])
    assert config.method == f"{__name__}.ThirdPartyParam" and adapter_class(config.method) is ThirdPartyParam
    base = small_convnet()
    model = get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(outputs(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), outputs(model))


def test_tuple_options_round_trip_through_json_as_the_native_config(tmp_path):
    base = nn.Sequential(nn.Linear(6, 8))
    options = {"b_shape": (2, 2), "c_shape": (4, 3)}
    config = DecompConfig(method="KronParam", options=options, target_modules=["0"])
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    native = KronParam(b_shape=(2, 2), c_shape=(4, 3)).config()
    assert ours(loaded)["0"].config() == ours(model)["0"].config() == native


def test_peft_stays_optional():
    script = (
        "import sys\n"
        "import decomp.adapters\n"
        "assert 'peft' not in sys.modules, 'import decomp.adapters imported peft'\n"
        "sys.modules['peft'] = None  # as if peft were not installed\n"
        "try:\n"
        "    import decomp.adapters.peft\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "pip install decomp-optim[peft]" in result.stdout


def test_the_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("peft_finetune", ROOT / "examples" / "peft_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--steps", "3"])
    assert len(rows) == 3 and "reload equal" in capsys.readouterr().out
    for row in rows:
        assert row["reload equal"] and row["merge max error"] < 1e-4
        assert row["plain model"] == "ConvNextForImageClassification"
        assert row["last loss"] < row["first loss"]


# ------------------------------------------------------------------ (c) oracle: peft's conv failures
CONV_CASES = {
    "grouped (rank 6, groups 4)": lambda: nn.Conv2d(8, 8, 3, groups=4, padding=1),
    "depthwise (rank 6, groups 8)": lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1),
    "dilation 2": lambda: nn.Conv2d(8, 8, 3, dilation=2, padding=2),
    "padding_mode reflect": lambda: nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
}
PEFT_METHODS = {
    "LoRA": lambda: LoraConfig(r=6, target_modules=["0"], init_lora_weights=False),
    "LoHa": lambda: LoHaConfig(r=6, target_modules=["0"], init_weights=False),
    "LoKr": lambda: LoKrConfig(r=6, target_modules=["0"], init_weights=False),
}
# What peft 0.21 does on each case (measured by this test): an exception, "wrong" (the unmerged
# output differs from the layer's own forward with the merged weight) or "exact".
PEFT_OUTCOME = {
    ("grouped (rank 6, groups 4)", "LoRA"): ValueError,
    ("depthwise (rank 6, groups 8)", "LoRA"): ValueError,
    ("dilation 2", "LoRA"): RuntimeError,
    ("padding_mode reflect", "LoRA"): "wrong",
    ("padding_mode reflect", "LoHa"): "wrong",
    ("padding_mode reflect", "LoKr"): "wrong",
}
CONV_INPUT = torch.randn(2, 8, 10, 10)


def unmerged_vs_merged(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        unmerged = model(CONV_INPUT)
        return unmerged, model.merge_and_unload()(CONV_INPUT)


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_peft_on_conv_layers(case, method):
    torch.manual_seed(0)
    model = nn.Sequential(CONV_CASES[case]())
    expected = PEFT_OUTCOME.get((case, method), "exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(expected, type):
            with pytest.raises(expected):
                unmerged_vs_merged(get_peft_model(model, PEFT_METHODS[method]()))
            return
        unmerged, merged = unmerged_vs_merged(get_peft_model(model, PEFT_METHODS[method]()))
    relative_error = ((unmerged - merged).norm() / merged.norm()).item()
    assert (relative_error > 1e-3) == (expected == "wrong"), relative_error


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("method", list(ADAPTER_CLASSES))
def test_ours_is_exact_on_those_conv_layers(case, method):
    torch.manual_seed(0)
    base = nn.Sequential(CONV_CASES[case]())
    torch.manual_seed(1)
    native = apply(copy.deepcopy(base), ADAPTER_CLASSES[method], target=["0"])
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), DecompConfig(method=method, target_modules=["0"]))
    perturb_identically(native, model)
    unmerged, merged = unmerged_vs_merged(model)
    torch.testing.assert_close(unmerged, merged, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(unmerged, native(CONV_INPUT), rtol=1e-5, atol=1e-6)


def page_rows(header_start: str) -> tuple[list[str], dict[str, list[str]]]:
    """A table of the page: its column names and, per row label, its other cells."""
    lines = PAGE.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    columns = [cell.strip() for cell in lines[header].strip().strip("|").split("|")]
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return columns, rows


def test_the_page_states_what_peft_does_on_conv_layers():
    columns, rows = page_rows("| conv layer |")
    assert columns == ["conv layer", *PEFT_METHODS, "ours (every adapter class)"]
    assert list(rows) == list(CONV_CASES)
    for case, cells in rows.items():
        expected = [PEFT_OUTCOME.get((case, method), "exact") for method in PEFT_METHODS]
        expected = [f"raises `{e.__name__}`" if isinstance(e, type) else e for e in expected]
        assert cells == [*expected, "exact"], case


# ------------------------------------------------------------------ (d) the feature table
COLUMNS = ("peft LoRA", "ours through peft", "ours native")
Q_V = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
ALL_LINEAR = {
    f"model.layers.0.{part}"
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
}
TOKENS = torch.randint(0, 64, (2, 6))


def table_model() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama()[0].eval()


def peft_config(column: str, **kwargs) -> peft.PeftConfig:
    if column == "peft LoRA":
        return LoraConfig(r=2, **kwargs)
    return DecompConfig(method="AtomParam", **kwargs)


def llama_logits(model: nn.Module) -> torch.Tensor:
    return logits(model, TOKENS)


def targeted(model: nn.Module) -> set[str]:
    """The adapted layers, by the plain model's names, whichever path adapted them."""
    names = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    names |= {layer.name for layer in adapted_layers(model)}
    return {name.removeprefix("base_model.model.") for name in names}


def make_adapted(column: str, **kwargs) -> nn.Module:
    """An adapted tiny Llama through ``column``'s API (``target_modules`` in peft's words)."""
    model = table_model()
    if column == "ours native":
        target = kwargs.pop("target_modules")
        heads = kwargs.pop("modules_to_save", None)
        return apply(model, AtomParam, target=target, train_heads=heads, **kwargs)
    return get_peft_model(model, peft_config(column, **kwargs))


def check_get_peft_model(column: str, tmp_path: Path) -> None:
    model = make_adapted(column, target_modules=["q_proj", "v_proj"])
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    adapter_marks = {
        "peft LoRA": ".lora_",
        "ours through peft": ".decomp_adapters.",
        "ours native": ".parametrizations.weight.0.",
    }
    assert names and all(adapter_marks[column] in name and not name.endswith(".original") for name in names)
    torch.testing.assert_close(llama_logits(model), llama_logits(table_model()))


def saved_and_loaded(column: str, model: nn.Module, tmp_path: Path) -> nn.Module:
    """``model``'s adapter written by ``column``'s API and read into a fresh pretrained model."""
    if column == "ours native":
        adapters.save_adapter(model, tmp_path / "adapter.safetensors")
        return adapters.load_adapter(table_model(), tmp_path / "adapter.safetensors")
    model.save_pretrained(tmp_path)
    return PeftModel.from_pretrained(table_model(), tmp_path)


def check_save_and_load(column: str, tmp_path: Path) -> None:
    model = make_adapted(column, target_modules=["q_proj", "v_proj"])
    perturb(model)
    assert torch.equal(llama_logits(saved_and_loaded(column, model, tmp_path)), llama_logits(model))


def check_merge_and_unload(column: str, tmp_path: Path) -> None:
    model = make_adapted(column, target_modules=["q_proj", "v_proj"])
    perturb(model)
    adapted = llama_logits(model)
    merged = adapters.merge(model) if column == "ours native" else model.merge_and_unload()
    assert not targeted(merged) and type(merged) is type(table_model())
    torch.testing.assert_close(llama_logits(merged), adapted, rtol=1e-4, atol=1e-5)


def check_disable_adapter(column: str, tmp_path: Path) -> None:
    model = make_adapted(column, target_modules=["q_proj", "v_proj"])
    perturb(model)
    adapted = llama_logits(model)
    disable = getattr(adapters, "disable_adapter") if column == "ours native" else type(model).disable_adapter
    with disable(model):
        assert torch.equal(llama_logits(model), llama_logits(table_model()))
    assert torch.equal(llama_logits(model), adapted)


def check_multiple_adapters(column: str, tmp_path: Path) -> None:
    model = make_adapted(column, target_modules=["q_proj", "v_proj"])
    perturb(model)
    first = llama_logits(model)
    if column == "ours native":
        apply(model, LDUParam, target=["q_proj", "v_proj"])  # a second adapter on the same layers
        return
    model.add_adapter("second", peft_config(column, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("second")
    torch.testing.assert_close(llama_logits(model), llama_logits(table_model()))  # second: identity at init
    model.set_adapter("default")
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"] and torch.equal(llama_logits(model), first)


def check_modules_to_save(column: str, tmp_path: Path) -> None:
    model = make_adapted(column, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    perturb(model)
    assert any("lm_head" in name for name, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(llama_logits(saved_and_loaded(column, model, tmp_path)), llama_logits(model))


def targets_check(expected: set[str], **kwargs) -> Callable[[str, Path], None]:
    def check(column: str, tmp_path: Path) -> None:
        assert targeted(make_adapted(column, **kwargs)) == expected

    return check


# The page's row labels -> the check of each cell.
CHECKS: dict[str, Callable[[str, Path], None]] = {
    "`get_peft_model`": check_get_peft_model,
    "`save_pretrained` / `from_pretrained`": check_save_and_load,
    "`merge_and_unload`": check_merge_and_unload,
    "`disable_adapter`": check_disable_adapter,
    "multiple adapters": check_multiple_adapters,
    "`modules_to_save`": check_modules_to_save,
    "`target_modules`: list of suffixes": targets_check(Q_V, target_modules=["q_proj", "v_proj"]),
    "`target_modules`: regex string": targets_check(Q_V, target_modules=r".*\.(q|v)_proj"),
    '`target_modules`: `"all-linear"`': targets_check(ALL_LINEAR, target_modules="all-linear"),
    "`exclude_modules`": targets_check(
        ALL_LINEAR - {"model.layers.0.self_attn.q_proj"},
        target_modules="all-linear",
        exclude_modules=["q_proj"],
    ),
}


def page_table() -> dict[str, dict[str, str]]:
    """The feature table of the page: row label -> column -> "✓" or "✗"."""
    columns, rows = page_rows("| feature |")
    assert tuple(columns[1:]) == COLUMNS
    table = {}
    for label, cells in rows.items():
        marks = [cell[:1] for cell in cells]
        assert set(marks) <= {"✓", "✗"}, (label, cells)
        table[label] = dict(zip(COLUMNS, marks))
    return table


def test_the_page_lists_every_row_of_checks():
    assert list(page_table()) == list(CHECKS)


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("row", list(CHECKS))
def test_feature_table_cell(row, column, tmp_path):
    mark = page_table()[row][column]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mark == "✓":
            CHECKS[row](column, tmp_path)
        else:
            with pytest.raises(Exception):
                CHECKS[row](column, tmp_path)


def test_a_config_file_written_before_an_option_existed_loads_with_what_it_meant(tmp_path):
    """Regression: an adapter_config.json from before KronParam's ``scale`` has no ``scale``; its
    factors trained the unscaled update, so it loads with ``scale=1.0`` (``saved_defaults``) as
    ``load_adapter`` does, not with the rule that a config built in code now gets."""
    from peft import PeftConfig

    base = nn.Sequential(nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 6))
    config = DecompConfig(method="KronParam", options={"scale": 1.0}, target_modules=["0"])
    model = get_peft_model(copy.deepcopy(base), config)
    perturb(model)
    x = torch.randn(3, 48)
    expected = model(x)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    written = json.loads(config_path.read_text())
    del written["options"]["scale"]  # as the release before the option wrote it
    config_path.write_text(json.dumps(written))
    for loaded_config in (DecompConfig.from_pretrained(tmp_path), PeftConfig.from_pretrained(tmp_path)):
        assert loaded_config.options["scale"] == 1.0
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(x), expected)
    assert DecompConfig(method="KronParam", target_modules=["0"]).options["scale"] is None  # in code: the rule
    again = DecompConfig.from_pretrained(tmp_path)  # a file that has the option keeps its value
    again.options["scale"] = 0.5
    again.save_pretrained(tmp_path / "half")
    assert DecompConfig.from_pretrained(tmp_path / "half").options["scale"] == 0.5
