"""Do the toolkit's patch attacks break a prediction certified by robust masking of the votes?

The attacks of ``certify.py --attacks`` optimise the vote count, so ``--robust-masking`` refuses them: their
success says nothing direct about the masked prediction. This check runs them anyway (PGD at random and at
certificate-guided positions, against the vote count) and judges every adversarial image with the masked
prediction (``PatchGuardMasking(evidence="votes").predict``) for the same patch size: a certified-by-masking image
whose masked prediction changes would be a soundness bug (the script then exits 1). It is a transfer check, weaker
than an attack on the masked prediction itself; the certificate's own evidence is its proof and the brute-force
tests in ``tests/test_masked_votes.py``.

    python benchmarks/masking_attack_check.py --checkpoint checkpoints/bagcert_cifar10_r5s2_dense.pt \
        --dataset ../shared/data/cifar10 --num-images 50 --steps 20 --locations 10 --threads 2 \
        --output docs/results/masking_attack_check.json
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
from bagcert.checkpoint import atomic_write_text  # noqa: E402
from bagcert.data import load_dataset  # noqa: E402
from bagcert.empirical import build_attack, evaluate_empirical  # noqa: E402
from bagcert.peers import PatchGuardMasking  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/bagcert_cifar10_r5s2_dense.pt")
    p.add_argument("--dataset", default="../shared/data/cifar10")
    p.add_argument("--num-images", type=int, default=50, help="a seeded (0) subset of the test split")
    p.add_argument("--patch-size", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--locations", type=int, default=10)
    p.add_argument("--threads", type=int)
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = bagcert.load_checkpoint(args.checkpoint)
    data = load_dataset(args.dataset, split="test")
    index = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(0))[: args.num_images]
    x, y = data.images[index].float() / 255, data.labels[index]
    size = args.patch_size
    t0 = time.perf_counter()
    masking = PatchGuardMasking(evidence="votes")
    masked_cert = masking.certify(model, x, y, size)
    ok = masked_cert.certified & masked_cert.correct
    attacks = {name: build_attack(name, size, steps=args.steps, locations=args.locations) for name in ("pgd", "pgd-adaptive")}
    res = evaluate_empirical(model, x, y, size, attacks)  # raises SoundnessError if a vote certificate breaks
    doc = {"checkpoint": args.checkpoint, "num_images": len(y), "patch_size": size, "steps": args.steps,
           "locations": args.locations, "masked_clean": masked_cert.clean_accuracy,
           "masked_certified": masked_cert.certified_accuracy, "attacks": {}}
    broken_total = 0
    for name, r in res.results.items():
        with torch.no_grad():
            pred = masking.predict(model, r.adv_images, size)
        robust = (pred == y) & masked_cert.correct
        broken = int((ok & (pred != y)).sum())
        broken_total += broken
        doc["attacks"][name] = {"masked_robust": robust.float().mean().item(), "masked_certified_broken": broken,
                                "vote_count_robust": (r.predictions == y).float().mean().item()}
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(doc, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(doc, indent=1) + "\n")
    if broken_total:
        print(f"SOUNDNESS BUG: {broken_total} masked certificates broken", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
