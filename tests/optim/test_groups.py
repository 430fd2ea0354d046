"""optim.param_groups: transformers' optim_target_modules groups, with decomp.adapters' matching."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import AtomParam, apply
from optim import (
    ARO,
    DCTProjectedAdam,
    ProjectedAdam,
    RotatedAdam,
    SVDProjectedAdam,
    matrix_groups,
    param_groups,
)

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = {
    "linear": lambda: nn.Linear(4, 4),
    "nobias": lambda: nn.Linear(4, 4, bias=False),
    "conv1d": lambda: nn.Conv1d(2, 3, 3),
    "conv2d": lambda: nn.Conv2d(2, 3, 3),
    "norm": lambda: nn.LayerNorm(4),
    "act": lambda: nn.ReLU(),
    "embedding": lambda: nn.Embedding(5, 4),
}


class Block(nn.Module):
    def __init__(self, kinds: list[str]) -> None:
        super().__init__()
        for index, kind in enumerate(kinds):
            self.add_module(f"{kind}_{index}", LAYERS[kind]())


@st.composite
def models(draw) -> nn.Module:
    """Nested blocks of layers, sometimes a module reused under two names or a tied weight."""
    blocks = draw(st.lists(st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=4),
                           min_size=1, max_size=3))
    model = nn.Module()
    for index, kinds in enumerate(blocks):
        model.add_module(f"block{index}", Block(kinds))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) >= 2 and draw(st.booleans()):
        linears[-1].weight = linears[0].weight  # a tied weight
    first = next(iter(model.block0.children()))
    if draw(st.booleans()):
        model.add_module("again", first)  # one module under two names
    return model


def expected_targets(model: nn.Module, target) -> list[nn.Module]:
    """Independent oracle: the modules whose names (any alias) the target form matches."""
    named = list(model.named_modules(remove_duplicate=False))
    if target == "all-linear":
        layers = [m for m in model.modules() if isinstance(m, SUPPORTED)]
        head = layers[-1] if layers else None
        hit = lambda name, module: isinstance(module, nn.Linear) and module is not head  # noqa: E731
    elif isinstance(target, str):
        hit = lambda name, module: re.fullmatch(target, name) is not None  # noqa: E731
    elif isinstance(target, list):
        hit = lambda name, module: any(name == t or name.endswith("." + t) for t in target)  # noqa: E731
    else:
        hit = target
    found: dict[int, nn.Module] = {}
    for name, module in named:
        if hit(name, module):
            found[id(module)] = module
    return list(found.values())


@st.composite
def targets(draw, model: nn.Module):
    names = [name for name, _ in model.named_modules() if name]
    kind = draw(st.sampled_from(["list", "regex", "callable", "all-linear"]))
    if kind == "list":
        picked = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        return [name.rsplit(".", 1)[-1] if draw(st.booleans()) else name for name in picked]
    if kind == "regex":
        return draw(st.sampled_from([r".*linear.*", r"block0\..*", r".*conv.*", r".*_0", r".*"]))
    if kind == "callable":
        return lambda name, module: isinstance(module, nn.Conv2d) or name.endswith("_1")
    return "all-linear"


@settings(max_examples=50)
@given(data=st.data())
def test_groups_partition_the_parameters_and_target_exactly_the_matched_weights(data):
    model = data.draw(models())
    target = data.draw(targets(model))
    matched = expected_targets(model, target)
    with_weight = [m for m in matched if m._parameters.get("weight") is not None]
    wrong = [m for m in with_weight if not isinstance(m, SUPPORTED)]
    if wrong:
        with pytest.raises(TypeError, match="param_groups projects nn.Linear"):
            param_groups(model, target, rank=2, update_gap=7)
        return
    if not with_weight:
        with pytest.raises(ValueError, match="matches no nn.Linear"):
            param_groups(model, target, rank=2, update_gap=7)
        return
    groups = param_groups(model, target, rank=2, update_gap=7)
    flat = [id(p) for group in groups for p in group["params"]]
    assert sorted(flat) == sorted(id(p) for p in model.parameters())  # every param exactly once
    assert {id(p) for p in groups[0]["params"]} == {id(m.weight) for m in with_weight}
    assert groups[0]["rank"] == 2 and groups[0]["update_gap"] == 7
    assert all(group["rank"] is None and set(group) == {"params", "rank"} for group in groups[1:])
    DCTProjectedAdam(groups, lr=1e-3)  # torch refuses a parameter in two groups


def test_a_weight_tied_to_an_embedding_lands_in_one_group_only():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
    model[2].weight = model[0].weight  # tied LM head
    groups = param_groups(model, ["2"], rank=2)
    assert [p is model[0].weight for p in groups[0]["params"]] == [True]
    assert all(p is not model[0].weight for p in groups[1]["params"])
    # "all-linear" leaves the output layer (the last Linear) out.
    assert [p is model[1].weight for p in param_groups(model, "all-linear", rank=2)[0]["params"]] == [True]


def test_the_same_target_names_the_same_layers_as_apply():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))

    for target in (["0", "2"], r"\d", "all-linear", lambda name, module: name == "4"):
        adapted = apply(make(), AtomParam, target)
        adapted_names = {n for n, m in adapted.named_modules() if parametrize.is_parametrized(m, "weight")}
        model = make()
        chosen = {id(p) for p in param_groups(model, target, rank=2)[0]["params"]}
        grouped_names = {n for n, m in model.named_modules() if id(getattr(m, "weight", None)) in chosen}
        assert grouped_names == adapted_names


def llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "target", [["q_proj", "v_proj"], ["down_proj"], r".*\.self_attn\.(q|k)_proj", r"model\.layers\.1\..*_proj", "all-linear"]
)
def test_targets_are_transformers_optim_target_modules_on_llama(target):
    from transformers.trainer_utils import check_target_module_exists

    model = llama()
    # transformers' _setup_low_rank_optimizer selection: nn.Linear modules that match.
    all_linear = target == "all-linear"
    names = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (all_linear or check_target_module_exists(target, name))
    }
    theirs = {id(p) for n, p in model.named_parameters() if n in names}
    if all_linear:  # transformers keeps the LM head in "all-linear"; peft and we leave it out
        theirs.discard(id(model.lm_head.weight))
    groups = param_groups(model, target, rank=4)
    assert {id(p) for p in groups[0]["params"]} == theirs
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "make",
    [
        lambda groups: DCTProjectedAdam(groups, lr=1e-3),
        lambda groups: SVDProjectedAdam(groups, lr=1e-3),
        lambda groups: ProjectedAdam(groups, lr=1e-3, projector="random"),
    ],
)
def test_every_projected_optimizer_projects_the_targets_and_steps_the_rest_as_adamw(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 2))
    optimizer = make(param_groups(model, [r"0", "3"], rank=2, update_gap=5))
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    optimizer.step()
    assert optimizer.state[model[0].weight]["exp_avg"].shape[1] == 2  # conv weight (8, 27): projected
    assert optimizer.state[model[3].weight]["exp_avg"].shape[1] == 2
    assert optimizer.state[model[4].weight]["exp_avg"].shape == (2, 16)  # untargeted: AdamW


@pytest.mark.parametrize("optimizer", [ARO, RotatedAdam])
def test_rotated_optimizers_refuse_the_groups_by_naming_rank(optimizer):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="unknown option 'rank'"):
        optimizer(param_groups(model, ["0"], rank=2))


def test_errors_name_the_problem():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cases = [
        (dict(target=r"nothing.*"), ValueError, "matches no nn.Linear"),
        (dict(target=["2"]), ValueError, "matches no nn.Linear"),  # a ReLU has no weight
        (dict(target=3), TypeError, "target must be"),
        (dict(target=None), TypeError, "target must be"),
        (dict(target=[]), ValueError, "target is an empty list"),
        (dict(target=["q_proj"]), ValueError, "match no module"),
        (dict(target=[1]), TypeError, "must hold module names"),
        (dict(target="("), ValueError, "not a valid regex"),
        (dict(target=["0"]), TypeError, "of type Embedding"),
        (dict(target=["1"], rank=None), ValueError, "rank=None"),
        (dict(target=["1"], params=[]), ValueError, "'params'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            param_groups(model, **{"rank": 2, **kwargs})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        param_groups([nn.Linear(2, 2)], ["0"], rank=2)
    adapted = apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), AtomParam, ["0"])
    with pytest.raises(ValueError, match="parametrized"):
        param_groups(adapted, ["0"], rank=2)


# ---------------------------------------------------------------------------- matrix_groups


class TinyLM(nn.Module):
    """An embedding, two hidden blocks (a raw matrix parameter among them), norms and a head."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8))
        self.mix = nn.Parameter(torch.randn(8, 8) / 8)
        self.head = nn.Linear(8, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)) @ self.mix)


