"""Double masking on the local map: ``LocalDoubleMasking`` / ``double_masking_certify_evidence`` and
``certify --double-masking``.

The efficient certificate (running maxima for disjoint mask pairs, a bound then intersection windows for
overlapping ones) is checked against a plain enumeration of every mask pair whose prediction follows
PatchCleanser's image-space implementation (``double_masking_from_pairs``), and against a worst-case adversary
that rewrites the affected locations R(p) of every patch position."""

import csv
import itertools
import json

import pytest
from pathlib import Path

import torch

import bagcert
import certify
from bagcert import peers
from bagcert.data import load_dataset
from bagcert.geometry import Geometry
from bagcert.peers import (LocalDoubleMasking, double_masking_certify_evidence, double_masking_from_pairs,
                           double_masking_predict, feature_mask_set)

CLASSES = [f"class{i}" for i in range(10)]

# geometry (kernel, stride, padding), image size, patch size, k (None: every window at stride 1)
CASES = [
    ([(2, 1, 0)], (7, 8), (1, 1), None),  # stride 1, unpadded: 6x7 map, 2x2 masks
    ([(3, 1, 1)], (6, 7), (2, 2), None),  # padded: affected sets clipped at the border, 4x4 masks
    ([(3, 2, 1)], (12, 13), (2, 2), None),  # stride 2: affected sets of varying size
    ([(3, 2, 0)], (13, 15), (1, 3), None),  # stride 2, unpadded, a rectangular patch
    ([(2, 1, 0)], (8, 8), (2, 1), 2),  # k = 2 masks per axis: larger masks at a stride
    ([(3, 1, 1)], (7, 7), (1, 1), (2, 3)),  # k = 2 x 3, the last masks moved back inside
]


def naive(u: torch.Tensor, ms):
    """Every mask pair enumerated: u [N, C, h, w] -> (prediction, certified, exact margin) with PatchCleanser's
    image-space rule (``double_masking_from_pairs``) on the table of two-mask predictions."""
    keep = 1.0 - ms.masks().double()  # [M, h, w]
    pair_keep = keep[:, None] * keep[None]  # [M, M, h, w]: outside the union of m1 and m2
    counts = torch.einsum("nchw,abhw->nabc", u.double(), pair_keep)  # [N, M, M, C]
    table = counts.argmax(dim=3)  # ties to the lower class
    pred = double_masking_from_pairs(table, u.shape[1])
    cy = counts.gather(3, pred.view(-1, 1, 1, 1).expand(-1, *counts.shape[1:3], 1))
    cls = torch.arange(u.shape[1])
    diff = cy - counts + (cls > pred.view(-1, 1, 1, 1)).double()  # tie-adjusted: > 0 iff y beats c
    diff = diff.masked_fill(cls == pred.view(-1, 1, 1, 1), float("inf"))
    margin = diff.flatten(1).amin(dim=1)
    return pred, (table == pred.view(-1, 1, 1)).flatten(1).all(dim=1), margin, table


