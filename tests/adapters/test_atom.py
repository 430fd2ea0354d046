"""AtomParam: the update formulas (level 1, level 2, linear block view), defaults, counts, errors.

The shared properties (identity at init over drawn layers, merge, save/load, deepcopy,
bf16/fp16 layers) run in tests/contracts/test_adapter_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from decomp import atoms
from decomp.adapters import AtomParam


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def randomise_trainables(adapter: AtomParam, seed: int = 1) -> None:
    with torch.no_grad():
        for offset, parameter in enumerate(adapter.parameters()):
            parameter.copy_(gaussian(*parameter.shape, seed=seed + offset))


@st.composite
def conv_weights(draw):
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3))))
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 5)), *kernel)
    return gaussian(*shape, seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=25)
@given(weight=conv_weights(), data=st.data())
def test_level1_update_is_coefficients_times_atom_change(weight, data):
    kernel_size = weight[0, 0].numel()
    assume(kernel_size > 1)  # a pointwise conv takes the block view (tested below)
    m = data.draw(st.integers(1, kernel_size))
    adapter = AtomParam.from_weight(weight, num_atoms=m)
    torch.testing.assert_close(adapter.coeffs, atoms(weight, m).coeffs)
    randomise_trainables(adapter)
    expected = torch.zeros_like(weight)
    for o in range(weight.shape[0]):
        for i in range(weight.shape[1]):
            for j in range(m):
                expected[o, i] += adapter.coeffs[o, i, j] * adapter.atom_delta[j]
    torch.testing.assert_close(adapter.delta(weight), expected)
    torch.testing.assert_close(adapter(weight), weight + expected)


@settings(max_examples=20)
@given(weight=conv_weights(), data=st.data())
def test_level2_update_is_the_clean_recursive_formula(weight, data):
    kernel_size = weight[0, 0].numel()
    assume(kernel_size > 1)  # a pointwise conv takes the block view (tested below)
    m = data.draw(st.integers(1, kernel_size))
    m1 = data.draw(st.integers(1, kernel_size))
    adapter = AtomParam.from_weight(weight, num_atoms=m, levels=2, sub_atoms=m1)
    torch.testing.assert_close(adapter.coeffs, atoms(weight, m).coeffs)
    assert adapter.sub_coeffs.shape == (weight.shape[1], m, m1)
    torch.testing.assert_close(adapter(weight), weight)  # D1 starts at zero
    randomise_trainables(adapter)
    beta, sub_atom_delta = adapter.sub_coeffs.detach(), adapter.sub_atom_delta.detach()
    expected = torch.zeros_like(weight)
    for o in range(weight.shape[0]):
        for c in range(weight.shape[1]):
            for j in range(m):
                channel_atom = sum(beta[c, j, a] * sub_atom_delta[j, a] for a in range(m1))
                expected[o, c] += adapter.coeffs[o, c, j] * channel_atom * adapter.applied_scale
    torch.testing.assert_close(adapter.delta(weight), expected)


@pytest.mark.parametrize("levels", [1, 2])
def test_linear_block_view_treats_each_tile_as_a_filter(levels):
    weight = gaussian(8, 12)
    adapter = AtomParam.from_weight(weight, num_atoms=5, levels=levels, block=4)
    tiles = weight.reshape(2, 4, 3, 4).permute(0, 2, 1, 3)  # tile (o, i) = W[4o:4o+4, 4i:4i+4]
    torch.testing.assert_close(tiles[1, 2], weight[4:8, 8:12])
    reference = AtomParam.from_weight(tiles.contiguous(), num_atoms=5, levels=levels)
    torch.testing.assert_close(adapter.coeffs, reference.coeffs)
    randomise_trainables(adapter)
    randomise_trainables(reference)
    tile_update = reference.delta(tiles.contiguous())
    torch.testing.assert_close(adapter.delta(weight), tile_update.permute(0, 2, 1, 3).reshape(8, 12))


@pytest.mark.parametrize(
    ("shape", "config", "count"),
    [
        ((64, 64, 3, 3), {}, 81),  # m = 9 atoms of 3x3
        ((64, 64, 1, 1), {}, 9 * 16),  # 1x1 conv: the block view of its (64, 64) matrix
        ((8, 1, 1, 1), {}, 1),  # (8, 1) matrix: 1x1 tiles, one atom, one scalar
        ((16, 1, 7, 7), {}, 9 * 49),  # depthwise 7x7
        ((8, 4, 5), {}, 5 * 5),  # conv1d k=5: m clamped to K = 5
        ((4, 2, 3, 3, 3), {"num_atoms": 27}, 27 * 27),
        ((64, 64, 3, 3), {"levels": 2}, 9 * 3 * (9 + 64)),
        ((64, 64, 3, 3), {"num_atoms": 4, "levels": 2, "sub_atoms": 2}, 4 * 2 * (9 + 64)),
        ((768, 3072), {}, 9 * 16),  # block 4: 4x4 tiles, 9 atoms
        ((6, 9), {}, 6 * 9),  # block 3; 9 atoms would train 81 > 54 numbers: m = 6
        ((6, 9), {"num_atoms": 9}, 9 * 9),  # an explicit budget is kept
        ((5, 7), {}, 1),  # coprime dims: block 1, one scalar
        ((8, 8), {"block": 2}, 4 * 4),
        ((4, 4, 3, 3), {"num_atoms": 10}, 10 * 9),  # overcomplete: two groups of filters
        ((8, 1, 1, 1), {"num_atoms": 2}, 2),  # scalar atoms, one per half of the weight
        ((64, 64, 3, 3), {"channel_block": 4}, 9 * 16 * 16 * 9),  # coeff_l1: 144 atoms of 4x4x3x3
        ((16, 8, 3, 3), {"channel_block": 4}, 8 * 16 * 9),  # 144 atoms of 144 would exceed 16 * 8 * 9
        ((16, 8, 3, 3), {"channel_block": 4, "num_atoms": 2, "levels": 2, "sub_atoms": 3}, 32 * 3 * (144 + 2)),
        ((6, 8, 3, 3), {"channel_block": 4, "num_atoms": 2}, 8 * 36),  # c_out = 6: blocks of 1 x 4
    ],
)
def test_trainable_count_closed_form(shape, config, count):
    assert AtomParam.trainable_count(shape, **config) == count
    adapter = AtomParam.from_weight(gaussian(*shape), **config)
    assert adapter.num_trainable() == count


def test_registration_on_conv_is_identity_in_float64():
    conv = nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3, padding_mode="reflect").double()
    x = gaussian(2, 6, 7, 7)
    before = conv(x)
    parametrize.register_parametrization(conv, "weight", AtomParam(num_atoms=4, levels=2))
    assert torch.equal(conv(x), before)


def test_training_only_the_atoms_fits_a_target_update():
    # A target update inside the adapter's span: dW = alpha x dD* for a hidden dD*. Gradient
    # descent on the atoms alone must recover it (the frozen coefficients are the right ones).
    weight = gaussian(6, 4, 3, 3)
    adapter = AtomParam.from_weight(weight, num_atoms=4)
    hidden = gaussian(4, 3, 3, seed=5)
    target = torch.einsum("oij,jkl->oikl", adapter.coeffs, hidden)
    optimizer = torch.optim.LBFGS(adapter.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (adapter.delta(weight) - target).square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(adapter.atom_delta.detach(), hidden, rtol=1e-6, atol=1e-6)


def test_config_repr_and_rebuild():
    adapter = AtomParam(num_atoms=4, levels=2, sub_atoms=2)
    assert adapter.config() == {"num_atoms": 4, "levels": 2, "sub_atoms": 2, "block": None, "channel_block": 1, "scale": None}
    assert "num_atoms=4" in repr(adapter)
    built = AtomParam.from_weight(gaussian(8, 3, 3, 3), **adapter.config())
    assert "trainable=" in repr(built)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_atoms": 0}, ValueError, r"num_atoms must be >= 1, got 0"),
        ({"num_atoms": 2.5}, TypeError, r"num_atoms must be an int"),
        ({"levels": 3}, ValueError, r"levels must be in \[1, 2\], got 3"),
        ({"sub_atoms": 2}, ValueError, r"sub_atoms is only used with levels=2"),
        ({"levels": 2, "sub_atoms": 0}, ValueError, r"sub_atoms must be >= 1"),
        ({"block": 0}, ValueError, r"block must be >= 1"),
        ({"block": "4"}, TypeError, r"block must be an int"),
        ({"channel_block": 0}, ValueError, r"channel_block must be >= 1"),
        ({"channel_block": None}, TypeError, r"channel_block must be an int"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        AtomParam(**kwargs)


@pytest.mark.parametrize(
    ("shape", "kwargs", "message"),
    [
        ((2, 2, 3), {"num_atoms": 13}, r"num_atoms=13 makes 13 atoms of 3 entries: 5 groups of filters, more than the 4 filters"),
        ((8, 1, 1, 1), {"num_atoms": 9}, r"9 groups of filters, more than the 8 filters of a weight of shape \(8, 1, 1, 1\)"),
        ((4, 4, 3), {"levels": 2, "sub_atoms": 4}, r"sub_atoms must be in \[1, K\] = \[1, 3\]"),
        ((8, 6), {"block": 4}, r"block must divide both dims of the linear \(or 1x1 conv\) weight \(d_out=8, d_in=6\), got block=4"),
        ((8, 8), {"block": 2, "levels": 2, "sub_atoms": 5}, r"sub_atoms must be in \[1, K\] = \[1, 4\]"),
    ],
)
def test_out_of_range_budget_raises_and_registers_nothing(shape, kwargs, message):
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:])
    if len(shape) == 3:
        layer = nn.Conv1d(shape[1], shape[0], shape[2])
    with pytest.raises(ValueError, match=message):
        parametrize.register_parametrization(layer, "weight", AtomParam(**kwargs))
    assert not parametrize.is_parametrized(layer)
    with pytest.raises(ValueError, match=message):
        AtomParam.trainable_count(shape, **kwargs)


def test_unbuilt_adapter_explains_how_to_build():
    with pytest.raises(RuntimeError, match="not built yet"):
        AtomParam()(torch.zeros(4, 4, 3, 3))


def test_trainable_count_validates_like_the_constructor():
    with pytest.raises(ValueError, match=r"levels must be in \[1, 2\]"):
        AtomParam.trainable_count((4, 4, 3, 3), levels=3)
    with pytest.raises(ValueError, match=r"shape must have 2 \(linear\) to 5 \(conv3d\) dims"):
        AtomParam.trainable_count((4,))


@pytest.mark.parametrize("levels", [1, 2])
def test_a_pointwise_conv_is_adapted_as_the_linear_layer_of_its_matrix(levels):
    # A 1x1 conv taken as its own 1x1 filters would have scalar atoms (one trainable number).
    torch.manual_seed(0)
    matrix = torch.randn(12, 8)
    conv_adapter = AtomParam.from_weight(matrix[:, :, None, None], levels=levels)
    linear_adapter = AtomParam.from_weight(matrix, levels=levels)
    assert conv_adapter.num_trainable() == linear_adapter.num_trainable() > 1
    with torch.no_grad():
        for conv_param, linear_param in zip(conv_adapter.parameters(), linear_adapter.parameters()):
            conv_param.copy_(torch.randn_like(linear_param))
            linear_param.copy_(conv_param)
    torch.testing.assert_close(
        conv_adapter.delta(matrix[:, :, None, None]), linear_adapter.delta(matrix)[:, :, None, None]
    )


# ---------------------------------------------------------------------------------- overcomplete


@settings(max_examples=20)
@given(weight=conv_weights(), data=st.data())
def test_overcomplete_atoms_split_the_filters_into_groups(weight, data):
    # issue 12: more atoms than kernel entries (the official code's 1x1 convs): atom j serves
    # filter group j // K with the SVD coefficient of direction j % K.
    c_out, c_in, *kernel = weight.shape
    kernel_size, filters = math.prod(kernel), c_out * c_in
    assume(kernel_size > 1 and filters >= 2)
    m = data.draw(st.integers(kernel_size + 1, kernel_size * min(filters, 3)))
    adapter = AtomParam.from_weight(weight, num_atoms=m)
    complete = atoms(weight, kernel_size).coeffs.reshape(filters, kernel_size)
    groups = -(-m // kernel_size)
    expected = torch.zeros(filters, m, dtype=weight.dtype)
    for n in range(filters):
        group = n * groups // filters
        for j in range(group * kernel_size, min((group + 1) * kernel_size, m)):
            expected[n, j] = complete[n, j % kernel_size]
    torch.testing.assert_close(adapter.coeffs.reshape(filters, m), expected)
    assert torch.equal(adapter(weight), weight)
    assert adapter.num_trainable() == m * kernel_size == AtomParam.trainable_count(tuple(weight.shape), num_atoms=m)


def test_one_num_atoms_fits_every_layer_of_a_network():
    # 9 atoms on 3x3, 1x1 (block view of coprime dims: K = 1) and linear layers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 5, 1), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    for layer in (model[0], model[1], model[3]):
        parametrize.register_parametrization(layer, "weight", AtomParam(num_atoms=9))
    assert torch.equal(model(x), before)
    model(x).square().sum().backward()
    pointwise = model[1].parametrizations.weight[0]
    assert pointwise.filter_layout.kernel == (1, 1) and pointwise.atom_delta.shape == (9, 1, 1)
    assert bool((pointwise.atom_delta.grad != 0).all())  # every group's scalar gets a gradient


# ---------------------------------------------------------------------------------- channel blocks


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize(("c_out", "c_in", "tile"), [(8, 4, (4, 4)), (6, 8, (1, 4)), (8, 6, (4, 1))])
def test_channel_blocks_are_the_filters_of_coeff_l1(levels, c_out, c_in, tile):
    # The official coeff_l1 (levels=1) and coeff_bases_l1 (levels=2): a kc x kc channel block is one
    # (kc, kc, 3, 3) filter, the dictionary num_atoms * kc**2 atoms; a side kc does not divide uses 1.
    weight = gaussian(c_out, c_in, 3, 3)
    s_out, s_in = tile
    adapter = AtomParam.from_weight(weight, num_atoms=2, levels=levels, channel_block=4)
    blocks = weight.reshape(c_out // s_out, s_out, c_in // s_in, s_in, 3, 3).transpose(1, 2)
    torch.testing.assert_close(blocks[1, 0, 0, 0], weight[s_out, 0])
    flat_blocks = blocks.reshape(c_out // s_out, c_in // s_in, -1)
    reference = AtomParam.from_weight(flat_blocks, num_atoms=2 * s_out * s_in, levels=levels)
    torch.testing.assert_close(adapter.coeffs, reference.coeffs)
    assert adapter.num_trainable() == reference.num_trainable()
    randomise_trainables(adapter)
    randomise_trainables(reference)
    block_update = reference.delta(flat_blocks).reshape(blocks.shape)
    torch.testing.assert_close(adapter.delta(weight), block_update.transpose(1, 2).reshape(weight.shape))


def test_level2_beta_starts_at_the_official_kaiming_scale():
    # issue 12: beta started at unit scale (the sub-atom coefficients of W), ~50x the official
    # kaiming_normal_(a=sqrt(5)) draw, N(0, 1 / (3 n)) over its n entries.
    torch.manual_seed(0)
    adapter = AtomParam.from_weight(gaussian(64, 64, 3, 3), levels=2)
    beta = adapter.sub_coeffs.detach()
    n = beta.numel()
    assert n == 64 * 9 * 3
    assert float(beta.std()) == pytest.approx((3 * n) ** -0.5, rel=0.05)
    assert abs(float(beta.mean())) < 4 * (3 * n) ** -0.5 / n**0.5
    # and the change is scaled so a step of D1 moves the per-channel atoms as level 1's step does
    assert adapter.applied_scale == pytest.approx((3 * 64 * 9) ** 0.5)
