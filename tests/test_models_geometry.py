"""Registry sweep, BagNet fidelity, and geometry checked against an empirical probe."""

import pytest
import torch

import bagcert
from bagcert.models import InputError


def _probe(model, size, patch, top, left, trials=4):
    """Locations whose logits change when the patch pixels change (float64, eval mode).

    Union over a few random images, so that a ReLU that happens to be inactive on one image does
    not hide a dependency.
    """
    model = model.double().eval()
    g = torch.Generator().manual_seed(top * 131 + left)
    x = torch.rand(trials, 3, size, size, generator=g, dtype=torch.float64)
    x2 = x.clone()
    ph, pw = patch
    x2[:, :, top : top + ph, left : left + pw] = torch.rand(trials, 3, ph, pw, generator=g, dtype=torch.float64)
    with torch.no_grad():
        d = (model.local_logits(x) - model.local_logits(x2)).abs().amax(1).amax(0)
    return d > 1e-12


PROBED = [
    ("cifar_bagnet5", dict(width=8), 32),
    ("cifar_bagnet9", dict(width=8), 32),
    ("cifar_bagnet9_s2", dict(width=8), 32),
    ("cifar_bagnet5_s2", dict(width=8), 32),  # no 3x3 block: the stem alone makes the window
    ("cifar_bagnet7_s2", dict(width=8), 32),
    ("cifar_bagnet13_s2", dict(width=8), 32),
    ("cifar_bagnet", dict(width=8, receptive_field=8, stride=2), 32),
    ("cifar_bagnet", dict(width=8, receptive_field=9, stride=2, padding="valid"), 32),
    ("cifar_bagnet", dict(width=8, receptive_field=7, stride=1, padding="valid"), 20),
    ("cifar_bagnet", dict(width=16, receptive_field=21, stride=4), 48),
    ("image_bagnet17_s8", dict(width=16), 64),
    ("image_bagnet33_s8", dict(width=16, padding="valid"), 72),
    ("cifar_bagnet", dict(width=16, receptive_field=20, stride=8), 64),
    ("bagnet9", dict(width=1 / 16, num_classes=5), 48),
    ("bagnet17", dict(width=1 / 16, num_classes=5), 48),
]


@pytest.mark.parametrize("name,kwargs,size", PROBED)
def test_geometry_matches_empirical_probe(name, kwargs, size):
    torch.manual_seed(0)
    model = bagcert.create_model(name, **kwargs)
    # randomise batch-norm statistics so that no unit is accidentally dead everywhere
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    positions = [(0, 0), (size - 3, size - 2), (size // 2, 1), (3, size - 4)]
    for patch in [(1, 1), (2, 3)]:
        for top, left in positions:
            top, left = min(top, size - patch[0]), min(left, size - patch[1])
            changed = _probe(model, size, patch, top, left)
            predicted = model.geometry.affected_mask((size, size), patch, top, left)
            assert changed.shape == predicted.shape
            # soundness: every location that changed is in R(l)
            assert not (changed & ~predicted).any(), (name, patch, top, left)
            # tightness: R(l) holds no location that provably cannot change
            assert torch.equal(changed, predicted), (name, patch, top, left)


def test_bagnet_fidelity():
    expect = {"bagnet9": (9, 27, 15.69), "bagnet17": (17, 26, 16.21), "bagnet33": (33, 24, 18.31)}
    for name, (rf, grid, mparams) in expect.items():
        m = bagcert.create_model(name)
        assert m.geometry.receptive_field == (rf, rf)
        assert m.geometry.stride == (8, 8) and m.geometry.padding == (0, 0)
        assert m.grid_size(224, 224) == (grid, grid)
        assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - mparams) < 0.01
    m = bagcert.create_model("bagnet9")
    # location i sees pixels [8i, 8i + 8]; pixels 217..223 are seen by no location at 224 px
    assert m.geometry.pixel_box(26, 26) == (208, 208, 216, 216)
    assert not m.geometry.affected_mask((224, 224), 7, 217, 217).any()
    m17 = bagcert.create_model("bagnet17")
    assert int(m17.geometry.affected_mask((224, 224), 32, 100, 100).sum()) <= 36


@pytest.mark.parametrize("name", bagcert.list_models("image_bagnet"))
def test_registry_sweep_image_bagnets(name):
    torch.manual_seed(0)
    model = bagcert.create_model(name, num_classes=10, width=16)
    x = torch.rand(2, 3, 96, 96)
    z = model.local_logits(x)
    assert tuple(z.shape) == (2, 10, 12, 12) == (2, 10, *model.grid_size(96, 96))
    assert model.geometry.stride == (8, 8)
    z.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_stem_kernel_hits_every_receptive_field():
    from bagcert.models.cifar import stem_kernel

    for stride in (1, 2, 4, 8):
        for rf in range(3 if stride == 1 else 2 * stride - 1, 60):
            k0, n3 = stem_kernel(rf, stride)
            base = 0 if stride == 1 else 2 * (stride - 1)
            assert k0 + base + 2 * stride * n3 == rf and k0 >= 1 and n3 >= 0
            model = bagcert.create_model("cifar_bagnet", receptive_field=rf, stride=stride, width=8)
            assert model.geometry.receptive_field == (rf, rf) and model.geometry.stride == (stride, stride)
    with pytest.raises(ValueError, match="too small for stride 8"):
        stem_kernel(13, 8)
    with pytest.raises(ValueError, match="stride must be 1, 2, 4 or 8"):
        stem_kernel(9, 3)


@pytest.mark.parametrize("name", [n for n in bagcert.list_models() if n.startswith("cifar")])
def test_registry_sweep_cifar(name):
    torch.manual_seed(0)
    model = bagcert.create_model(name, num_classes=7, width=8)
    x = torch.rand(2, 3, 32, 32)
    z = model.local_logits(x)
    assert z.shape[:2] == (2, 7) and tuple(z.shape[2:]) == model.grid_size(32, 32)
    assert torch.isfinite(z).all()
    z.float().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        scores = model(x)
        assert torch.equal(scores, (model.local_logits(x) > 0).sum((2, 3)))


@pytest.mark.parametrize("name", ["bagnet9_w025", "bagnet17_w025", "bagnet33_w025"])
def test_registry_sweep_bagnet(name):
    model = bagcert.create_model(name, num_classes=3, width=1 / 16).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        z = model.local_logits(x)
    assert tuple(z.shape) == (1, 3) + model.grid_size(64, 64)


def test_channels_last_and_bf16_autocast_agree():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet9_s2", width=16).eval()
    x = torch.rand(4, 3, 32, 32)
    ref = model.local_logits(x)
    model_cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model_cl.local_logits(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(z.float(), ref, atol=0.1 * ref.abs().max().item())


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean 'bagnet17'"):
        bagcert.create_model("bagnet_17")


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.full((1, 3, 32, 32), float("inf")), "NaN or Inf"),
        (torch.rand(1, 3, 32, 32) * 255, "0-255"),
        (torch.rand(1, 3, 32, 32) - 0.5, r"\[0, 1\]"),
        (torch.rand(1, 1, 32, 32), "3 channels"),
        (torch.rand(1, 32, 32, 3), "3 channels"),
        ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "floating point"),
        (torch.rand(3, 32, 32), r"\[B, 3, H, W\]"),
    ],
)
def test_bad_images_rejected(x, match):
    model = bagcert.create_model("cifar_bagnet5", width=8).eval()
    with pytest.raises(InputError, match=match):
        model(x)


