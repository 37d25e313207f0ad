"""Make defensive patches for a checkpoint and evaluate them (with / without the patch).

Patches are made on --train-split images (stage 1: local prior; stage 2: global correlation, see
bagcert.defense.defensive_patch) and evaluated on --eval-split images of the same dataset: clean,
common corruptions x severities, L-inf PGD and a random-position adversarial patch, on the source
model and on every --transfer-checkpoint.

Examples (`bagcert defensive-patch ...` and `python -m bagcert.cli.defensive_patch ...` are the same command):
    # the shipped default model, bagcert-cifar10-r5 (v2)
    bagcert defensive-patch --checkpoint checkpoints/bagcert_cifar10_r5s2_v2.pt \\
        --dataset ../shared/data/cifar10 --num-train 2000 --num-eval 500 --output outputs/defpatch
    bagcert defensive-patch --checkpoint a.pt --transfer-checkpoint b.pt --patch outputs/defpatch/defensive_patch.pt ...
    # stage 2 with several models (per-model copies, then correlation matching), evaluated on a held-out model
    bagcert defensive-patch --checkpoint a.pt --ensemble-checkpoint b.pt --transfer-checkpoint c.pt ...

Outputs in --output: results.json, summary.md, defensive_patch.pt (reload with
bagcert.defense.DefensivePatch.load), patches.png and corruptions.png (matplotlib), written into a private
staging folder and moved into place as one set (a folder that already holds a report needs --overwrite); the
last printed line is a one-line JSON summary. The default folder (outputs/defensive_patch, --output not given)
is replaced by each run, saying so on stderr. Input mistakes end with one line on stderr before any work.
When an evaluation fails after a patch was made, the patch is kept in the staging folder (its path is printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ._common import (
    Parser, checkpoint_input_size, exit_on_sigterm, add_run_arguments, bounded_number, dataset_info, json_line, load_model_and_data, nonnegative_int,
    parse_list, pct, plt_or_none, positive_int, positive_number, unit_number, progress_bar, commit_report, output_is_default,
    prepare_output, show_path, written_message, save_figure, set_threads, user_errors, write_report,
)


def build_parser(prog: str = "bagcert defensive-patch"):
    p = Parser(prog=prog, description=__doc__)
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", required=True, help="the model the patches are made for")
    g.add_argument("--ensemble-checkpoint", action="append", default=[],
                   help="another model the patches are made with: stage 2 keeps one copy per model and matches their "
                        "correlations (repeatable); the patches are evaluated on it too")
    g.add_argument("--transfer-checkpoint", action="append", default=[], help="another model to evaluate the same patches on (repeatable)")
    g.add_argument("--dataset", required=True, help="CIFAR-10 folder, ImageNet-style folder or synthetic[:N]")
    g.add_argument("--train-split", default="train", help="split the patches are made on (default: train)")
    g.add_argument("--eval-split", default="test", help="split they are evaluated on (default: test)")
    g.add_argument("--num-train", type=positive_int,
                   help="training images (first N of a seeded permutation; default 1000 or all when fewer; more than the split has is refused)")
    g.add_argument("--num-eval", type=positive_int,
                   help="evaluation images (first N of a seeded permutation; default 200 or all when fewer; more than the split has is refused)")
    g.add_argument("--patch", help="evaluate this saved patch instead of making one")
    g = p.add_argument_group("patch shape")
    g.add_argument("--shape", choices=["frame", "square"], default="frame")
    g.add_argument("--outer", type=positive_int, help="frame: outer side (default: image side - 2 * round(side / 32))")
    g.add_argument("--width", type=positive_int, help="frame: ring width (default: round(2 * side / 32))")
    g.add_argument("--size", type=positive_int, help="square: side (default: side / 4)")
    g.add_argument("--corner", choices=["top-left", "top-right", "bottom-left", "bottom-right"], help="square: corner")
    g = p.add_argument_group("optimisation")
    g.add_argument("--stage1-epochs", type=nonnegative_int, default=10)
    g.add_argument("--stage1-lr", type=positive_number, default=1e-3)
    g.add_argument("--stage2-epochs", type=nonnegative_int, default=30)
    g.add_argument("--stage2-lr", type=positive_number, default=0.03, help="per-model copies (cross-entropy)")
    g.add_argument("--correlation-lr", type=positive_number, default=0.03, help="shared patch (correlation matching)")
    g.add_argument("--milestones", default="3,8,15,25", help="outer epochs where both learning rates are multiplied by --gamma")
    g.add_argument("--gamma", type=bounded_number(0, 1, lo_open=True, what="a decay factor in (0, 1]"), default=1 / 3,
                   help="learning-rate factor at each milestone, in (0, 1]")
    g.add_argument("--batch-size", type=positive_int, default=128)
    g.add_argument("--blank", type=unit_number, default=0.5, help="stage 1 background value, a pixel value in [0, 1]")
    g.add_argument("--eot", action="store_true", help="expectation over random shifts / brightness during optimisation")
    g.add_argument("--max-shift", type=nonnegative_int, default=2)
    g.add_argument("--brightness", type=unit_number, default=0.1, help="--eot: brightness shifts up to this, in [0, 1]")
    g = p.add_argument_group("evaluation")
    g.add_argument("--corruptions", default="all", help="comma-separated names, 'all' or 'none'")
    g.add_argument("--severities", default="1,2,3,4,5")
    g.add_argument("--pgd-eps", type=unit_number, default=8 / 255, help="L-inf budget in [0, 1] pixel units (0 skips PGD); accepts 8/255")
    g.add_argument("--pgd-steps", type=nonnegative_int, default=10)
    g.add_argument("--pgd-step", type=positive_number, default=2 / 255)
    g.add_argument("--attack-patch-size", type=nonnegative_int, default=5, help="adversarial patch side, at most the image side (0 skips)")
    g.add_argument("--attack-steps", type=nonnegative_int, default=20)
    g.add_argument("--attack-step", type=positive_number, default=0.05)
    g.add_argument("--attack-restarts", type=positive_int, default=1)
    g.add_argument("--prediction", choices=["model", "logits"], default="model", help="accuracy of argmax model(x) (votes) or of the mean logits")
    g.add_argument("--eval-batch-size", type=positive_int, default=100)
    add_run_arguments(p, "outputs/defensive_patch")
    return p


@exit_on_sigterm
def main(argv=None, prog: str = "bagcert defensive-patch") -> int:
    args = build_parser(prog).parse_args(argv)
    from ..checkpoint import load_checkpoint
    from ..defense import CORRUPTIONS, DefensivePatch, make_defensive_patches

    set_threads(args)
    if args.corruptions == "all":
        corruptions = list(CORRUPTIONS)
    elif args.corruptions == "none":
        corruptions = []
    else:
        corruptions = parse_list(args.corruptions, str, "corruptions")
        bad = [c for c in corruptions if c not in CORRUPTIONS]
        if bad:
            raise SystemExit(f"--corruptions: unknown {bad}; choose from {sorted(CORRUPTIONS)}")
    severities = parse_list(args.severities, int, "severities")
    if any(not 1 <= s <= 5 for s in severities):
        raise SystemExit(f"--severities must lie in 1..5, got {severities}")
    milestones = parse_list(args.milestones, int, "milestones")
    # before any work; written at the end as one set (a default folder is replaced, an explicit one needs --overwrite)
    folder = prepare_output(args.output, args.overwrite, default_folder=output_is_default(args), dataset=args.dataset)

    model, meta, test = load_model_and_data(args.checkpoint, args.dataset, args.eval_split, args.seed, args.num_eval,
                                            "--num-eval", default=200, cache=args.cache)
    _check_geometry(args, tuple(test.images.shape[-2:]))  # before the patch is made: an hour of work must not end in it

    source_classes = list(meta.get("classes") or ([] if test.name == "synthetic" else test.classes))

    def other_model(path, role):
        """Another model the patches are evaluated on: it must predict the source model's classes, in the same
        order (a patch is made for a class label; a model of other classes would be scored against wrong labels)."""
        with user_errors(f"--{role}-checkpoint {path}: "):
            m, other_meta = load_checkpoint(path)
        if m.num_classes != model.num_classes:
            raise SystemExit(f"{role} model {path} has {m.num_classes} classes, the source model {model.num_classes}")
        classes = list(other_meta.get("classes") or [])
        if source_classes and classes != source_classes:
            what = (f"records no class names, so its labels cannot be matched to the source model's {source_classes}" if not classes
                    else f"predicts the classes {classes}, the source model {source_classes}")
            raise SystemExit(f"--{role}-checkpoint {path} {what}: its accuracy with the patches would be scored against "
                             f"other labels; give a model of the source model's classes")
        if checkpoint_input_size(other_meta, path) != checkpoint_input_size(meta, args.checkpoint):
            raise SystemExit(f"--{role}-checkpoint {path} was trained on {checkpoint_input_size(other_meta, path)} px images, the "
                             f"source model on {checkpoint_input_size(meta, args.checkpoint)} px: the patches do not fit it")
        return m.eval()

    overlap = set(map(str, args.ensemble_checkpoint)) & set(map(str, args.transfer_checkpoint))
    if overlap:
        raise SystemExit(f"{sorted(overlap)} given as both --ensemble-checkpoint and --transfer-checkpoint: a transfer model must be held out")
    ensemble = {str(path): other_model(path, "ensemble") for path in args.ensemble_checkpoint}
    transfer = {str(path): other_model(path, "transfer") for path in args.transfer_checkpoint}
    if args.patch and ensemble:
        raise SystemExit("--ensemble-checkpoint makes a patch; it cannot be combined with --patch")
    t0 = time.perf_counter()
    if args.patch:
        with user_errors(f"--patch {args.patch}: "):
            patch = DefensivePatch.load(args.patch)
        made = None
    else:
        _, _, train = load_model_and_data(args.checkpoint, args.dataset, args.train_split, args.seed, args.num_train,
                                          "--num-train", default=1000, cache=args.cache)
        if args.train_split == args.eval_split:
            common = set(train.indices.tolist()) & set(test.indices.tolist())
            if common:
                raise SystemExit(
                    f"--train-split and --eval-split are both {args.train_split!r}: {len(common)} of the {len(test)} "
                    f"evaluation images would also be images the patch is made on; give splits that do not overlap "
                    f"(e.g. --train-split train --eval-split test)")
        bar = None
        if not args.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=args.stage1_epochs + args.stage2_epochs, unit="epoch", desc="defensive patch", mininterval=1.0,
                       file=sys.stderr)
        patch = make_defensive_patches(
            [model, *ensemble.values()], train.images, train.labels, num_classes=model.num_classes, shape=args.shape, outer=args.outer,
            width=args.width, size=args.size, corner=args.corner, stage1_epochs=args.stage1_epochs, stage1_lr=args.stage1_lr,
            stage2_epochs=args.stage2_epochs, stage2_lr=args.stage2_lr, correlation_lr=args.correlation_lr,
            milestones=milestones, gamma=args.gamma, batch_size=args.batch_size, blank=args.blank, eot=args.eot,
            max_shift=args.max_shift, brightness=args.brightness, seed=args.seed, classes=list(test.classes),
            progress=None if bar is None else (lambda stage, epoch, history: bar.update(1)),
        )
        if bar is not None:
            bar.close()
        made = {"dataset": dataset_info(train, args.train_split), "seconds": time.perf_counter() - t0}
    if patch.num_classes != model.num_classes or patch.image_size != tuple(test.images.shape[-2:]):
        raise SystemExit(f"patch is for {patch.num_classes} classes at {patch.image_size}; model/data need {model.num_classes} at {tuple(test.images.shape[-2:])}")
    out = Path(args.output)
    stage = folder.stage()
    patch.save(stage / "defensive_patch.pt")
    try:
        return _evaluate_and_report(args, folder, patch, made, model, ensemble, transfer, test, corruptions, severities, milestones)
    except BaseException:
        if made is not None and folder.staging is not None:  # an hour of patch making is not thrown away
            kept = folder.keep()
            print(f"the run failed after making the patch; the patch is kept in {kept / 'defensive_patch.pt'}", file=sys.stderr)
        raise
    finally:
        folder.discard()


def _check_geometry(args, image_size) -> None:
    """The patch shape and the attack patch against the ``image_size`` (H, W) images, before any work: the shape
    options of the other shape are refused, a frame or square that does not fit is one line
    (:func:`bagcert.defense.patch_mask`'s rule), and so is an attack patch larger than the images."""
    from ..defense.defensive_patch import patch_mask

    H, W = image_size
    other = ("--size", "--corner") if args.shape == "frame" else ("--outer", "--width")
    given = [f for f in other if getattr(args, f[2:]) is not None]
    if given:
        raise SystemExit(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --shape "
                         f"{'square' if args.shape == 'frame' else 'frame'} only, not --shape {args.shape}")
    if not args.patch:
        kwargs = {"outer": args.outer, "width": args.width} if args.shape == "frame" else {"size": args.size, "corner": args.corner}
        try:
            patch_mask((H, W), args.shape, **kwargs)
        except ValueError as e:
            given = " ".join(f"--{k} {v}" for k, v in kwargs.items() if v is not None)
            raise SystemExit(f"--shape {args.shape}{' ' + given if given else ''}: {e}") from None
    if args.attack_patch_size > min(H, W):
        raise SystemExit(f"--attack-patch-size {args.attack_patch_size} is larger than the {H}x{W} images "
                         f"(at most {min(H, W)}; 0 skips the patch attack)")


def _evaluate_and_report(args, folder, patch, made, model, ensemble, transfer, test, corruptions, severities, milestones) -> int:
    """Evaluate ``patch`` on every model, write the report into ``folder``'s staging folder and commit it."""
    from ..defense import evaluate_defensive_patch

    out = Path(args.output)
    kw = dict(
        corruptions=corruptions, severities=severities, pgd_eps=args.pgd_eps if args.pgd_eps > 0 else None,
        pgd_steps=args.pgd_steps, pgd_step=args.pgd_step,
        attack_patch_size=args.attack_patch_size if args.attack_patch_size > 0 else None, attack_steps=args.attack_steps,
        attack_step=args.attack_step, attack_restarts=args.attack_restarts, batch_size=args.eval_batch_size,
        seed=args.seed, prediction=args.prediction,
    )
    evaluations = {}
    models = progress_bar({"source": model, **ensemble, **transfer}.items(), not args.quiet, "evaluate patch",
                          total=1 + len(ensemble) + len(transfer), unit="model")
    for name, m in models:
        evaluations[name] = evaluate_defensive_patch(m, patch, test.images, test.labels, **kw)

    config = dict(vars(args), corruptions=corruptions, severities=severities, milestones=milestones)
    config.pop("output_given", None)
    results = {
        "checkpoint": {"path": str(args.checkpoint), "model": model.config["name"], "num_classes": model.num_classes},
        "ensemble_checkpoints": list(ensemble),
        "transfer_checkpoints": list(transfer),
        "dataset": dataset_info(test, args.eval_split),
        "patch": {"file": str(out / "defensive_patch.pt"), "shape": patch.config.get("shape"), "pixels_per_channel": patch.num_pixels,
                  "fraction_of_image": patch.num_pixels / (patch.image_size[0] * patch.image_size[1]), "loaded_from": args.patch,
                  "made": made, "history": patch.config.get("history")},
        "evaluations": evaluations,
    }
    md = _markdown(results)
    doc = write_report(folder, "bagcert.cli.defensive_patch", config, results, md)
    _figures(folder.stage(), patch, evaluations, list(test.classes), model.config["name"])
    commit_report(folder)
    if not args.quiet:
        print(md)
        print(written_message(out))
    src = doc["evaluations"]["source"]
    line = {"clean": src["clean"], "corruption_mean": src["corruption_mean"],
            "pgd": {k: src["pgd"][k] for k in ("without", "with")} if src["pgd"] else None,
            "patch_attack": {k: src["patch_attack"][k] for k in ("without", "with")} if src["patch_attack"] else None,
            "num_images": src["n"], "ensemble": {k: evaluations[k]["clean"] for k in ensemble},
            "transfer": {k: evaluations[k]["clean"] for k in transfer}, "output": show_path(out)}
    print(json_line(line))
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
