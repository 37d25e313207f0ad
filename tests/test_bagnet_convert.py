"""Loading BagNet weights in the original implementation's layout (bagcert.models.convert).

The original layout is described here independently of bagcert, from the original ``bagnets/pytorchnet.py``
(wielandbrendel/bag-of-local-features-models): a ResNet-50-like model with a 1x1 + 3x3 stem, stages of
[3, 4, 6, 3] bottlenecks, strides [2, 2, 2, 1], a 3x3 kernel only in the first bottleneck of the stages named
by ``kernel3``, a downsample branch in every stage's first bottleneck, and an ``nn.Linear`` classifier.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import bagcert
from bagcert.checkpoint import CheckpointError, save_checkpoint
from bagcert.models.convert import PUBLIC_WEIGHT_FILES, load_bagnet_state_dict, original_layout, read_weights_file

KERNEL3 = {9: (1, 1, 0, 0), 17: (1, 1, 1, 0), 33: (1, 1, 1, 1)}
BLOCKS = (3, 4, 6, 3)
STRIDES = (2, 2, 2, 1)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SMALL = 1 / 16  # width of the fast variants: 64 -> 4 channels


def original_spec(rf, num_classes=1000, divisor=1, counters=True):
    """{original key: shape} of pytorchnet.bagnet{rf}, channel counts divided by ``divisor``."""
    c = lambda n: n // divisor  # noqa: E731
    spec = {}

    def bn(prefix, n):
        spec.update({f"{prefix}.weight": (n,), f"{prefix}.bias": (n,), f"{prefix}.running_mean": (n,),
                     f"{prefix}.running_var": (n,)})
        if counters:
            spec[f"{prefix}.num_batches_tracked"] = ()

    spec["conv1.weight"] = (c(64), 3, 1, 1)
    spec["conv2.weight"] = (c(64), c(64), 3, 3)
    bn("bn1", c(64))
    inplanes = c(64)
    for stage, (planes, blocks, k3) in enumerate(zip((64, 128, 256, 512), BLOCKS, KERNEL3[rf]), 1):
        planes = c(planes)
        for b in range(blocks):
            p, k = f"layer{stage}.{b}", (3 if b == 0 and k3 else 1)
            spec[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            spec[f"{p}.conv2.weight"] = (planes, planes, k, k)
            bn(f"{p}.bn2", planes)
            spec[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                spec[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    spec["fc.weight"] = (num_classes, inplanes)
    spec["fc.bias"] = (num_classes,)
    return spec


def random_state(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.randint(1, 10_000, (), generator=g)
        elif key.endswith("running_var") or (key.endswith(".weight") and len(shape) == 1):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)
    return out


def reference_forward(sd, x):
    """The original BagNet's forward in eval mode on normalised images: (local logits [B, h, w, C], pooled [B, C])."""
    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    x = F.relu(bn(F.conv2d(F.conv2d(x, sd["conv1.weight"]), sd["conv2.weight"]), "bn1"))
    for stage, (blocks, stride) in enumerate(zip(BLOCKS, STRIDES), 1):
        for b in range(blocks):
            p, s = f"layer{stage}.{b}", (stride if b == 0 else 1)
            out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s), f"{p}.bn2"))
            out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            res = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1") if b == 0 else x
            diff = res.size(-1) - out.size(-1)
            if diff:
                res = res[:, :, :-diff, :-diff]
            x = F.relu(out + res)
    local = x.permute(0, 2, 3, 1) @ sd["fc.weight"].T + sd["fc.bias"]
    pooled = x.mean((2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]
    return local, pooled


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return bagcert.create_model(name, **kwargs)


@pytest.mark.parametrize("rf", [9, 17, 33])
def test_original_layout_matches_the_original_keys_and_shapes(rf):
    spec = original_spec(rf)
    # a handful of the original's names and shapes, written out by hand
    assert spec["conv1.weight"] == (64, 3, 1, 1) and spec["conv2.weight"] == (64, 64, 3, 3)
    assert spec["bn1.running_var"] == (64,)
    assert spec["layer1.0.conv1.weight"] == (64, 64, 1, 1) and spec["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert spec["layer1.0.conv2.weight"] == (64, 64, 3, 3) and spec["layer1.1.conv2.weight"] == (64, 64, 1, 1)
    assert spec["layer3.0.conv2.weight"] == ((256, 256, 1, 1) if rf == 9 else (256, 256, 3, 3))
    assert spec["layer4.0.conv2.weight"] == ((512, 512, 3, 3) if rf == 33 else (512, 512, 1, 1))
    assert spec["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert spec["fc.weight"] == (1000, 2048) and spec["fc.bias"] == (1000,)
    learned = sum(math.prod(s) for k, s in spec.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert abs(learned / 1e6 - {9: 15.69, 17: 16.21, 33: 18.31}[rf]) < 0.01  # the published parameter counts
    layout = original_layout(meta_model(f"bagnet{rf}"))
    assert layout == spec  # same keys, same order, same shapes
    assert PUBLIC_WEIGHT_FILES[f"bagnet{rf}"].startswith(f"bagnet{rf - 1}-")


@pytest.mark.parametrize("rf", [9, 17, 33])
def test_public_layout_loads_exactly_and_computes_the_original_forward(rf):
    torch.manual_seed(1)
    sd = random_state(original_spec(rf), seed=rf)
    model = bagcert.create_model(f"bagnet{rf}").eval()
    report = load_bagnet_state_dict(sd, model)
    assert report["source_receptive_field"] == rf and report["loaded"] == len(sd)
    assert report["skipped"] == [] and report["missing"] == [] and report["unexpected"] == []
    assert report["kept"] == ["mean", "std"] and report["wrapper"] is None and report["prefix_stripped"] is None
    got = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(got[key].reshape(value.shape), value), key
    assert got["fc.weight"].shape == (1000, 2048, 1, 1)

    x = torch.rand(2, 3, 33, 37, dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        local = model.local_logits(x).permute(0, 2, 3, 1)
        pooled = model.mean_logits(x)
    ref_local, ref_pooled = reference_forward({k: v.double() for k, v in sd.items()}, (x - MEAN.double()) / STD.double())
    assert local.shape == ref_local.shape == (2, *model.grid_size(33, 37), 1000)
    torch.testing.assert_close(local, ref_local, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-9, atol=1e-9)


def small(rf=17, num_classes=1000, **kwargs):
    return bagcert.create_model(f"bagnet{rf}", num_classes=num_classes, width=SMALL, **kwargs).eval()


def small_state(rf=17, num_classes=1000, seed=0, **kwargs):
    return random_state(original_spec(rf, num_classes=num_classes, divisor=16, **kwargs), seed=seed)


def test_small_layout_forward_matches_too():
    sd = small_state(33, num_classes=7)
    model = small(33, num_classes=7).double()
    load_bagnet_state_dict(sd, model)
    x = torch.rand(1, 3, 41, 41, dtype=torch.float64)
    with torch.no_grad():
        local = model.local_logits(x).permute(0, 2, 3, 1)
    ref, _ = reference_forward({k: v.double() for k, v in sd.items()}, (x - MEAN.double()) / STD.double())
    torch.testing.assert_close(local, ref, rtol=1e-9, atol=1e-9)


def test_head_of_another_class_count_is_skipped_and_reported():
    sd = small_state(17, num_classes=1000)
    model = small(17, num_classes=10)
    head = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    report = load_bagnet_state_dict(sd, model)
    assert report["skipped"] == ["fc.weight", "fc.bias"]
    assert "1000 classes" in report["skip_reason"] and "10" in report["skip_reason"]
    assert "skipped fc.weight, fc.bias" in report["summary"]
    assert report["loaded"] == len(sd) - 2
    assert torch.equal(model.fc.weight, head[0]) and torch.equal(model.fc.bias, head[1])
    assert torch.equal(model.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])


def test_wrong_shape_is_refused_naming_the_key_and_nothing_is_loaded():
    sd = small_state()
    sd["layer2.1.conv3.weight"] = torch.zeros(32, 8, 3, 3)
    model = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"layer2\.1\.conv3\.weight \[32, 8, 3, 3\] \(expected \[32, 8, 1, 1\]\)"):
        load_bagnet_state_dict(sd, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_weights_of_another_receptive_field_are_refused_with_the_right_model():
    with pytest.raises(CheckpointError, match=r"holds BagNet-33 weights.*is a BagNet-17: use the model bagnet33 "
                                              r"\(.*bagnet32-2ddd53ed\.pth\.tar\)"):
        load_bagnet_state_dict(small_state(33), small(17))


def test_weights_of_another_width_are_refused():
    model = meta_model("bagnet17", width=0.25)
    with pytest.raises(CheckpointError, match=r"conv1\.weight \[4, 3, 1, 1\] \(expected \[16, 3, 1, 1\]\).*width"):
        load_bagnet_state_dict(small_state(17), model)


def test_dataparallel_prefix_is_removed():
    sd = small_state()
    model = small()
    report = load_bagnet_state_dict({f"module.{k}": v for k, v in sd.items()}, model)
    assert report["prefix_stripped"] == "module." and report["loaded"] == len(sd)
    assert torch.equal(model.conv2.weight, sd["conv2.weight"])


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
@pytest.mark.parametrize("legacy", [False, True])
def test_files_with_a_wrapper_key_and_either_torch_format_load(tmp_path, wrapper, legacy):
    sd = small_state()
    path = tmp_path / "bagnet16.pth.tar"
    torch.save({wrapper: sd, "epoch": 60, "arch": "bagnet17"}, path, _use_new_zipfile_serialization=not legacy)
    model = small()
    report = load_bagnet_state_dict(path, model)
    assert report["wrapper"] == wrapper and report["path"] == str(path) and report["loaded"] == len(sd)
    assert torch.equal(model.bn1.running_var, sd["bn1.running_var"])
    # read once, converted from the loaded object (how a caller that inspects the file first uses it)
    again = load_bagnet_state_dict(read_weights_file(path), small(), name=str(path))
    assert again["path"] == str(path) and again["wrapper"] == wrapper and str(path) in again["summary"]


@pytest.mark.parametrize("legacy", [False, True])
def test_files_are_read_weights_only(tmp_path, legacy):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small_state(), "args": argparse.Namespace(lr=0.1)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"(?i)refusing to load .*argparse\.Namespace"):
        load_bagnet_state_dict(path, small())


def test_not_a_torch_file_and_a_bagcert_checkpoint_are_refused(tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a torch file"):
        load_bagnet_state_dict(junk, small())
    ckpt = save_checkpoint(tmp_path / "ck.pt", small(), classes=[str(i) for i in range(1000)], input_size=64)
    with pytest.raises(CheckpointError, match="is a bagcert checkpoint.*bagcert.load_checkpoint"):
        load_bagnet_state_dict(ckpt, small())
    with pytest.raises(CheckpointError, match="not a state dict.*'state_dict' or 'model'"):
        load_bagnet_state_dict({"weights": {"a": 1}}, small())


def test_missing_and_unexpected_keys_are_refused_or_reported():
    sd = small_state()
    del sd["layer3.5.bn2.running_var"]
    sd["aux.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 missing \(layer3\.5\.bn2\.running_var\), 1 unexpected \(aux\.weight\)"):
        load_bagnet_state_dict(sd, small())
    model = small()
    report = load_bagnet_state_dict(sd, model, strict=False)
    assert report["missing"] == ["layer3.5.bn2.running_var"] and report["unexpected"] == ["aux.weight"]
    assert "layer3.5.bn2.running_var" in report["kept"] and torch.equal(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_files_without_batchnorm_counters_load():
    sd = small_state(counters=False)
    model = small()
    report = load_bagnet_state_dict(sd, model)
    assert report["missing"] == [] and "bn1.num_batches_tracked" in report["kept"]
    assert torch.equal(model.layer4[0].downsample[1].running_mean, sd["layer4.0.downsample.1.running_mean"])


def test_non_finite_weights_and_wrong_models_are_refused():
    sd = small_state()
    sd["layer1.2.bn3.weight"][0] = float("nan")
    with pytest.raises(CheckpointError, match=r"layer1\.2\.bn3\.weight holds NaN or Inf"):
        load_bagnet_state_dict(sd, small())
    with pytest.raises(TypeError, match="only into a bagcert BagNet.*image_bagnet17_s8"):
        load_bagnet_state_dict(small_state(), meta_model("image_bagnet17_s8", num_classes=10))


def test_train_init_from_the_original_layout(tmp_path):
    """train.py --init-from with a file in the original layout starts from its weights (the 1000-class head is
    skipped for a 3-class model) and records the source in model.pt; a non-BagNet model refuses such a file."""
    import train as train_cli

    sd = small_state(17, num_classes=1000, seed=3)
    path = tmp_path / "bagnet16-original.pth.tar"
    torch.save(sd, path)
    common = ["--dataset", "synthetic:24", "--num-classes", "3", "--image-size", "33", "--epochs", "1", "--max-steps", "1",
              "--batch-size", "8", "--lr", "1e-9", "--ema", "0", "--threads", "1", "--no-progress", "--no-tensorboard",
              "--data-path", "memory", "--init-from", str(path)]
    out = tmp_path / "run"
    assert train_cli.main(["--model", "bagnet17", "--model-kwargs", f'{{"width": {SMALL}}}', *common, "--output", str(out)]) == 0
    model, meta = bagcert.load_checkpoint(out / "model.pt")
    assert meta["init_from"]["source"] == "bagnet-original" and meta["init_from"]["skipped"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(model.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"], rtol=0, atol=1e-6)
    with pytest.raises(SystemExit, match="original BagNet layout"):
        train_cli.main(["--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}', *common, "--output", str(tmp_path / "no")])
