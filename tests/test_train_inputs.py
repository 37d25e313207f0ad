"""train.py / bagcert.training.train refuse, before any step, the inputs a run could only fail on later or score
wrongly with (another image size, other held-out classes, patch sizes larger than the image, a model.pt that could
not be saved), and an unexpected error mid-run keeps the finished steps in last.pt."""

import json

import pytest
import torch
from PIL import Image

import bagcert
import train as train_cli
from bagcert.data import CIFAR10_CLASSES, synthetic_dataset
from bagcert.training import TrainConfig, TrainingError, TrainingFailed, export_checkpoint, train

QUIET = dict(log=lambda *a: None)
FAST = ["--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}', "--batch-size", "8", "--max-steps", "2",
        "--no-progress", "--no-tensorboard", "--threads", "1", "--no-amp", "--eval-patch-sizes", "2"]


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="cifar_bagnet5_s2", model_kwargs={"width": 8}, epochs=3, batch_size=16, ema=0.9,
                output=str(out), tensorboard=False, progress=False, eval_every=1.0, eval_patch_sizes=[2, 5],
                checkpoint_minutes=1000.0, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _folder(root, splits, size=32, per_class=2):
    """``splits``: {split: [class, ...]}; random ``size`` px PNGs."""
    gen = torch.Generator().manual_seed(0)
    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    return root


def _refused(argv, match):
    with pytest.raises(SystemExit, match=match) as e:
        train_cli.main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


@pytest.mark.parametrize("size", ["16", "31", "64"])
def test_an_image_size_other_than_the_cifar_folders_is_refused_before_any_work(tmp_path, size):
    data = _folder(tmp_path / "c10", {"train": CIFAR10_CLASSES, "test": CIFAR10_CLASSES}, per_class=1)
    out = tmp_path / "run"
    _refused(["--dataset", str(data), "--image-size", size, "--output", str(out)] + FAST,
             rf"--image-size {size}: .* CIFAR-10 layout of 32x32 images.* give --image-size 32")
    assert not out.exists()


def test_train_refuses_data_of_another_image_size(tmp_path):
    # the library entry point: data decoded at 16 px for a run configured for 32 px (windows built for 32 px)
    with pytest.raises(TrainingError, match=r"training images of synthetic are 16x16 pixels but the run is configured for 32x32"):
        train(_cfg(tmp_path / "a"), synthetic_dataset(32, size=16), synthetic_dataset(8), **QUIET)
    with pytest.raises(TrainingError, match=r"held-out images of synthetic are 24x24 pixels"):
        train(_cfg(tmp_path / "b"), synthetic_dataset(32), synthetic_dataset(8, size=24), **QUIET)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_renamed_test_class_folder_is_refused_before_training(tmp_path):
    test_classes = [c if c != "truck" else "aardvark" for c in CIFAR10_CLASSES]
    data = _folder(tmp_path / "c10", {"train": CIFAR10_CLASSES, "test": test_classes}, per_class=1)
    out = tmp_path / "run"
    line = _refused(["--dataset", str(data), "--output", str(out)] + FAST,
                    r"held-out data's classes differ from the training data's \(only in the held-out data: \['aardvark'\]; "
                    r"only in the training data: \['truck'\]\)")
    assert "scored against another class" in line
    assert not out.exists()


def test_a_class_folder_only_in_the_test_split_is_refused_before_training(tmp_path):
    data = _folder(tmp_path / "f", {"train": ["a", "b"], "test": ["a", "b", "c"]}, size=40, per_class=6)
    out = tmp_path / "run"
    _refused(["--dataset", str(data), "--num-classes", "2", "--image-size", "32", "--output", str(out)] + FAST,
             r"only in the held-out data: \['c'\]")
    assert not out.exists()


def test_patch_sizes_larger_than_the_image_are_refused_before_the_first_step(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "synthetic:32", "--output", str(out)] + FAST
    _refused(argv + ["--eval-patch-sizes", "5,64"], r"^eval_patch_sizes \(--eval-patch-sizes\) 64x64 larger than the 32x32 images")
    _refused(argv + ["--patch-sizes", "33"], r"^patch_sizes \(--patch-sizes\) 33x33 larger than the 32x32 images")
    _refused(argv + ["--eval-patch-sizes", "0"], r"^eval_patch_sizes \(--eval-patch-sizes\): ")
    assert not out.exists()


def test_a_resize_below_the_image_size_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    _refused(["--dataset", "synthetic:32", "--resize", "8", "--output", str(out)] + FAST,
             r"^resize must be None or an int >= image_size \(32\).* got 8 \(--resize")
    assert not out.exists()
    with pytest.raises(ValueError, match="resize must be None or an int >= image_size"):
        _cfg(tmp_path / "x", resize=8).check()


