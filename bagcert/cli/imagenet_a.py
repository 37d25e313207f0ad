"""Evaluate a checkpoint on ImageNet-A (or on any ImageFolder of ImageNet wnids) and write a report.

Two modes (``--mode auto`` picks by the model's number of classes):

* ``imagenet-a``: a 1000-class ImageNet model on an ``imagenet-a/<wnid>/<image>`` folder with the
  200-class protocol (:func:`bagcert.imagenet_a.evaluate_imagenet_a`: logits restricted to the 200
  ImageNet-A classes; accuracy, RMS calibration error, AURRA). A partial copy (fewer than 200
  folders) needs ``--wnids-file`` (the 200 wnids in order, one per line) or ``--indices-json``
  (``{wnid: ImageNet-1k index}``).
* ``subset``: a model trained on a subset of ImageNet classes whose checkpoint metadata lists its
  ``classes`` as wnids (e.g. Imagenette's 10), on any ``<root>/<wnid>/<image>`` folder
  (:func:`bagcert.imagenet_a.evaluate_subset_model`: classes matched by wnid; the report gives the
  coverage, and metrics on the covered images).

The real ImageNet-A images are not available in this environment; the tests use synthetic folders.

Examples (`bagcert imagenet-a ...` and `python -m bagcert.cli.imagenet_a ...` are the same command):
    bagcert imagenet-a --checkpoint in1k.pt --dataset /data/imagenet-a --output outputs/ina
    bagcert imagenet-a --checkpoint checkpoints/bagcert_imagenette_r17s8.pt --dataset ../shared/data/imagenette/images-160 \
        --output outputs/inette          # bagcert-imagenette-r17 (its held-out split of that folder)

Outputs in --output: results.json, summary.md, response_rate.png (matplotlib); the last printed
line is a one-line JSON summary. The default folder (outputs/imagenet_a, --output not given) is replaced
by each run, saying so on stderr; a folder given with --output that holds a report needs --overwrite.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from ._common import (Parser, exit_on_sigterm, add_run_arguments, commit_report, device, json_line, output_is_default, pct, plt_or_none, positive_int,
                      prepare_output, save_figure, set_threads, show_path, subset, user_errors, write_report, written_message)

_WNID = re.compile(r"n\d{8}")


def build_parser(prog: str = "bagcert imagenet-a"):
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--checkpoint", required=True, help="bagcert checkpoint")
    p.add_argument("--dataset", help="folder <root>/<wnid>/<image> (ImageNet-A or any ImageNet-style folder); required")
    p.add_argument("--data", dest="dataset", help=argparse.SUPPRESS)  # the earlier name of --dataset, still accepted
    p.add_argument("--mode", choices=["auto", "imagenet-a", "subset"], default="auto",
                   help="imagenet-a: 1000-class model, 200-class protocol; subset: model classes matched by wnid (default: by class count)")
    p.add_argument("--size", type=positive_int, help="crop size (default: the checkpoint's input_size, else 224)")
    p.add_argument("--resize", type=positive_int, help="shorter side before the centre crop (default: checkpoint 'resize', else round(size * 256 / 224))")
    p.add_argument("--wnids-file", help="imagenet-a mode, partial copies: the 200 ImageNet-A wnids in order, one per line")
    p.add_argument("--indices-json", help="imagenet-a mode, partial copies: JSON {wnid: ImageNet-1k index}")
    p.add_argument("--scores", choices=["mean_logits", "votes"], default="mean_logits",
                   help="what the softmax is taken over for bagcert models: mean local logits or vote counts")
    p.add_argument("--split", choices=["auto", "test", "train", "all"], default="auto",
                   help="subset mode, a folder without split folders: the part of the checkpoint's seeded train/test split "
                   "(test, train) or every image (all). auto (default): test when the folder has exactly the image count "
                   "the checkpoint's split was made over (its training folder), else all; the report says which")
    p.add_argument("--num-images", type=positive_int, help="evaluate only N images (the first N of a seeded permutation; default: all)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call")
    p.add_argument("--bin-size", type=positive_int, default=100, help="adaptive calibration bin size (100 in the protocol)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    add_run_arguments(p, "outputs/imagenet_a")
    return p


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
        raise SystemExit(f"--dataset {root} --split {split}: {e}") from None


@exit_on_sigterm
def main(argv=None, prog: str = "bagcert imagenet-a") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.dataset is None:
        parser.error("the following argument is required: --dataset")
    from ..checkpoint import load_checkpoint
    from ..imagenet_a import IMAGENET_A_INDICES, evaluate_imagenet_a, evaluate_subset_model, load_imagenet_a

    if any(a == "--data" or a.startswith("--data=") for a in (sys.argv[1:] if argv is None else argv)):
        print("--data is deprecated: use --dataset (same meaning)", file=sys.stderr)
    set_threads(args)
    # an unwritable --output or another run's report: refused before any work; written at the end as one set
    folder = prepare_output(args.output, args.overwrite, default_folder=output_is_default(args), dataset=args.dataset)
    with user_errors(f"--checkpoint {args.checkpoint}: "):
        model, meta = load_checkpoint(args.checkpoint)
    model.to(args.device).eval()
    size = args.size or int(meta.get("input_size", 224))
    if args.size is not None:
        _check_size(model, meta, args.size)
    resize = args.resize or meta.get("resize") or round(size * 256 / 224)
    if resize < size:
        raise SystemExit(f"--resize ({resize}) must be >= the crop size ({size})")
    mode = args.mode
    if mode == "auto":
        mode = "imagenet-a" if model.num_classes == 1000 else "subset"
    root = Path(args.dataset)
    recorder = _Recorder(_scores_fn(model, args.scores, args.device))

    if mode == "imagenet-a":
        if model.num_classes != 1000:
            raise SystemExit(f"--mode imagenet-a needs a 1000-class ImageNet model; this checkpoint has {model.num_classes} classes (use --mode subset)")
        wnids = Path(args.wnids_file).read_text().split() if args.wnids_file else None
        indices = json.loads(Path(args.indices_json).read_text()) if args.indices_json else None
        data = load_imagenet_a(root, size=size, resize=resize, wnids=wnids, indices=indices, allow_subset=bool(wnids or indices))
        images, labels = data.images, data.labels
        if args.num_images is not None and args.num_images < len(labels):
            if args.num_images < 1:
                raise SystemExit(f"--num-images must be >= 1, got {args.num_images}")
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[: args.num_images].sort().values
            images, labels = images[keep], labels[keep]
        with torch.no_grad(), _bar(args, int(labels.numel())) as recorder.bar:
            res = evaluate_imagenet_a(recorder, images, labels, batch_size=args.batch_size, bin_size=args.bin_size)
        columns = torch.tensor(IMAGENET_A_INDICES)
        rec_logits, rec_targets = recorder.logits()[:, columns], labels
        present = sorted({data.wnids[int(j)] for j in labels.unique()})
        res.update(classes_total=len(present), images_total=int(labels.numel()))
        dataset = {"name": "ImageNet-A layout", "root": str(root), "num_images": int(labels.numel()), "num_classes_present": len(present)}
    else:
        model_wnids = meta.get("classes")
        if not model_wnids or not all(isinstance(w, str) and _WNID.fullmatch(w) for w in model_wnids):
            raise SystemExit("--mode subset needs a checkpoint whose metadata 'classes' are ImageNet wnids (n + 8 digits)")
        if len(model_wnids) != model.num_classes:
            raise SystemExit(f"checkpoint lists {len(model_wnids)} classes for a {model.num_classes}-class model")
        data = _subset_mode_data(root, args.split, meta.get("split"), size, resize, cache=args.cache)
        data = subset(data, args.num_images, args.seed)
        with torch.no_grad(), _bar(args, len(data)) as recorder.bar:
            res = evaluate_subset_model(recorder, data.images, data.labels, model_wnids, data.classes,
                                        batch_size=args.batch_size, bin_size=args.bin_size)
        to_model = torch.tensor([model_wnids.index(w) if w in model_wnids else -1 for w in data.classes])
        target = to_model[data.labels]
        rec_logits, rec_targets = recorder.logits(), target[target >= 0]
        dataset = {"name": data.name, "root": str(root), "split": data.info.get("split", "all"), "num_images": len(data),
                   "num_classes_present": int(data.labels.unique().numel())}
        if "seeded_split" in data.info:
            dataset["seeded_split"] = data.info["seeded_split"]

    rate, curve = _response_curve(rec_logits, rec_targets)
    config = dict(vars(args), mode=mode, size=size, resize=resize)
    ckpt = {"path": str(args.checkpoint), "model": model.config["name"], "num_classes": model.num_classes}
    results = {"mode": mode, "checkpoint": ckpt, "dataset": dataset, "scores": args.scores, "bin_size": args.bin_size, **res}
    md = _markdown(results, args.scores)
    config.pop("output_given", None)
    doc = write_report(folder, "bagcert.cli.imagenet_a", config, results, md, device=args.device)
    try:
        _figure(folder.stage(), mode, rate, curve, res)
        commit_report(folder)
    finally:
        folder.discard()
    if not args.quiet:
        print(md)
        print(written_message(args.output))
    line = {k: doc.get(k) for k in ("mode", "accuracy", "calibration_error", "aurra", "n")}
    if mode == "subset":
        line.update(image_coverage=doc["image_coverage"], class_coverage=doc["class_coverage"])
    line["output"] = show_path(args.output)
    print(json_line(line))
    return 0


def _check_size(model, meta: dict, size: int) -> None:
    """``--size``: refused below one receptive field of the model (and below its smallest input): every output
    location would see mostly padding, nothing the model was trained on. A size other than the checkpoint's
    ``input_size`` is allowed (a BagNet is a bag of local features) and said on stderr."""
    geometry = getattr(model, "geometry", None)
    if geometry is not None:
        least = max(max(geometry.receptive_field), geometry.min_input_size())
        if size < least:
            raise SystemExit(f"--size {size} is smaller than the model's receptive field ({least} px): the crops would hold "
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


def _bar(args, total: int):
    """A tqdm bar over the evaluated images (stderr), or nothing with --no-progress / --quiet."""
    if not args.progress or args.quiet:
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


if __name__ == "__main__":
    raise SystemExit(main())
