"""Training runs never lose or mix work: graceful stop on SIGINT/SIGTERM, --resume checks its arguments, the log is
cut back to the checkpoint, stale temporaries are removed, a too-small time budget is refused, exports carry the data
record, and train.py checks --output and --model before any work."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bagcert
import train as train_cli
from bagcert.data import synthetic_dataset
from bagcert.training import (
    RESUME_ALLOWED, RESUME_REFUSED, TrainConfig, TrainingError, cut_log, export_checkpoint, remove_stale_temporaries, train,
)
from conftest import ROOT

QUIET = dict(log=lambda *a: None)


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="cifar_bagnet5_s2", model_kwargs={"width": 8}, epochs=3, batch_size=16, ema=0.9,
                output=str(out), tensorboard=False, progress=False, eval_every=1.0, eval_patch_sizes=[2, 5],
                checkpoint_minutes=0.0, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _data():
    return synthetic_dataset(64, seed=1), synthetic_dataset(16, seed=2)


def _weights(path):
    model, _ = bagcert.load_checkpoint(path)
    return model.state_dict()


def _records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _signal_at_first_eval(signum):
    def log(msg):
        if msg.startswith("[eval]"):
            os.kill(os.getpid(), signum)
    return log


def test_sigterm_finishes_the_step_writes_last_pt_and_resume_matches_an_uninterrupted_run(tmp_path):
    data, held = _data()
    train(_cfg(tmp_path / "full"), data, held, **QUIET)
    before = signal.getsignal(signal.SIGTERM)
    # the first evaluation (end of epoch 1, step 4) sends SIGTERM to this process
    stopped = train(_cfg(tmp_path / "cut", log_every=1), data, held, log=_signal_at_first_eval(signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    assert stopped["stopped"] == "SIGTERM" and stopped["exit_status"] == 143 and stopped["steps"] == 4
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "cut" / "model.pt").exists()
    assert _records(tmp_path / "cut")[-1] == {"step": 4, "stopped": "SIGTERM", "wall_seconds": pytest.approx(stopped["wall_seconds"])}
    resumed = train(_cfg(tmp_path / "cut", log_every=1), data, held, resume=True, **QUIET)
    assert resumed["steps"] == 12 and "stopped" not in resumed
    a, b = _weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "cut" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _records(tmp_path / "cut") if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 13))


def test_sigint_is_a_graceful_stop_not_a_keyboard_interrupt(tmp_path):
    data, held = _data()
    stopped = train(_cfg(tmp_path / "i", epochs=2), data, held, log=_signal_at_first_eval(signal.SIGINT))
    assert stopped["stopped"] == "SIGINT" and stopped["exit_status"] == 130 and stopped["steps"] == 4
    assert torch.load(tmp_path / "i" / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_cli_stops_on_a_signal_with_a_checkpoint_and_resumes(tmp_path, signum):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2",
            "--model-kwargs", '{"width": 8}', "--epochs", "1000", "--batch-size", "16", "--eval-images", "16",
            "--checkpoint-minutes", "0", "--log-every", "1", "--no-progress", "--no-tensorboard", "--threads", "1"]
    proc = subprocess.Popen(args + ["--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (out / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"stopped by {signal.Signals(signum).name} after step ")
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    recs = _records(out)
    assert recs[-1]["stopped"] == signal.Signals(signum).name and recs[-1]["step"] == step
    assert max(r.get("step", 0) for r in recs) == step  # nothing logged beyond the checkpoint
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    if signum == signal.SIGTERM:  # the documented continuation: the stored config, --resume (here with a nearer end)
        rc = train_cli.main(["--config", str(out / "config.json"), "--resume", "--max-steps", str(step + 2)])
        assert rc == 0
        steps = [r["step"] for r in _records(out) if "loss" in r]
        assert steps == list(range(1, step + 3))
        assert bagcert.load_checkpoint(out / "model.pt")[1]["trained_steps"] == step + 2


def test_resume_refuses_other_settings_before_writing_and_records_allowed_ones(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2", "--batch-size", "16", "--eval-images", "16",
              "--no-progress", "--no-tensorboard", "--threads", "1", "--output", str(out)]
    assert train_cli.main(common + ["--model-kwargs", '{"width": 8}', "--epochs", "3", "--max-steps", "2"]) == 0
    files = _snapshot(out)
    with pytest.raises(SystemExit, match=r"model_kwargs: \{'width': 8\} -> \{'width': 16\}"):
        train_cli.main(common + ["--model-kwargs", '{"width": 16}', "--epochs", "3", "--resume"])
    with pytest.raises(SystemExit, match=r"batch_size: 16 -> 32; lr: 0.002 -> 0.01") as e:
        train_cli.main(["--config", str(out / "config.json"), "--batch-size", "32", "--lr", "0.01", "--resume"])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="already holds a run"):  # a fresh run would overwrite last.pt
        train_cli.main(["--config", str(out / "config.json")])
    assert _snapshot(out) == files  # nothing written by the refused calls
    # the stored config still resumes; a new end and evaluation interval are allowed and recorded
    assert train_cli.main(["--config", str(out / "config.json"), "--resume", "--epochs", "1", "--eval-every", "0.5",
                           "--max-steps", "3"]) == 0
    resumed = [r for r in _records(out) if "resumed" in r]
    assert resumed == [{"step": 2, "resumed": {"wall_seconds": pytest.approx(resumed[0]["resumed"]["wall_seconds"]),
                                               "changed": {"epochs": [3.0, 1.0], "eval_every": [2.0, 0.5], "max_steps": [2, 3]}}}]  # 2.0: the recipe default
    assert json.loads((out / "config.json").read_text())["epochs"] == 1.0
    # the run is finished (done at its --max-steps): resuming it again says so, exits 0 and changes no byte
    files = _snapshot(out)
    capsys.readouterr()
    assert train_cli.main(["--config", str(out / "config.json"), "--resume"]) == 0
    assert _snapshot(out) == files and '"already_finished": true' in capsys.readouterr().out


def test_resume_key_lists_cover_every_config_field_once():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert RESUME_ALLOWED | RESUME_REFUSED == fields and not RESUME_ALLOWED & RESUME_REFUSED


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    data, held = _data()
    out = tmp_path / "r"
    train(_cfg(out, max_steps=4, log_every=1), data, held, **QUIET)
    early = (out / "last.pt").read_bytes()
    train(_cfg(out, max_steps=9, log_every=1), data, held, resume=True, **QUIET)
    (out / "last.pt").write_bytes(early)  # killed after step 9 with its last checkpoint at step 4
    train(_cfg(out, log_every=1), data, held, resume=True, **QUIET)
    recs = _records(out)
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 13))
    walls = [r["wall_seconds"] for r in recs if "eval" in r]
    assert [r["step"] for r in recs if "eval" in r] == [4, 8, 12] and walls == sorted(walls)
    assert sum("done" in r for r in recs) == 1 and recs[-1]["done"] and recs[-1]["steps"] == 12


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    data, held = _data()
    out = tmp_path / "f"
    train(_cfg(out), data, held, **QUIET)
    files = _snapshot(out)
    messages = []
    again = train(_cfg(out), data, held, resume=True, log=messages.append)
    assert again["already_finished"] and again["steps"] == 12
    assert _snapshot(out) == files
    assert len(messages) == 1 and "finished run" in messages[0]


def test_cut_log_keeps_the_records_up_to_the_step_and_drops_a_partial_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "eval": {}}, {"step": 3, "loss": 0.5}, {"done": True, "steps": 3}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert cut_log(log, 2) == 3
    assert [json.loads(x) for x in log.read_text().splitlines()] == lines[:2]
    before = log.read_bytes()
    assert cut_log(log, 2) == 0 and log.read_bytes() == before


def test_stale_temporaries_of_the_run_are_removed_and_nothing_else(tmp_path):
    data, held = _data()
    out = tmp_path / "t"
    train(_cfg(out, max_steps=2), data, held, **QUIET)
    stale = [".last.pt.k3j_x9a2.tmp", ".config.json.abcd1234.tmp", ".train_log.jsonl.zz99yy88.tmp", ".model.pt.q1w2e3r4.tmp"]
    foreign = [".notes.txt.abcd1234.tmp", "last.pt.abcd1234.tmp", ".last.pt.tmp", "mine.tmp"]
    for name in stale + foreign:
        (out / name).write_bytes(b"x")
    messages = []
    train(_cfg(out, max_steps=3), data, held, resume=True, log=messages.append)
    left = {p.name for p in out.iterdir()}
    assert not left & set(stale) and set(foreign) <= left
    assert any("removed 4 temporary file(s)" in m for m in messages)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_a_time_budget_below_calibration_plus_one_evaluation_is_refused(tmp_path, monkeypatch):
    import bagcert.training.loop as training  # the loop looks ema_update up in its own module

    data, held = _data()
    real_update = training.ema_update
    slowed = []

    def slow(ema, model, decay):
        slowed.append(1)
        time.sleep(0.02)
        real_update(ema, model, decay)

    monkeypatch.setattr(training, "ema_update", slow)
    out = tmp_path / "b"
    # 25 calibration steps of at least 20 ms: more than a 0.3 s budget
    with pytest.raises(TrainingError, match=r"time budget 0.005 min is too small: .* give --time-budget-minutes (\d+\.\d\d) or more"):
        train(_cfg(out, epochs=1, time_budget_minutes=0.005, checkpoint_minutes=5.0), data, held, **QUIET)
    assert len(slowed) == 25  # the loop's EMA update is the one slowed down (each calibration step)
    recs = _records(out)
    refused = recs[-1]["time_budget_refused"]
    assert recs[-1]["step"] == 25 and refused["minimum_seconds"] > refused["budget_seconds"] == pytest.approx(0.3)
    assert not any("time_budget_plan" in r or "done" in r for r in recs)
    assert not (out / "model.pt").exists() and not (out / "last.pt").exists()


def _folder_without_splits(root):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()).save(root / c / f"{i}.png")


def test_export_from_a_folder_without_splits_carries_the_split_and_the_data_keys(tmp_path, capsys):
    _folder_without_splits(tmp_path / "data")
    out = tmp_path / "run"
    assert train_cli.main(["--dataset", str(tmp_path / "data"), "--num-classes", "2", "--image-size", "32", "--model", "cifar_bagnet5_s2",
                           "--model-kwargs", '{"width": 8}', "--max-steps", "2", "--batch-size", "8", "--test-fraction", "0.25",
                           "--output", str(out), "--no-progress", "--no-tensorboard", "--threads", "1"]) == 0
    _, final = bagcert.load_checkpoint(out / "model.pt")
    export_checkpoint(out, tmp_path / "export.pt")
    _, exported = bagcert.load_checkpoint(tmp_path / "export.pt")
    assert exported["split"] == final["split"] and final["split"]["num_test"] == 6 and final["split"]["num_images"] == 24
    for key in ("dataset", "classes", "split", "input_size", "trained_steps", "epochs", "config"):
        assert exported[key] == final[key], key
    assert exported["classes"] == ["cat", "dog"] and exported["intermediate_export"] is True


def test_export_of_a_last_pt_without_a_data_record_asks_for_it(tmp_path):
    data, held = _data()
    train(_cfg(tmp_path / "o", max_steps=1), data, held, **QUIET)
    state = torch.load(tmp_path / "o" / "last.pt", weights_only=True)
    del state["data"]
    torch.save(state, tmp_path / "o" / "last.pt")
    with pytest.raises(bagcert.CheckpointError, match="no record of its training data"):
        export_checkpoint(tmp_path / "o", tmp_path / "x.pt")
    _, meta = bagcert.load_checkpoint(export_checkpoint(tmp_path / "o", tmp_path / "y.pt", dataset="synthetic",
                                                        classes=list(data.classes)))
    assert meta["classes"] == list(data.classes)


def test_train_cli_checks_the_output_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    # the dataset does not exist either: the output is checked first
    base = ["--dataset", str(tmp_path / "no-such-data"), "--model", "cifar_bagnet5_s2"]
    with pytest.raises(SystemExit, match=r"^output .*file is a file; expected a folder"):
        train_cli.main(base + ["--output", str(tmp_path / "file")])
    with pytest.raises(SystemExit, match=r"^output .* lies under the file .*file"):
        train_cli.main(base + ["--output", str(tmp_path / "file" / "run")])
    with pytest.raises(SystemExit, match=r"^model must be a registered model name, got 'nope'; available: .*cifar_bagnet5_s2"):
        train_cli.main(["--dataset", "synthetic:32", "--model", "nope", "--output", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
    with pytest.raises(SystemExit, match="not found") as e:  # a DatasetError: one line, not a traceback
        train_cli.main(base + ["--output", str(tmp_path / "d")])
    assert "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_cli_refuses_a_read_only_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(SystemExit, match="is not writable"):
        train_cli.main(["--dataset", "synthetic:32", "--output", str(ro / "run")])
    ro.chmod(0o755)
