#!/usr/bin/env python3
"""How the locations of vote models vote: abstentions, votes for the label, votes for other classes.

A certificate against a patch that meets R of the N locations needs the label's vote count to beat every other
class by more than about R (per position, ``bagcert.certify``); this shows where the votes go instead. For each
checkpoint, on the same test images (the first N of a seeded permutation):

    python benchmarks/vote_statistics.py --dataset ../shared/data/cifar10 --num-images 1000 \\
        checkpoints/bagcert_cifar10_r9s2.pt checkpoints/bagcert_cifar10_r9s2/gpu_long/b512_105ep/model_gpu_long.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bagcert.aggregation import get_aggregation  # noqa: E402
from bagcert.cli._common import load_model_and_data  # noqa: E402
from bagcert.evaluation import vote_statistics  # noqa: E402
from bagcert.report import environment_info  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--dataset", required=True)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--patch-size", default="5", help="patch whose worst-case reach sets the 'needed' column (default 5)")
    p.add_argument("--threads", type=int)
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    votes_agg = get_aggregation("votes")
    rows = {}
    for path in args.checkpoints:
        model, _, data = load_model_and_data(path, args.dataset, "test", args.seed, args.num_images)
        votes = []
        with torch.no_grad():
            for k in range(0, len(data), args.batch_size):
                x = data.float_images(torch.arange(k, min(k + args.batch_size, len(data))))
                votes.append(votes_agg.local_scores(model.local_logits(x)))
        votes = torch.cat(votes)
        rows[path] = vote_statistics(votes, data.labels)
        # margin share a certificate needs when the reached locations vote for the label (Geometry.max_affected)
        h, w = votes.shape[-2:]
        rows[path]["needed"] = 2 * model.geometry.max_affected(tuple(x.shape[-2:]), args.patch_size) / (h * w)
    keys = ["abstain", "label_only", "label_and_other", "wrong_only", "label_votes", "margin", "needed"]
    print("| checkpoint | " + " | ".join(keys) + " |")
    print("| --- | " + " | ".join("---:" for _ in keys) + " |")
    for path, r in rows.items():
        print(f"| {path} | " + " | ".join(f"{100 * r[k]:.1f} %" for k in keys) + " |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"env": environment_info(), "dataset": args.dataset, "num_images": args.num_images,
                                                 "seed": args.seed, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
