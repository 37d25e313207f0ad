"""Empirical patch attacks: threat-model enforcement, attack strength, and certificate vs attack soundness.

The central model here is hand-made (``CraftedVotes``; registered as ``test_crafted_votes`` only inside the
CLI tests, to be saved as a checkpoint): a 4-class vote model with receptive field 5 and stride 2 whose
class-0 / class-1 logits at a location follow the positive / negative part of the mean red value of its 5x5
window. Images are red above a random raster position and dark below it, so the vote margin varies smoothly
from image to image: some samples are certified for a 5x5 patch, some are not, and some of those a patch can
really flip. Every attack must leave the certified ones alone.
"""

import json

import pytest
import torch
from torch import nn

import bagcert
import certify
from bagcert.attacks import (
    IMAGENETTE_WNIDS,
    AttackResult,
    FeatureSpaceWorstCase,
    PatchAttack,
    PatchPGD,
    ThreatModelError,
    UniversalPatch,
    adaptive_positions,
    feature_space_worst_case,
    imagenet_label_mapping,
    place_patch,
    rectangle_masks,
)
from bagcert.certification import certify_logits
from bagcert.data import Dataset
from bagcert.empirical import SoundnessError, evaluate_empirical, subset_cert_result
from bagcert.geometry import Geometry
from bagcert.models.base import CIFAR10_MEAN, CIFAR10_STD, BagModel
from conftest import ROOT

# ----------------------------------------------------------------------------------------------- fixtures


class CraftedVotes(BagModel):
    """A hand-made vote model (receptive field 5, stride 2, 16x16 locations), independent of the registry's
    backbones: feature 0 / 1 = positive / negative part of the window's mean normalised red, 2 / 3 the same for
    green; logit_c = gain * feature_c - threshold."""

    def __init__(self, num_classes: int = 4, gain: float = 2.0, threshold: float = 0.5):
        super().__init__(num_classes, CIFAR10_MEAN, CIFAR10_STD)
        if num_classes != 4:
            raise ValueError("CraftedVotes has exactly 4 classes")
        self.conv = nn.Conv2d(3, 4, 5, stride=2, padding=2, bias=False)
        self.head = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0], self.conv.weight[1, 0] = 1 / 25, -1 / 25
            self.conv.weight[2, 1], self.conv.weight[3, 1] = 1 / 25, -1 / 25
            self.head.weight.copy_(gain * torch.eye(4).view(4, 4, 1, 1))
            self.head.bias.fill_(-threshold)
        self.geometry = Geometry.from_layers([(5, 2, 2)])

    def features_to_logits(self, x):
        return self.head(torch.relu(self.conv(x)))


def crafted_model():
    """Votes for class 0 where the window is clearly red, class 1 where clearly dark (classes 2 / 3: green)."""
    return CraftedVotes().eval()


@pytest.fixture
def crafted_checkpoint(tmp_path, monkeypatch):
    """The crafted model as a checkpoint; registered only for the duration of the test (so the registry
    sweep of tests/test_models_geometry.py never sees it)."""
    import bagcert.models

    monkeypatch.setitem(bagcert.models._REGISTRY, "test_crafted_votes", (CraftedVotes, {}, "tests/test_attacks.py"))
    path = tmp_path / "crafted.pt"
    bagcert.save_checkpoint(path, bagcert.create_model("test_crafted_votes", num_classes=4).eval(), input_size=32,
                            classes=["red", "dark", "green", "grey"])
    return path


