"""Certify a checkpoint against adversarial patches, in batch, and write a report.

With no arguments it certifies the shipped default model, bagcert-cifar10-r5-dense
(checkpoints/bagcert_cifar10_r5s2_dense.pt), on the 200 CIFAR-10 test images bundled in samples/cifar10 and
prints the report (into outputs/certify, replaced by the next run that leaves --output at its default).
The shipped models and samples come with an installed package too: --checkpoint takes a shipped model's name
(`bagcert models` lists them with their card numbers) or a file.

Examples (`bagcert certify ...` and `python certify.py ...` are the same command):
    bagcert certify
    bagcert certify --dataset ../shared/data/cifar10 --patch-sizes 1,2,3,4,5,6,7,8,3x7 --output outputs/c10-full
    bagcert certify --checkpoint bagcert-imagenette-r17 --dataset ../shared/data/imagenette/images-160 --patch-sizes 1%,2%,3%
                                            # the Imagenette model (checkpoints/bagcert_imagenette_r17s8.pt)
    bagcert certify --checkpoint my.pt --dataset /data/imagenet/val --num-images 5000 --data-path stream --workers 8
    bagcert certify --checkpoint runs/mine/model.pt --model-module my_models.py   # a model of your own (docs/own_model_plugin.md)
    torchrun --nproc-per-node 2 certify.py --dataset ...     # shards images over processes, one report
    bagcert certify --attacks pgd,pgd-adaptive,universal,feature-space --attack-images 100 --patch-sizes 5

Data path (--data-path): "memory" decodes the whole split into one uint8 tensor first (fast for CIFAR-10 and
Imagenette); "stream" decodes batch by batch in --workers DataLoader processes and keeps only the per-sample
result rows, so memory does not grow with the number of images (ImageNet); "auto" (default) holds the set in
memory while it fits 25 % of the available memory (bagcert.streaming.choose_data_path). Both paths give the
same results.json numbers and per_sample.csv. The choice and its reason are printed on stderr and recorded
in results.json (config.data_path, config.data_path_reason). --attacks need the images in memory.

Speed and precision: the network runs as an inference copy (batch norm folded, dense models without dilated
convolutions, channels_last on the CPU; bagcert.inference) on chunks of a fixed number of images, so every image's
result is the same whatever --batch-size, the number of processes or the data path. --precision bf16 certifies the
model as evaluated in bf16 autocast (faster on CPUs with AMX / avx512_bf16 and on GPUs), recorded in the report.

Outputs in --output: results.json (canonical, schema in bagcert/report.py), per_sample.csv (one row per
image, with its dataset index and source file), summary.md, certified_accuracy.png (with matplotlib). Every
accuracy comes with its exact 95 % confidence interval over the images (docs/certification.md). The
last line printed is a one-line JSON summary. The files are written into a private staging folder beside
--output and moved into place together, so the folder always holds one run's complete set; a folder that
already holds a report is refused unless --overwrite (which replaces all of its files). Mistakes in the
input (arguments, checkpoint, dataset, output folder, an attack that cannot run) end with one line on
stderr and exit status 1 (2 for argument syntax) before any work and before anything is written. The
default folder (outputs/certify, --output not given) is replaced by each run, saying so on stderr.

With --attacks, a seeded subset of the certified images is also attacked for every patch size (see
docs/attacks.md); the report puts empirical robust accuracy per attack next to certified accuracy, and
the run exits with status 3 if any certified sample was broken (a soundness bug).

Peer classifiers (docs/peers.md): --checkpoint also takes the peer_classifier.pt that
`bagcert train --peer SPEC` writes (recognised by its format, no extra flag). The certifier is rebuilt from
the spec recorded in the file (de-randomized smoothing: band, mode, encoding; PatchCleanser: k, fill
and the patch size of its mask set), and the report has the same schema, plus the method's name and
its network evaluations per image:
    bagcert certify --checkpoint runs/drs-column-b4/peer_classifier.pt --dataset ../shared/data/cifar10 --patch-sizes 1,3,5
    bagcert certify --checkpoint runs/patchcleanser-p5/peer_classifier.pt --dataset ../shared/data/cifar10
A PatchCleanser classifier is certified with the mask set of its spec, for patch sizes up to that
patch (default: exactly it); a larger size is an error unless --mask-patch-size rebuilds the mask set
for a larger patch. --aggregation and --attacks apply to bagcert models only.

Robust masking of the votes (--robust-masking, bagcert models only; docs/peers.md): the model's votes
(local logits > 0, in {0, 1}) are certified with PatchGuard robust masking (bagcert.peers.PatchGuardMasking
with evidence="votes") instead of the vote count: for each class the window of the largest affected set that
holds the most votes is masked before the votes are counted, so the votes a patch adds fall into the masked
window and only the prediction's lost votes count. One forward pass per image; it combines with --dense. The
report's method is "patchguard-votes". It is refused with --attacks (the attacks optimise the vote count, not
the masked prediction) and with --aggregation:
    bagcert certify --checkpoint bagcert-cifar10-r5-dense --dataset ../shared/data/cifar10 --patch-sizes 5 --robust-masking

Double masking of the votes (--double-masking, bagcert models only; docs/peers.md): PatchCleanser's double-masking
rule applied to the vote map (bagcert.peers.LocalDoubleMasking): windows of the map that hold every affected set
R(p) are removed one and two at a time from the vote counts, and an image is certified when every two-mask
prediction is the same class. One forward pass per image plus window sums; it combines with --dense. The mask set
is built for the largest of --patch-sizes (rows and columns separately) and certifies every size with one
prediction, so the sizes share one result (certify one size per run for per-size numbers); it is recorded in
results.json (config.double_masking_mask_set). The report's method is "double-masking-votes". Refused with --attacks,
--aggregation and --robust-masking:
    bagcert certify --checkpoint bagcert-cifar10-r5-dense --dataset ../shared/data/cifar10 --patch-sizes 5 --double-masking
--double-masking-evidence logits applies the same rule to the local logits clipped into --double-masking-clip
(default -1,1; method "double-masking-logits"); both are recorded in results.json (config.double_masking_evidence,
config.double_masking_clip).

The default certificate of a shipped model (bagcert/shipped.json, "certifier"): bagcert-cifar10-r5-dense is certified
by double masking of its local logits clipped to (-1, 1) when no certificate flag (--double-masking, --robust-masking,
--aggregation), no --attacks and at most one patch size are given, at its card patch size 5 unless --patch-sizes
names one; --certifier votes gives the vote count, --certifier shipped insists on the shipped certificate. stderr
says which certificate is used; results.json records it (config.shipped_certifier).
"""

from __future__ import annotations

import argparse
import math
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ._common import (Parser, exit_on_sigterm, add_cache_argument, add_model_module_argument, import_model_modules, add_output_arguments,
                      check_workers_apply, checkpoint_input_size, device, one_line, output_is_default, positive_int, prepare_output,
                      show_path, user_errors, written_message)