@pytest.mark.parametrize("tied", [False, True])
def test_matrix_groups_is_muons_split(tied):
    """Hidden 2-D+ weights (raw parameters too) in the first group; embedding, head, biases and
    norms in the AdamW group; every parameter once, in model.parameters() order."""
    model = TinyLM(tied)
    hidden, rest = matrix_groups(model, lr=2e-2, adamw={"lr": 3e-4})
    matrices = {id(model.blocks[0].weight), id(model.blocks[2].weight), id(model.mix)}
    expected = [p for p in model.parameters() if id(p) in matrices]
    assert [id(p) for p in hidden["params"]] == [id(p) for p in expected]
    assert (hidden["lr"], rest["lr"], rest["matrix"]) == (2e-2, 3e-4, False)
    everything = [id(p) for p in model.parameters()]
    assert sorted(map(id, hidden["params"] + rest["params"])) == sorted(everything)
    assert [id(p) for p in rest["params"]] == [p for p in everything if p not in map(id, expected)]
    # torch.optim.Muon refuses anything but 2-D parameters: the hidden group is what it takes
    if hasattr(torch.optim, "Muon"):
        model(torch.tensor([[1, 2, 3]])).square().sum().backward()
        torch.optim.Muon([p for p in hidden["params"] if p.ndim == 2], lr=2e-2).step()
        with pytest.raises(ValueError):
            torch.optim.Muon(rest["params"], lr=2e-2)


