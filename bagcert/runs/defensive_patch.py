"""Defensive patches as one run: :class:`DefensivePatchConfig` + :func:`defensive_patch_run`.

The run behind ``bagcert defensive-patch``: patches are made on ``train_split`` images (stage 1: local prior;
stage 2: global correlation, see :mod:`bagcert.defense.defensive_patch`) and evaluated on ``eval_split`` images of
the same dataset: clean, common corruptions x severities, L-inf PGD and a random-position adversarial patch, on the
source model and on every ensemble / transfer model. The report folder gets results.json, summary.md,
defensive_patch.pt (reload with :meth:`bagcert.defense.DefensivePatch.load`), patches.png and corruptions.png
(matplotlib), staged and moved into place as one set.

Example::

    from bagcert import DefensivePatchConfig, defensive_patch_run
    report = defensive_patch_run(DefensivePatchConfig(
        checkpoint="checkpoints/bagcert_cifar10_r5s2_v2.pt", dataset="synthetic:16", num_train=16, num_eval=8,
        stage1_epochs=1, stage2_epochs=1, corruptions="none", pgd_steps=1, attack_steps=1, quiet=True,
        output="outputs/defpatch-example", overwrite=True))
    report.summary["clean"]    # {"without": ..., "with": ...}: the source model's clean accuracy
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import _checks
from ._checks import RunInputError
from ._io import (AnalysisReport, ReportRunOptions, check_run_fields, checkpoint_input_size, commit_report,
                  dataset_info, input_errors, load_model_and_data, pct, plt_or_none, progress_bar, recorded_config,
                  save_figure, set_field, show_path, start_report_run, write_report_files)

__all__ = ["DefensivePatchConfig", "defensive_patch_run", "DEFAULT_OUTPUT"]

#: The report folder when ``output`` is None; replaced by each run (said on stderr), like the tool without --output.
DEFAULT_OUTPUT = "outputs/defensive_patch"


@dataclass(frozen=True, kw_only=True)
class DefensivePatchConfig(ReportRunOptions):
    """Everything one defensive-patch run needs; one field per ``bagcert defensive-patch`` option (same names as
    its argument dests, same defaults). Construction checks every field and raises
    :class:`~bagcert.runs._checks.FieldError` (a ``ValueError``) with one line naming the field
    (``severities must lie in 1..5, got [1, 7]``). Sequences may be given as tuples, lists or comma-separated text.

    Attributes:
        checkpoint: the model the patches are made for (path).
        ensemble_checkpoint: further models the patches are made with (stage 2 keeps one copy per model and matches
            their correlations); the patches are evaluated on them too (default: none).
        transfer_checkpoint: further (held-out) models to evaluate the same patches on (default: none).
        dataset: CIFAR-10 folder, ImageNet-style folder or ``synthetic[:N]``.
        train_split: split the patches are made on (``"train"``).
        eval_split: split they are evaluated on (``"test"``).
        num_train: training images, first N of a seeded permutation (None: 1000, or all when fewer).
        num_eval: evaluation images, first N of a seeded permutation (None: 200, or all when fewer).
        patch: evaluate this saved patch (path) instead of making one.
        shape: ``"frame"`` or ``"square"``.
        outer: frame: outer side (None: image side - 2 * round(side / 32)).
        width: frame: ring width (None: round(2 * side / 32)).
        size: square: side (None: side / 4).
        corner: square: ``"top-left"``, ``"top-right"``, ``"bottom-left"`` or ``"bottom-right"``.
        stage1_epochs, stage1_lr: stage 1 epochs (>= 0; 10) and learning rate (> 0; 1e-3).
        stage2_epochs, stage2_lr: stage 2 epochs (>= 0; 30) and per-model copies' learning rate (> 0; 0.03).
        correlation_lr: shared patch learning rate (correlation matching; > 0; 0.03).
        milestones: outer epochs where both learning rates are multiplied by ``gamma`` ((3, 8, 15, 25)).
        gamma: learning-rate factor at each milestone, in (0, 1] (1/3).
        batch_size: images per optimisation step (128).
        blank: stage 1 background value, a pixel value in [0, 1] (0.5).
        eot: expectation over random shifts / brightness during optimisation.
        max_shift: EOT shifts up to this many pixels (>= 0; 2).
        brightness: EOT brightness shifts up to this, in [0, 1] (0.1).
        corruptions: corruption names, ``"all"`` (every one of :data:`bagcert.defense.CORRUPTIONS`) or ``"none"``;
            stored as a tuple of names.
        severities: corruption severities, each in 1..5 ((1, 2, 3, 4, 5)).
        pgd_eps: L-inf budget in [0, 1] pixel units, 0 skips PGD (8/255).
        pgd_steps, pgd_step: PGD steps (>= 0; 10) and step size (> 0; 2/255).
        attack_patch_size: adversarial patch side, at most the image side, 0 skips (5).
        attack_steps, attack_step, attack_restarts: patch attack steps (>= 0; 20), step (> 0; 0.05), restarts (>= 1; 1).
        prediction: accuracy of argmax ``model(x)`` (``"model"``, votes) or of the mean logits (``"logits"``).
        eval_batch_size: images per model call in the evaluation (100).
        seed, threads, output, overwrite, quiet, cache: as every report run (:class:`bagcert.runs.roi.RoiConfig`);
            ``output`` None: :data:`DEFAULT_OUTPUT`, whose previous report is replaced.
    """

    checkpoint: str
    ensemble_checkpoint: tuple[str, ...] = ()
    transfer_checkpoint: tuple[str, ...] = ()
    dataset: str
    train_split: str = "train"
    eval_split: str = "test"
    num_train: int | None = None
    num_eval: int | None = None
    patch: str | None = None
    shape: str = "frame"
    outer: int | None = None
    width: int | None = None
    size: int | None = None
    corner: str | None = None
    stage1_epochs: int = 10
    stage1_lr: float = 1e-3
    stage2_epochs: int = 30
    stage2_lr: float = 0.03
    correlation_lr: float = 0.03
    milestones: tuple[int, ...] = (3, 8, 15, 25)
    gamma: float = 1 / 3
    batch_size: int = 128
    blank: float = 0.5
    eot: bool = False
    max_shift: int = 2
    brightness: float = 0.1
    corruptions: str | tuple[str, ...] = "all"
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    pgd_eps: float = 8 / 255
    pgd_steps: int = 10
    pgd_step: float = 2 / 255
    attack_patch_size: int = 5
    attack_steps: int = 20
    attack_step: float = 0.05
    attack_restarts: int = 1
    prediction: str = "model"
    eval_batch_size: int = 100

    def __post_init__(self):
        from ..defense import CORRUPTIONS

        c = _checks
        pixel = "a number in [0, 1] (pixel units)"
        set_field(self, "checkpoint", c.check_path("checkpoint", self.checkpoint))
        for name in ("ensemble_checkpoint", "transfer_checkpoint"):
            set_field(self, name, c.check_paths(name, getattr(self, name)))
        set_field(self, "dataset", c.check_path("dataset", self.dataset))
        c.check_text("train_split", self.train_split)
        c.check_text("eval_split", self.eval_split)
        for name in ("num_train", "num_eval", "outer", "width", "size"):
            set_field(self, name, c.check_positive_int(name, getattr(self, name), allow_none=True))
        set_field(self, "patch", c.check_path("patch", self.patch, allow_none=True))
        c.check_choice("shape", self.shape, ("frame", "square"))
        c.check_choice("corner", self.corner, ("top-left", "top-right", "bottom-left", "bottom-right"), allow_none=True)
        for name in ("stage1_epochs", "stage2_epochs", "max_shift", "pgd_steps", "attack_patch_size", "attack_steps"):
            set_field(self, name, c.check_nonnegative_int(name, getattr(self, name)))
        for name in ("batch_size", "attack_restarts", "eval_batch_size"):
            set_field(self, name, c.check_positive_int(name, getattr(self, name)))
        for name in ("stage1_lr", "stage2_lr", "correlation_lr", "pgd_step", "attack_step"):
            set_field(self, name, c.check_number(name, getattr(self, name), 0, lo_open=True))
        set_field(self, "gamma", c.check_number("gamma", self.gamma, 0, 1, lo_open=True, what="a decay factor in (0, 1]"))
        for name in ("blank", "brightness", "pgd_eps"):
            set_field(self, name, c.check_number(name, getattr(self, name), 0, 1, what=pixel))
        c.check_bool("eot", self.eot)
        if self.corruptions == "all":
            corruptions = tuple(CORRUPTIONS)
        elif self.corruptions == "none":
            corruptions = ()
        else:
            corruptions = c.check_list("corruptions", self.corruptions, str)
            bad = [k for k in corruptions if k not in CORRUPTIONS]
            if bad:
                raise c.FieldError("corruptions", f": unknown {bad}; choose from {sorted(CORRUPTIONS)}")
        set_field(self, "corruptions", corruptions)
        severities = c.check_list("severities", self.severities, int)
        if any(not 1 <= s <= 5 for s in severities):
            raise c.FieldError("severities", f"must lie in 1..5, got {list(severities)}")
        set_field(self, "severities", severities)
        set_field(self, "milestones", c.check_list("milestones", self.milestones, int))
        c.check_choice("prediction", self.prediction, ("model", "logits"))
        check_run_fields(self)


def defensive_patch_run(config: DefensivePatchConfig) -> AnalysisReport:
    """Make (or load, ``config.patch``) defensive patches, evaluate them and write the report folder.

    Returns an :class:`~bagcert.runs._io.AnalysisReport`: the results.json document, summary.md, the one-line
    summary (the source model's clean / corruption / PGD / patch-attack accuracies without and with the patch,
    the ensemble and transfer models' clean accuracies, the folder) and the folder. Nothing goes to stdout;
    progress bars (unless ``quiet``) and notes go to stderr. When an evaluation fails after a patch was made, the
    patch is kept in the staging folder (its path said on stderr) and the error is raised.

    Raises :class:`~bagcert.runs._checks.RunInputError` (a ``ValueError``) with one line for a mistake in the
    input, before any work: a bad checkpoint, dataset or patch file, an ensemble / transfer model of other classes
    or image size, a model given both as ensemble and transfer, overlapping train and evaluation images, shape
    options of the other shape, a patch shape or attack patch that does not fit the images;
    :class:`~bagcert.report.ReportFolderError` for an unwritable ``output`` or one holding a report without
    ``overwrite``. Any other error is a failure inside the computation.
    """
    from ..checkpoint import load_checkpoint
    from ..defense import DefensivePatch, make_defensive_patches

    out, folder = start_report_run(config, DefensivePatchConfig, "defensive_patch_run", DEFAULT_OUTPUT)  # before any work

    model, meta, test = load_model_and_data(config.checkpoint, config.dataset, config.eval_split, config.seed, config.num_eval,
                                            "--num-eval", default=200, cache=config.cache)
    _check_geometry(config, tuple(test.images.shape[-2:]))  # before the patch is made: an hour of work must not end in it

    source_classes = list(meta.get("classes") or ([] if test.name == "synthetic" else test.classes))

    def other_model(path, role):
        """Another model the patches are evaluated on: it must predict the source model's classes, in the same
        order (a patch is made for a class label; a model of other classes would be scored against wrong labels)."""
        with input_errors(f"--{role}-checkpoint {path}: "):
            m, other_meta = load_checkpoint(path)
        if m.num_classes != model.num_classes:
            raise RunInputError(f"{role} model {path} has {m.num_classes} classes, the source model {model.num_classes}")
        classes = list(other_meta.get("classes") or [])
        if source_classes and classes != source_classes:
            what = (f"records no class names, so its labels cannot be matched to the source model's {source_classes}" if not classes
                    else f"predicts the classes {classes}, the source model {source_classes}")
            raise RunInputError(f"--{role}-checkpoint {path} {what}: its accuracy with the patches would be scored against "
                             f"other labels; give a model of the source model's classes")
        if checkpoint_input_size(other_meta, path) != checkpoint_input_size(meta, config.checkpoint):
            raise RunInputError(f"--{role}-checkpoint {path} was trained on {checkpoint_input_size(other_meta, path)} px images, the "
                             f"source model on {checkpoint_input_size(meta, config.checkpoint)} px: the patches do not fit it")
        return m.eval()

    overlap = set(config.ensemble_checkpoint) & set(config.transfer_checkpoint)
    if overlap:
        raise RunInputError(f"{sorted(overlap)} given as both --ensemble-checkpoint and --transfer-checkpoint: a transfer model must be held out")
    ensemble = {path: other_model(path, "ensemble") for path in config.ensemble_checkpoint}
    transfer = {path: other_model(path, "transfer") for path in config.transfer_checkpoint}
    if config.patch and ensemble:
        raise RunInputError("--ensemble-checkpoint makes a patch; it cannot be combined with --patch")
    t0 = time.perf_counter()
    if config.patch:
        with input_errors(f"--patch {config.patch}: "):
            patch = DefensivePatch.load(config.patch)
        made = None
    else:
        _, _, train = load_model_and_data(config.checkpoint, config.dataset, config.train_split, config.seed, config.num_train,
                                          "--num-train", default=1000, cache=config.cache)
        if config.train_split == config.eval_split:
            common = set(train.indices.tolist()) & set(test.indices.tolist())
            if common:
                raise RunInputError(
                    f"--train-split and --eval-split are both {config.train_split!r}: {len(common)} of the {len(test)} "
                    f"evaluation images would also be images the patch is made on; give splits that do not overlap "
                    f"(e.g. --train-split train --eval-split test)")
        bar = None
        if not config.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.stage1_epochs + config.stage2_epochs, unit="epoch", desc="defensive patch", mininterval=1.0,
                       file=sys.stderr)
        patch = make_defensive_patches(
            [model, *ensemble.values()], train.images, train.labels, num_classes=model.num_classes, shape=config.shape,
            outer=config.outer, width=config.width, size=config.size, corner=config.corner, stage1_epochs=config.stage1_epochs,
            stage1_lr=config.stage1_lr, stage2_epochs=config.stage2_epochs, stage2_lr=config.stage2_lr,
            correlation_lr=config.correlation_lr, milestones=list(config.milestones), gamma=config.gamma,
            batch_size=config.batch_size, blank=config.blank, eot=config.eot, max_shift=config.max_shift,
            brightness=config.brightness, seed=config.seed, classes=list(test.classes),
            progress=None if bar is None else (lambda stage, epoch, history: bar.update(1)),
        )
        if bar is not None:
            bar.close()
        made = {"dataset": dataset_info(train, config.train_split), "seconds": time.perf_counter() - t0}
    if patch.num_classes != model.num_classes or patch.image_size != tuple(test.images.shape[-2:]):
        raise RunInputError(f"patch is for {patch.num_classes} classes at {patch.image_size}; model/data need {model.num_classes} "
                         f"at {tuple(test.images.shape[-2:])}")
    stage = folder.stage()
    patch.save(stage / "defensive_patch.pt")
    try:
        return _evaluate_and_report(config, out, folder, patch, made, model, ensemble, transfer, test)
    except BaseException:
        if made is not None and folder.staging is not None:  # an hour of patch making is not thrown away
            kept = folder.keep()
            print(f"the run failed after making the patch; the patch is kept in {kept / 'defensive_patch.pt'}", file=sys.stderr)
        raise
    finally:
        folder.discard()


def _check_geometry(config: DefensivePatchConfig, image_size) -> None:
    """The patch shape and the attack patch against the ``image_size`` (H, W) images, before any work: the shape
    options of the other shape are refused, a frame or square that does not fit is one line
    (:func:`bagcert.defense.patch_mask`'s rule), and so is an attack patch larger than the images."""
    from ..defense.defensive_patch import patch_mask

    H, W = image_size
    other = ("--size", "--corner") if config.shape == "frame" else ("--outer", "--width")
    given = [f for f in other if getattr(config, f[2:]) is not None]
    if given:
        raise RunInputError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --shape "
                         f"{'square' if config.shape == 'frame' else 'frame'} only, not --shape {config.shape}")
    if not config.patch:
        kwargs = {"outer": config.outer, "width": config.width} if config.shape == "frame" else {"size": config.size, "corner": config.corner}
        try:
            patch_mask((H, W), config.shape, **kwargs)
        except ValueError as e:
            given = " ".join(f"--{k} {v}" for k, v in kwargs.items() if v is not None)
            raise RunInputError(f"--shape {config.shape}{' ' + given if given else ''}: {e}") from None
    if config.attack_patch_size > min(H, W):
        raise RunInputError(f"--attack-patch-size {config.attack_patch_size} is larger than the {H}x{W} images "
                         f"(at most {min(H, W)}; 0 skips the patch attack)")


def _evaluate_and_report(config, out: Path, folder, patch, made, model, ensemble, transfer, test) -> AnalysisReport:
    """Evaluate ``patch`` on every model, write the report into ``folder``'s staging folder and commit it."""
    from ..defense import evaluate_defensive_patch

    kw = dict(
        corruptions=list(config.corruptions), severities=list(config.severities),
        pgd_eps=config.pgd_eps if config.pgd_eps > 0 else None, pgd_steps=config.pgd_steps, pgd_step=config.pgd_step,
        attack_patch_size=config.attack_patch_size if config.attack_patch_size > 0 else None, attack_steps=config.attack_steps,
        attack_step=config.attack_step, attack_restarts=config.attack_restarts, batch_size=config.eval_batch_size,
        seed=config.seed, prediction=config.prediction,
    )
    evaluations = {}
    models = progress_bar({"source": model, **ensemble, **transfer}.items(), not config.quiet, "evaluate patch",
                          total=1 + len(ensemble) + len(transfer), unit="model")
    for name, m in models:
        evaluations[name] = evaluate_defensive_patch(m, patch, test.images, test.labels, **kw)

    results = {
        "checkpoint": {"path": str(config.checkpoint), "model": model.config["name"], "num_classes": model.num_classes},
        "ensemble_checkpoints": list(ensemble),
        "transfer_checkpoints": list(transfer),
        "dataset": dataset_info(test, config.eval_split),
        "patch": {"file": str(out / "defensive_patch.pt"), "shape": patch.config.get("shape"), "pixels_per_channel": patch.num_pixels,
                  "fraction_of_image": patch.num_pixels / (patch.image_size[0] * patch.image_size[1]), "loaded_from": config.patch,
                  "made": made, "history": patch.config.get("history")},
        "evaluations": evaluations,
    }
    md = _markdown(results)
    doc = write_report_files(folder, "bagcert.cli.defensive_patch", recorded_config(config, DEFAULT_OUTPUT), results, md)
    _figures(folder.stage(), patch, evaluations, list(test.classes), model.config["name"])
    commit_report(folder)
    src = doc["evaluations"]["source"]
    line = {"clean": src["clean"], "corruption_mean": src["corruption_mean"],
            "pgd": {k: src["pgd"][k] for k in ("without", "with")} if src["pgd"] else None,
            "patch_attack": {k: src["patch_attack"][k] for k in ("without", "with")} if src["patch_attack"] else None,
            "num_images": src["n"], "ensemble": {k: evaluations[k]["clean"] for k in ensemble},
            "transfer": {k: evaluations[k]["clean"] for k in transfer}, "output": show_path(out)}
    return AnalysisReport(results=doc, markdown=md, summary=line, output=out)


def _markdown(r: dict) -> str:
    p = r["patch"]
    lines = [
        "# Defensive patch evaluation",
        "",
        f"- checkpoint: {r['checkpoint']['path']} ({r['checkpoint']['model']})",
        f"- data: {r['dataset']['name']} ({r['dataset']['num_images']} images, split {r['dataset']['split']})",
        f"- patch: {p['shape']}, {p['pixels_per_channel']} pixels ({pct(p['fraction_of_image'])} of the image)"
        + (f", loaded from {p['loaded_from']}" if p["loaded_from"] else f", made in {p['made']['seconds']:.1f} s on {p['made']['dataset']['num_images']} images"),
        "",
    ]
    for name, e in r["evaluations"].items():
        role = "source model" if name == "source" else ("ensemble: " if name in r["ensemble_checkpoints"] else "transfer (held out): ") + name
        lines += [f"## {role}", "",
                  "| condition | without patch | with patch |", "| --- | ---: | ---: |",
                  f"| clean | {pct(e['clean']['without'])} | {pct(e['clean']['with'])} |"]
        if e["corruption_mean"]:
            lines.append(f"| corruptions (mean) | {pct(e['corruption_mean']['without'])} | {pct(e['corruption_mean']['with'])} |")
        if e["pgd"]:
            lines.append(f"| L-inf PGD eps {e['pgd']['eps']:.4g}, {e['pgd']['steps']} steps | {pct(e['pgd']['without'])} | {pct(e['pgd']['with'])} |")
        if e["patch_attack"]:
            a = e["patch_attack"]
            lines.append(f"| adversarial patch {a['patch_size']}x{a['patch_size']}, {a['steps']} steps | {pct(a['without'])} | {pct(a['with'])} |")
        if e["corruptions"]:
            sev = e["severities"]
            lines += ["", "| corruption | " + " | ".join(f"s{s} without / with" for s in sev) + " |",
                      "| --- |" + " ---: |" * len(sev)]
            for c, v in e["corruptions"].items():
                lines.append(f"| {c} | " + " | ".join(f"{100 * a:.1f} / {100 * b:.1f}" for a, b in zip(v["without"], v["with"])) + " |")
        lines.append("")
    return "\n".join(lines)


def _figures(out: Path, patch, evaluations: dict, classes: list, model: str | None = None) -> None:
    plt = plt_or_none()
    if plt is None:
        return
    from ..defense.figures import corruptions_figure, defensive_patch_method, patches_figure

    method = defensive_patch_method(patch, model)
    save_figure(patches_figure(patch, classes, method), out / "patches.png")
    if any(e["corruptions"] for e in evaluations.values()):
        save_figure(corruptions_figure(evaluations, method), out / "corruptions.png")
