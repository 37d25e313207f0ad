"""ImageNet-A style evaluation as one run: :class:`ImageNetAConfig` + :func:`imagenet_a_run`.

The run behind ``bagcert imagenet-a``, in two modes (``mode="auto"`` picks by the model's number of classes):

* ``"imagenet-a"``: a 1000-class ImageNet model on an ``imagenet-a/<wnid>/<image>`` folder with the 200-class
  protocol (:func:`bagcert.imagenet_a.evaluate_imagenet_a`: logits restricted to the 200 ImageNet-A classes;
  accuracy, RMS calibration error, AURRA). A partial copy (fewer than 200 folders) needs ``wnids_file`` or
  ``indices_json``.
* ``"subset"``: a model trained on a subset of ImageNet classes whose checkpoint metadata lists its ``classes`` as
  wnids (e.g. Imagenette's 10), on any ``<root>/<wnid>/<image>`` folder
  (:func:`bagcert.imagenet_a.evaluate_subset_model`: classes matched by wnid; the report gives the coverage).

The report folder gets results.json, summary.md and response_rate.png (matplotlib), staged and moved into place
as one set.

Example::

    from bagcert import ImageNetAConfig, imagenet_a_run
    report = imagenet_a_run(ImageNetAConfig(checkpoint="checkpoints/bagcert_imagenette_r17s8.pt",
                                            dataset="../shared/data/imagenette/images-160", num_images=20,
                                            output="outputs/inette-example", overwrite=True))
    report.summary["accuracy"], report.summary["image_coverage"]
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _checks
from ._checks import RunInputError
from ._io import (AnalysisReport, ReportRunOptions, check_run_fields, commit_report, input_errors, one_line, pct,
                  plt_or_none, recorded_config, save_figure, set_field, show_path, start_report_run, subset,
                  write_report_files)

__all__ = ["ImageNetAConfig", "imagenet_a_run", "DEFAULT_OUTPUT"]

#: The report folder when ``output`` is None; replaced by each run (said on stderr), like the tool without --output.
DEFAULT_OUTPUT = "outputs/imagenet_a"

_WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True, kw_only=True)
class ImageNetAConfig(ReportRunOptions):
    """Everything one ImageNet-A style evaluation needs; one field per ``bagcert imagenet-a`` option (same names
    as its argument dests, same defaults). Construction checks every field and raises
    :class:`~bagcert.runs._checks.FieldError` (a ``ValueError``) with one line naming the field
    (``bin_size must be a positive integer, got 0``).

    Attributes:
        checkpoint: bagcert checkpoint (path).
        dataset: folder ``<root>/<wnid>/<image>`` (ImageNet-A or any ImageNet-style folder).
        mode: ``"auto"`` (by the model's class count), ``"imagenet-a"`` (1000-class model, 200-class protocol) or
            ``"subset"`` (model classes matched by wnid).
        size: crop size (None: the checkpoint's input_size, else 224); below the model's receptive field is refused.
        resize: shorter side before the centre crop (None: the checkpoint's ``resize``, else round(size * 256 / 224)).
        wnids_file: imagenet-a mode, partial copies: the 200 ImageNet-A wnids in order, one per line (path).
        indices_json: imagenet-a mode, partial copies: JSON ``{wnid: ImageNet-1k index}`` (path).
        scores: what the softmax is taken over for bagcert models: ``"mean_logits"`` or ``"votes"``.
        split: subset mode, a folder without split folders: ``"test"`` / ``"train"`` part of the checkpoint's seeded
            split, ``"all"`` images, or ``"auto"`` (test when the folder has exactly the image count the checkpoint's
            split was made over, else all).
        num_images: evaluate only the first N of a seeded permutation (None: all).
        batch_size: images per model call (64).
        bin_size: adaptive calibration bin size (100 in the protocol).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (checked against this machine).
        progress: a progress bar on stderr (also off with ``quiet``).
        seed, threads, output, overwrite, quiet, cache: as every report run (:class:`bagcert.runs.roi.RoiConfig`);
            ``output`` None: :data:`DEFAULT_OUTPUT`, whose previous report is replaced.
    """

    checkpoint: str
    dataset: str
    mode: str = "auto"
    size: int | None = None
    resize: int | None = None
    wnids_file: str | None = None
    indices_json: str | None = None
    scores: str = "mean_logits"
    split: str = "auto"
    num_images: int | None = None
    batch_size: int = 64
    bin_size: int = 100
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        c = _checks
        set_field(self, "checkpoint", c.check_path("checkpoint", self.checkpoint))
        set_field(self, "dataset", c.check_path("dataset", self.dataset))
        c.check_choice("mode", self.mode, ("auto", "imagenet-a", "subset"))
        for name in ("size", "resize", "num_images"):
            set_field(self, name, c.check_positive_int(name, getattr(self, name), allow_none=True))
        for name in ("wnids_file", "indices_json"):
            set_field(self, name, c.check_path(name, getattr(self, name), allow_none=True))
        c.check_choice("scores", self.scores, ("mean_logits", "votes"))
        c.check_choice("split", self.split, ("auto", "test", "train", "all"))
        for name in ("batch_size", "bin_size"):
            set_field(self, name, c.check_positive_int(name, getattr(self, name)))
        set_field(self, "device", c.check_device("device", self.device))
        c.check_bool("progress", self.progress)
        check_run_fields(self)


class _Recorder:
    """Wraps a logits function and keeps its outputs (for the per-image response-rate curve)."""

    def __init__(self, fn, bar=None):
        self.fn, self.outputs, self.bar = fn, [], bar

    def __call__(self, x):
        out = self.fn(x)
        self.outputs.append(out.detach().float().cpu())
        if self.bar is not None:
            self.bar.update(int(x.shape[0]))
        return out

    def logits(self) -> torch.Tensor:
        return torch.cat(self.outputs) if self.outputs else torch.zeros(0, 0)


def _scores_fn(model, kind: str, device: str):
    if kind == "votes" or not hasattr(model, "mean_logits"):
        fn = model
    else:
        fn = model.mean_logits

    def scores(x):
        return fn(x.to(device)).float()

    return scores


def _response_curve(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list, list]:
    """Accuracy of the k most confident predictions, k = 1..N (confidence = max softmax).

    :func:`bagcert.metrics.response_rate_curve`: tied confidences as a group (expected accuracy under a
    random order of the group), so the curve does not depend on the image order and its mean is the AURRA."""
    from ..metrics import response_rate_curve

    if logits.numel() == 0:
        return [], []
    conf = torch.softmax(logits, dim=1).max(dim=1).values.double().clamp_(0.0, 1.0)
    correct = logits.argmax(dim=1) == targets
    rate, acc = response_rate_curve(conf, correct)
    return rate.tolist(), acc.tolist()


def _subset_mode_data(root: Path, split: str, record: dict | None, size: int, resize: int, cache: bool = True):
    """The images of subset mode: ``split`` of the folder as cut by the checkpoint's seeded split record."""
    from ..data import DatasetError, cut_seeded_split, load_checkpoint_split

    try:
        if split == "auto":
            data = load_checkpoint_split(str(root), "all", record, size=size, resize=resize, cache=cache)
            if not record or len(data) != int(record["num_images"]):
                return data
            split = "test"  # the checkpoint's own training folder: never evaluate on its training images
            return cut_seeded_split(data, split, record, str(root))
        return load_checkpoint_split(str(root), split, record, size=size, resize=resize, cache=cache)
    except DatasetError as e:
        raise RunInputError(f"--dataset {root} --split {split}: {e}") from None


def imagenet_a_run(config: ImageNetAConfig) -> AnalysisReport:
    """Evaluate ``config.checkpoint`` on an ImageNet-A style folder and write the report folder.

    Returns an :class:`~bagcert.runs._io.AnalysisReport`: the results.json document, summary.md, the one-line
    summary (mode, accuracy, calibration error, AURRA, n; coverage in subset mode; output) and the folder.
    Nothing goes to stdout; the progress bar (``progress`` and not ``quiet``) and notes (a crop size other than
    the checkpoint's) go to stderr.

    Raises :class:`~bagcert.runs._checks.RunInputError` (a ``ValueError``) with one line for a mistake in the
    input: a bad checkpoint, dataset, ``wnids_file`` or ``indices_json``, a crop below the model's receptive field
    or below ``resize``, a mode the model does not fit (imagenet-a needs 1000 classes, subset needs wnid class
    names); :class:`~bagcert.report.ReportFolderError` for an unwritable ``output`` or one holding a report
    without ``overwrite``. Any other error is a failure inside the computation.
    """
    from ..checkpoint import load_checkpoint
    from ..imagenet_a import IMAGENET_A_INDICES, evaluate_imagenet_a, evaluate_subset_model, load_imagenet_a

    out, folder = start_report_run(config, ImageNetAConfig, "imagenet_a_run", DEFAULT_OUTPUT)  # before any work
    with input_errors(f"--checkpoint {config.checkpoint}: "):
        model, meta = load_checkpoint(config.checkpoint)
    model.to(config.device).eval()
    size = config.size or int(meta.get("input_size", 224))
    if config.size is not None:
        _check_size(model, meta, config.size)
    resize = config.resize or meta.get("resize") or round(size * 256 / 224)
    if resize < size:
        raise RunInputError(f"--resize ({resize}) must be >= the crop size ({size})")
    mode = config.mode
    if mode == "auto":
        mode = "imagenet-a" if model.num_classes == 1000 else "subset"
    root = Path(config.dataset)
    recorder = _Recorder(_scores_fn(model, config.scores, config.device))

    if mode == "imagenet-a":
        if model.num_classes != 1000:
            raise RunInputError(f"--mode imagenet-a needs a 1000-class ImageNet model; this checkpoint has {model.num_classes} classes "
                             "(use --mode subset)")
        wnids = _read_file("--wnids-file", config.wnids_file, lambda text: text.split())
        indices = _read_file("--indices-json", config.indices_json, json.loads)
        with input_errors("--dataset: "):  # a missing folder, a partial copy without wnids / indices (DatasetError)
            data = load_imagenet_a(root, size=size, resize=resize, wnids=wnids, indices=indices, allow_subset=bool(wnids or indices))
        images, labels = data.images, data.labels
        if config.num_images is not None and config.num_images < len(labels):
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))[: config.num_images].sort().values
            images, labels = images[keep], labels[keep]
        with torch.no_grad(), _bar(config, int(labels.numel())) as recorder.bar:
            res = evaluate_imagenet_a(recorder, images, labels, batch_size=config.batch_size, bin_size=config.bin_size)
        columns = torch.tensor(IMAGENET_A_INDICES)
        rec_logits, rec_targets = recorder.logits()[:, columns], labels
        present = sorted({data.wnids[int(j)] for j in labels.unique()})
        res.update(classes_total=len(present), images_total=int(labels.numel()))
        dataset = {"name": "ImageNet-A layout", "root": str(root), "num_images": int(labels.numel()), "num_classes_present": len(present)}
    else:
        model_wnids = meta.get("classes")
        if not model_wnids or not all(isinstance(w, str) and _WNID.fullmatch(w) for w in model_wnids):
            raise RunInputError("--mode subset needs a checkpoint whose metadata 'classes' are ImageNet wnids (n + 8 digits)")
        if len(model_wnids) != model.num_classes:
            raise RunInputError(f"checkpoint lists {len(model_wnids)} classes for a {model.num_classes}-class model")
        data = _subset_mode_data(root, config.split, meta.get("split"), size, resize, cache=config.cache)
        data = subset(data, config.num_images, config.seed)
        with torch.no_grad(), _bar(config, len(data)) as recorder.bar:
            res = evaluate_subset_model(recorder, data.images, data.labels, model_wnids, data.classes,
                                        batch_size=config.batch_size, bin_size=config.bin_size)
        to_model = torch.tensor([model_wnids.index(w) if w in model_wnids else -1 for w in data.classes])
        target = to_model[data.labels]
        rec_logits, rec_targets = recorder.logits(), target[target >= 0]
        dataset = {"name": data.name, "root": str(root), "split": data.info.get("split", "all"), "num_images": len(data),
                   "num_classes_present": int(data.labels.unique().numel())}
        if "seeded_split" in data.info:
            dataset["seeded_split"] = data.info["seeded_split"]

    rate, curve = _response_curve(rec_logits, rec_targets)
    ckpt = {"path": str(config.checkpoint), "model": model.config["name"], "num_classes": model.num_classes}
    results = {"mode": mode, "checkpoint": ckpt, "dataset": dataset, "scores": config.scores, "bin_size": config.bin_size, **res}
    md = _markdown(results, config.scores)
    doc = write_report_files(folder, "bagcert.cli.imagenet_a", recorded_config(config, DEFAULT_OUTPUT, mode=mode, size=size, resize=resize),
                             results, md, device=config.device)
    try:
        _figure(folder.stage(), mode, rate, curve, res)
        commit_report(folder)
    finally:
        folder.discard()
    line = {k: doc.get(k) for k in ("mode", "accuracy", "calibration_error", "aurra", "n")}
    if mode == "subset":
        line.update(image_coverage=doc["image_coverage"], class_coverage=doc["class_coverage"])
    line["output"] = show_path(out)
    return AnalysisReport(results=doc, markdown=md, summary=line, output=out)


def _read_file(flag: str, path, parse):
    """``parse(text of path)``, None when ``path`` is None; a missing or unreadable file, or text ``parse`` refuses
    (not JSON), is a ``ValueError`` with one line naming ``flag`` and the file."""
    if path is None:
        return None
    try:
        return parse(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunInputError(one_line(f"{flag} {path}: {e}")) from e


def _check_size(model, meta: dict, size: int) -> None:
    """``size``: refused below one receptive field of the model (and below its smallest input): every output
    location would see mostly padding, nothing the model was trained on. A size other than the checkpoint's
    ``input_size`` is allowed (a BagNet is a bag of local features) and said on stderr."""
    geometry = getattr(model, "geometry", None)
    if geometry is not None:
        least = max(max(geometry.receptive_field), geometry.min_input_size())
        if size < least:
            raise RunInputError(f"--size {size} is smaller than the model's receptive field ({least} px): the crops would hold "
                             f"less than one of its local windows; give --size >= {least} (the checkpoint was trained at "
                             f"{meta.get('input_size', 'an unrecorded size')})")
    trained = meta.get("input_size")
    if trained is not None and size != trained:
        print(f"note: --size {size} differs from the {trained} px the checkpoint was trained at", file=sys.stderr, flush=True)


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _bar(config: ImageNetAConfig, total: int):
    """A tqdm bar over the evaluated images (stderr), or nothing without ``progress`` / with ``quiet``."""
    if not config.progress or config.quiet:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="imagenet-a", mininterval=1.0, file=sys.stderr)


def _figure(out: Path, mode: str, rate, curve, res) -> None:
    plt = plt_or_none()
    if plt is not None and rate:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([100 * r for r in rate], [100 * a for a in curve], color="tab:blue")
        ax.axhline(100 * res["accuracy"], color="tab:gray", ls="--", label=f"accuracy {pct(res['accuracy'])}")
        ax.set_xlabel("response rate (%)")
        ax.set_ylabel("accuracy of answered (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{mode}: AURRA {pct(res['aurra'])}, n={res['n']}")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, out / "response_rate.png")


