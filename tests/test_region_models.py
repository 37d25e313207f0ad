"""Standard backbones as region scorers: torchvision ResNets converted by the BagNet recipe (resnet_to_bagnet) and
the PatchCURE-style windowed ViT. Geometry is probed with autograd (the pixels a location's logits depend on lie in
its box; with positive weights and no max-pool the box is tight) and by perturbing pixels outside the box."""

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv

import bagcert
from bagcert.data import load_cifar10
from bagcert.models import RegionResNet, WindowViT, resnet_receptive_fields, resnet_to_bagnet
from bagcert.models.base import IMAGENET_MEAN, IMAGENET_STD
from conftest import ROOT

NORM = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _randomise_bn(net):
    for m in net.modules():  # non-trivial BN statistics, so that eval-mode BN is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


class _TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1..4 of torchvision blocks, avgpool, fc) at a
    few channels, so that geometry probes run in milliseconds."""

    def __init__(self, block, widths=(8, 8, 16, 16), strides=(1, 2, 2, 2), stem="imagenet", dilation=(1, 1, 1, 1)):
        super().__init__()
        torch.manual_seed(0)
        c0 = 8
        if stem == "imagenet":
            self.conv1, self.maxpool = nn.Conv2d(3, c0, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1, self.maxpool = nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.Identity()
        self.bn1, self.relu = nn.BatchNorm2d(c0), nn.ReLU(inplace=True)
        inplanes = c0
        for i, (w, s, d) in enumerate(zip(widths, strides, dilation)):
            out = w * block.expansion
            down = None
            if s != 1 or inplanes != out:
                down = nn.Sequential(nn.Conv2d(inplanes, out, 1, s, bias=False), nn.BatchNorm2d(out))
            extra = {"dilation": d} if d > 1 else {}
            setattr(self, f"layer{i + 1}", nn.Sequential(block(inplanes, w, s, down, **extra), block(out, w, **extra)))
            inplanes = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, 5)
        _randomise_bn(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _positive(model):
    """Every weight positive and averaging (|w| / fan-in): every ReLU passes, nothing overflows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(m.weight.abs() / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.bias.data.zero_()
                m.weight.data.abs_()
    return model


def _dependency_boxes(model, size, locations):
    """For each location (i, j): the bounding box (top, left, bottom, right) of the input pixels with a nonzero
    gradient of that location's logit sum (None if none), and the boolean mask of those pixels. One backward
    pass: each location gets its own copy of the image (eval mode: batch entries are independent)."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, *size).repeat(len(locations), 1, 1, 1).requires_grad_(True)
    z = model.features_to_logits(x)
    total = sum(z[n, :, i, j].sum() for n, (i, j) in enumerate(locations))
    (grad,) = torch.autograd.grad(total, x)
    out = []
    for n in range(len(locations)):
        mask = grad[n].abs().sum(0) > 0
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = None if len(rows) == 0 else (int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1]))
        out.append((box, mask))
    return out


def _check_geometry(model, size, tight):
    gh, gw = model.grid_size(*size)
    z = model.features_to_logits(torch.rand(1, 3, *size))
    assert tuple(z.shape[2:]) == (gh, gw)
    locations = sorted({(0, 0), (gh // 2, gw // 2), (gh - 1, gw - 1), (0, gw - 1)})
    for (i, j), (box, mask) in zip(locations, _dependency_boxes(model, size, locations)):
        t, l, b, r = model.geometry.pixel_box(i, j, size)
        inside = torch.zeros_like(mask)
        inside[t : b + 1, l : r + 1] = True
        assert not (mask & ~inside).any(), f"location {(i, j)} depends on pixels outside its box {(t, l, b, r)}"
        if tight:
            assert box == (t, l, b, r), f"location {(i, j)}: dependency box {box}, geometry box {(t, l, b, r)}"


RESNET_CASES = [
    # (source, conversion kwargs, image size (H, W), max-pool kept)
    (lambda: _TinyResNet(tv.BasicBlock), dict(keep=1), (48, 72), True),
    (lambda: _TinyResNet(tv.BasicBlock), dict(keep=3, maxpool=False, layer_strides=(1, 2, 2, 1)), (32, 40), False),
    (lambda: _TinyResNet(tv.Bottleneck), dict(keep=2, maxpool=False, layer_strides=(1, 1, 2, 1)), (22, 18), False),
    (lambda: _TinyResNet(tv.BasicBlock, stem="cifar"), dict(keep=5, layer_strides=(1, 2, 1, 1)), (14, 20), False),
    (lambda: _TinyResNet(tv.Bottleneck, strides=(1, 2, 1, 1), dilation=(1, 1, 2, 4)), dict(keep=6, maxpool=False), (30, 26), False),
]


@pytest.mark.parametrize("case", range(len(RESNET_CASES)))
def test_resnet_geometry_contains_every_dependency_and_is_tight(case):
    make, kwargs, size, has_pool = RESNET_CASES[case]
    src = make()
    model = resnet_to_bagnet(src, num_classes=5, **NORM, **kwargs)
    assert isinstance(model, RegionResNet) and not model.training
    _check_geometry(model, size, tight=False)  # random weights, eval-mode BN: some ReLUs off
    # positive weights: every path is open; the box is then exactly the dependency region (the max-pool routes the
    # gradient through one element per window, so only the superset is checked with it)
    _check_geometry(_positive(model), size, tight=not has_pool)
    # the receptive-field table (computed from the source's layers) agrees with the built model
    table = resnet_receptive_fields(src, maxpool=kwargs.get("maxpool", True), layer_strides=kwargs.get("layer_strides"))
    keep = model.conversion["keep"]
    assert table[keep] == {"keep": keep, **model.geometry.to_dict()}
    assert model.conversion["receptive_field"] == list(model.geometry.receptive_field)


def test_resnet18_receptive_fields_follow_the_layer_chain():
    src = tv.resnet18(weights=None)
    rfs = [d["receptive_field"][0] for d in resnet_receptive_fields(src)]
    # stem 7x7/2 + max-pool 3x3/2: 11 at stride 4; each 3x3 of layer1 adds 2 * 4; layer2's first (stride 2) too
    assert rfs[:6] == [11, 19, 27, 35, 43, 51] and len(rfs) == 17
    m = resnet_to_bagnet(src, num_classes=1000, **NORM, keep=1)
    assert m.geometry.receptive_field == (19, 19) and m.geometry.stride == (32, 32) and m.geometry.padding == (9, 9)
    m = resnet_to_bagnet(src, num_classes=1000, **NORM, keep=2, maxpool=False, layer_strides=(1, 2, 2, 1))
    assert m.geometry.receptive_field == (15, 15) and m.geometry.stride == (8, 8)


def test_kept_weights_equal_the_source_and_converted_ones_are_centre_taps():
    src = tv.resnet18(weights=None).eval()
    model = resnet_to_bagnet(src, num_classes=1000, **NORM, keep=3)
    assert model.conversion["kept"] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert len(model.conversion["converted"]) == 13 and model.conversion["head"] == "reused"
    theirs = src.state_dict()
    ours = model.state_dict()
    assert set(ours) - {"mean", "std"} == set(theirs)
    for key, value in ours.items():
        if key in ("mean", "std"):
            continue
        name = key.rsplit(".", 1)[0]
        if name in model.conversion["converted"]:
            assert value.shape[-2:] == (1, 1) and torch.equal(value, theirs[key][:, :, 1:2, 1:2]), key
        elif key == "fc.weight":
            assert torch.equal(value, theirs[key][:, :, None, None])
        else:
            assert torch.equal(value, theirs[key]), key
    # the source is untouched
    assert src.layer1[1].conv2.kernel_size == (3, 3) and src.layer2[0].conv1.stride == (2, 2)


def test_fc_head_is_fc_applied_per_location_and_keep_all_pools_to_the_source():
    src = _TinyResNet(tv.BasicBlock)
    x = torch.rand(2, 3, 64, 96)
    xn = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model = resnet_to_bagnet(src, num_classes=5, **NORM, keep=2, layer_strides=(1, 1, 2, 1))
    with torch.no_grad():
        feats = model.features(xn)
        per_location = torch.einsum("bfhw,cf->bchw", feats, src.fc.weight) + src.fc.bias.view(1, -1, 1, 1)
        assert torch.allclose(model.local_logits(x), per_location, atol=1e-5)
        # nothing converted, strides and pool unchanged: the mean of the local logits is the ResNet's output
        full = resnet_to_bagnet(src, num_classes=5, **NORM, keep="all")
        assert full.conversion["converted"] == []
        assert torch.allclose(full.mean_logits(x), src(xn), atol=1e-5)
    other = resnet_to_bagnet(src, num_classes=3, **NORM, keep=0)
    assert other.conversion["head"] == "new" and other.fc.weight.shape == (3, 16, 1, 1)


def test_conversion_refuses_what_the_box_model_cannot_express():
    src = _TinyResNet(tv.BasicBlock)
    with pytest.raises(ValueError, match="layer_strides\\[0\\].*stay the source's \\(1\\) or become 1"):
        resnet_to_bagnet(src, num_classes=5, **NORM, layer_strides=(2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"keep must be an int in \[0, 16\]"):
        resnet_to_bagnet(src, num_classes=5, **NORM, keep=17)
    with pytest.raises(ValueError, match="mean must be 3 finite numbers"):
        resnet_to_bagnet(src, num_classes=5, mean=(0.5,), std=IMAGENET_STD)
    gn = _TinyResNet(tv.BasicBlock)
    gn.layer2[1].bn2 = nn.GroupNorm(8, 16)
    with pytest.raises(ValueError, match="GroupNorm is not supported"):
        resnet_to_bagnet(gn, num_classes=5, **NORM)
    circ = _TinyResNet(tv.BasicBlock)
    circ.layer1[0].conv1.padding_mode = "circular"
    with pytest.raises(ValueError, match="padding_mode 'circular'"):
        resnet_to_bagnet(circ, num_classes=5, **NORM)
    with pytest.raises(ValueError, match="expected a torchvision ResNet"):
        resnet_to_bagnet(nn.Sequential(nn.Conv2d(3, 8, 3)), num_classes=5, **NORM)


def test_registry_rebuilds_a_converted_standard_resnet(tmp_path):
    src = tv.resnet18(weights=None, num_classes=10)
    src.conv1, src.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()  # the usual CIFAR stem
    src.eval()
    model = resnet_to_bagnet(src, num_classes=10, **NORM, keep=2, layer_strides=(1, 1, 2, 2))
    assert model.config["name"] == "resnet_bagnet" and model.config["kwargs"]["stem"] == "cifar"
    bagcert.save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = bagcert.load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.local_logits(x), model.local_logits(x))
    assert loaded.geometry == model.geometry
    # a non-standard ResNet converts, but has no registry config (save its state_dict instead)
    assert resnet_to_bagnet(_TinyResNet(tv.BasicBlock), num_classes=5, **NORM).config == {}


VIT_CASES = [
    dict(patch_size=2, window=2),
    dict(patch_size=4, window=[8, 1]),
    dict(patch_size=3, window=(2, 3)),
    dict(patch_size=4, window=1),
]


@pytest.mark.parametrize("kwargs", VIT_CASES)
def test_vit_geometry_is_the_window_box(kwargs):
    torch.manual_seed(0)
    model = WindowViT(num_classes=4, width=16, depth=2, heads=2, **kwargs).eval()
    p = kwargs["patch_size"]
    wh, ww = model.window
    assert model.geometry.receptive_field == (wh * p, ww * p) == model.geometry.stride
    assert model.geometry.padding == (0, 0)
    size = (3 * wh * p - 1, 3 * ww * p + ww * p // 2)  # rectangular, with pixels beyond the last full window
    assert model.grid_size(*size) == (2, 3)
    _check_geometry(model, size, tight=True)
    _check_geometry(_positive(model), size, tight=True)


def test_vit_logits_ignore_pixels_outside_the_window():
    torch.manual_seed(0)
    model = WindowViT(num_classes=3, patch_size=2, window=(2, 3), width=16, depth=2, heads=4).eval()
    size = (21, 26)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        z = model.local_logits(x)
        gh, gw = z.shape[2:]
        for i, j in [(0, 0), (gh - 1, gw - 1), (1, 2)]:
            t, l, b, r = model.geometry.pixel_box(i, j, size)
            y = torch.rand(1, 3, *size)  # every pixel redrawn ...
            y[:, :, t : b + 1, l : r + 1] = x[:, :, t : b + 1, l : r + 1]  # ... except the box's
            zy = model.local_logits(y)
            assert torch.allclose(zy[:, :, i, j], z[:, :, i, j], atol=1e-6, rtol=0)
            assert not torch.allclose(zy, z)  # the other windows did change
            y = x.clone()
            y[:, :, t, l] = 1 - y[:, :, t, l]  # one pixel inside the box changes the location
            assert not torch.allclose(model.local_logits(y)[:, :, i, j], z[:, :, i, j])


def test_registry_lists_the_vit_and_both_families_certify_samples(tmp_path):
    names = bagcert.list_models("vit")
    assert {"cifar_vit", "cifar_vit_p2_w2", "cifar_vit_p4_w2", "cifar_vit_p4_w8x1"} <= set(names)
    data = load_cifar10(ROOT / "samples" / "cifar10")
    x, y = data.images[:8].float() / 255, data.labels[:8]
    torch.manual_seed(0)
    vit = bagcert.create_model("cifar_vit_p4_w8x1", width=16, depth=1).eval()
    assert vit.grid_size(32, 32) == (1, 8)
    res = bagcert.create_model("resnet_bagnet", keep=1, layer_strides=[1, 1, 1, 1]).eval()
    assert res.grid_size(32, 32) == (8, 8)
    for model in (vit, res):
        out = bagcert.certify(model, x, y, patch_sizes=[1, 5])
        for r in out.values():
            assert r.prediction.shape == (8,) and not (r.certified & ~r.correct).any()
        assert torch.equal(out[1].prediction, out[5].prediction)
        assert not (out[5].certified & ~out[1].certified).any()  # a larger patch never certifies more
    bagcert.save_checkpoint(tmp_path / "vit.pt", vit)
    loaded, _ = bagcert.load_checkpoint(tmp_path / "vit.pt")
    with torch.no_grad():
        assert torch.equal(loaded.local_logits(x), vit.local_logits(x))


def test_train_runs_a_few_steps_of_the_vit(tmp_path):
    from bagcert.data import synthetic_dataset
    from bagcert.training import TrainConfig, train

    cfg = TrainConfig(dataset="synthetic", model="cifar_vit_p4_w2", model_kwargs={"width": 8, "depth": 1}, epochs=1,
                      batch_size=8, max_steps=2, output=str(tmp_path / "run"), tensorboard=False, progress=False,
                      eval_patch_sizes=[5], checkpoint_minutes=0.0, threads=1)
    summary = train(cfg, synthetic_dataset(16, seed=1), synthetic_dataset(8, seed=2), log=lambda *a: None)
    assert summary["steps"] == 2
    model, _ = bagcert.load_checkpoint(tmp_path / "run" / "model.pt")
    assert isinstance(model, WindowViT) and model.config["name"] == "cifar_vit_p4_w2"


def test_vit_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of heads"):
        WindowViT(width=10, heads=4)
    with pytest.raises(ValueError, match="window must be"):
        WindowViT(window=(2, 0))
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        WindowViT(patch_size=0)


@pytest.mark.parametrize("index", range(2))
def test_backbones_doc_examples_run_as_pasted(index, tmp_path, monkeypatch, one_thread):
    from test_readme import python_blocks, resolve_repo_paths

    blocks = python_blocks((ROOT / "docs" / "backbones.md").read_text(encoding="utf-8"))
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    exec(compile(resolve_repo_paths(blocks[index]), f"docs/backbones.md block {index}", "exec"), {"__name__": "__doc__"})
