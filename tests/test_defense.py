"""Defensive patches, corruptions, L-inf PGD and the defensive-patch evaluation (bagcert.defense)."""

import pytest
import torch
from torch import nn

import bagcert
from bagcert.checkpoint import CheckpointError
from bagcert.defense import (
    CORRUPTIONS,
    DefensivePatch,
    correlation_distance,
    correlation_matrix,
    corrupt,
    evaluate_defensive_patch,
    frame_mask,
    linf_pgd,
    make_defensive_patches,
    optimize_global_correlation,
    optimize_local_prior,
    random_patch_attack,
    square_mask,
)


def tiny_model(seed=0, classes=4):
    torch.manual_seed(seed)
    return bagcert.create_model("cifar_bagnet5_s2", num_classes=classes, width=8).eval()


def rand_images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- geometry ----------------------------------------------------------------------------------
def test_default_frame_is_the_released_cifar_ring():
    m = frame_mask(32)
    assert m.shape == (32, 32) and m.dtype == torch.bool
    assert int(m.sum()) == 30 * 30 - 26 * 26 == 224
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[1:31, 1:31] = True          # 30x30 outer square, centred (1 pixel margin)
    expected[3:29, 3:29] = False         # minus the centred 26x26 inner square
    assert torch.equal(m, expected)
    assert DefensivePatch.create(10, 32).num_pixels == 224


def test_frame_and_square_options():
    m = frame_mask(16, outer=10, width=1)
    assert int(m.sum()) == 100 - 64
    assert m[3, 3] and m[12, 12] and not m[2, 2] and not m[4, 4] and not m[13, 13]
    assert int(frame_mask(16, outer=10, width=5).sum()) == 100  # a ring as wide as half the side is a full square
    s = square_mask(32)  # default side 32 / 4 = 8, top-left
    assert int(s.sum()) == 64 and bool(s[:8, :8].all())
    br = square_mask(32, size=5, corner="bottom-right", margin=1)
    assert int(br.sum()) == 25 and bool(br[26:31, 26:31].all())
    with pytest.raises(ValueError, match="too wide"):
        frame_mask(32, outer=10, width=6)
    with pytest.raises(ValueError, match="corner"):
        square_mask(32, corner="middle")


def test_apply_changes_only_ring_pixels_with_the_patch_of_each_label():
    patch = DefensivePatch.create(4, 32, seed=3)
    x = rand_images(6)
    x0 = x.clone()
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    out = patch.apply(x, y)
    assert torch.equal(x, x0)  # input untouched
    ring = patch.mask
    assert torch.equal(out[:, :, ~ring], x[:, :, ~ring])
    for i in range(6):
        assert torch.equal(out[i][:, ring], patch.values[y[i]])
    assert (out[:, :, ring] != x[:, :, ring]).any()
    full = patch.patches()
    assert full.shape == (4, 3, 32, 32) and float(full[:, :, ~ring].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="labels must lie"):
        patch.apply(x, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="made for"):
        patch.apply(rand_images(2, size=16), torch.tensor([0, 1]))


def test_stage1_increases_patch_only_accuracy_and_leaves_the_model_alone():
    model = tiny_model()
    model.train()  # the optimisation must evaluate in eval mode and restore this
    params = {k: v.clone() for k, v in model.state_dict().items()}
    patch = DefensivePatch.create(4, 32, seed=0)
    labels = torch.arange(4)

    def patch_only_accuracy():
        with torch.no_grad():
            model.eval()
            acc = float((model.mean_logits(patch.patch_only(labels)).argmax(1) == labels).float().mean())
            model.train()
            return acc

    before = patch_only_accuracy()
    history = optimize_local_prior(patch, model, labels, epochs=40, lr=0.05, seed=0)
    after = patch_only_accuracy()
    assert after > before
    assert history[-1] < history[0]
    assert model.training
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())  # BN statistics unchanged too
    assert all(p.grad is None for p in model.parameters())
    assert float(patch.values.min()) >= 0.0 and float(patch.values.max()) <= 1.0