def _split_text(d: dict) -> str:
    rec = d.get("seeded_split")
    if not rec:
        return d["split"]
    return f"{d['split']} of the checkpoint's seeded split (seed {rec['seed']}, test fraction {rec['test_fraction']} of {rec['num_images']})"


def _markdown(r: dict, scores: str) -> str:
    lines = [
        "# ImageNet-A style evaluation",
        "",
        f"- mode: {r['mode']} ({'200-class ImageNet-A protocol' if r['mode'] == 'imagenet-a' else 'classes matched by wnid'})",
        f"- checkpoint: {r['checkpoint']['path']} ({r['checkpoint']['model']}, {r['checkpoint']['num_classes']} classes); softmax over {scores}",
        f"- data: {r['dataset']['root']} ({r['dataset']['num_images']} images, {r['dataset']['num_classes_present']} classes"
        + (f", split {_split_text(r['dataset'])})" if "split" in r["dataset"] else ")"),
        "",
    ]
    if r["mode"] == "subset":
        lines += [
            f"Coverage: {r['classes_covered']} / {r['classes_total']} classes ({pct(r['class_coverage'])}), "
            f"{r['images_covered']} / {r['images_total']} images ({pct(r['image_coverage'])}).",
            "",
        ]
    lines += [
        "| metric | value |",
        "| --- | ---: |",
        f"| top-1 accuracy | {pct(r['accuracy'])} |",
        f"| RMS calibration error (adaptive bins, all) | {pct(r['calibration_error'])} |",
        f"| RMS calibration error (reference: last bin dropped) | {pct(r['calibration_error_reference'])} |",
        f"| AURRA | {pct(r['aurra'])} |",
        f"| images evaluated | {r['n']} |",
        "",
    ]
    if r["n"] == 0:
        lines += ["n/a: no image was evaluated, so no metric is defined.", ""]
    elif r["calibration_error_reference"] is None:
        lines += [f"n/a: the reference variant drops the last bin and needs at least 2 bins, i.e. 2 x bin size "
                  f"({2 * r['bin_size']}) images; {r['n']} were evaluated.", ""]
    lines += ["Samples of equal confidence are handled as a group: the metrics do not depend on the image order "
              "(see bagcert.metrics).", ""]
    if r["mode"] == "subset":
        lines += [f"Accuracy counting uncovered images as wrong: {pct(r['accuracy_all_images'])}.", ""]
    return "\n".join(lines)
