"""Adapter files hold O(trainable) bytes: frozen factors are rebuilt from the weight at load.

``save_adapter`` leaves out the buffers an adapter class declares in ``rebuilt_buffers`` (keeping
a fingerprint of each); ``load_adapter`` rebuilds them from the target model's weight and refuses
a rebuild that came out different. Checked for every case of the contract registry: a fresh copy
of the pretrained model reproduces the tuned outputs bit for bit (into a plain and into an
adapted copy), a different pretrained weight raises ``ValueError`` and changes nothing, files
with the factors stored (``factors=True``, the old format) still load, and the file's bytes are
bounded by the trainable bytes. Rebuilding is reproducible: declared buffers never change in
training, do not depend on the global RNG, and do not depend on the signs LAPACK picks for
singular vectors or eigenvectors.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from decomp import atoms, kpsvd
from decomp.adapters import (
    AdapterParam,
    AtomParam,
    KronParam,
    LDUParam,
    SVDParam,
    adapter_state_dict,
    apply,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from decomp.adapters.base import (
    FINGERPRINT_PROJECTIONS,
    buffer_fingerprint,
    fingerprint_difference,
    rebuild_tolerance,
)
from decomp.adapters.model import adapted_layers

from tests.contracts.registry import ADAPTER_CASES, AdapterCase

from .adapter_helpers import Bank, Snapshot, factory, read_file, train_step

IDS = [case.name for case in ADAPTER_CASES]
REBUILT = "decomp.adapters.rebuilt"
# Cases whose rebuilt buffers are a function of the weight (not of the config alone): a
# different pretrained weight must be refused. DCT "low"/"random" locations and LDU's scale
# depend on the config only, and the others rebuild nothing.
WEIGHT_DEPENDENT = {
    "atom", "atom-levels2", "atom-coeff_l1", "atom-coeff_bases_l1", "ldu", "svd-pissa", "svd-pissa-randomized", "svd-svfit",
    "svd-lora_xs", "svd-lora_xs-normal", "dct", "kron",
}  # fmt: skip


def _pretrained(case: AdapterCase, seed: int = 0) -> Bank:
    return Bank(case.layers, seed=seed)


def _adapt(model: nn.Module, case: AdapterCase) -> nn.Module:
    return apply(model, factory(case), target=r".*")


def _tuned(pretrained: nn.Module, case: AdapterCase) -> nn.Module:
    model = _adapt(copy.deepcopy(pretrained), case)
    train_step(model, 0)
    train_step(model, 1)
    return model


def _omitted(model: nn.Module) -> set[str]:
    """The keys save_adapter leaves out: declared rebuilt buffers larger than a fingerprint."""
    return {
        layer.prefix + name
        for layer in adapted_layers(model)
        for name, buffer in layer.adapter.rebuilt_state().items()
        if buffer.numel() > FINGERPRINT_PROJECTIONS + 1
    }


def _rebuilt(make: Callable[[], AdapterParam], weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rebuilt buffers of an adapter ``make()`` built from ``weight``."""
    adapter = make()
    adapter.right_inverse(weight)
    return {name: value.clone() for name, value in adapter.rebuilt_state().items()}


def _adapter_classes() -> set[type[AdapterParam]]:
    from decomp import adapters

    return {
        value
        for value in vars(adapters).values()
        if isinstance(value, type) and issubclass(value, AdapterParam) and value is not AdapterParam
    }


