"""Soundness and exactness of the BagCert certificate, checked against brute force."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bagcert
from bagcert.aggregation import get_aggregation
from bagcert.certification import certify_logits
from bagcert.geometry import Geometry


def brute_force(local_logits, geometry, image_size, patch, aggregation="votes"):
    """Enumerate every patch position and target class; set the affected locations to the worst case.

    Returns (prediction, broken, margin): ``broken[n]`` is True if some position and class make the
    prediction change (argmax with ties to the lower index); ``margin[n]`` is the smallest
    score_pred - score_c after the pairwise worst-case attack.
    """
    agg = get_aggregation(aggregation)
    scores = agg.local_scores(local_logits.double() if not agg.exact_integer else local_logits)
    N, C, h, w = scores.shape
    pred = scores.sum((2, 3)).argmax(1)
    H, W = image_size
    ph, pw = patch
    broken = torch.zeros(N, dtype=torch.bool)
    margin = torch.full((N,), float("inf"), dtype=torch.float64)
    for top, left in itertools.product(range(H - ph + 1), range(W - pw + 1)):
        mask = geometry.affected_mask(image_size, patch, top, left)
        for n in range(N):
            y = int(pred[n])
            for c in range(C):
                if c == y:
                    continue
                s = scores[n].clone().double()
                # worst case for the pair (y, c): every affected location scores low for y, high for c
                # and low for every other class (the strongest attack towards c)
                s[:, mask] = agg.low
                s[c, mask] = agg.high
                tot = s.sum((1, 2))
                margin[n] = min(margin[n], float(tot[y] - tot[c]))
                if int(tot.argmax()) != y:
                    broken[n] = True
    return pred, broken, margin


geometries = st.sampled_from(
    [
        Geometry.from_layers([(1, 1, 0)]),  # receptive field 1
        Geometry.from_layers([(3, 1, 1)]),  # rf 3, same padding
        Geometry.from_layers([(3, 1, 0)]),  # rf 3, unpadded: border pixels seen by fewer locations
        Geometry.from_layers([(3, 2, 1), (3, 1, 1)]),  # rf 7, stride 2
        Geometry.from_layers([(2, 2, 0), (1, 1, 0)]),  # stride 2, unpadded
        Geometry.from_layers([(3, 1, 0), (3, 2, 0)]),  # rf 5 stride 2 unpadded (BagNet-like crop at the end)
    ]
)


@settings(max_examples=40, deadline=None)
@given(
    geometry=geometries,
    H=st.integers(5, 9),
    W=st.integers(5, 9),
    ph=st.integers(1, 4),
    pw=st.integers(1, 4),
    C=st.integers(2, 4),
    aggregation=st.sampled_from(["votes", "majority", "clipped"]),
    seed=st.integers(0, 10_000),
)
def test_certificate_matches_brute_force(geometry, H, W, ph, pw, C, aggregation, seed):
    h, w = geometry.grid_size(H, W)
    if h < 1 or w < 1:
        return
    g = torch.Generator().manual_seed(seed)
    N = 3
    # logits biased so that some samples are robust and some are not
    logits = torch.randn(N, C, h, w, generator=g) + torch.linspace(1.5, -1.0, C).view(1, C, 1, 1) * torch.rand(N, 1, 1, 1, generator=g) * 2
    res = certify_logits(logits, None, geometry, (H, W), (ph, pw), aggregation=aggregation)
    pred, broken, margin = brute_force(logits, geometry, (H, W), (ph, pw), aggregation)
    assert torch.equal(res.prediction, pred)
    # soundness: nothing certified is ever broken
    assert not (res.certified & broken).any()
    # exactness: the fast margin equals the brute-force pairwise worst case
    assert torch.allclose(res.margin.double(), margin, atol=1e-6)
    # and the certificate is exactly "pairwise worst-case margin > 0"
    assert torch.equal(res.certified, margin > (1e-9 * max(1.0, h * w * 2) if aggregation == "clipped" else 0))


def test_hand_computed_votes_example():
    # 4x4 grid, receptive field 1: class 0 votes everywhere (16), class 1 at two locations (2)
    geometry = Geometry.from_layers([(1, 1, 0)])
    logits = -torch.ones(1, 2, 4, 4)
    logits[0, 0] = 1.0
    logits[0, 1, 0, 0] = 1.0
    logits[0, 1, 3, 3] = 1.0
    res = certify_logits(logits, torch.tensor([0]), geometry, (4, 4), patch_sizes=[1, 2, 3, 4, (1, 4)])
    # margin = (16 - 2) - (W0 - W1) - |R|, worst window avoids the class-1 votes
    assert res[1].margin.item() == 14 - 1 - 1
    assert res[2].margin.item() == 14 - 4 - 4
    assert res[3].margin.item() == 14 - 9 - 9
    assert res[4].margin.item() == 14 - 14 - 16
    assert res[(1, 4)].margin.item() == 14 - 4 - 4
    assert [res[k].certified.item() for k in (1, 2, 3, 4, (1, 4))] == [True, True, False, False, True]
    assert res[1].certified_accuracy == 1.0 and res[4].certified_accuracy == 0.0


def test_ties_are_never_certified():
    geometry = Geometry.from_layers([(1, 1, 0)])
    logits = -torch.ones(1, 2, 4, 4)
    logits[0, 0, :2] = 1.0  # class 0: 8 votes
    logits[0, 1, 2:] = 1.0  # class 1: 8 votes -> tie, prediction 0 (lower index)
    res = certify_logits(logits, torch.tensor([0]), geometry, (4, 4), 1)
    assert res.prediction.item() == 0 and res.correct.item()
    assert not res.certified.item()


def test_empty_affected_set_for_unseen_border_pixels():
    # BagNet-style unpadded geometry: rf 3, stride 2 on a 8-pixel image -> locations see [0,2],[2,4],[4,6]
    geometry = Geometry.from_layers([(3, 2, 0)])
    assert geometry.grid_size(8, 8) == (3, 3)
    mask = geometry.affected_mask((8, 8), 1, 7, 7)  # pixel 7 is seen by no location
    assert not mask.any()
    mask = geometry.affected_mask((8, 8), 1, 2, 2)  # pixel 2 is seen by locations 0 and 1
    assert mask.sum() == 4


def test_worst_position_points_at_minimum():
    geometry = Geometry.from_layers([(3, 1, 1)])
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 3, 8, 8, generator=g) + 0.8
    res = certify_logits(logits, None, geometry, (8, 8), (2, 3), return_position_margins=True)
    assert res.position_margins.shape == (5, 7, 6)
    flat_min = res.position_margins.flatten(1).min(1).values
    assert torch.equal(flat_min, res.margin)
    for n in range(5):
        r, c = res.worst_position[n].tolist()
        assert res.position_margins[n, r, c] == res.margin[n]


def test_multi_size_equals_single_size_calls():
    model = bagcert.create_model("cifar_bagnet5", num_classes=10, width=16).eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6)
    multi = bagcert.certify(model, x, y, patch_sizes=[1, 5, (3, 7)])
    for key in (1, 5, (3, 7)):
        single = bagcert.certify(model, x, y, patch_size=key)
        assert torch.equal(single.certified, multi[key].certified)
        assert torch.equal(single.margin, multi[key].margin)


def test_certified_prediction_survives_worst_case_on_real_model():
    """Feature-space worst case on a real model's logits: certified samples keep their prediction."""
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet7_s2", num_classes=4, width=16).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([3.0, -1.0, -1.0, -1.0]))  # make many samples robust
    x = torch.rand(4, 3, 32, 32)
    logits = model.local_logits(x)
    res = certify_logits(logits, None, model.geometry, (32, 32), 5)
    assert res.certified.any()
    pred, broken, _ = brute_force(logits, model.geometry, (32, 32), (5, 5))
    assert not (res.certified & broken).any()


