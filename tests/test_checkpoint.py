import gzip
import os
import pickle

import pytest
import torch

import bagcert
from bagcert.checkpoint import CheckpointError


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    model = bagcert.create_model("cifar_bagnet9_s2", num_classes=10, width=16).eval()
    path = bagcert.save_checkpoint(tmp_path / "m.pt", model, input_size=32, classes=["a"] * 10, eval={"clean": 0.5})
    loaded, meta = bagcert.load_checkpoint(path)
    assert meta == {"input_size": 32, "classes": ["a"] * 10, "eval": {"clean": 0.5}}
    assert not loaded.training
    assert loaded.config == model.config
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.local_logits(x), model.local_logits(x))
    assert loaded.geometry == model.geometry


def test_metadata_must_be_builtins(tmp_path):
    model = bagcert.create_model("cifar_bagnet5", width=8)
    with pytest.raises(TypeError, match="builtins"):
        bagcert.save_checkpoint(tmp_path / "m.pt", model, bad=object())


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bagcert-pwned",))


def test_foreign_pickled_object_is_refused(tmp_path):
    model = bagcert.create_model("cifar_bagnet5", width=8)
    path = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    evil = type("E", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})()
    obj = {"format": "bagcert-checkpoint", "format_version": 1, "model": model.config, "state_dict": model.state_dict(), "metadata": {"x": evil}}
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        bagcert.load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        bagcert.load_checkpoint(cut)


def test_missing_and_foreign_format(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        bagcert.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a bagcert checkpoint"):
        bagcert.load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        bagcert.load_checkpoint(tmp_path / "text.pt")


def test_strict_weights(tiny_checkpoint, tmp_path):
    obj = torch.load(tiny_checkpoint, weights_only=True)
    obj["state_dict"].pop("head.bias")
    torch.save(obj, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        bagcert.load_checkpoint(tmp_path / "missing.pt")
    obj = torch.load(tiny_checkpoint, weights_only=True)
    obj["format_version"] = 99
    torch.save(obj, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        bagcert.load_checkpoint(tmp_path / "v99.pt")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = bagcert.create_model("cifar_bagnet5", width=8)
    path = tmp_path / "m.pt"
    bagcert.save_checkpoint(path, model, run=1)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        bagcert.save_checkpoint(path, model, run=2)
    monkeypatch.undo()
    _, meta = bagcert.load_checkpoint(path)
    assert meta == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
