"""The library API refuses what it cannot use with a ValueError/TypeError that says what it expected, before any
forward pass, and converts what users expect to be converted (float64 and half-precision images)."""

import pytest
import torch

import bagcert
from bagcert.aggregation import get_aggregation
from bagcert.geometry import Geometry
from bagcert.models import InputError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return bagcert.create_model("cifar_bagnet5", num_classes=10, width=8).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 3, 7, 9])


def _same(a, b):
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.certified, b.certified)
    assert torch.equal(a.margin, b.margin) and torch.equal(a.worst_position, b.worst_position)


# --- image dtypes --------------------------------------------------------------------------------------------
def test_float64_images_give_the_float32_result(model, batch):
    x, y = batch
    x64 = x.double()
    assert torch.equal(x64.float(), x)
    _same(bagcert.certify(model, x64, y, 5), bagcert.certify(model, x, y, 5))
    assert torch.equal(model.local_logits(x64), model.local_logits(x))
    assert torch.equal(model(x64), model(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_are_widened_exactly(model, batch, dtype):
    x, y = batch
    xh = x.to(dtype)
    _same(bagcert.certify(model, xh, y, patch_sizes=[2, 5])[5], bagcert.certify(model, xh.float(), y, 5))
    assert model.local_logits(xh).dtype == torch.float32


def test_uint8_images_get_the_divide_by_255_hint_even_without_model_checks(model, batch):
    x, y = batch
    u8 = (x * 255).round().to(torch.uint8)
    with pytest.raises(ValueError, match=r"got dtype torch.uint8; convert uint8 images with x.float\(\) / 255"):
        bagcert.certify(model, u8, y, 5)
    model.check_inputs = False
    try:
        with pytest.raises(ValueError, match=r"x.float\(\) / 255"):
            bagcert.certify(model, u8, y, 5)
    finally:
        model.check_inputs = True


# --- value range hints ---------------------------------------------------------------------------------------
def test_normalised_images_get_the_model_normalises_hint_not_divide_by_255(model, batch):
    x, _ = batch
    normalised = (x - model.mean) / model.std
    with pytest.raises(InputError) as info:
        model(normalised)
    text = str(info.value)
    assert "already normalised" in text and "the model normalises internally" in text and "[0, 1]" in text
    assert "255" not in text


def test_divide_by_255_only_for_values_up_to_255(model, batch):
    x, _ = batch
    with pytest.raises(InputError, match="divide by 255"):
        model(x * 255)
    with pytest.raises(InputError) as info:
        model(x * 1000)
    assert "255" not in str(info.value)
    with pytest.raises(InputError, match=r"clamp with x.clamp\(0, 1\)"):
        model(x * 1.005)


# --- certify arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -2])
def test_batch_size_must_be_positive(model, batch, bad):
    x, y = batch
    with pytest.raises(ValueError, match=rf"batch_size must be >= 1 \(images per forward pass\), got {bad}"):
        bagcert.certify(model, x, y, 5, batch_size=bad)


@pytest.mark.parametrize("bad", [2.5, True, "2"])
def test_batch_size_must_be_an_int(model, batch, bad):
    x, y = batch
    with pytest.raises(TypeError, match="batch_size must be an int >= 1 or None"):
        bagcert.certify(model, x, y, 5, batch_size=bad)


def test_batch_size_chunks_give_the_same_result(model, batch):
    x, y = batch
    _same(bagcert.certify(model, x, y, 5, batch_size=3), bagcert.certify(model, x, y, 5))


@pytest.mark.parametrize("bad", [5, "3x7", {5, 7}])
def test_patch_sizes_must_be_a_list(model, batch, bad):
    x, y = batch
    with pytest.raises(TypeError, match=r"patch_sizes must be a list of patch sizes such as \[5\]") as info:
        bagcert.certify(model, x, y, patch_sizes=bad)
    assert ("pass patch_size=" in str(info.value)) == isinstance(bad, (int, str))
    logits = model.local_logits(x)
    with pytest.raises(TypeError, match="patch_sizes must be a list"):
        bagcert.certify_logits(logits, y, model.geometry, (32, 32), patch_sizes=bad)


@pytest.mark.parametrize(
    "sizes,named",
    [([5, 5], "5, 5 all mean 5x5"), ([5, (5, 5)], "5, (5, 5) all mean 5x5"), ([2, "5", "5x5", (3, 7), "3x7"], "5, 5x5 all mean 5x5; (3, 7), 3x7 all mean 3x7")],
)
def test_duplicate_patch_sizes_are_named(model, batch, sizes, named):
    x, y = batch
    expected = f"duplicate patch sizes: {named}; give each size once"
    with pytest.raises(ValueError) as info:
        bagcert.geometry.normalize_patch_sizes(sizes)
    assert str(info.value) == expected
    with pytest.raises(ValueError, match="duplicate patch sizes"):
        bagcert.certify(model, x, y, patch_sizes=sizes)
    with pytest.raises(ValueError, match="duplicate patch sizes"):
        bagcert.certify_logits(model.local_logits(x), y, model.geometry, (32, 32), patch_sizes=sizes)


def test_normalize_patch_sizes_returns_pairs_in_order():
    assert bagcert.geometry.normalize_patch_sizes([1, "3x7", (2, 4), "5"]) == [(1, 1), (3, 7), (2, 4), (5, 5)]
    with pytest.raises(ValueError, match="patch_sizes is empty"):
        bagcert.geometry.normalize_patch_sizes([])


@pytest.mark.parametrize("labels", [torch.tensor([[0], [3], [7], [9]]), torch.tensor([[0, 3], [7, 9]]), torch.tensor(3)])
def test_labels_must_be_one_index_per_image(model, batch, labels):
    x, _ = batch
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[4\] \(one class index per image\)"):
        bagcert.certify(model, x, labels, 5)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[4\]"):
        bagcert.certify_logits(model.local_logits(x), labels, model.geometry, (32, 32), 5)


def test_column_labels_get_the_flatten_hint(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"flatten \[N, 1\] labels with labels.view\(-1\)"):
        bagcert.certify(model, x, y.view(-1, 1), 5)
    # other integer dtypes are class indices too
    _same(bagcert.certify(model, x, y.to(torch.int32), 5), bagcert.certify(model, x, y, 5))


def test_empty_logit_batch_is_refused(model):
    with pytest.raises(ValueError, match=r"local logits hold no samples \(shape \(0, 10, 32, 32\)\); expected \[N, C, h, w\] with N >= 1"):
        bagcert.certify_logits(torch.zeros(0, 10, 32, 32), None, model.geometry, (32, 32), 5)


def test_integer_logits_are_refused(model):
    with pytest.raises(ValueError, match="local logits must be floating point"):
        bagcert.certify_logits(torch.ones(1, 10, 32, 32, dtype=torch.long), None, model.geometry, (32, 32), 5)


@pytest.mark.parametrize("bad", [32, (32,), (32, 32, 3), "32x32", (32.0, 32.0)])
def test_image_size_must_be_a_pair(model, bad):
    logits = torch.randn(1, 10, 32, 32)
    with pytest.raises(TypeError, match=r"image_size must be a \(height, width\) pair of ints"):
        bagcert.certify_logits(logits, None, model.geometry, bad, 5)
    with pytest.raises(TypeError, match=r"image_size must be a \(height, width\) pair of ints"):
        model.geometry.affected_ranges(bad, 5)


def test_lone_int_image_size_gets_the_pair_hint(model):
    with pytest.raises(TypeError, match=r"for a square image pass \(32, 32\)"):
        bagcert.certify_logits(torch.randn(1, 10, 32, 32), None, model.geometry, 32, 5)
    assert bagcert.certify_logits(torch.randn(1, 10, 32, 32), None, model.geometry, torch.Size([32, 32]), 5).num_samples == 1


def test_patch_larger_than_the_image_is_refused_before_the_forward_pass(model, batch, monkeypatch):
    x, y = batch
    calls = []
    original = type(model).local_logits
    monkeypatch.setattr(model, "local_logits", lambda images: calls.append(1) or original(model, images))
    with pytest.raises(ValueError, match="patch 40x40 is larger than the 32x32 image; patch sizes must fit inside the image"):
        bagcert.certify(model, x, y, patch_sizes=[5, 40])
    with pytest.raises(ValueError, match="duplicate"):
        bagcert.certify(model, x, y, patch_sizes=[5, 5])
    with pytest.raises(ValueError, match="batch_size"):
        bagcert.certify(model, x, y, 5, batch_size=0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        bagcert.certify(model, x, y, 5, aggregation="vote")
    assert calls == []
    with pytest.raises(ValueError, match="patch 3x33 is larger than the 32x32 image"):
        bagcert.certify_logits(model.local_logits(x), y, model.geometry, (32, 32), (3, 33))


def test_aggregations_take_local_logit_maps_only():
    agg = get_aggregation("votes")
    with pytest.raises(ValueError, match=r"aggregations take local logits \[B, C, h, w\] \(model.local_logits\(x\)\), got \[4, 10\]"):
        agg.class_scores(torch.randn(4, 10))
    with pytest.raises(ValueError, match="local logits must be floating point"):
        get_aggregation("clipped").local_scores(torch.ones(1, 2, 3, 3, dtype=torch.int64))


def test_geometry_refuses_patches_outside_the_image():
    geometry = Geometry.from_layers([(3, 1, 1)])
    with pytest.raises(ValueError, match="patch 9x2 is larger than the 8x8 image"):
        geometry.max_affected((8, 8), (9, 2))