from ._common import workers as _workers
from .. import shipped
from ._bad_images import bad_image_exit, check_skip_bad_images, drop_skipped, skip_record
from ..empirical import ATTACK_NAMES
from ..peers.classifiers import FORMAT as PEER_FORMAT

__all__ = ["build_parser", "main", "run_certification", "DEFAULT_MODEL", "DEFAULT_CHECKPOINT", "DEFAULT_DATASET", "DEFAULT_PATCH_SIZES"]

#: the shipped default model's name (--checkpoint's default), its file and the bundled samples (--dataset's
#: default): in a checkout's checkpoints/ and samples/, in an installed package under bagcert/_data
DEFAULT_MODEL = shipped.DEFAULT_MODEL
DEFAULT_CHECKPOINT = shipped.shipped_models()[DEFAULT_MODEL].path
DEFAULT_DATASET = shipped.samples_path("cifar10")
DEFAULT_PATCH_SIZES = "1,2,3,4,5,6,7,8,3x7,7x3"
DEFAULT_OUTPUT = "outputs/certify"
DATA_PATHS = ("auto", "memory", "stream")


def _percent(token: str) -> float:
    try:
        value = float(token[:-1])
    except ValueError:
        raise ValueError(f"patch size {token!r} is not understood: expected a percentage of the image area like '2%'") from None
    if not 0 < value <= 100:
        raise ValueError(f"patch area {token!r} must lie in (0, 100] %")
    return value


def _load_eval_data(args, meta, size, num_classes):
    """The images to certify, decoded into memory. A folder without split sub-folders is cut with the seeded
    split the checkpoint was trained with (``meta['split']``): ``--split test`` keeps its test part, ``--split
    all`` every image (``bagcert.data.load_checkpoint_split``). Any loading error about the input is one line
    (``SystemExit``)."""
    from ..data import load_checkpoint_split

    with user_errors(f"--dataset {args.dataset} --split {args.split}: "):
        data = load_checkpoint_split(args.dataset, args.split, meta.get("split"), size=size, resize=meta.get("resize"),
                                     seed=args.seed, num_classes=num_classes, cache=args.cache)
    if len(data) == 0:
        raise SystemExit(f"--dataset {args.dataset} --split {args.split}: no images to certify")
    return data


def _open_eval_stream(args, meta, size, num_classes):
    """The images to certify as a :mod:`bagcert.streaming` dataset, resolving ``--dataset`` / ``--split`` to the
    same images in the same order as :func:`_load_eval_data` (the checkpoint's seeded split included) without
    decoding them. Data that is held in memory by any loader (``synthetic[:N]``, torchvision's CIFAR-10
    batches) is loaded and wrapped (:class:`~bagcert.streaming.TensorStream`, attribute ``loaded``)."""
    from ..data import (SPLIT_NAMES_HINT, DatasetError, _find_cifar_batches, cut_seeded_split, _is_synthetic, _missing_split, _spec_root,
                        _split_folders)
    from ..streaming import TensorStream, open_stream

    spec, split, record = args.dataset, args.split, meta.get("split")
    root = None if _is_synthetic(spec) else _spec_root(spec)
    if root is None or not root.is_dir() or _find_cifar_batches(root) is not None:
        data = _load_eval_data(args, meta, size, num_classes)
        stream = TensorStream(data)
        stream.loaded = data
        return stream
    with user_errors(f"--dataset {spec} --split {split}: "):
        splits = _split_folders(root)
        if splits:
            if split not in splits:
                if split == "all":
                    raise DatasetError(f"{spec} has split folders ({', '.join(splits)}): name one of them, not 'all'")
                raise _missing_split(root, split, splits)
            return open_stream(spec, split, size=size, resize=meta.get("resize"), seed=args.seed, num_classes=num_classes)
        if split not in ("test", "train", "all"):
            raise DatasetError(f"split must be {SPLIT_NAMES_HINT} for a folder without split folders, got {split!r}")
        stream = open_stream(spec, split, size=size, resize=meta.get("resize"), seed=args.seed, num_classes=num_classes)
        if split == "all":
            stream.info["split"] = "all"
            return stream
        if not record:
            raise DatasetError(
                f"{spec} has no split folders and the checkpoint records no seeded split, so its {split} images cannot be "
                "told from the images it was trained on; retrain (train.py records its split in the checkpoint) or export "
                "the checkpoint with a split record, or ask for split 'all' to use every image knowingly"
            )
        return cut_seeded_split(stream, split, record, spec)  # the same cut as the in-memory path


def _open_data(args, meta, size, num_classes, attacks, world):
    """``(data, streamed, reason)``: the images to certify on the path ``--data-path`` asks for. ``auto`` decides
    with :func:`bagcert.streaming.choose_data_path` on the decoded size of the whole split (times the processes
    on this machine); ``--attacks`` need the images in memory (``auto`` then takes memory, ``stream`` is refused)."""
    from ..streaming import choose_data_path

    if args.data_path == "stream" and attacks:
        raise SystemExit("--data-path stream: --attacks need the images in memory; use --data-path memory (or auto)")
    if getattr(args, "skip_bad_images", False):  # image by image, so that one bad file costs only itself
        stream = _open_eval_stream(args, meta, size, num_classes)
        loaded = getattr(stream, "loaded", None)
        if loaded is not None:
            return loaded, False, "memory: the data is held in memory by its loader (--skip-bad-images: nothing to decode)"
        return stream, True, "stream: --skip-bad-images reads the images one by one and skips the files that cannot be decoded"
    if args.data_path == "memory" or attacks:
        data = _load_eval_data(args, meta, size, num_classes)
        c, h, w = data.images.shape[1:]
        if args.data_path == "memory":
            return data, False, choose_data_path(len(data) * c * h * w, override="memory")[1]
        return data, False, "memory: --attacks need the images in memory"
    stream = _open_eval_stream(args, meta, size, num_classes)
    if len(stream) == 0:
        raise SystemExit(f"--dataset {args.dataset} --split {args.split}: no images to certify")
    base = stream
    while hasattr(base, "base"):
        base = base.base  # the decoded size of the whole folder: what the in-memory path would hold
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    with user_errors("--data-path: "):
        path, reason = choose_data_path(base.decoded_bytes, override=args.data_path, copies=max(1, copies))
    if path == "memory":
        loaded = getattr(stream, "loaded", None)
        return (loaded if loaded is not None else _load_eval_data(args, meta, size, num_classes)), False, reason
    return stream, True, reason


def _stream_provenance(stream) -> dict:
    """:func:`bagcert.report.sample_provenance` of a stream: each item's index in the whole dataset and its source
    file, through any subsets."""
    from ..streaming import ImageFolderStream, TensorStream

    pos = torch.arange(len(stream))
    while hasattr(stream, "base"):
        pos, stream = stream.index[pos], stream.base
    if isinstance(stream, TensorStream):
        from ..report import sample_provenance

        whole = sample_provenance(stream.data)
        return {"dataset_index": [whole["dataset_index"][i] for i in pos.tolist()],
                "source": [whole["source"][i] for i in pos.tolist()], "index_base": whole["index_base"]}
    if isinstance(stream, ImageFolderStream):
        return {"dataset_index": pos.tolist(), "source": [stream.source(i) for i in pos.tolist()], "index_base": "dataset"}
    return {"dataset_index": pos.tolist(), "source": [""] * len(pos), "index_base": "dataset"}


