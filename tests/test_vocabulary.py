"""One vocabulary across methods (docs/vocabulary.md): budgets, scales, SVD choice, class names, defaults.

* Every adapter names its budget in ``budget_option`` (its first positional argument, default
  ``None``), and a default budget never trains more numbers than the weight it adapts: it is the
  largest budget up to the documented default that fits, or ``ValueError`` naming the shape.
* Renamed names (``alpha`` -> ``scale``, ``svd_method`` -> ``svd``, ``"rsvd"`` -> ``"randomized"``,
  ``SNELL``/``SNELLA`` -> ``*Param``) still work for one release: each warns naming the new name and
  gives the same result; old and new together raise ``TypeError``; files and optimizer states
  saved with the old names still load.
* Every optimizer defaults to ``weight_decay=0.0`` and, but ARO (on Muon's lr scale: 0.02), to
  ``lr=1e-3``.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import decomp.adapters
import optim
from decomp.adapters import (
    AdapterParam,
    AtomParam,
    DCTParam,
    KronParam,
    LDUParam,
    LieParam,
    SNELLAParam,
    SNELLParam,
    SVDParam,
    TuckerParam,
    apply,
    load_adapter,
    save_adapter,
)
from optim import ARO, DCTProjectedAdam, ProjectedAdam, RotatedAdam, SVDProjectedAdam

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_CLASSES = sorted(
    (value for value in vars(decomp.adapters).values()
     if isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam),
    key=lambda cls: cls.__name__,
)
OPTIMIZERS = (ProjectedAdam, DCTProjectedAdam, SVDProjectedAdam, ARO, RotatedAdam)
TOO_BIG = "does not fit a weight of shape"


def weight_shapes() -> st.SearchStrategy[tuple[int, ...]]:
    """Linear and conv 1-3 D weight shapes, tiny ones (a 1x1 linear, a (1, n) head) included."""
    sizes = st.integers(1, 12)
    kernel = st.integers(1, 3)
    return st.one_of(
        st.tuples(sizes, sizes),
        st.tuples(sizes, sizes, kernel),
        st.tuples(sizes, sizes, kernel, kernel),
        st.tuples(sizes, st.integers(1, 4), kernel, kernel, kernel),
    )


# ------------------------------------------------------------------------------ budgets


# Each class with its defaulted configs, and (where the budget is a rank-like integer) the
# documented cap of the default and the valid explicit budgets up to it, as an oracle of "largest".
def _rank_cap(shape: tuple[int, ...], default: int) -> int:
    return min(default, shape[0], shape[1])


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


DEFAULT_CONFIGS: list[tuple[type[AdapterParam], dict]] = [
    (AtomParam, {}),
    (AtomParam, {"levels": 2}),
    (DCTParam, {}),
    (KronParam, {}),
    (LDUParam, {}),
    (LieParam, {}),
    (SNELLParam, {}),
    (SNELLParam, {"num_kernels": 3}),
    (SNELLAParam, {}),
    (SVDParam, {}),
    (SVDParam, {"mode": "svfit"}),
    (SVDParam, {"mode": "lora_xs"}),
    (TuckerParam, {}),
    (TuckerParam, {"spatial_rank": 2}),
]


def explicit_budgets(cls: type[AdapterParam], config: dict, shape: tuple[int, ...]) -> list[int] | None:
    """The explicit budgets from 1 up to the documented cap of the default (``None``: no oracle)."""
    if cls is AtomParam and config.get("levels", 1) == 2:
        return None  # two defaulted counts: checked by the "fits" property only
    if cls is AtomParam:
        kernel = math.prod(shape[2:])
        if kernel == 1:  # linear and 1x1 conv: the block view's kernel, largest b <= 4 dividing both
            block = max(b for b in range(1, 5) if shape[0] % b == 0 and shape[1] % b == 0)
            kernel = block * block
        return list(range(1, min(9, kernel) + 1))
    if cls is DCTParam:
        rows, columns = _matrix(shape)
        return list(range(1, min(rows + columns, rows * columns) + 1))
    if cls is KronParam:
        b_shape, c_shape = KronParam.from_weight(torch.zeros(shape), rank=1).term_shapes
        return list(range(1, min(4, math.prod(b_shape), math.prod(c_shape)) + 1))
    if cls is LDUParam:
        return list(range(1, min(_matrix(shape)) + 1))
    if cls in (LieParam, TuckerParam):
        return list(range(1, _rank_cap(shape, 8) + 1))
    if cls is SVDParam:
        return list(range(1, min(8, *_matrix(shape)) + 1))
    kernels = config.get("num_kernels", 2)
    high = kernels * max(1, min(_matrix(shape)) // kernels)
    return list(range(kernels, min(high, kernels * max(1, 32 // kernels)) + 1, kernels))


@pytest.mark.parametrize(("cls", "config"), DEFAULT_CONFIGS, ids=lambda v: getattr(v, "__name__", str(v)))
@settings(max_examples=60, deadline=None)
@given(shape=weight_shapes())
def test_a_default_budget_never_exceeds_the_weight(cls, config, shape):
    """count <= numel or ValueError naming the shape; the largest that fits; built == closed form."""
    size = math.prod(shape)
    try:
        count = cls.trainable_count(shape, **config)
    except ValueError as error:
        count = None
        assert TOO_BIG in str(error) and str(shape) in str(error) and cls.__name__ in str(error)
    budgets = explicit_budgets(cls, config, shape)
    if budgets is not None:
        option = cls.budget_option
        fitting = [
            cls.trainable_count(shape, **config, **{option: budget})
            for budget in budgets
            if cls.trainable_count(shape, **config, **{option: budget}) <= size
        ]
        assert count == (max(fitting) if fitting else None)
    if count is None:
        with pytest.raises(ValueError, match=TOO_BIG):
            cls.from_weight(torch.randn(shape, dtype=torch.float64), **config)
        return
    assert count <= size
    adapter = cls.from_weight(torch.randn(shape, dtype=torch.float64), **config)
    assert adapter.num_trainable() == count


@pytest.mark.parametrize(
    ("cls", "shape", "explicit", "count"),
    [
        # the cases: a 13x7 linear (LoKr-style shapes (13, 7) x (1, 1)) and a 4x4 tile
        (KronParam, (13, 7), {"rank": 1}, 93),
        (AtomParam, (12, 8), {"num_atoms": 9}, 144),
        (SVDParam, (1, 5), {"rank": 1}, 6),
        (LieParam, (1, 1), {"rank": 1}, 2),
        (SNELLAParam, (3, 6), {"rank": 2}, 21),
    ],
)
def test_an_explicit_budget_is_kept_where_the_default_refuses_or_shrinks(cls, shape, explicit, count):
    assert cls.trainable_count(shape, **explicit) == count > math.prod(shape)
    default = None
    try:
        default = cls.trainable_count(shape)
    except ValueError as error:
        assert TOO_BIG in str(error) and "Pass an explicit" in str(error)
    assert default is None or default <= math.prod(shape)
    assert cls.from_weight(torch.randn(shape), **explicit).num_trainable() == count


def test_atom_param_on_a_4x4_linear_trains_one_atom():
    assert AtomParam.trainable_count((4, 4)) == 16  # one 4x4 atom, not 9 (144 numbers)


def test_apply_names_the_layer_a_default_budget_does_not_fit():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"\(1, 8\).*explicit rank="):
        apply(model, LieParam, target=r"2")
    adapted = apply(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)), LieParam, target=r"2", rank=1)
    assert adapted[2].parametrizations.weight[0].num_trainable() == 9


@pytest.mark.parametrize("cls", ADAPTER_CLASSES, ids=lambda cls: cls.__name__)
def test_every_adapter_names_its_budget_first(cls):
    parameters = list(inspect.signature(cls).parameters.values())
    assert parameters[0].name == cls.budget_option
    assert parameters[0].default is None
    assert parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    shape = (16, 12, 3, 3)
    small, large = (cls.trainable_count(shape, **{cls.budget_option: budget}) for budget in (2, 4))
    assert small < large  # the option sets the budget (SNELL ranks step by num_kernels = 2)
    assert cls(2).config()[cls.budget_option] == 2


def test_the_budget_words_are_the_documented_ones():
    words = {cls.__name__: cls.budget_option for cls in ADAPTER_CLASSES}
    assert words == {
        "AtomParam": "num_atoms",
        "DCTParam": "num_coefficients",
        "KronParam": "rank",
        "LDUParam": "rank",
        "LieParam": "rank",
        "SNELLAParam": "rank",
        "SNELLParam": "rank",
        "SVDParam": "rank",
        "TuckerParam": "rank",
    }
    page = (ROOT / "docs" / "vocabulary.md").read_text()
    for name, option in words.items():
        assert re.search(rf"^\| `{name}` \| `{option}` \|", page, re.M), name


# ------------------------------------------------------------------------------ alpha -> scale


@pytest.mark.parametrize("cls", [DCTParam, LDUParam], ids=lambda cls: cls.__name__)
def test_alpha_is_a_deprecated_alias_of_scale(cls):
    weight = torch.randn(6, 4, 3, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match=r"'alpha' is deprecated, use 'scale'"):
        old = cls.from_weight(weight, alpha=2.5)
    new = cls.from_weight(weight, scale=2.5)
    assert old.config() == new.config() and old.config()["scale"] == 2.5 and "alpha" not in old.config()
    for adapter in (old, new):
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in adapter.parameters():
                parameter.add_(torch.randn_like(parameter))
    assert torch.equal(old(weight), new(weight))
    with pytest.warns(DeprecationWarning):
        assert cls(4, alpha=0.5).config() == cls(4, scale=0.5).config()  # positional budget too


@pytest.mark.parametrize("cls", [DCTParam, LDUParam], ids=lambda cls: cls.__name__)
def test_alpha_and_scale_together_raise(cls):
    with pytest.raises(TypeError, match=r"got both 'alpha' and 'scale'"):
        cls(alpha=1.0, scale=1.0)


@pytest.mark.parametrize("cls", [DCTParam, LDUParam], ids=lambda cls: cls.__name__)
def test_a_misspelt_scale_names_the_nearest_option(cls):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'scales'; did you mean 'scale'\?"):
        cls(scales=1.0)
    assert "alpha" not in inspect.signature(cls).parameters


def test_an_adapter_file_saved_with_alpha_still_loads(tmp_path):
    torch.manual_seed(0)
    model = apply(nn.Sequential(nn.Linear(8, 6)), DCTParam, target=r"0", scale=2.0)
    with torch.no_grad():
        model[0].parametrizations.weight[0].coefficients.normal_()
    path = tmp_path / "dct.safetensors"
    save_adapter(model, path)
    old_style = _rewrite_entries(path, lambda entry: entry["config"].update(alpha=entry["config"].pop("scale")))
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 6))
    with warnings.catch_warnings():
        # the old name is the file's: loading it is not the caller's deprecated use
        warnings.simplefilter("error", DeprecationWarning)
        load_adapter(fresh, old_style)
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


def _rewrite_entries(path: Path, edit) -> Path:
    """A copy of an adapter file whose layer entries went through ``edit`` (old-release files)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata())
    entries = json.loads(metadata["decomp.adapters"])
    for entry in entries:
        edit(entry)
    metadata["decomp.adapters"] = json.dumps(entries)
    edited = path.with_name("old-" + path.name)
    save_file(tensors, str(edited), metadata=metadata)
    return edited