@pytest.mark.parametrize("into", ["plain", "adapted"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_a_fresh_pretrained_copy_reproduces_the_tuned_model_exactly(case, into, tmp_path):
    pretrained = _pretrained(case)
    model = _tuned(pretrained, case)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)

    tensors, metadata = read_file(path)
    omitted = _omitted(model)
    assert not omitted & set(tensors)
    assert set(tensors) | omitted == set(adapter_state_dict(model))
    listed = {entry["key"] for entry in json.loads(metadata.get(REBUILT, "[]"))}
    assert listed == omitted
    assert metadata["format"] == ("decomp.adapters/2" if omitted else "decomp.adapters/1")

    fresh = copy.deepcopy(pretrained)
    if into == "adapted":
        fresh = _adapt(fresh, case)
    assert not torch.equal(fresh(), model())
    load_adapter(fresh, path)
    assert torch.equal(fresh(), model())
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key


def _perturbed(pretrained: nn.Module, relative: float) -> nn.Module:
    """A copy of ``pretrained`` whose weights moved by ``relative`` times their std, at random."""
    other = copy.deepcopy(pretrained)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if name.endswith("weight"):
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(relative * parameter.std() * noise)
    return other


@pytest.mark.parametrize("into", ["plain", "adapted"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_another_pretrained_weight_is_refused_and_nothing_changes(case, into, tmp_path):
    model = _tuned(_pretrained(case), case)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    other = _pretrained(case, seed=1)
    rebuilt_on_other = adapter_state_dict(_adapt(copy.deepcopy(other), case))
    same_rebuild = all(
        torch.equal(rebuilt_on_other[key], adapter_state_dict(model)[key]) for key in _omitted(model)
    )
    assert same_rebuild == (case.name not in WEIGHT_DEPENDENT)
    if into == "adapted":
        other = _adapt(other, case)
    if same_rebuild:
        load_adapter(other, path)  # nothing the file leaves out depends on the weight
        return
    snapshot = Snapshot(other)
    with pytest.raises(ValueError, match="pretrained weight differs from the one the adapter"):
        load_adapter(other, path)
    snapshot.assert_unchanged(other)


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_a_weight_perturbed_by_one_percent_is_refused(case, tmp_path):
    pretrained = _pretrained(case)
    model = _tuned(pretrained, case)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    other = _perturbed(pretrained, 0.01)
    snapshot = Snapshot(other)
    if case.name in WEIGHT_DEPENDENT - {"dct"}:
        # Factors continuous in the weight move by about 1%, ten times the tolerance.
        with pytest.raises(ValueError, match="pretrained weight differs"):
            load_adapter(other, path)
        snapshot.assert_unchanged(other)
        return
    # DCT locations chosen by magnitude may survive a small perturbation; integer buffers are
    # compared exactly, so a load that passes rebuilt exactly the saved ones.
    load_adapter(other, path)
    for key in _omitted(model):
        assert torch.equal(adapter_state_dict(other)[key], adapter_state_dict(model)[key]), key


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_files_with_the_factors_stored_still_load(case, tmp_path):
    pretrained = _pretrained(case)
    model = _tuned(pretrained, case)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, factors=True)
    tensors, metadata = read_file(path)
    assert set(tensors) == set(adapter_state_dict(model))
    assert metadata["format"] == "decomp.adapters/1" and REBUILT not in metadata
    # What a version before rebuilt buffers wrote: no extra entry either.
    del metadata["decomp.adapters.extra"]
    save_file(tensors, str(path), metadata=metadata)
    for target in (copy.deepcopy(pretrained), _adapt(copy.deepcopy(pretrained), case)):
        load_adapter(target, path)
        assert torch.equal(target(), model())
    # The stored factors are used as they are: any weight of the right shape takes them.
    other = load_adapter(_pretrained(case, seed=1), path)
    assert all(
        torch.equal(adapter_state_dict(other)[key], value)
        for key, value in adapter_state_dict(model).items()
    )


def _wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64)
    )


