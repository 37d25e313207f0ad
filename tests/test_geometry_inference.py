"""Geometry inferred from the computation (bagcert.infer_geometry) and checked in every certification path.

The ground truth is a brute-force probe: for EVERY output location, the exact set of input pixels with a
nonzero input gradient of that location's logits, on a float64 network with tanh activations (nonzero
derivative everywhere) and random weights, over several random images.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bagcert
from bagcert import Geometry, GeometryError, GeometryWarning, infer_geometry, verify_geometry, wrap_model
from bagcert.geometry_inference import clear_cache, geometry_report
from bagcert.models import to_dense

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ----------------------------------------------------------------------------------------------------------------
# random networks
# ----------------------------------------------------------------------------------------------------------------
class _Residual(nn.Module):
    """Two branches of equal output size summed: a size-preserving conv branch and a 1x1 (or identity) skip."""

    def __init__(self, ch, k, dil, mode):
        super().__init__()
        kh, kw = k
        self.conv = nn.Conv2d(ch, ch, (kh, kw), padding="same", dilation=dil, padding_mode=mode)
        self.skip = nn.Conv2d(ch, ch, 1) if kh % 2 else nn.Identity()

    def forward(self, x):
        return torch.tanh(self.conv(x)) + self.skip(x)


class _CropPad(nn.Module):
    """F.pad with constant (possibly negative, i.e. cropping) amounts, then a slice."""

    def __init__(self, pads, crop):
        super().__init__()
        self.pads, self.crop = pads, crop

    def forward(self, x):
        x = F.pad(x, self.pads)
        a, b = self.crop
        return x[:, :, a:, b:]


class _Cat(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.a = nn.Conv2d(ch, ch, 3, padding=1)
        self.b = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)[:, : x.shape[1]]


def random_net(rng: random.Random, allow_max: bool = True):
    """A random stack of convolutions / pooling / residual blocks with tanh activations, 3 -> 4 classes."""
    ch = rng.choice([2, 3])
    layers = [nn.Conv2d(3, ch, 1)]
    for _ in range(rng.randint(2, 5)):
        kind = rng.choice(["conv", "conv", "conv", "pool", "res", "crop", "cat"])
        if kind == "conv":
            k = (rng.randint(1, 7), rng.randint(1, 7)) if rng.random() < 0.5 else (rng.randint(1, 7),) * 2
            s = (rng.randint(1, 4), rng.randint(1, 3)) if rng.random() < 0.3 else (rng.choice([1, 1, 2, 3, 4]),) * 2
            d = rng.choice([1, 1, 2])
            pad_kind = rng.choice(["int", "tuple", "valid", "same", "reflect", "replicate"])
            kw = {}
            if pad_kind == "int":
                kw["padding"] = rng.randint(0, max(k) // 2 * d)
                kw["padding"] = min(kw["padding"], (min(k) - 1) * d)
            elif pad_kind == "tuple":
                kw["padding"] = (rng.randint(0, (k[0] - 1) * d), rng.randint(0, (k[1] - 1) * d))
            elif pad_kind == "valid":
                kw["padding"] = "valid"
            elif pad_kind == "same":
                kw["padding"], s = "same", (1, 1)
            else:
                kw["padding"] = (rng.randint(0, (k[0] - 1) * d // 2), rng.randint(0, (k[1] - 1) * d // 2))
                kw["padding_mode"] = pad_kind
            layers += [nn.Conv2d(ch, ch, k, stride=s, dilation=d, **kw), nn.Tanh()]
        elif kind == "pool":
            k = rng.randint(2, 4)
            s = rng.randint(1, k)
            p = rng.randint(0, k // 2)
            if allow_max and rng.random() < 0.5:
                layers.append(nn.MaxPool2d(k, s, p, ceil_mode=rng.random() < 0.5))
            else:
                layers.append(nn.AvgPool2d(k, s, p, ceil_mode=rng.random() < 0.5))
        elif kind == "res":
            k = (rng.choice([1, 3, 5]), rng.choice([1, 3, 5, 2]))
            layers.append(_Residual(ch, k, rng.choice([1, 2]), rng.choice(["zeros", "reflect", "replicate"])))
        elif kind == "crop":
            pads = (rng.randint(-1, 2), rng.randint(-1, 2), rng.randint(-1, 2), rng.randint(-1, 2))
            layers.append(_CropPad(pads, (rng.randint(0, 1), rng.randint(0, 1))))
        else:
            layers.append(_Cat(ch))
    layers.append(nn.Conv2d(ch, 4, 1))
    return nn.Sequential(*layers).double().eval()


def sample_case(seed: int, allow_max: bool = True):
    """A random network and an (H, W) image size that leaves a grid of at least 2x2 locations."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    while True:
        net = random_net(rng, allow_max)
        H, W = rng.randint(11, 21), rng.randint(11, 21)
        try:
            with torch.no_grad():
                out = net(torch.zeros(1, 3, H, W, dtype=torch.float64))
        except RuntimeError:
            continue  # the random stack shrank the image to nothing, or reflect padding wider than the map
        if out.shape[-2] >= 2 and out.shape[-1] >= 2:
            return net, (H, W)


