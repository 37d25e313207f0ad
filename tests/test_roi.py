"""Region of Importance / Region of Attack, binarisation, neutralisation and IoU (bagcert.analysis.roi)."""

import pytest
import torch
from torch import nn

import bagcert
from bagcert.analysis import (
    binarize_top_q,
    evaluate_neutralization,
    iou,
    iou_across_q,
    neutralize,
    occlusion_roi,
    roa_from_gradient,
    roa_from_perturbation,
    roi_from_local_logits,
    upsample_local_map,
)
from bagcert.geometry import Geometry


def rand_images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- RoI from local logits --------------------------------------------------------------------
# receptive field 3, stride 2, padding 1 on a 6x6 image: 3x3 locations; location i sees pixels
# [2i - 1, 2i + 1] clipped, i.e. rows {0,1}, {1,2,3}, {3,4,5}. Pixel row p is seen by locations
# I(p) = {0}, {0,1}, {1}, {1,2}, {2}, {2} for p = 0..5.
GEO = Geometry.from_layers([(3, 2, 1)])
LOCAL = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]])  # L[i, j] = 3 i + j + 1
MEAN_I = [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
MAX_I = [0, 1, 1, 2, 2, 2]


def test_geometry_of_the_crafted_example():
    assert GEO.grid_size(6, 6) == (3, 3)
    assert [GEO.pixel_box(i, 0, (6, 6))[0::2] for i in range(3)] == [(0, 1), (1, 3), (3, 5)]


def test_local_logit_roi_mean_equals_hand_computed_upsampling():
    out = upsample_local_map(LOCAL, GEO, (6, 6), reduce="mean")
    # L is affine in (i, j), so the mean over I(p) x J(q) is 3 mean(I(p)) + mean(J(q)) + 1
    expected = torch.tensor([[3 * MEAN_I[p] + MEAN_I[q] + 1 for q in range(6)] for p in range(6)])
    assert torch.allclose(out[0], expected)
    assert out[0, 0, 0] == 1.0                       # only location (0, 0)
    assert out[0, 1, 1] == pytest.approx(3.0)        # mean of 1, 2, 4, 5
    assert out[0, 3, 1] == pytest.approx((4 + 5 + 7 + 8) / 4)


def test_local_logit_roi_max_equals_hand_computed_upsampling():
    out = upsample_local_map(LOCAL, GEO, (6, 6), reduce="max")
    expected = torch.tensor([[3.0 * MAX_I[p] + MAX_I[q] + 1 for q in range(6)] for p in range(6)])
    assert torch.equal(out[0], expected)


def test_pixels_seen_by_no_location_get_the_smallest_value():
    geo = Geometry.from_layers([(3, 3, 0)])  # 8 px: locations see [0, 2] and [3, 5]; 6 and 7 unseen
    lm = torch.tensor([[[5.0, 2.0], [3.0, 4.0]]])
    out = upsample_local_map(lm, geo, (8, 8))
    assert out[0, 0, 0] == 5.0 and out[0, 4, 4] == 4.0
    assert bool((out[0, 6:, :] == 2.0).all()) and bool((out[0, :, 6:] == 2.0).all())


def test_roi_from_a_model_uses_the_predicted_class_map():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=4, width=8).eval()
    x = rand_images(2)
    roi, target = roi_from_local_logits(model, x)
    with torch.no_grad():
        assert torch.equal(target, model(x).argmax(1))
        local = model.local_logits(x)
    chosen = local[torch.arange(2), target]
    assert roi.shape == (2, 32, 32)
    assert torch.allclose(roi, upsample_local_map(chosen, model.geometry, (32, 32)))
    roi3, t3 = roi_from_local_logits(model, x, target=torch.tensor([3, 3]))
    assert torch.allclose(roi3, upsample_local_map(local[:, 3], model.geometry, (32, 32)))


# --- occlusion RoI ----------------------------------------------------------------------------------
class RegionModel(nn.Module):
    """Class 0's logit is 10 x the mean of channel 0 over rows/cols 12..19; class 1's is constant."""

    def forward(self, x):
        s = x[:, 0, 12:20, 12:20].mean(dim=(1, 2))
        return torch.stack([10 * s, torch.full_like(s, 1.0)], dim=1)