# Stored bytes (tensors) <= C * trainable bytes + SMALL_BYTES per adapted layer; the file adds
# its JSON header, at most HEADER_BYTES per layer. C = 2: SNELL(A) with zero_start stores a
# copy of each trainable start; SMALL_BYTES: the buffers no larger than a fingerprint (LDU's
# scale, Kron's start S0 of rank 4, SNELL's kept count).
C, SMALL_BYTES, HEADER_BYTES = 2, (FINGERPRINT_PROJECTIONS + 1) * 8, 2048


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_file_bytes_are_bounded_by_the_trainable_bytes(case, tmp_path):
    model = _adapt(_wide_model(), case) if "linear" in case.layers else None
    if model is None:
        pytest.skip("a conv-only case: the Bank cases above cover it")
    layers = len(adapted_layers(model))
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable_parameters(model))
    default, stored = tmp_path / "default.safetensors", tmp_path / "factors.safetensors"
    save_adapter(model, default)
    save_adapter(model, stored, factors=True)
    tensors, _ = read_file(default)
    tensor_bytes = sum(value.numel() * value.element_size() for value in tensors.values())
    assert tensor_bytes <= C * trainable_bytes + SMALL_BYTES * layers
    assert os.path.getsize(default) <= tensor_bytes + HEADER_BYTES * layers + 1024
    if _omitted(model):
        omitted_bytes = sum(
            value.numel() * value.element_size()
            for key, value in adapter_state_dict(model).items()
            if key in _omitted(model)
        )
        assert os.path.getsize(stored) - tensor_bytes >= omitted_bytes


def test_ldu_file_is_o_trainable_where_the_factors_are_not(tmp_path):
    """The issue's case: LDU trains r + 1 numbers per layer but stores two r-column factors."""
    model = apply(_wide_model(), LDUParam, target=r".*")
    trainable_bytes = sum(p.numel() * 4 for p in trainable_parameters(model))
    save_adapter(model, tmp_path / "default.safetensors")
    save_adapter(model, tmp_path / "factors.safetensors", factors=True)
    default = os.path.getsize(tmp_path / "default.safetensors")
    stored = os.path.getsize(tmp_path / "factors.safetensors")
    assert default <= 2 * trainable_bytes + HEADER_BYTES * 2
    assert stored >= 50 * default


# ------------------------------------------------------------------------------ reproducibility


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=IDS)
def test_rebuilt_buffers_ignore_the_global_rng_and_training(case):
    pretrained = _pretrained(case)
    torch.manual_seed(1)
    first = _adapt(copy.deepcopy(pretrained), case)
    torch.manual_seed(2)
    second = _adapt(copy.deepcopy(pretrained), case)
    rebuilt = {
        layer.prefix + name: buffer.clone()
        for layer in adapted_layers(first)
        for name, buffer in layer.adapter.rebuilt_state().items()
    }
    for key, value in rebuilt.items():
        assert torch.equal(adapter_state_dict(second)[key], value), key
    train_step(first, 0)
    train_step(first, 1)
    for key, value in rebuilt.items():
        assert torch.equal(adapter_state_dict(first)[key], value), key
    # Declared names are buffers, never trainable Parameters.
    trainable = {name for name, p in first.named_parameters() if p.requires_grad}
    assert not set(rebuilt) & trainable


def test_kronecker_start_ignores_the_global_rng_where_kpsvd_sketches():
    """A 64 x 64 weight: kpsvd's "auto" takes the randomized SVD, which drew from the global RNG."""
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = _rebuilt(KronParam, weight)
    unseeded = kpsvd(weight, (8, 8), (8, 8), 4)
    torch.manual_seed(2)
    second = _rebuilt(KronParam, weight)
    assert not torch.equal(kpsvd(weight, (8, 8), (8, 8), 4).B.abs(), unseeded.B.abs())  # it sketches
    for key, value in first.items():
        assert torch.equal(second[key], value), key


def test_declarations_name_buffers_of_their_class():
    declared = {cls.__name__: cls.rebuilt_buffers for cls in _adapter_classes() if cls.rebuilt_buffers}
    assert set(declared) == {"AtomParam", "DCTParam", "KronParam", "LDUParam", "SVDParam"}
    assert AdapterParam.rebuilt_buffers == ()


