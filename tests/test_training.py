"""Training: exact resumption and torch.distributed (2 CPU processes) against a single process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import bagcert
from bagcert.data import synthetic_dataset
from bagcert.training import (
    TrainConfig, _lr_at, _progress, calibration_window, plan_total_steps, replan_total_steps, train, window_seconds_per_step,
)
from conftest import ROOT, load_benchmark


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="cifar_bagnet5_s2", model_kwargs={"width": 8}, epochs=3, batch_size=16, ema=0.9,
                output=str(out), tensorboard=False, progress=False, eval_every=1.0, eval_patch_sizes=[2, 5], checkpoint_minutes=0.0,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    model, _ = bagcert.load_checkpoint(path)
    return model.state_dict()


def test_resume_gives_identical_weights(tmp_path):
    data, held = synthetic_dataset(64, seed=1), synthetic_dataset(16, seed=2)
    train(_cfg(tmp_path / "full"), data, held, log=lambda *a: None)
    # interrupted after 5 of 12 steps, then resumed from last.pt
    first = train(_cfg(tmp_path / "cut", max_steps=5), data, held, log=lambda *a: None)
    assert first["steps"] == 5 and (tmp_path / "cut" / "last.pt").is_file()
    second = train(_cfg(tmp_path / "cut"), data, held, resume=True, log=lambda *a: None)
    assert second["steps"] == 12
    a, b = _weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "cut" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_records(path):
    return [r for r in map(json.loads, open(path)) if "loss" in r]


def test_logged_training_stats_are_means_over_the_logging_window(tmp_path):
    data = synthetic_dataset(64, seed=1)
    # margin warm-up of one epoch (4 steps): loss_margin appears from step 2 on, so windows hold it for part of their steps
    every = train(_cfg(tmp_path / "every", log_every=1, margin_warmup_epochs=1.0), data, None, log=lambda *a: None)
    grouped = train(_cfg(tmp_path / "grouped", log_every=4, margin_warmup_epochs=1.0), data, None, log=lambda *a: None)
    assert every["steps"] == grouped["steps"] == 12
    per_step = {r["step"]: r for r in _train_records(tmp_path / "every" / "train_log.jsonl")}
    windows = _train_records(tmp_path / "grouped" / "train_log.jsonl")
    assert [r["step"] for r in windows] == [4, 8, 12]
    for rec in windows:
        steps = range(rec["step"] - 3, rec["step"] + 1)
        for key in ("loss", "loss_bce", "robust_train", "loss_margin"):
            vals = [per_step[s][key] for s in steps if key in per_step[s]]
            assert vals, key
            assert rec[key] == pytest.approx(sum(vals) / len(vals), rel=1e-5, abs=1e-7), (rec["step"], key)
    assert "loss_margin" not in per_step[1] and "loss_margin" in per_step[2]


def test_plan_total_steps_fits_the_budget():
    # 100 s budget, 10 s spent after 20 steps, 0.5 s/step, a 2 s evaluation every 10 steps (and one at the end):
    # r more steps cost 0.5 r + 2 (r / 10 + 1), so r = floor((100 - 10 - 2) / 0.7) = 125
    assert plan_total_steps(20, 10.0, 100.0, 0.5, 2.0, 10) == 145
    total = plan_total_steps(20, 10.0, 100.0, 0.5, 2.0, 10)
    r = total - 20
    assert 10.0 + 0.5 * r + 2.0 * (r / 10 + 1) <= 100.0 < 10.0 + 0.5 * (r + 1) + 2.0 * ((r + 1) / 10 + 1)
    assert plan_total_steps(20, 10.0, 100.0, 0.5, 0.0, 10) == 20 + 180
    assert plan_total_steps(20, 150.0, 100.0, 0.5, 2.0, 10) == 20  # spent: stop now
    with pytest.raises(ValueError, match="time budget"):
        plan_total_steps(20, 0.0, 0.0, 0.5, 2.0, 10)


def _budget_records(out):
    return [r for r in map(json.loads, open(out / "train_log.jsonl")) if "time_budget_plan" in r or "time_budget_replan" in r]


def _last_total(records):
    """The total steps of the latest plan or re-plan."""
    return (records[-1].get("time_budget_replan") or records[-1]["time_budget_plan"])["total_steps"]


def test_time_budget_plans_the_run_and_resume_keeps_the_plan(tmp_path):
    data, held = synthetic_dataset(64, seed=1), synthetic_dataset(16, seed=2)
    # 4 steps per epoch; the calibration window (steps 5 to 25) lies beyond the warm-up, so the plan comes at step 25
    assert calibration_window(4) == (5, 25)
    cfg = _cfg(tmp_path / "b", epochs=1, time_budget_minutes=0.25, max_steps=30)
    first = train(cfg, data, held, log=lambda *a: None)
    records = _budget_records(tmp_path / "b")
    assert "time_budget_plan" in records[0] and records[0]["step"] == 25 and records[0]["time_budget_plan"]["total_steps"] >= 25
    assert all("time_budget_replan" in r for r in records[1:])  # later evaluations may re-plan, never calibrate again
    planned = _last_total(records)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["epochs"] == pytest.approx(planned / 4) and saved["time_budget_minutes"] == 0.25
    assert first["steps"] == min(30, planned)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["planned_total_steps"] == planned
    if planned > 30:  # resume: the stored plan is kept (no second calibration), the run ends at its (re-)planned step
        second = train(_cfg(tmp_path / "b", epochs=1, time_budget_minutes=0.25), data, held, resume=True, log=lambda *a: None)
        records = _budget_records(tmp_path / "b")
        assert sum("time_budget_plan" in r for r in records) == 1
        assert second["steps"] == _last_total(records)


def test_replan_total_steps_keeps_a_plan_on_time_and_moves_one_that_is_not():
    # 100 s budget, at step 50 after 40 s, 100 steps left, 0.5 s/step, a 2 s evaluation every 10 steps:
    # 40 + 50 + 2 * 11 = 112 s, 12 % over: planned again, to what plan_total_steps gives
    assert replan_total_steps(50, 150, 40.0, 100.0, 0.5, 2.0, 10) == plan_total_steps(50, 40.0, 100.0, 0.5, 2.0, 10) == 50 + 82
    # on time within the tolerance (1 % of the budget): kept
    assert replan_total_steps(50, 132, 40.0, 100.0, 0.5, 2.0, 10) == 132
    assert replan_total_steps(50, 150, 40.0, 100.0, 0.5, 2.0, 10, tolerance=0.15) == 150
    # faster than planned: the run is lengthened
    assert replan_total_steps(50, 100, 40.0, 100.0, 0.25, 2.0, 10) > 100
    # the budget is spent: stop now
    assert replan_total_steps(50, 150, 120.0, 100.0, 0.5, 2.0, 10) == 50


def test_a_replanned_schedule_is_continuous_and_ends_at_zero():
    cfg = TrainConfig(lr=1.0, schedule="cosine")
    warmup, old_total, new_total, at = 10, 200, 150, 80
    anchor = (at, _progress(at, old_total, warmup))
    assert _lr_at(cfg, at, new_total, warmup, anchor) == pytest.approx(_lr_at(cfg, at, old_total, warmup))
    lrs = [_lr_at(cfg, s, new_total, warmup, anchor) for s in range(at, new_total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert max(a - b for a, b in zip(lrs, lrs[1:])) < 0.05  # no jump: steps of about pi/2 / 70 at most


def test_a_run_that_slows_down_after_its_plan_is_replanned_to_its_budget(tmp_path, monkeypatch):
    """A neighbour job that starts after the calibration window: each step then costs 40 ms more."""
    import bagcert.training.loop as training  # the loop looks ema_update up in its own module

    data, held = synthetic_dataset(64, seed=1), synthetic_dataset(16, seed=2)
    calls = {"n": 0}
    real_update = training.ema_update

    def slow_after_the_plan(ema, model, decay):
        calls["n"] += 1
        time.sleep(0.005 if calls["n"] <= 25 else 0.045)
        real_update(ema, model, decay)

    monkeypatch.setattr(training, "ema_update", slow_after_the_plan)
    budget_s = 8.0
    out = train(_cfg(tmp_path / "s", epochs=1, time_budget_minutes=budget_s / 60), data, held, log=lambda *a: None)
    assert calls["n"] == out["steps"]  # the loop's EMA update is the one slowed down
    records = _budget_records(tmp_path / "s")
    first = records[0]["time_budget_plan"]["total_steps"]
    replans = [r["time_budget_replan"]["total_steps"] for r in records if "time_budget_replan" in r]
    assert replans and min(replans) < first  # the slowdown shortened the run
    first_replan = next(r["time_budget_replan"] for r in records if "time_budget_replan" in r)
    assert first_replan["previous_total_steps"] == first and first_replan["projected_seconds_before"] > 1.01 * budget_s
    assert out["steps"] == replans[-1] < first
    assert out["wall_seconds"] < 1.2 * budget_s  # without re-planning: about twice the budget
    lrs = [r["lr"] for r in _train_records(tmp_path / "s" / "train_log.jsonl")]
    assert lrs[-1] < 0.05 * max(lrs)  # the schedule still anneals to (near) zero at the new end


def test_training_learns_synthetic_data(tmp_path):
    data, held = synthetic_dataset(256, seed=1), synthetic_dataset(64, seed=2)
    cfg = _cfg(tmp_path / "r", epochs=6, batch_size=32, lr=1e-2, ema=0.0, eval_every=6.0, model_kwargs={"width": 16}, checkpoint_minutes=5.0)
    summary = train(cfg, data, held, log=lambda *a: None)
    assert summary["eval"]["clean_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert summary["eval"]["certified_5"] > 0.3  # the certified loss makes held-out samples certifiable


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, cwd, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port())] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_distributed_training_matches_single_process(tmp_path):
    common = ["--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8, "norm": "gn"}',
              "--epochs", "2", "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.05", "--eval-images", "32",
              # the hard votes and the min over windows are discontinuous: a 1e-7 reduction-order difference
              # can flip a vote, so the exact comparison uses the continuous terms (BCE + CE) only
              "--margin-weight", "0",
              "--no-amp", "--ema", "0", "--no-progress", "--no-tensorboard", "--threads", "1"]
    ddp = _torchrun([str(ROOT / "train.py")] + common + ["--output", str(tmp_path / "ddp")], ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(ROOT / "train.py")] + common + ["--output", str(tmp_path / "single")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _weights(tmp_path / "ddp" / "model.pt"), _weights(tmp_path / "single" / "model.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    meta = bagcert.load_checkpoint(tmp_path / "ddp" / "model.pt")[1]
    assert meta["world_size"] == 2
    # evaluation during training sums counts over ranks: same numbers as one process
    ev_ddp = [json.loads(l) for l in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines() if '"eval"' in l]
    ev_one = [json.loads(l) for l in (tmp_path / "single" / "train_log.jsonl").read_text().splitlines() if '"eval"' in l]
    assert ev_ddp[-1]["eval"]["n"] == ev_one[-1]["eval"]["n"] == 32


def test_distributed_time_budget_run_plans_and_replans_on_every_rank(tmp_path):
    """Rank 0 decides the plan and each re-plan; a rank that ran a different number of steps would hang DDP."""
    args = [str(ROOT / "train.py"), "--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}',
            "--batch-size", "16", "--eval-images", "16", "--eval-every", "1", "--time-budget-minutes", "0.25",
            "--no-progress", "--no-tensorboard", "--threads", "1", "--output", str(tmp_path / "ddp")]
    ddp = _torchrun(args, ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    records = _budget_records(tmp_path / "ddp")
    assert "time_budget_plan" in records[0]
    done = [json.loads(l) for l in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines() if '"done"' in l]
    assert done[-1]["steps"] == _last_total(records) == bagcert.load_checkpoint(tmp_path / "ddp" / "model.pt")[1]["trained_steps"]


def test_distributed_certification_matches_single_process(tiny_checkpoint, tmp_path):
    args = [str(ROOT / "certify.py"), "--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:37", "--patch-sizes", "1,5,3x7",
            "--no-progress", "--quiet"]
    ddp = _torchrun(args + ["--output", str(tmp_path / "ddp")], ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable] + args + ["--output", str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    r2 = json.loads((tmp_path / "ddp" / "results.json").read_text())
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    assert r2["certified_count"] == r1["certified_count"] and r2["correct_count"] == r1["correct_count"]
    assert r2["config"]["world_size"] == 2
    assert (tmp_path / "ddp" / "per_sample.csv").read_text() == (tmp_path / "one" / "per_sample.csv").read_text()


def test_init_from_starts_at_the_checkpoint_weights(tmp_path):
    first = train(_cfg(tmp_path / "a", epochs=1), synthetic_dataset(64, 10, 32, seed=0), None, log=lambda *a: None)
    src = tmp_path / "a" / "model.pt"
    # zero steps: the exported model is the source model exactly
    train(_cfg(tmp_path / "b", epochs=1, max_steps=0, ema=0.0, init_from=str(src)), synthetic_dataset(64, 10, 32, seed=0), None, log=lambda *a: None)
    a, b = _weights(src), _weights(tmp_path / "b" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, meta = bagcert.load_checkpoint(tmp_path / "b" / "model.pt")
    assert meta["init_from"]["path"] == str(src) and meta["init_from"]["trained_steps"] == first["steps"]
    with pytest.raises(ValueError, match="differs from the configured"):
        train(_cfg(tmp_path / "c", model_kwargs={"width": 16}, init_from=str(src)), synthetic_dataset(64, 10, 32), None, log=lambda *a: None)


def test_training_on_a_dataset_with_a_split_name_writes_the_checkpoint(tmp_path):
    """CIFAR-10 folders carry info['split'] = 'train'/'test' (a name, not a seeded split): regression for a crash
    at the very end of training when the metadata was built."""
    data = bagcert.data.load_dataset(str(ROOT / "samples" / "cifar10"), "test")
    assert data.info["split"] == "test"
    train(_cfg(tmp_path / "r", epochs=1, eval_every=1e9), data, None, log=lambda *a: None)
    _, meta = bagcert.load_checkpoint(tmp_path / "r" / "model.pt")
    assert "split" not in meta and meta["classes"] == list(data.classes)


def test_ema_decay_warms_up_and_the_update_is_the_stated_average():
    from bagcert.training import ema_decay, ema_update

    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 90) == pytest.approx(0.91)
    assert ema_decay(0.999, 10**6) == 0.999 and ema_decay(0.5, 0) == pytest.approx(0.1)
    # the weight left on the initialisation after 780 steps: tiny with the warm-up, 46 % without
    keep = 1.0
    for t in range(780):
        keep *= ema_decay(0.999, t)
    assert keep < 1e-3 and 0.999 ** 780 > 0.45
    torch.manual_seed(0)
    a, b = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        b.weight.fill_(3.0)
        b.num_batches_tracked.fill_(7)
    w0 = a.weight.clone()
    ema_update(a, b, 0.75)
    assert torch.allclose(a.weight, 0.75 * w0 + 0.25 * 3.0) and int(a.num_batches_tracked) == 7


def test_training_curves_table_aligns_runs_by_epoch(tmp_path, capsys):
    mod = load_benchmark("training_curves")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ev = lambda ep, s, c: json.dumps({"step": 1, "epoch": ep, "eval": {"n": 10, "clean_accuracy": c, "certified_5": c / 2}, "wall_seconds": s})  # noqa: E731
    # run a evaluated epoch 2 twice (resumed from an earlier checkpoint): the later record counts
    a.write_text("\n".join([json.dumps({"step": 1, "loss": 1.0}), ev(2, 60, 0.1), ev(2, 90, 0.3), ev(4, 180, 0.5)]) + "\n")
    b.write_text(ev(4, 120, 0.4) + "\n")
    assert mod.main([f"A={a}", f"B={b}", "--metric", "certified_5"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert rows == ["| 2 | 15.0 | 2 | | |", "| 4 | 25.0 | 3 | 20.0 | 2 |"]
    with pytest.raises(SystemExit, match="no metric 'certified_9'"):
        mod.main([f"A={a}", "--metric", "certified_9"])
    with pytest.raises(SystemExit, match="expected NAME=path"):
        mod.main([str(a)])


def test_window_seconds_per_step_weighs_the_last_intervals_by_their_steps():
    intervals = [(100, 90.0), (100, 20.0), (300, 60.0), (100, 30.0)]
    assert window_seconds_per_step(intervals, 1) == pytest.approx(0.3)
    assert window_seconds_per_step(intervals, 3) == pytest.approx((20 + 60 + 30) / 500)  # not the mean of 0.2, 0.2, 0.3
    assert window_seconds_per_step(intervals[:2], 3) == pytest.approx(110 / 200)  # fewer intervals than the window: all
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_seconds_per_step(intervals, 0)
    with pytest.raises(ValueError, match="at least one interval"):
        window_seconds_per_step([], 3)


def _budgeted_log(path, speeds, budget_s=1000.0, plan_step=105, plan_total=2000, every=100, eval_s=2.0):
    """A train_log.jsonl of a budgeted run whose intervals between evaluations ran at ``speeds`` s/step."""
    recs = [{"step": plan_step, "time_budget_plan": {"budget_seconds": budget_s, "seconds_per_step": 0.5, "seconds_per_eval": eval_s,
                                                      "elapsed_seconds": 50.0, "total_steps": plan_total, "epochs": 1.0}}]
    step, wall = plan_step, 50.0
    for v in speeds:
        n = (step // every + 1) * every - step
        step, wall = step + n, wall + n * v + eval_s
        recs.append({"step": step, "epoch": 1.0, "eval": {"n": 10, "clean_accuracy": 0.5}, "wall_seconds": wall})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_replan_replay_reproduces_a_log_and_a_window_re_plans_less_under_noise(tmp_path, capsys):
    mod = load_benchmark("replan_replay")
    log = tmp_path / "train_log.jsonl"
    # alternating fast and slow intervals around 0.47 s/step: on time on average, noisy one by one
    _budgeted_log(log, [0.42, 0.52] * 12)
    assert mod.main([str(log), "--windows", "1,3", "--output", str(tmp_path / "r.json")]) == 0
    one, three = json.loads((tmp_path / "r.json").read_text())[str(log)]["replays"]
    assert one["window"] == 1 and three["window"] == 3
    assert three["replans"] < one["replans"]
    assert abs(three["off_budget_percent"]) < 3 and abs(one["off_budget_percent"]) < 3
    # a run that resumed and redid steps 205-305: only the later records count
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:4] + lines[2:]) + "\n")
    run = mod.read_run(log)
    assert [s for s, _ in run["evals"]] == sorted({s for s, _ in run["evals"]})
    log.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(SystemExit, match="no time_budget_plan"):
        mod.main([str(log)])


@pytest.mark.parametrize("field, bad", [
    ("batch_size", 0), ("log_every", 0), ("epochs", -1.0), ("lr", float("nan")), ("eval_every", 0.0), ("ema", 1.0),
    ("test_fraction", 1.0), ("resize", 0), ("batch_size", True), ("cutout", -4), ("checkpoint_minutes", -1.0),
    ("label_smoothing", 1.0), ("time_budget_minutes", 0.0), ("max_steps", -1),
])
def test_train_refuses_numbers_no_run_can_use(field, bad, tmp_path):
    cfg = _cfg(tmp_path / "x", **{field: bad})
    with pytest.raises(ValueError, match=f"^{field} must be"):
        train(cfg, synthetic_dataset(32, seed=1), log=lambda *a: None)
    assert not (tmp_path / "x").exists()  # refused before anything is written
    assert _cfg(tmp_path / "y").check() is not None  # the defaults of these tests pass


def test_train_cli_names_the_flag_of_a_bad_number(tmp_path, capsys):
    import train as train_cli

    with pytest.raises(SystemExit, match=r"batch_size must be an int >= 1, got 0 \(--batch-size or 'batch_size' in the config file\)"):
        train_cli.main(["--dataset", "synthetic", "--batch-size", "0", "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_distributed_stream_path_with_grad_accum_matches_one_process_without(tmp_path):
    """torchrun (2 gloo processes) on the stream path with two accumulated micro-batches of 8 (no_sync on the
    first) against one process on the stream path with one batch of 16: the same images, augmentations and steps."""
    common = ["--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8, "norm": "gn"}',
              "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05", "--eval-images", "16", "--margin-weight", "0",
              "--data-path", "stream", "--workers", "0", "--no-amp", "--ema", "0", "--margin-reduce", "min", "--bce-pos-weight", "1",
              "--no-progress", "--no-tensorboard",
              "--threads", "1"]
    ddp = _torchrun([str(ROOT / "train.py")] + common + ["--batch-size", "8", "--grad-accum", "2", "--output", str(tmp_path / "ddp")], ROOT)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, str(ROOT / "train.py")] + common + ["--batch-size", "16", "--output", str(tmp_path / "one")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _weights(tmp_path / "ddp" / "model.pt"), _weights(tmp_path / "one" / "model.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    rec = [json.loads(l) for l in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines() if '"data_path"' in l]
    assert rec[0]["data_path"]["path"] == "stream" and bagcert.load_checkpoint(tmp_path / "ddp" / "model.pt")[1]["trained_steps"] == 8
