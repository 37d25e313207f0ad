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

from ._common import (
    Parser, add_run_arguments, bounded_number, config_from_args, exit_on_sigterm, nonnegative_int, positive_int,
    positive_number, run_report, unit_number,
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
    """``bagcert defensive-patch``: argv -> :class:`bagcert.runs.defensive_patch.DefensivePatchConfig` ->
    :func:`bagcert.runs.defensive_patch.defensive_patch_run`; prints summary.md and the folder (unless --quiet),
    then the one-line JSON summary. Exit status 0, 1 with one line on stderr for a mistake in the input, 2 for a
    usage error."""
    from ..runs.defensive_patch import DefensivePatchConfig, defensive_patch_run

    args = build_parser(prog).parse_args(argv)
    config = config_from_args(DefensivePatchConfig, args)
    return run_report(defensive_patch_run, config, args.quiet)


if __name__ == "__main__":
    raise SystemExit(main())