def brute_force_dependency(net, image_size, n_images: int = 2):
    """For every location (i, j): the bounding rows / columns of the pixels with a nonzero input gradient,
    and whether each such pixel set exists. Returns (grid, rows [h, w, 2], cols [h, w, 2], any [h, w])."""
    H, W = image_size
    with torch.no_grad():
        h, w = net(torch.zeros(1, 3, H, W, dtype=torch.float64)).shape[-2:]
    n = h * w
    mag = torch.zeros(n, H, W, dtype=torch.float64)
    for _ in range(n_images):
        x = torch.rand(n, 3, H, W, dtype=torch.float64, requires_grad=True)
        out = net(x)  # batch item b probes location b (eval mode: items are independent)
        sel = out.flatten(2)[torch.arange(n), :, torch.arange(n)].sum()
        (g,) = torch.autograd.grad(sel, x)
        mag += g.abs().sum(dim=1)
    nz = mag.view(h, w, H, W) != 0
    rows_any, cols_any = nz.any(dim=3), nz.any(dim=2)  # [h, w, H], [h, w, W]
    idx_r, idx_c = torch.arange(H), torch.arange(W)
    big = 10**9
    rows = torch.stack([torch.where(rows_any, idx_r, big).amin(-1), torch.where(rows_any, idx_r, -big).amax(-1)], -1)
    cols = torch.stack([torch.where(cols_any, idx_c, big).amin(-1), torch.where(cols_any, idx_c, -big).amax(-1)], -1)
    return (h, w), rows, cols, nz.flatten(2).any(-1)


def assert_inferred_matches_probe(net, image_size):
    g = infer_geometry(net, image_size)
    grid, rows, cols, has = brute_force_dependency(net, image_size)
    assert g.grid == (tuple(image_size), grid)  # the output grid is the real one
    h, w = grid
    tight_r = [False, False]
    tight_c = [False, False]
    for i in range(h):
        for j in range(w):
            if not has[i, j]:
                continue
            top, left, bottom, right = g.pixel_box(i, j, image_size)
            r0, r1 = rows[i, j].tolist()
            c0, c1 = cols[i, j].tolist()
            assert top <= r0 and r1 <= bottom and left <= c0 and c1 <= right, (i, j, (r0, r1, c0, c1), g)
            tight_r[0] |= r0 == top
            tight_r[1] |= r1 == bottom
            tight_c[0] |= c0 == left
            tight_c[1] |= c1 == right
    # the box is tight: its first and last row (column) are reached by some location
    assert all(tight_r) and all(tight_c), (tight_r, tight_c, g)
    return g


@pytest.mark.parametrize("seed", range(3))
def test_random_stacks_match_brute_force(seed):
    net, size = sample_case(seed, allow_max=False)
    assert_inferred_matches_probe(net, size)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 160))
def test_random_stacks_match_brute_force_sweep(seed):
    net, size = sample_case(seed, allow_max=False)
    assert_inferred_matches_probe(net, size)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 230))
def test_random_stacks_with_max_pooling_stay_inside(seed):
    """Max pooling routes the gradient to one pixel per window: check containment (tightness can be missed)."""
    net, size = sample_case(seed, allow_max=True)
    g = infer_geometry(net, size)
    grid, rows, cols, has = brute_force_dependency(net, size)
    assert g.grid[1] == grid
    for i in range(grid[0]):
        for j in range(grid[1]):
            if has[i, j]:
                top, left, bottom, right = g.pixel_box(i, j, size)
                assert top <= rows[i, j, 0] and rows[i, j, 1] <= bottom
                assert left <= cols[i, j, 0] and cols[i, j, 1] <= right