def test_the_export_page_lists_every_declaration():
    """docs/adapters/export.md's table of rebuilt buffers is the classes' declarations."""
    page = Path(__file__).resolve().parents[2] / "docs" / "adapters" / "export.md"
    rows = [line for line in page.read_text().splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        classes, buffers = row.split("|")[1:3]
        for name in re.findall(r"`(\w+)`", classes):
            documented[name] = set(re.findall(r"`(\w+)`", buffers))
    assert documented == {cls.__name__: set(cls.rebuilt_buffers) for cls in _adapter_classes()}


def _flip_every_other(count: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([(-1.0) ** index for index in range(count)], dtype=dtype)


@pytest.fixture
def lapack_picks_other_signs(monkeypatch):
    """torch.linalg.svd and eigh as another LAPACK may return them: every other vector negated."""
    real_svd, real_eigh = torch.linalg.svd, torch.linalg.eigh

    def svd(matrix, full_matrices=True, **kwargs):
        U, S, Vh = real_svd(matrix, full_matrices=full_matrices, **kwargs)
        signs = _flip_every_other(S.shape[-1], U.dtype)
        U = torch.cat((U[..., : S.shape[-1]] * signs, U[..., S.shape[-1] :]), -1)
        Vh = torch.cat((Vh[..., : S.shape[-1], :] * signs[:, None], Vh[..., S.shape[-1] :, :]), -2)
        return torch.return_types.linalg_svd((U, S, Vh))

    def eigh(matrix, *args, **kwargs):
        values, vectors = real_eigh(matrix, *args, **kwargs)
        flipped = vectors * _flip_every_other(values.shape[-1], vectors.dtype)
        return torch.return_types.linalg_eigh((values, flipped))

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    matrix = torch.randn(5, 4, dtype=torch.float64)
    U, S, Vh = svd(matrix, full_matrices=False)
    assert not torch.equal(U, real_svd(matrix, full_matrices=False).U)
    assert torch.allclose(U @ torch.diag(S) @ Vh, matrix)  # still an SVD, other signs


SIGN_CASES = {
    "svd-pissa": (lambda: SVDParam(), (16, 64)),
    "svd-randomized": (lambda: SVDParam(svd="randomized"), (16, 64)),
    "svd-svfit": (lambda: SVDParam(mode="svfit"), (16, 64)),
    "svd-lora_xs": (lambda: SVDParam(mode="lora_xs"), (16, 64)),
    "kron-randomized": (lambda: KronParam(), (16, 64)),
    "kron-exact": (lambda: KronParam(rank=2, b_shape=(2, 4), c_shape=(8, 16)), (16, 64)),
    "atom": (lambda: AtomParam(), (16, 8, 3, 3)),
    "atom-levels2": (lambda: AtomParam(levels=2), (16, 8, 3, 3)),
}


@pytest.mark.parametrize("name", SIGN_CASES)
def test_rebuilt_factors_do_not_depend_on_lapack_signs(name, request):
    make, shape = SIGN_CASES[name]
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = _rebuilt(make, weight)
    assert expected
    request.getfixturevalue("lapack_picks_other_signs")
    rebuilt = _rebuilt(make, weight)
    for key, value in expected.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_atom_and_kronecker_factors_have_fixed_signs():
    torch.manual_seed(0)
    decomposition = atoms(torch.randn(6, 4, 3, 3), 4, levels=2)
    for rows in (decomposition.atoms.flatten(1), decomposition.sub_atoms.flatten(2)):
        largest = rows.gather(-1, rows.abs().argmax(-1, keepdim=True))
        assert bool((largest > 0).all())
    B = KronParam.from_weight(torch.randn(16, 64)).B0.flatten(1)
    assert bool((B.gather(-1, B.abs().argmax(-1, keepdim=True)) > 0).all())
    # The joint flip leaves the Kronecker sum as kpsvd gives it.
    matrix = torch.randn(16, 64, dtype=torch.float64)
    adapter = KronParam.from_weight(matrix, rank=4)
    S, B0, C0 = adapter.S0, adapter.B0, adapter.C0
    seeded = torch.Generator().manual_seed(0)
    expected = kpsvd(matrix, tuple(B0.shape[1:]), tuple(C0.shape[1:]), 4, generator=seeded)
    torch.testing.assert_close(
        torch.einsum("r,rij,rkl->ikjl", S, B0, C0).reshape(16, 64), expected.to_matrix()
    )


# ------------------------------------------------------------------------------ fingerprints


def test_fingerprint_estimates_the_relative_difference():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, dtype=torch.float64, generator=generator)
    for scale in (1e-6, 1e-3, 1e-1):
        d = scale * torch.randn(4096, dtype=torch.float64, generator=generator)
        estimate = fingerprint_difference(buffer_fingerprint(x), buffer_fingerprint(x + d))
        exact = float(d.norm() / x.norm())
        assert exact / 3 <= estimate <= 3 * exact
    assert fingerprint_difference(buffer_fingerprint(x), buffer_fingerprint(x)) == 0.0
    assert fingerprint_difference(buffer_fingerprint(torch.zeros(3)), buffer_fingerprint(torch.ones(3))) > 1


def test_one_flipped_singular_vector_of_a_large_factor_exceeds_the_tolerance():
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(3072, 768)).Q
    flipped = U.clone()
    flipped[:, 500] *= -1
    difference = fingerprint_difference(buffer_fingerprint(U), buffer_fingerprint(flipped))
    assert difference > 10 * rebuild_tolerance(torch.float32)
    # Rounding of the same factor (fp32 -> fp64 -> fp32 after a tiny relative change) passes.
    rounded = (U.double() * (1 + 1e-7)).float()
    rounding = fingerprint_difference(buffer_fingerprint(U), buffer_fingerprint(rounded))
    assert rounding <= rebuild_tolerance(torch.float32)


