"""The comparison rule every kernel test uses (tests/_utils.assert_close_to_ref) fails when
it should: a helper that passes anything would make every test that uses it unable to fail."""
import pytest
import torch

from tests._utils import assert_close_to_ref


def test_low_precision_rule_bounds_by_torch_error_and_refuses_an_overflowed_reference():
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    lowp = ref.half()
    assert_close_to_ref(ref.half(), ref, lowp)
    with pytest.raises(AssertionError, match="error"):
        assert_close_to_ref(torch.tensor([1.0, 2.5, 3.0]).half(), ref, lowp)
    # torch's fp16 result overflows: the bound would be infinite and pass anything
    big = torch.tensor([1.0, 2.0, 7e4], dtype=torch.float64)
    with pytest.raises(AssertionError, match="not finite"):
        assert_close_to_ref(torch.tensor([5.0, -3.0, 6e4]).half(), big, big.half())


def test_non_finite_values_must_match_the_reference_and_the_rest_is_measured():
    ref = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0], dtype=torch.float64)
    assert_close_to_ref(ref.float(), ref)
    for bad in ([float("-inf"), float("-inf"), float("nan"), 1.0],   # wrong sign
                [float("inf"), float("-inf"), 0.0, 1.0],             # NaN lost
                [float("inf"), float("-inf"), float("nan"), 1.5]):   # finite part off
        with pytest.raises(AssertionError):
            assert_close_to_ref(torch.tensor(bad), ref)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_ref(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]).double())