def random_votes(n, C, shape, seed, spread=0.6):
    """Binary vote maps (many exact ties): class rates drawn per sample, one class favoured in half of them
    (the other classes' rates in [0.1, 0.1 + spread])."""
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(n, C, 1, 1, generator=g) * spread + 0.1
    rate[: n // 2, 0] = 0.85
    return (torch.rand(n, C, *shape, generator=g) < rate).float()


def plant_patches(u, footprint, seed):
    """A patched copy of the favoured samples: a footprint-sized block of R(p)-like locations voting only for
    class 1 (the attacker's class), so that most one-mask predictions follow the block and the second round has
    to recover the majority's loser (step 2 of the rule)."""
    g = torch.Generator().manual_seed(seed)
    out = u.clone()
    (fh, fw), (h, w) = footprint, u.shape[-2:]
    for i in range(u.shape[0] // 2):
        t = int(torch.randint(0, h - fh + 1, (1,), generator=g))
        l = int(torch.randint(0, w - fw + 1, (1,), generator=g))
        out[i, :, t : t + fh, l : l + fw] = 0.0
        out[i, 1, t : t + fh, l : l + fw] = 1.0
    return torch.cat([u, out])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_efficient_certificate_equals_every_pair_enumerated(case):
    layers, image_size, patch, k = CASES[case]
    geom = Geometry.from_layers(layers)
    h, w = geom.grid_size(*image_size)
    ms = feature_mask_set(geom, image_size, patch, k)
    seen_step2 = 0
    for C in (2, 3, 4):
        u = torch.cat([plant_patches(random_votes(24, C, (h, w), seed=10 * case + C), ms.footprint, seed=case),
                       plant_patches(random_votes(8, C, (h, w), seed=20 + case, spread=0.1), ms.footprint, seed=case)])
        pred, cert, margin, table = naive(u, ms)
        exact = double_masking_certify_evidence(u, None, geom, image_size, patch, k=k, exact_margin=True)
        fast = double_masking_certify_evidence(u, None, geom, image_size, patch, k=k)
        assert torch.equal(exact.prediction, pred) and torch.equal(fast.prediction, pred)
        assert torch.equal(double_masking_predict(u, ms), pred)
        assert torch.equal(exact.certified, cert) and torch.equal(fast.certified, cert)
        assert torch.equal(exact.margin, margin.long())
        assert bool((fast.margin <= exact.margin).all())  # a lower bound where the bound decided
        assert torch.equal(fast.margin > 0, cert)
        one = table.diagonal(dim1=1, dim2=2)
        maj = torch.stack([torch.bincount(o, minlength=C).argmax() for o in one])
        seen_step2 += int((pred != maj).sum())  # the second round overruled the majority
        assert 0 < int(cert.sum()) < len(cert) or C > 2  # both outcomes occur
    if case in (0, 2, 3):
        assert seen_step2 > 0  # PatchCleanser's second round is exercised, not only the majority


def test_chunked_evaluation_gives_the_same_results(monkeypatch):
    """Inputs larger than the memory bound are certified in chunks of samples and of second-round rows."""
    from bagcert.peers import local_masking

    layers, image_size, patch, k = CASES[0]
    geom = Geometry.from_layers(layers)
    h, w = geom.grid_size(*image_size)
    ms = feature_mask_set(geom, image_size, patch, k)
    u = plant_patches(random_votes(24, 3, (h, w), seed=7), ms.footprint, seed=7)
    whole = double_masking_certify_evidence(u, None, geom, image_size, patch, exact_margin=True)
    monkeypatch.setattr(local_masking, "_CHUNK", 3 * ms.num_masks * 2)  # two samples (rows) at a time
    parts = double_masking_certify_evidence(u, None, geom, image_size, patch, exact_margin=True)
    for f in ("prediction", "certified", "margin"):
        assert torch.equal(getattr(whole, f), getattr(parts, f)), f
    assert torch.equal(double_masking_predict(u, ms), whole.prediction)
    assert 0 < int(whole.certified.sum()) < len(u)


def test_float_evidence_tolerance_and_ties():
    geom = Geometry.from_layers([(2, 1, 0)])
    image_size, patch = (7, 8), (1, 1)
    h, w = geom.grid_size(*image_size)
    ms = feature_mask_set(geom, image_size, patch)
    g = torch.Generator().manual_seed(3)
    # clipped logits on a coarse grid {0, 0.5, 1} (exact ties occur) and continuous values
    coarse = torch.randint(0, 3, (30, 3, h, w), generator=g).float() / 2
    coarse[:15, 0] = torch.maximum(coarse[:15, 0], torch.tensor(0.5))
    smooth = torch.rand(30, 3, h, w, generator=g)
    smooth[:15, 0] += 0.4
    smooth = smooth.clamp(max=1.0)
    margins = []
    for u in (coarse, smooth):
        res = double_masking_certify_evidence(u, None, geom, image_size, patch, clip_bound=1.0, exact_margin=True)
        pred, _, _, table = naive(u, ms)
        keep = 1.0 - ms.masks().double()
        counts = torch.einsum("nchw,abhw->nabc", u.double(), keep[:, None] * keep[None])
        cy = counts.gather(3, pred.view(-1, 1, 1, 1).expand(-1, *counts.shape[1:3], 1))
        diff = (cy - counts).masked_fill(torch.arange(3) == pred.view(-1, 1, 1, 1), float("inf")).flatten(1).amin(1)
        assert torch.equal(res.prediction, pred)
        assert torch.allclose(res.margin, diff)
        assert torch.equal(res.certified, diff > 1e-9 * h * w)  # the stated tolerance; a tie is never certified
        assert res.margin.dtype == torch.float64 and 0 < int(res.certified.sum()) < 30
        margins.append(res.margin)
    assert bool((margins[0] == 0).any())  # the coarse grid produces exact two-mask ties, none certified
    with pytest.raises(ValueError, match="integer-valued"):
        double_masking_certify_evidence(smooth, None, geom, image_size, patch)
    with pytest.raises(ValueError, match="exceeds clip_bound"):
        double_masking_certify_evidence(smooth * 3, None, geom, image_size, patch, clip_bound=1.0)


@pytest.mark.parametrize("case", [0, 2, 4])
def test_mask_sets_cover_every_affected_set(case):
    layers, image_size, patch, k = CASES[case]
    geom = Geometry.from_layers(layers)
    ms = feature_mask_set(geom, image_size, patch, k)
    masks = ms.masks()
    H, W = image_size
    for t, l in itertools.product(range(H - patch[0] + 1), range(W - patch[1] + 1)):
        R = geom.affected_mask(image_size, patch, t, l)
        assert bool(((R[None] & ~masks).flatten(1).sum(1) == 0).any()), (t, l)
    if k is None:
        h, w = ms.grid
        assert ms.num_masks == (h - ms.footprint[0] + 1) * (w - ms.footprint[1] + 1)
    with pytest.raises(ValueError, match="does not cover"):
        double_masking_certify_evidence(torch.zeros(1, 2, *ms.grid), None, geom, image_size, (3, 3), mask_patch_size=patch)


# worst-case adversary in feature space: tiny maps, every patch position, adversarial binary patterns inside R(p)
ADVERSARY_CASES = [
    ([(2, 1, 0)], (5, 6), (1, 1), 2, None),  # 4x5 map, |R| = 4, 2 classes: all 2^8 patterns
    ([(3, 2, 1)], (8, 8), (1, 2), 2, None),  # stride 2, |R| <= 4: all patterns
    ([(2, 1, 0)], (6, 6), (1, 1), 3, 2),  # 3 classes, k = 2: random patterns and the extreme ones
]


@pytest.mark.parametrize("case", range(len(ADVERSARY_CASES)))
def test_certified_prediction_survives_every_feature_space_patch(case):
    layers, image_size, patch, C, k = ADVERSARY_CASES[case]
    geom = Geometry.from_layers(layers)
    h, w = geom.grid_size(*image_size)
    ms = feature_mask_set(geom, image_size, patch, k)
    u = random_votes(16, C, (h, w), seed=50 + case)
    res = double_masking_certify_evidence(u, None, geom, image_size, patch, k=k)
    assert int(res.certified.sum()) > 0
    H, W = image_size
    regions = {tuple(geom.affected_mask(image_size, patch, t, l).flatten().tolist())
               for t, l in itertools.product(range(H - patch[0] + 1), range(W - patch[1] + 1))}
    g = torch.Generator().manual_seed(case)
    flips_uncertified = 0
    for region in regions:
        R = torch.tensor(region).view(h, w)
        n_loc = int(R.sum())
        if C * n_loc <= 10:  # every binary pattern of every class on R(p)
            bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=C * n_loc)))
        else:
            extremes = torch.eye(C).repeat_interleave(n_loc, dim=1)  # all votes for one class only
            bits = torch.cat([extremes, 1 - extremes, torch.randint(0, 2, (200, C * n_loc), generator=g).float()])
        patterns = bits.view(-1, C, n_loc)
        for i in range(len(u)):
            attacked = u[i].expand(len(patterns), C, h, w).clone()
            attacked[:, :, R] = patterns
            after = double_masking_predict(attacked, ms)
            if bool(res.certified[i]):
                assert bool((after == res.prediction[i]).all()), (i, region)
            else:
                flips_uncertified += int((after != res.prediction[i]).any())
    assert flips_uncertified > 0  # the adversary is strong enough to move uncertified samples


