"""What the command-line tools refuse, and how: one line, before any work, and nothing silently accepted.

Each test runs a tool in-process on tiny data (synthetic sets, a few small image files) and checks that a
mistaken or unsafe argument ends with one line (SystemExit, no traceback) or a said note, never with work done
on it; the library rules behind them (decoding limits, the loader-process bound, batch norm under DDP) are
checked directly.
"""

import argparse
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import bagcert
from bagcert import streaming
from bagcert.cli import _common, certify
from bagcert.cli import defensive_patch as cli_defpatch
from bagcert.cli import imagenet_a as cli_ina
from bagcert.cli import roi as cli_roi
from bagcert.cli import train as cli_train
from bagcert.data import DatasetError, check_upscale, decode_image, image_header_size, load_image_folder
from bagcert.streaming import ImageFolderStream, decode_rgb, make_loader
from bagcert.training import TrainConfig, TrainingError, check_sync_bn
from conftest import ROOT

QUICK_TRAIN = ["--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}', "--epochs", "1", "--batch-size", "8",
               "--eval-images", "8", "--no-progress", "--no-tensorboard", "--no-amp", "--max-steps", "1"]


def _one_line(exc) -> str:
    text = str(exc.value.code)
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


def _checkpoint(path, classes, size=32):
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=len(classes), width=8).eval()
    bagcert.save_checkpoint(path, model, input_size=size, classes=list(classes))
    return path


def _folder(root, classes=("a", "b"), per_class=4, hw=(32, 32), ext="png"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(root / c / f"{k}.{ext}")
    return root


# --- one parser rule for every tool --------------------------------------------------------------------------
@pytest.mark.parametrize("module,argv", [
    (certify, ["--num-imag", "3"]),
    (cli_roi, ["--checkpoint", "m.pt", "--dataset", "synthetic:4", "--num-imag", "3"]),
    (cli_defpatch, ["--checkpoint", "m.pt", "--dataset", "synthetic:4", "--num-ev", "3"]),
    (cli_ina, ["--checkpoint", "m.pt", "--dataset", "d", "--num-imag", "3"]),
    (cli_train, ["--epoch", "3"]),
])
def test_abbreviated_options_are_refused_in_one_line(module, argv, capsys):
    """``--epoch 3`` was taken as ``--epochs 3``: every parser is built with allow_abbrev=False."""
    with pytest.raises(SystemExit) as exc:
        module.build_parser(prog="tool").parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: " in err, err


@pytest.mark.parametrize("dev", ["gpu", "cuda"])
def test_train_refuses_a_device_this_machine_lacks(dev, tmp_path, capsys):
    if dev == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        cli_train.main(["--dataset", "synthetic:16", "--device", dev, "--output", str(tmp_path / "r")] + QUICK_TRAIN)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device" in err and not (tmp_path / "r").exists()


def test_train_refuses_a_missing_device_from_a_config_file(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tmp_path / "c.json"
    cfg.write_text('{"device": "cuda"}')
    with pytest.raises(SystemExit) as exc:
        cli_train.main(["--config", str(cfg), "--dataset", "synthetic:16", "--output", str(tmp_path / "r")] + QUICK_TRAIN)
    assert "CUDA is not available" in _one_line(exc)


@pytest.mark.parametrize("argv,match", [
    (["--max-steps", "0"], "max-steps"),
    (["--cutout", "100"], "cutout must be at most image_size"),
])
def test_train_refuses_numbers_that_do_nothing_or_cannot_apply(argv, match, tmp_path, capsys):
    args = QUICK_TRAIN[:-2] + ["--dataset", "synthetic:16", "--output", str(tmp_path / "r")] + argv
    with pytest.raises(SystemExit) as exc:
        cli_train.main(args)
    text = capsys.readouterr().err if exc.value.code == 2 else _one_line(exc)
    assert match in text and not (tmp_path / "r" / "model.pt").exists()


# --- loader processes ------------------------------------------------------------------------------------------
def test_loader_processes_are_bounded_by_cores_and_memory(monkeypatch):
    monkeypatch.setattr(streaming, "usable_cpus", lambda: 16)
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 3 * streaming.LOADER_WORKER_BYTES + 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert streaming.max_loader_workers() == 3  # memory binds
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 10**15)
    assert streaming.max_loader_workers() == 16  # cores bind
    assert streaming.max_loader_workers(copies=4) == 4  # shared by the processes of this machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert streaming.max_loader_workers() == 1  # never below one
    limit, why = streaming.max_loader_workers(copies=2, explain=True)
    assert limit == 8 and "16 usable CPU cores" in why
    with pytest.raises(argparse.ArgumentTypeError, match="at most 1"):
        _common.workers("2")


@pytest.mark.parametrize("tool", ["certify", "train"])
def test_an_absurd_number_of_loader_processes_is_refused_in_one_line(tool, tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit) as exc:
        if tool == "certify":
            certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--workers", "1000000",
                          "--output", out, "--no-progress"])
        else:
            cli_train.main(["--dataset", "synthetic:16", "--workers", "1000000", "--output", out] + QUICK_TRAIN)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than this machine can run" in err and "usable CPU cores" in err


