"""Issue 9, mechanism 8 for the adapters: options are values, checked once, named in the error.

Every public option of every adapter class is described once in ``OPTIONS`` (kind, range,
whether ``None`` is allowed, which other options make it apply); a test checks that the table
lists exactly the classes :mod:`decomp.adapters` exports (and ``ScaledLowRank``, declared outside
the package) and exactly their constructor arguments, so a new class or option cannot slip past
the suite.

* Bad values: for every (class, option) pair hypothesis draws a fault class (wrong type -- a str,
  a float for an int, a bool for an int or a float, ``None`` where not allowed, a list --,
  out of range, NaN/Inf, an unknown choice) and a value, and the constructor and
  ``trainable_count`` both raise the documented exception (``TypeError`` for a wrong type,
  ``ValueError`` for a wrong value) with a message that starts with the option's name.
* Good values, drawn as Python, numpy (``np.int64``, ``np.float32``, ...) or other
  ``numbers.Integral``/``numbers.Real`` values: ``config()`` holds them as plain JSON values,
  rebuilds an adapter with an equal config and repr, survives ``json.dumps``/``json.loads``
  unchanged, ``trainable_count`` agrees with the plain config, and the adapter built on a weight
  trains exactly that many numbers (or both refuse the weight alike).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import decomp.adapters as adapters
from decomp._checks import check_real
from decomp.adapters import (
    SNELLParam,
    SNELLAParam,
    AdapterParam,
    AtomParam,
    DCTParam,
    KronParam,
    LDUParam,
    LieParam,
    SVDParam,
    TuckerParam,
    apply,
    load_adapter,
    option,
    save_adapter,
)

from tests.adapters.test_registry import ScaledLowRank


@dataclass
class Option:
    """One constructor option: its kind, its valid range and the options it needs set."""

    kind: str  # "int", "real", "choice", "bool", "pair" (two positive ints) or "order" (None or 1)
    low: float | None = None  # ints: inclusive; reals: see low_inclusive
    high: float | None = None
    low_inclusive: bool = False
    high_inclusive: bool = False
    optional: bool = False  # None is a valid value
    choices: tuple[str, ...] = ()
    multiple_of: int | None = None  # an int that must be a multiple of this (SNELL's rank)
    context: dict[str, Any] = field(default_factory=dict)  # other options under which it applies


def positive_int(optional: bool = False, **extra: Any) -> Option:
    return Option("int", low=1, optional=optional, **extra)


POSITIVE_REAL = Option("real", low=0.0)
FINITE_REAL = Option("real")
SEED = Option("int", low=0)

KERNEL_ADAPTER_OPTIONS = {
    "rank": Option("int", low=2, optional=True, multiple_of=2),  # num_kernels defaults to 2
    "num_kernels": positive_int(),
    "kernel_scale": POSITIVE_REAL,
    "scale": Option("real", low=0.0, optional=True),
    "scale_rule": Option("choice", choices=("fan_in", "kernel_scale")),
    "sparsity": Option("real", low=0.0, high=1.0, low_inclusive=True, optional=True),
    "mask": Option("choice", choices=("binary", "magnitude")),
    "start": Option("choice", choices=("residual", "zero", "kernel"), optional=True),
    "zero_start": Option("bool", optional=True),
}

OPTIONS: dict[type[AdapterParam], dict[str, Option]] = {
    AtomParam: {
        "num_atoms": positive_int(optional=True),
        "levels": Option("int", low=1, high=2),
        "sub_atoms": positive_int(optional=True, context={"levels": 2}),
        "block": positive_int(optional=True),
        "channel_block": positive_int(),
        "scale": Option("real", low=0.0, optional=True),
    },
    SVDParam: {
        "rank": positive_int(optional=True),
        "mode": Option("choice", choices=("pissa", "svfit", "lora_xs")),
        "svd": Option("choice", choices=("exact", "randomized")),
        "scale": Option("real", low=0.0, optional=True),
        "init": Option("choice", choices=("zero", "normal"), context={"mode": "lora_xs"}),
        "seed": SEED,
    },
    DCTParam: {
        "num_coefficients": positive_int(optional=True),
        "locations": Option("choice", choices=("magnitude", "low", "random")),
        "scale": POSITIVE_REAL,
        "seed": SEED,
    },
    KronParam: {
        "rank": positive_int(optional=True),
        "b_shape": Option("pair", optional=True, context={"c_shape": (2, 2)}),
        "c_shape": Option("pair", optional=True, context={"b_shape": (2, 2)}),
        "scale": Option("real", low=0.0, optional=True),
    },
    LieParam: {
        "rank": positive_int(optional=True),
        "scale": Option("real", low=0.0, optional=True),
        "order": Option("order"),
    },
    TuckerParam: {
        "rank": positive_int(optional=True),
        "spatial_rank": positive_int(optional=True),
        "scale": Option("real", low=0.0, optional=True),
        "init": Option("choice", choices=("tucker", "random")),
        "std": POSITIVE_REAL,
    },
    LDUParam: {
        "rank": positive_int(optional=True),
        "scale": Option("real", low=0.0, optional=True),
        "scale_rule": Option("choice", choices=("fan_in", "factors")),
    },
    SNELLParam: KERNEL_ADAPTER_OPTIONS,
    SNELLAParam: KERNEL_ADAPTER_OPTIONS,
    ScaledLowRank: {"rank": positive_int(), "scale": FINITE_REAL},  # registered from outside
}

CLASSES = sorted(OPTIONS, key=lambda cls: cls.__name__)
PAIRS = [(cls, name) for cls in CLASSES for name in OPTIONS[cls]]
COUNT_SHAPE = (8, 8, 3)


def test_the_table_covers_every_exported_adapter_and_every_option():
    exported = {
        value
        for value in (getattr(adapters, name) for name in adapters.__all__)
        if isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam
    }
    assert set(OPTIONS) == exported | {ScaledLowRank}
    for cls, options in OPTIONS.items():
        parameters = inspect.signature(cls).parameters
        assert set(parameters) == set(options), cls.__name__
        # every option has a default, so a config with any subset of options is constructible
        assert all(p.default is not inspect.Parameter.empty for p in parameters.values())


# ----------------------------------------------------------------------------------- bad values

INT_WRAPPERS = (int, np.int64, np.int32, np.int16, np.intc)
REAL_WRAPPERS = (float, np.float64, Fraction)  # np.float32 rounds: fine for good values, not at a bound
SPAN = 10**6

NOT_AN_INT = ["4", 4.0, 2.5, True, False, [4], (4,), np.float64(4.0), np.bool_(True), 4j]
NOT_A_REAL = ["0.5", True, False, [0.5], 0.5j, b"1"]
NON_FINITE = [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf"), -np.inf]
NOT_A_FLAG = [0, 1, 1.0, "True", np.int64(1), np.bool_(True), [True]]
NOT_A_PAIR = [6, 2.5, "ab", (2, 3, 1), (2,), [], {2: 3}, torch.tensor([2, 3])]
BAD_PAIR_ENTRY = [(2.0, 3), ("2", 3), (2, True), [2, None], (np.float32(2), 3)]
NOT_AN_ORDER = [0, 2, -1, True, False, 1.0, "1", np.float64(1.0), [1], np.bool_(True)]


def wrapped(values: st.SearchStrategy, wrappers: tuple[Callable[[Any], Any], ...]) -> st.SearchStrategy:
    """``values``, each passed through one drawn wrapper (a Python, numpy or ``numbers`` type)."""
    return st.tuples(values, st.sampled_from(wrappers)).map(lambda pair: pair[1](pair[0]))


def faults(option: Option) -> dict[str, tuple[type[Exception], st.SearchStrategy]]:
    """Fault class -> (expected exception, strategy of bad values) for ``option``."""
    none = [] if option.optional else [None]
    if option.kind == "int":
        low = int(option.low)
        out_of_range = st.integers(low - SPAN, low - 1)
        if option.high is not None:
            out_of_range |= st.integers(int(option.high) + 1, int(option.high) + SPAN)
        found = {
            "wrong_type": (TypeError, st.sampled_from(NOT_AN_INT + none)),
            "out_of_range": (ValueError, wrapped(out_of_range, (int, np.int64))),
        }
        if option.multiple_of is not None:
            off_grid = st.integers(1, 1000).map(lambda k: option.multiple_of * k + 1)
            found["off_grid"] = (ValueError, off_grid)
        return found
    if option.kind == "real":
        found = {
            "wrong_type": (TypeError, st.sampled_from(NOT_A_REAL + none)),
            "non_finite": (ValueError, st.sampled_from(NON_FINITE)),
        }
        ranges = []
        if option.low is not None:
            ranges.append(st.floats(option.low - SPAN, option.low, exclude_max=option.low_inclusive))
        if option.high is not None:
            ranges.append(st.floats(option.high, option.high + SPAN, exclude_min=option.high_inclusive))
        if ranges:
            found["out_of_range"] = (ValueError, wrapped(st.one_of(ranges), REAL_WRAPPERS))
        return found
    if option.kind == "choice":
        first = option.choices[0]
        unknown = st.sampled_from([first.upper(), f" {first}", first[:-1], ""]) | st.text(max_size=12)
        return {
            "wrong_type": (TypeError, st.sampled_from([1, 0, 1.5, True, [first], (first,), first.encode(), *none])),
            "unknown": (ValueError, unknown.filter(lambda text: text not in option.choices)),
        }
    if option.kind == "bool":
        return {"wrong_type": (TypeError, st.sampled_from(NOT_A_FLAG + none))}
    if option.kind == "pair":
        entries = st.tuples(st.integers(-SPAN, 0), st.integers(1, 9), st.booleans())
        return {
            "wrong_type": (TypeError, st.sampled_from(NOT_A_PAIR)),
            "element_type": (TypeError, st.sampled_from(BAD_PAIR_ENTRY)),
            # the bad entry first (a tuple) or second (a list, as numpy)
            "out_of_range": (ValueError, entries.map(lambda t: (t[0], t[1]) if t[2] else [t[1], np.int64(t[0])])),
        }
    if option.kind == "order":
        return {"unknown": (ValueError, st.sampled_from(NOT_AN_ORDER))}
    raise AssertionError(f"unknown option kind {option.kind}")


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What ``call`` does: ``("ok", result)`` or ``(exception type, message)``."""
    try:
        return ("ok", call())
    except (TypeError, ValueError) as error:
        return (type(error), str(error))