@pytest.mark.parametrize("case", range(len(ADVERSARY_CASES)))
def test_certified_clipped_logit_prediction_survives_feature_space_patches(case):
    """Clipped-logit evidence (the default certificate of bagcert-cifar10-r5-dense): every affected set R(p) rewritten
    with values anywhere in the clip (each class alone at the top, everything at the bottom, every class but one at the
    top, random values) changes no certified prediction."""
    layers, image_size, patch, C, k = ADVERSARY_CASES[case]
    lo, hi = -1.0, 1.0
    geom = Geometry.from_layers(layers)
    h, w = geom.grid_size(*image_size)
    ms = feature_mask_set(geom, image_size, patch, k)
    g = torch.Generator().manual_seed(70 + case)
    u = (random_votes(16, C, (h, w), seed=60 + case) * 2 - 1) * torch.rand(16, C, h, w, generator=g)  # in (-1, 1)
    res = double_masking_certify_evidence(u, None, geom, image_size, patch, k=k, clip_bound=1.0)
    assert int(res.certified.sum()) > 0
    H, W = image_size
    regions = {tuple(geom.affected_mask(image_size, patch, t, l).flatten().tolist())
               for t, l in itertools.product(range(H - patch[0] + 1), range(W - patch[1] + 1))}
    flips_uncertified = 0
    for region in regions:
        R = torch.tensor(region).view(h, w)
        n_loc = int(R.sum())
        one = torch.eye(C).repeat_interleave(n_loc, dim=1)  # [C, C * n_loc]: one class at the top
        bits = torch.cat([one, 1 - one, torch.zeros(1, C * n_loc)])
        values = torch.cat([lo + (hi - lo) * bits, lo + (hi - lo) * torch.rand(30, C * n_loc, generator=g)])
        patterns = values.view(-1, C, n_loc)
        attacked = u[:, None].expand(len(u), len(patterns), C, h, w).clone()  # every sample x every pattern
        attacked[:, :, :, R] = patterns
        changed = (double_masking_predict(attacked.flatten(0, 1), ms).view(len(u), -1) != res.prediction[:, None]).any(1)
        assert not bool((changed & res.certified).any()), (torch.nonzero(changed & res.certified).flatten().tolist(), region)
        flips_uncertified += int((changed & ~res.certified).sum())
    assert flips_uncertified > 0  # the adversary is strong enough to move uncertified samples