def _image_hw(data) -> tuple:
    shape = data.image_shape if hasattr(data, "image_shape") else tuple(data.images.shape[1:])
    return int(shape[-2]), int(shape[-1])


def _resolve_size_tokens(flag: str, tokens, image_size) -> list:
    """``[(h, w), ...]`` for the size tokens of ``flag`` (percentages resolved for ``image_size``); a size given
    twice (``5,5`` or ``5,5x5`` or ``2%,5`` when 2 % is 5x5) is refused naming both tokens."""
    from ..evaluation import size_key
    from ..geometry import parse_patch_size, patch_side_for_area

    seen, out = {}, []
    for t in tokens:
        if t.endswith("%"):
            side = patch_side_for_area(_percent(t), image_size)
            size = (side, side)
        else:
            size = parse_patch_size(t)
        key = size_key(size)
        if key in seen:
            same = key if "x" in key else f"{key}x{key}"
            raise SystemExit(f"{flag}: {seen[key]!r} and {t!r} are the same patch size ({same}); give each size once")
        seen[key] = t
        out.append(size)
    return out


def build_parser(prog: str = "bagcert certify") -> argparse.ArgumentParser:
    """The argument parser of ``bagcert certify`` (every option's default is shown by ``--help``)."""
    p = Parser(prog=prog, description=__doc__)
    p.add_argument(
        "--checkpoint", default=DEFAULT_MODEL,
        help="a shipped model's name (bagcert models lists them), a bagcert checkpoint file, or a peer classifier "
        "(peer_classifier.pt of bagcert train --peer: de-randomized smoothing or PatchCleanser, certified with the spec "
        f"recorded in the file) (default: {DEFAULT_MODEL}, the shipped default model)",
    )
    add_model_module_argument(p, "for a checkpoint of a model registered outside bagcert")
    p.add_argument(
        "--dataset",
        help="CIFAR-10 folder (torchvision cifar-10-batches-py or <root>/test/<class>/*), an ImageNet-style folder, or "
        "synthetic[:N] (default: the 200 CIFAR-10 test images bundled with bagcert, samples/cifar10 in a checkout)",
    )
    p.add_argument(
        "--split", default="test",
        help="split folder for datasets that have one. For a folder without splits, 'test' is the seeded test split "
        "recorded in the checkpoint (if any) and 'all' every image",
    )
    p.add_argument(
        "--patch-sizes",
        help="comma-separated sizes: 5 for 5x5, 3x7 for height 3 x width 7, 2%% for a square of 2%% of the image area "
        f"(default: {DEFAULT_PATCH_SIZES}; for a PatchCleanser peer classifier the patch size of its mask set)",
    )
    p.add_argument("--aggregation", choices=["votes", "majority", "clipped"],
                   help="(default: the model's own) bagcert models only")
    p.add_argument("--dense", action="store_true",
                   help="certify a strided model's dense evaluation: the same weights at every pixel (stride 1, "
                   "bagcert.models.to_dense); more locations, a smaller share of them under a patch. bagcert models only")
    p.add_argument("--robust-masking", action="store_true",
                   help="certify with PatchGuard robust masking of the votes (report method patchguard-votes) instead of "
                   "the vote count; one forward pass per image; combines with --dense, not with --attacks or "
                   "--aggregation. bagcert models only")
    p.add_argument("--double-masking", action="store_true",
                   help="certify with double masking of the votes on the local map (PatchCleanser's rule on the vote "
                   "map, report method double-masking-votes) instead of the vote count; one forward pass per image; one "
                   "mask set, built for the largest of --patch-sizes, certifies every size; combines with --dense, not "
                   "with --attacks, --aggregation or --robust-masking. bagcert models only")
    p.add_argument("--double-masking-evidence", choices=["votes", "logits"],
                   help="with --double-masking: the evidence on the local map, votes 1[z > 0] (default) or the local "
                   "logits clipped into --double-masking-clip (report method double-masking-logits)")
    p.add_argument("--double-masking-clip", metavar="LOW,HIGH",
                   help="with --double-masking-evidence logits: the clip of the local logits, two finite numbers with "
                   "LOW < HIGH (default -1,1); write it with = when LOW is negative: --double-masking-clip=-2,2")
    p.add_argument("--certifier", choices=["shipped", "votes"],
                   help="votes: the vote count (BagCert's certificate); shipped: the shipped model's own default "
                   "certificate (bagcert-cifar10-r5-dense: double masking of the local logits clipped to (-1, 1), at its "
                   "card patch size 5 unless --patch-sizes is given). Default: the shipped certificate when no "
                   "certificate flag (--double-masking, --robust-masking, --aggregation) and no --attacks are given, "
                   "else the one they ask for; other checkpoints: the vote count")
    p.add_argument("--num-images", type=positive_int,
                   help="certify only the first N images of a seeded permutation (N larger than the data set is refused; "
                   "default: all)")
    p.add_argument("--batch-size", type=positive_int, default=250, help="images per batch and process (the results do not "
                   "depend on it: the network runs on chunks of a fixed size, bagcert.inference)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32, or bf16 autocast (faster on CPUs with AMX / avx512_bf16 and on GPUs): then the predictions and "
                   "certificates are those of the model as evaluated in bf16, recorded in the report. bagcert models only")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--data-path", choices=DATA_PATHS, default="auto",
                   help="memory: decode the whole split first; stream: decode batch by batch in --workers processes, "
                   "memory independent of the number of images; auto: memory while the decoded set fits 25%% of the "
                   "available memory")
    p.add_argument("--workers", type=_workers, default=0, help="DataLoader worker processes of the stream path "
                   "(0 decodes in the main process; at most what the CPU cores and memory allow); refused with --data-path memory")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="certify the other images when a file cannot be decoded (read on the stream path, image by image) "
                   "and list the skipped files in the report (results.json dataset.skipped_images, summary.md); without it "
                   "such a file ends the run with one line naming it")
    add_cache_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset (with --num-images) and synthetic data")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")
    add_output_arguments(p, DEFAULT_OUTPUT)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars on stderr")
    p.add_argument("--quiet", action="store_true", help="print only the final JSON line")
    q = p.add_argument_group("peer classifiers (a --checkpoint written by bagcert train --peer)")
    q.add_argument(
        "--mask-patch-size",
        help="PatchCleanser only: build the mask set for this patch (5 or HxW) instead of the one the spec records. The "
        "certificate then covers patch sizes up to it (sound for any classifier), but it certifies double masking with "
        "that mask set, which the classifier was not trained with (default: the spec's patch size)",
    )
    q.add_argument("--peer-batch-size", type=int, default=512, help="ablated / masked images per classifier call")
    a = p.add_argument_group("empirical attacks")
    a.add_argument("--attacks", default="", help="comma-separated list from: " + ", ".join(ATTACK_NAMES) + " (default: none)")
    a.add_argument("--attack-steps", type=int, default=150, help="PGD steps per location; universal-patch optimisation steps")
    a.add_argument("--attack-step-size", type=float, default=0.05, help="signed-gradient step in [0, 1] pixel units")
    a.add_argument("--attack-locations", type=int, default=80, help="PGD patch positions per image; universal-patch poses per image")
    a.add_argument("--attack-images", type=int, help="attack only the first N images of a seeded permutation (default: all; "
                   "at most the number of certified images)")
    a.add_argument("--attack-patch-sizes", help="sizes to attack, a subset of --patch-sizes (default: all of them)")
    a.add_argument("--attack-surrogate", choices=["relaxed_votes", "logits"], default="relaxed_votes", help="differentiable stand-in for the votes")
    a.add_argument("--universal-fit-images", type=int, default=256, help="images outside the attacked subset the universal patch is trained on")
    a.add_argument("--imagenet-patch-file", help="imagenet_patch.gz (default: $BAGCERT_IMAGENET_PATCH or ../shared/data/imagenet-patch/)")
    return p


