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
import sys

from ._common import Parser, add_run_arguments, config_from_args, device, exit_on_sigterm, positive_int, run_report


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


@exit_on_sigterm
def main(argv=None, prog: str = "bagcert imagenet-a") -> int:
    """``bagcert imagenet-a``: argv -> :class:`bagcert.runs.imagenet_a.ImageNetAConfig` ->
    :func:`bagcert.runs.imagenet_a.imagenet_a_run`; prints summary.md and the folder (unless --quiet), then the
    one-line JSON summary. Exit status 0, 1 with one line on stderr for a mistake in the input, 2 for a usage
    error (--dataset missing included)."""
    from ..runs.imagenet_a import ImageNetAConfig, imagenet_a_run

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.dataset is None:
        parser.error("the following argument is required: --dataset")
    if any(a == "--data" or a.startswith("--data=") for a in (sys.argv[1:] if argv is None else argv)):
        print("--data is deprecated: use --dataset (same meaning)", file=sys.stderr)
    config = config_from_args(ImageNetAConfig, args)
    return run_report(imagenet_a_run, config, args.quiet)


if __name__ == "__main__":
    raise SystemExit(main())
