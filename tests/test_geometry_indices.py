"""Geometry inference follows values that carry no gradient: the indices of max / sort / topk / pooling and
thresholded values. The input-gradient cross-check cannot see these dependencies, so the structural analysis
must; each case is checked against a finite-perturbation probe (change one pixel, see which locations move)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bagcert
from bagcert import GeometryError, infer_geometry

SIZE = (10, 10)


class Net(nn.Module):
    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)
        self.f = f

    def forward(self, x):
        return self.f(self, x)


def perturbation_escapes(net, geometry, image_size, n_images: int = 2):
    """(location, pixel) pairs where changing the pixel changes the location's logits outside its box."""
    H, W = image_size
    gen = torch.Generator().manual_seed(1)
    bad = []
    for _ in range(n_images):
        x = torch.rand(1, 3, H, W, generator=gen)
        x2 = x.repeat(H * W, 1, 1, 1)  # item r*W + c: pixel (r, c) replaced
        for r in range(H):
            for c in range(W):
                x2[r * W + c, :, r, c] = torch.rand(3, generator=gen) * 4 - 2
        with torch.no_grad():
            moved = (net(x2) - net(x)).abs().amax(1) > 1e-4  # [H*W, h, w] (above rounding of batched kernels)
        for k, i, j in torch.nonzero(moved).tolist():
            r, c = divmod(k, W)
            top, left, bottom, right = geometry.pixel_box(i, j, image_size)
            if not (top <= r <= bottom and left <= c <= right):
                bad.append(((i, j), (r, c)))
    return bad


WIDE = 5  # a 5x5 window whose argmax / order feeds the output through indices only


@pytest.mark.parametrize("name, f", [
    ("max indices", lambda s, x: s.conv(x) + F.avg_pool2d(x, WIDE, 1, 2).max(1, keepdim=True).indices.float()),
    ("max values thresholded", lambda s, x: s.conv(x) + (F.avg_pool2d(x, WIDE, 1, 2).max(1, keepdim=True).values
                                                         > 0.5).float()),
    ("max_pool indices", lambda s, x: s.conv(x) + F.max_pool2d(x, WIDE, 1, 2, return_indices=True)[1].float() * 0.01),
    ("cummax indices", lambda s, x: s.conv(x) + F.avg_pool2d(x, WIDE, 1, 2).cummax(1).indices.float()),
    ("median indices", lambda s, x: s.conv(x) + F.avg_pool2d(x, WIDE, 1, 2).median(1, keepdim=True).indices.float()),
    ("sort indices", lambda s, x: s.conv(x) + F.avg_pool2d(x, WIDE, 1, 2).sort(1).indices.float()),
    ("topk over channels", lambda s, x: s.conv(x) + F.avg_pool2d(x, WIDE, 1, 2).topk(2, 1).indices.float().sum(1, True)),
])
def test_indices_carry_the_dependency(name, f):
    net = Net(f).eval()
    g = infer_geometry(net, SIZE)
    assert g.receptive_field == (WIDE, WIDE), (name, g)
    assert perturbation_escapes(net, g, SIZE) == [], name


@pytest.mark.parametrize("name, f", [
    # topk's second argument is k, not a dim: the default dim is the last (the image columns)
    ("topk default dim", lambda s, x: s.conv(x) + (x.topk(1).values > 0.5).float()),
    ("topk k=1 along columns", lambda s, x: s.conv(x) * x.topk(1, dim=3).values),
    ("kthvalue along columns", lambda s, x: s.conv(x) + (x.kthvalue(1, 3, True).values > 0.3).float()),
    ("sort default dim", lambda s, x: s.conv(x) + x.sort().indices.float()),
])
def test_reductions_over_the_image_are_refused(name, f):
    net = Net(f).eval()
    with pytest.raises(GeometryError, match="reduction over the image"):
        infer_geometry(net, SIZE, check=False)


def test_layer_norm_statistics_are_not_followed():
    def f(s, x):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x.permute(0, 2, 3, 1), [3], None, None, 1e-5)
        return s.conv(x) + mean.permute(0, 3, 1, 2)

    with pytest.raises(GeometryError, match="auxiliary output"):
        infer_geometry(Net(f).eval(), SIZE, check=False)


