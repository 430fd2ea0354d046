"""The shared validation layer: every public function reports bad input through these."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from decomp import _checks, _sides


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([1.0, 2.0], TypeError, "x must be a torch.Tensor, got list"),
        (torch.ones(3, dtype=torch.int64), TypeError, "real floating dtype"),
        (torch.ones(3, dtype=torch.complex64), TypeError, "real floating dtype"),
        (torch.ones(3), ValueError, r"ndim >= 2, got shape \(3,\)"),
        (torch.ones(0, 3), ValueError, "must not be empty"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or Inf"),
    ],
)
def test_check_tensor_rejects(value, error, match):
    with pytest.raises(error, match=match):
        _checks.check_tensor(value, "x", min_ndim=2)


def test_check_tensor_max_ndim_and_skip_finite():
    with pytest.raises(ValueError, match=r"ndim in \[3, 5\]"):
        _checks.check_tensor(torch.ones(2, 2), "W", min_ndim=3, max_ndim=5)
    nan = torch.full((2, 2), float("nan"))
    assert _checks.check_tensor(nan, "x", min_ndim=2, check_finite=False) is nan


def test_finiteness_check_does_not_mistake_an_overflowing_sum_for_inf():
    huge = torch.full((4, 4), 3e38)  # finite, but its sum overflows float32
    assert _checks.check_tensor(huge, "x") is huge
    huge[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        _checks.check_tensor(huge, "x")


def test_finiteness_check_sums_half_inputs_in_float32():
    big = torch.full((64, 64), 6e4, dtype=torch.float16)  # finite, sum far beyond float16's range
    assert _checks.check_tensor(big, "x") is big


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    assert _checks.compute_dtype(dtype) is torch.float32
    assert _checks.to_compute(torch.ones(2, dtype=dtype)).dtype is torch.float32


def test_full_precision_inputs_are_not_copied():
    x = torch.ones(2, dtype=torch.float64)
    assert _checks.to_compute(x) is x


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, r"rank must be in \[1, 4\], got 0"),
        (5, ValueError, r"rank must be in \[1, 4\], got 5"),
        (2.0, TypeError, "rank must be an int, got float"),
        (True, TypeError, "rank must be an int, got bool"),
    ],
)
def test_check_rank_rejects(value, error, match):
    with pytest.raises(error, match=match):
        _checks.check_rank(value, "rank", 4)


def test_check_rank_accepts_numpy_and_torch_free_ints():
    import numpy as np

    assert _checks.check_rank(np.int64(3), "rank", 4) == 3


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_check_fraction_rejects(value):
    with pytest.raises(ValueError, match=r"energy must be a float in \(0, 1\]"):
        _checks.check_fraction(value, "energy")


def test_check_choice_and_generator():
    with pytest.raises(ValueError, match=r"method must be one of \['a', 'b'\], got 'c'"):
        _checks.check_choice("c", "method", ("a", "b"))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        _checks.check_generator(0)


def test_randn_is_reproducible_from_a_generator():
    def draw():
        generator = torch.Generator().manual_seed(7)
        return _checks.randn((3, 2), dtype=torch.float32, device=torch.device("cpu"), generator=generator)

    assert torch.equal(draw(), draw())


@pytest.mark.parametrize(
    ("value", "bounds", "error", "match"),
    [
        (0.0, {"low": 0.0}, ValueError, r"alpha must be a float > 0, got 0.0"),
        (float("inf"), {"low": 0.0}, ValueError, r"alpha must be a float > 0, got inf"),
        (float("nan"), {}, ValueError, r"alpha must be a finite float, got nan"),
        (1.0, {"low": 0.0, "high": 1.0, "low_inclusive": True}, ValueError, r"must be a float in \[0, 1\), got 1.0"),
        (2.0, {"high": 1.0, "high_inclusive": True}, ValueError, r"alpha must be a float <= 1, got 2.0"),
        ("1", {}, TypeError, r"alpha must be a finite float, got str"),
        (True, {"low": 0.0}, TypeError, r"alpha must be a float > 0, got bool"),
    ],
)
def test_check_real_rejects(value, bounds, error, match):
    with pytest.raises(error, match=match):
        _checks.check_real(value, "alpha", **bounds)


def test_check_real_accepts_inclusive_bounds_and_returns_float():
    assert _checks.check_real(0, "sparsity", low=0.0, high=1.0, low_inclusive=True) == 0.0
    assert isinstance(_checks.check_real(3, "scale"), float)


# Every public decomposition, called on a small valid input with extra keyword arguments.
def _entry_points():
    from decomp import atoms, dct, idct, kpsvd, ldu, rsvd, tucker

    return {
        "rsvd": lambda **kw: rsvd(torch.randn(6, 4), 2, **kw),
        "tucker": lambda **kw: tucker(torch.randn(4, 3, 2), 2, **kw),
        "kpsvd": lambda **kw: kpsvd(torch.randn(6, 6), (2, 3), (3, 2), 1, **kw),
        "ldu": lambda **kw: ldu(torch.randn(4, 4), **kw),
        "atoms": lambda **kw: atoms(torch.randn(2, 2, 3, 3), 2, **kw),
        "dct": lambda **kw: dct(torch.randn(4, 8), **kw),
        "idct": lambda **kw: idct(torch.randn(4, 8), **kw),
    }


@pytest.mark.parametrize("name", sorted(_entry_points()))
@pytest.mark.parametrize(
    "flag, shown", [(0, "int"), ("no", "str"), (None, "NoneType"), ("np.bool_", "numpy.bool")]
)
def test_check_finite_must_be_a_bool_everywhere(name, flag, shown):
    """Regression: ``check_finite=0`` or ``"no"`` was truth-tested (``"no"`` meant checking);
    numpy's bool is refused with a name that is not the builtin's."""
    import numpy as np

    value = np.bool_(False) if flag == "np.bool_" else flag
    with pytest.raises(TypeError, match=rf"check_finite must be a bool, got {shown}$"):
        _entry_points()[name](check_finite=value)
    _entry_points()[name](check_finite=False)


def test_numpy_arrays_of_options_are_sequences():
    """Regression: ``tucker(T, np.array([2, 2, 2]))``, ``modes=np.arange(2)`` and
    ``kpsvd(A, np.array([2, 3]), ...)`` were refused while numpy scalars were accepted."""
    import numpy as np

    from decomp import kpsvd, tucker

    T = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    expected = tucker(T, (2, 2), modes=(0, 1))
    result = tucker(T, np.array([2, 2]), modes=np.arange(2))
    assert result.modes == (0, 1) and all(type(mode) is int for mode in result.modes)
    torch.testing.assert_close(result.core, expected.core, rtol=0, atol=0)
    assert tucker(T, np.array([0.9, 1.0, 1.0])).core.shape[1:] == (3, 2)
    A = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        kpsvd(A, np.array([2, 3]), np.array([3, 2]), np.int64(1)).S,
        kpsvd(A, (2, 3), (3, 2), 1).S,
    )
    assert _checks.as_sequence(np.array([4, 2]), "ranks") == (4, 2)
    assert _checks.as_sequence("ab", "ranks") is None
    with pytest.raises(TypeError, match=r"ranks must be a 1-D sequence, got a numpy array of"):
        tucker(T, np.array([[2, 2, 2]]))
    with pytest.raises(TypeError, match="ranks must be an int, a float or a sequence .* Tensor"):
        tucker(T, torch.tensor([2, 2, 2]))
    with pytest.raises(TypeError, match=r"b_shape\[0\] must be an int, got float"):
        kpsvd(A, np.array([2.0, 3.0]), (3, 2), 1)


@given(rows=st.integers(0, 64), cols=st.integers(0, 64), smaller=st.sampled_from(["cols", "rows"]))
def test_the_side_rule_puts_the_smaller_side_where_asked_and_leaves_ties(rows, cols, smaller):
    transposed = _sides.transposes(rows, cols, smaller)
    oriented = (cols, rows) if transposed else (rows, cols)
    axis = 1 if smaller == "cols" else 0
    assert oriented[axis] == min(rows, cols)
    # transposing only when needed: a square matrix, or one already oriented, stays as it is
    assert transposed == ((rows, cols)[axis] > min(rows, cols))


def test_the_side_rule_rejects_an_unknown_side():
    with pytest.raises(ValueError, match="smaller must be 'cols' or 'rows', got 'left'"):
        _sides.transposes(2, 3, "left")