def test_export_recovers_a_run_stored_with_a_resize_below_the_image_size(tmp_path):
    # a last.pt written before the check (a CIFAR-style run, whose images were never resized): export it anyway
    data, held = synthetic_dataset(32, seed=1), synthetic_dataset(8, seed=2)
    out = tmp_path / "old"
    train(_cfg(out, max_steps=1), data, held, **QUIET)
    state = torch.load(out / "last.pt", weights_only=True)
    state["config"]["resize"] = 8
    torch.save(state, out / "last.pt")
    _, meta = bagcert.load_checkpoint(export_checkpoint(out, tmp_path / "export.pt"))
    assert "resize" not in meta and meta["ignored_resize"] == 8 and meta["input_size"] == 32
    # and --resume without the resize (it never applied) continues the run to a model.pt
    assert train(_cfg(out, max_steps=2), data, held, resume=True, **QUIET)["steps"] == 2
    assert bagcert.load_checkpoint(out / "model.pt")[1]["trained_steps"] == 2


def _fail_once_at(monkeypatch, step, error):
    """The training batches of ``step`` raise ``error`` once (a killed loader worker, an undecodable file)."""
    import bagcert.training.batches as parts

    real = parts.MemoryBatches.micro_batches
    fired = []

    def micro_batches(self, s):
        if s == step and not fired:
            fired.append(s)
            raise error
        yield from real(self, s)

    monkeypatch.setattr(parts.MemoryBatches, "micro_batches", micro_batches)


def test_an_error_mid_run_saves_last_pt_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    data, held = synthetic_dataset(64, seed=1), synthetic_dataset(16, seed=2)
    train(_cfg(tmp_path / "full", max_steps=6), data, held, **QUIET)
    _fail_once_at(monkeypatch, 4, RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed."))
    out = tmp_path / "cut"
    with pytest.raises(TrainingFailed, match=r"^training failed during step 5 \(RuntimeError: DataLoader worker \(pid 12345\) "
                       r"is killed by signal: Killed.\); .*last.pt holds the 4 finished steps; .* --resume$") as e:
        train(_cfg(out, max_steps=6, log_every=1), data, held, **QUIET)
    assert e.value.step == 4 and isinstance(e.value.__cause__, RuntimeError)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["error"].startswith("RuntimeError: DataLoader worker") and last["checkpoint"] is True
    assert train(_cfg(out, max_steps=6, log_every=1), data, held, resume=True, **QUIET)["steps"] == 6
    a = bagcert.load_checkpoint(tmp_path / "full" / "model.pt")[0].state_dict()
    b = bagcert.load_checkpoint(out / "model.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_undecodable_image_on_the_stream_path_ends_train_py_with_one_line_and_a_checkpoint(tmp_path, workers):
    data = _folder(tmp_path / "f", {"train": ["a", "b"], "test": ["a", "b"]}, size=32, per_class=8)
    bad = data / "train" / "b" / "7.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "run"
    argv = ["--dataset", str(data), "--num-classes", "2", "--image-size", "32", "--resize", "32", "--data-path", "stream",
            "--workers", workers, "--pad", "4", "--epochs", "3", "--output", str(out)] + FAST + ["--max-steps", "6"]
    line = _refused(argv, r"^training failed during step \d+ \(DatasetError: /\S*7\.png cannot be decoded.*\); .*last\.pt")
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    assert f"holds the {step} finished steps" in line


def test_defensive_patch_refuses_a_transfer_model_of_other_classes(tmp_path):
    from bagcert.cli import defensive_patch as cli_defpatch

    def ckpt(name, classes, **meta):
        torch.manual_seed(0)
        model = bagcert.create_model("cifar_bagnet5_s2", num_classes=len(classes), width=8).eval()
        return bagcert.save_checkpoint(tmp_path / name, model, input_size=32, **({"classes": list(classes)} | meta))

    src = ckpt("src.pt", ["cat", "dog", "fox"])
    argv = ["--checkpoint", str(src), "--dataset", "synthetic:8", "--num-eval", "4", "--corruptions", "none", "--quiet"]
    for other, match in ((ckpt("o.pt", ["car", "bus", "van"]), r"predicts the classes \['car', 'bus', 'van'\], the source model "
                                                                  r"\['cat', 'dog', 'fox'\]"),
                         (ckpt("p.pt", ["dog", "cat", "fox"]), r"predicts the classes \['dog', 'cat', 'fox'\]")):
        out = tmp_path / other.stem
        with pytest.raises(SystemExit, match=match) as e:
            cli_defpatch.main(argv + ["--transfer-checkpoint", str(other), "--output", str(out)])
        assert "\n" not in e.value.code and not out.exists()