def test_occlusion_roi_highlights_the_decisive_region():
    x = torch.full((1, 3, 32, 32), 0.5)
    roi, target = occlusion_roi(RegionModel(), x, window=4, stride=4, fill=0.0)
    assert target.tolist() == [0]
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[12:20, 12:20] = True
    # windows tile the image exactly: a pixel's drop is its window's, positive iff that window is in the region
    assert bool((roi[0][region] > 0).all()) and bool((roi[0][~region] == 0).all())
    top = binarize_top_q(roi, 100 * 64 / 1024)  # exactly as many pixels as the region
    assert torch.equal(top[0], region)


# --- RoA -------------------------------------------------------------------------------------------
def test_roa_from_perturbation_and_box_filter():
    x = rand_images(1, 8)
    adv = x.clone()
    adv[0, :, 2:4, 2:4] = (adv[0, :, 2:4, 2:4] + 0.3).clamp(max=1.0)
    raw = roa_from_perturbation(x, adv, box=1)
    assert torch.allclose(raw[0], (adv - x).abs().sum(1)[0])
    changed = torch.zeros(8, 8, dtype=torch.bool)
    changed[2:4, 2:4] = True
    assert torch.equal(raw[0] > 0, changed)
    boxed = roa_from_perturbation(x, adv, box=3)
    dilated = torch.zeros(8, 8, dtype=torch.bool)
    dilated[1:5, 1:5] = True
    assert torch.equal(boxed[0] > 0, dilated)
    assert boxed[0, 0, 0] == 0 and boxed[0, 2, 2] == pytest.approx(float(raw[0, 1:4, 1:4].sum()) / 9)
    with pytest.raises(ValueError, match="odd"):
        roa_from_perturbation(x, adv, box=2)


def test_roa_from_gradient_is_zero_where_the_model_does_not_look():
    roa = roa_from_gradient(RegionModel(), torch.full((1, 3, 32, 32), 0.5), torch.tensor([1]), box=1)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[12:20, 12:20] = True
    assert bool((roa[0][region] > 0).all()) and bool((roa[0][~region] == 0).all())


# --- binarisation, neutralisation, IoU -----------------------------------------------------------
@pytest.mark.parametrize("q,k", [(25, 256), (10, 102), (0.05, 1), (0, 0), (100, 1024), (50, 512)])
def test_binarize_keeps_exactly_q_percent_even_with_ties(q, k):
    maps = torch.randint(0, 4, (3, 32, 32), generator=torch.Generator().manual_seed(0)).float()  # many ties
    m = binarize_top_q(maps, q)
    assert m.dtype == torch.bool and m.flatten(1).sum(1).tolist() == [k] * 3
    for i in range(3):  # every kept pixel is at least as important as every dropped one
        if 0 < k < 1024:
            assert float(maps[i][m[i]].min()) >= float(maps[i][~m[i]].max())


def test_binarize_tie_handling_is_by_row_major_index():
    flat = torch.zeros(1, 4, 4)
    m = binarize_top_q(flat, 25)  # 4 of 16 equal pixels: the first row
    assert m[0, 0].all() and int(m.sum()) == 4
    maps = torch.tensor([[[1.0, 2.0], [2.0, 0.0]]])
    assert binarize_top_q(maps, 25)[0].tolist() == [[False, True], [False, False]]  # tie 2 vs 2: lower index
    assert binarize_top_q(maps, 75, positive_only=True)[0].tolist() == [[True, True], [True, False]]
    assert int(binarize_top_q(maps, 100, positive_only=True).sum()) == 3  # the zero pixel is never kept
    with pytest.raises(ValueError, match="percentage"):
        binarize_top_q(maps, 120)


@pytest.mark.parametrize("fill", ["zero", "mean", "blur", 0.25])
def test_neutralize_changes_only_roa_minus_roi(fill):
    x = rand_images(2, 8, seed=5)
    roa = torch.zeros(2, 8, 8, dtype=torch.bool)
    roa[:, 2:6, 2:6] = True
    roi = torch.zeros(2, 8, 8, dtype=torch.bool)
    roi[:, 4:8, 4:8] = True
    out = neutralize(x, roi, roa, fill)
    region = roa & ~roi  # 16 - 4 = 12 pixels
    assert int(region[0].sum()) == 12
    r = region.unsqueeze(1).expand_as(x)
    assert torch.equal(out[~r], x[~r])
    if fill == "zero":
        assert bool((out[r] == 0).all())
    elif fill == "mean":
        means = x.mean(dim=(2, 3))
        assert torch.allclose(out[0, :, 2, 2], means[0]) and torch.allclose(out[1, :, 3, 5], means[1])
    elif fill == 0.25:
        assert bool((out[r] == 0.25).all())
    else:
        assert not torch.equal(out[r], x[r])


