"""Tests for bagcert.metrics: hand-computed values, input types, ranking extremes, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bagcert.metrics import accuracy, aurra, calibration_error

# --- accuracy -----------------------------------------------------------------------------------


def test_accuracy_hand_computed():
    # matches at positions 0, 2, 3 -> 3 / 5
    assert accuracy([1, 2, 3, 4, 5], [1, 0, 3, 4, 0]) == pytest.approx(0.6)
    assert accuracy(torch.tensor([7]), torch.tensor([7])) == 1.0
    assert accuracy(np.array([0, 1]), np.array([1, 0])) == 0.0
    assert isinstance(accuracy([1], [1]), float)


def test_accuracy_bad_input():
    with pytest.raises(ValueError, match="same length"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="1-D"):
        accuracy([[1, 2]], [[1, 2]])


# --- calibration error ----------------------------------------------------------------------------

# 5 samples, bin_size 2 -> 5 // 2 = 2 bins, the last one taking the remainder: sizes 2 and 3.
CONF5 = [0.9, 0.1, 0.6, 0.3, 0.8]
CORR5 = [1, 0, 0, 1, 1]
# sorted by confidence: 0.1(0) 0.3(1) | 0.6(0) 0.8(1) 0.9(1)
# bin 1: mean conf 0.2, accuracy 1/2, gap -0.3 -> weight 2/5 * 0.09 = 0.036
# bin 2: mean conf 2.3/3, accuracy 2/3, gap 0.1 -> weight 3/5 * 0.01 = 0.006
# all bins: sqrt(0.042); reference (last bin dropped, weights still of n = 5): sqrt(0.036)


def test_calibration_error_five_samples_bin_size_two():
    assert calibration_error(CONF5, CORR5, bin_size=2) == pytest.approx(math.sqrt(0.042))
    assert calibration_error(CONF5, CORR5, bin_size=2, skip_last_bin=True) == pytest.approx(math.sqrt(0.036))
    assert isinstance(calibration_error(CONF5, CORR5, bin_size=2), float)


def test_calibration_error_last_bin_takes_remainder():
    # n = 250, bin_size = 100 -> bins [0, 100) and [100, 250), not [0,100) [100,200) [200,250).
    # 100 samples at confidence 0.2, all wrong; then 150 at 0.8: 75 right, 75 wrong.
    # Bin 1: gap 0.2 -> 100/250 * 0.04 = 0.016.
    # Bin 2: accuracy 0.5, gap 0.3 -> 150/250 * 0.09 = 0.054. Total 0.070.
    # (Three bins would give 0.016 + 100/250 * 0.05**2 + 50/250 * 0.8**2 = 0.145.)
    conf = [0.2] * 100 + [0.8] * 150
    corr = [0] * 100 + [1] * 75 + [0] * 75
    assert calibration_error(conf, corr, bin_size=100) == pytest.approx(math.sqrt(0.070))
    assert calibration_error(conf, corr, bin_size=100, skip_last_bin=True) == pytest.approx(math.sqrt(0.016))


def test_calibration_error_fewer_samples_than_bin_size_is_one_bin():
    # one bin: mean confidence 0.6, accuracy 1 -> sqrt(1 * 0.4 ** 2) = 0.4
    assert calibration_error([0.5, 0.7], [1, 1], bin_size=100) == pytest.approx(0.4)
    # the reference variant drops the only bin -> nothing left: undefined, None (not 0.0)
    assert calibration_error([0.5, 0.7], [1, 1], bin_size=100, skip_last_bin=True) is None
    # n = 150, bin_size 100 -> still one bin (150 // 100 = 1)
    assert calibration_error([0.9] * 150, [0] * 150, bin_size=100, skip_last_bin=True) is None
    # n = 200 -> two bins, the first one kept: 100/200 * 0.9 ** 2
    assert calibration_error([0.9] * 200, [0] * 200, bin_size=100, skip_last_bin=True) == pytest.approx(math.sqrt(0.405))


def test_calibration_error_sorts_by_confidence():
    # the same samples in another order give the same bins
    perm = [3, 0, 4, 1, 2]
    conf = [CONF5[i] for i in perm]
    corr = [CORR5[i] for i in perm]
    assert calibration_error(conf, corr, bin_size=2) == pytest.approx(math.sqrt(0.042))


def test_calibration_error_perfect_and_worst():
    assert calibration_error([1.0, 0.0, 1.0], [1, 0, 1], bin_size=1) == 0.0
    assert calibration_error([1.0, 1.0], [0, 0], bin_size=1) == pytest.approx(1.0)
    # bin_size 1: every sample its own bin -> sqrt(mean((conf - correct)^2)) = sqrt((0.25 + 0.01) / 2)
    assert calibration_error([0.5, 0.9], [1, 1], bin_size=1) == pytest.approx(math.sqrt(0.13))


def test_calibration_error_tensor_numpy_list_identical():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(257, generator=g)
    corr = torch.rand(257, generator=g) < conf
    ref = calibration_error(conf.numpy(), corr.numpy(), bin_size=50)
    assert calibration_error(conf, corr, bin_size=50) == ref
    assert calibration_error(conf.tolist(), corr.tolist(), bin_size=50) == ref
    assert calibration_error(conf.double(), corr.long(), bin_size=50) == pytest.approx(ref, abs=1e-7)
    ref_skip = calibration_error(conf.numpy(), corr.numpy(), bin_size=50, skip_last_bin=True)
    assert calibration_error(conf, corr, bin_size=50, skip_last_bin=True) == ref_skip
    assert ref_skip <= ref  # dropping a non-negative term


def test_calibration_error_does_not_modify_inputs():
    conf = np.array(CONF5)
    corr = np.array(CORR5)
    calibration_error(conf, corr, bin_size=2)
    assert conf.tolist() == CONF5 and corr.tolist() == CORR5


@pytest.mark.parametrize(
    "conf, corr, kwargs, match",
    [
        ([0.5, 0.5], [1], {}, "same length"),
        ([], [], {}, "empty"),
        ([1.5, 0.5], [1, 0], {}, r"\[0, 1\]"),
        ([-0.1, 0.5], [1, 0], {}, r"\[0, 1\]"),
        ([float("nan"), 0.5], [1, 0], {}, "finite"),
        ([float("inf"), 0.5], [1, 0], {}, "finite"),
        ([0.5, 0.5], [2, 0], {}, "0/1"),
        ([0.5, 0.5], [1, 0], {"bin_size": 0}, "bin_size"),
        ([0.5, 0.5], [1, 0], {"bin_size": 2.5}, "bin_size"),
        ([[0.5]], [[1]], {}, "1-D"),
        (["a", "b"], [1, 0], {}, "numbers"),
    ],
)
def test_calibration_error_bad_input(conf, corr, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_error(conf, corr, **kwargs)


# --- AURRA ------------------------------------------------------------------------------------------


def test_aurra_hand_computed():
    # already in descending confidence; running accuracies 1/1, 1/2, 2/3, 2/4 -> mean 2/3
    assert aurra([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(2 / 3)
    # same samples shuffled: sorting restores the order above
    assert aurra([0.7, 0.6, 0.9, 0.8], [1, 0, 1, 0]) == pytest.approx(2 / 3)
    assert isinstance(aurra([0.5], [1]), float)


def test_aurra_perfectly_ranked_and_anti_ranked():
    conf = [0.9, 0.8, 0.7, 0.6]
    # right ones first: 1, 1, 2/3, 2/4 -> (1 + 1 + 2/3 + 1/2) / 4 = 19/24
    assert aurra(conf, [1, 1, 0, 0]) == pytest.approx(19 / 24)
    # wrong ones first: 0, 0, 1/3, 2/4 -> (1/3 + 1/2) / 4 = 5/24
    assert aurra(conf, [0, 0, 1, 1]) == pytest.approx(5 / 24)
    assert aurra(conf, [1, 1, 1, 1]) == 1.0
    assert aurra(conf, [0, 0, 0, 0]) == 0.0


def test_aurra_ties_do_not_depend_on_given_order():
    # equal confidences: expected accuracy under a random order of the tie group, 1/2 at k = 1 and k = 2
    assert aurra([0.5, 0.5], [0, 1]) == 0.5
    assert aurra([0.5, 0.5], [1, 0]) == 0.5


def test_aurra_only_order_matters():
    assert aurra([10.0, -3.0, 2.0], [1, 0, 0]) == aurra([0.9, 0.1, 0.5], [1, 0, 0])


def test_aurra_tensor_numpy_list_identical():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(100, generator=g)
    corr = torch.rand(100, generator=g) < 0.5
    ref = aurra(conf.numpy(), corr.numpy())
    assert aurra(conf, corr) == ref
    assert aurra(conf.tolist(), corr.tolist()) == ref


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_aurra_bounded_by_perfect_and_anti_ranking(correct, rnd):
    n = len(correct)
    k = sum(correct)
    conf = [rnd.random() for _ in range(n)]
    best = aurra(list(range(n, 0, -1)), sorted(correct, reverse=True))  # right ones first
    worst = aurra(list(range(n, 0, -1)), sorted(correct))  # wrong ones first
    value = aurra(conf, correct)
    assert worst - 1e-12 <= value <= best + 1e-12
    assert 0.0 <= value <= 1.0
    if k in (0, n):
        assert value == pytest.approx(k / n)


@pytest.mark.parametrize(
    "conf, corr, match",
    [
        ([0.5, 0.5], [1], "same length"),
        ([], [], "empty"),
        ([float("nan")], [1], "finite"),
        ([0.5], [0.5], "0/1"),
    ],
)
def test_aurra_bad_input(conf, corr, match):
    with pytest.raises(ValueError, match=match):
        aurra(conf, corr)