@pytest.mark.parametrize(("cls", "name"), PAIRS, ids=[f"{cls.__name__}.{name}" for cls, name in PAIRS])
@settings(max_examples=30)
@given(data=st.data())
def test_a_bad_option_raises_the_documented_error_naming_it(cls, name, data):
    option = OPTIONS[cls][name]
    table = faults(option)
    fault = data.draw(st.sampled_from(sorted(table)), label="fault")
    expected, values = table[fault]
    value = data.draw(values, label="value")
    kwargs = {**option.context, name: value}
    with pytest.raises(expected) as raised:
        cls(**kwargs)
    message = str(raised.value)
    assert re.match(rf"{re.escape(name)}(\[[01]\])? must be ", message), message
    # trainable_count goes through the same checks, before it looks at the shape
    assert outcome(lambda: cls.trainable_count(COUNT_SHAPE, **kwargs)) == (expected, message)


@pytest.mark.parametrize("cls", CLASSES, ids=[cls.__name__ for cls in CLASSES])
def test_an_unknown_option_is_named(cls):
    for call in (lambda: cls(zzz=4), lambda: cls.trainable_count(COUNT_SHAPE, zzz=4)):
        with pytest.raises(TypeError, match=rf"{cls.__name__}.__init__\(\) got an unexpected keyword argument 'zzz' \(options: "):
            call()


