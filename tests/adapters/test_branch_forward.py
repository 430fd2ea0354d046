"""``apply``'s branch forward of adapted ``nn.Linear`` layers: where it is installed, where not,
and what it keeps (the contract suite checks every class's branch against its weight path)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from decomp.adapters import LieParam, apply, load_adapter, merge, save_adapter, trainable_parameters

from .strategies import adapter_of, seeded
from .test_registry import ScaledLowRank


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 10), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 3))


X = torch.randn(4, 1, 12, generator=seeded(1))


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in trainable_parameters(model):
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=seeded(2)))


def branched(layer: nn.Module) -> bool:
    return type(layer).forward.__name__ == "_branch_forward"


def test_linear_layers_take_the_branch_and_convs_keep_the_weight_path():
    model = apply(mlp(), ScaledLowRank, target=["0", "2", "3"])
    assert [branched(model[i]) for i in (0, 2, 3)] == [True, True, False]
    reference = apply(mlp(), ScaledLowRank, target=["0", "2", "3"], branch=False)
    assert not any(branched(reference[i]) for i in (0, 2, 3))
    perturb(model)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(X), reference(X))


def test_a_method_without_a_branch_form_keeps_the_weight_path():
    model = apply(mlp(), LieParam, target=["0"])
    assert not adapter_of(model[0]).has_branch
    assert type(model[0]).forward is nn.Linear.forward
    with pytest.raises(TypeError, match="LieParam has no branch form"):
        adapter_of(model[0]).branch(torch.randn(2, 12))


def test_branch_must_be_a_bool():
    with pytest.raises(TypeError, match="branch must be a bool, got str"):
        apply(mlp(), ScaledLowRank, target=["0"], branch="yes")


def test_merge_deepcopy_and_removal_restore_or_keep_the_forward():
    model = apply(mlp(), ScaledLowRank, target=["0", "2"])
    perturb(model)
    expected = model(X).detach()
    replica = copy.deepcopy(model)
    assert branched(replica[0]) and type(replica[0]) is not type(model[0])
    torch.testing.assert_close(replica(X), expected, rtol=0, atol=0)
    parametrize.remove_parametrizations(replica[2], "weight", leave_parametrized=True)
    assert type(replica[2]).forward is nn.Linear.forward and branched(model[2])
    merge(model)
    assert all(type(model[i]).forward is nn.Linear.forward for i in (0, 2))
    torch.testing.assert_close(model(X), expected)
    torch.testing.assert_close(replica(X), expected)


class Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_a_parametrization_stacked_later_is_read_through_the_weight():
    """W'' = 2 (W + dW) is no longer W + dW: the layer then computes with its weight."""
    model = apply(mlp(), ScaledLowRank, target=["0"])
    perturb(model)
    parametrize.register_parametrization(model[0], "weight", Doubled())
    x = torch.randn(3, 12)
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias))


class ScaledOutputLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 3 * super().forward(input)


def test_a_linear_subclass_with_its_own_forward_keeps_it():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledOutputLinear(5, 4), nn.Linear(4, 2))
    apply(model, ScaledLowRank, target=["0"])
    perturb(model)
    assert not branched(model[0])
    x = torch.randn(3, 5)
    torch.testing.assert_close(model[0](x), 3 * nn.functional.linear(x, model[0].weight, model[0].bias))


def test_attention_reading_its_out_proj_weight_sees_the_update():
    """nn.MultiheadAttention never calls out_proj's forward: it reads out_proj.weight, which is W'."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    reference = copy.deepcopy(attention)
    apply(attention, ScaledLowRank, target=["out_proj"])
    apply(reference, ScaledLowRank, target=["out_proj"], branch=False)
    perturb(attention)
    reference.load_state_dict(attention.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(attention(x, x, x)[0], reference(x, x, x)[0])


def test_load_adapter_into_a_plain_model_installs_the_branch_unless_told_not(tmp_path: Path):
    model = apply(mlp(), ScaledLowRank, target=["0"])
    perturb(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    loaded, plain = load_adapter(mlp(), path), load_adapter(mlp(), path, branch=False)
    assert branched(loaded[0]) and type(plain[0]).forward is nn.Linear.forward
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)
    torch.testing.assert_close(plain(X), model(X))


def test_the_branch_saves_no_matrix_of_the_weights_size_for_backward():
    """On a layer inside a network (its input needs a gradient) the weight path saves the new
    W' (m x n) for dL/dx; the branch saves the frozen W itself (no copy) and thin tensors only."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    apply(nn.Sequential(layer, nn.Linear(48, 2)), ScaledLowRank, target=["0"])
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(5, 64, requires_grad=True)).sum()
    weight = layer.parametrizations.weight.original
    large = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    assert saved and large == []
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nn.functional.linear(torch.randn(5, 64, requires_grad=True), layer.weight)  # the weight path
    assert any(t.numel() == weight.numel() and t.data_ptr() != weight.data_ptr() for t in saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_layer_returns_its_dtype_close_to_the_weight_path(dtype):
    model = apply(mlp().to(dtype), ScaledLowRank, target=["0", "2"])
    reference = apply(mlp().to(dtype), ScaledLowRank, target=["0", "2"], branch=False)
    perturb(model)
    reference.load_state_dict(model.state_dict())
    x = X.to(dtype)
    assert model(x).dtype == dtype
    torch.testing.assert_close(model(x).float(), reference(x).float(), rtol=2e-2, atol=2e-2)
