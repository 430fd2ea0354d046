"""Mechanisms 8, 9 and 11 for the optimizers: checked options, torch.optim parity, honest protect.

8. Every public option of every optimizer is checked where it enters -- the constructor, a param
   group (at construction or ``add_param_group``), a loaded ``state_dict`` -- with an error that
   names it, numpy scalars become Python numbers, and an unknown key raises with the nearest
   valid name. A rejected group or load leaves the optimizer unchanged.
9. A tensor ``lr`` (0-d or 1-element) and ``maximize`` work everywhere, ``fused``/``capturable``/
   ``differentiable`` are refused with a reason, and torch.optim's conventions hold: named
   parameters, hooks, deepcopy, LR schedulers (including ones that ``fill_`` a tensor lr).
11. ``protect=True`` that could protect nothing (rank >= the compressed side) raises at the
    earliest point it is known instead of protecting zero directions.
"""

from __future__ import annotations

import copy
import inspect
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optim import ARO, DCTProjectedAdam, ProjectedAdam, RotatedAdam, SVDProjectedAdam

from ..contracts.optimizers import RELIABILITY_FACTORIES, assert_same, snapshot

SHAPES = [(6, 4), (3, 5), (6,)]
NAMES = sorted(RELIABILITY_FACTORIES)
NAN, INF = float("nan"), float("inf")