def test_correlation_distance_equals_explicit_matrices():
    mask = frame_mask(8, outer=6, width=1)
    a, b = rand_images(3, 8, seed=1), rand_images(3, 8, seed=2)
    ma, mb = correlation_matrix(a, mask), correlation_matrix(b, mask)
    assert ma.shape == (int(mask.sum()), 64)
    # element (k, n): mean over images and channels of z[ring pixel k] * z[pixel n], z = 2x - 1
    z = 2 * a - 1
    k_pix = mask.flatten().nonzero().flatten()
    zz = z.reshape(3, 3, 64)
    assert torch.allclose(ma[2, 10], (zz[:, :, k_pix[2]] * zz[:, :, 10]).mean(), atol=1e-6)
    explicit = ((ma - mb) ** 2).mean()
    assert torch.allclose(correlation_distance(a, b, mask), explicit, rtol=1e-4, atol=1e-7)
    assert float(correlation_distance(a, a, mask)) == pytest.approx(0.0, abs=1e-7)


def test_make_defensive_patches_pipeline_is_seeded_and_follows_the_schedule():
    model = tiny_model()
    data = bagcert.data.synthetic_dataset(12, 4, 32, seed=0)
    kw = dict(stage1_epochs=1, stage2_epochs=3, milestones=(1, 2), batch_size=6, eot=True, seed=5)
    p1 = make_defensive_patches(model, data.images, data.labels, **kw)
    p2 = make_defensive_patches([model], data.images, data.labels, **kw)
    assert torch.equal(p1.values, p2.values)
    hist = p1.config["history"]["global_correlation"]
    assert [h["lr_scale"] for h in hist] == pytest.approx([1.0, 1 / 3, 1 / 9])
    assert len(hist[0]["ce"]) == 1 and p1.num_classes == 4
    assert float(p1.values.min()) >= 0 and float(p1.values.max()) <= 1
    assert not torch.equal(p1.values, DefensivePatch.create(4, 32, seed=5).values)


