"""Figures read on their own: attack examples show attacked images that were correct, class names,
method names in the titles, colour bars on heatmaps."""

import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from bagcert.report import (
    accuracy_figure,
    attack_examples_figure,
    class_name,
    plot_attack_examples,
    plot_uncertified_positions,
    select_example_rows,
    uncertified_positions_figure,
)


def _titles(fig):
    sup = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return sup, [ax.get_title() for ax in fig.axes]


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_select_example_rows_correct_first_attack_successes_first():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    correct = torch.tensor([False, True, True, False, True, True])
    pred = torch.tensor([[1, 1, 0, 3, 4, 5],     # attack A breaks 0 (wrong anyway) and 2
                         [0, 1, 2, 0, 4, 0]])    # attack B breaks 5
    certified = torch.tensor([False, True, False, False, True, False])
    rows = select_example_rows(correct, pred, labels, certified, 4)
    assert rows.tolist() == [2, 5, 1, 4]
    assert select_example_rows(correct, pred, labels, certified, 2).tolist() == [2, 5]
    # images wrong on clean input are never shown, even when k asks for more
    assert select_example_rows(correct, pred[0], labels, certified, 10).tolist() == [2, 1, 4, 5]
    with pytest.raises(ValueError, match="k must be an integer >= 0"):
        select_example_rows(correct, pred, labels, certified, -1)
    with pytest.raises(ValueError, match=r"attacked_pred \[N\] or \[A, N\]"):
        select_example_rows(correct, pred[:, :3], labels, certified, 2)


def test_class_names_map_imagenette_wnids_and_keep_others():
    assert class_name(["n01440764", "n09999999", "cat"], 0) == "tench"
    assert class_name(["n01440764", "n09999999", "cat"], 1) == "n09999999"
    assert class_name(["n01440764", "n09999999", "cat"], 2) == "cat"
    assert class_name(None, 7) == "7"


def test_attack_examples_figure_names_method_classes_and_certificate(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    adv = x.clone()
    adv[:, :, 2:6, 3:7] = 1.0
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 2:6, 3:7] = 1
    labels, clean = torch.tensor([0, 1]), torch.tensor([0, 1])
    title = "pgd (10 steps, 5 locations), 4x4 patch; BagCert (votes aggregation), tiny"
    fig = attack_examples_figure(x, labels, clean, {"pgd": (adv, torch.tensor([1, 1]), masks)}, ["n01440764", "n02102040"],
                                 title=title, certified=torch.tensor([False, True]))
    sup, titles = _titles(fig)
    assert "pgd (10 steps" in sup and "BagCert (votes aggregation)" in sup
    assert titles[1] == "pgd\npred: English springer (wrong)"      # class names, not indices or wnids
    assert titles[0] == "clean\npred: tench"
    ylabels = [fig.axes[0].get_ylabel(), fig.axes[2].get_ylabel()]
    assert ylabels == ["true: tench\nnot certified", "true: English springer\ncertified"]
    assert len(fig.axes[1].patches) == 1  # the patch outlined
    matplotlib.pyplot.close(fig)
    path = tmp_path / "a.png"
    assert plot_attack_examples(path, x, labels, clean, {"pgd": (adv, torch.tensor([1, 1]))}, ["a", "b"], title=title)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # written atomically through a private temporary file, yet with the permissions of any other new file
    other = tmp_path / "b.txt"
    other.write_text("x")
    assert path.stat().st_mode & 0o777 == other.stat().st_mode & 0o777


def test_uncertified_positions_figure_has_margin_colorbar_and_method(tmp_path):
    x = torch.rand(3, 3, 8, 8)
    margins = torch.arange(3 * 6 * 6).view(3, 6, 6).float() - 40
    args = (x, margins, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), torch.tensor([False, True, True]), (3, 3), ["a", "b", "c"])
    fig = uncertified_positions_figure(*args, aggregation="votes", method="BagCert (votes aggregation), tiny")
    sup, titles = _titles(fig)
    assert sup.startswith("BagCert (votes aggregation), tiny: margin of every 3x3 patch position")
    bars = _colorbars(fig)
    assert len(bars) == 1 and bars[0].get_ylabel() == "certificate margin (votes)"
    assert "not certified\n36 of 36 positions <= 0" in titles
    assert "certified, wrong class\n0 of 36 positions <= 0" in titles
    matplotlib.pyplot.close(fig)
    path = tmp_path / "u.png"
    assert plot_uncertified_positions(path, *args, aggregation="clipped")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_accuracy_figure_title_names_certifier_and_model():
    s = {"certified_accuracy": {"5": 0.25}, "clean_accuracy": 0.5, "dataset": {"name": "CIFAR-10"}, "num_images": 4,
         "aggregation": "votes", "method": "bagcert", "checkpoint": {"model": "cifar_bagnet5_s2"}}
    fig = accuracy_figure(s)
    assert fig.axes[0].get_title().startswith("BagCert (votes aggregation), cifar_bagnet5_s2\n")
    matplotlib.pyplot.close(fig)
    fig = accuracy_figure(dict(s, method="drs-column-b4"))
    assert fig.axes[0].get_title().startswith("drs-column-b4, cifar_bagnet5_s2\n")
    matplotlib.pyplot.close(fig)