def test_known_geometries():
    """Hand-computed cases: rectangular kernels, stride, dilation, valid/same, reflect wider than half the kernel."""
    def g(net, size=(17, 23)):
        r = infer_geometry(net.eval(), size)
        return r.receptive_field, r.stride, r.padding, r.grid[1]

    seq = nn.Sequential
    assert g(seq(nn.Conv2d(3, 4, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(4, 3, 1))) == ((7, 7), (2, 2), (3, 3), (9, 12))
    assert g(seq(nn.Conv2d(3, 4, (3, 6), padding="same"), nn.Conv2d(4, 3, 1, stride=(2, 3)))) == ((3, 6), (2, 3), (1, 2), (9, 8))
    assert g(seq(nn.Conv2d(3, 4, (3, 6)), nn.MaxPool2d(3, 2, ceil_mode=True), nn.AvgPool2d(2, 1, padding=1))) == \
        ((7, 10), (2, 2), (2, 2), (8, 10))
    assert g(seq(nn.Conv2d(3, 4, 3, padding=3, dilation=2, padding_mode="replicate"), nn.Conv2d(4, 3, 1))) == \
        ((5, 5), (1, 1), (3, 3), (19, 25))
    # reflect padding 2 on a 3x3 kernel: the last location reflects back to pixel n-3, outside the nominal box
    assert g(seq(nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), nn.Conv2d(4, 3, 1))) == \
        ((7, 7), (1, 1), (4, 4), (19, 25))


