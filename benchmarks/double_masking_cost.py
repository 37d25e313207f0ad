"""What does double masking on the vote map cost next to the forward pass?

Times, on the same images and the same machine: the forward pass (``model.local_logits``), then from its vote map
the double-masking certificate (``LocalDoubleMasking.certify_evidence``: prediction + certificate) for one patch
size and for twelve sizes (each with its own mask set), next to the vote-count certificate
(``bagcert.certify_logits``) and robust masking of the votes (``PatchGuardMasking(evidence="votes")``) for the same
sizes. Reports seconds per image and the certify / forward ratio ((forward + certify) / forward, as the report's
``certify_forward_ratio``). Each timing is the best of ``--repeats`` runs over all batches. Time it alone on the
machine: with other jobs on the cores the ratios mean little.

    python benchmarks/double_masking_cost.py --num-images 1000 --batch-size 250 --threads 2 \
        --output docs/results/double_masking_cost.json
    python benchmarks/double_masking_cost.py --device cuda --num-images 2000 --batch-size 500

Smoke test: ``--num-images 8 --batch-size 4 --repeats 1 --sizes 3``.
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
from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.data import load_dataset  # noqa: E402
from bagcert.evaluation import size_key  # noqa: E402
from bagcert.geometry import parse_patch_size  # noqa: E402
from bagcert.peers import LocalDoubleMasking, PatchGuardMasking  # noqa: E402

TWELVE = "1,2,3,4,5,6,7,8,9,10,3x7,7x3"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best(fn, repeats, device):
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/bagcert_cifar10_r5s2_dense.pt")
    p.add_argument("--dataset", default="samples/cifar10", help="image folder (default: the 200 bundled test images)")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--size", default="5", help="the one patch size")
    p.add_argument("--sizes", default=TWELVE, help="the list of patch sizes (default: twelve)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = bagcert.load_checkpoint(args.checkpoint)
    model = model.to(args.device).eval()
    data = load_dataset(args.dataset, split="test")
    n = min(args.num_images, len(data.labels))
    x_all = data.images[:n].float().div(255).to(args.device)
    y_all = data.labels[:n].to(args.device)
    H, W = x_all.shape[-2:]
    batches = [(x_all[i : i + args.batch_size], y_all[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
    one = [parse_patch_size(args.size)]
    many = [parse_patch_size(s) for s in args.sizes.split(",")]
    dm, rm = LocalDoubleMasking(), PatchGuardMasking(evidence="votes")

    logits = [model.local_logits(x) for x, _ in batches]  # warm-up, and the maps the certificates read
    votes = [(z > 0).float() for z in logits]
    t_fwd = _best(lambda: [model.local_logits(x) for x, _ in batches], args.repeats, args.device)

    def run(kind, sizes):
        def go():
            for (x, y), z, v in zip(batches, logits, votes):
                if kind == "votes":
                    bagcert.certify_logits(z, y, model.geometry, (H, W), patch_sizes=sizes, check_finite=False)
                    continue
                if kind == "double-masking":
                    (z > 0).float()  # the evidence map is part of its cost
                for s in sizes:
                    (dm if kind == "double-masking" else rm).certify_evidence(v, y, model.geometry, (H, W), s)
        go()  # warm-up (mask-set tables are built once per size and cached)
        return _best(go, args.repeats, args.device)

    rows = {}
    for kind in ("votes", "double-masking", "robust-masking"):
        for label, sizes in (("one", one), ("many", many)):
            t = run(kind, sizes)
            rows[f"{kind}/{label}"] = {"sizes": [size_key(s) for s in sizes], "certify_s_per_image": t / n,
                                      "certify_forward_ratio": (t_fwd + t) / t_fwd}
    res = dm.certify_evidence(torch.cat(votes), y_all, model.geometry, (H, W), one[0])
    doc = {"checkpoint": args.checkpoint, "dataset": args.dataset, "num_images": n, "batch_size": args.batch_size,
           "device": args.device, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "forward_s_per_image": t_fwd / n, "timings": rows,
           "double_masking": {"size": size_key(one[0]), "num_masks": dm.mask_set(model.geometry, (H, W), one[0]).num_masks,
                              "clean": res.clean_accuracy, "certified": res.certified_accuracy}}
    print(json.dumps(doc, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