def test_iou_hand_computed():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, 0:2] = True  # rows 0-1: 8 pixels
    b[0, 1:3] = True  # rows 1-2: 8 pixels; intersection row 1 (4), union rows 0-2 (12)
    a[1, 0, 0] = True
    b[1, 3, 3] = True  # disjoint
    # image 2: both empty -> 1 by definition
    assert iou(a, b).tolist() == pytest.approx([4 / 12, 0.0, 1.0])
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    assert iou_across_q(maps, maps, [5, 50]) == {5.0: 1.0, 50.0: 1.0}
    assert iou_across_q(maps, -maps, [50]) == {50.0: 0.0}


def test_evaluate_neutralization_smoke_and_consistency():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=4, width=8).eval()
    data = bagcert.data.synthetic_dataset(6, 4, 32, seed=0)
    res = evaluate_neutralization(model, data.images, data.labels, steps=2, qs=(5, 50), keep=2, seed=0)
    ex = res.pop("examples")
    with torch.no_grad():
        direct = float((model(data.float_images()).argmax(1) == data.labels).float().mean())
    assert res["clean_accuracy"] == pytest.approx(direct)
    assert res["roi_method"] == "local" and set(res["iou_oracle"]) == {"5.0", "50.0"}
    for k in ("adversarial_accuracy", "neutralized_accuracy_oracle", "neutralized_accuracy_gradient", "neutralized_clean_accuracy"):
        assert 0.0 <= res[k] <= 1.0
    assert ex["x"].shape == (2, 3, 32, 32) and ex["roi_clean"].shape == (2, 32, 32)
    # the oracle RoA of a 5x5 patch attack lies within the box-filtered 7x7 square
    assert int((ex["roa_oracle"][0] > 0).sum()) <= 49
    occ = evaluate_neutralization(model, data.images[:2], data.labels[:2], attack="pgd", steps=1, roi_method="occlusion",
                                  occlusion_window=8, occlusion_stride=8, qs=(10,))
    assert occ["roi_method"] == "occlusion" and occ["attack"]["kind"] == "pgd"


# --- review regressions ------------------------------------------------------------------------------
@pytest.mark.parametrize("q,n,k", [(64.6, 250, 162), (9.2, 375, 35), (0.7, 50, 0), (12.5, 4, 1)])
def test_binarize_count_is_rounded_half_up_exactly_for_decimal_q(q, n, k):
    # q n / 100 = 161.5 and 34.5 exactly: float arithmetic gave 161.4999... and kept one pixel too few
    maps = torch.arange(n, dtype=torch.float32).view(1, 1, n)
    assert int(binarize_top_q(maps, q).sum()) == k


def test_roi_from_local_logits_does_not_touch_a_training_model():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=4, width=8)
    x = rand_images(3)
    model.eval()
    expected, _ = roi_from_local_logits(model, x)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    roi, _ = roi_from_local_logits(model, x)
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no BatchNorm statistics updated
    assert torch.allclose(roi, expected)  # the RoI of the model in eval mode, not of batch statistics


def test_upsample_rejects_a_map_that_does_not_match_the_geometry():
    with pytest.raises(ValueError, match="grid"):
        upsample_local_map(torch.zeros(1, 4, 4), GEO, (6, 6))


def test_neutralize_rejects_a_non_positive_blur_sigma():
    x = rand_images(1, 8)
    m = torch.ones(1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="sigma"):
        neutralize(x, ~m, m, "blur", blur_sigma=0.0)


def test_evaluate_neutralization_rejects_empty_input_and_bad_batch_size():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=4, width=8).eval()
    data = bagcert.data.synthetic_dataset(2, 4, 32, seed=0)
    with pytest.raises(ValueError, match="no images"):
        evaluate_neutralization(model, data.images[:0], data.labels[:0], steps=1, qs=(5,))
    for bs in (0, -1):  # -1 used to skip every batch and report 0 % everywhere
        with pytest.raises(ValueError, match="batch_size"):
            evaluate_neutralization(model, data.images, data.labels, steps=1, qs=(5,), batch_size=bs)


def test_neutralization_progress_bar_counts_every_image(capsys):
    from bagcert.analysis import evaluate_neutralization

    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", width=8).eval()
    x, y = torch.rand(5, 3, 32, 32), torch.zeros(5, dtype=torch.long)
    evaluate_neutralization(model, x, y, steps=1, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "roi" in err and "/5 " in err  # a bar over the 5 images
    evaluate_neutralization(model, x, y, steps=1, batch_size=2)
    assert "roi" not in capsys.readouterr().err