class BatchOfOne(nn.Module):
    """A batch of one image takes another code path (``if x.shape[0] == 1``): a 5x5 window instead of 1x1."""

    def __init__(self, refused_path: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.refused_path = refused_path

    def forward(self, x):
        y = self.conv(x)
        if x.shape[0] == 1:
            if self.refused_path:
                return y + x.mean((1, 2, 3)).view(-1, 1, 1, 1)  # global: every location sees the whole image
            return F.avg_pool2d(y, 5, 1, 2)
        return y


@pytest.mark.parametrize("refused_path, match", [(True, "batch of one image"), (False, "batch of one image")])
def test_batch_size_branches_are_refused(refused_path, match):
    from bagcert import certify, wrap_model

    net = BatchOfOne(refused_path).eval()
    with pytest.raises(GeometryError, match=match):
        infer_geometry(net, SIZE)
    model = wrap_model(net, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(GeometryError, match=match):  # certify runs the single image it is given
        certify(model, torch.rand(1, 3, *SIZE), torch.tensor([0]), patch_size=2)


def test_a_submodule_in_training_mode_is_refused():
    from bagcert import certify, wrap_model

    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Dropout(0.5)).eval()
    model = wrap_model(net, mean=(0.5,) * 3, std=(0.25,) * 3)
    x, y = torch.rand(2, 3, *SIZE), torch.tensor([0, 1])
    assert certify(model, x, y, patch_size=2).certified.shape == (2,)
    net[1].train()  # dropout draws a new mask per pass: the certified prediction is not the one a patch meets
    assert not model.training
    with pytest.raises(RuntimeError, match="submodules\\) is in training mode"):
        certify(model, x, y, patch_size=2)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, padding="same")
        self.wide = False

    def forward(self, x):
        y = self.conv(x)
        return F.avg_pool2d(y, 7, 1, 3) if self.wide else y


@pytest.mark.parametrize("change", ["flag", "same-padding weight"])
def test_changes_after_a_check_are_checked_again(change):
    """The verdict cache watches plain attributes that forward branches on and the shapes of the weights."""
    from bagcert import Geometry, certify, wrap_model

    net = Flagged().eval()
    model = wrap_model(net, mean=(0.5,) * 3, std=(0.25,) * 3, geometry=Geometry(1, 1, 0))
    x, y = torch.rand(2, 3, *SIZE), torch.tensor([0, 1])
    certify(model, x, y, patch_size=2)  # true: 1x1, cached
    if change == "flag":
        net.wide = True  # now 7x7
    else:
        net.conv.weight = nn.Parameter(torch.randn(2, 3, 5, 5))  # padding='same' keeps the grid: now 5x5
    with pytest.raises(GeometryError, match="does not cover"):
        certify(model, x, y, patch_size=2)


class GradModeBranch(nn.Module):
    """Without autograd (as the certifiers run it) every location also sees the whole image's mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if not torch.is_grad_enabled():
            y = y + (x.mean((1, 2, 3)).view(-1, 1, 1, 1) > 0.5).float()
        return y


def test_the_trace_follows_the_no_grad_path_the_certifiers_run():
    from bagcert import wrap_model

    with torch.enable_grad():  # the caller's grad mode does not choose the traced path
        with pytest.raises(GeometryError, match="global average pooling"):
            infer_geometry(GradModeBranch().eval(), SIZE)
        with pytest.raises(GeometryError, match="global average pooling"):
            wrap_model(GradModeBranch().eval(), mean=(0.5,) * 3, std=(0.25,) * 3, image_size=SIZE)


def test_a_branch_on_the_batch_size_certify_evaluates_at_is_refused():
    """certify runs a user model in fixed chunks (bagcert.inference.chunk_size): a forward that goes global at
    exactly that batch size is traced there too and refused, not certified with its small-window geometry."""
    from bagcert.inference import chunk_size

    class Sneaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.chunk = None

        def forward(self, x):
            z = self.conv(x)
            if x.shape[0] == self.chunk:  # global at the chunk size only
                z = z + z.mean(dim=(2, 3), keepdim=True)
            return z

    net = Sneaky().eval()
    model = bagcert.wrap_model(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    net.chunk = chunk_size(model, (16, 16))
    assert net.chunk not in (1, 2)
    with pytest.raises(bagcert.GeometryError, match="batch"):
        bagcert.certify(model, torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2]), patch_size=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_sizes": (-1,)}, "batch_sizes must be"),
    ({"batch_sizes": "ab"}, "batch_sizes must be"),
])
def test_infer_geometry_refuses_bad_batch_sizes(kwargs, match):
    net = nn.Conv2d(3, 4, 3, padding=1).eval()
    with pytest.raises(ValueError, match=match):
        infer_geometry(net, (8, 8), **kwargs)


def test_infer_geometry_refuses_an_image_size_no_memory_holds_in_one_line():
    net = nn.Conv2d(3, 4, 3, padding=1).eval()
    with pytest.raises(ValueError, match="too large to analyse on this machine") as e:
        infer_geometry(net, (10**6, 10**6))
    assert "\n" not in str(e.value)