@pytest.mark.parametrize(("cls", "name"), PAIRS, ids=[f"{cls.__name__}.{name}" for cls, name in PAIRS])
def test_a_misspelt_option_suggests_the_nearest_one(cls, name):
    # A typo (num_atom=4) is the likeliest unknown keyword: every entry point names the option meant.
    typo = name[:-1] if len(name) > 3 else name + "s"
    message = rf"unexpected keyword argument '{typo}'; did you mean '{name}'\?"
    model = nn.Sequential(nn.Linear(8, 8))
    calls = (
        lambda: cls(**{typo: 1}),
        lambda: cls.trainable_count(COUNT_SHAPE, **{typo: 1}),
        lambda: apply(model, cls, target=r".*", **{typo: 1}),
    )
    for call in calls:
        with pytest.raises(TypeError, match=message):
            call()
    assert type(model[0]) is nn.Linear


def test_a_subclass_of_your_own_gets_the_same_check():
    class ScaleParam(AdapterParam):
        def __init__(self, init_scale: float = 0.0) -> None:
            super().__init__()
            self.init_scale = init_scale

    with pytest.raises(TypeError, match="ScaleParam.__init__\\(\\) got an unexpected keyword argument 'init_scal'; did you mean 'init_scale'"):
        ScaleParam(init_scal=1.0)
    assert inspect.signature(ScaleParam).parameters.keys() == {"init_scale"}