# ------------------------------------------------------------------------------ SNELL -> SNELLParam


@pytest.mark.parametrize(("old", "new"), [("SNELL", SNELLParam), ("SNELLA", SNELLAParam)])
def test_old_class_names_are_deprecated_aliases(old, new):
    for module in (decomp.adapters, decomp.adapters.snella):
        with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated, use .*{new.__name__}"):
            assert getattr(module, old) is new
    assert old not in vars(decomp.adapters) and old not in decomp.adapters.__all__
    assert new.__name__ in decomp.adapters.__all__
    assert decomp.adapters._DEPRECATED_NAMES[old] == new.__name__
    with pytest.raises(AttributeError, match="has no attribute 'SNEL'"):
        decomp.adapters.SNEL  # noqa: B018


def test_an_adapter_file_naming_snella_still_loads(tmp_path):
    torch.manual_seed(0)
    model = apply(nn.Sequential(nn.Linear(8, 6)), SNELLAParam, target=r"0", zero_start=True)
    path = tmp_path / "snella.safetensors"
    save_adapter(model, path)
    old_style = _rewrite_entries(path, lambda entry: entry.update(adapter="SNELLA"))
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 6))
    load_adapter(fresh, old_style)
    assert type(fresh[0].parametrizations.weight[0]) is SNELLAParam
    # and into a model already adapted with the class under its current name
    torch.manual_seed(0)
    adapted = apply(nn.Sequential(nn.Linear(8, 6)), SNELLAParam, target=r"0", zero_start=True)
    load_adapter(adapted, old_style)
    x = torch.randn(3, 8)
    torch.testing.assert_close(adapted(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ svd_method -> svd


def _trajectory(make, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(12, 10)
    optimizer = make(model.parameters())
    for step in range(steps):
        model.zero_grad()
        model(torch.randn(4, 12, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [ProjectedAdam, SVDProjectedAdam], ids=lambda cls: cls.__name__)
@pytest.mark.parametrize(("old", "new"), [("exact", "exact"), ("rsvd", "randomized")])
def test_svd_method_is_a_deprecated_alias_of_svd(cls, old, new):
    extra = {"projector": "svd"} if cls is ProjectedAdam else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = cls([nn.Parameter(torch.zeros(6, 4))], rank=2, svd_method=old, **extra)
    messages = [str(warning.message) for warning in caught if warning.category is DeprecationWarning]
    assert any("'svd_method' is deprecated, use 'svd'" in message for message in messages)
    assert any("svd='rsvd' is deprecated" in message for message in messages) == (old == "rsvd")
    assert optimizer.param_groups[0]["svd"] == new and "svd_method" not in optimizer.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        before = _trajectory(lambda params: cls(params, rank=2, update_gap=2, svd_method=old, **extra))
    after = _trajectory(lambda params: cls(params, rank=2, update_gap=2, svd=new, **extra))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_the_value_rsvd_is_a_deprecated_spelling_of_randomized():
    with pytest.warns(DeprecationWarning, match=r"svd='rsvd' is deprecated, use svd='randomized'"):
        optimizer = SVDProjectedAdam([nn.Parameter(torch.zeros(6, 4))], rank=2, svd="rsvd")
    assert optimizer.param_groups[0]["svd"] == "randomized"
    with pytest.raises(ValueError, match=r"svd must be one of \['randomized', 'exact'\]"):
        SVDProjectedAdam([nn.Parameter(torch.zeros(6, 4))], rank=2, svd="qr")


def test_svd_method_and_svd_together_raise():
    params = [nn.Parameter(torch.zeros(6, 4))]
    with pytest.raises(TypeError, match=r"got both 'svd_method' and 'svd'"):
        SVDProjectedAdam(params, rank=2, svd="exact", svd_method="exact")
    optimizer = SVDProjectedAdam(params, rank=2)
    with pytest.raises(TypeError, match=r"got both 'svd_method' and 'svd'"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3))], "svd": "exact", "svd_method": "exact"})
    assert len(optimizer.param_groups) == 1


