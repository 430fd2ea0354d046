"""Hypothesis strategies shared by the adapter tests and the contract suite."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from decomp.adapters import AdapterParam

LAYER_KINDS = frozenset({"linear", "conv1d", "conv2d", "conv3d"})
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CONV_TYPES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


def adapter_of(layer: nn.Module) -> AdapterParam:
    """The adapter registered on ``layer.weight`` (the first parametrization)."""
    return layer.parametrizations.weight[0]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def default_fits(adapter: AdapterParam, layer: nn.Module | torch.Tensor) -> bool:
    """Whether the unbuilt ``adapter`` builds on ``layer.weight`` (or a weight) as far as its budget goes.

    False only where the budget is left at its default and even its smallest value would train
    more numbers than the weight holds: the adapter then raises ``ValueError`` by design
    (tests/test_vocabulary.py states that property). Properties of built adapters drawn over tiny
    layers ``assume`` this, so every other error still fails them.
    """
    if adapter.config()[adapter.budget_option] is not None:
        return True
    try:
        weight = layer.weight if isinstance(layer, nn.Module) else layer
        type(adapter).trainable_count(tuple(weight.shape), **adapter.config())
    except ValueError as error:
        if "does not fit a weight of shape" in str(error):
            return False
        raise
    return True


@st.composite
def layers(draw, kinds: frozenset[str] = LAYER_KINDS, dtype: torch.dtype = torch.float64):
    """A freshly initialised Linear or Conv1d/2d/3d (groups, dilation, stride, bias, every padding
    mode, non-square kernels) of one of ``kinds``, and a batch of inputs for it.

    The global torch seed is set from a drawn seed on purpose: the layer's init and the random
    inits of an adapter registered on it afterwards (drawn from the global generator, as
    ``nn.Module`` inits are) are then reproducible per example.
    """
    kind = draw(st.sampled_from(sorted(kinds)))
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(draw(st.integers(1, 12)), draw(st.integers(1, 12)), bias=draw(st.booleans()))
        x = torch.randn(3, layer.in_features, generator=seeded(seed + 1))
        return layer.to(dtype), x.to(dtype)
    spatial = int(kind[-2])
    groups = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    layer = CONV_TYPES[kind](
        groups * draw(st.integers(1, 3)),
        groups * draw(st.integers(1, 3)),
        kernel,
        stride=draw(st.integers(1, 2)),
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
    )
    # Large enough for the dilated kernel, and above the padding ('reflect' needs padding < size).
    size = max(dilation * (max(kernel) - 1) + 1, padding + 1) + draw(st.integers(0, 2))
    x = torch.randn(2, layer.in_channels, *([size] * spatial), generator=seeded(seed + 1))
    return layer.to(dtype), x.to(dtype)


BATCH_SHAPES = st.sampled_from([(), (3,), (2, 3)])


def perturbed(adapter: AdapterParam, seed: int) -> AdapterParam:
    """``adapter`` with every Parameter moved by a standard normal draw (away from its init)."""
    generator = seeded(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return adapter


def assert_branch_is_the_weight_path(adapter: AdapterParam, weight: torch.Tensor, x: torch.Tensor) -> None:
    """``adapter.branch(x)`` (float64) equals ``x @ delta(W).T``, and so do its gradients in ``x``
    and in every Parameter along a random output direction. Shared by the branch tests of the
    adapters with a branch form."""
    x = x.detach().requires_grad_()
    inputs = (x, *adapter.parameters())
    branch, weighted = adapter.branch(x), x @ adapter.delta(weight).T
    torch.testing.assert_close(branch, weighted, rtol=1e-9, atol=1e-12)
    direction = torch.randn(branch.shape, generator=seeded(0), dtype=branch.dtype)
    gradients = [torch.autograd.grad((out * direction).sum(), inputs) for out in (branch, weighted)]
    for mine, expected in zip(*gradients):
        torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-12)