def test_workers_on_the_memory_path_are_refused_and_an_automatic_memory_choice_says_so(tiny_checkpoint, tmp_path, capsys):
    base = ["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--workers", "1", "--no-progress", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        certify.main(base + ["--data-path", "memory", "--output", str(tmp_path / "a")])
    assert "applies to the stream path only" in _one_line(exc)
    assert certify.main(base + ["--data-path", "auto", "--patch-sizes", "3", "--output", str(tmp_path / "b")]) == 0
    assert "note: --workers 1 is unused: --data-path auto chose the memory path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_train.main(["--dataset", "synthetic:16", "--data-path", "memory", "--workers", "1", "--output", str(tmp_path / "t")]
                       + QUICK_TRAIN)
    assert "applies to the stream path only" in _one_line(exc) and not (tmp_path / "t" / "model.pt").exists()


def test_attack_options_without_attacks_are_refused(tiny_checkpoint, tmp_path):
    for flag, value in (("--attack-patch-sizes", "5"), ("--attack-images", "4")):
        with pytest.raises(SystemExit) as exc:
            certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", flag, value,
                          "--output", str(tmp_path / "o"), "--no-progress"])
        assert f"{flag} apply only with --attacks" in _one_line(exc)
    assert not (tmp_path / "o").exists()


# --- one decoding limit on every path ---------------------------------------------------------------------------
def test_the_decompression_bomb_limit_holds_on_the_stream_training_path(tmp_path, monkeypatch):
    """The JPEG fast path (torchvision) decoded what Pillow's limit refuses on the memory path; now both refuse."""
    from PIL import Image as PILImage

    root = _folder(tmp_path / "d", per_class=1, hw=(64, 64), ext="jpg")
    f = root / "a" / "0.jpg"
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2 x 1000 pixels: 64x64 is 4096
    with pytest.raises(DatasetError, match="decompression-bomb limit") as e1:
        decode_image(f.read_bytes(), f)
    with pytest.raises(DatasetError, match="decompression-bomb limit") as e2:
        decode_rgb(f)
    with pytest.raises(DatasetError, match="decompression-bomb limit"):
        ImageFolderStream(root, size=32, augment="resized-crop").train_image(0)
    assert str(f) in str(e1.value) and str(f) in str(e2.value)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 4096)
    assert image_header_size(f.read_bytes(), f) == (64, 64) and decode_rgb(f).shape == (3, 64, 64)


# --- tiny images are refused, not enlarged without a word --------------------------------------------------------
def test_an_image_too_small_to_enlarge_is_refused_on_every_path(tmp_path):
    root = _folder(tmp_path / "d", per_class=2, hw=(40, 40))
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "b" / "tiny.png")
    with pytest.raises(DatasetError, match=r"tiny.png is 1x1: too small to enlarge to 146 px"):
        load_image_folder(root, size=128, resize=146, cache=False)
    stream = ImageFolderStream(root, size=128, resize=146, augment="resized-crop")
    i = [stream.source(k) for k in range(len(stream))].index("b/tiny.png")
    with pytest.raises(DatasetError, match="too small to enlarge"):
        stream[i]
    with pytest.raises(DatasetError, match="too small to enlarge"):
        stream.train_image(i)
    # the stated minimum: the shorter side must be at least ceil(target / MAX_UPSCALE)
    need = -(-146 // bagcert.data.MAX_UPSCALE)
    check_upscale(need, 500, 146)
    with pytest.raises(DatasetError, match=f"below {need} px"):
        check_upscale(need - 1, 500, 146)


def test_certify_refuses_a_tiny_image_in_one_line(tmp_path):
    root = _folder(tmp_path / "d", per_class=2, hw=(40, 40))
    Image.new("RGB", (1, 1)).save(root / "b" / "tiny.png")
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"], size=32)
    for path in ("memory", "stream"):
        with pytest.raises(SystemExit) as exc:
            certify.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--split", "all", "--data-path", path,
                          "--patch-sizes", "3", "--output", str(tmp_path / f"o-{path}"), "--no-progress"])
        assert "tiny.png is 1x1: too small to enlarge" in _one_line(exc)


