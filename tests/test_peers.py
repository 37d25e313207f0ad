"""Peer certifiers (bagcert.peers): soundness and exactness against brute force on small cases."""

import itertools

import pytest
import torch

import bagcert
from bagcert import peers
from bagcert.geometry import Geometry
from bagcert.peers.patchguard import patchguard_certify_evidence, robust_masking


def tiny_model(seed=0, classes=4):
    torch.manual_seed(seed)
    return bagcert.create_model("cifar_bagnet5_s2", num_classes=classes, width=8).eval()


def images(n, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# common interface
# ----------------------------------------------------------------------------------------------
def test_interface_names_and_forward_passes():
    certs = [peers.BagCert(), peers.ClippedBagNet(), peers.PatchGuardMasking(), peers.DerandomizedSmoothing(4), peers.PatchCleanser(6)]
    assert len({c.name for c in certs}) == len(certs)
    assert [c.forward_passes_per_image((32, 32), 5) for c in certs] == [1, 1, 1, 32, 666]
    assert peers.DerandomizedSmoothing(4, mode="block").forward_passes_per_image((32, 32), 5) == 1024
    assert peers.DerandomizedSmoothing(4).forward_passes_per_image((224, 224), 32) == 224
    assert peers.PatchCleanser(6).forward_passes_per_image((224, 224), 32) == 666


def test_clipped_bagnet_agrees_with_certify():
    model, x, y = tiny_model(), images(6), torch.tensor([0, 1, 2, 3, 0, 1])
    for patch in (3, (2, 5)):
        ref = bagcert.certify(model, x, y, patch_size=patch, aggregation="clipped")
        res = peers.ClippedBagNet().certify(model, x, y, patch)
        for f in ("prediction", "label", "correct", "certified", "margin", "worst_position"):
            assert torch.equal(getattr(res, f), getattr(ref, f)), f
        assert res.patch_size == ref.patch_size and res.aggregation == "clipped_bagnet"
        assert torch.equal(peers.ClippedBagNet().predict(model, x), ref.prediction)
    votes = bagcert.certify(model, x, y, patch_size=3, aggregation="votes")
    assert torch.equal(peers.BagCert().certify(model, x, y, 3).margin, votes.margin)


def test_training_mode_refused():
    model = tiny_model().train()
    for cert in (peers.ClippedBagNet(), peers.PatchGuardMasking(), peers.PatchCleanser(2)):
        with pytest.raises(RuntimeError, match="training mode"):
            cert.certify(model, images(1), None, 3)


# ----------------------------------------------------------------------------------------------
# PatchGuard robust masking
# ----------------------------------------------------------------------------------------------
def naive_masked(u, window, threshold=0.0):
    """Robust masking by explicit loops over windows: u [K, h, w] (one class) -> masked evidence [K]."""
    K, h, w = u.shape
    wh, ww = window
    sums = torch.stack([u[:, i : i + wh, j : j + ww].sum((1, 2)) for i in range(h - wh + 1) for j in range(w - ww + 1)], 1)
    best = sums.max(1).values
    total = u.sum((1, 2))
    return torch.where(best > threshold * total, total - best, total)


def worst_case(u, mask, window, values, threshold=0.0):
    """Enumerate every assignment of ``values`` to the affected locations of one class map u [h, w].

    Returns (min, max) of the masked evidence over all assignments.
    """
    locs = mask.nonzero().tolist()
    combos = torch.tensor(list(itertools.product(values, repeat=len(locs))), dtype=torch.float64)
    maps = u.expand(combos.shape[0], *u.shape).clone()
    for k, (i, j) in enumerate(locs):
        maps[:, i, j] = combos[:, k]
    m = naive_masked(maps, window, threshold)
    return float(m.min()), float(m.max())


PG_CASES = [
    # geometry, image size, patch size
    (Geometry.from_layers([(2, 1, 0)]), (7, 7), (1, 1)),  # rf 2, unpadded: 6x6 map, windows 2x2
    (Geometry.from_layers([(3, 1, 1)]), (6, 6), (1, 1)),  # rf 3, padded: windows clipped at the border
    (Geometry.from_layers([(3, 2, 1)]), (8, 8), (2, 2)),  # stride 2: affected sets of varying size
    (Geometry.from_layers([(2, 1, 0)]), (7, 7), (1, 2)),  # non-square patch
]


def skewed_evidence(n, classes, shape, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, classes, 1, 1, generator=g) * 3 + 0.05
    scale[: n // 2, 0] *= 6  # half of the samples have a dominant class: some certify
    u = torch.rand(n, classes, *shape, generator=g, dtype=torch.float64) * scale
    u[torch.rand(u.shape, generator=g) < 0.3] = 0.0  # exact zeros, as ReLU gives
    return u


@pytest.mark.parametrize("case", range(len(PG_CASES)))
def test_patchguard_certificate_is_exact_by_brute_force(case):
    """No upper clip, tau = 0: the certificate's margin equals the worst case found by enumerating
    every patch position and every assignment of {0, small, large} evidence to the affected set, per
    class; certified samples never flip (argmax with ties to the lower index)."""
    geom, image_size, patch = PG_CASES[case]
    h, w = geom.grid_size(*image_size)
    u = skewed_evidence(8, 3, (h, w), seed=case)
    res = patchguard_certify_evidence(u, None, geom, image_size, patch)
    window = peers.evidence_window_size(geom, image_size, patch)
    assert torch.equal(res.prediction, robust_masking(u, window).argmax(1))
    H, W = image_size
    for n in range(u.shape[0]):
        y = int(res.prediction[n])
        big = float(u[n].sum()) + 1.0  # more than any class's total: the patch window then dominates
        worst_margin, flipped = float("inf"), False
        for top, left in itertools.product(range(H - patch[0] + 1), range(W - patch[1] + 1)):
            mask = geom.affected_mask(image_size, patch, top, left)
            values = (0.0, 0.37, big) if mask.sum() <= 4 else (0.0, big)  # keep the enumeration small
            lo_y, _ = worst_case(u[n, y], mask, window, values)
            for c in range(u.shape[1]):
                if c == y:
                    continue
                _, hi_c = worst_case(u[n, c], mask, window, values)
                worst_margin = min(worst_margin, lo_y - hi_c)
                flipped |= hi_c > lo_y or (hi_c == lo_y and c < y)
        assert abs(worst_margin - float(res.margin[n])) < 1e-9, (n, worst_margin, float(res.margin[n]))
        if bool(res.certified[n]):
            assert not flipped
        else:
            assert worst_margin <= 1e-9  # exact: nothing certifiable is left uncertified
    assert 0 < int(res.certified.sum()) < u.shape[0]  # both outcomes occur: the test has teeth


def test_patchguard_threshold_and_upper_clip_sound_by_brute_force():
    geom, image_size, patch = PG_CASES[0]
    h, w = geom.grid_size(*image_size)
    for tau in (0.2, 0.5):
        u = skewed_evidence(8, 3, (h, w), seed=11).clamp(max=20.0)  # an upper clip at 20
        res = patchguard_certify_evidence(u, None, geom, image_size, patch, threshold=tau)
        assert bool(res.certified.any())
        window = peers.evidence_window_size(geom, image_size, patch)
        assert torch.equal(res.prediction, robust_masking(u, window, tau).argmax(1))
        for n in range(u.shape[0]):
            if not bool(res.certified[n]):
                continue
            y = int(res.prediction[n])
            for top, left in itertools.product(range(image_size[0]), range(image_size[1])):
                mask = geom.affected_mask(image_size, patch, top, left)
                lo_y, _ = worst_case(u[n, y], mask, window, (0.0, 0.5, 5.0, 20.0), tau)
                for c in set(range(3)) - {y}:
                    _, hi_c = worst_case(u[n, c], mask, window, (0.0, 0.5, 5.0, 20.0), tau)
                    assert hi_c < lo_y


def test_patchguard_window_from_geometry():
    model = tiny_model()
    geom = model.geometry
    for size, patch in ((16, 3), (32, 5), (32, (2, 6))):
        wh, ww = peers.evidence_window_size(geom, (size, size), patch)
        ph, pw = bagcert.parse_patch_size(patch)
        boxes = [
            geom.affected_mask((size, size), patch, t, l).nonzero() for t in range(size - ph + 1) for l in range(size - pw + 1)
        ]
        assert wh == max(int(b[:, 0].max() - b[:, 0].min() + 1) for b in boxes if len(b))
        assert ww == max(int(b[:, 1].max() - b[:, 1].min() + 1) for b in boxes if len(b))


def test_patchguard_on_model_and_real_patches():
    model, x = tiny_model(1), images(6, seed=3)
    pg = peers.PatchGuardMasking()
    res = pg.certify(model, x, None, 3)
    ev = model.local_logits(x).clamp(min=0)
    ref = patchguard_certify_evidence(ev, None, model.geometry, (16, 16), 3)
    assert torch.equal(res.prediction, ref.prediction) and torch.equal(res.certified, ref.certified)
    assert torch.equal(pg.predict(model, x, 3), res.prediction)
    # a real patch at the worst position (and a few others) never changes a certified prediction
    g = torch.Generator().manual_seed(0)
    for top, left in [tuple(p) for p in res.worst_position.tolist()] + [(0, 0), (13, 13), (6, 2)]:
        xp = x.clone()
        xp[:, :, top : top + 3, left : left + 3] = torch.rand(6, 3, 3, 3, generator=g)
        pred = pg.predict(model, xp, 3)
        assert torch.equal(pred[res.certified], res.prediction[res.certified])


def test_patchguard_ties_never_certified():
    geom = Geometry.from_layers([(1, 1, 0)])
    u = torch.zeros(1, 2, 6, 6, dtype=torch.float64)  # all evidence zero: a tie, prediction 0
    res = patchguard_certify_evidence(u, None, geom, (6, 6), 1)
    assert int(res.prediction) == 0 and not bool(res.certified)


# ----------------------------------------------------------------------------------------------
# De-randomized smoothing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["column", "block"])
def test_drs_affected_count_is_exact(mode):
    H = W = 8
    for b, (ph, pw) in itertools.product((1, 2, 3, 8), ((1, 1), (2, 3), (3, 2), (8, 8))):
        keep = peers.ablation_keep_masks((H, W), b, mode)
        assert keep.shape[0] == (W if mode == "column" else H * W)
        assert bool((keep.sum((1, 2)) == (min(b, W) * H if mode == "column" else min(b, H) * min(b, W))).all())
        delta = peers.affected_ablations((H, W), (ph, pw), b, mode)
        for top, left in itertools.product(range(H - ph + 1), range(W - pw + 1)):
            patch = torch.zeros(H, W, dtype=torch.bool)
            patch[top : top + ph, left : left + pw] = True
            assert int((keep & patch).flatten(1).any(1).sum()) == delta, (b, ph, pw, top, left)
    assert peers.affected_ablations((32, 32), 5, 4) == 8  # p + b - 1
    assert peers.affected_ablations((32, 32), 5, 4, "block") == 64


def brute_force_flips(votes, keep, patch_size, num_classes):
    """Every patch position; the affected ablations all switch to one class (the strongest attack
    towards that class). Returns True if any makes argmax (ties to the lower index) change."""
    H, W = keep.shape[-2:]
    ph, pw = patch_size
    pred = torch.bincount(votes, minlength=num_classes).argmax()
    for top, left in itertools.product(range(H - ph + 1), range(W - pw + 1)):
        hit = keep[:, top : top + ph, left : left + pw].flatten(1).any(1)
        for c in range(num_classes):
            v = votes.clone()
            v[hit] = c
            if torch.bincount(v, minlength=num_classes).argmax() != pred:
                return True
    return False


def test_drs_certificate_sound_by_brute_force():
    H = W = 8
    g = torch.Generator().manual_seed(0)
    n_cert = 0
    for trial in range(60):
        b, patch = [(1, (1, 1)), (2, (1, 2)), (1, (2, 1))][trial % 3]
        keep = peers.ablation_keep_masks((H, W), b)
        probs = torch.rand(3, generator=g) ** 3
        votes = torch.multinomial(probs / probs.sum(), W, replacement=True, generator=g)
        delta = peers.affected_ablations((H, W), patch, b)
        counts = torch.bincount(votes, minlength=3)[None]
        pred, cert, margin = peers.certify_counts(counts, delta)
        assert int(pred) == int(counts.argmax())
        if bool(cert):
            n_cert += 1
            assert not brute_force_flips(votes, keep, patch, 3)
    assert 0 < n_cert < 60


def test_drs_tie_rule_exact_and_shared_with_prediction():
    # W = 16 bands of width 2, patch 3 wide: delta = 4, 2 * delta = 8
    W, b, patch = 16, 2, (1, 3)
    keep = peers.ablation_keep_masks((1, W), b)
    delta = peers.affected_ablations((1, W), patch, b)
    assert delta == 4

    def case(label_runs):
        return torch.tensor([c for c, n in label_runs for _ in range(n)])

    # y = 1 against a HIGHER class 2: y keeps ties, so n_y - n_c = 8 = 2 delta certifies ...
    v = case([(1, 12), (2, 4)])
    pred, cert, margin = peers.certify_counts(torch.bincount(v, minlength=3)[None], delta)
    assert int(pred) == 1 and bool(cert) and int(margin) == 1 and not brute_force_flips(v, keep, patch, 3)
    # ... and 7 does not, and an attack exists (the affected bands all vote y)
    v = case([(1, 11), (2, 4), (0, 1)])
    pred, cert, margin = peers.certify_counts(torch.bincount(v, minlength=3)[None], delta)
    assert int(pred) == 1 and not bool(cert) and int(margin) == 0 and brute_force_flips(v, keep, patch, 3)
    # y = 1 against a LOWER class 0: c wins ties, so 8 is not enough (attack exists) but 9 is
    v = case([(1, 12), (0, 4)])
    pred, cert, margin = peers.certify_counts(torch.bincount(v, minlength=3)[None], delta)
    assert int(pred) == 1 and not bool(cert) and int(margin) == 0 and brute_force_flips(v, keep, patch, 3)
    v = case([(1, 12), (0, 3), (2, 1)])
    pred, cert, margin = peers.certify_counts(torch.bincount(v, minlength=3)[None], delta)
    assert int(pred) == 1 and bool(cert) and not brute_force_flips(v, keep, patch, 3)
    # a tie at the top: prediction goes to the lower index, never certified
    pred, cert, _ = peers.certify_counts(torch.tensor([[0, 8, 8]]), 1)
    assert int(pred) == 1 and not bool(cert)


class FakeAblationClassifier(torch.nn.Module):
    """A deterministic classifier of the 6-channel "mask" encoding: class = bin of the mean kept red
    value, plus a huge vote for class 2 when a kept pixel carries the trigger (green == 1)."""

    num_classes = 3

    def forward(self, enc):
        x, keep = enc[:, :3], enc[:, 3]
        red = (x[:, 0] * keep).sum((1, 2)) / keep.sum((1, 2)).clamp(min=1)
        logits = -((red[:, None] - torch.tensor([0.2, 0.5, 0.8])) ** 2)
        trigger = ((x[:, 1] == 1.0) & (keep > 0)).any(dim=(1, 2)).float()
        return logits + 10 * trigger[:, None] * torch.tensor([0.0, 0.0, 1.0])


def test_drs_end_to_end_with_real_patches():
    H = W = 8
    drs = peers.DerandomizedSmoothing(band_size=2, batch_size=37)
    fn = FakeAblationClassifier().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, H, W, generator=g) * 0.95
    x[:3, 0] = x[:3, 0] * 0.2 + 0.1  # three images firmly class 0 (red ~ 0.2): certifiable
    res = drs.certify(fn, x, None, 2)
    assert torch.equal(res.prediction, drs.predict(fn, x))
    v0 = drs.votes(fn, x)
    keep = peers.ablation_keep_masks((H, W), 2)
    assert 0 < int(res.certified.sum()) < 6
    for top, left in itertools.product(range(H - 1), range(W - 1)):
        xp = x.clone()
        xp[:, 1, top : top + 2, left : left + 2] = 1.0  # trigger
        xp[:, 0, top : top + 2, left : left + 2] = 1.0
        v = drs.votes(fn, xp)
        hit = keep[:, top : top + 2, left : left + 2].flatten(1).any(1)
        assert torch.equal(v[:, ~hit], v0[:, ~hit])  # only bands meeting the patch can change
        assert int(hit.sum()) == 3
        pred = drs.predict(fn, xp)
        assert torch.equal(pred[res.certified], res.prediction[res.certified])


def test_drs_encodings_and_base_classifier():
    x = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    keep = torch.tensor([[True, True, False]])
    m = peers.AblatedInput("mask")(x, keep)
    assert m.shape == (1, 6, 1, 3) and m[0, :, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]  # black kept != ablated
    assert m[0, :, 0, 2].tolist() == [0] * 6
    lf = peers.AblatedInput("levine_feizi")(x, keep)
    assert lf[0, :, 0, 1].tolist() == [0.25] * 3 + [0.75] * 3 and lf[0, :, 0, 2].tolist() == [0] * 6
    f = peers.AblatedInput("fill", fill=0.5)(x, keep)
    assert f.shape == (1, 3, 1, 3) and f[0, :, 0, 2].tolist() == [0.5] * 3
    clf = peers.ablation_classifier("cifar_bagnet5_s2", num_classes=4, width=8).eval()
    xs, y = images(2), torch.tensor([0, 3])
    drs = peers.DerandomizedSmoothing(band_size=3)
    res = drs.certify(clf, xs, y, 3)
    assert res.prediction.shape == (2,) and res.margin.dtype == torch.long
    assert torch.equal(peers.DerandomizedSmoothing(band_size=3, batch_size=5).certify(clf, xs, y, 3).margin, res.margin)
    with pytest.raises(TypeError, match="3-channel bagcert model"):
        drs.certify(tiny_model(), xs, y, 3)
    fill = peers.DerandomizedSmoothing(band_size=3, encoding="fill")
    assert fill.certify(tiny_model(), xs, y, 3).prediction.shape == (2,)


def test_peer_classifier_checkpoint_roundtrip(tmp_path):
    clf = peers.ablation_classifier("cifar_bagnet5_s2", num_classes=4, width=8).eval()
    path = peers.save_peer_classifier(tmp_path / "drs.pt", clf, note="t")
    back, meta = peers.load_peer_classifier(path)
    enc = peers.AblatedInput()(images(2), torch.ones(16, 16, dtype=torch.bool))
    assert meta == {"note": "t"} and torch.equal(back(enc), clf(enc))
    with pytest.raises(bagcert.CheckpointError):
        peers.load_peer_classifier(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------
# PatchCleanser
# ----------------------------------------------------------------------------------------------
def test_mask_axis_covers_every_patch_position():
    for n in range(1, 40):
        for p in range(1, n + 1):
            for k in range(1, 8):
                m, s, starts = peers.mask_axis(n, p, k)
                assert len(starts) <= k and all(0 <= t and t + m <= n for t in starts)
                for a in range(n - p + 1):
                    assert any(t <= a and a + p <= t + m for t in starts), (n, p, k, a)


@pytest.mark.parametrize("image,patch,k", [((32, 32), 5, 6), ((224, 224), 32, 6), ((12, 12), 2, 3), ((10, 15), (3, 4), (2, 3))])
def test_mask_set_covers_every_patch_position_2d(image, patch, k):
    ms = peers.MaskSet.for_patch(image, patch, k)
    masks = ms.masks().long()
    ph, pw = bagcert.parse_patch_size(patch)
    # inside[m, t, l] = the patch at (t, l) lies entirely inside mask m (box sums from an integral image)
    S = torch.nn.functional.pad(masks.cumsum(1).cumsum(2), (1, 0, 1, 0))
    box = S[:, ph:, pw:] - S[:, :-ph, pw:] - S[:, ph:, :-pw] + S[:, :-ph, :-pw]
    inside = box == ph * pw
    assert inside.shape[1:] == (image[0] - ph + 1, image[1] - pw + 1)
    assert bool(inside.any(0).all())
    assert ms.num_masks <= (k * k if isinstance(k, int) else k[0] * k[1])


def test_mask_set_parameters():
    ms = peers.MaskSet.for_patch((32, 32), 5, 6)
    assert ms.stride == (5, 5) and ms.mask_size == (9, 9) and ms.num_masks == 36
    ms = peers.MaskSet.for_patch((224, 224), 32, 6)
    assert ms.stride == (33, 33) and ms.mask_size == (64, 64) and ms.num_masks == 36


def fake_classifier(x, classes=3, fill=0.5):
    """Logits from visible (unmasked) pixels: count of pixels per red-value bin, plus 100 per visible
    trigger pixel (green exactly 1.0) of that bin. Masked pixels (all channels == fill) are ignored."""
    visible = ~(x == fill).all(1)
    bins = (x[:, 0] * classes).long().clamp(max=classes - 1)
    trig = (x[:, 1] == 1.0) & visible
    onehot = torch.nn.functional.one_hot(bins, classes).double()  # [B, H, W, C]
    weight = visible.double() + 100 * trig.double()
    return (onehot * weight[..., None]).sum((1, 2))


def test_patchcleanser_sound_under_every_patch_position():
    H = W = 12
    p, C = 2, 3
    pc = peers.PatchCleanser(k=3, batch_size=400)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, H, W, generator=g) * 0.98
    x[:2, 0] = x[:2, 0] * 0.3  # mostly class-0 red values: certifiable
    x[2, 0, :, :6] = x[2, 0, :, :6] * 0.3  # half class 0: masks can change the majority
    res = pc.certify(fake_classifier, x, None, p)
    assert torch.equal(pc.predict(fake_classifier, x, p), res.prediction)
    assert pc.forward_passes_per_image((H, W), p) == 45
    assert 0 < int(res.certified.sum()) < 5
    patched, owner = [], []
    for top, left in itertools.product(range(H - p + 1), range(W - p + 1)):
        for target in range(C):
            for trigger in (1.0, 0.3):
                xp = x.clone()
                xp[:, 0, top : top + p, left : left + p] = (target + 0.5) / C
                xp[:, 1, top : top + p, left : left + p] = trigger
                patched.append(xp)
                owner.append(torch.arange(5))
    xp, owner = torch.cat(patched), torch.cat(owner)
    pred = pc.predict(fake_classifier, xp, p)
    cert = res.certified[owner]
    assert torch.equal(pred[cert], res.prediction[owner][cert])
    # the attack is real: it flips the undefended classifier on certified images, and the defended
    # prediction on some uncertified ones
    plain = fake_classifier(xp).argmax(1)
    assert bool((plain[cert] != res.prediction[owner][cert]).any())
    assert bool((pred[~cert] != res.prediction[owner][~cert]).any())


def test_patchcleanser_certificate_is_two_mask_agreement():
    x = images(4, size=12, seed=5)
    pc = peers.PatchCleanser(k=2)
    ms = pc.mask_set((12, 12), 3)
    table, C = pc.two_mask_predictions(fake_classifier, x, ms)
    masks = ms.masks()
    for r, r2 in itertools.product(range(ms.num_masks), repeat=2):  # the table is F(x ⊙ r ⊙ r')
        direct = fake_classifier(x.masked_fill((masks[r] | masks[r2])[None, None], 0.5)).argmax(1)
        assert torch.equal(table[:, r, r2], direct)
    res = pc.certify(fake_classifier, x, None, 3)
    assert torch.equal(res.certified, (table == res.prediction[:, None, None]).all(2).all(1))
    assert torch.equal(res.certified, res.margin > 0)


def test_double_masking_rules_and_ties():
    M = 4

    def table(one, off, rows=None):
        """A symmetric pair table: one-mask predictions on the diagonal, ``off`` elsewhere, and the
        second round of selected masks r (row and column r) given explicitly."""
        t = torch.full((1, M, M), off)
        for r, row in (rows or {}).items():
            t[0, r] = torch.tensor(row)
            t[0, :, r] = torch.tensor(row)
        t[0].diagonal().copy_(torch.tensor(one))
        return t

    assert int(peers.double_masking_from_pairs(table([2, 2, 2, 2], 2), 3)) == 2  # agreed
    # majority tie between 1 and 0 goes to the lower index; no disagreer has a unanimous second round
    assert int(peers.double_masking_from_pairs(table([1, 1, 0, 0], 2), 3)) == 0
    # disagreer 3 (class 2) whose second round is unanimous is trusted
    assert int(peers.double_masking_from_pairs(table([0, 0, 0, 2], 0, {3: [2, 2, 2, 2]}), 3)) == 2
    # a disagreer with a non-unanimous second round is not
    assert int(peers.double_masking_from_pairs(table([0, 0, 0, 2], 0, {3: [2, 1, 2, 2]}), 3)) == 0
    # two disagreers (masks 0 and 2): only mask 0 has a unanimous second round
    t = table([1, 0, 2, 0], 0, {0: [1, 1, 1, 1]})
    t[0, 2, [1, 2, 3]] = 2
    t[0, [1, 3], 2] = 2
    t[0, 0, 2] = t[0, 2, 0] = 1  # the pair (0, 2) agrees with mask 0, not with mask 2
    assert int(peers.double_masking_from_pairs(t, 3)) == 1


def test_patchcleanser_with_bagcert_model():
    model, x = tiny_model(2), images(2)
    pc = peers.PatchCleanser(k=2)
    res = pc.certify(model, x, torch.tensor([1, 2]), 3)
    assert pc.last_forward_passes == 2 * 10 and res.margin.dtype == torch.long
    assert torch.equal(pc.predict(model, x, 3), res.prediction)


# ----------------------------------------------------------------------------------------------
# training transforms
# ----------------------------------------------------------------------------------------------
def test_random_ablation_shapes_bands_and_reproducibility():
    x = images(7, size=10)
    out, starts = peers.random_ablation(x, 3, torch.Generator().manual_seed(4), return_starts=True)
    assert out.shape == (7, 6, 10, 10) and starts.shape == (7,)
    keep = out[:, 3]
    assert bool((keep.sum((1, 2)) == 30).all())
    for i, s in enumerate(starts.tolist()):
        cols = sorted(keep[i, 0].nonzero().flatten().tolist())
        assert cols == sorted((s + t) % 10 for t in range(3))  # one band, wrapping around
        assert torch.equal(out[i, :3], x[i] * keep[i])
    again = peers.random_ablation(x, 3, torch.Generator().manual_seed(4))
    other = peers.random_ablation(x, 3, torch.Generator().manual_seed(5))
    assert torch.equal(out, again) and not torch.equal(out, other)
    blk, st = peers.random_ablation(x, 2, torch.Generator().manual_seed(0), mode="block", encoding="fill", return_starts=True)
    assert blk.shape == (7, 3, 10, 10) and st.shape == (7, 2)
    assert bool(((blk != 0.5).any(1).sum((1, 2)) <= 4).all())


def test_random_masks_from_mask_set():
    x = images(6, size=12)
    ms = peers.MaskSet.for_patch((12, 12), 2, 3)
    out, idx = peers.random_masks(x, ms, torch.Generator().manual_seed(1), num_masks=2, fill=0.5, return_index=True)
    assert out.shape == x.shape and idx.shape == (6, 2)
    masks = ms.masks()
    for i in range(6):
        union = masks[idx[i, 0]] | masks[idx[i, 1]]
        assert bool((out[i][:, union] == 0.5).all()) and torch.equal(out[i][:, ~union], x[i][:, ~union])
    assert torch.equal(out, peers.random_masks(x, ms, torch.Generator().manual_seed(1), num_masks=2))
    with pytest.raises(ValueError, match="mask set"):
        peers.random_masks(images(1, size=16), ms, torch.Generator())


# ----------------------------------------------------------------------------------------------
# benchmark smoke test
# ----------------------------------------------------------------------------------------------
def test_peers_compare_benchmark_smoke(tmp_path):
    import json

    from conftest import load_benchmark

    mod = load_benchmark("peers_compare")
    out = tmp_path / "peers.json"
    argv = ["--dataset", "synthetic:4", "--num-images", "3", "--model", "cifar_bagnet5_s2", "--width", "8", "--k", "2"]
    assert mod.main(argv + ["--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"bagcert", "clipped_bagnet", "patchguard", "drs", "patchcleanser"}
    assert res["methods"]["patchcleanser"]["forward_passes_per_image"] == 10
    assert res["methods"]["drs"]["forward_passes_per_image"] == 32
    assert all(r["random_init"] for r in res["methods"].values())
    assert res["methods"]["bagcert"]["cost_ratio_to_bagcert"] == 1.0
    assert "torch_version" in res["env"] and res["dataset"]["num_images"] == 3


def test_patchguard_exact_ties_follow_the_lower_index_rule_not_float_residues():
    # class 1's map is class 0's turned by 180 degrees: the same total and the same window sums, so the masked
    # evidence is tied exactly; float integral images give class 1 a residue of ~2e-15 more
    a = torch.tensor([[5, 2, 1, 6, 3, 7], [7, 9, 8, 1, 8, 1], [8, 7, 2, 0, 6, 2], [3, 8, 6, 0, 5, 1], [8, 8, 3, 7, 0, 8],
                      [1, 0, 6, 3, 5, 6]], dtype=torch.float64) / 10
    u = torch.stack([a, a.flip(0).flip(1)])[None]
    geom = Geometry.from_layers([(1, 1, 0)])
    window = peers.evidence_window_size(geom, (6, 6), 2)
    masked = robust_masking(u, window)
    assert float(masked[0, 1] - masked[0, 0]) != 0.0  # the residue is there
    res = patchguard_certify_evidence(u, None, geom, (6, 6), 2)
    assert int(res.prediction) == 0 and not bool(res.certified)
    # the same tie in votes: summed in integers, exactly equal
    votes = (torch.stack([a, a.flip(0).flip(1)])[None] > 0.45).double()
    assert int(patchguard_certify_evidence(votes, None, geom, (6, 6), 2).prediction) == 0
    assert robust_masking(votes, window).dtype == torch.int64
    # the model path's prediction follows the same rule
    assert int(peers.patchguard.masked_prediction(masked, peers.patchguard.tie_tolerance(u))) == 0


def naive_patchguard_margins(u, geom, image_size, patch, tau):
    """(margin with PatchGuard's tighter lower bound, margin with the plain bound) per sample, by explicit loops over
    patch positions and windows (module doc of bagcert.peers.patchguard); u [N, C, h, w], predictions from
    naive_masked."""
    N, C, h, w = u.shape
    wh, ww = peers.evidence_window_size(geom, image_size, patch)
    wins = [(i, j) for i in range(h - wh + 1) for j in range(w - ww + 1)]
    masked = torch.stack([naive_masked(u[:, c], (wh, ww), tau) for c in range(C)], 1)
    pred = masked.argmax(1)
    H, W = image_size
    tight, plain = [], []
    for n in range(N):
        y = int(pred[n])
        best_t = best_p = float("inf")
        for top, left in itertools.product(range(H - patch[0] + 1), range(W - patch[1] + 1)):
            R = geom.affected_mask(image_size, patch, top, left)
            inside = lambda i, j: bool(R[i : i + wh, j : j + ww].any())  # noqa: E731
            covers = lambda i, j: int(R[i : i + wh, j : j + ww].sum()) == int(R.sum())  # noqa: E731
            v = u[n, y] * ~R
            t_v = float(v.sum())
            s_v = {(i, j): float(v[i : i + wh, j : j + ww].sum()) for i, j in wins}
            q_all = max(s_v.values())
            q_ov = max([s_v[k] for k in wins if inside(*k)], default=0.0)
            lb_plain = t_v - q_all
            lb_tight = t_v - (q_all if q_all > tau * t_v else q_ov)
            for c in range(C):
                if c == y:
                    continue
                cov = max(float(u[n, c, i : i + wh, j : j + ww].sum()) for i, j in wins if covers(i, j))
                ub = (float(u[n, c].sum()) - cov) / (1 - tau)
                best_t, best_p = min(best_t, lb_tight - ub), min(best_p, lb_plain - ub)
        tight.append(best_t)
        plain.append(best_p)
    return torch.tensor(tight, dtype=torch.float64), torch.tensor(plain, dtype=torch.float64)


@pytest.mark.parametrize("case, tau", [(c, 0.5) for c in range(len(PG_CASES))]
                         + [pytest.param(c, 0.2, marks=pytest.mark.slow) for c in range(len(PG_CASES))])
def test_patchguard_threshold_lower_bound_is_patchguards_tighter_one_and_sound_by_brute_force(case, tau):
    """tau > 0: the margin is the one of PatchGuard's lower bound (only windows overlapping the patch are
    subtracted when the zeroed map is not detected), computed here by explicit loops; it is never below the plain
    bound's and certifies more somewhere; no enumerated patch flips a certified sample."""
    geom, image_size, patch = PG_CASES[case]
    h, w = geom.grid_size(*image_size)
    u = skewed_evidence(6, 3, (h, w), seed=20 + case)
    res = patchguard_certify_evidence(u, None, geom, image_size, patch, threshold=tau)
    tight, plain = naive_patchguard_margins(u, geom, image_size, patch, tau)
    assert torch.allclose(res.margin, tight, atol=1e-9), (res.margin, tight)
    assert bool((tight >= plain - 1e-12).all())
    window = peers.evidence_window_size(geom, image_size, patch)
    H, W = image_size
    for n in range(u.shape[0]):
        if not bool(res.certified[n]):
            continue
        y = int(res.prediction[n])
        big = float(u[n].sum()) + 1.0
        for top, left in itertools.product(range(H - patch[0] + 1), range(W - patch[1] + 1)):
            mask = geom.affected_mask(image_size, patch, top, left)
            values = (0.0, 0.37, big) if mask.sum() <= 4 else (0.0, big)
            lo_y, _ = worst_case(u[n, y], mask, window, values, tau)
            for c in set(range(3)) - {y}:
                _, hi_c = worst_case(u[n, c], mask, window, values, tau)
                assert hi_c < lo_y, (n, top, left, c)


def test_patchguard_tighter_threshold_bound_certifies_what_the_plain_bound_cannot():
    # y's evidence spread evenly (no window is detected, with or without the patch), another class at 0.71 of it:
    # the plain bound subtracts a whole window outside the patch (margin 28 - 28.4 < 0), PatchGuard's only a window
    # overlapping it (29 - 28.4 > 0); every patch with evidence {0, big} on its affected set leaves y predicted
    geom, image_size, patch, tau = Geometry.from_layers([(2, 1, 0)]), (7, 7), (1, 1), 0.2
    u = torch.stack([torch.full((6, 6), v, dtype=torch.float64) for v in (1.0, 0.71, 0.1)])[None]
    res = patchguard_certify_evidence(u, None, geom, image_size, patch, threshold=tau)
    tight, plain = naive_patchguard_margins(u, geom, image_size, patch, tau)
    assert float(plain[0]) == pytest.approx(28 - 28.4) and float(tight[0]) == pytest.approx(29 - 28.4)
    assert int(res.prediction) == 0 and bool(res.certified) and float(res.margin) == pytest.approx(0.6)
    window = peers.evidence_window_size(geom, image_size, patch)
    big = float(u.sum()) + 1.0
    for top, left in itertools.product(range(7), range(7)):
        mask = geom.affected_mask(image_size, patch, top, left)
        lo_y, _ = worst_case(u[0, 0], mask, window, (0.0, 0.5, big), tau)
        for c in (1, 2):
            assert worst_case(u[0, c], mask, window, (0.0, 0.5, big), tau)[1] < lo_y