def test_save_load_round_trip(tmp_path):
    patch = DefensivePatch.create(3, 32, shape="square", size=6, corner="top-right", seed=1, classes=["a", "b", "c"])
    patch.config["history"] = {"local_prior": [1.5, 1.0]}
    path = patch.save(tmp_path / "p.pt")
    back = DefensivePatch.load(path)
    assert torch.equal(back.values, patch.values) and torch.equal(back.mask, patch.mask)
    assert back.classes == ["a", "b", "c"] and back.config == patch.config
    x, y = rand_images(3), torch.tensor([2, 0, 1])
    assert torch.equal(back.apply(x, y), patch.apply(x, y))
    torch.save({"values": patch.values}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a defensive patch"):
        DefensivePatch.load(tmp_path / "foreign.pt")


# --- corruptions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_range_shape_and_seed(name):
    x = rand_images(2, 16, seed=4)
    x0 = x.clone()
    outs = [corrupt(x, name, s, seed=7) for s in range(1, 6)]
    for o in outs:
        assert o.shape == x.shape and o.dtype == torch.float32
        assert float(o.min()) >= 0.0 and float(o.max()) <= 1.0
    assert torch.equal(x, x0)
    assert torch.equal(corrupt(x, name, 3, seed=7), outs[2])  # same seed, same output
    if name.endswith("noise"):
        assert not torch.equal(corrupt(x, name, 3, seed=8), outs[2])
    # the distortion grows with the severity (measured on this fixed image)
    dist = [float((o - x).abs().mean()) for o in outs]
    assert all(b >= a for a, b in zip(dist, dist[1:])) and dist[-1] > dist[0]


def test_noise_strength_increases_with_severity():
    grey = torch.full((2, 3, 64, 64), 0.5)  # far from the clipping bounds
    stds = [float((corrupt(grey, "gaussian_noise", s) - grey).std()) for s in range(1, 6)]
    assert all(b > a for a, b in zip(stds, stds[1:]))
    assert stds[0] == pytest.approx(0.04, rel=0.05) and stds[-1] == pytest.approx(0.10, rel=0.05)
    shot = [float((corrupt(grey, "shot_noise", s) - grey).std()) for s in range(1, 6)]
    assert all(b > a for a, b in zip(shot, shot[1:]))
    hit = [float((corrupt(grey, "impulse_noise", s) != grey).float().mean()) for s in range(1, 6)]
    assert all(b > a for a, b in zip(hit, hit[1:]))


def test_corruption_bad_arguments():
    with pytest.raises(ValueError, match="severity"):
        corrupt(rand_images(1, 8), "jpeg", 6)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(rand_images(1, 8), "fog", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(rand_images(1, 8) * 2, "contrast", 1)


# --- attacks and evaluation ---------------------------------------------------------------------
class RingReader(nn.Module):
    """A fake classifier that reads the class from the mean of channel 0 on the default ring:
    logit_c = -10 |mean - c / (C - 1)|. A patch whose channel 0 is c / (C - 1) is always right."""

    def __init__(self, classes=4):
        super().__init__()
        self.classes = classes
        self.register_buffer("mask", frame_mask(32))

    def forward(self, x):
        m = x[:, 0][:, self.mask].mean(1, keepdim=True)
        targets = torch.arange(self.classes, dtype=x.dtype) / (self.classes - 1)
        return -10 * (m - targets.view(1, -1)).abs()


def test_linf_pgd_stays_in_the_ball_and_raises_the_loss():
    model = tiny_model()
    x, y = rand_images(4, seed=1), torch.tensor([0, 1, 2, 3])
    eps = 4 / 255
    adv = linf_pgd(model.mean_logits, x, y, eps, steps=5, step=1 / 255, seed=0)
    assert float((adv - x).abs().max()) <= eps + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    ce = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(model.mean_logits(adv), y)) > float(ce(model.mean_logits(x), y))
    assert torch.equal(linf_pgd(model.mean_logits, x, y, 0.0, 5, 0.1), x)
    assert torch.equal(adv, linf_pgd(model.mean_logits, x, y, eps, steps=5, step=1 / 255, seed=0))


def test_random_patch_attack_changes_only_a_patch_sized_square():
    model = tiny_model()
    x, y = rand_images(3, seed=2), torch.tensor([0, 1, 2])
    adv, pos = random_patch_attack(model.mean_logits, x, y, patch_size=5, steps=3, seed=1)
    for i in range(3):
        t, l = pos[i].tolist()
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[t : t + 5, l : l + 5] = True
        assert torch.equal(adv[i][:, ~inside], x[i][:, ~inside])
        assert (adv[i][:, inside] != x[i][:, inside]).any()
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1


def test_evaluate_defensive_patch_with_a_patch_the_model_reads():
    model = RingReader()
    patch = DefensivePatch.create(4, 32, init="grey")
    patch.values[:, 0] = (torch.arange(4, dtype=torch.float32) / 3).view(4, 1)  # channel 0 encodes the class
    x = rand_images(8, seed=3)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    res = evaluate_defensive_patch(model, patch, x, y, corruptions=["brightness", "jpeg"], severities=(1, 5),
                                   pgd_steps=2, attack_steps=2, seed=0)
    assert res["n"] == 8 and res["severities"] == [1, 5]
    assert res["clean"]["with"] == 1.0 and res["clean"]["without"] < 1.0  # random rings read as ~0.5
    assert set(res["corruptions"]) == {"brightness", "jpeg"} and len(res["corruptions"]["jpeg"]["with"]) == 2
    # brightness +0.1 moves the ring's mean by less than half the class spacing (1/6); +0.5 breaks
    # every class but the last, whose ring is already at 1 (2 of the 8 images)
    assert res["corruptions"]["brightness"]["with"] == [1.0, 0.25]
    mean_with = sum(sum(v["with"]) for v in res["corruptions"].values()) / 4
    assert res["corruption_mean"]["with"] == pytest.approx(mean_with)
    for key in ("pgd", "patch_attack"):
        assert 0.0 <= res[key]["without"] <= 1.0 and 0.0 <= res[key]["with"] <= 1.0
    # a 5x5 patch cannot move the mean of 224 ring pixels far: the defended model stays right
    assert res["patch_attack"]["with"] == 1.0
    none = evaluate_defensive_patch(model, patch, x, y, corruptions=[], pgd_eps=None, attack_patch_size=None)
    assert none["corruption_mean"] is None and none["pgd"] is None and none["patch_attack"] is None
    assert none["clean"] == res["clean"]


@pytest.mark.parametrize("epochs", [-1, 2.5, True])
def test_stages_refuse_an_epoch_count_that_is_not_an_int_ge_0(epochs):
    model, patch = tiny_model(), DefensivePatch.create(4, 32, seed=0)
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        optimize_local_prior(patch, model, torch.arange(4), epochs=epochs)
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        optimize_global_correlation(patch, model, torch.rand(4, 3, 32, 32), torch.arange(4), epochs=epochs)
    assert optimize_local_prior(patch, model, torch.arange(4), epochs=0) == []  # 0: the stage is skipped, as asked