# ----------------------------------------------------------------------------------------------
# the certifier on a model, the toolkit's attacks, certify --double-masking
# ----------------------------------------------------------------------------------------------
def _voting_model(num_classes=10, seed=0):
    """A tiny strided model with sparse votes (negative head biases, class 0 favoured): some images certify."""
    torch.manual_seed(seed)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=num_classes, width=8).eval()
    with torch.no_grad():
        model.head.bias.fill_(-0.4)
        model.head.bias[0] = 0.0
    return model


def test_certifier_on_a_model_matches_the_evidence_function():
    model = _voting_model()
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(2))
    dm = LocalDoubleMasking()
    assert dm.name == "double-masking-votes" and dm.forward_passes_per_image((32, 32), 5) == 1
    ev = dm.evidence(model, x)
    assert torch.equal(ev, (model.local_logits(x) > 0).float())
    for patch in (3, (2, 5)):
        res = dm.certify(model, x, y, patch)
        ref = double_masking_certify_evidence(ev, y, model.geometry, (32, 32), patch)
        for f in ("prediction", "label", "correct", "certified", "margin"):
            assert torch.equal(getattr(res, f), getattr(ref, f)), f
        assert torch.equal(dm.predict(model, x, patch), ref.prediction)
        assert res.aggregation == "double-masking-votes"
    assert 0 < int(dm.certify(model, x, y, 3).certified.sum()) < 12
    lg = LocalDoubleMasking(evidence="logits", clip=(0, 2), k=4)
    assert lg.name == "double-masking-logits-k4"
    r = lg.certify(model, x, y, 3)
    assert r.margin.dtype == torch.float64 and torch.equal(lg.predict(model, x, 3), r.prediction)
    # several sizes from one mask set: one prediction
    one = LocalDoubleMasking(mask_patch_size=5)
    assert torch.equal(one.certify(model, x, y, 3).prediction, one.certify(model, x, y, 5).prediction)
    # certify_peer_dataset gives the same results, every size from one evidence map per batch
    data = load_dataset("synthetic:10", "test")
    results, timing = peers.certify_peer_dataset(dm, model, data, [3, 5], batch_size=4)
    direct = dm.certify(model, data.float_images(), data.labels, 5)
    assert torch.equal(results["5"].certified, direct.certified) and torch.equal(results["5"].prediction, direct.prediction)


