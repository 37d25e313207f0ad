"""Figures of a defensive patch report: the patch of every class and accuracy under corruptions.

Both builders return a matplotlib Figure whose title names the method (the defensive patch's shape and the
model it was made for); they need matplotlib (``ImportError`` otherwise).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["defensive_patch_method", "patches_figure", "corruptions_figure"]


def defensive_patch_method(patch, model: str | None = None) -> str:
    """The method of a defensive patch figure, e.g. ``"defensive patch (frame, 224 px), cifar_bagnet5_s2"``."""
    shape = (getattr(patch, "config", None) or {}).get("shape") or "patch"
    text = f"defensive patch ({shape}, {patch.num_pixels} px)"
    return f"{text}, {model}" if model else text


def patches_figure(patch, classes=None, method: str | None = None):
    """The patch of every class (the pixels outside the patch mid-grey), titled with the class name
    (wnids by name, :func:`bagcert.report.class_name`). The panels are RGB images (their colours are the
    patch's pixel values), so they carry no colour bar."""
    import torch

    from ..report import _require_pyplot, _wrap_title, class_name

    plt = _require_pyplot()
    imgs = patch.patch_only(torch.arange(patch.num_classes))
    cols = min(10, patch.num_classes)
    rows = (patch.num_classes + cols - 1) // cols
    width = max(1.45 * cols, 5.0)
    fig, axes = plt.subplots(rows, cols, figsize=(width, 1.6 * rows + 0.9), squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < patch.num_classes:
            ax.imshow(imgs[k].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(class_name(list(classes) if classes is not None else None, k), fontsize=7)
    fig.suptitle(_wrap_title(f"{method or defensive_patch_method(patch)}\nthe patch pasted for each class "
                             "(grey: image pixels left unchanged)", width), fontsize=9)
    return fig


def corruptions_figure(evaluations: dict, method: str = "defensive patch"):
    """Mean accuracy over the corruptions against severity, without (dashed) and with (solid) the patch, one
    colour per evaluated model (``evaluations``: ``{name: evaluate_defensive_patch(...)}``; entries without
    corruptions are skipped). Raises ValueError when no entry has corruption results."""
    from ..report import _require_pyplot, _wrap_title

    plt = _require_pyplot()
    if not any(e.get("corruptions") for e in evaluations.values()):
        raise ValueError("corruptions_figure: no evaluation has corruption results")
    fig, ax = plt.subplots(figsize=(6.0, 3.8), layout="constrained")
    for i, (name, e) in enumerate(evaluations.items()):
        if not e.get("corruptions"):
            continue
        sev = e["severities"]
        label = "source" if name == "source" else Path(name).stem
        for key, ls in (("without", "--"), ("with", "-")):
            mean = [sum(v[key][j] for v in e["corruptions"].values()) / len(e["corruptions"]) for j in range(len(sev))]
            ax.plot(sev, [100 * m for m in mean], ls=ls, marker="o", color=f"C{i}", label=f"{label}, {key} patch")
    ax.set_xticks(sorted({s for e in evaluations.values() if e.get("corruptions") for s in e["severities"]}))
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("mean accuracy over corruptions (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title(_wrap_title(f"{method}\naccuracy under corruptions", 6.0), fontsize=9)
    return fig