def test_a_param_group_may_still_say_svd_method():
    params = [nn.Parameter(torch.zeros(6, 4))]
    with pytest.warns(DeprecationWarning, match="'svd_method' is deprecated"):
        optimizer = SVDProjectedAdam([{"params": params, "svd_method": "exact"}], rank=2)
    assert optimizer.param_groups[0]["svd"] == "exact" and "svd_method" not in optimizer.param_groups[0]


def test_a_state_saved_with_svd_method_loads_and_continues_alike():
    def run(load_old: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(12, 10)
        optimizer = SVDProjectedAdam(model.parameters(), rank=2, update_gap=2, svd="exact")
        for step in range(4):
            if step == 2:
                saved = optimizer.state_dict()
                if load_old:  # what the previous release wrote
                    group = saved["param_groups"][0]
                    group["svd_method"] = {"exact": "exact", "randomized": "rsvd"}[group.pop("svd")]
                optimizer = SVDProjectedAdam(model.parameters(), rank=2, update_gap=2)  # randomized
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    optimizer.load_state_dict(saved)
                assert optimizer.param_groups[0]["svd"] == "exact"
                assert "svd_method" not in optimizer.param_groups[0]
            model.zero_grad()
            model(torch.randn(4, 12, generator=torch.Generator().manual_seed(step))).square().sum().backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(load_old=True), run(load_old=False)))


def test_a_misspelt_old_option_names_the_new_one():
    params = [nn.Parameter(torch.zeros(6, 4))]
    with pytest.raises(TypeError, match=r"'svd_methd'; did you mean 'svd'\?"):
        SVDProjectedAdam(params, rank=2, svd_methd="exact")
    with pytest.raises(ValueError, match=r"'svd_methd' for SVDProjectedAdam; did you mean 'svd'\?"):
        SVDProjectedAdam([{"params": params, "svd_methd": "exact"}], rank=2)


# ------------------------------------------------------------------------------ optimizer defaults


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_every_optimizer_defaults_to_its_documented_lr_and_no_weight_decay(cls):
    # The group's resolved values: RotatedAdam resolves lr=None from its basis (SOAP's 3e-3 for
    # basis="eigen", tested in tests/optim/test_rotated.py; 1e-3 for the default "dct"). ARO's lr
    # is Muon's (adjust_lr="fan_in"): 0.02, from its sweeps (issue 12 review).
    group = cls([nn.Parameter(torch.zeros(6, 4))]).param_groups[0]
    assert group["lr"] == (0.02 if cls is ARO else 1e-3) and group["weight_decay"] == 0.0
    assert set(optim.__all__) >= {cls.__name__}