@pytest.mark.parametrize("kwargs, message", [
    (dict(evidence="vote"), "evidence must be one of votes, logits"),
    (dict(clip=(0, 1)), "clip applies to evidence='logits' only"),
    (dict(evidence="logits", clip=(0, None)), "clip must be a finite"),
    (dict(evidence="logits", clip=(1, 0)), "clip must be a finite"),
    (dict(k=0), "k must be None"),
])
def test_certifier_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalDoubleMasking(**kwargs)


def test_pgd_breaks_no_double_masking_certificate():
    """The toolkit's PGD (random and certificate-guided positions, against the vote count) judged by the
    double-masking prediction: no image certified by double masking changes its prediction."""
    from bagcert.empirical import build_attack, evaluate_empirical

    model = _voting_model()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    dm = LocalDoubleMasking()
    clean = dm.certify(model, x, None, 3)
    y = clean.prediction  # attack the defended prediction itself
    assert int(clean.certified.sum()) > 0
    attacks = {n: build_attack(n, 3, steps=3, locations=2) for n in ("pgd", "pgd-adaptive")}
    res = evaluate_empirical(model, x, y, 3, attacks)
    for r in res.results.values():
        after = dm.predict(model, r.adv_images, 3)
        assert bool((after[clean.certified] == y[clean.certified]).all())


# certify --double-masking ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def voting_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dm") / "tiny.pt"
    bagcert.save_checkpoint(path, _voting_model(), input_size=32, classes=CLASSES)
    return path


