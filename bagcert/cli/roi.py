"""Region of Importance / Region of Attack report: accuracy on clean, adversarial and neutralised
images, the IoU of RoI and RoA across q, and heat-map figures (bagcert.analysis.roi).

Examples (`bagcert roi ...` and `python -m bagcert.cli.roi ...` are the same command):
    # the shipped default model, bagcert-cifar10-r5 (v2)
    bagcert roi --checkpoint checkpoints/bagcert_cifar10_r5s2_v2.pt --dataset ../shared/data/cifar10 \\
        --num-images 200 --attack patch --output outputs/roi
    bagcert roi --checkpoint m.pt --dataset synthetic:16 --attack pgd --roi occlusion --output outputs/roi-pgd

Outputs in --output: results.json, summary.md, heatmaps.png and iou.png (matplotlib), written into a private
staging folder and moved into place as one set (a folder that already holds a report needs --overwrite); the
last printed line is a one-line JSON summary. The default folder (outputs/roi, --output not given) is replaced
by each run, saying so on stderr. Input mistakes end with one line on stderr before any work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    Parser, exit_on_sigterm, add_run_arguments, dataset_info, json_line, load_model_and_data, nonnegative_int, parse_list, parse_number, pct,
    positive_number, unit_number,
    commit_report, output_is_default, plt_or_none, show_path, written_message, positive_int, prepare_output, save_figure, set_threads, write_report,
)


def _fill(text: str):
    if text in ("zero", "mean", "blur"):
        return text
    value = parse_number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"fill must be zero, mean, blur or a number in [0, 1], got {text!r}")
    return value


def build_parser(prog: str = "bagcert roi"):
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True, help="CIFAR-10 folder, ImageNet-style folder or synthetic[:N]")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=positive_int,
                   help="first N of a seeded permutation (default 100 or all when fewer; more than the split has is refused)")
    g = p.add_argument_group("attack")
    g.add_argument("--attack", choices=["patch", "pgd"], default="patch")
    g.add_argument("--eps", type=unit_number, default=8 / 255, help="pgd: L-inf budget in [0, 1] pixel units (accepts 8/255)")
    g.add_argument("--steps", type=nonnegative_int, default=20)
    g.add_argument("--step", type=positive_number, help="step size (default: 0.05 for patch, eps / 4 for pgd)")
    g.add_argument("--attack-patch-size", type=positive_int, default=5, help="patch side in pixels (at most the image side)")
    g = p.add_argument_group("regions")
    g.add_argument("--roi", choices=["auto", "local", "occlusion"], default="auto", help="auto: local logits for bagcert models")
    g.add_argument("--reduce", choices=["mean", "max"], default="mean", help="local RoI: mean or max over the locations seeing a pixel")
    g.add_argument("--occlusion-window", type=positive_int, default=8)
    g.add_argument("--occlusion-stride", type=positive_int, default=4)
    g.add_argument("--roa-box", type=positive_int, default=3, help="box filter side (odd)")
    g.add_argument("--q-roi", type=parse_number, default=20.0, help="percent of pixels kept in the RoI for neutralisation")
    g.add_argument("--q-roa", type=parse_number, default=10.0, help="percent of pixels kept in the RoA for neutralisation")
    g.add_argument("--qs", default="1,2,5,10,20,30,50", help="percentages for the IoU curve")
    g.add_argument("--fill", type=_fill, default="mean", help="zero, mean, blur or a number in [0, 1]")
    p.add_argument("--prediction", choices=["model", "logits"], default="model")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--num-figures", type=nonnegative_int, default=4, help="examples in heatmaps.png")
    add_run_arguments(p, "outputs/roi")
    return p


@exit_on_sigterm
def main(argv=None, prog: str = "bagcert roi") -> int:
    args = build_parser(prog).parse_args(argv)
    from ..analysis.roi import evaluate_neutralization

    set_threads(args)
    qs = parse_list(args.qs, float, "qs")
    for name, q in (("q-roi", args.q_roi), ("q-roa", args.q_roa), *(("qs", v) for v in qs)):
        if not 0 <= q <= 100:
            raise SystemExit(f"--{name} values are percentages in [0, 100], got {q}")
    if args.roa_box < 1 or args.roa_box % 2 == 0:
        raise SystemExit(f"--roa-box must be an odd integer >= 1, got {args.roa_box}")
    # before any work; written at the end as one set (a default folder is replaced, an explicit one needs --overwrite)
    folder = prepare_output(args.output, args.overwrite, default_folder=output_is_default(args), dataset=args.dataset)
    model, meta, data = load_model_and_data(args.checkpoint, args.dataset, args.split, args.seed, args.num_images, "--num-images",
                                            default=100, cache=args.cache)
    H, W = data.images.shape[-2:]
    if args.attack == "patch" and args.attack_patch_size > min(H, W):
        raise SystemExit(f"--attack-patch-size {args.attack_patch_size} is larger than the {H}x{W} images")
    res = evaluate_neutralization(
        model, data.images, data.labels, attack=args.attack, eps=args.eps, steps=args.steps, step=args.step,
        attack_patch_size=args.attack_patch_size, roi_method=args.roi, reduce=args.reduce,
        occlusion_window=args.occlusion_window, occlusion_stride=args.occlusion_stride, roa_box=args.roa_box,
        q_roi=args.q_roi, q_roa=args.q_roa, qs=qs, fill=args.fill, batch_size=args.batch_size, seed=args.seed,
        prediction=args.prediction, keep=args.num_figures, progress=not args.quiet,
    )
    examples = res.pop("examples", None)
    out = Path(args.output)
    config = dict(vars(args), qs=qs)
    config.pop("output_given", None)
    results = {"checkpoint": {"path": str(args.checkpoint), "model": model.config["name"]}, "dataset": dataset_info(data, args.split), **res}
    md = _markdown(results)
    doc = write_report(folder, "bagcert.cli.roi", config, results, md)
    try:
        _figures(folder.stage(), results, examples, (meta or {}).get("classes") or data.classes)
        commit_report(folder)
    finally:
        folder.discard()
    if not args.quiet:
        print(md)
        print(written_message(out))
    line = {k: doc[k] for k in ("clean_accuracy", "adversarial_accuracy", "neutralized_accuracy_oracle", "neutralized_accuracy_gradient", "neutralized_clean_accuracy")}
    line.update(roi_method=doc["roi_method"], num_images=doc["n"], output=show_path(out))
    print(json_line(line))
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