# --- a bad file read by a loader process: its own line, not the worker's traceback --------------------------------
def test_a_bad_file_in_a_loader_worker_is_its_one_line_message(tmp_path):
    root = _folder(tmp_path / "d", per_class=2, hw=(32, 32), ext="jpg")
    (root / "a" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    ds = ImageFolderStream(root, size=None)
    with pytest.raises(DatasetError) as exc:
        for _ in make_loader(ds, 2, train=False, workers=1):
            pass
    msg = str(exc.value)
    assert "1.jpg cannot be decoded" in msg and "Traceback" not in msg and "\n" not in msg


def test_train_on_the_stream_path_with_a_bad_file_is_one_line(tmp_path):
    root = _folder(tmp_path / "d", per_class=4, hw=(32, 32), ext="jpg")
    for f in root.glob("*/*.jpg"):  # whichever images the first batch draws
        f.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(SystemExit) as exc:
        cli_train.main(["--dataset", str(root), "--num-classes", "2", "--data-path", "stream", "--workers", "1",
                        "--output", str(tmp_path / "r")] + QUICK_TRAIN + ["--batch-size", "2"])
    assert ".jpg cannot be decoded as an image" in _one_line(exc)


def test_certify_on_the_stream_path_with_a_bad_file_is_one_line(tmp_path):
    root = _folder(tmp_path / "d", per_class=3, hw=(32, 32), ext="jpg")
    (root / "a" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    with pytest.raises(SystemExit) as exc:
        certify.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--split", "all", "--data-path", "stream",
                      "--patch-sizes", "3", "--output", str(tmp_path / "o"), "--no-progress"])
    assert "1.jpg cannot be decoded" in _one_line(exc) and not (tmp_path / "o").exists()


# --- an output folder inside the dataset ------------------------------------------------------------------------
def test_an_output_folder_inside_the_dataset_is_refused(tmp_path):
    root = _folder(tmp_path / "d", per_class=4, hw=(32, 32))
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    with pytest.raises(SystemExit) as exc:
        cli_train.main(["--dataset", str(root), "--num-classes", "2", "--output", str(root / "run")] + QUICK_TRAIN)
    assert "lies inside the dataset folder" in _one_line(exc)
    with pytest.raises(SystemExit) as exc:
        certify.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--split", "all", "--output", str(root / "report"),
                      "--no-progress"])
    assert "lies inside the dataset folder" in _one_line(exc)
    with pytest.raises(SystemExit) as exc:
        cli_roi.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--split", "all", "--output", str(root),
                      "--quiet"])
    assert "lies inside the dataset folder" in _one_line(exc)
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]  # no 3rd class folder for the next run


# --- defensive-patch, roi, imagenet-a: checked before any work ------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--width", "40"], "frame width 40 is too wide"),
    (["--outer", "64"], "frame outer side must lie in"),
    (["--shape", "square", "--size", "33"], "does not fit a 32x32 image"),
    (["--shape", "square", "--width", "3"], "--width applies to --shape frame only"),
    (["--attack-patch-size", "64"], "--attack-patch-size 64 is larger than the 32x32 images"),
    (["--stage1-lr", "-1"], "--stage1-lr: must be a number > 0"),
    (["--blank", "2"], "--blank: must be a number in [0, 1]"),
    (["--gamma", "-1"], "--gamma: must be a decay factor in (0, 1]"),
    (["--pgd-eps", "2"], "--pgd-eps: must be a number in [0, 1]"),
])
def test_defensive_patch_refuses_what_cannot_run_before_making_a_patch(argv, match, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    base = ["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--num-eval", "4", "--num-train", "4",
            "--stage1-epochs", "1", "--stage2-epochs", "1", "--milestones", "1", "--corruptions", "none", "--pgd-steps", "1",
            "--attack-steps", "1", "--output", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        cli_defpatch.main(base + argv)
    text = capsys.readouterr().err if exc.value.code == 2 else _one_line(exc)
    assert match in text and not (tmp_path / "o").exists()


@pytest.mark.parametrize("eps", ["-0.1", "5"])
def test_roi_refuses_an_eps_outside_the_pixel_range(eps, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    with pytest.raises(SystemExit) as exc:
        cli_roi.main(["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--num-images", "2", "--steps", "1",
                      "--attack", "pgd", "--eps", eps, "--output", str(tmp_path / "o"), "--quiet"])
    assert exc.value.code == 2 and "--eps: must be a number in [0, 1]" in capsys.readouterr().err


def test_imagenet_a_refuses_a_crop_below_the_receptive_field(tmp_path, capsys):
    wnids = ["n01440764", "n02102040"]
    root = _folder(tmp_path / "d", classes=wnids, per_class=2, hw=(24, 24))
    ckpt = _checkpoint(tmp_path / "m.pt", wnids)
    with pytest.raises(SystemExit) as exc:
        cli_ina.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--size", "4", "--output", str(tmp_path / "o"),
                      "--no-progress", "--quiet"])
    assert "--size 4 is smaller than the model's receptive field (5 px)" in _one_line(exc)
    assert cli_ina.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--size", "16", "--output", str(tmp_path / "p"),
                         "--no-progress", "--quiet"]) == 0
    assert "note: --size 16 differs from the 32 px the checkpoint was trained at" in capsys.readouterr().err


