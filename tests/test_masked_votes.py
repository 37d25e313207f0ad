"""Robust masking of BagCert votes: ``PatchGuardMasking(evidence="votes")`` and ``certify --robust-masking``.

The certificate is PatchGuard's (proven for any evidence in [0, inf)); these tests check it by brute force on
binary evidence, where the attacker may only write 0 or 1, and check that the CLI certifies with it."""

import csv
import itertools
import json

import pytest
import torch
from torch import nn

import bagcert
import certify
from bagcert import peers
from bagcert.data import load_dataset
from bagcert.geometry import Geometry
from bagcert.models import to_dense
from bagcert.peers.patchguard import patchguard_certify_evidence

CLASSES = [f"class{i}" for i in range(10)]


class FixedLogits(nn.Module):
    """A stand-in bagcert model whose local logits are a fixed map [N, C, h, w] (image i gets map i)."""

    def __init__(self, logits: torch.Tensor, geometry: Geometry):
        super().__init__()
        self.register_buffer("z", logits)
        self.geometry = geometry

    def local_logits(self, x):
        return self.z[: x.shape[0]]

    def forward(self, x):
        return (self.local_logits(x) > 0).sum(dim=(2, 3))


def naive_masked(u: torch.Tensor, window) -> torch.Tensor:
    """Robust masking (tau = 0) by explicit loops over windows: u [K, C, h, w] -> masked evidence [K, C]."""
    K, C, h, w = u.shape
    wh, ww = window
    sums = torch.stack([u[..., i : i + wh, j : j + ww].sum((-2, -1)) for i in range(h - wh + 1) for j in range(w - ww + 1)], -1)
    return u.sum((-2, -1)) - sums.max(-1).values


# geometry (kernel, stride, padding), image size, patch size
BINARY_CASES = [
    ([(2, 1, 0)], (7, 7), (1, 1)),  # stride 1, unpadded: 6x6 map, 2x2 windows
    ([(3, 1, 1)], (6, 6), (2, 2)),  # stride 1, padded: affected sets clipped at the border
    ([(3, 2, 1)], (8, 8), (2, 2)),  # stride 2: affected sets of varying size
    ([(3, 2, 0)], (11, 11), (1, 3)),  # stride 2, unpadded, a non-square patch
]


def binary_logits(n, classes, shape, seed):
    """Logits whose votes (> 0) are random binary maps: half the samples lean strongly to class 0 (some
    certify), the rest are balanced (most do not)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.full((n, classes, 1, 1), 0.5)
    p[: n // 2, 0] = 0.9
    p[: n // 2, 1:] = 0.15
    votes = torch.rand(n, classes, *shape, generator=g) < p
    return torch.where(votes, 1.0, -1.0) * (torch.rand(n, classes, *shape, generator=g) + 0.1)


@pytest.mark.parametrize("case", range(len(BINARY_CASES)))
def test_masked_votes_certificate_holds_against_every_binary_patch(case):
    """Every patch position, the attacks: the prediction's votes zeroed and every other class's votes set on
    the affected set R(p), plus random binary patterns on R(p) for all classes. The masked margin of the
    clean prediction never drops below the certificate's margin (so a certified prediction never changes),
    and the zero / one attack attains the certificate's margin for some certified sample."""
    layers, image_size, patch = BINARY_CASES[case]
    geom = Geometry.from_layers(layers)
    h, w = geom.grid_size(*image_size)
    n, C = 12, 3
    model = FixedLogits(binary_logits(n, C, (h, w), seed=case), geom).eval()
    x = torch.zeros(n, 3, *image_size)
    res = peers.PatchGuardMasking(evidence="votes").certify(model, x, None, patch)
    u = (model.z > 0).double()
    window = peers.evidence_window_size(geom, image_size, patch)
    assert torch.equal(res.prediction, naive_masked(u, window).argmax(1))
    assert 0 < int(res.certified.sum()) < n  # both outcomes occur: the test has teeth

    H, W = image_size
    positions = list(itertools.product(range(H - patch[0] + 1), range(W - patch[1] + 1)))
    masks = torch.stack([geom.affected_mask(image_size, patch, t, l) for t, l in positions])  # [P, h, w]
    g = torch.Generator().manual_seed(100 + case)
    attained = 0
    for i in range(n):
        y = int(res.prediction[i])
        others = [c for c in range(C) if c != y]
        adversarial = torch.ones(1, C, 1, 1, dtype=torch.float64)
        adversarial[0, y] = 0.0  # the prediction loses every vote in R(p), every other class gains all of them
        patterns = torch.cat([adversarial.expand(1, C, h, w), torch.randint(0, 2, (8, C, h, w), generator=g).double()])
        attacked = torch.where(masks[:, None, None], patterns[None], u[i][None, None])  # [P, 9, C, h, w]
        m = naive_masked(attacked.flatten(0, 1), window).view(len(positions), len(patterns), C)
        margins = m[..., y] - m[..., others].amax(-1)  # the clean prediction's masked margin after each attack
        assert float(margins.min()) >= float(res.margin[i]) - 1e-9, (i, float(margins.min()), float(res.margin[i]))
        if bool(res.certified[i]):
            assert bool((m.argmax(-1) == y).all())  # argmax: ties to the lower class, like the prediction
            attained += abs(float(margins[:, 0].min()) - float(res.margin[i])) < 1e-9
    assert attained > 0  # the bound is reached by a real binary patch: not vacuous


