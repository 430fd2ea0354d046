"""`target`/`train_heads` forms as peft's `target_modules`, the output-layer rule, logging, progress.

Oracle: peft's own matcher (`check_target_module_exists`) and its own `"all-linear"` resolution
(`get_peft_model`/`inject_adapter_in_model` on the same model).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import AtomParam, apply, load_adapter, save_adapter, trainable_parameters

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists  # noqa: E402

SEGMENTS = ("q_proj", "v_proj", "fc", "fc2", "attn", "mlp", "0", "1")
LEAVES = {"linear": lambda: nn.Linear(2, 2), "conv": lambda: nn.Conv1d(2, 2, 1), "act": nn.ReLU}
SUPPORTED = (nn.Linear, nn.Conv1d)


def adapted_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if parametrize.is_parametrized(module, "weight")}


def build(tree: dict) -> nn.ModuleDict:
    return nn.ModuleDict({name: LEAVES[node]() if isinstance(node, str) else build(node) for name, node in tree.items()})


@st.composite
def trees(draw: st.DrawFn, depth: int = 2) -> dict:
    names = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3, unique=True))
    return {
        name: draw(st.sampled_from(list(LEAVES))) if depth == 0 or draw(st.booleans()) else draw(trees(depth - 1))
        for name in names
    }


@st.composite
def models_and_names(draw: st.DrawFn) -> tuple[nn.Module, list[str]]:
    model = build(draw(trees()))
    keys = [name for name, _ in model.named_modules() if name]
    suffixes = sorted({".".join(key.split(".")[-2:]) for key in keys} | set(keys))
    names = draw(st.lists(st.sampled_from(suffixes), min_size=1, max_size=3, unique=True))
    if draw(st.integers(0, 3)) == 3:  # now and then a name that may match nothing: a typo, a stem
        names.append(draw(st.sampled_from(sorted(set(SEGMENTS) - set(names) | {"q_prj", "proj"}))))
    collection = draw(st.sampled_from([list, tuple, set]))
    return model, collection(names)


def peft_matches(names, key: str) -> bool:
    config = peft.LoraConfig(target_modules=list(names))
    return bool(check_target_module_exists(config, key))


@settings(max_examples=40, deadline=None)
@given(models_and_names())
def test_a_list_of_names_selects_what_peft_target_modules_selects(case):
    model, names = case
    keys = dict(model.named_modules())
    unmatched = [name for name in names if not any(peft_matches([name], key) for key in keys)]
    expected = {key for key, module in keys.items() if isinstance(module, SUPPORTED) and peft_matches(names, key)}
    if unmatched:
        with pytest.raises(ValueError, match=re.escape(f"target names {unmatched} match no module")):
            apply(model, AtomParam, names)
    elif not expected:
        with pytest.raises(ValueError, match="matched no nn.Linear or nn.Conv1d/2d/3d"):
            apply(model, AtomParam, names)
    else:
        assert adapted_names(apply(model, AtomParam, names)) == expected
        return
    assert adapted_names(model) == set()  # refused unchanged


def test_list_names_are_literal_suffixes_not_regexes_or_substrings():
    model = nn.ModuleDict({"fc": nn.Linear(2, 2), "fc2": nn.Linear(2, 2), "block": nn.ModuleDict({"fc": nn.Linear(2, 2)})})
    assert adapted_names(apply(copy.deepcopy(model), AtomParam, ["fc"])) == {"fc", "block.fc"}
    assert adapted_names(apply(copy.deepcopy(model), AtomParam, ["block.fc"])) == {"block.fc"}
    with pytest.raises(ValueError, match=r"target names \['f.'\] match no module"):
        apply(model, AtomParam, ["f."])


@settings(max_examples=20, deadline=None)
@given(trees(), st.sampled_from([r"fc", r".*fc.*", r".*\.q_proj", r"(0|1)\..*", r".*"]))
def test_a_regex_string_is_a_full_match_as_before(tree, pattern):
    model = build(tree)
    expected = {key for key, module in model.named_modules() if isinstance(module, SUPPORTED) and re.fullmatch(pattern, key)}
    if expected:
        assert adapted_names(apply(model, AtomParam, pattern)) == expected
    else:
        with pytest.raises(ValueError, match="matched no"):
            apply(model, AtomParam, pattern)


def test_a_callable_sees_each_name_and_module():
    model = nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1), nn.Linear(2, 2))
    apply(model, AtomParam, lambda name, module: isinstance(module, nn.Conv1d))
    assert adapted_names(model) == {"1"}


def test_train_heads_accepts_a_list_of_names():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3))
    apply(model, AtomParam, train_heads=["2"])
    assert adapted_names(model) == {"0"}
    assert model[2].weight.requires_grad and not model[0].parametrizations.weight.original.requires_grad


def tiny_llama(*, tied: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def peft_lora_names(model: nn.Module, target) -> set[str]:
    """The layers peft's LoRA adapts for ``target_modules=target``."""
    injected = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=target, r=2), copy.deepcopy(model))
    return {name for name, module in injected.named_modules() if isinstance(module, BaseTunerLayer)}


def test_all_linear_on_a_transformers_llama_is_peft_all_linear():
    model = tiny_llama(tied=False)
    expected = peft_lora_names(model, "all-linear")
    assert "lm_head" not in expected and len(expected) == 7
    assert adapted_names(apply(copy.deepcopy(model), AtomParam, "all-linear")) == expected
    assert adapted_names(apply(copy.deepcopy(model), AtomParam, "ALL-LINEAR")) == expected  # as peft: any case
    # The default adds nothing to it: a Llama has no conv layers and its output layer is lm_head.
    assert adapted_names(apply(model, AtomParam)) == expected