class _ConvNeXtLike(nn.Module):
    """Patchify stem, depthwise 7x7, then LayerNorm and Linear layers per location in channels-last layout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.dw = nn.Conv2d(6, 6, 5, padding=2, groups=6)
        self.ln = nn.LayerNorm(6)
        self.l1, self.l2, self.head = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        x = x + self.l2(F.gelu(self.l1(self.ln(y)))).permute(0, 3, 1, 2)
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Separable1d(nn.Module):
    """A conv1d along the rows, run on [B*W, C, H] (the columns merged into the batch)."""

    def __init__(self):
        super().__init__()
        self.c, self.r, self.h = nn.Conv2d(3, 4, (1, 3)), nn.Conv1d(4, 4, 5, padding=2), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = torch.tanh(self.c(x))
        B, C, H, W = y.shape
        z = self.r(y.permute(0, 3, 1, 2).reshape(B * W, C, H))
        return self.h(torch.tanh(z.reshape(B, W, C, H).permute(0, 2, 3, 1)))


class _Gated(nn.Module):
    """chunk / glu over channels, and split along the rows keeping the part below row 5."""

    def __init__(self):
        super().__init__()
        self.c, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 4, 1)

    def forward(self, x):
        a, b = self.c(x).chunk(2, dim=1)
        y = F.glu(a * torch.sigmoid(b), dim=1)
        return self.h(y.split([5, y.shape[2] - 5], dim=2)[1])


@pytest.mark.parametrize("make,expected", [
    (_Gated, ((3, 3), (1, 1), (-4, 1))),
    (_ConvNeXtLike, ((10, 10), (2, 2), (4, 4))),
    (_Separable1d, ((5, 3), (1, 1), (2, 0))),
])
def test_per_location_linear_and_conv1d(make, expected):
    torch.manual_seed(0)
    g = assert_inferred_matches_probe(make().double().eval(), (14, 17))
    assert (g.receptive_field, g.stride, g.padding) == expected


@pytest.mark.parametrize("name,kwargs,size", [
    pytest.param("cifar_bagnet9", dict(width=8), (32, 32), marks=pytest.mark.slow),
    ("cifar_bagnet7_s2", dict(width=8), (32, 30)),
    ("cifar_bagnet9_s2", dict(width=8, norm="nf"), (30, 32)),
    ("cifar_bagnet", dict(width=8, receptive_field=11, stride=4, padding="valid"), (33, 40)),
    pytest.param("cifar_bagnet13", dict(width=8, norm="skipinit"), (20, 24), marks=pytest.mark.slow),
    ("image_bagnet17_s8", dict(width=16), (40, 48)),
    pytest.param("bagnet17_w025", dict(width=0.03), (48, 56), marks=pytest.mark.slow),
    ("cifar_vit_p4_w8x1", dict(width=12, depth=1), (64, 36)),  # windowed attention: windows of 8x1 tokens
    ("resnet_bagnet", dict(keep=1, layer_strides=[1, 1, 1, 1]), (32, 28)),
])
def test_registry_models_infer_their_declared_geometry(name, kwargs, size):
    model = bagcert.create_model(name, num_classes=10, **kwargs).eval()
    status, inferred, msg = geometry_report(model.geometry, model, size)
    assert status == "equal", msg
    d = model.geometry
    assert (inferred.receptive_field, inferred.stride, inferred.padding) == (d.receptive_field, d.stride, d.padding)
    assert inferred.grid[1] == d.grid_size(*size)


def test_dense_model_infers_its_declared_geometry():
    model = to_dense(bagcert.create_model("cifar_bagnet5_s2", num_classes=10, width=8).eval())
    status, inferred, msg = geometry_report(model.geometry, model, (16, 20))
    assert status == "equal", msg
    assert inferred.stride == (1, 1) and inferred.receptive_field == (5, 5)


@pytest.mark.slow
@pytest.mark.parametrize("name", bagcert.list_models())
def test_every_registry_model_infers_its_declared_geometry(name):
    if name.startswith("bagnet"):
        kwargs = dict(width=0.03)
    elif "vit" in name:
        kwargs = dict(width=12, depth=1)
    elif name.startswith("resnet"):
        kwargs = {}
    else:
        kwargs = dict(width=8)
    model = bagcert.create_model(name, num_classes=10, **kwargs).eval()
    # at least two windows per axis for the ViTs (a single window row is not recognised as a window cut)
    size = (448, 448) if name.startswith("image_vit") else (64, 64) if "vit" in name or (
        "bagnet" in name and not name.startswith("cifar")) else (32, 32)
    status, inferred, msg = geometry_report(model.geometry, model, size)
    assert status == "equal", msg


# ----------------------------------------------------------------------------------------------------------------
# declarations: under-covering refused, over-covering warned, in certify and the peer paths
# ----------------------------------------------------------------------------------------------------------------
def _covers_by_probe(declared: Geometry, grid, rows, cols, has, size) -> bool:
    """Whether a declaration covers the brute-force dependency sets (and gives the right grid)."""
    H, W = size
    h, w = grid
    if declared.knows_grid(H, W) and declared.grid_size(H, W) != grid:
        return False
    for i in range(h):
        for j in range(w):
            if not has[i, j]:
                continue
            top, left, bottom, right = declared.pixel_box(i, j, size)
            if not (top <= rows[i, j, 0] and rows[i, j, 1] <= bottom and left <= cols[i, j, 0] and cols[i, j, 1] <= right):
                return False
    return True


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_declarations_refused_iff_they_do_not_cover(seed):
    net, size = sample_case(seed, allow_max=False)
    truth = infer_geometry(net, size)
    grid, rows, cols, has = brute_force_dependency(net, size)
    rng = random.Random(seed)
    x = torch.rand(2, 3, *size)
    declarations = [Geometry(truth.receptive_field, truth.stride, truth.padding)]
    for _ in range(12):
        rf = tuple(max(1, v + rng.randint(-2, 2)) for v in truth.receptive_field)
        pad = tuple(v + rng.randint(-1, 1) for v in truth.padding)
        declarations.append(Geometry(rf, truth.stride, pad))
    declarations.append(Geometry(truth.receptive_field, tuple(s + 1 for s in truth.stride), truth.padding))
    declarations.append(Geometry.from_layers([(1, 1, 0)]))  # a chain with the wrong grid
    declarations.append(Geometry(tuple(v + 2 for v in truth.receptive_field), truth.stride,
                                 tuple(v + 1 for v in truth.padding)))  # one pixel more on every side
    n_refused = n_warned = 0
    model = wrap_model(net.float(), mean=MEAN, std=STD, geometry=declarations[0]).eval()
    for d in declarations:
        covers = _covers_by_probe(d, grid, rows, cols, has, size)
        model.declared_geometry = model.geometry = d  # one model: inferred once, each declaration compared
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if covers:
                res = bagcert.certify(model, x, None, patch_size=3)
                assert res.num_samples == 2
            else:
                with pytest.raises(GeometryError, match="declared geometry"):
                    bagcert.certify(model, x, None, patch_size=3)
                n_refused += 1
        larger = any(d.pixel_box(i, j, size) != truth.pixel_box(i, j, size) for i in range(grid[0]) for j in range(grid[1]))
        warned = [c for c in caught if issubclass(c.category, GeometryWarning)]
        assert bool(warned) == (covers and larger), (d, covers, larger)
        n_warned += bool(warned)
    assert n_refused >= 3 and n_warned >= 1


def test_receptive_field_7_declared_as_1_is_refused():
    """Regression: a stride-2 network with a 7 px receptive field declared as 1 px got certificates a patch can break."""
    torch.manual_seed(0)

    class Declared(bagcert.BagModel):
        def __init__(self):
            super().__init__(10, MEAN, STD)
            self.body = nn.Sequential(nn.Conv2d(3, 16, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(16, 10, 1))
            self.geometry = Geometry.from_layers([(1, 2, 0)])  # wrong: the true window is 7 px

        def features_to_logits(self, x):
            return self.body(x)

    model = Declared().eval()
    x = torch.rand(3, 3, 32, 32)
    # the declaration is wrong in a way the old check (grid size only) could not see: the grids agree ...
    assert model.geometry.grid_size(32, 32) == tuple(model.local_logits(x).shape[-2:]) == (16, 16)
    # ... and a 1x1 patch at pixel (10, 10) changes location (4, 4), which the declared geometry says it cannot reach
    mask = model.geometry.affected_mask((32, 32), 1, 10, 10)
    assert not mask[4, 4]
    x2 = x.clone()
    x2[:, :, 10, 10] = 1 - x2[:, :, 10, 10]
    with torch.no_grad():
        assert not torch.allclose(model.local_logits(x)[:, :, 4, 4], model.local_logits(x2)[:, :, 4, 4])
    with pytest.raises(GeometryError, match=r"receptive field 1, stride 2, padding 0.*receptive field 7, stride 2, padding 3"):
        bagcert.certify(model, x, torch.zeros(3, dtype=torch.long), patch_size=1)
    for cert in (bagcert.ClippedBagNet(), bagcert.PatchGuardMasking(), bagcert.LocalDoubleMasking()):
        with pytest.raises(GeometryError):
            cert.certify(model, x, None, 1)
    for cert in (bagcert.PatchGuardMasking(), bagcert.LocalDoubleMasking()):
        with pytest.raises(GeometryError):
            cert.predict(model, x, 1)
    # the right declaration passes without a warning
    model.geometry = Geometry.from_layers([(7, 2, 3), (1, 1, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bagcert.certify(model, x, None, patch_size=1)


def test_certify_dataset_paths_check_the_geometry():
    from bagcert.data import Dataset
    from bagcert.evaluation import certify_dataset
    from bagcert.peers import certify_peer_dataset

    net = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    bad = wrap_model(net, mean=MEAN, std=STD, geometry=Geometry(3, 1, 1)).eval()
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    data = Dataset(images=images, labels=torch.zeros(4, dtype=torch.long), classes=["a", "b", "c"], name="synthetic")
    with pytest.raises(GeometryError):
        certify_dataset(bad, data, [3])
    for cert in (bagcert.PatchGuardMasking(), bagcert.LocalDoubleMasking()):
        with pytest.raises(GeometryError):
            certify_peer_dataset(cert, bad, data, [3])
    good = wrap_model(net, mean=MEAN, std=STD).eval()
    results, _ = certify_dataset(good, data, [3])
    assert results["3"].num_samples == 4


def test_registry_models_are_trusted_until_changed():
    model = bagcert.create_model("cifar_bagnet5", num_classes=10, width=8).eval()
    x = torch.rand(2, 3, 20, 20)
    bagcert.certify(model, x, None, patch_size=2)  # trusted: no trace needed, and the geometry is right anyway
    model.head = nn.Conv2d(8, 10, 3, padding=1)  # the head now widens every window by 2 px
    with pytest.raises(GeometryError, match="receptive field 5.*receptive field 7"):
        bagcert.certify(model, x, None, patch_size=2)


def test_cache_follows_module_changes():
    clear_cache()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 1)).eval()
    model = wrap_model(net, mean=MEAN, std=STD, geometry=Geometry(3, 1, 1)).eval()
    assert verify_geometry(model, (12, 12)) == Geometry(3, 1, 1)
    net[1] = nn.Conv2d(4, 3, 3, padding=1)  # replaced layer: the cached verdict must not be reused
    with pytest.raises(GeometryError, match="does not cover"):
        verify_geometry(model, (12, 12))
    net[0].dilation = (2, 2)  # a setting changed in place (extra_repr changes)
    net[0].padding = (2, 2)
    net[1] = nn.Conv2d(4, 3, 1)
    with pytest.raises(GeometryError):
        verify_geometry(model, (12, 12))
    model.declared_geometry = model.geometry = Geometry(5, 1, 2)
    assert verify_geometry(model, (12, 12)) == Geometry(5, 1, 2)


def _add_image_max(module, inputs, output):
    """A forward hook that adds the brightest value anywhere in the map to every location (a global dependency)."""
    return output + output.amax(dim=(1, 2, 3), keepdim=True)


def test_hooks_added_after_a_verdict_are_checked_again():
    """Regression: a forward hook registered after the first certify was not seen by the cached verdict, and a
    1x1 patch broke the certificates given with the declared 1x1 geometry."""
    clear_cache()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    model = wrap_model(net, mean=MEAN, std=STD, geometry=Geometry(1, 1, 0)).eval()
    x = torch.rand(2, 3, 12, 12)
    bagcert.certify(model, x, None, patch_size=1)
    handle = net[0].register_forward_hook(_add_image_max)
    with pytest.raises(GeometryError):
        bagcert.certify(model, x, None, patch_size=1)
    handle.remove()
    bagcert.certify(model, x, None, patch_size=1)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: _add_image_max(m, i, o) if m is net[2] else None)
    try:
        with pytest.raises(GeometryError):
            bagcert.certify(model, x, None, patch_size=1)
    finally:
        handle.remove()
    # a registry model with a hook is no longer trusted: its geometry is inferred and the hook refused
    reg = bagcert.create_model("cifar_bagnet5", num_classes=10, width=8).eval()
    bagcert.certify(reg, x, None, patch_size=1)
    reg.head.register_forward_hook(_add_image_max)
    with pytest.raises(GeometryError):
        bagcert.certify(reg, x, None, patch_size=1)


def test_values_read_out_of_torch_are_refused():
    """Regression: a term computed in numpy from the brightest pixel came back into the trace as a constant, so a
    model declared (and traced) as 1x1 was certified although one bright pixel anywhere flips its prediction."""
    import numpy as np

    class NumpyGlobal(bagcert.BagModel):
        def __init__(self, read):
            super().__init__(3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
            self.conv = nn.Conv2d(3, 3, 1)
            self.read = read
            self.geometry = Geometry(1, 1, 0)

        def features_to_logits(self, x):
            y = self.conv(x)
            g = self.read(y.detach())
            return y + torch.tensor([3.0, -3.0, 0.0]).view(1, 3, 1, 1) * g

    reads = {"np.asarray": lambda t: float(np.asarray(t).max()), "numpy": lambda t: float(t.numpy().max()),
             "tolist": lambda t: max(t.flatten().tolist())}
    for name, read in reads.items():
        model = NumpyGlobal(read).eval()
        with pytest.raises(GeometryError, match="reads tensor values out of torch"):
            bagcert.certify(model, torch.rand(1, 3, 8, 8), None, patch_size=1)


# ----------------------------------------------------------------------------------------------------------------
# refusals, with the reason
# ----------------------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.a = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.c(x)
        B, C, H, W = y.shape
        t = y.flatten(2).transpose(1, 2)
        o, _ = self.a(t, t, t)
        return o.transpose(1, 2).reshape(B, C, H, W)


class _CentreMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.c(x)
        return y - y.mean(dim=(2, 3), keepdim=True)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.c(x)
        return y if y.sum() > 0 else -y


class _Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        return F.interpolate(self.c(x), scale_factor=2.0, mode="bilinear")


@pytest.mark.parametrize("make,reason", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)).eval(), "global average pooling|adaptive"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2)).eval(), "adaptive"),
    (lambda: _CentreMean().eval(), "whole image"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 16, 4)).eval(), "flatten"),
    (lambda: _Attention().eval(), "attention"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), "BatchNorm in training mode"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")).eval(), "circular"),
    (lambda: _Upsample().eval(), "interpolation"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)).eval(), "GroupNorm"),
    (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2)).eval(), "transposed"),
    (lambda: _Branchy().eval(), "control flow"),
])
def test_refusals_name_the_reason(make, reason):
    with pytest.raises(GeometryError, match=reason):
        infer_geometry(make(), (16, 18))


def test_tracing_leaves_the_module_unchanged():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(GeometryError, match="training mode"):
        infer_geometry(net, (12, 12))  # in training mode: refused, and no batch counted
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training
    infer_geometry(net.eval(), (12, 12))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_functional_circular_pad_is_refused():
    class Circ(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(F.pad(x, (1, 1, 1, 1), mode="circular"))

    with pytest.raises(GeometryError, match="circular|opposite border"):
        infer_geometry(Circ().eval(), (12, 12))


def test_constant_maps_accept_any_declaration():
    """A map that does not depend on the image cannot be changed by a patch: any declared geometry is sound."""
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("z", torch.randn(16, 3, 5, 5))
            self.geometry = Geometry(1, 1, 0)

        def local_logits(self, x):
            return self.z[: x.shape[0]]

    model = Fixed().eval()
    assert bagcert.certify(model, torch.rand(2, 3, 5, 5), None, patch_size=2).num_samples == 2
    with pytest.raises(GeometryError, match="does not depend on the image"):
        infer_geometry(model, (5, 5))
    model.geometry = Geometry.from_layers([(3, 1, 0)])  # a 3x3 grid: refused for the grid size alone
    with pytest.raises(GeometryError, match="3x3 grid"):
        bagcert.certify(model, torch.rand(2, 3, 5, 5), None, patch_size=2)


def test_wrap_model_refuses_what_it_cannot_verify():
    gap = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)).eval()
    with pytest.raises(GeometryError, match="adaptive|global"):
        wrap_model(gap, mean=MEAN, std=STD, image_size=(16, 16))
    model = wrap_model(gap, mean=MEAN, std=STD).eval()  # lazily: refused at the first use
    with pytest.raises(GeometryError):
        bagcert.certify(model, torch.rand(1, 3, 16, 16), None, patch_size=2)
    with pytest.raises(ValueError, match="mean must be 3"):
        wrap_model(gap, mean=(0.5, 0.5), std=STD)
    with pytest.raises(ValueError, match="std must be positive"):
        wrap_model(gap, mean=MEAN, std=(1, 0, 1))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        wrap_model(lambda x: x, mean=MEAN, std=STD)


# ----------------------------------------------------------------------------------------------------------------
# wrap_model and Geometry construction
# ----------------------------------------------------------------------------------------------------------------
def test_wrap_model_infers_and_certifies_like_certify_logits():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(8, 8, (3, 1), padding=(1, 0)),
                        nn.ReLU(), nn.Conv2d(8, 5, 1)).eval()
    model = wrap_model(net, mean=MEAN, std=STD, image_size=(24, 20))
    assert model.num_classes == 5 and not model.training
    g = model.geometry
    assert (g.receptive_field, g.stride, g.padding, g.grid) == ((9, 5), (2, 2), (4, 2), ((24, 20), (12, 10)))
    x, y = torch.rand(3, 3, 24, 20), torch.tensor([0, 1, 2])
    res = bagcert.certify(model, x, y, patch_sizes=[1, (2, 3)])
    with torch.no_grad():
        z = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    ref = bagcert.certify_logits(z, y, Geometry(g.receptive_field, g.stride, g.padding), (24, 20), patch_sizes=[1, (2, 3)])
    for k in res:
        assert torch.equal(res[k].certified, ref[k].certified) and torch.equal(res[k].margin, ref[k].margin)
    assert torch.equal(model(x), bagcert.get_aggregation("votes").class_scores(z))
    # another image size: inferred again for it
    bagcert.certify(model, torch.rand(1, 3, 17, 31), None, patch_size=2)
    assert model.geometry.grid == ((17, 31), (9, 16))


def test_geometry_construction():
    g = Geometry(7, 2, 3)  # ints are both axes; no chain: the grid comes from the logit map
    assert g.receptive_field == (7, 7) and not g.knows_grid(32, 32)
    with pytest.raises(ValueError, match="no layer chain"):
        g.grid_size(32, 32)
    z = torch.randn(2, 3, 16, 16)
    res = bagcert.certify_logits(z, None, g, (32, 32), patch_size=3)
    ref = bagcert.certify_logits(z, None, Geometry.from_layers([(7, 2, 3)]), (32, 32), patch_size=3)
    assert torch.equal(res.margin, ref.margin)
    assert g.at_grid((32, 32), (16, 16)).grid_size(32, 32) == (16, 16)
    # per-axis chains
    r = Geometry.from_layers([((1, 7), 1, (0, 3)), ((7, 1), 2, (3, 0)), (3, (1, 2), 1)])
    assert r.receptive_field == (11, 11) and r.stride == (2, 4) and r.padding == (5, 5)
    assert r.grid_size(20, 21) == (10, 6)
    sq = Geometry.from_layers([(3, 1, 1), (3, 2, 1)])
    assert sq.layers == ((3, 1, 1), (3, 2, 1)) and sq.receptive_field == (5, 5)  # square chains stored as before
    with pytest.raises(ValueError, match="stride must be >= 1"):
        Geometry(3, 0, 1)
    with pytest.raises(TypeError):
        Geometry((3, 4, 5), 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints of wrapped (plugin) models record their geometry, checked again on loading
# ----------------------------------------------------------------------------------------------------------------
def _wrapped_factory(num_classes=3, dilation=1):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=dilation, dilation=dilation), nn.ReLU(), nn.Conv2d(8, num_classes, 1))
    return wrap_model(net, mean=MEAN, std=STD, num_classes=num_classes)


def test_wrapped_checkpoint_records_and_rechecks_geometry(tmp_path, monkeypatch):
    from bagcert.models import _REGISTRY

    with pytest.raises(ValueError, match="registry name"):
        bagcert.save_checkpoint(tmp_path / "x.pt", _wrapped_factory())
    monkeypatch.setitem(_REGISTRY, "test_wrapped_net", (_wrapped_factory, {}, ""))
    model = bagcert.create_model("test_wrapped_net")
    bagcert.save_checkpoint(tmp_path / "m.pt", model, input_size=16)
    record = torch.load(tmp_path / "m.pt", weights_only=True)["geometry"]
    assert record == {"image_size": [16, 16], "grid": [16, 16], "receptive_field": [3, 3], "stride": [1, 1],
                      "padding": [1, 1]}
    loaded, _ = bagcert.load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.local_logits(x), model.eval().local_logits(x))
    # the factory's code changed since saving (same weight shapes, wider window): refused on loading
    monkeypatch.setitem(_REGISTRY, "test_wrapped_net", (lambda num_classes=3: _wrapped_factory(num_classes, 2), {}, ""))
    with pytest.raises(bagcert.CheckpointError, match=r"receptive field \[5, 5\].*recorded receptive field \[3, 3\]"):
        bagcert.load_checkpoint(tmp_path / "m.pt")
    # built-in registry models record nothing extra
    bagcert.save_checkpoint(tmp_path / "r.pt", bagcert.create_model("cifar_bagnet5", width=8), input_size=32)
    assert "geometry" not in torch.load(tmp_path / "r.pt", weights_only=True)


class _WrongDeclared(bagcert.BagModel):
    """A plugin-style BagModel whose declared geometry (1 px) misses its 3x3 convolution."""

    def __init__(self, num_classes=3):
        super().__init__(num_classes, MEAN, STD)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)
        self.geometry = Geometry.from_layers([(1, 1, 0)])

    def features_to_logits(self, x):
        return self.conv(x)


def test_checkpoint_of_a_wrong_declaration_is_refused(tmp_path, monkeypatch):
    from bagcert.models import _REGISTRY

    monkeypatch.setitem(_REGISTRY, "test_wrong_declared", (_WrongDeclared, {}, ""))
    with pytest.raises(GeometryError, match="does not cover"):
        bagcert.save_checkpoint(tmp_path / "w.pt", bagcert.create_model("test_wrong_declared"), input_size=16)
    assert not (tmp_path / "w.pt").exists()
