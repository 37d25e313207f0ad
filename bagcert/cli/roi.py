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

from ._common import (
    Parser, add_run_arguments, config_from_args, exit_on_sigterm, nonnegative_int, parse_number, positive_int, positive_number,
    run_report, unit_number,
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
    """``bagcert roi``: argv -> :class:`bagcert.runs.roi.RoiConfig` -> :func:`bagcert.runs.roi.roi_run`; prints
    summary.md and the folder (unless --quiet), then the one-line JSON summary. Exit status 0, 1 with one line on
    stderr for a mistake in the input, 2 for a usage error."""
    from ..runs.roi import RoiConfig, roi_run

    args = build_parser(prog).parse_args(argv)
    config = config_from_args(RoiConfig, args)
    return run_report(roi_run, config, args.quiet)


if __name__ == "__main__":
    raise SystemExit(main())