def _rounded(ci):
    """A 95 % interval [lo, hi] rounded to 6 decimals for the JSON line (None stays None)."""
    return None if ci is None else [round(v, 6) for v in ci]


@exit_on_sigterm
def main(argv=None, prog: str = "bagcert certify") -> int:
    """Run the CLI; returns the exit status (0, or 3 when an attack broke a certified sample). A mistake in
    the input raises ``SystemExit`` with one line (printed on stderr by Python, exit status 1); argument
    syntax errors exit with status 2 and one line."""
    args = build_parser(prog).parse_args(argv)
    out = _run_cli(args)
    if out is None:  # a rank other than 0 under torchrun
        return 0
    summary, empirical, markdown = out
    if not args.quiet:
        print(markdown)
        print(written_message(args.output))
    line = {
        "method": summary["method"],
        "forward_passes_per_image": summary["forward_passes_per_image"],
        "clean_accuracy": round(summary["clean_accuracy"], 6),
        "certified_accuracy": {k: round(v, 6) for k, v in summary["certified_accuracy"].items()},
        "clean_accuracy_ci95": _rounded(summary.get("clean_accuracy_ci95")),
        "certified_accuracy_ci95": {k: _rounded(v) for k, v in (summary.get("certified_accuracy_ci95") or {}).items()},
        "num_images": summary["num_images"],
        "images_per_s": round(summary["images_per_s"], 2),
        "output": show_path(args.output),
    }
    if empirical:
        per = empirical["summary"]["per_size"]
        line["empirical_robust_accuracy"] = {k: {a: round(v, 6) for a, v in r["robust_accuracy"].items()} for k, r in per.items()}
        per = (summary.get("empirical") or {}).get("per_size") or {}
        line["empirical_robust_accuracy_ci95"] = {k: {a: _rounded(v) for a, v in (r.get("robust_accuracy_ci95") or {}).items()}
                                                  for k, r in per.items()}
        line["certified_broken"] = summary["certified_broken"]
    print(json.dumps(line))
    broken = {k: v for k, v in summary["certified_broken"].items() if v}
    if broken:
        from ..empirical import soundness_message

        for k in broken:
            print(soundness_message(empirical["results"][k]), file=sys.stderr)
        print(f"FAILED: certified samples were broken by attacks ({broken}); see {show_path(args.output)}/results.json", file=sys.stderr)
        return 3
    return 0


def run_certification(checkpoint=DEFAULT_CHECKPOINT, dataset=DEFAULT_DATASET, patch_sizes=None, *, output=None,
                      overwrite: bool = False, **options) -> dict:
    """Certify ``checkpoint`` on ``dataset`` and return the report's summary (the ``results.json`` document).

    The same run as ``bagcert certify`` without an argument vector: ``patch_sizes`` is a list of sizes (``5``,
    ``"3x7"``, ``(3, 7)``, ``"2%"``) or a comma-separated string (default: the CLI's); ``output`` the report
    folder (None: the report is built in a temporary folder and removed, only the summary is returned);
    ``overwrite``: replace a report already in ``output``. ``options`` are the CLI's other options by their
    argument names (``split``, ``num_images``, ``batch_size``, ``device``, ``aggregation``, ``data_path``,
    ``workers``, ``seed``, ``threads``, ``attacks``, ``attack_images``, ...); progress bars are off unless
    ``progress=True``. Nothing goes to stdout; stderr gets the data-path note (and the certificate with robust masking). Under torchrun every rank must call it; ranks other than 0 return
    an empty dict.

    Raises ``ValueError`` with the CLI's one-line message for any mistake in the input (unknown option, bad
    checkpoint, dataset, patch size, output folder, ...).
    """
    args = build_parser().parse_args([])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise ValueError(f"run_certification: unknown option(s) {', '.join(unknown)}; expected CLI option names such as "
                         "split, num_images, batch_size, device, data_path")
    args.progress = False
    for k, v in options.items():
        setattr(args, k, v)
    args.checkpoint, args.dataset, args.overwrite, args.output_given, args.quiet = str(checkpoint), str(dataset), bool(overwrite), True, True
    if patch_sizes is not None:
        if not isinstance(patch_sizes, str):
            patch_sizes = ",".join(p if isinstance(p, str) else f"{p[0]}x{p[1]}" if isinstance(p, (tuple, list)) else str(p)
                                   for p in patch_sizes)
        args.patch_sizes = patch_sizes
    if isinstance(args.attacks, (list, tuple)):
        args.attacks = ",".join(args.attacks)
    try:
        if output is not None:
            args.output = str(output)
            out = _run_cli(args)
        else:
            with tempfile.TemporaryDirectory(prefix="bagcert-certify-") as tmp:
                args.output = str(Path(tmp) / "report")
                out = _run_cli(args)
    except SystemExit as e:
        if isinstance(e.code, str):
            raise ValueError(e.code) from None
        raise
    return {} if out is None else out[0]


def _run_cli(args):
    """The whole run for parsed ``args``: ``(summary, empirical, markdown)`` on rank 0, None on other ranks;
    always leaves the process group it joined (without waiting for the other ranks when the run fails). An image
    that cannot be read is ``SystemExit`` with its one-line message."""
    from ..training import leave_process_group

    try:
        with bad_image_exit(args):  # a file the stream path cannot decode mid-run: one line naming it
            out = _run(args)
    except BaseException:  # an error or a signal: a peer may be gone, so no barrier (no gloo traceback after the message)
        leave_process_group(failed=True)
        raise
    leave_process_group()
    return out


