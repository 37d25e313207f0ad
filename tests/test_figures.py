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
