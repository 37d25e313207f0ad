"""Clean and certified accuracy of three certificates of the same votes: the vote count (BagCert), double masking on
the vote map (``LocalDoubleMasking``) and robust masking (``PatchGuardMasking(evidence="votes")``).

One forward pass per image serves all of them. Optional variants: double masking with ``k`` masks per axis
(``--k``) and of clipped local logits (``--logit-clips``). Then a feature-space check of the double-masking
certificate on the first ``--adversary-images`` images it certifies: for every distinct affected set R(p) of the
patch and every class c other than the prediction y, the votes inside R(p) are rewritten (y's removed, c's set;
and every class but y set), and the double-masking prediction of the rewritten map is computed; a certified image
whose prediction changes is a soundness bug (exit status 1). With ``--pgd-images N`` the toolkit's PGD (random and
certificate-guided positions; it optimises the vote count) also attacks the first N images, and every adversarial
image is judged by the double-masking prediction (of the votes, or with ``--pgd-evidence logits`` of the local
logits clipped to ``--pgd-clip``): a certified image whose prediction changes is a soundness bug.

    python benchmarks/double_masking_accuracy.py --dataset ../shared/data/cifar10 --num-images 500 --threads 2 \
        --output docs/results/double_masking_accuracy.json

The images are a seeded (0) random subset of the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bagcert  # noqa: E402
from bagcert.certification import window_table  # noqa: E402
from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.data import load_dataset  # noqa: E402
from bagcert.geometry import parse_patch_size  # noqa: E402
from bagcert.peers import LocalDoubleMasking, PatchGuardMasking, double_masking_predict  # noqa: E402


@torch.no_grad()
def feature_space_check(votes, pred, certified, geometry, image_size, patch, mask_set, limit):
    """(checked, broken): rewrite R(p) for every distinct window and class on certified images."""
    table = window_table(geometry, image_size, patch)
    idx = torch.nonzero(certified).flatten()[:limit]
    C, h, w = votes.shape[1:]
    regions = []
    for r0, r1 in table.rows.tolist():
        for c0, c1 in table.cols.tolist():
            if r1 >= r0 and c1 >= c0:
                m = torch.zeros(h, w, dtype=torch.bool)
                m[r0 : r1 + 1, c0 : c1 + 1] = True
                regions.append(m)
    R = torch.stack(regions)  # [P, h, w]
    broken = 0  # certified images whose prediction some rewrite changed
    for i in idx.tolist():
        changed = False
        y = int(pred[i])
        patterns = []
        for c in range(C):  # c's votes set and y's removed; c == y: every class but y set
            pat = torch.ones(C) if c == y else torch.zeros(C)
            pat[c] = 1.0
            pat[y] = 0.0
            patterns.append(pat)
        pats = torch.stack(patterns)  # [C, C]
        for s in range(0, len(R), 64):
            Rs = R[s : s + 64]
            attacked = torch.where(Rs[:, None, None], pats[None, :, :, None, None], votes[i][None, None])  # [p, C, C, h, w]
            after = double_masking_predict(attacked.flatten(0, 1), mask_set)
            changed |= bool((after != y).any())
        broken += int(changed)
    return len(idx), broken


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/bagcert_cifar10_r5s2_dense.pt")
    p.add_argument("--dataset", default="../shared/data/cifar10")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--patch-size", default="5")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--k", type=int, action="append", default=[], help="also double masking with k masks per axis")
    p.add_argument("--logit-clips", default="", help="also double masking of clipped logits, e.g. '0:1,-1:1'")
    p.add_argument("--adversary-images", type=int, default=20)
    p.add_argument("--pgd-images", type=int, default=0)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--pgd-locations", type=int, default=10)
    p.add_argument("--pgd-evidence", choices=["votes", "logits"], default="votes",
                   help="the double-masking certificate that judges the PGD images")
    p.add_argument("--pgd-clip", default="-1:1", help="LOW:HIGH clip of the local logits for --pgd-evidence logits")
    p.add_argument("--threads", type=int)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, _ = bagcert.load_checkpoint(args.checkpoint)
    model.eval()
    data = load_dataset(args.dataset, split="test")
    index = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(0))[: args.num_images]
    y = data.labels[index]
    with torch.no_grad():
        z = torch.cat([model.local_logits(data.images[index[i : i + args.batch_size]].float() / 255)
                       for i in range(0, len(index), args.batch_size)])
    H, W = data.images.shape[-2:]
    size = parse_patch_size(args.patch_size)
    votes = (z > 0).float()
    certifiers = {"votes (BagCert count)": None, "double-masking-votes": LocalDoubleMasking(),
                  "patchguard-votes (robust masking)": PatchGuardMasking(evidence="votes")}
    for k in args.k:
        certifiers[f"double-masking-votes-k{k}"] = LocalDoubleMasking(k=k)
    for clip in filter(None, args.logit_clips.split(",")):
        lo, hi = (float(v) for v in clip.split(":"))
        certifiers[f"double-masking-logits clip({lo:g}, {hi:g})"] = LocalDoubleMasking("logits", clip=(lo, hi))
    rows, dm_res = {}, None
    for name, cert in certifiers.items():
        t = time.perf_counter()
        if cert is None:
            r = bagcert.certify_logits(z, y, model.geometry, (H, W), size)
        else:
            ev = votes if cert.evidence_kind == "votes" else z.clamp(*cert.clip)
            r = cert.certify_evidence(ev, y, model.geometry, (H, W), size)
        rows[name] = {"clean": r.clean_accuracy, "certified": r.certified_accuracy, "seconds": round(time.perf_counter() - t, 2)}
        if name == "double-masking-votes":
            dm_res = r
        print(f"{name:42s} clean {100 * r.clean_accuracy:6.2f} %  certified {100 * r.certified_accuracy:6.2f} %", file=sys.stderr)
    checked, broken = feature_space_check(votes, dm_res.prediction, dm_res.certified, model.geometry, (H, W), size,
                                          certifiers["double-masking-votes"].mask_set(model.geometry, (H, W), size),
                                          args.adversary_images)
    pgd, pgd_broken = None, 0
    if args.pgd_images:
        from bagcert.empirical import build_attack, evaluate_empirical

        k = args.pgd_images
        x = data.images[index[:k]].float() / 255
        attacks = {a: build_attack(a, size, steps=args.pgd_steps, locations=args.pgd_locations) for a in ("pgd", "pgd-adaptive")}
        emp = evaluate_empirical(model, x, y[:k], size, attacks)  # raises SoundnessError if a vote certificate breaks
        if args.pgd_evidence == "votes":
            dm, judge = certifiers["double-masking-votes"], dm_res
        else:
            lo, hi = (float(v) for v in args.pgd_clip.split(":"))
            dm = LocalDoubleMasking("logits", clip=(lo, hi))
            judge = dm.certify_evidence(z.clamp(lo, hi), y, model.geometry, (H, W), size)
        ok = judge.certified[:k] & judge.correct[:k]
        pgd = {"images": k, "steps": args.pgd_steps, "locations": args.pgd_locations, "judge": dm.name,
               "clip": None if dm.clip is None else list(dm.clip), "clean_correct": int(judge.correct[:k].sum()),
               "certified_correct": int(ok.sum())}
        for a, r in emp.results.items():
            after = dm.predict(model, r.adv_images, size)
            broken_idx = torch.nonzero(ok & (after != y[:k])).flatten()
            pgd[a] = {"double_masking_robust": float(((after == y[:k]) & judge.correct[:k]).float().mean()),
                      "broken_image_indices": index[:k][broken_idx].tolist(),
                      "vote_count_robust": float((r.predictions == y[:k]).float().mean()),
                      "certified_broken": int((ok & (after != y[:k])).sum())}
            pgd_broken += pgd[a]["certified_broken"]
    doc = {"checkpoint": args.checkpoint, "dataset": args.dataset, "num_images": len(y), "patch_size": list(size),
           "results": rows, "feature_space_check": {"images": checked, "broken": broken}, "pgd_check": pgd,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(doc, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(doc, indent=1) + "\n")
    if broken or pgd_broken:
        print(f"SOUNDNESS BUG: double-masking certificates broken ({broken} in feature space, {pgd_broken} by PGD)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