def _main(argv, capsys):
    rc = certify.main(argv + ["--no-progress", "--quiet"])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_certify_cli_double_masking_reports_one_mask_set_for_every_size(voting_checkpoint, tmp_path, capsys):
    out = tmp_path / "dm"
    argv = ["--checkpoint", str(voting_checkpoint), "--dataset", "synthetic:16", "--double-masking", "--patch-sizes", "1,3",
            "--output", str(out)]
    rc, line, err = _main(argv, capsys)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["method"], res["forward_passes_per_image"], res["peer"]) == ("double-masking-votes", 1, None)
    assert res["config"]["double_masking"] is True and line["method"] == "double-masking-votes"
    ms = res["config"]["double_masking_mask_set"]
    assert ms["mask_patch_size"] == [3, 3] and ms["num_masks"] == len(ms["row_starts"]) * len(ms["col_starts"])
    assert "certificate: double-masking-votes" in err

    model, _ = bagcert.load_checkpoint(voting_checkpoint)
    data = load_dataset("synthetic:16", "test")
    direct = LocalDoubleMasking(mask_patch_size=3).certify(model.eval(), data.float_images(), data.labels, 3)
    assert 0 < int(direct.certified.sum()) < 16
    with open(out / "per_sample.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["prediction"]) for r in rows] == direct.prediction.tolist()
    assert [int(r["certified_3"]) for r in rows] == direct.certified.int().tolist()
    assert [int(r["certified_1"]) for r in rows] == direct.certified.int().tolist()  # one mask set, one result
    assert res["certified_accuracy"]["3"] == pytest.approx(direct.certified_accuracy)


def _peer_file(path):
    spec = peers.parse_peer_spec("drs-column:3")
    torch.manual_seed(0)
    clf = spec.build_classifier("cifar_bagnet5_s2", 10, width=8).eval()
    peers.save_peer_classifier(path, clf, peer=spec.to_dict(), input_size=32, classes=CLASSES)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "pgd"], "--double-masking cannot be combined with --attacks"),
    (["--aggregation", "votes"], "--double-masking cannot be combined with --aggregation"),
    (["--robust-masking"], "--double-masking cannot be combined with --robust-masking"),
    (["peer"], "--double-masking applies to bagcert models only"),
])
def test_certify_cli_double_masking_refusals_are_one_line(voting_checkpoint, tmp_path, extra, message):
    ckpt = _peer_file(tmp_path / "peer.pt") if extra == ["peer"] else voting_checkpoint
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--double-masking", "--patch-sizes", "3",
            "--output", str(out), "--no-progress"] + ([] if extra == ["peer"] else extra)
    with pytest.raises(SystemExit) as e:
        certify.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith(message), e.value.code
    assert not out.exists()