def test_all_linear_and_the_default_leave_a_tied_lm_head_alone():
    model = tiny_llama(tied=True)
    for target in (None, "all-linear"):
        adapted = apply(copy.deepcopy(model), AtomParam, target)
        assert "lm_head" not in adapted_names(adapted)
        assert adapted.lm_head.weight is adapted.model.embed_tokens.weight


def test_all_linear_on_a_plain_model_is_peft_all_linear_without_the_output_layer():
    # peft excludes the output layer on transformers models only; the rule here holds everywhere.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    expected = peft_lora_names(model, "all-linear")
    assert expected == {"2", "4", "5"}
    assert adapted_names(apply(model, AtomParam, "all-linear")) == expected - {"5"}


class Classifier(nn.Module):
    def __init__(self, body: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.sampled_from(["linear", "conv", "act"]), min_size=1, max_size=4),
    st.sampled_from(["linear", "conv"]),
    st.sampled_from([None, "all-linear"]),
)
def test_the_defaults_never_adapt_the_output_layer(body, head, target):
    model = Classifier([LEAVES[kind]() for kind in body], LEAVES[head]())
    candidates = {
        f"body.{index}"
        for index, kind in enumerate(body)
        if kind == "linear" or (kind == "conv" and target is None)
    }
    if not candidates:
        with pytest.raises(ValueError):
            apply(model, AtomParam, target)
        assert adapted_names(model) == set()
        return
    apply(model, AtomParam, target)
    assert adapted_names(model) == candidates
    assert not any(parameter.requires_grad for parameter in model.head.parameters())


def test_get_output_embeddings_names_the_output_layer_wherever_it_sits():
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(4, 8)
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    assert adapted_names(apply(LM(), AtomParam)) == {"blocks.0", "blocks.1"}
    assert adapted_names(apply(LM(), AtomParam, "all-linear")) == {"blocks.0", "blocks.1"}
    assert adapted_names(apply(LM(), AtomParam, ["lm_head"])) == {"lm_head"}  # named: adapted


def test_the_output_layer_is_adapted_when_named_or_matched_explicitly():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    assert adapted_names(apply(copy.deepcopy(model), AtomParam, r".*")) == {"0", "1"}
    assert adapted_names(apply(copy.deepcopy(model), AtomParam, ["1"])) == {"1"}
    assert adapted_names(apply(model, AtomParam, lambda name, module: True)) == {"0", "1"}


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (None, ValueError, r"the model's only such layer is its output layer '0'; name it to adapt it \(target=\['0'\]\)"),
        ([], ValueError, r"target is an empty list: name the modules to match"),
        (set(), ValueError, r"target is an empty set"),
        (["0", "q_prj"], ValueError, r"target names \['q_prj'\] match no module of the model"),
        (["0", 3], TypeError, r"target as a collection must hold module names \(str\), got \[3\]"),
        ("fc(", ValueError, r"target='fc\(' is not a valid regex"),
        ({"0": 1}, TypeError, r"target must be a regex string, 'all-linear', a list of module names"),
    ],
)
def test_bad_targets_raise_and_leave_the_model_untouched(target, error, message):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(error, match=message):
        apply(model, AtomParam, target)
    assert adapted_names(model) == set() and model[0].weight.requires_grad


def test_bad_train_heads_are_named():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"train_heads names \['head'\] match no module"):
        apply(model, AtomParam, train_heads=["head"])
    with pytest.raises(ValueError, match=r"train_heads is an empty tuple"):
        apply(model, AtomParam, train_heads=())
    assert adapted_names(model) == set()


# --------------------------------------------------------------------------------------------
# logging and progress


def many_layers(count: int = 20) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(count)])


def test_apply_and_load_adapter_log_one_info_line_and_a_debug_line_per_layer(caplog, tmp_path):
    with caplog.at_level(logging.DEBUG, logger="decomp.adapters.model"):
        model = apply(many_layers(4), AtomParam, train_heads=["3"])
    info = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    debug = [record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG]
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    assert info == [f"apply: 3 layers adapted with AtomParam, 1 heads trained; {trainable} of {total} parameters trainable"]
    assert [line.split(" (")[0] for line in debug] == ["apply: '0'", "apply: '1'", "apply: '2'"]
    assert "(Linear 2x2) <- AtomParam" in debug[0]

    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="decomp.adapters.model"):
        load_adapter(many_layers(4), path)
    assert [record.getMessage().split(";")[0] for record in caplog.records] == [
        f"load_adapter from {path}: 3 layers adapted with AtomParam, 0 heads trained"
    ]


def test_nothing_is_printed_unless_asked(capsys):
    apply(many_layers(), AtomParam)
    apply(many_layers(), AtomParam, progress=False)
    assert capsys.readouterr() == ("", "")


def test_the_automatic_bar_does_not_flash_on_a_quick_apply_at_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    apply(many_layers(), AtomParam)  # 20 layers built well within the 2 s delay
    assert terminal.getvalue() == ""


def test_progress_true_shows_a_bar_over_the_layers(capsys):
    pytest.importorskip("tqdm")
    apply(many_layers(3), AtomParam, progress=True)
    err = capsys.readouterr().err
    assert "building adapters" in err and "0/2" in err


def test_progress_is_checked(monkeypatch):
    with pytest.raises(TypeError, match="progress must be True, False or None, got str"):
        apply(many_layers(2), AtomParam, progress="yes")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "tqdm" else find_spec(name, *rest))
    model = many_layers(2)
    with pytest.raises(ImportError, match="progress=True needs tqdm"):
        apply(model, AtomParam, progress=True)
    assert adapted_names(model) == set()
    apply(model, AtomParam)  # automatic: quietly without the bar
    assert adapted_names(model) == {"0"}