def _roi_result(k=2, kind="patch"):
    g = torch.Generator().manual_seed(1)
    ex = {"x": torch.rand(k, 3, 8, 8, generator=g), "x_adv": torch.rand(k, 3, 8, 8, generator=g),
          "roi_clean": torch.randn(k, 8, 8, generator=g), "roi_adv": torch.randn(k, 8, 8, generator=g),
          "roa_oracle": torch.rand(k, 8, 8, generator=g), "roa_gradient": torch.rand(k, 8, 8, generator=g),
          "neutralized": torch.rand(k, 3, 8, 8, generator=g), "label": torch.tensor([0, 1][:k]),
          "pred_clean": torch.tensor([0, 1][:k]), "pred_adv": torch.tensor([1, 1][:k]), "pred_neutralized": torch.tensor([0, 0][:k])}
    r = {"n": k, "attack": {"kind": kind, "eps": 0.03, "steps": 10, "step": 0.05, "patch_size": 3}, "roi_method": "local",
         "reduce": "mean", "roa_box": 3, "iou_oracle": {"1.0": 0.1, "5.0": 0.2}, "iou_gradient": {"1.0": 0.3, "5.0": 0.4},
         "checkpoint": {"model": "tiny"}}
    return ex, r


def test_roi_heatmap_figure_colorbars_with_units_and_method():
    from bagcert.analysis.roi import iou_figure, roi_heatmap_figure

    ex, r = _roi_result()
    fig = roi_heatmap_figure(ex, r, ["n01440764", "cat"])
    sup, titles = _titles(fig)
    assert sup.startswith("RoI local (mean) vs RoA, patch 3x3 attack (10 steps); tiny")
    labels = sorted(cb.get_xlabel() for cb in _colorbars(fig))
    assert labels == ["RoA: |d CE / d x_adv|\n(channel sum, 3x3 mean)", "RoA: |x_adv - x|\n(channel sum, 3x3 mean)",
                      "RoI: local logit of the predicted class"]
    assert "clean image\npred: tench" in titles and "adversarial image\npred: cat (wrong)" in titles
    matplotlib.pyplot.close(fig)
    fig = iou_figure(r)
    assert fig.axes[0].get_title().startswith("RoI local (mean) vs RoA, patch 3x3 attack (10 steps); tiny")
    matplotlib.pyplot.close(fig)


def test_defensive_patch_figures_name_method():
    from bagcert.defense.defensive_patch import DefensivePatch
    from bagcert.defense.figures import corruptions_figure, defensive_patch_method, patches_figure

    patch = DefensivePatch.create(3, (8, 8), shape="frame", seed=0)
    method = defensive_patch_method(patch, "tiny")
    assert method == f"defensive patch (frame, {patch.num_pixels} px), tiny"
    fig = patches_figure(patch, ["n01440764", "b", "c"], method)
    sup, titles = _titles(fig)
    assert sup.startswith(method) and titles[:3] == ["tench", "b", "c"]
    matplotlib.pyplot.close(fig)
    ev = {"source": {"severities": [1, 2], "corruptions": {"gaussian_noise": {"without": [0.5, 0.4], "with": [0.6, 0.5]}}}}
    fig = corruptions_figure(ev, method)
    assert fig.axes[0].get_title().startswith(method)
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="no evaluation has corruption results"):
        corruptions_figure({"source": {"severities": [1], "corruptions": {}}}, method)


def _report_with_attacks():
    """A report summary of 200 images certified for 2x2 and 5x5, 100 attacked (pgd; imagenet-patch outside)."""
    from bagcert.report import _empirical_with_ci, binomial_ci95

    s = {"certified_accuracy": {"2": 0.4, "5": 0.2}, "certified_count": {"2": 80, "5": 40}, "clean_accuracy": 0.56,
         "correct_count": 112, "num_images": 200, "dataset": {"name": "CIFAR-10"}, "aggregation": "votes", "method": "bagcert",
         "checkpoint": {"model": "cifar_bagnet5_s2"}, "clean_accuracy_ci95": binomial_ci95(112, 200),
         "certified_accuracy_ci95": {"2": binomial_ci95(80, 200), "5": binomial_ci95(40, 200)}}
    per = {}
    for k, (cert, pgd, inet) in {"2": (38, 45, 20), "5": (20, 30, 20)}.items():
        per[k] = {"num_images": 100, "clean_accuracy": 0.55, "certified_accuracy": cert / 100, "certified_count": cert,
                  "robust_accuracy": {"pgd": pgd / 100, "imagenet-patch": inet / 100}, "robust_count": {"pgd": pgd, "imagenet-patch": inet},
                  "overall_robust_accuracy": pgd / 100, "in_threat_model": {"pgd": True, "imagenet-patch": False}}
    s["empirical"] = _empirical_with_ci({"attacks": ["pgd", "universal", "imagenet-patch"], "skipped": {"universal": "not asked"},
                                         "num_images_attacked": 100, "per_size": per})
    return s