def make_params(shapes=SHAPES, seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def run(optimizer: torch.optim.Optimizer, steps: range, sign: float = 1.0) -> None:
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for param in params:
            param.grad = sign * torch.randn(param.shape, generator=generator)
        optimizer.step()


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    return type(RELIABILITY_FACTORIES[name](make_params()))


# ------------------------------------------------------------------------------ 8. options

BAD_VALUES: dict[str, list[object]] = {
    "lr": [-1.0, NAN, INF, "0.1", None, True, torch.tensor([0.1, 0.2]), torch.tensor(-1.0)],
    "betas": [(0.9,), (0.9, 1.0), (-0.1, 0.9), "ab", 0.9, (0.9, NAN), None, (0.9, 0.9, 0.9)],
    "eps": [-1e-8, NAN, "x", None, torch.tensor(1e-8)],
    "weight_decay": [-0.1, INF, "x", None],
    "maximize": [1, "yes", None],
    "fused": [True, 1],
    "capturable": [True, None],
    "differentiable": [True, None],
    "check_finite": [1, None, "no"],
    "rank": [0, -1, 1.5, 0.0, True, "8", NAN, torch.tensor(4)],
    "projector": ["pca", 3, None],
    "update_gap": [0, -1, 2.0, True, None, "2"],
    "scale": [NAN, INF, "1", None],
    "moments": ["transfer", None, 1],
    "score_norm": ["l3", None],
    "max_dim": [0, 1.5, None, -3],
    "foreach": [1, "no"],
    "protect": [1, None],
    "protect_energy": [0.0, 1.5, NAN, "x", None],
    "seed": [-1, 1.5, None, 2**70, True],
    "svd": ["qr", None],
    "dct_method": ["dft", None],
    "momentum": [1.0, -0.5, NAN, "x", None],
    "nesterov": [1, None],
    "base": ["newton_schulz", None],
    "sinkhorn_iters": [0, 1.5, None],
    "adjust_lr": ["max", None],
    "basis": ["svd", None],
    "shampoo_beta": [1.0, -0.1, "x", NAN],
    "error_feedback": [1, None],
    "matrix": [1, None],
    "rotate": ["cols", None],
}


@pytest.mark.parametrize("cls", [ProjectedAdam, ARO, RotatedAdam])
def test_every_public_option_is_in_the_checked_table(cls):
    """The constructor's keywords are exactly the options that are checked (none escapes)."""
    keywords = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    assert keywords == set(cls.options) <= set(BAD_VALUES)


def _entry(name: str, entry: str, option: str, value: object):
    """Apply the bad option at ``entry``; return the optimizer that must be left unchanged."""
    factory = RELIABILITY_FACTORIES[name]
    if entry == "constructor":
        factory(make_params(), **{option: value})
    elif entry == "param group":
        factory([{"params": make_params(), option: value}])
    optimizer = factory(make_params())
    run(optimizer, range(2))
    before = snapshot(optimizer)
    try:
        if entry == "add_param_group":
            optimizer.add_param_group({"params": make_params([(4, 4)], 1), option: value})
        else:
            saved = optimizer.state_dict()
            saved["param_groups"][0][option] = value
            optimizer.load_state_dict(saved)
    finally:
        assert_same(before, snapshot(optimizer))


# RotatedAdam's lr and betas default to None: the group's basis picks them (SOAP's for "eigen")
VALID_NONES = {
    (name, option, None)
    for name in ("rotated-dct", "rotated-eigen")
    for option in ("lr", "betas")
}


@settings(max_examples=50)
@given(
    name=st.sampled_from(NAMES),
    entry=st.sampled_from(["constructor", "param group", "add_param_group", "load_state_dict"]),
    data=st.data(),
)
def test_a_bad_option_raises_where_it_enters_naming_it_and_changes_nothing(name, entry, data):
    option = data.draw(st.sampled_from(sorted(optimizer_class(name).options)), label="option")
    bad = [value for value in BAD_VALUES[option] if (name, option, value) not in VALID_NONES]
    value = data.draw(st.sampled_from(bad), label="value")
    if entry == "constructor" and name in ("dct", "svd") and option == "projector":
        with pytest.raises(TypeError, match="fixes its projector"):
            _entry(name, entry, option, value)
        return
    with pytest.raises((TypeError, ValueError)) as raised:
        _entry(name, entry, option, value)
    assert option in str(raised.value)


TYPOS = {
    "update_proj_gap": "update_gap",  # galore-torch's name
    "weight_decays": "weight_decay",
    "betas1": "betas",
    "maximise": "maximize",
    "chek_finite": "check_finite",
}


@settings(max_examples=25)
@given(
    name=st.sampled_from(NAMES),
    typo=st.sampled_from(sorted(TYPOS)),
    entry=st.sampled_from(["param group", "add_param_group"]),
)
def test_an_unknown_group_key_raises_and_suggests_the_nearest_option(name, typo, entry):
    intended = TYPOS[typo]
    if intended not in optimizer_class(name).options:
        intended = None  # ARO has no update_gap: any suggestion will do
    factory = RELIABILITY_FACTORIES[name]
    optimizer = factory(make_params())
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=f"unknown option '{typo}'") as raised:
        if entry == "param group":
            factory([{"params": make_params(), typo: 1}])
        else:
            optimizer.add_param_group({"params": make_params([(4, 4)], 1), typo: 1})
    if intended:
        assert f"did you mean '{intended}'" in str(raised.value)
    assert_same(before, snapshot(optimizer))


def test_regression_galore_key_suggests_update_gap():
    with pytest.raises(ValueError, match="did you mean 'update_gap'"):
        SVDProjectedAdam([{"params": make_params(), "update_proj_gap": 50}])
    with pytest.raises(TypeError, match="did you mean 'update_gap'"):
        SVDProjectedAdam(make_params(), update_proj_gap=50)


NUMPY_VALUES: dict[str, tuple[object, object]] = {
    "lr": (np.float32(0.5), float(np.float32(0.5))),
    "betas": ((np.float64(0.8), np.float32(0.5)), (0.8, 0.5)),
    "eps": (np.float64(1e-6), 1e-6),
    "weight_decay": (np.float32(0.25), 0.25),
    "maximize": (np.bool_(True), True),
    "check_finite": (np.bool_(False), False),
    "rank": (np.int64(2), 2),
    "update_gap": (np.int32(3), 3),
    "scale": (np.float32(2.0), 2.0),
    "max_dim": (np.int64(100), 100),
    "protect": (np.bool_(True), True),
    "protect_energy": (np.float64(0.5), 0.5),
    "seed": (np.uint8(3), 3),
    "foreach": (np.bool_(False), False),
    "momentum": (np.float32(0.5), 0.5),
    "sinkhorn_iters": (np.int16(2), 2),
    "shampoo_beta": (np.float64(0.5), 0.5),
}