def _run(args):
    from ..evaluation import StreamSource, certify_dataset, size_key
    from ..peers import certify_peer_dataset
    from ..report import ReportFolderError, sample_provenance, write_certification_report

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")

    # ---- 1. the arguments alone (nothing read, nothing written) --------------------------------------------
    attacks = _parse_attacks(args.attacks)
    unused = [f for f, v in (("--attack-patch-sizes", args.attack_patch_sizes), ("--attack-images", args.attack_images)) if v is not None]
    if unused and not attacks:
        raise SystemExit(f"{' and '.join(unused)} apply only with --attacks (no attack runs without it); give --attacks "
                         f"{ATTACK_NAMES[0]},... or drop {' and '.join(unused)}")
    if args.data_path == "memory":
        check_workers_apply(args.workers, "memory", "memory")
    if args.peer_batch_size < 1:
        raise SystemExit(f"--peer-batch-size must be >= 1, got {args.peer_batch_size}")
    if args.data_path not in DATA_PATHS:
        raise SystemExit(f"--data-path must be one of {', '.join(DATA_PATHS)}, got {args.data_path!r}")
    if args.patch_sizes is not None:
        size_tokens = _size_tokens("--patch-sizes", args.patch_sizes)
    attack_tokens = _size_tokens("--attack-patch-sizes", args.attack_patch_sizes) if args.attack_patch_sizes else None
    if args.robust_masking and attacks:
        raise SystemExit("--robust-masking cannot be combined with --attacks: the attacks optimise the vote count, not "
                         "the masked prediction, so they would not test its certificate; certify without --attacks")
    if args.robust_masking and args.aggregation:
        raise SystemExit(f"--robust-masking cannot be combined with --aggregation {args.aggregation}: robust masking "
                         "certifies the votes with its own rule; give one of the two")
    if getattr(args, "skip_bad_images", False):
        check_skip_bad_images(args, attacks, world)
    if args.double_masking:
        for flag, given in (("--attacks", bool(attacks)), ("--aggregation", bool(args.aggregation)),
                            ("--robust-masking", args.robust_masking)):
            if given:
                why = {"--attacks": "the attacks optimise the vote count, not the double-masking prediction, so they would "
                                    "not test its certificate; certify without --attacks",
                       "--aggregation": "double masking certifies the votes with its own rule; give one of the two",
                       "--robust-masking": "they are two different certificates of the votes; give one of the two"}[flag]
                raise SystemExit(f"--double-masking cannot be combined with {flag}: {why}")
    if args.precision not in ("fp32", "bf16"):
        raise SystemExit(f"--precision must be fp32 or bf16, got {args.precision!r}")
    if args.precision != "fp32" and (args.robust_masking or args.double_masking):
        flag = "--robust-masking" if args.robust_masking else "--double-masking"
        raise SystemExit(f"--precision {args.precision} applies to the vote-count certificate; {flag} runs in fp32")
    dm_evidence, dm_clip = _double_masking_options(args)
    _check_certifier_flag(args, attacks)
    if attacks:
        for flag, value in (("--attack-steps", args.attack_steps), ("--attack-locations", args.attack_locations)):
            if value < (0 if flag == "--attack-steps" else 1):
                raise SystemExit(f"{flag} must be {'>= 0' if flag == '--attack-steps' else '>= 1'}, got {value}")
        if args.attack_images is not None and args.attack_images < 1:
            raise SystemExit(f"--attack-images must be >= 1, got {args.attack_images}")
        if not 0 < args.attack_step_size <= 1:
            raise SystemExit(f"--attack-step-size is a signed-gradient step in [0, 1] pixel units and must lie in (0, 1], "
                             f"got {args.attack_step_size}")
        if args.universal_fit_images < 0:
            raise SystemExit(f"--universal-fit-images must be >= 0, got {args.universal_fit_images}")
        if args.data_path == "stream":
            raise SystemExit("--data-path stream: --attacks need the images in memory; use --data-path memory (or auto)")
    # ---- 2. the report folder: checked now, written only after the work (staged, then moved into place) --------
    folder = prepare_output(args.output, args.overwrite, default_folder=output_is_default(args), dataset=args.dataset) if rank == 0 else None

    # ---- 3. the checkpoint (a shipped model's name or a file; a peer classifier is recognised by its format) ----
    import_model_modules(getattr(args, "model_modules", None))  # models of the user's own, before the file is read
    _resolve_inputs(args)
    is_peer = _checkpoint_format(args.checkpoint) == PEER_FORMAT
    if is_peer and args.certifier:
        raise SystemExit(f"--certifier applies to bagcert models only; {args.checkpoint} is a peer classifier, certified "
                         "by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)")
    several = args.patch_sizes is not None and len(size_tokens) > 1
    shipped_cert = None if is_peer else _apply_shipped_certifier(args, attacks, several, rank)
    if shipped_cert is not None:
        dm_evidence, dm_clip = _double_masking_options(args)
    if is_peer and args.robust_masking:
        raise SystemExit(f"--robust-masking applies to bagcert models only; {args.checkpoint} is a peer classifier, "
                         "certified by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)")
    if is_peer and args.double_masking:
        raise SystemExit(f"--double-masking applies to bagcert models only; {args.checkpoint} is a peer classifier, "
                         "certified by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)")
    peer = _load_peer(args) if is_peer else None
    if peer is None and args.mask_patch_size:
        raise SystemExit("--mask-patch-size applies only to a PatchCleanser peer classifier (bagcert train --peer patchcleanser:P)")
    if peer is None:
        from ..checkpoint import load_checkpoint

        with user_errors(f"--checkpoint {args.checkpoint}: "):
            model, meta = load_checkpoint(args.checkpoint)
        if args.dense:
            from ..models import to_dense

            with user_errors(f"--dense: {args.checkpoint}: "):
                model = to_dense(model)
    else:
        model, meta = peer["classifier"], peer["metadata"]
    size = checkpoint_input_size(meta, args.checkpoint)
    if args.patch_sizes is None:
        text = DEFAULT_PATCH_SIZES if peer is None or peer["mask_patch"] is None else size_key(peer["mask_patch"])
        if shipped_cert is not None:
            text = shipped.shipped_models()[args.checkpoint_name].card_patch  # one mask set: the card's patch size
        size_tokens = _size_tokens("--patch-sizes", text)

    # ---- 4. the data (in memory or streamed), and the sizes against the images ------------------------------
    data, streamed, data_reason = _open_data(args, meta, size, model.num_classes, attacks, world)
    if rank == 0:
        print(f"data path: {data_reason}", file=sys.stderr, flush=True)
        if args.data_path == "auto":
            check_workers_apply(args.workers, "auto", "stream" if streamed else "memory")
    if len(data.classes) != model.num_classes:
        raise SystemExit(f"dataset has {len(data.classes)} classes but the model predicts {model.num_classes}")
    if meta.get("classes") and list(meta["classes"]) != list(data.classes) and data.name != "synthetic":
        raise SystemExit(f"dataset classes {data.classes} differ from the checkpoint's classes {meta['classes']}")
    H, W = _image_hw(data)
    with user_errors("--patch-sizes: "):
        sizes = _resolve_size_tokens("--patch-sizes", size_tokens, (H, W))
    area_sizes = {t: f"{s[0]}x{s[1]}" for t, s in zip(size_tokens, sizes) if t.endswith("%")}
    too_large = [t for t, (ph, pw) in zip(size_tokens, sizes) if ph > H or pw > W]
    if too_large:
        raise SystemExit(f"--patch-sizes {', '.join(too_large)}: larger than the {H}x{W} images")
    keys = [size_key(s) for s in sizes]
    if peer is None:  # the geometry the certificate uses, checked on these images (registry models are trusted)
        from ..geometry_inference import verify_geometry

        with user_errors(f"--checkpoint {args.checkpoint}: "):
            verify_geometry(model, (H, W))
    if args.robust_masking and len(keys) > 1:
        raise SystemExit(f"--robust-masking certifies one patch size per run (got {', '.join(keys)}): its prediction masks a "
                         "window made for the patch size, so clean accuracy and predictions differ per size; give one size, "
                         "e.g. --patch-sizes 5")
    attack_keys = None
    if attacks and attack_tokens:
        with user_errors("--attack-patch-sizes: "):
            attack_keys = [size_key(s) for s in _resolve_size_tokens("--attack-patch-sizes", attack_tokens, (H, W))]
        bad = [t for t, k in zip(attack_tokens, attack_keys) if k not in keys]
        if bad:
            raise SystemExit(f"--attack-patch-sizes {', '.join(bad)} are not among --patch-sizes {', '.join(size_tokens)}")
    if args.num_images is not None:
        if args.num_images > len(data):
            raise SystemExit(f"--num-images {args.num_images} is larger than the data set ({len(data)} images in "
                             f"{args.dataset}, split {data.info.get('split', args.split)}); give at most {len(data)}")
        if args.num_images < len(data):
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
            keep = perm[: args.num_images].sort().values
            info = dict(data.info)
            data = data.subset(keep)  # keeps each image's index into the whole dataset and its source file
            if streamed:
                data.info = dict(info, subset=len(data))
    if attacks:
        if args.attack_images is not None and args.attack_images > len(data):
            raise SystemExit(f"--attack-images {args.attack_images} is larger than the {len(data)} certified images")
        from ..empirical import check_attacks

        with user_errors("--attacks: "):
            check_attacks(attacks, model, data, metadata=meta, imagenet_patch_path=args.imagenet_patch_file)
    method = None
    if peer is not None:
        method = _check_peer_sizes(peer, (H, W), sizes)
    model.to(args.device).eval()

    # ---- 5. the work ----------------------------------------------------------------------------------------
    progress = args.progress and not args.quiet and rank == 0
    skip_file = None
    if streamed and getattr(args, "skip_bad_images", False):
        from ..streaming import SkipBadImages

        skip_dir = tempfile.TemporaryDirectory(prefix="bagcert-skipped-")
        skip_file = Path(skip_dir.name) / "skipped.tsv"
        source = StreamSource(SkipBadImages(data, skip_file), workers=args.workers)
    else:
        source = StreamSource(data, workers=args.workers) if streamed else data
    config_extra = {} if shipped_cert is None else {"shipped_certifier": shipped_cert}
    if args.robust_masking:
        from ..peers import PatchGuardMasking

        masking = PatchGuardMasking(evidence="votes")
        if rank == 0:
            print(f"certificate: {masking.name}, PatchGuard robust masking of the votes (not the vote count)",
                  file=sys.stderr, flush=True)
        results, timing = certify_peer_dataset(
            masking, model, source, sizes, batch_size=args.batch_size, device=args.device, progress=progress,
            rank=rank, world=world,
        )
        method = {"method": masking.name, "forward_passes_per_image": masking.forward_passes_per_image(), "peer": None}
    elif args.double_masking:
        from ..peers import LocalDoubleMasking

        mask_patch = (max(s[0] for s in sizes), max(s[1] for s in sizes))
        masking = LocalDoubleMasking(evidence=dm_evidence, clip=dm_clip, mask_patch_size=mask_patch)
        ms = masking.mask_set(model.geometry, (H, W), mask_patch)
        config_extra["double_masking_mask_set"] = {"mask_patch_size": list(mask_patch), **ms.to_dict()}
        config_extra["double_masking_evidence"] = dm_evidence
        config_extra["double_masking_clip"] = None if masking.clip is None else list(masking.clip)
        what = ("the votes" if dm_evidence == "votes"
                else f"the local logits clipped to ({masking.clip[0]:g}, {masking.clip[1]:g})")
        if rank == 0:
            print(f"certificate: {masking.name}, double masking of {what} on the local map (not the vote count); mask "
                  f"set: {ms.num_masks} windows of {ms.mask_size[0]}x{ms.mask_size[1]} locations covering every "
                  f"{mask_patch[0]}x{mask_patch[1]} patch, one mask set for every patch size", file=sys.stderr, flush=True)
        results, timing = certify_peer_dataset(
            masking, model, source, sizes, batch_size=args.batch_size, device=args.device, progress=progress,
            rank=rank, world=world,
        )
        method = {"method": masking.name, "forward_passes_per_image": masking.forward_passes_per_image(), "peer": None}
    elif peer is None:
        results, timing = certify_dataset(
            model, source, sizes, batch_size=args.batch_size, device=args.device, aggregation=args.aggregation,
            progress=progress, rank=rank, world=world, precision=args.precision,
        )
        method = {"method": "bagcert", "forward_passes_per_image": 1, "peer": None}
    else:
        results, timing = certify_peer_dataset(
            peer["certifier"], model, source, sizes, mask_set=peer.get("mask_set"), batch_size=args.batch_size,
            device=args.device, progress=progress, rank=rank, world=world,
        )
    skipped = None
    if skip_file is not None:
        results, skipped = drop_skipped(results, data, skip_file)
        skip_dir.cleanup()
    if world > 1:
        t = torch.tensor([timing["forward_s"], timing["certify_s"], timing["total_s"]], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        timing.update(forward_s=float(t[0]), certify_s=float(t[1]), total_s=float(t[2]))
    if rank != 0:
        return None
    config = {k: v for k, v in vars(args).items() if k != "output_given"}
    config["patch_sizes"] = keys
    if area_sizes:
        config["patch_area_sizes"] = area_sizes
    config["world_size"] = world
    config["data_path"] = "stream" if streamed else "memory"
    config["data_path_requested"] = args.data_path
    config["data_path_reason"] = data_reason
    config["output"] = str(args.output)
    config.update(config_extra)
    dataset = {"name": data.name, "root": data.info.get("root"), "split": data.info.get("split", args.split)}
    if "seeded_split" in data.info:
        dataset["seeded_split"] = data.info["seeded_split"]
    summary_keys = ("dataset", "epochs", "wall_seconds", "eval")
    if peer is None:
        ckpt = {"path": str(args.checkpoint), "model": model.config["name"], "model_kwargs": model.config["kwargs"]}
        if args.checkpoint_name:
            ckpt["name"] = args.checkpoint_name  # a shipped model, addressed by its name or its file
    else:
        ckpt = {"path": str(args.checkpoint), "format": PEER_FORMAT, "model": model.config["backbone"],
                "model_kwargs": model.config["model_kwargs"], "in_channels": model.config["in_channels"]}
        summary_keys += ("peer",)
    ckpt["metadata_summary"] = {k: meta[k] for k in summary_keys if k in meta}
    stage = folder.stage()
    try:
        empirical = None
        if attacks:
            from ..empirical import run_empirical_evaluation

            empirical = run_empirical_evaluation(
                model, data, results, attacks, patch_sizes=attack_keys, num_images=args.attack_images, steps=args.attack_steps,
                step_size=args.attack_step_size, locations=args.attack_locations, surrogate=args.attack_surrogate, seed=args.seed,
                universal_fit_images=args.universal_fit_images, metadata=meta, imagenet_patch_path=args.imagenet_patch_file,
                device=args.device, output=stage, log=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True),
                **_progress_kwarg(progress),
            )
        provenance = _stream_provenance(data) if streamed else sample_provenance(data)
        if skipped is not None:
            provenance, dataset["skipped_images"] = skip_record(provenance, skipped)
        summary = write_certification_report(
            stage, results, timing, config, dataset, ckpt, device=args.device, empirical=empirical, method=method,
            provenance=provenance, run_id=folder.run_id,
        )
        markdown = (stage / "summary.md").read_text()
        folder.commit()
    except ReportFolderError as e:
        raise SystemExit(f"--output: {one_line(e)}") from None
    finally:
        folder.discard()  # after a failure: no half-written report anywhere (a kept report is handed over)
    return summary, empirical, markdown


