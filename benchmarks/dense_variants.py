"""Test-time variants of one trained strided model, side by side on the same images: what each certifies.

Variants (all from the same weights, no retraining):

* ``strided votes`` / ``dense votes``: BagCert's vote certificate on the strided map and on the dense (a trous)
  evaluation (``bagcert.models.to_dense``); ``t=-0.5``: a location votes for c when its logit is > -0.5.
* ``dense votes + flip``: the votes of the image and of its mirror image (mirrored back) summed per location, so a
  location adds 0, 1 or 2 to a class; certified by the same window rule with a per-location spread of 2 (the
  geometry of a dense, same-padded map is its own mirror image, so a patch still reaches the locations R(l) only).
* ``dense masking (votes)`` / ``dense masking (relu)``: PatchGuard's robust masking (Xiang et al., USENIX Security
  2021; ``bagcert.peers.patchguard``) with the votes, or the ReLU of the logits, as evidence.

    python benchmarks/dense_variants.py --checkpoint checkpoints/bagcert_cifar10_r5s2_v2.pt \
        --dataset ../shared/data/cifar10 --split test --threads 2 --output docs/results/dense_variants_test.json
    python benchmarks/dense_variants.py ... --split train --num-images 3000      # a seeded subset of the training set

Writes a JSON document (variant -> clean and certified accuracy per patch size) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bagcert  # noqa: E402
from bagcert.certification import integral_image, window_margins, window_table  # noqa: E402
from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.data import load_dataset  # noqa: E402
from bagcert.models import to_dense  # noqa: E402
from bagcert.peers.patchguard import patchguard_certify_evidence  # noqa: E402


def logits_of(model, x, batch):
    with torch.no_grad():
        return torch.cat([model.local_logits(x[i : i + batch]) for i in range(0, len(x), batch)])


def summed_vote_certificate(votes, labels, geometry, image_size, patch_size, spread):
    """Prediction and certificate of a vote map whose locations add 0..spread to each class (int32 [N, C, h, w])."""
    prediction = votes.sum(dim=(2, 3)).argmax(dim=1)  # ties to the lower class index
    table = window_table(geometry, image_size, patch_size)
    margins = window_margins(integral_image(votes), prediction, table.rows, table.cols, spread)
    certified = margins.flatten(1).amin(dim=1) > 0  # strict: a tie after the attack is never certified
    correct = prediction == labels
    return correct.float().mean().item(), (correct & certified).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a strided bagcert CIFAR checkpoint")
    p.add_argument("--dataset", default="../shared/data/cifar10")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--num-images", type=int, default=0, help="0: every image; else a seeded subset")
    p.add_argument("--patch-sizes", default="5", help="comma-separated square patch sides")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.patch_sizes.split(",")]
    strided, meta = bagcert.load_checkpoint(args.checkpoint)
    if strided.geometry.stride[0] == 1:
        raise SystemExit(f"{args.checkpoint} is already a stride-1 model; give the strided checkpoint")
    dense = to_dense(strided)
    data = load_dataset(args.dataset, split=args.split)
    index = torch.arange(len(data.labels))
    if args.num_images:
        index = torch.randperm(len(index), generator=torch.Generator().manual_seed(0))[: args.num_images]
    x, y = data.images[index].float() / 255, data.labels[index]
    image_size = tuple(x.shape[-2:])
    g = dense.geometry
    if g.grid_size(*image_size) != image_size or 2 * g.padding[0] != g.receptive_field[0] - 1:
        raise SystemExit("the flip variant needs a dense, same-padded map whose geometry is its own mirror image")
    t0 = time.perf_counter()
    L_s, L_d = logits_of(strided, x, args.batch_size), logits_of(dense, x, args.batch_size)
    L_f = logits_of(dense, x.flip(-1), args.batch_size).flip(-1)
    results = {}
    for size in sizes:
        row = {}
        for name, model, L in (("strided", strided, L_s), ("dense", dense, L_d)):
            for t in (0.0, -0.5):
                r = bagcert.certify_logits(L - t, y, model.geometry, image_size, patch_size=size)
                row[f"{name} votes" + ("" if t == 0 else f" t={t:g}")] = (r.clean_accuracy, r.certified_accuracy)
        votes = (L_d > 0).to(torch.int32)
        row["dense votes + flip"] = summed_vote_certificate(votes + (L_f > 0).to(torch.int32), y, g, image_size,
                                                            (size, size), 2)
        for name, ev in (("votes", votes.float()), ("relu", L_d.clamp(min=0))):
            r = patchguard_certify_evidence(ev, y, g, image_size, size)
            row[f"dense masking ({name})"] = (r.clean_accuracy, r.certified_accuracy)
        results[str(size)] = {k: {"clean": round(100 * a, 2), "certified": round(100 * b, 2)} for k, (a, b) in row.items()}
    doc = {
        "checkpoint": args.checkpoint, "dataset": data.name, "split": args.split, "num_images": len(y),
        "subset": "seeded (0) permutation" if args.num_images else "all", "results": results,
        "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }
    for size, row in results.items():
        print(f"{args.split}, {len(y)} images, {size}x{size}:")
        for k, v in row.items():
            print(f"  {k:28s} {v['clean']:6.2f} % clean  {v['certified']:6.2f} % certified")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