@pytest.mark.parametrize("name", NAMES)
def test_numpy_options_become_python_numbers_and_the_state_reloads_weights_only(name):
    options = optimizer_class(name).options
    given_values = {key: value for key, (value, _) in NUMPY_VALUES.items() if key in options}
    optimizer = RELIABILITY_FACTORIES[name](make_params(), **given_values)
    optimizer.add_param_group({"params": make_params([(4, 3)], 1), **given_values})
    for group in optimizer.param_groups:
        for key, value in given_values.items():
            expected = NUMPY_VALUES[key][1]
            assert group[key] == expected and type(group[key]) is type(expected), key
    run(optimizer, range(2))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer, weights_only=True))


@pytest.mark.parametrize("rank", [np.float64(0.5), 0.5])
def test_a_float_rank_stays_a_fraction(rank):
    optimizer = ProjectedAdam(make_params([(8, 6)]), rank=rank)
    run(optimizer, range(1))
    assert optimizer.param_groups[0]["rank"] == 0.5
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].shape == (8, 3)


# ------------------------------------------------------------------------ 9. torch.optim parity


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
def test_a_tensor_lr_steps_exactly_as_its_float(name, shape):
    lr = torch.full(shape, 0.03)
    with_tensor = RELIABILITY_FACTORIES[name](make_params(), lr=lr)
    with_float = RELIABILITY_FACTORIES[name](make_params(), lr=float(lr))
    run(with_tensor, range(4))
    run(with_float, range(4))
    assert with_tensor.param_groups[0]["lr"] is lr
    for a, b in zip(with_tensor.param_groups[0]["params"], with_float.param_groups[0]["params"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_a_scheduler_that_fills_a_tensor_lr_is_followed(name):
    optimizer = RELIABILITY_FACTORIES[name](make_params(), lr=torch.tensor(0.03), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.0)
    run(optimizer, range(1))
    scheduler.step()
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert float(optimizer.param_groups[0]["lr"]) == 0.0
    frozen = [param.detach().clone() for param in optimizer.param_groups[0]["params"]]
    run(optimizer, range(1, 3))  # lr 0: the state moves on, the parameters do not
    assert all(torch.equal(a, b) for a, b in zip(optimizer.param_groups[0]["params"], frozen))


@pytest.mark.parametrize("name", NAMES)
def test_maximize_is_minimising_the_negated_objective_bit_for_bit(name):
    maximizing = RELIABILITY_FACTORIES[name](make_params(), maximize=True)
    minimizing = RELIABILITY_FACTORIES[name](make_params())
    run(maximizing, range(5))
    run(minimizing, range(5), sign=-1.0)
    params = zip(maximizing.param_groups[0]["params"], minimizing.param_groups[0]["params"])
    assert all(torch.equal(a, b) for a, b in params)


@pytest.mark.parametrize("name", NAMES)
def test_torch_flags_are_group_options_with_their_defaults(name):
    optimizer = RELIABILITY_FACTORIES[name](make_params())
    group = optimizer.param_groups[0]
    assert (group["fused"], group["capturable"], group["differentiable"]) == (None, False, False)
    assert group["maximize"] is False
    for flag in ("fused", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{flag}=True is not supported: "):
            RELIABILITY_FACTORIES[name](make_params(), **{flag: True})


@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_round_trip_with_and_without_names(name):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    named_model = model()
    named = RELIABILITY_FACTORIES[name](named_model.named_parameters())
    run(named, range(3))
    saved = named.state_dict()
    assert saved["param_groups"][0]["param_names"] == [n for n, _ in named_model.named_parameters()]
    for with_names in (True, False):
        resumed_model = model()
        resumed_model.load_state_dict(named_model.state_dict())
        params = resumed_model.named_parameters() if with_names else resumed_model.parameters()
        resumed = RELIABILITY_FACTORIES[name](params)
        resumed.load_state_dict(copy.deepcopy(saved))
        reference = copy.deepcopy(named)
        run(reference, range(3, 5))
        run(resumed, range(3, 5))
        for a, b in zip(reference.param_groups[0]["params"], resumed.param_groups[0]["params"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks_run(name):
    optimizer = RELIABILITY_FACTORIES[name](make_params())
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    optimizer.register_state_dict_post_hook(lambda opt, state: {**state, "extra": 1})
    run(optimizer, range(2))
    assert calls == ["pre", "post"] * 2
    assert optimizer.state_dict()["extra"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_continues_bit_identically(name):
    optimizer = RELIABILITY_FACTORIES[name](make_params())
    run(optimizer, range(3))
    twin = copy.deepcopy(optimizer)
    run(optimizer, range(3, 6))
    run(twin, range(3, 6))
    for a, b in zip(optimizer.param_groups[0]["params"], twin.param_groups[0]["params"]):
        assert torch.equal(a, b) and a is not b


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10),
    ],
    ids=["lambda", "cosine", "one-cycle"],
)
def test_lr_schedulers_drive_every_optimizer_and_resume(name, scheduler):
    optimizer = RELIABILITY_FACTORIES[name](make_params())
    schedule = scheduler(optimizer)
    for step in range(3):
        run(optimizer, range(step, step + 1))
        schedule.step()
    assert "initial_lr" in optimizer.param_groups[0]
    resumed = RELIABILITY_FACTORIES[name](make_params())
    resumed_schedule = scheduler(resumed)
    resumed.load_state_dict(optimizer.state_dict())
    resumed_schedule.load_state_dict(schedule.state_dict())
    assert resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert math.isfinite(float(resumed.param_groups[0]["lr"]))


# ------------------------------------------------------------------------------- 11. protect


@settings(max_examples=30)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    rank=st.one_of(st.integers(1, 10), st.sampled_from([0.25, 0.5, 0.9, 1.0])),
    projector=st.sampled_from(["dct", "svd", "random"]),
)
def test_protect_raises_exactly_when_it_could_protect_nothing(rows, cols, rank, projector):
    dim = min(rows, cols)
    resolved = max(1, min(dim, int(rank * dim))) if isinstance(rank, float) else min(rank, dim)
    params = make_params([(rows, cols), (rows,)])
    if resolved < dim:
        optimizer = ProjectedAdam(params, rank=rank, projector=projector, protect=True)
        run(optimizer, range(2))
        assert optimizer.consolidate()[str((rows, cols))] <= dim - resolved
        return
    with pytest.raises(ValueError, match=r"protect=True would protect nothing .*shape \(%d, %d\)"
                       % (rows, cols)):
        ProjectedAdam(params, rank=rank, projector=projector, protect=True)
    optimizer = ProjectedAdam(make_params([(3, 3)]), rank=1, protect=True)
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="protect=True would protect nothing"):
        optimizer.add_param_group({"params": params, "rank": rank, "projector": projector})
    assert_same(before, snapshot(optimizer))


def test_a_loaded_group_that_could_protect_nothing_is_refused():
    optimizer = DCTProjectedAdam(make_params([(6, 4)]), rank=2, protect=True)
    run(optimizer, range(2))
    saved = optimizer.state_dict()
    saved["param_groups"][0]["rank"] = 4
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="protect=True would protect nothing"):
        optimizer.load_state_dict(saved)
    assert_same(before, snapshot(optimizer))