def test_certify_requires_eval_mode():
    model = bagcert.create_model("cifar_bagnet5", width=8)
    with pytest.raises(RuntimeError, match="eval"):
        bagcert.certify(model, torch.rand(1, 3, 32, 32), None, 5)


@pytest.mark.parametrize("bad", [0, -3, (0, 2), "0x3", 33, (5, 40)])
def test_bad_patch_sizes(bad):
    model = bagcert.create_model("cifar_bagnet5", width=8).eval()
    with pytest.raises(ValueError, match="patch"):
        bagcert.certify(model, torch.rand(1, 3, 32, 32), None, bad)


def test_labels_out_of_range():
    model = bagcert.create_model("cifar_bagnet5", width=8).eval()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        bagcert.certify(model, torch.rand(2, 3, 32, 32), torch.tensor([0, 10]), 5)
    with pytest.raises(ValueError, match="labels"):
        bagcert.certify(model, torch.rand(2, 3, 32, 32), torch.tensor([0]), 5)


def test_certify_logits_rejects_mismatched_map():
    geometry = Geometry.from_layers([(3, 1, 1)])
    with pytest.raises(ValueError, match="do not belong together"):
        certify_logits(torch.randn(1, 2, 7, 8), None, geometry, (8, 8), 2)
    with pytest.raises(ValueError, match="NaN"):
        certify_logits(torch.full((1, 2, 8, 8), float("nan")), None, geometry, (8, 8), 2)


def test_window_table_is_cached_and_matches_the_geometry():
    from bagcert.certification import window_table

    g = bagcert.create_model("cifar_bagnet5_s2").geometry
    a = window_table(g, (32, 32), (5, 5))
    assert window_table(g, (32, 32), (5, 5)) is a  # built once per key
    rows, cols = g.affected_ranges((32, 32), (5, 5))
    # every pixel position maps to its distinct range, and first_row is the first position giving it
    assert torch.equal(a.rows[a.inv_rows], rows) and torch.equal(a.cols[a.inv_cols], cols)
    for u, first in enumerate(a.first_row.tolist()):
        assert int((a.inv_rows == u).nonzero()[0]) == first


def test_check_finite_false_never_certifies_a_non_finite_sample():
    g = bagcert.create_model("cifar_bagnet5_s2").geometry
    z = torch.zeros(3, 10, 16, 16)
    z[:, 4] = 5.0  # every location votes for class 4: certified against small patches
    bad = z.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        bagcert.certify_logits(bad, None, g, (32, 32), patch_size=2)
    ok = bagcert.certify_logits(z, None, g, (32, 32), patch_size=2)
    res = bagcert.certify_logits(bad, None, g, (32, 32), patch_size=2, check_finite=False)
    assert ok.certified.tolist() == [True, True, True]
    assert res.certified.tolist() == [True, False, True]
