"""Randomized soundness probe of ``certify_logits``: an adversary who rewrites the local logits of every location a
patch can reach never changes a certified prediction.

The affected set R(p) is rebuilt here from the receptive-field boxes (``Geometry.pixel_box``: a location is
affected iff its box, clipped to the image, meets the patch), independently of ``Geometry.affected_ranges`` that
the certificate uses. The adversary gives every location in R(p) the strongest logits towards one competitor
class c (c high, every other class, the prediction included, low), for every c, at the certificate's worst
position and at random positions.
"""

import pytest
import torch

from bagcert.aggregation import get_aggregation
from bagcert.certification import certify_logits
from bagcert.geometry import Geometry

GEOMETRIES = [
    Geometry.from_layers([(3, 1, 1)]),  # rf 3, same padding
    Geometry.from_layers([(3, 1, 0), (3, 2, 0)]),  # rf 5, stride 2, unpadded
    Geometry.from_layers([(3, 2, 1), (3, 1, 1)]),  # rf 7, stride 2, padded
    Geometry.from_layers([(5, 2, 2)]),  # rf 5, stride 2, padding 2 (CIFAR BagNet-like)
]


def affected_by_boxes(geometry, image_size, patch, top, left):
    """Boolean [h, w]: locations whose clipped receptive-field box intersects the patch at (top, left)."""
    H, W = image_size
    gh, gw = geometry.grid_size(H, W)
    ph, pw = patch
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    for i in range(gh):
        for j in range(gw):
            t, l, b, r = geometry.pixel_box(i, j, image_size)
            if t <= b and l <= r and t <= top + ph - 1 and b >= top and l <= left + pw - 1 and r >= left:
                mask[i, j] = True
    return mask


def attacked_prediction(logits, mask, target, aggregation):
    """Prediction after every location in ``mask`` gets logits strongly for ``target`` and against all else."""
    adv = logits.clone()
    adv[:, mask] = -1e3
    adv[target, mask] = 1e3
    return int(get_aggregation(aggregation).class_scores(adv[None])[0].argmax())


@pytest.mark.parametrize("aggregation", ["votes", "majority", "clipped"])
def test_rewriting_the_affected_logits_never_flips_a_certified_prediction(aggregation):
    gen = torch.Generator().manual_seed(1234)
    checked = flipped_uncertified = 0
    for trial in range(24):
        geometry = GEOMETRIES[trial % len(GEOMETRIES)]
        H, W = (int(v) for v in torch.randint(8, 15, (2,), generator=gen))
        ph, pw = (int(v) for v in torch.randint(1, 5, (2,), generator=gen))
        C = int(torch.randint(2, 5, (1,), generator=gen))
        h, w = geometry.grid_size(H, W)
        # a strong class bias makes a good share of the samples certifiable (clipped needs logits of tens to
        # leave the flat part of tanh(0.05 z - 1))
        scale = 40.0 if aggregation == "clipped" else 2.0
        logits = torch.randn(6, C, h, w, generator=gen) * scale
        logits[:, 0] += torch.rand(6, 1, 1, generator=gen) * 2 * scale
        res = certify_logits(logits, None, geometry, (H, W), (ph, pw), aggregation=aggregation)
        for n in range(logits.shape[0]):
            y = int(res.prediction[n])
            top, left = (int(v) for v in res.worst_position[n])
            positions = [(top, left)] + [
                (int(torch.randint(0, H - ph + 1, (1,), generator=gen)), int(torch.randint(0, W - pw + 1, (1,), generator=gen)))
                for _ in range(3)
            ]
            for pos_index, (t, l) in enumerate(positions):
                mask = affected_by_boxes(geometry, (H, W), (ph, pw), t, l)
                for c in range(C):
                    if c == y:
                        continue
                    after = attacked_prediction(logits[n], mask, c, aggregation)
                    if bool(res.certified[n]):
                        checked += 1
                        assert after == y, (
                            f"certified sample flipped: {aggregation}, geometry {geometry.receptive_field}/"
                            f"{geometry.stride}/{geometry.padding}, image {H}x{W}, patch {ph}x{pw} at ({t}, {l}), "
                            f"class {y} -> {after}, margin {res.margin[n]}"
                        )
                    elif pos_index == 0 and after != y:
                        flipped_uncertified += 1
    # the probe is not vacuous: many certified samples were attacked, and the certificate's worst position does
    # break some uncertified ones
    assert checked > 100
    assert flipped_uncertified > 0


def test_votes_margin_is_exactly_the_worst_attack_at_the_worst_position():
    """For votes, margin = min over competitors c of (votes_y - votes_c) after the attack at worst_position,
    and no position gives a smaller one (the certificate is tight, not only sound)."""
    gen = torch.Generator().manual_seed(7)
    geometry = GEOMETRIES[3]
    H = W = 12
    patch = (3, 2)
    logits = torch.randn(5, 3, *geometry.grid_size(H, W), generator=gen)
    logits[:, 1] += 1.0
    res = certify_logits(logits, None, geometry, (H, W), patch)
    for n in range(logits.shape[0]):
        y = int(res.prediction[n])
        best = None
        for t in range(H - patch[0] + 1):
            for l in range(W - patch[1] + 1):
                mask = affected_by_boxes(geometry, (H, W), patch, t, l)
                for c in range(3):
                    if c == y:
                        continue
                    adv = logits[n].clone()
                    adv[:, mask] = -1.0
                    adv[c, mask] = 1.0
                    votes = (adv > 0).sum((1, 2))
                    gap = int(votes[y] - votes[c])
                    if best is None or gap < best[0]:
                        best = (gap, t, l)
        assert int(res.margin[n]) == best[0]
        t, l = (int(v) for v in res.worst_position[n])
        mask = affected_by_boxes(geometry, (H, W), patch, t, l)
        gaps = []
        for c in range(3):
            if c != y:
                adv = logits[n].clone()
                adv[:, mask] = -1.0
                adv[c, mask] = 1.0
                votes = (adv > 0).sum((1, 2))
                gaps.append(int(votes[y] - votes[c]))
        assert min(gaps) == best[0]
