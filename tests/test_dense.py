"""Dense (a trous) evaluation of the strided CIFAR backbones: ``CifarBagNet(..., dense=True)``."""

import pytest
import torch

import bagcert
from bagcert.data import synthetic_dataset
from bagcert.models import CifarBagNet
from bagcert.training import TrainConfig, train

CONFIGS = [  # receptive field, stride, padding, norm, image size: 1x1-only blocks, 3x3 blocks, deeper strides
    (5, 2, "same", "bn", 32),
    (9, 2, "valid", "bn", 32),
    (13, 2, "same", "skipinit", 32),
    (9, 2, "same", "nf", 32),
    (17, 4, "valid", "bn", 40),
    (33, 8, "same", "bn", 64),
]


def _pair(rf, stride, padding, norm):
    torch.manual_seed(0)
    strided = CifarBagNet(receptive_field=rf, stride=stride, padding=padding, width=16, norm=norm).eval()
    for p in strided.parameters():  # away from the identity start, so every layer matters
        p.data.normal_(0, 0.3)
    dense = CifarBagNet(receptive_field=rf, stride=stride, padding=padding, width=16, norm=norm, dense=True).eval()
    dense.load_state_dict(strided.state_dict())
    return strided, dense


@pytest.mark.parametrize("rf,stride,padding,norm,size", CONFIGS)
def test_dense_map_contains_the_strided_map_and_the_same_pixel_boxes(rf, stride, padding, norm, size):
    strided, dense = _pair(rf, stride, padding, norm)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        a, b = strided.local_logits(x), dense.local_logits(x)
    h, w = a.shape[-2:]
    assert dense.geometry.stride == (1, 1) and dense.geometry.receptive_field == strided.geometry.receptive_field
    assert tuple(b.shape[-2:]) == dense.geometry.grid_size(size, size)
    torch.testing.assert_close(b[..., ::stride, ::stride][..., :h, :w], a, rtol=1e-5, atol=1e-5)
    for i, j in [(0, 0), (h - 1, w - 1), (1, h // 2)]:
        assert dense.geometry.pixel_box(stride * i, stride * j) == strided.geometry.pixel_box(i, j)


@pytest.mark.parametrize("rf,stride,padding,norm,size", CONFIGS)
def test_a_patch_changes_only_the_locations_the_geometry_names(rf, stride, padding, norm, size):
    """The certificate's soundness rests on R(l): whatever a patch holds, no dense location outside it may move."""
    _, dense = _pair(rf, stride, padding, norm)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, size, size, generator=g)
    with torch.no_grad():
        base = dense.local_logits(x)
        for top, left, p in [(0, 0, 5), (size - 5, size - 5, 5), (7, 3, 3), (size // 2, 0, 1)]:
            y = x.clone()
            y[..., top : top + p, left : left + p] = torch.rand(1, 3, p, p, generator=g)
            moved = (dense.local_logits(y) - base).abs().amax(dim=(0, 1)) > 0
            allowed = dense.geometry.affected_mask((size, size), p, top, left)
            assert moved.any() and not (moved & ~allowed).any()


def test_dense_certifies_from_one_pass_and_is_checked_by_the_usual_rules():
    _, dense = _pair(5, 2, "same", "bn")
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    r = bagcert.certify(dense, x, y, patch_size=5)
    assert r.prediction.shape == (4,) and dense.geometry.max_affected((32, 32), 5) == 81
    with pytest.raises(ValueError, match="needs stride 2, 4 or 8"):
        CifarBagNet(receptive_field=5, stride=1, dense=True)
    with pytest.raises(ValueError, match="dense must be True or False"):
        CifarBagNet(receptive_field=5, stride=2, dense=1)


def test_dense_checkpoint_round_trip_and_fine_tuning_from_the_strided_model(tmp_path):
    torch.manual_seed(0)
    strided = bagcert.create_model("cifar_bagnet5_s2", width=8).eval()
    src = tmp_path / "strided.pt"
    bagcert.save_checkpoint(src, strided, input_size=32, classes=[f"c{i}" for i in range(10)])
    cfg = dict(dataset="synthetic", model="cifar_bagnet5_s2", epochs=1, max_steps=0, batch_size=16, ema=0.0, loss="ce",
               tensorboard=False, progress=False, eval_every=1.0, checkpoint_minutes=0.0, init_from=str(src))
    data, held = synthetic_dataset(32, seed=1), synthetic_dataset(8, seed=2)
    train(TrainConfig(output=str(tmp_path / "d"), model_kwargs={"width": 8, "dense": True}, **cfg), data, held,
          log=lambda *a: None)
    model, meta = bagcert.load_checkpoint(tmp_path / "d" / "model.pt")
    assert model.config["kwargs"]["dense"] is True and model.geometry.stride == (1, 1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in strided.state_dict().items())
    assert meta["init_from"]["path"] == str(src) and meta["init_from"]["dense"] is False
    # any other architecture change is still refused
    with pytest.raises(ValueError, match="only \"dense\" may differ"):
        train(TrainConfig(output=str(tmp_path / "e"), model_kwargs={"width": 16, "dense": True}, **cfg), data, held,
              log=lambda *a: None)


def test_figure_titles_name_the_dense_evaluation():
    from bagcert.empirical import _model_name
    from bagcert.models import to_dense

    strided = bagcert.create_model("cifar_bagnet5_s2", width=8)
    assert _model_name(strided) == "cifar_bagnet5_s2"
    assert _model_name(to_dense(strided)) == "cifar_bagnet5_s2 (dense)"


def test_train_refuses_invalid_model_kwargs_in_one_line_before_any_work(tmp_path):
    import train as train_cli

    out = tmp_path / "run"
    for kwargs, expected in (('{"width": 8, "dense": true}', "needs stride 2, 4 or 8"), ('{"widht": 8}', "widht")):
        with pytest.raises(SystemExit) as exc:
            train_cli.main(["--model", "cifar_bagnet5" if "dense" in kwargs else "cifar_bagnet5_s2", "--model-kwargs",
                            kwargs, "--dataset", "synthetic:16", "--output", str(out)])
        message = str(exc.value.code)
        assert expected in message and "\n" not in message and message.startswith("--model ")
        assert not out.exists()


def test_init_from_accepts_a_checkpoint_whose_tuples_were_stored_as_lists(tmp_path):
    """image_bagnet* models carry mean/std tuples; a checkpoint stores them as lists: the same weights config."""
    from bagcert.training import _init_from_checkpoint

    torch.manual_seed(0)
    strided = bagcert.create_model("image_bagnet17_s8", width=16).eval()
    src = tmp_path / "s8.pt"
    bagcert.save_checkpoint(src, strided, input_size=128, classes=[f"c{i}" for i in range(10)])
    dense = bagcert.create_model("image_bagnet17_s8", width=16, dense=True)
    info = _init_from_checkpoint(dense, src)
    assert info["dense"] is False and all(torch.equal(v, dense.state_dict()[k]) for k, v in strided.state_dict().items())


def test_report_summary_says_the_model_was_evaluated_densely(tmp_path):
    import certify

    strided = bagcert.create_model("cifar_bagnet5_s2", width=8).eval()
    ckpt = tmp_path / "s.pt"
    bagcert.save_checkpoint(ckpt, strided, input_size=32, classes=[f"c{i}" for i in range(10)])
    for flags, dense in (([], False), (["--dense"], True)):
        out = tmp_path / f"r{int(dense)}"
        certify.main(["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--patch-sizes", "3", "--output", str(out),
                      "--no-progress", "--quiet", "--threads", "1", *flags])
        line = next(l for l in (out / "summary.md").read_text().splitlines() if l.startswith("- checkpoint:"))
        assert line.endswith("evaluated densely (every pixel a location)") == dense