def test_votes_evidence_equals_the_certificate_of_the_binary_map():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=4, width=8).eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    pg = peers.PatchGuardMasking(evidence="votes")
    logits = model.local_logits(x)
    ev = pg.evidence(model, x)
    assert ev.dtype == logits.dtype and set(ev.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(ev, (logits > 0).float())
    for patch in (3, (2, 5)):
        res = pg.certify(model, x, y, patch)
        ref = patchguard_certify_evidence((logits > 0).float(), y, model.geometry, (16, 16), patch)
        for f in ("prediction", "label", "correct", "certified", "margin", "worst_position"):
            assert torch.equal(getattr(res, f), getattr(ref, f)), f
        assert res.aggregation == "patchguard-votes" and res.patch_size == ref.patch_size
        assert torch.equal(pg.predict(model, x, patch), ref.prediction)
    # the logits evidence is a different certifier on the same model
    assert not torch.equal(peers.PatchGuardMasking().evidence(model, x), ev)


def test_masked_votes_names_and_refusals():
    assert peers.PatchGuardMasking(evidence="votes").name == "patchguard-votes"
    assert peers.PatchGuardMasking(evidence="votes", threshold=0.1).name == "patchguard-votes-t0.1"
    assert peers.PatchGuardMasking().name == "patchguard" and peers.PatchGuardMasking(clip=(0, 5)).clip == (0.0, 5.0)
    assert peers.PatchGuardMasking(evidence="votes").forward_passes_per_image((32, 32), 5) == 1
    with pytest.raises(ValueError, match="clip applies to evidence='logits' only"):
        peers.PatchGuardMasking(clip=(0, None), evidence="votes")
    with pytest.raises(ValueError, match="evidence must be one of logits, votes"):
        peers.PatchGuardMasking(evidence="vote")


# ----------------------------------------------------------------------------------------------
# certify --robust-masking
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voting_checkpoint(tmp_path_factory):
    """A tiny strided model with sparse votes (negative head biases, class 0 favoured): some images certify, not
    all, and masking the votes certifies differently from counting them."""
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=10, width=8).eval()
    with torch.no_grad():
        model.head.bias.fill_(-0.4)
        model.head.bias[0] = 0.0
    path = tmp_path_factory.mktemp("rm") / "tiny.pt"
    bagcert.save_checkpoint(path, model, input_size=32, classes=CLASSES)
    return path


def _main(argv, capsys):
    rc = certify.main(argv + ["--no-progress", "--quiet"])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.mark.parametrize("dense", [False, True])
def test_certify_cli_robust_masking_reports_the_masked_votes(voting_checkpoint, tmp_path, capsys, dense):
    out = tmp_path / "rm"
    argv = ["--checkpoint", str(voting_checkpoint), "--dataset", "synthetic:16", "--robust-masking", "--patch-sizes", "3",
            "--output", str(out)] + (["--dense"] if dense else [])
    rc, line, err = _main(argv, capsys)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["method"], res["forward_passes_per_image"], res["peer"]) == ("patchguard-votes", 1, None)
    assert res["aggregation"] == "patchguard-votes" and res["config"]["robust_masking"] is True
    assert line["method"] == "patchguard-votes" and line["forward_passes_per_image"] == 1
    assert "- method: patchguard-votes (1 network evaluation per image)" in (out / "summary.md").read_text()
    assert "certificate: patchguard-votes" in err

    model, _ = bagcert.load_checkpoint(voting_checkpoint)
    model = to_dense(model).eval() if dense else model
    data = load_dataset("synthetic:16", "test")
    direct = peers.PatchGuardMasking(evidence="votes").certify(model, data.float_images(), data.labels, 3)
    votes = bagcert.certify(model, data.float_images(), data.labels, patch_size=3)
    assert 0 < int(direct.certified.sum()) < 16
    assert not torch.equal(direct.margin.float(), votes.margin.float())  # not the vote count's certificate
    with open(out / "per_sample.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["prediction"]) for r in rows] == direct.prediction.tolist()
    assert [int(r["certified_3"]) for r in rows] == direct.certified.int().tolist()
    assert [float(r["margin_3"]) for r in rows] == pytest.approx(direct.margin.tolist())
    assert res["certified_accuracy"]["3"] == pytest.approx(direct.certified_accuracy)


def _peer_file(path):
    spec = peers.parse_peer_spec("drs-column:3")
    torch.manual_seed(0)
    clf = spec.build_classifier("cifar_bagnet5_s2", 10, width=8).eval()
    peers.save_peer_classifier(path, clf, peer=spec.to_dict(), input_size=32, classes=CLASSES)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "pgd"], "--robust-masking cannot be combined with --attacks: the attacks optimise the vote count"),
    (["--aggregation", "votes"], "--robust-masking cannot be combined with --aggregation votes"),
    (["peer"], "--robust-masking applies to bagcert models only"),
    (["--patch-sizes", "1,3"], "--robust-masking certifies one patch size per run (got 1, 3)"),
])
def test_certify_cli_robust_masking_refusals_are_one_line(voting_checkpoint, tmp_path, extra, message):
    ckpt = _peer_file(tmp_path / "peer.pt") if extra == ["peer"] else voting_checkpoint
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--robust-masking", "--patch-sizes", "3",
            "--output", str(out), "--no-progress"] + ([] if extra == ["peer"] else extra)
    with pytest.raises(SystemExit) as e:
        certify.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code  # one line on stderr, exit status 1
    assert e.value.code.startswith(message), e.value.code
    assert not out.exists()  # refused before anything is written