def _progress_kwarg(progress: bool) -> dict:
    """``{"progress": progress}`` when :func:`bagcert.empirical.run_empirical_evaluation` takes a progress flag."""
    import inspect

    from ..empirical import run_empirical_evaluation

    return {"progress": progress} if "progress" in inspect.signature(run_empirical_evaluation).parameters else {}


def _check_certifier_flag(args, attacks) -> None:
    """Refuse --certifier with a flag that names another certificate, and --certifier shipped with --attacks
    (SystemExit, one line)."""
    if args.certifier is None:
        return
    for flag, given in (("--double-masking", args.double_masking), ("--robust-masking", args.robust_masking),
                        ("--aggregation", bool(args.aggregation))):
        if given:
            raise SystemExit(f"--certifier {args.certifier} cannot be combined with {flag}: both choose the certificate; "
                             "give one of the two")
    if args.certifier == "shipped" and attacks:
        raise SystemExit("--certifier shipped cannot be combined with --attacks: the attacks optimise the vote count, so "
                         "they test the vote certificate; give --certifier votes (or drop --certifier) to attack")
    if args.certifier == "shipped" and getattr(args, "precision", "fp32") != "fp32":
        raise SystemExit(f"--certifier shipped cannot be combined with --precision {args.precision}: --precision applies "
                         "to the vote-count certificate; the shipped certificate runs in fp32")