def test_images_smaller_than_receptive_field():
    model = bagcert.create_model("bagnet33_w025", width=1 / 16).eval()
    with pytest.raises(InputError, match="receptive field"):
        model(torch.rand(1, 3, 20, 20))


def test_max_affected_matches_the_largest_mask():
    # brute force over every position: the largest affected set, for square and rectangular patches
    for name in ("cifar_bagnet9_s2", "cifar_bagnet5_s2", "cifar_bagnet7"):
        g = bagcert.create_model(name, width=8).geometry
        for patch in (5, (3, 7), 1):
            ph, pw = bagcert.geometry.parse_patch_size(patch)
            brute = max(int(g.affected_mask((32, 32), patch, t, l).sum()) for t in range(33 - ph) for l in range(33 - pw))
            assert g.max_affected((32, 32), patch) == brute, (name, patch)
    # the numbers the docs quote: 5x5 patches on 32 px reach 49 of 256 locations at rf 9 / stride 2, 25 at rf 5
    assert bagcert.create_model("cifar_bagnet9_s2", width=8).geometry.max_affected((32, 32), 5) == 49
    assert bagcert.create_model("cifar_bagnet5_s2", width=8).geometry.max_affected((32, 32), 5) == 25


@pytest.mark.parametrize("kwargs, match", [
    ({"width": True}, "width must be a positive int, got True"),
    ({"width": 8.0}, "width must be a positive int, got 8.0"),
    ({"depth": 2.5}, "depth must be a non-negative int, got 2.5"),
    ({"depth": -1}, "depth must be a non-negative int, got -1"),
    ({"receptive_field": "5"}, "receptive_field must be a positive int, got '5'"),
    ({"stride": True}, "stride must be 1, 2, 4 or 8, got True"),
])
def test_cifar_bagnet_refuses_sizes_that_are_not_positive_ints(kwargs, match):
    # True == 1 and 8.0 == 8 in Python: without the check a JSON `true` built a 1-channel network
    with pytest.raises(ValueError, match=match):
        bagcert.create_model("cifar_bagnet", **{"receptive_field": 5, "stride": 2, "width": 8, **kwargs})


def test_cifar_bagnet_without_residual_blocks_is_a_valid_network():
    # rf 5 at stride 2 needs no 3x3 block: depth 0 is the stem and the head alone
    model = bagcert.create_model("cifar_bagnet", receptive_field=5, stride=2, width=8, depth=0).eval()
    assert len(model.blocks) == 0 and model.geometry.receptive_field == (5, 5)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