class GatedLowRank(ScaledLowRank):
    """A declared subclass: its options follow the base's, a renamed attribute keeps its keyword."""

    gate_value: float = option(0.0, check_real, keyword="gate", keyword_only=True)


def test_declared_options_are_the_constructor_in_declaration_order():
    assert str(inspect.signature(GatedLowRank)) == "(rank: 'int' = 2, scale: 'float' = 1.0, *, gate: 'float' = 0.0)"
    adapter = GatedLowRank(3, 0.5, gate=2)
    assert (adapter.rank, adapter.scale, adapter.gate_value) == (3, 0.5, 2.0)
    assert adapter.config() == {"rank": 3, "scale": 0.5, "gate": 2.0}
    assert repr(adapter) == "GatedLowRank(rank=3, scale=0.5, gate=2.0)"
    assert GatedLowRank.budget_option == "rank" and isinstance(GatedLowRank.gate_value, adapters.base.Option)
    with pytest.raises(TypeError, match=r"GatedLowRank.__init__\(\) takes 2 positional arguments \(rank, scale\) but 3 were given"):
        GatedLowRank(3, 0.5, 2.0)  # gate is keyword-only
    with pytest.raises(TypeError, match=r"GatedLowRank.__init__\(\) got multiple values for argument 'rank'"):
        GatedLowRank(3, rank=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'gate_value' \(options: rank, scale, gate\)"):
        GatedLowRank(gate_value=1.0)  # the attribute is not a keyword
    with pytest.raises(ValueError, match="gate must be a finite float, got nan"):
        GatedLowRank(gate=math.nan)


def test_an_option_named_like_a_parameter_keeps_both():
    # LDUParam's keyword scale is the argument c (config, repr); the attribute scale is the
    # trained s = s0 (1 + t), started at c / r.
    adapter = LDUParam.from_weight(torch.randn(6, 4, dtype=torch.float64), rank=2, scale=3.0)
    assert adapter.config() == {"rank": 2, "scale": 3.0, "scale_rule": "factors"} and adapter.scale_argument == 3.0
    assert isinstance(adapter.relative_scale, nn.Parameter) and adapter.scale.tolist() == [1.5]
    assert repr(adapter).startswith("LDUParam(rank=2, scale=3.0, scale_rule='factors', weight_shape=(6, 4)")


# ---------------------------------------------------------------------------------- good values


def good_value(option: Option) -> st.SearchStrategy:
    """Valid values of ``option``, as Python, numpy or other ``numbers`` types."""
    if option.kind == "int":
        high = int(option.low) + 12 if option.high is None else int(option.high)
        found = wrapped(st.integers(int(option.low), high), INT_WRAPPERS)
    elif option.kind == "real":
        # kept off the bounds, where np.float32 rounding could land outside
        low = -1e3 if option.low is None else option.low + (0.0 if option.low_inclusive else 1e-3)
        high = 1e3 if option.high is None else option.high - (0.0 if option.high_inclusive else 1e-3)
        integral = st.integers(math.ceil(low), math.floor(high))  # an int is a valid real
        found = wrapped(st.floats(low, high), (*REAL_WRAPPERS, np.float32)) | wrapped(integral, (int, np.int64))
    elif option.kind == "choice":
        found = wrapped(st.sampled_from(option.choices), (str, np.str_))
    elif option.kind == "bool":
        found = st.booleans()
    elif option.kind == "pair":
        sides = st.lists(wrapped(st.integers(1, 6), INT_WRAPPERS), min_size=2, max_size=2)
        found = wrapped(sides, (tuple, list)) | st.lists(st.integers(1, 6), min_size=2, max_size=2).map(torch.Size)
    elif option.kind == "order":
        found = st.sampled_from([1, np.int64(1), np.uint8(1)])
    else:
        raise AssertionError(f"unknown option kind {option.kind}")
    return st.none() | found if option.optional or option.kind == "order" else found


def plain(value: Any) -> Any:
    """The JSON-native form an option value must be stored as."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (tuple, list, torch.Size)):
        return [plain(item) for item in value]
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value)


def consistent(cls: type[AdapterParam], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Make drawn options jointly valid (the cross-option rules each class documents)."""
    kwargs = dict(kwargs)
    if cls is AtomParam and plain(kwargs.get("levels", 1)) != 2:
        kwargs.pop("sub_atoms", None)
    if cls is SVDParam and kwargs.get("init") == "normal":
        kwargs["mode"] = "lora_xs"
    if cls is KronParam and (kwargs.get("b_shape") is None) != (kwargs.get("c_shape") is None):
        kwargs.pop("b_shape", None)
        kwargs.pop("c_shape", None)
    if cls in (SNELLParam, SNELLAParam):
        kernels = plain(kwargs.get("num_kernels", 2))
        if kwargs.get("rank") is not None:
            kwargs["rank"] = type(kwargs["rank"])(kernels * max(1, plain(kwargs["rank"]) // kernels))
        implied = {True: "zero", False: "kernel"}.get(kwargs.get("zero_start"))
        if implied is not None and kwargs.get("start") is not None:
            kwargs["start"] = implied
        if kwargs.get("zero_start") or kwargs.get("start") == "zero":
            kwargs["mask"] = "binary"
    return kwargs


@st.composite
def adapter_options(draw) -> tuple[type[AdapterParam], dict[str, Any]]:
    cls = draw(st.sampled_from(CLASSES))
    names = draw(st.sets(st.sampled_from(sorted(OPTIONS[cls]))))
    kwargs = {name: draw(good_value(OPTIONS[cls][name]), label=name) for name in sorted(names)}
    return cls, consistent(cls, kwargs)


def is_json_native(value: Any) -> bool:
    if type(value) is list:
        return all(is_json_native(item) for item in value)
    return value is None or type(value) in (bool, int, float, str)


@settings(max_examples=300)
@given(drawn=adapter_options(), shape=st.sampled_from([(6, 4), (8, 8, 3), (6, 4, 3, 3), (4, 2, 2, 2, 2)]))
def test_good_options_are_stored_as_plain_values_and_round_trip(drawn, shape):
    cls, kwargs = drawn
    adapter = cls(**kwargs)
    config = adapter.config()
    assert set(config) == set(OPTIONS[cls])
    assert all(is_json_native(value) for value in config.values()), config
    for name, value in kwargs.items():
        if value is not None:
            assert config[name] == plain(value), name
    rebuilt = type(adapter)(**config)
    assert rebuilt.config() == config and repr(rebuilt) == repr(adapter)
    assert json.loads(json.dumps(config)) == config
    assert json.loads(json.dumps(config)) == cls(**json.loads(json.dumps(config))).config()
    counted = outcome(lambda: cls.trainable_count(shape, **kwargs))
    assert counted == outcome(lambda: cls.trainable_count(shape, **config))
    # the closed form is what the adapter built on such a weight trains (or the same refusal)
    weight = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert outcome(lambda: cls.from_weight(weight, **config).num_trainable()) == counted


# ---------------------------------------------------------------------------------- regressions


def test_numpy_options_are_python_numbers_in_config():
    # issue 9: AtomParam checked num_atoms with check_int but stored the raw numpy value
    config = AtomParam(
        num_atoms=np.int64(4), levels=np.int32(2), sub_atoms=np.int8(2), block=np.uint8(2), scale=np.float32(0.5)
    ).config()
    assert config == {"num_atoms": 4, "levels": 2, "sub_atoms": 2, "block": 2, "channel_block": 1, "scale": 0.5}
    assert all(type(value) is int for key, value in config.items() if key != "scale")
    assert type(config["scale"]) is float
    assert type(SNELLParam(rank=np.int64(4)).config()["rank"]) is int
    assert KronParam(b_shape=(np.int64(4), 6), c_shape=torch.Size([5, 8])).config() == {
        "rank": None,
        "b_shape": [4, 6],
        "c_shape": [5, 8],
        "scale": None,
    }
    assert LieParam(order=np.int64(1)).config()["order"] == 1


def test_flags_and_choices_refuse_lookalikes():
    with pytest.raises(ValueError, match=r"order must be None \(exact exp\) or 1 \(first order\), got 1.0"):
        LieParam(order=1.0)  # was stored as 1.0
    with pytest.raises(TypeError, match=r"mode must be one of \['pissa', 'svfit', 'lora_xs'\] \(a str\), got int"):
        SVDParam(mode=1)
    with pytest.raises(TypeError, match="zero_start must be a bool, got numpy.int64"):
        SNELLAParam(zero_start=np.int_(1))
    with pytest.raises(TypeError, match="rank must be an int or None, got float"):
        SVDParam(rank=4.0)
    with pytest.raises(TypeError, match=r"c_shape\[1\] must be an int, got float"):
        KronParam(b_shape=(2, 2), c_shape=(2, 2.0))  # checked before the "given together" rule
    with pytest.raises(ValueError, match="rank must be a multiple of num_kernels=3, got 4"):
        SNELLParam(rank=4, num_kernels=3)  # at construction, not only when built on a weight


ROUND_TRIP_CASES = [
    (AtomParam, {"num_atoms": np.int64(2), "block": np.int32(2)}),
    (SVDParam, {"rank": np.int64(2), "scale": np.float32(0.5), "mode": np.str_("svfit")}),
    (DCTParam, {"num_coefficients": np.int16(5), "scale": np.float64(2.0), "seed": np.uint8(3)}),
    (KronParam, {"rank": np.int64(2), "b_shape": (np.int64(2), np.int64(2)), "c_shape": [np.int64(3), 4],
                 "scale": np.float32(0.5)}),
    (LieParam, {"rank": np.int64(2), "scale": Fraction(1, 4), "order": np.int64(1)}),
    (TuckerParam, {"rank": np.int64(2), "std": np.float32(0.05), "init": "random"}),
    (LDUParam, {"rank": np.int64(3), "scale": np.float32(2.0)}),
    (SNELLParam, {"rank": np.int64(2), "sparsity": np.float32(0.25), "zero_start": True}),
    (SNELLAParam, {"rank": np.int64(2), "kernel_scale": np.float64(0.2), "num_kernels": np.int8(2)}),
]


@pytest.mark.parametrize(("cls", "kwargs"), ROUND_TRIP_CASES, ids=[cls.__name__ for cls, _ in ROUND_TRIP_CASES])
def test_numpy_options_survive_save_and_load_into_a_plain_model(cls, kwargs, tmp_path: Path):
    # the saved metadata is JSON: a numpy option used to be written as its repr and not reload
    torch.manual_seed(0)
    plain_model = nn.Sequential(nn.Linear(8, 6))
    model = apply(copy.deepcopy(plain_model), cls, target=r".*", **kwargs)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    loaded = load_adapter(plain_model, path)
    saved_config = model[0].parametrizations.weight[0].config()
    assert loaded[0].parametrizations.weight[0].config() == saved_config
    assert saved_config == {**saved_config, **{name: plain(value) for name, value in kwargs.items()}}
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))