@pytest.mark.parametrize(
    "make",
    [
        lambda groups: ARO(groups, lr=1e-2),
        lambda groups: RotatedAdam(groups, basis="eigen"),
        lambda groups: RotatedAdam(groups, basis="dct"),
        lambda groups: DCTProjectedAdam(groups, rank=2),
    ],
    ids=["aro", "soap", "rotated-dct", "dct"],
)
def test_the_adamw_group_of_matrix_groups_steps_as_torch_adamw(make):
    """matrix=False: embeddings and head (2-D) step exactly as torch.optim.AdamW at their lr
    (the hidden matrices at lr 0, so both models see the same gradients)."""
    torch.manual_seed(0)
    model = TinyLM()
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    adamw_options = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
    groups = matrix_groups(model, lr=0.0, adamw=adamw_options)
    optimizer = make(groups)
    adamw_ids = {id(param) for param in groups[1]["params"]}
    rest = [name for name, param in model.named_parameters() if id(param) in adamw_ids]
    reference = torch.optim.AdamW([dict(twin.named_parameters())[n] for n in rest], **adamw_options)
    for step in range(3):
        tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            net(tokens).square().mean().backward()
            opt.step()
    trained, reference_params = dict(model.named_parameters()), dict(twin.named_parameters())
    for name in rest:
        assert torch.equal(trained[name], reference_params[name])
    assert "rotation" not in optimizer.state.get(model.embed.weight, {})


@pytest.mark.parametrize("make", [ARO, lambda groups: RotatedAdam(groups, basis="eigen")], ids=["aro", "soap"])
def test_the_adamw_group_gets_adamws_lr_unless_told(make):
    """Regression (issue 12 review): the AdamW group took the matrix optimizer's default lr, which
    for ARO became 0.02 (Muon's scale) when its steps took Muon's RMS: AdamW at 20 times its rate."""
    groups = make(matrix_groups(TinyLM())).param_groups
    assert groups[1]["lr"] == 1e-3 and groups[0]["lr"] != 1e-3
    told = make(matrix_groups(TinyLM(), adamw={"lr": 3e-4})).param_groups
    assert told[1]["lr"] == 3e-4


def test_matrix_groups_errors_name_the_problem():
    with pytest.raises(ValueError, match="no hidden matrix"):
        matrix_groups(nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"options must not hold \['matrix'\]"):
        matrix_groups(TinyLM(), matrix=True)
    with pytest.raises(ValueError, match=r"adamw must not hold \['params'\]"):
        matrix_groups(TinyLM(), adamw={"params": []})
    with pytest.raises(TypeError, match="adamw must be a dict"):
        matrix_groups(TinyLM(), adamw=[("lr", 1e-3)])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        matrix_groups([nn.Linear(2, 2)])