def test_benchmark_scripts_smoke(tmp_path):
    from conftest import ROOT, load_benchmark

    cost = load_benchmark("double_masking_cost")
    out = tmp_path / "cost.json"
    ckpt, samples = str(ROOT / "checkpoints" / "bagcert_cifar10_r5s2_dense.pt"), str(ROOT / "samples" / "cifar10")
    assert cost.main(["--checkpoint", ckpt, "--dataset", samples, "--num-images", "4", "--batch-size", "2", "--repeats", "1", "--sizes", "3,2x4", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["timings"]) == {f"{k}/{n}" for k in ("votes", "double-masking", "robust-masking") for n in ("one", "many")}
    assert doc["timings"]["double-masking/many"]["sizes"] == ["3", "2x4"]
    assert all(r["certify_forward_ratio"] > 1 for r in doc["timings"].values())
    acc = load_benchmark("double_masking_accuracy")
    out = tmp_path / "acc.json"
    assert acc.main(["--checkpoint", ckpt, "--dataset", samples, "--num-images", "6", "--adversary-images", "0",
                     "--k", "6", "--logit-clips=-1:1", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"votes (BagCert count)", "double-masking-votes", "patchguard-votes (robust masking)",
                                   "double-masking-votes-k6", "double-masking-logits clip(-1, 1)"}
    assert doc["feature_space_check"] == {"images": 0, "broken": 0}
    assert acc.main(["--checkpoint", ckpt, "--dataset", samples, "--num-images", "4", "--adversary-images", "0",
                     "--pgd-images", "2", "--pgd-steps", "1", "--pgd-locations", "1", "--pgd-evidence", "logits",
                     "--pgd-clip=-1:1", "--output", str(out)]) == 0
    pgd = json.loads(out.read_text())["pgd_check"]
    assert (pgd["judge"], pgd["clip"], pgd["images"]) == ("double-masking-logits", [-1.0, 1.0], 2)
    assert all(pgd[a]["certified_broken"] == 0 and pgd[a]["broken_image_indices"] == [] for a in ("pgd", "pgd-adaptive"))


def test_certify_cli_double_masking_logits_records_evidence_and_clip(voting_checkpoint, tmp_path, capsys):
    out = tmp_path / "dml"
    argv = ["--checkpoint", str(voting_checkpoint), "--dataset", "synthetic:16", "--double-masking",
            "--double-masking-evidence", "logits", "--double-masking-clip=-0.5,2", "--patch-sizes", "3", "--output", str(out)]
    rc, line, err = _main(argv, capsys)
    assert rc == 0 and line["method"] == "double-masking-logits"
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "double-masking-logits"
    assert (res["config"]["double_masking_evidence"], res["config"]["double_masking_clip"]) == ("logits", [-0.5, 2.0])
    assert "double masking of the local logits clipped to (-0.5, 2)" in err
    model, _ = bagcert.load_checkpoint(voting_checkpoint)
    data = load_dataset("synthetic:16", "test")
    direct = LocalDoubleMasking("logits", clip=(-0.5, 2.0)).certify(model.eval(), data.float_images(), data.labels, 3)
    with open(out / "per_sample.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["prediction"]) for r in rows] == direct.prediction.tolist()
    assert [int(r["certified_3"]) for r in rows] == direct.certified.int().tolist()


def test_certify_cli_double_masking_evidence_defaults(voting_checkpoint, tmp_path, capsys):
    """Logits without a clip use (-1, 1); --double-masking alone stays the votes (clip None)."""
    got = {}
    for name, extra in (("logits", ["--double-masking-evidence", "logits"]), ("votes", [])):
        out = tmp_path / name
        argv = ["--checkpoint", str(voting_checkpoint), "--dataset", "synthetic:8", "--double-masking", "--patch-sizes", "3",
                "--output", str(out)] + extra
        assert _main(argv, capsys)[0] == 0
        cfg = json.loads((out / "results.json").read_text())["config"]
        got[name] = (cfg["double_masking_evidence"], cfg["double_masking_clip"])
    assert got == {"logits": ("logits", [-1.0, 1.0]), "votes": ("votes", None)}


@pytest.mark.parametrize("extra, message", [
    (["--double-masking-evidence", "logits"], "--double-masking-evidence applies only with --double-masking"),
    (["--double-masking-clip=-1,1"], "--double-masking-clip applies only with --double-masking"),
    (["--double-masking", "--double-masking-evidence", "votes", "--double-masking-clip=0,1"],
     "--double-masking-clip applies to --double-masking-evidence logits only"),
    (["--double-masking", "--double-masking-clip", "1,1"], "--double-masking-clip must be two finite numbers"),
    (["--double-masking", "--double-masking-clip", "0,inf"], "--double-masking-clip must be two finite numbers"),
    (["--double-masking", "--double-masking-clip", "a,b"], "--double-masking-clip must be two finite numbers"),
    (["--double-masking", "--double-masking-clip", "1"], "--double-masking-clip must be two finite numbers"),
])
def test_certify_cli_double_masking_evidence_refusals_are_one_line(voting_checkpoint, tmp_path, extra, message):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(voting_checkpoint), "--dataset", "synthetic:8", "--patch-sizes", "3", "--output", str(out),
            "--no-progress"] + extra
    with pytest.raises(SystemExit) as e:
        certify.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith(message), e.value.code
    assert not out.exists()


def test_double_masking_of_the_default_model_does_not_depend_on_the_batch_size():
    """The evidence is computed as bagcert.certify computes logits (fixed chunks): the same bits at any batch size."""
    from bagcert.data import load_cifar10
    from bagcert.peers import LocalDoubleMasking

    torch.set_num_threads(1)
    model, _ = bagcert.load_checkpoint("bagcert-cifar10-r5-dense")
    data = load_cifar10(str(Path(__file__).resolve().parents[1] / "samples" / "cifar10"))
    x, y = data.images[:20].float() / 255, data.labels[:20]
    runs = [LocalDoubleMasking("logits", batch_size=bs).certify(model, x, y, patch_size=5) for bs in (1, 7, 20)]
    for r in runs[1:]:
        assert torch.equal(r.prediction, runs[0].prediction) and torch.equal(r.certified, runs[0].certified)
        assert torch.equal(r.margin, runs[0].margin)


@pytest.mark.parametrize("batch_size", [0, -1, "a", 2.5, True])
def test_local_double_masking_refuses_a_bad_batch_size(batch_size):
    from bagcert.peers import LocalDoubleMasking

    with pytest.raises(ValueError, match="batch_size must be None or an int >= 1"):
        LocalDoubleMasking(batch_size=batch_size)