# --- batch norm under DDP ---------------------------------------------------------------------------------------
def test_sync_bn_is_refused_off_cuda_and_said_to_do_nothing_in_one_process():
    cfg = TrainConfig(sync_bn=True)
    with pytest.raises(TrainingError, match="sync_bn needs CUDA"):
        check_sync_bn(cfg, 2, "cpu")
    assert "one process" in check_sync_bn(cfg, 1, "cpu")
    assert check_sync_bn(cfg, 2, "cuda") is None and check_sync_bn(TrainConfig(), 2, "cpu") is None


def test_train_refuses_sync_bn_under_torchrun_on_cpu_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before the process group is joined
    with pytest.raises(SystemExit) as exc:
        cli_train.main(["--dataset", "synthetic:16", "--sync-bn", "--output", str(tmp_path / "r")] + QUICK_TRAIN)
    assert "sync_bn needs CUDA" in _one_line(exc) and not (tmp_path / "r").exists()


_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, port, q):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        {body}

    if __name__ == "__main__":
        import socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        q = mp.get_context("spawn").SimpleQueue()
        ctx = mp.spawn(run, args=(port, q), nprocs=2, join=False)
        while not ctx.join(timeout=90):  # returns False each time one process ends while the other runs
            pass
        print(q.get() if not q.empty() else "no result")
""")


def _ddp(body: str, tmp_path) -> str:
    """Run ``body`` in two gloo processes (a script file: spawned workers import it); what rank 0 put in ``q``."""
    script = tmp_path / "ddp_script.py"
    script.write_text(_DDP_SCRIPT.replace("{body}", textwrap.indent(textwrap.dedent(body), " " * 4).lstrip()))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]


@pytest.mark.slow
def test_torch_refuses_sync_batch_norm_on_cpu_under_ddp(tmp_path):
    """What the CPU refusal rests on: torch's DDP rejects SyncBatchNorm in CPU modules (gloo). If a torch release
    lifts it, this fails, and --sync-bn can be allowed on CPU (docs/training.md)."""
    out = _ddp("""
        m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
        try:
            torch.nn.parallel.DistributedDataParallel(m)(torch.randn(2, 3, 8, 8)).sum().backward()
            msg = "ran"
        except ValueError as e:
            msg = str(e)
        if rank == 0:
            q.put(msg)
        dist.destroy_process_group()
    """, tmp_path)
    assert "SyncBatchNorm layers only work with GPU modules" in out, out


@pytest.mark.slow
def test_certify_leaves_without_a_gloo_error_when_a_peer_is_gone(tmp_path):
    """torchrun stops the other ranks with SIGTERM when one dies: the stopped rank says one line and leaves the
    process group without the barrier that would end in gloo's 'Connection closed by peer' traceback."""
    out = _ddp("""
        if rank == 1:
            os._exit(0)  # a killed rank
        import time
        from bagcert.runs import certify
        time.sleep(2)
        certify._run = lambda cfg: (_ for _ in ()).throw(SystemExit("stopped by SIGTERM; no report was written"))
        try:
            certify.certify_run(certify.CertifyConfig())
            q.put("returned")
        except SystemExit as e:
            q.put(f"SystemExit: {e.code}")
        except Exception as e:
            q.put(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
    """, tmp_path)
    assert out == "SystemExit: stopped by SIGTERM; no report was written", out
