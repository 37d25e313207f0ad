"""Region of Importance / Region of Attack report as one run: :class:`RoiConfig` + :func:`roi_run`.

The run behind ``bagcert roi``: accuracy on clean, adversarial and neutralised images, the IoU of RoI and RoA
across q, and heat-map figures (:mod:`bagcert.analysis.roi`), written as results.json, summary.md, heatmaps.png
and iou.png (matplotlib) into a report folder, staged and moved into place as one set.

Example::

    from bagcert import RoiConfig, roi_run
    report = roi_run(RoiConfig(checkpoint="checkpoints/bagcert_cifar10_r5s2_v2.pt", dataset="samples/cifar10",
                               num_images=8, steps=2, output="outputs/roi-example", overwrite=True))
    report.summary["adversarial_accuracy"], report.output
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import _checks
from ._checks import RunInputError
from ._io import (AnalysisReport, ReportRunOptions, check_run_fields, commit_report, dataset_info,
                  load_model_and_data, pct, plt_or_none, recorded_config, save_figure, set_field, show_path,
                  start_report_run, write_report_files)

__all__ = ["RoiConfig", "roi_run", "DEFAULT_OUTPUT"]

#: The report folder when ``output`` is None; replaced by each run (said on stderr), like ``bagcert roi`` without --output.
DEFAULT_OUTPUT = "outputs/roi"


@dataclass(frozen=True, kw_only=True)
class RoiConfig(ReportRunOptions):
    """Everything one RoI / RoA run needs; one field per ``bagcert roi`` option (same names as its argument
    dests, same defaults). Construction checks every field and raises :class:`~bagcert.runs._checks.FieldError`
    (a ``ValueError``) with one line naming the field (``roa_box must be an odd integer >= 1, got 2``).

    Attributes:
        checkpoint: bagcert checkpoint (path).
        dataset: CIFAR-10 folder, ImageNet-style folder or ``synthetic[:N]``.
        split: the split evaluated (``"test"``; a folder without split folders: the checkpoint's seeded split).
        num_images: the first N of a seeded permutation (None: 100, or all when fewer; more than the split has is refused).
        attack: ``"patch"`` (a square adversarial patch) or ``"pgd"`` (L-inf).
        eps: pgd: L-inf budget in [0, 1] pixel units (8/255).
        steps: attack steps (>= 0; 20).
        step: step size (None: 0.05 for patch, eps / 4 for pgd).
        attack_patch_size: patch side in pixels (at most the image side; 5).
        roi: ``"auto"`` (local logits for bagcert models), ``"local"`` or ``"occlusion"``.
        reduce: local RoI: ``"mean"`` or ``"max"`` over the locations seeing a pixel.
        occlusion_window, occlusion_stride: occlusion RoI window side and stride in pixels (8, 4).
        roa_box: box filter side, odd (3).
        q_roi, q_roa: percent of pixels kept in the RoI / RoA for neutralisation, in [0, 100] (20, 10).
        qs: percentages for the IoU curve, a tuple or comma-separated text (1, 2, 5, 10, 20, 30, 50).
        fill: what replaces the neutralised pixels: ``"zero"``, ``"mean"``, ``"blur"`` or a number in [0, 1].
        prediction: accuracy of argmax ``model(x)`` (``"model"``, votes) or of the mean logits (``"logits"``).
        batch_size: images per model call (100).
        num_figures: examples in heatmaps.png (>= 0; 4).
        seed: seed of the image subset and of every random draw (0).
        threads: torch CPU threads (None: torch's own choice).
        output: report folder, new or empty (None: :data:`DEFAULT_OUTPUT`, whose previous report is replaced).
        overwrite: replace the report already in ``output``.
        quiet: no progress bars.
        cache: read and write the decode cache (False: decode the images afresh).
    """

    checkpoint: str
    dataset: str
    split: str = "test"
    num_images: int | None = None
    attack: str = "patch"
    eps: float = 8 / 255
    steps: int = 20
    step: float | None = None
    attack_patch_size: int = 5
    roi: str = "auto"
    reduce: str = "mean"
    occlusion_window: int = 8
    occlusion_stride: int = 4
    roa_box: int = 3
    q_roi: float = 20.0
    q_roa: float = 10.0
    qs: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0)
    fill: str | float = "mean"
    prediction: str = "model"
    batch_size: int = 100
    num_figures: int = 4

    def __post_init__(self):
        c = _checks
        set_field(self, "checkpoint", c.check_path("checkpoint", self.checkpoint))
        set_field(self, "dataset", c.check_path("dataset", self.dataset))
        c.check_text("split", self.split)
        set_field(self, "num_images", c.check_positive_int("num_images", self.num_images, allow_none=True))
        c.check_choice("attack", self.attack, ("patch", "pgd"))
        set_field(self, "eps", c.check_number("eps", self.eps, 0, 1, what="a number in [0, 1] (pixel units)"))
        set_field(self, "steps", c.check_nonnegative_int("steps", self.steps))
        set_field(self, "step", c.check_number("step", self.step, 0, lo_open=True, allow_none=True))
        set_field(self, "attack_patch_size", c.check_positive_int("attack_patch_size", self.attack_patch_size))
        c.check_choice("roi", self.roi, ("auto", "local", "occlusion"))
        c.check_choice("reduce", self.reduce, ("mean", "max"))
        for name in ("occlusion_window", "occlusion_stride", "batch_size"):
            set_field(self, name, c.check_positive_int(name, getattr(self, name)))
        roa_box = c.check_positive_int("roa_box", self.roa_box)
        if roa_box % 2 == 0:
            raise c.FieldError("roa_box", f"must be an odd integer >= 1, got {roa_box}")
        set_field(self, "roa_box", roa_box)
        for name in ("q_roi", "q_roa"):
            q = c.check_number(name, getattr(self, name))
            if not 0 <= q <= 100:
                raise c.FieldError(name, f"values are percentages in [0, 100], got {q}")
            set_field(self, name, q)
        qs = c.check_list("qs", self.qs, float)
        for q in qs:
            if not 0 <= q <= 100:
                raise c.FieldError("qs", f"values are percentages in [0, 100], got {q}")
        set_field(self, "qs", qs)
        if self.fill not in ("zero", "mean", "blur"):
            try:
                set_field(self, "fill", c.check_number("fill", self.fill, 0, 1))
            except c.FieldError:
                raise c.FieldError("fill", f"must be zero, mean, blur or a number in [0, 1], got {self.fill!r}") from None
        c.check_choice("prediction", self.prediction, ("model", "logits"))
        set_field(self, "num_figures", c.check_nonnegative_int("num_figures", self.num_figures))
        check_run_fields(self)


def roi_run(config: RoiConfig) -> AnalysisReport:
    """Run the RoI / RoA analysis of ``config`` and write its report folder.

    Returns an :class:`~bagcert.runs._io.AnalysisReport`: the results.json document, summary.md, the one-line
    summary (clean / adversarial / neutralised accuracies, RoI method, number of images, output) and the folder.
    Nothing goes to stdout; progress bars (unless ``quiet``) and notes go to stderr.

    Raises :class:`~bagcert.runs._checks.RunInputError` (a ``ValueError``) with one line for a mistake in the
    input, before any work: a bad checkpoint or dataset, more ``num_images`` than the split has, an attack patch
    larger than the images; :class:`~bagcert.report.ReportFolderError` for an unwritable ``output`` or one holding
    a report without ``overwrite``; ``TypeError`` for a config that is not a :class:`RoiConfig`. Any other error is
    a failure inside the computation.
    """
    from ..analysis.roi import evaluate_neutralization

    out, folder = start_report_run(config, RoiConfig, "roi_run", DEFAULT_OUTPUT)  # before any work
    model, meta, data = load_model_and_data(config.checkpoint, config.dataset, config.split, config.seed, config.num_images,
                                            "--num-images", default=100, cache=config.cache)
    H, W = data.images.shape[-2:]
    if config.attack == "patch" and config.attack_patch_size > min(H, W):
        raise RunInputError(f"--attack-patch-size {config.attack_patch_size} is larger than the {H}x{W} images")
    res = evaluate_neutralization(
        model, data.images, data.labels, attack=config.attack, eps=config.eps, steps=config.steps, step=config.step,
        attack_patch_size=config.attack_patch_size, roi_method=config.roi, reduce=config.reduce,
        occlusion_window=config.occlusion_window, occlusion_stride=config.occlusion_stride, roa_box=config.roa_box,
        q_roi=config.q_roi, q_roa=config.q_roa, qs=list(config.qs), fill=config.fill, batch_size=config.batch_size,
        seed=config.seed, prediction=config.prediction, keep=config.num_figures, progress=not config.quiet,
    )
    examples = res.pop("examples", None)
    results = {"checkpoint": {"path": str(config.checkpoint), "model": model.config["name"]},
               "dataset": dataset_info(data, config.split), **res}
    md = _markdown(results)
    doc = write_report_files(folder, "bagcert.cli.roi", recorded_config(config, DEFAULT_OUTPUT), results, md)
    try:
        _figures(folder.stage(), results, examples, (meta or {}).get("classes") or data.classes)
        commit_report(folder)
    finally:
        folder.discard()
    line = {k: doc[k] for k in ("clean_accuracy", "adversarial_accuracy", "neutralized_accuracy_oracle", "neutralized_accuracy_gradient",
                                "neutralized_clean_accuracy")}
    line.update(roi_method=doc["roi_method"], num_images=doc["n"], output=show_path(out))
    return AnalysisReport(results=doc, markdown=md, summary=line, output=out)


def _markdown(r: dict) -> str:
    a = r["attack"]
    what = f"patch {a['patch_size']}x{a['patch_size']}" if a["kind"] == "patch" else f"L-inf PGD eps {a['eps']:.4g}"
    lines = [
        "# Region of Importance / Region of Attack",
        "",
        f"- checkpoint: {r['checkpoint']['path']} ({r['checkpoint']['model']})",
        f"- data: {r['dataset']['name']} ({r['n']} images, split {r['dataset']['split']})",
        f"- attack: {what}, {a['steps']} steps of {a['step']:.4g}",
        f"- RoI: {r['roi_method']}" + (f" ({r['reduce']} over locations)" if r["reduce"] else "") + f", top {r['q_roi']:g} %; "
        f"RoA: box {r['roa_box']}, top {r['q_roa']:g} %; fill: {r['fill']}",
        "",
        "| images | accuracy |",
        "| --- | ---: |",
        f"| clean | {pct(r['clean_accuracy'])} |",
        f"| adversarial | {pct(r['adversarial_accuracy'])} |",
        f"| adversarial, neutralised (RoA = \\|x_adv - x\\|, oracle) | {pct(r['neutralized_accuracy_oracle'])} |",
        f"| adversarial, neutralised (RoA = input gradient) | {pct(r['neutralized_accuracy_gradient'])} |",
        f"| clean, neutralised (RoA = input gradient) | {pct(r['neutralized_clean_accuracy'])} |",
        "",
        "Mean over images of the per-image IoU:",
        "",
        "| q (%) | IoU(RoI clean, RoA oracle) | IoU(RoI clean, RoA gradient) |",
        "| ---: | ---: | ---: |",
    ]
    for q in r["iou_oracle"]:
        lines.append(f"| {float(q):g} | {r['iou_oracle'][q]:.3f} | {r['iou_gradient'][q]:.3f} |")
    lines.append("")
    return "\n".join(lines)


def _figures(out: Path, r: dict, ex, classes=None) -> None:
    plt = plt_or_none()
    if plt is None:
        return
    from ..analysis.roi import iou_figure, roi_heatmap_figure

    save_figure(iou_figure(r), out / "iou.png")
    if ex and ex["x"].shape[0] > 0:
        save_figure(roi_heatmap_figure(ex, r, classes), out / "heatmaps.png")
