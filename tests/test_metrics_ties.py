"""bagcert.metrics with tied confidences: every metric depends only on the multiset of (confidence, correct) pairs.

Tie groups (samples of equal confidence) are handled as a whole: AURRA is the expectation over uniformly random
orders inside each group, and each calibration bin is credited its expected accuracy. The protocol's literal
definitions (stable sort: the input order breaks ties) are re-implemented below as references; without ties the
metrics must equal them.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bagcert.metrics import accuracy, aurra, calibration_error, response_rate_curve

# --- references: the protocol read literally (ties broken by input position) -------------------------------


def _positional_aurra(conf, corr):
    order = np.argsort(-np.asarray(conf, dtype=np.float64), kind="stable")
    hits = np.cumsum(np.asarray(corr, dtype=np.float64)[order])
    return float(np.mean(hits / np.arange(1, len(order) + 1)))


def _positional_calibration_error(conf, corr, bin_size, skip_last_bin=False):
    conf = np.asarray(conf, dtype=np.float64)
    corr = np.asarray(corr, dtype=np.float64)
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], corr[order]
    n = len(conf)
    n_bins = max(1, n // bin_size)
    bins = [[k * bin_size, (k + 1) * bin_size] for k in range(n_bins)]
    bins[-1][1] = n
    if skip_last_bin:
        bins = bins[:-1]
    return math.sqrt(sum((e - s) / n * (conf[s:e].mean() - corr[s:e].mean()) ** 2 for s, e in bins))


# --- strategies -----------------------------------------------------------------------------------------------

# few distinct values -> many ties, including 1.0 (saturated vote softmax) and both zeros
TIED = st.sampled_from([0.0, -0.0, 0.25, 0.5, 0.7, 1.0])
ANY = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def pairs_and_permutation(draw, max_size=60):
    n = draw(st.integers(1, max_size))
    conf = draw(st.lists(st.one_of(TIED, ANY), min_size=n, max_size=n))
    corr = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    perm = draw(st.permutations(range(n)))
    return conf, corr, list(perm)


# --- the examples of the definition -------------------------------------------------------------------------


def test_aurra_four_tied_two_right_is_one_half_in_any_order():
    # positional tie-breaking gave (1 + 1 + 2/3 + 1/2) / 4 = 0.792 and (0 + 0 + 1/3 + 1/2) / 4 = 0.208;
    # the expected accuracy at every response rate is 2/4
    assert _positional_aurra([0.5] * 4, [1, 1, 0, 0]) == pytest.approx(19 / 24)
    assert aurra([0.5] * 4, [1, 1, 0, 0]) == 0.5
    assert aurra([0.5] * 4, [0, 0, 1, 1]) == 0.5
    assert aurra([0.5] * 4, [0, 1, 0, 1]) == 0.5


def test_aurra_hand_computed_partial_tie():
    # 0.9 (right) above a tie of three at 0.5 with one right: s = 1, c = 1, m = 3, h = 1
    # k = 1: 1; k = 2: (1 + 1/3) / 2; k = 3: (1 + 2/3) / 3; k = 4: 2 / 4
    want = (1 + (4 / 3) / 2 + (5 / 3) / 3 + 0.5) / 4
    for corr_of_tie in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert aurra([0.9, 0.5, 0.5, 0.5], [1] + corr_of_tie) == pytest.approx(want, abs=1e-15)
    rates, acc = response_rate_curve([0.5, 0.9, 0.5, 0.5], [0, 1, 0, 1])
    assert rates.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert acc == pytest.approx([1, 2 / 3, 5 / 9, 0.5], abs=1e-15)


def test_response_rate_curve_at_group_boundaries_is_the_threshold_accuracy():
    # groups (descending): 0.8 x2 (1 right), 0.6 x3 (3 right), 0.1 x1 (wrong)
    conf = [0.6, 0.1, 0.8, 0.6, 0.8, 0.6]
    corr = [1, 0, 0, 1, 1, 1]
    rates, acc = response_rate_curve(conf, corr)
    assert acc[1] == 1 / 2  # answer when confidence >= 0.8
    assert acc[4] == 4 / 5  # >= 0.6
    assert acc[5] == 4 / 6  # all
    # inside the 0.6 group the expected hits grow linearly: 1 + j * 3/3
    assert acc[2] == pytest.approx(2 / 3) and acc[3] == pytest.approx(3 / 4)
    assert aurra(conf, corr) == float(np.mean(acc))


def test_calibration_error_hand_computed_tie_across_a_bin_boundary():
    # sorted: 0.2 (wrong) | tie of three at 0.5, one right; bin_size 2 -> bins [0, 2) and [2, 4).
    # Each 0.5 sample is credited 1/3. Bin 1: confidence 0.35, accuracy 1/6, gap 11/60.
    # Bin 2: confidence 0.5, accuracy 1/3, gap 10/60. Error sqrt((121 + 100) / 2 / 3600).
    want = math.sqrt(221 / 7200)
    for corr_of_tie in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert calibration_error([0.2, 0.5, 0.5, 0.5], [0] + corr_of_tie, bin_size=2) == pytest.approx(want, abs=1e-15)
    # the positional reading gave sqrt(0.13625) or sqrt(0.06125) depending on where the right answer stood
    assert _positional_calibration_error([0.2, 0.5, 0.5, 0.5], [0, 1, 0, 0], 2) == pytest.approx(math.sqrt(0.13625))
    assert _positional_calibration_error([0.2, 0.5, 0.5, 0.5], [0, 0, 0, 1], 2) == pytest.approx(math.sqrt(0.06125))
    # reference variant: bin 2 dropped, bin 1 weighted 2/4 of the full n
    assert calibration_error([0.2, 0.5, 0.5, 0.5], [0, 0, 1, 0], bin_size=2, skip_last_bin=True) == pytest.approx(
        math.sqrt(121 / 7200), abs=1e-15
    )


def test_calibration_error_saturated_votes_do_not_depend_on_order():
    # the shape of vote-count confidences: most samples exactly 1.0. 50 at 0.6 (30 right), 250 at 1.0 (200 right).
    # Bins of 100: [0, 100) = 50 x 0.6 + 50 x 1.0, then two bins of 1.0 (the last one the remainder).
    conf = [0.6] * 50 + [1.0] * 250
    right_first = [1] * 30 + [0] * 20 + [1] * 200 + [0] * 50
    spread = [1] * 30 + [0] * 20 + [0] * 25 + [1] * 200 + [0] * 25
    gap1 = 0.8 - (30 + 50 * 0.8) / 100  # mean confidence 0.8; the 1.0 samples are credited 200/250
    gap_rest = 1.0 - 0.8
    want = math.sqrt(100 / 300 * gap1**2 + 200 / 300 * gap_rest**2)
    assert calibration_error(conf, right_first, bin_size=100) == pytest.approx(want, abs=1e-15)
    assert calibration_error(conf, spread, bin_size=100) == calibration_error(conf, right_first, bin_size=100)
    ref = calibration_error(conf, spread, bin_size=100, skip_last_bin=True)
    assert ref == calibration_error(conf, right_first, bin_size=100, skip_last_bin=True)
    assert ref == pytest.approx(math.sqrt(100 / 300 * gap1**2 + 100 / 300 * gap_rest**2), abs=1e-15)
    assert _positional_calibration_error(conf, right_first, 100) != pytest.approx(
        _positional_calibration_error(conf, spread, 100)
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.sampled_from([0.0, 0.3, 1.0]), st.data())
def test_calibration_error_one_tie_group_is_its_gap_for_any_bins(n, bin_size, c, data):
    # every bin holds only the group, so every bin has its accuracy: error = |c - accuracy|
    corr = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    want = abs(c - sum(corr) / n)
    assert calibration_error([c] * n, corr, bin_size=bin_size) == pytest.approx(want, abs=1e-12)


# --- properties -------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(pairs_and_permutation(), st.integers(1, 25))
def test_every_metric_is_identical_under_permutation(case, bin_size):
    conf, corr, perm = case
    pconf, pcorr = [conf[i] for i in perm], [corr[i] for i in perm]
    assert aurra(pconf, pcorr) == aurra(conf, corr)
    for skip in (False, True):
        assert calibration_error(pconf, pcorr, bin_size, skip) == calibration_error(conf, corr, bin_size, skip)
    rates, acc = response_rate_curve(conf, corr)
    prates, pacc = response_rate_curve(pconf, pcorr)
    assert np.array_equal(rates, prates) and np.array_equal(acc, pacc)
    assert accuracy(pcorr, [1] * len(perm)) == accuracy(corr, [1] * len(perm))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_float32_tensors_with_saturated_confidences_are_permutation_invariant(n, seed):
    g = torch.Generator().manual_seed(seed)
    conf = torch.where(torch.rand(n, generator=g) < 0.7, torch.ones(n), torch.rand(n, generator=g))
    corr = torch.rand(n, generator=g) < 0.8
    perm = torch.randperm(n, generator=g)
    assert aurra(conf[perm], corr[perm]) == aurra(conf, corr)
    assert calibration_error(conf[perm], corr[perm], 10) == calibration_error(conf, corr, 10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.1, 0.5, 0.9]), st.integers(0, 1)), min_size=1, max_size=6))
def test_aurra_is_the_mean_over_all_orders_of_the_ties(pairs):
    # every permutation of the input, read positionally (stable sort), is one tie-breaking; all equally likely
    conf = [c for c, _ in pairs]
    corr = [k for _, k in pairs]
    perms = list(itertools.permutations(range(len(pairs))))
    expected = sum(_positional_aurra([conf[i] for i in p], [corr[i] for i in p]) for p in perms) / len(perms)
    assert aurra(conf, corr) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=80, unique=True), st.integers(1, 30), st.data())
def test_without_ties_the_protocol_values_are_unchanged(conf, bin_size, data):
    conf = [c + 0.0 for c in conf]
    if len(set(conf)) < len(conf):  # -0.0 and 0.0 drawn together: a tie
        return
    corr = data.draw(st.lists(st.integers(0, 1), min_size=len(conf), max_size=len(conf)))
    assert aurra(conf, corr) == pytest.approx(_positional_aurra(conf, corr), abs=1e-12)
    assert calibration_error(conf, corr, bin_size) == pytest.approx(_positional_calibration_error(conf, corr, bin_size), abs=1e-12)
    if len(conf) >= 2 * bin_size:
        assert calibration_error(conf, corr, bin_size, True) == pytest.approx(
            _positional_calibration_error(conf, corr, bin_size, True), abs=1e-12
        )


def test_negative_zero_ties_with_zero():
    a = calibration_error([0.0, -0.0, 0.5], [1, 0, 1], bin_size=1)
    b = calibration_error([-0.0, 0.0, 0.5], [1, 0, 1], bin_size=1)
    assert a == b == pytest.approx(math.sqrt((0.25 + 0.25 + 0.25) / 3))
    assert aurra([0.0, -0.0], [1, 0]) == aurra([-0.0, 0.0], [1, 0]) == 0.5
