"""Certify a checkpoint against adversarial patches, in batch, and write a report.

With no arguments it certifies the shipped default model, bagcert-cifar10-r5-dm
(checkpoints/bagcert_cifar10_r5s2_dm.pt), on the 200 CIFAR-10 test images bundled in samples/cifar10 and
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

The default certificate of a shipped model (bagcert/shipped.json, "certifier"): bagcert-cifar10-r5-dm (and -dense) is certified
by double masking of its local logits clipped to (-1, 1) when no certificate flag (--double-masking, --robust-masking,
--aggregation), no --attacks and at most one patch size are given, at its card patch size 5 unless --patch-sizes
names one; --certifier votes gives the vote count, --certifier shipped insists on the shipped certificate. stderr
says which certificate is used; results.json records it (config.shipped_certifier).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ._common import (Parser, exit_on_sigterm, add_cache_argument, add_model_module_argument, add_output_arguments, device,
                      one_line, output_is_default, positive_int, show_path, written_message)
from ._common import workers as _workers
from ..empirical import ATTACK_NAMES
from ..runs.certify import (AGGREGATIONS, ATTACK_SURROGATES, CERTIFIERS, DATA_PATHS, DEFAULT_CHECKPOINT, DEFAULT_DATASET,
                            DEFAULT_MODEL, DEFAULT_OUTPUT, DEFAULT_PATCH_SIZES, DOUBLE_MASKING_EVIDENCE, PRECISIONS, CertifyConfig,
                            CertifyError, certify_run, run_certification)

__all__ = ["build_parser", "config_from_args", "main", "run_certification", "DEFAULT_MODEL", "DEFAULT_CHECKPOINT",
           "DEFAULT_DATASET", "DEFAULT_PATCH_SIZES"]


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
    p.add_argument("--aggregation", choices=AGGREGATIONS,
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
    p.add_argument("--double-masking-evidence", choices=DOUBLE_MASKING_EVIDENCE,
                   help="with --double-masking: the evidence on the local map, votes 1[z > 0] (default) or the local "
                   "logits clipped into --double-masking-clip (report method double-masking-logits)")
    p.add_argument("--double-masking-clip", metavar="LOW,HIGH",
                   help="with --double-masking-evidence logits: the clip of the local logits, two finite numbers with "
                   "LOW < HIGH (default -1,1); write it with = when LOW is negative: --double-masking-clip=-2,2")
    p.add_argument("--certifier", choices=CERTIFIERS,
                   help="votes: the vote count (BagCert's certificate); shipped: the shipped model's own default "
                   "certificate (bagcert-cifar10-r5-dm: double masking of the local logits clipped to (-1, 1), at its "
                   "card patch size 5 unless --patch-sizes is given). Default: the shipped certificate when no "
                   "certificate flag (--double-masking, --robust-masking, --aggregation) and no --attacks are given, "
                   "else the one they ask for; other checkpoints: the vote count")
    p.add_argument("--num-images", type=positive_int,
                   help="certify only the first N images of a seeded permutation (N larger than the data set is refused; "
                   "default: all)")
    p.add_argument("--batch-size", type=positive_int, default=250, help="images per batch and process (the results do not "
                   "depend on it: the network runs on chunks of a fixed size, bagcert.inference)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
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
    a.add_argument("--attack-surrogate", choices=ATTACK_SURROGATES, default="relaxed_votes", help="differentiable stand-in for the votes")
    a.add_argument("--universal-fit-images", type=int, default=256, help="images outside the attacked subset the universal patch is trained on")
    a.add_argument("--imagenet-patch-file", help="imagenet_patch.gz (default: $BAGCERT_IMAGENET_PATCH or ../shared/data/imagenet-patch/)")
    return p


def config_from_args(args: argparse.Namespace) -> CertifyConfig:
    """The :class:`~bagcert.runs.CertifyConfig` of parsed ``args`` (every option by its argument name; ``--output``
    left at its default is ``output=None``, the default folder whose previous report each run replaces).
    Raises :class:`~bagcert.runs.CertifyError` with one line for values or combinations the run refuses."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CertifyConfig)}
    values["output"] = None if output_is_default(args) else args.output
    return CertifyConfig(**values)


def _rounded(ci):
    """A 95 % interval [lo, hi] rounded to 6 decimals for the JSON line (None stays None)."""
    return None if ci is None else [round(v, 6) for v in ci]


@exit_on_sigterm
def main(argv=None, prog: str = "bagcert certify") -> int:
    """Run the CLI; returns the exit status (0, or 3 when an attack broke a certified sample). A mistake in
    the input raises ``SystemExit`` with one line (printed on stderr by Python, exit status 1); argument
    syntax errors exit with status 2 and one line."""
    args = build_parser(prog).parse_args(argv)
    try:
        out = certify_run(config_from_args(args))
    except CertifyError as e:  # a mistake in the input: one line on stderr, exit status 1
        raise SystemExit(one_line(e)) from None
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
    broken = out.broken
    if broken:
        from ..empirical import soundness_message

        for k in broken:
            print(soundness_message(empirical["results"][k]), file=sys.stderr)
        print(f"FAILED: certified samples were broken by attacks ({broken}); see {show_path(args.output)}/results.json", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m bagcert.cli.certify"))