def split_images(n: int, seed: int = 0) -> torch.Tensor:
    """Red (0.85-0.95) on raster positions < t, dark red (0-0.15) after; green at the CIFAR mean; t random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3, 32, 32)
    x[:, 1] = CIFAR10_MEAN[1]
    x[:, 2] = 0.5
    t = torch.randint(300, 724, (n,), generator=g)
    hi = 0.85 + 0.1 * torch.rand(n, generator=g)
    lo = 0.15 * torch.rand(n, generator=g)
    r = torch.arange(32 * 32).view(1, 32, 32)
    x[:, 0] = torch.where(r < t[:, None, None], hi[:, None, None], lo[:, None, None])
    return x.mul(255).round().div(255)  # exactly representable as uint8 (for the CLI dataset)


@pytest.fixture(scope="module")
def crafted():
    torch.manual_seed(0)
    model = crafted_model()
    x = split_images(24, seed=0)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = clean predictions: every sample correct, so certified == certified & correct
    cert = bagcert.certify(model, x, y, 5, return_position_margins=True)
    return model, x, y, cert


def fast_pgd(**kw):
    kw.setdefault("steps", 20)
    kw.setdefault("locations", 8)
    return PatchPGD(5, **kw)


# ----------------------------------------------------------------------------------------------- threat model


class _Rogue(PatchAttack):
    """Returns garbage everywhere (out of range, NaN) and a 3x4 mask at (2, 5)."""

    name = "rogue"

    def _attack(self, model, images, labels, patch_size, generator):
        n = images.shape[0]
        adv = torch.rand(images.shape, generator=generator) * 3 - 1
        adv[:, :, 0, 0] = float("nan")
        adv[:, :, 3, 6] = float("nan")  # inside the mask: must come back as a value in [0, 1]
        pos = torch.tensor([[2, 5]]).repeat(n, 1)
        return adv, rectangle_masks(images.shape[-2:], (3, 4), pos), pos


class _Oversized(_Rogue):
    def _attack(self, model, images, labels, patch_size, generator):
        adv, _, pos = super()._attack(model, images, labels, patch_size, generator)
        return adv, rectangle_masks(images.shape[-2:], (4, 4), pos), pos


class _Failing(PatchAttack):
    name = "failing"

    def _attack(self, model, images, labels, patch_size, generator):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("boom")


def _random_model(bias: float = 0.0):
    torch.manual_seed(1)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=4, width=8).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([bias, -0.5, -0.5, -0.5]))
    return model


def _predicted(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_changes_only_inside_mask_and_in_range():
    model = _random_model()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    res = _Rogue((3, 4))(model, x, y)
    assert isinstance(res, AttackResult) and res.masks.shape == (6, 1, 32, 32)
    outside = res.masks.expand_as(x) == 0
    assert torch.equal(res.adv_images[outside], x[outside])  # bit for bit, the NaN at (0, 0) never leaks
    assert torch.isfinite(res.adv_images).all() and res.adv_images.min() >= 0 and res.adv_images.max() <= 1
    assert res.masks.sum((1, 2, 3)).eq(12).all() and res.positions.tolist() == [[2, 5]] * 6
    assert res.in_threat_model.all()
    # success is the real model's verdict on the returned images
    with torch.no_grad():
        pred = model(res.adv_images).argmax(1)
    assert torch.equal(res.predictions, pred) and torch.equal(res.success, pred != y)


def test_masks_outside_the_threat_model_are_refused():
    model = _random_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.raises(ThreatModelError, match="outside a 3x4 rectangle"):
        _Oversized((3, 4))(model, x, y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _Rogue((3, 4))(model, x * 2, y)


def test_misclassified_images_are_not_attacked():
    model = _random_model()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred = model(x).argmax(1)
    wrong = (pred + 1) % 4
    res = _Rogue((3, 4))(model, x, wrong)
    assert res.success.all() and torch.equal(res.adv_images, x) and res.masks.sum() == 0
    assert (res.positions == -1).all()


def test_model_mode_and_grad_flags_restored_even_on_error():
    model = _random_model()
    x = torch.rand(3, 3, 32, 32)
    y = _predicted(model, x)  # correctly classified images, so _attack is called
    model.train()
    model.stem.eval()  # mixed modes must come back exactly
    model.head.bias.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        _Failing(5)(model, x, y)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.check_inputs
    PatchPGD(5, steps=2, locations=2)(model, x, y)
    UniversalPatch(5, steps=2, eval_poses=1).fit(model, x, y)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.check_inputs


# ----------------------------------------------------------------------------------------------- PGD


def test_pgd_breaks_weak_samples(crafted):
    model, x, y, cert = crafted
    res = fast_pgd()(model, x, y)
    assert res.clean_accuracy == 1.0
    assert res.robust_accuracy < 1.0, "PGD should flip the samples with a small vote margin"
    assert res.robust_accuracy >= cert.certified_accuracy
    # the broken images really are broken, by a 5x5 patch at the reported position
    with torch.no_grad():
        assert (model(res.adv_images[res.success]).argmax(1) != y[res.success]).all()
    changed = (res.adv_images != x).any(1)
    for i in res.success.nonzero().flatten().tolist():
        t, l = res.positions[i].tolist()
        box = torch.zeros(32, 32, dtype=torch.bool)
        box[t : t + 5, l : l + 5] = True
        assert not changed[i][~box].any()
    # the "logits" surrogate also runs; rectangular patches too
    assert PatchPGD((3, 7), steps=5, locations=4, surrogate="logits")(model, x[:4], y[:4]).masks.sum((1, 2, 3)).le(21).all()


def test_pgd_is_reproducible(crafted):
    model, x, y, _ = crafted
    a = fast_pgd(steps=5, locations=3)(model, x[:6], y[:6])
    b = fast_pgd(steps=5, locations=3)(model, x[:6], y[:6])
    assert torch.equal(a.adv_images, b.adv_images) and torch.equal(a.positions, b.positions)


def test_adaptive_placement_picks_smallest_margin_positions(crafted):
    model, x, y, cert = crafted
    k = 7
    pos = adaptive_positions(model, x, y, 5, k, torch.Generator().manual_seed(0))
    assert pos.shape == (x.shape[0], k, 2)
    pm = cert.position_margins
    for i in range(x.shape[0]):
        chosen = pm[i, pos[i, :, 0], pos[i, :, 1]]
        assert len({tuple(p) for p in pos[i].tolist()}) == k  # distinct positions
        assert torch.equal(chosen.sort().values, pm[i].flatten().sort().values[:k])
        assert chosen[0] == cert.margin[i]  # the first is the certificate's worst position's margin
    # and the attack uses them
    attack = PatchPGD(5, steps=0, locations=k, placement="adaptive")
    assert attack.name == "pgd-adaptive"
    assert torch.equal(attack.select_positions(model, x, y, 5, torch.Generator().manual_seed(0)), pos)


# ----------------------------------------------------------------------------------------------- feature space


GEOMETRIES = [
    Geometry.from_layers([(1, 1, 0)]),
    Geometry.from_layers([(3, 1, 1)]),
    Geometry.from_layers([(3, 1, 0)]),
    Geometry.from_layers([(3, 2, 1), (3, 1, 1)]),
    Geometry.from_layers([(3, 1, 0), (3, 2, 0)]),
]


@pytest.mark.parametrize("aggregation", ["votes", "majority", "clipped"])
@pytest.mark.parametrize("gi", range(len(GEOMETRIES)))
def test_feature_space_broken_iff_not_certified(aggregation, gi):
    geometry = GEOMETRIES[gi]
    g = torch.Generator().manual_seed(100 + gi)
    n_cert = n_total = 0
    for H, W, patch, C in [(16, 16, (2, 2), 3), (13, 18, (1, 4), 4), (17, 14, (3, 2), 2), (9, 9, (1, 1), 3)]:
        h, w = geometry.grid_size(H, W)
        N = 12
        # class 0 votes at a fraction p of the locations, the others at q: from clear wins to near ties
        p = 0.35 + 0.65 * torch.rand(N, 1, 1, 1, generator=g)
        q = 0.7 * torch.rand(N, 1, 1, 1, generator=g)
        prob = torch.cat([p, q.expand(N, C - 1, 1, 1)], 1)
        logits = torch.where(torch.rand(N, C, h, w, generator=g) < prob, 40.0, -40.0) + torch.randn(N, C, h, w, generator=g)
        cert = certify_logits(logits, None, geometry, (H, W), patch, aggregation=aggregation)
        fs = feature_space_worst_case(logits, patch_size=patch, geometry=geometry, image_size=(H, W), aggregation=aggregation)
        assert torch.equal(fs.prediction, cert.prediction)
        assert torch.equal(fs.broken, ~cert.certified), (aggregation, H, W, patch)  # exactly tight
        assert not (fs.flipped & ~fs.broken).any()
        if aggregation != "clipped":
            assert torch.equal(fs.margin, cert.margin.long())
        n_cert, n_total = n_cert + int(cert.certified.sum()), n_total + N
    assert 0 < n_cert < n_total  # a mix of certified and uncertified samples, so the check means something


def test_feature_space_on_a_model_and_ties():
    model, x = crafted_model(), split_images(10, seed=3)
    fs = feature_space_worst_case(model, x, None, patch_size=(3, 7))
    cert = bagcert.certify(model, x, None, (3, 7))
    assert torch.equal(fs.broken, ~cert.certified)
    # a tie that the tie rule resolves for the prediction is still "broken" (ties are never certified)
    geometry = Geometry.from_layers([(1, 1, 0)])
    logits = -torch.ones(1, 2, 4, 4)
    logits[0, 0, :2] = 1.0
    logits[0, 1, 2:] = 1.0
    fs = feature_space_worst_case(logits, patch_size=1, geometry=geometry, image_size=(4, 4))
    assert fs.prediction.item() == 0 and fs.broken.item() and fs.margin.item() == -2


# ----------------------------------------------------------------------------------------------- universal patch


def test_place_patch_exact_and_inside_box():
    x = torch.rand(5, 3, 16, 16)
    patch = torch.rand(3, 3, 4)
    out, m = place_patch(x, patch, [0, 2, 5, 13, 7], [0, 9, 3, 12, 1])
    assert torch.equal(out[1, :, 2:5, 9:13], patch) and torch.equal(out[4, :, 7:10, 1:5], patch)
    assert m.sum((1, 2, 3)).eq(12).all()
    # rotated and scaled: never outside the 3x4 box
    angles = torch.tensor([10.0, -45.0, 30.0, 90.0, 45.0])
    out, m = place_patch(x, patch, [0, 2, 5, 13, 7], [0, 9, 3, 12, 1], angles, torch.tensor([1.0, 0.7, 0.9, 1.0, 0.8]))
    for i, (t, l) in enumerate([(0, 0), (2, 9), (5, 3), (13, 12), (7, 1)]):
        box = torch.zeros(16, 16, dtype=torch.bool)
        box[t : t + 3, l : l + 4] = True
        assert not m[i, 0][~box].any() and m[i].sum() > 0
        assert torch.equal(out[i][:, ~box], x[i][:, ~box])
    # differentiable in the patch
    p = patch.clone().requires_grad_(True)
    place_patch(x, p, [1] * 5, [1] * 5, angles)[0].sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_universal_patch_fit_and_evaluate(crafted):
    model, x, y, cert = crafted
    train = split_images(48, seed=7)
    with torch.no_grad():
        ytrain = model(train).argmax(1)
    attack = UniversalPatch(5, steps=25, eval_poses=6, rotation=(-20, 20), scale=(0.8, 1.0)).fit(model, train, ytrain)
    assert attack.patch.shape == (3, 5, 5) and 0 <= attack.patch.min() and attack.patch.max() <= 1
    res = attack(model, x, y)
    assert res.in_threat_model.all() and res.robust_accuracy >= cert.certified_accuracy
    with pytest.raises(RuntimeError, match="fit"):
        UniversalPatch(5)(model, x, y)
    # targeted: pushes towards class 1; success is still judged untargeted, the targeted rate is reported
    targeted = UniversalPatch(5, steps=5, eval_poses=2, target=1).fit(model, train, ytrain)(model, x, y)
    assert 0.0 <= targeted.info["targeted_success_rate_on_attacked"] <= 1.0 and targeted.info["target"] == 1


# ----------------------------------------------------------------------------------------------- soundness


def test_no_certified_sample_is_broken_by_any_attack(crafted):
    model, x, y, cert = crafted
    n_cert = int(cert.certified.sum())
    assert 0 < n_cert < x.shape[0], "the crafted set must mix certified and uncertified samples"
    train = split_images(48, seed=11)
    with torch.no_grad():
        ytrain = model(train).argmax(1)
    attacks = {
        "pgd": fast_pgd(),
        "pgd-adaptive": fast_pgd(placement="adaptive"),
        "universal": UniversalPatch(5, steps=20, eval_poses=4).fit(model, train, ytrain),
        "feature-space": FeatureSpaceWorstCase(),
    }
    res = evaluate_empirical(model, x, y, 5, attacks, cert_result=subset_cert_result(cert, torch.arange(x.shape[0])))
    assert res.certified_broken == 0 and res.broken_by == {}
    assert res.feature_space_mismatch == 0 and res.prediction_mismatch == 0
    assert res.robust_accuracy["feature-space"] == res.certified_accuracy == pytest.approx(n_cert / x.shape[0])
    for name in ("pgd", "pgd-adaptive", "universal"):
        assert res.robust_accuracy[name] >= res.certified_accuracy
        assert not (res.certified & ~res.robust[name]).any()
    assert res.overall_attacks == ["pgd", "pgd-adaptive", "universal"]
    assert res.overall_robust_accuracy < 1.0  # the attacks did break something: the check is not vacuous
    assert res.overall_robust_accuracy >= res.certified_accuracy
    json.dumps(res.summary())


def test_no_certified_sample_is_broken_rectangle_random_model():
    """Same invariant on an uncrafted model (random weights, biased head) and a 3x7 patch, cert computed inside."""
    x = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for bias in torch.linspace(-1.0, 2.0, 13).tolist():  # the head bias that gives a mix of certified samples
        model = _random_model(bias)
        y = _predicted(model, x)
        n_cert = int(bagcert.certify(model, x, y, (3, 7)).certified.sum())
        if 0 < n_cert < 10:
            break
    assert 0 < n_cert < 10, "no head bias gave a mix of certified and uncertified samples"
    attacks = [PatchPGD((3, 7), steps=10, locations=4), PatchPGD((3, 7), steps=10, locations=4, placement="adaptive"), "feature-space"]
    res = evaluate_empirical(model, x, y, (3, 7), attacks)
    assert res.certified_broken == 0 and res.feature_space_mismatch == 0 and int(res.certified.sum()) == n_cert


def test_soundness_error_on_a_false_certificate(crafted):
    model, x, y, cert = crafted
    broken = fast_pgd()(model, x, y).success
    assert broken.any()
    fake = subset_cert_result(cert, torch.arange(x.shape[0]))
    fake.certified = fake.certified | broken  # claim the broken samples are certified
    with pytest.raises(SoundnessError, match="SOUNDNESS VIOLATION") as e:
        evaluate_empirical(model, x, y, 5, [fast_pgd()], cert_result=fake)
    assert isinstance(e.value, AssertionError)
    res = evaluate_empirical(model, x, y, 5, [fast_pgd()], cert_result=fake, raise_on_violation=False)
    assert res.certified_broken == int(broken.sum()) and res.broken_by["pgd"] == broken.nonzero().flatten().tolist()


def test_evaluate_empirical_rejects_foreign_certificates(crafted):
    model, x, y, cert = crafted
    with pytest.raises(ValueError, match="samples"):
        evaluate_empirical(model, x[:5], y[:5], 5, ["feature-space"], cert_result=cert)
    with pytest.raises(ValueError, match="patch"):
        evaluate_empirical(model, x, y, 3, ["feature-space"], cert_result=cert)
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate_empirical(model, x, y, 5, ["fgsm"], cert_result=cert)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PatchPGD(5, steps=-1), "steps must be an int >= 0"),
        (lambda: PatchPGD(5, locations=0), "locations must be a positive int"),
        (lambda: PatchPGD(5, step_size=float("nan")), "step_size must be a finite number > 0"),
        (lambda: PatchPGD(5, temperature=0.0), "temperature must be a finite number > 0"),
        (lambda: PatchPGD(5, placement="grid"), "placement must be one of"),
        (lambda: PatchPGD(5, batch_size=True), "batch_size must be a positive int"),
        # the universal patch divides its relaxed votes by the temperature too: 0 gave NaN scores, a negative
        # one an attack that climbs the wrong way, both silently reported as "robust"
        (lambda: UniversalPatch(5, temperature=0.0), "temperature must be a finite number > 0"),
        (lambda: UniversalPatch(5, temperature=-1.0), "temperature must be a finite number > 0"),
        (lambda: UniversalPatch(5, step_size=float("inf")), "step_size must be a finite number > 0"),
        (lambda: UniversalPatch(5, target=-1), "target must be an int >= 0"),
        (lambda: UniversalPatch(5, surrogate="votes"), "surrogate must be one of"),
        (lambda: FeatureSpaceWorstCase(batch_size=0), "batch_size must be a positive int"),
    ],
)
def test_attack_settings_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_imagenet_label_mapping():
    assert imagenet_label_mapping({"imagenet_indices": [3, 7]}, None, 2)[:2] == (True, [3, 7])
    ok, mapping, _ = imagenet_label_mapping({}, ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                                                 "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"], 10)
    assert ok and mapping == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
    ok, _, reason = imagenet_label_mapping({"classes": ["airplane", "automobile"]}, None, 2)
    assert not ok and "not ImageNet" in reason


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_attacks_smoke(crafted_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    rc = certify.main(["--checkpoint", str(crafted_checkpoint), "--dataset", "synthetic:16", "--patch-sizes", "2,5",
                       "--attacks", "pgd,feature-space", "--attack-steps", "5", "--attack-locations", "4",
                       "--attack-images", "12", "--output", str(out), "--no-progress", "--quiet"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["certified_broken"] == {"2": 0, "5": 0}
    res = json.loads((out / "results.json").read_text())
    assert res["certified_broken"] == {"2": 0, "5": 0}
    emp = res["empirical"]
    assert emp["attacks"] == ["pgd", "feature-space"] and emp["num_images_attacked"] == 12 and emp["skipped"] == {}
    assert emp["settings"]["pgd"]["steps"] == 5 and emp["settings"]["pgd"]["locations"] == 4
    for key in ("2", "5"):
        r = emp["per_size"][key]
        assert set(r["robust_accuracy"]) == {"pgd", "feature-space"} and r["num_images"] == 12
        assert r["robust_accuracy"]["pgd"] >= r["certified_accuracy"]
        assert r["robust_accuracy"]["feature-space"] == r["certified_accuracy"] and r["feature_space_mismatch"] == 0
        assert r["certified_broken"] == 0 and r["overall_attacks"] == ["pgd"]
    rows = (out / "per_sample.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert "attacked" in header and "robust_pgd_5" in header and "robust_feature-space_2" in header
    assert sum(r.split(",")[header.index("attacked")] == "1" for r in rows[1:]) == 12
    assert "Empirical robustness" in (out / "summary.md").read_text()
    pytest.importorskip("matplotlib")
    figures = emp["per_size"]["5"]["figures"]
    assert figures == ["attack_examples_5.png", "uncertified_positions_5.png"] and all((out / f).is_file() for f in figures)


def test_cli_fails_loudly_on_a_soundness_violation(crafted_checkpoint, tmp_path, capsys, monkeypatch):
    """A certificate that claims every sample is certified: the run must write the report and exit non-zero."""
    import bagcert.data
    import bagcert.empirical

    model = crafted_model()
    x = split_images(16, seed=0)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = Dataset((x * 255).round().to(torch.uint8), y, ["red", "dark", "green", "grey"], "crafted")
    monkeypatch.setattr(bagcert.data, "load_dataset", lambda *a, **k: data)
    real = bagcert.empirical.subset_cert_result

    def lying(cert, index):
        out = real(cert, index)
        out.certified = torch.ones_like(out.certified)
        return out

    monkeypatch.setattr(bagcert.empirical, "subset_cert_result", lying)
    out = tmp_path / "report"
    rc = certify.main(["--checkpoint", str(crafted_checkpoint), "--dataset", "crafted", "--patch-sizes", "5",
                       "--attacks", "pgd", "--attack-steps", "20", "--attack-locations", "8", "--output", str(out),
                       "--no-progress", "--quiet"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "SOUNDNESS VIOLATION" in err
    res = json.loads((out / "results.json").read_text())
    assert res["certified_broken"]["5"] > 0 and res["empirical"]["per_size"]["5"]["broken_by"]["pgd"]


REAL_PATCH_FILE = ROOT.parent / "shared" / "data" / "imagenet-patch" / "imagenet_patch.gz"


@pytest.mark.skipif(not REAL_PATCH_FILE.exists(), reason="ImageNet-Patch file not present")
def test_cli_imagenet_patch_on_an_imagenet_like_checkpoint(tmp_path, capsys, monkeypatch):
    import bagcert.data

    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=10, width=8).eval()
    path = tmp_path / "imagenette.pt"
    bagcert.save_checkpoint(path, model, input_size=32, classes=list(IMAGENETTE_WNIDS))
    x = (torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)  # labels = predictions: every image gets attacked
    data = Dataset(x, y, list(IMAGENETTE_WNIDS), "imagenette-like")
    monkeypatch.setattr(bagcert.data, "load_dataset", lambda *a, **k: data)
    out = tmp_path / "report"
    rc = certify.main(["--checkpoint", str(path), "--dataset", "imagenette-like", "--patch-sizes", "5", "--attacks", "imagenet-patch,pgd",
                       "--attack-steps", "2", "--attack-locations", "2", "--imagenet-patch-file", str(REAL_PATCH_FILE),
                       "--output", str(out), "--no-progress", "--quiet"])
    assert rc == 0
    emp = json.loads((out / "results.json").read_text())["empirical"]
    assert emp["skipped"] == {}
    r = emp["per_size"]["5"]
    assert "imagenet-patch" in r["robust_accuracy"] and r["certified_broken"] == 0
    # a 50/224 patch, scaled 0.7-1 and rotated, on a 32 px image never fits in 5x5: outside the threat model
    assert r["clean_accuracy"] == 1.0
    assert r["in_threat_model"]["imagenet-patch"] is False and r["overall_attacks"] == ["pgd"]
    assert len(r["attack_info"]["imagenet-patch"]["per_patch"]) == 10
    # the report says so with the applied size (the pasted patches' bounding boxes against the certified 5x5)
    note = next(n for n in emp["notes"] if n.startswith("patch 5: imagenet-patch: outside the certified threat model ("))
    assert note.endswith(" px > certified 5x5)") and note in (out / "summary.md").read_text()


def test_cli_rejects_unknown_attack(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="did you mean pgd"):
        certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--output", str(tmp_path), "--attacks", "pgdd"])


def test_run_empirical_evaluation_shows_a_progress_bar_only_when_asked(capsys):
    from bagcert.data import synthetic_dataset
    from bagcert.empirical import run_empirical_evaluation

    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", width=8).eval()
    data = synthetic_dataset(6, size=32)
    cert = bagcert.certify(model, data.float_images(), data.labels, patch_sizes=[3])
    for progress in (False, True):
        run_empirical_evaluation(model, data, cert, ["pgd"], steps=1, locations=1, figure_images=0, progress=progress)
        err = capsys.readouterr().err
        assert ("attacks" in err and "img" in err) == progress