def test_integer_buffers_must_match_exactly():
    locations = torch.arange(0, 3000, 7)
    moved = locations.clone()
    moved[100] += 1
    difference = fingerprint_difference(buffer_fingerprint(locations), buffer_fingerprint(moved))
    assert difference > rebuild_tolerance(torch.int64)
    assert rebuild_tolerance(torch.int64) < 1e-9
    assert rebuild_tolerance(torch.float32) == 1e-3
    assert rebuild_tolerance(torch.float32, torch.bfloat16) == 2 * torch.finfo(torch.bfloat16).eps


def test_fingerprint_weights_are_fixed_numbers():
    """The projections are an integer hash, not a sampler: pinned so that files stay loadable."""
    fingerprint = buffer_fingerprint(torch.arange(4, dtype=torch.float64))
    assert fingerprint[0] == pytest.approx(14**0.5)
    assert fingerprint[1:3] == pytest.approx([1.5151064976134143, -2.091182614528706], abs=0, rel=1e-12)


# ------------------------------------------------------------------------------ faults


def _ldu_file(tmp_path):
    pretrained = nn.Sequential(nn.Linear(8, 6))
    model = apply(copy.deepcopy(pretrained), LDUParam, target=r"0")
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    return pretrained, path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda entries: entries[0].update(fingerprint=[0.0]), "fingerprint must be a list of numbers"),
        (lambda entries: entries[0].update(dtype="float99"), "dtype must name a torch dtype"),
        (lambda entries: entries[0].update(shape="6x6"), "shape must be a list"),
        (lambda entries: entries[0].update(key="0.parametrizations.weight.0.pivots"), "not stored in the file"),
        (lambda entries: entries.append(dict(entries[0])), "listed once"),
        (lambda entries: entries[0].pop("dtype"), "exactly the keys"),
    ],
    ids=["fingerprint", "dtype", "shape", "stored-key", "repeated", "missing-field"],
)
def test_malformed_rebuilt_metadata_is_refused(tmp_path, edit, message):
    pretrained, path = _ldu_file(tmp_path)
    tensors, metadata = read_file(path)
    entries = json.loads(metadata[REBUILT])
    edit(entries)
    save_file(tensors, str(path), metadata={**metadata, REBUILT: json.dumps(entries)})
    for target in (copy.deepcopy(pretrained), apply(copy.deepcopy(pretrained), LDUParam, target=r"0")):
        snapshot = Snapshot(target)
        with pytest.raises(ValueError, match=message):
            load_adapter(target, path)
        snapshot.assert_unchanged(target)