def _apply_shipped_certifier(args, attacks, several: bool, rank: int) -> dict | None:
    """The shipped model's own certificate (shipped.json "certifier"), applied to ``args`` when the user chose no
    certificate and one patch size at most (``several``: more than one given; the vote count certifies each size on
    its own, a double-masking run shares one mask set among them): sets --double-masking and its evidence and clip.
    Returns the applied spec, else None (the vote count or the certificate the flags ask for). Says on stderr which
    certificate is used and how to get the other."""
    spec = shipped.shipped_certifier(args.checkpoint_name) if args.checkpoint_name else None
    if args.certifier == "votes":
        if spec is not None and rank == 0:
            print(f"certificate: the vote count (--certifier votes; {args.checkpoint_name}'s default is "
                  f"double-masking-{spec['evidence']})", file=sys.stderr, flush=True)
        return None
    if spec is None:
        if args.certifier == "shipped":
            raise SystemExit(f"--certifier shipped: {args.checkpoint_name or args.checkpoint} has no shipped certificate "
                             "of its own (it is certified by the vote count); drop --certifier")
        return None
    chosen = [f for f, v in (("--double-masking", args.double_masking), ("--robust-masking", args.robust_masking),
                             ("--aggregation", bool(args.aggregation)), ("--attacks", bool(attacks)),
                             ("--precision", getattr(args, "precision", "fp32") != "fp32")) if v]
    if chosen:
        if rank == 0 and not args.double_masking and not args.robust_masking:
            print(f"certificate: the vote count ({' and '.join(chosen)} given; {args.checkpoint_name}'s default "
                  f"double-masking-{spec['evidence']} is not used)", file=sys.stderr, flush=True)
        return None
    if several and args.certifier is None:
        if rank == 0:
            print(f"certificate: the vote count (several --patch-sizes: it certifies each size on its own; "
                  f"{args.checkpoint_name}'s default double-masking-{spec['evidence']} certifies one size per run, "
                  "give one size or --certifier shipped)", file=sys.stderr, flush=True)
        return None
    if spec.get("kind") != "double-masking":
        raise SystemExit(f"bagcert/shipped.json: {args.checkpoint_name} names an unknown certifier {spec.get('kind')!r}")
    args.double_masking = True
    args.double_masking_evidence = spec["evidence"]
    if spec["clip"] is not None:
        args.double_masking_clip = ",".join(f"{float(v):g}" for v in spec["clip"])
    if rank == 0:
        print(f"certificate: {args.checkpoint_name}'s default, double-masking-{spec['evidence']} (give --certifier votes "
              "for the vote count)", file=sys.stderr, flush=True)
    return spec