def _bars(ax):
    """{legend label: (bar heights, bar x centres)} of the bar containers of ``ax``."""
    out = {}
    for c in ax.containers:
        if hasattr(c, "patches"):
            out[c.get_label()] = ([round(p.get_height(), 6) for p in c.patches], [p.get_x() + p.get_width() / 2 for p in c.patches])
    return out


def test_accuracy_figure_puts_robust_bars_beside_certified_ones_with_values_and_intervals():
    s = _report_with_attacks()
    fig = accuracy_figure(s)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert list(bars) == ["clean", "certified", "pgd (robust)", "imagenet-patch (robust, outside threat model)"]
    assert bars["clean"][0] == [56.0, 56.0] and bars["certified"][0] == [40.0, 20.0]
    assert bars["pgd (robust)"][0] == [45.0, 30.0] and bars["imagenet-patch (robust, outside threat model)"][0] == [20.0, 20.0]
    # grouped: within each patch size the bars stand side by side in series order, around the size's tick
    for i in range(2):
        xs = [b[1][i] for b in bars.values()]
        assert xs == sorted(xs) and abs(sum(xs) / len(xs) - i) < 1e-9
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2x2", "5x5"]
    # every bar carries its value, placed above the top of its error bar
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["56.0", "56.0", "40.0", "20.0", "45.0", "30.0", "20.0", "20.0"])
    # error bars: one line collection per series, spanning the 95 % interval of each bar (in percent)
    pgd_ci = s["empirical"]["per_size"]["2"]["robust_accuracy_ci95"]["pgd"]
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert any(abs(seg[0][1] - 100 * pgd_ci[0]) < 1e-9 and abs(seg[1][1] - 100 * pgd_ci[1]) < 1e-9 for seg in segments)
    assert len(segments) == 8
    title = ax.get_title()
    assert title.startswith("BagCert (votes aggregation), cifar_bagnet5_s2\n")
    assert "empirical robust accuracy (n=100 attacked)" in title and "95 % CI" in title
    matplotlib.pyplot.close(fig)


def test_accuracy_figure_without_attacks_has_clean_and_certified_bars_only():
    s = _report_with_attacks()
    del s["empirical"]
    fig = accuracy_figure(s)
    assert list(_bars(fig.axes[0])) == ["clean", "certified"]
    assert fig.axes[0].get_title().endswith("certified accuracy on CIFAR-10, n=200; error bars: 95 % CI")
    matplotlib.pyplot.close(fig)


def test_threat_model_note_names_the_applied_patch_size():
    from bagcert.report import threat_model_note

    masks = torch.zeros(3, 1, 224, 224)
    masks[:, :, 10:60, 20:70] = 1  # a 50x50 patch on every image
    assert threat_model_note("imagenet-patch", masks, (5, 5)) == \
        "imagenet-patch: outside the certified threat model (patch 50x50 px > certified 5x5)"
    assert threat_model_note("imagenet-patch", masks, (50, 50)) is None
    masks[1] = 0
    masks[1, :, 0:40, 0:3] = 1          # fits in 40x40; a rotated (diagonal) patch spans its bounding box
    masks[2] = 0
    masks[2, 0, torch.arange(60, 130), torch.arange(60, 130)] = 1
    assert threat_model_note("imagenet-patch", masks, (40, 40)) == \
        "imagenet-patch: outside the certified threat model for 2 of 3 images (patch 50-70 x 50-70 px > certified 40x40)"


def test_imagenet_patch_example_figure_says_outside_the_certified_threat_model():
    x = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 5:25, 5:25] = 1  # 20x20 against a 5x5 certificate
    masks[1, :, 30:34, 30:34] = 1  # 4x4: inside
    adv = {"imagenet-patch": (x, torch.tensor([1, 1]), masks)}
    fig = attack_examples_figure(x, torch.tensor([0, 1]), torch.tensor([0, 1]), adv, ["a", "b"], title="imagenet-patch, 5x5 patch",
                                 patch_size=(5, 5))
    sup, titles = _titles(fig)
    flat = " ".join(sup.split())  # the title is wrapped to the figure's width
    assert "imagenet-patch: outside the certified threat model for 1 of 2 images (patch 20x20 px > certified 5x5)" in flat
    assert titles[1] == "imagenet-patch\noutside threat model (20x20 px)\npred: b (wrong)"
    assert titles[3] == "imagenet-patch\npred: b"
    matplotlib.pyplot.close(fig)