def test_rebuilt_metadata_that_is_not_a_list_is_refused(tmp_path):
    pretrained, path = _ldu_file(tmp_path)
    tensors, metadata = read_file(path)
    save_file(tensors, str(path), metadata={**metadata, REBUILT: json.dumps({"entries": []})})
    target = copy.deepcopy(pretrained)
    snapshot = Snapshot(target)
    with pytest.raises(ValueError, match="expected a list of rebuilt buffers, got dict"):
        load_adapter(target, path)
    snapshot.assert_unchanged(target)


def test_a_left_out_tensor_its_adapter_does_not_rebuild_is_refused(tmp_path):
    pretrained, path = _ldu_file(tmp_path)
    tensors, metadata = read_file(path)
    entries = json.loads(metadata[REBUILT])
    key = "0.parametrizations.weight.0.pivots"
    shape, fingerprint = list(tensors[key].shape), buffer_fingerprint(tensors[key])
    entries.append({**entries[0], "key": key, "shape": shape, "fingerprint": fingerprint})
    left_out = {name: value for name, value in tensors.items() if name != key}
    save_file(left_out, str(path), metadata={**metadata, REBUILT: json.dumps(entries)})
    with pytest.raises(ValueError, match="does not rebuild it"):
        load_adapter(copy.deepcopy(pretrained), path)


@pytest.mark.parametrize("factors", [False, True])
def test_an_adapted_model_whose_factors_differ(tmp_path, factors):
    """Factors built elsewhere with other signs: refused from a default file, replaced from a
    factors=True file (which restores the saved buffers, as files did before)."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Conv2d(4, 6, 3))
    model = apply(copy.deepcopy(pretrained), AtomParam, target=r"0")
    train_step(model, 0, torch.randn(2, 4, 5, 5))
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, factors=factors)
    fresh = apply(copy.deepcopy(pretrained), AtomParam, target=r"0")
    with torch.no_grad():
        fresh[0].parametrizations.weight[0].coeffs.neg_()
    if not factors:
        snapshot = Snapshot(fresh)
        message = r"'0.parametrizations.weight.0.coeffs' \(relative difference [0-9.]+ > 0.001\)"
        with pytest.raises(ValueError, match=message):
            load_adapter(fresh, path)
        snapshot.assert_unchanged(fresh)
        return
    load_adapter(fresh, path)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(fresh(x), model(x))


def test_factors_must_be_a_bool(tmp_path):
    model = apply(nn.Sequential(nn.Linear(8, 6)), LDUParam, target=r"0")
    with pytest.raises(TypeError, match="factors must be a bool"):
        save_adapter(model, tmp_path / "a.safetensors", factors="yes")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_16_bit_model_rebuilds_within_its_own_rounding(tmp_path):
    """Saved from bf16, loaded into the same bf16 weights: equal; into fp32: within bf16 rounding."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(32, 24)).to(torch.bfloat16)
    model = apply(copy.deepcopy(pretrained), SVDParam, target=r"0", mode="svfit")
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = load_adapter(copy.deepcopy(pretrained), path)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), model(x))
    wider = load_adapter(copy.deepcopy(pretrained).float(), path)
    torch.testing.assert_close(wider(x.float()), model(x).float(), rtol=0.05, atol=0.05)