def _double_masking_options(args) -> tuple:
    """(evidence, clip) of --double-masking from --double-masking-evidence and --double-masking-clip: ("votes", None)
    by default, clip (low, high) floats or None (the certifier's default (-1, 1)) for logits. Refuses either flag
    without --double-masking, a clip with votes and a clip that is not two finite numbers LOW < HIGH (SystemExit,
    one line)."""
    evidence, clip_text = args.double_masking_evidence, args.double_masking_clip
    for flag, value in (("--double-masking-evidence", evidence), ("--double-masking-clip", clip_text)):
        if value is not None and not args.double_masking:
            raise SystemExit(f"{flag} applies only with --double-masking; add --double-masking or drop {flag}")
    evidence = evidence or ("logits" if clip_text is not None else "votes")
    if clip_text is None:
        return evidence, None
    if evidence == "votes":
        raise SystemExit("--double-masking-clip applies to --double-masking-evidence logits only; votes are already "
                         "{0, 1}")
    parts = str(clip_text).split(",")
    try:
        low, high = (float(v) for v in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise SystemExit(f"--double-masking-clip must be two finite numbers LOW,HIGH with LOW < HIGH (e.g. -1,1), "
                         f"got {clip_text!r}")
    return evidence, (low, high)


def _size_tokens(flag: str, text: str) -> list:
    """The comma-separated size tokens of ``flag``, each checked alone (``SystemExit`` with one line otherwise);
    duplicates are found once the image size is known (:func:`_resolve_size_tokens`)."""
    from ..geometry import parse_patch_size

    tokens = [s.strip() for s in text.split(",") if s.strip()]
    if not tokens:
        raise SystemExit(f"{flag} is empty; give e.g. 1,2,5 or 3x7 or 2%")
    with user_errors(f"{flag}: "):
        for t in tokens:
            _percent(t) if t.endswith("%") else parse_patch_size(t)
    return tokens


def _resolve_inputs(args) -> None:
    """A shipped model's name in ``--checkpoint`` becomes its file and a missing ``--dataset`` the bundled samples
    (paths as the tools print them); ``args.checkpoint_name`` is the shipped model's name, also when its file was
    given, else None. A name that is neither a file nor a shipped model is one line listing the shipped names."""
    from ..checkpoint import CheckpointError

    given = str(args.checkpoint)
    try:
        path = shipped.resolve_checkpoint(given)
    except CheckpointError as e:
        raise SystemExit(one_line(f"--checkpoint {given}: {e}")) from None
    if given in shipped.model_names():
        args.checkpoint_name, args.checkpoint = given, show_path(path)
    else:
        args.checkpoint_name = shipped.shipped_name(path)
    if args.dataset is None:
        args.dataset = show_path(shipped.samples_path("cifar10"))


# ------------------------------------------------------------------------------------------------
# peer classifiers (bagcert train --peer): de-randomized smoothing and PatchCleanser
# ------------------------------------------------------------------------------------------------
def _checkpoint_format(path) -> str | None:
    """The ``format`` entry of a checkpoint file, read without loading its tensors (memory-mapped,
    ``weights_only=True``); None when it cannot be read this way (the real loader then says why)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated, foreign: load_checkpoint reports it with a clear message
        return None
    return obj.get("format") if isinstance(obj, dict) else None


def _load_peer(args) -> dict:
    """Load a peer classifier and its certifier, and refuse the options that do not apply to it."""
    from ..geometry import parse_patch_size
    from ..peers import PatchCleanser, PeerSpec, load_peer_certifier

    if args.aggregation:
        raise SystemExit(
            f"--aggregation {args.aggregation} applies to bagcert models only; {args.checkpoint} is a peer classifier, "
            "certified by its own rule (de-randomized smoothing or PatchCleanser, from the spec in the file)"
        )
    if args.dense:
        raise SystemExit(f"--dense applies to bagcert models only; {args.checkpoint} is a peer classifier")
    if args.precision != "fp32":
        raise SystemExit(f"--precision {args.precision} applies to bagcert models only; {args.checkpoint} is a peer classifier")
    if _parse_attacks(args.attacks):
        raise SystemExit(
            f"--attacks does not apply to peer classifiers ({args.checkpoint}): the attacks and their soundness check "
            "need a bagcert model (local logits and receptive-field geometry) and attack its own prediction, not a "
            "peer's defended prediction; certify without --attacks"
        )
    with user_errors(f"--checkpoint {args.checkpoint}: "):  # unreadable file, or a recorded spec this version cannot parse
        cert, clf, meta = load_peer_certifier(args.checkpoint, batch_size=args.peer_batch_size)
    spec = PeerSpec.from_dict(meta["peer"])
    peer = {"certifier": cert, "classifier": clf, "metadata": meta, "spec": spec, "mask_patch": None}
    if isinstance(cert, PatchCleanser):
        mask_patch = tuple(spec.patch_size)
        if args.mask_patch_size:
            try:
                mask_patch = parse_patch_size(args.mask_patch_size)
            except (TypeError, ValueError) as e:
                raise SystemExit(f"--mask-patch-size: {e}") from None
        peer["mask_patch"] = mask_patch
        peer["mask_patch_rebuilt"] = mask_patch != tuple(spec.patch_size)
    elif args.mask_patch_size:
        raise SystemExit(f"--mask-patch-size applies only to PatchCleanser; {args.checkpoint} is {spec}")
    return peer


def _check_peer_sizes(peer: dict, image_size, sizes) -> dict:
    """Check the requested patch sizes against the peer (PatchCleanser: at most its mask set's patch), build
    PatchCleanser's mask set into ``peer``, and return the report's method record."""
    from ..evaluation import size_key
    from ..peers import MaskSet, affected_ablations

    cert, spec = peer["certifier"], peer["spec"]
    H, W = image_size
    try:
        spec.check_image_size((H, W))
    except ValueError as e:
        raise SystemExit(f"the {H}x{W} images do not fit the peer classifier: {e}") from None
    too_large = [size_key(s) for s in sizes if s[0] > H or s[1] > W]
    if too_large:
        raise SystemExit(f"--patch-sizes {too_large} are larger than the {H}x{W} images")
    info = dict(peer["metadata"]["peer"])
    if peer["mask_patch"] is None:  # de-randomized smoothing: any patch size, Δ affected ablations
        info["affected_ablations"] = {size_key(s): affected_ablations((H, W), s, cert.band_size, cert.mode) for s in sizes}
        return {"method": cert.name, "forward_passes_per_image": cert.forward_passes_per_image((H, W), sizes[0]), "peer": info}
    mh, mw = peer["mask_patch"]
    if mh > H or mw > W:
        raise SystemExit(f"--mask-patch-size {mh}x{mw} is larger than the {H}x{W} images")
    bad = [f"{s[0]}x{s[1]}" for s in sizes if s[0] > mh or s[1] > mw]
    if bad:
        trained = "{}x{}".format(*spec.patch_size)
        hint = (
            f"give --patch-sizes within {mh}x{mw} (every smaller patch lies inside one of its masks), or --mask-patch-size "
            "to rebuild the mask set for a larger patch (sound for any classifier, but a different mask set than the "
            f"classifier was trained with, so expect lower accuracy)"
        )
        raise SystemExit(
            f"PatchCleanser classifier {peer['metadata']['peer'].get('spec', spec)} certifies with the mask set built for "
            f"{mh}x{mw} patches{'' if not peer['mask_patch_rebuilt'] else f' (--mask-patch-size; trained for {trained})'}: "
            f"its certificate covers patches up to {mh}x{mw} only, not {', '.join(bad)}; {hint}"
        )
    ms = MaskSet.for_patch((H, W), (mh, mw), cert.k)
    peer["mask_set"] = ms
    info["mask_set"] = {
        "patch_size": [mh, mw], "rebuilt": peer["mask_patch_rebuilt"], "k": list(ms.k), "num_masks": ms.num_masks,
        "mask_size": list(ms.mask_size), "stride": list(ms.stride), "row_starts": list(ms.row_starts),
        "col_starts": list(ms.col_starts), "fill": cert.fill,
    }
    return {"method": cert.name, "forward_passes_per_image": cert.forward_passes_per_image((H, W), (mh, mw)), "peer": info}


def _parse_attacks(text: str) -> list:
    import difflib

    names = [a.strip() for a in (text or "").split(",") if a.strip()]
    for a in names:
        if a not in ATTACK_NAMES:
            close = difflib.get_close_matches(a, ATTACK_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SystemExit(f"--attacks: unknown attack {a!r}{hint}; choose from {', '.join(ATTACK_NAMES)}")
    return list(dict.fromkeys(names))


if __name__ == "__main__":
    sys.exit(main(prog="python -m bagcert.cli.certify"))
