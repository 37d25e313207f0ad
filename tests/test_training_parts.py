"""The parts of the training loop (the modules of the bagcert.training package) on their own, the stream data path in training,
gradient accumulation and the learning-rate rule."""

import json

import pytest
import torch

import bagcert
from bagcert.data import load_dataset, synthetic_dataset
from bagcert.streaming import TensorStream, open_stream
from bagcert.training import (
    Checkpointer, Evaluator, MemoryBatches, RunState, StatWindow, StreamBatches, TimeBudget, TrainConfig, TrainingError,
    TrainLog, base_lr, evaluate, stream_augmentation, train, train_step,
)
from conftest import ROOT

QUIET = dict(log=lambda *a: None)


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="cifar_bagnet5_s2", model_kwargs={"width": 8}, epochs=2, batch_size=16, ema=0.9,
                output=str(out), tensorboard=False, progress=False, eval_every=1.0, eval_patch_sizes=[2, 5],
                checkpoint_minutes=0.0, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return bagcert.load_checkpoint(path)[0].state_dict()


def _records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# --- RunState, Checkpointer, TrainLog, StatWindow -------------------------------------------------
def test_run_state_ends_at_the_total_the_calibration_window_or_max_steps():
    run = RunState(steps_per_epoch=4, total_steps=12, warmup=4)
    assert run.end == 12 and run.position() == (0, 0)
    run.step = 6
    assert run.position() == (1, 2) and run.epoch == 1.5
    run.min_end, run.planned = 25, False  # an unplanned budget run must reach its calibration window
    assert run.end == 25
    run.max_steps = 20
    assert run.end == 20
    run.set_total(40)
    assert run.planned and run.min_end == 0 and run.end == 20 and run.total_steps == 40


def test_checkpointer_refuses_and_saves(tmp_path):
    clock = Clock()
    ck = Checkpointer(tmp_path, every_minutes=1.0, clock=clock)
    assert ck.load(resume=True, compare=lambda c: {}) == (None, {})
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = RunState(steps_per_epoch=4, total_steps=30, step=7, planned=True, anchor=(5, 0.25))
    assert not ck.due()
    clock.t = 61.0
    assert ck.due()
    ck.save(run, {"seed": 3}, model, opt, ema, {"dataset": "d"}, 12.5, budgeted=True)
    assert not ck.due()  # the clock restarts at a save
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["step"] == 7 and state["planned_total_steps"] == 30 and state["schedule_anchor"] == [5, 0.25]
    assert state["wall_seconds"] == 12.5 and "ema" in state and state["config"] == {"seed": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left
    with pytest.raises(TrainingError, match="already holds a run"):
        ck.load(resume=False, compare=lambda c: {})
    seen = []
    state2, changes = ck.load(resume=True, compare=lambda c: seen.append(c) or {"epochs": [1, 2]})
    assert seen == [{"seed": 3}] and changes == {"epochs": [1, 2]} and state2["step"] == 7
    torch.save({"step": 1}, tmp_path / "last.pt")
    with pytest.raises(bagcert.checkpoint.CheckpointError, match="not a bagcert training checkpoint"):
        ck.load(resume=True, compare=lambda c: {})
    other = Checkpointer(tmp_path / "o", is_main=False, every_minutes=0.0, clock=clock)
    other.save(run, {}, model, opt, None, {}, 1.0, budgeted=False)
    assert not other.due() and not (tmp_path / "o").exists()  # only rank 0 writes


def test_train_log_cuts_on_start_and_only_rank0_writes(tmp_path):
    said = []
    log = TrainLog(tmp_path / "r", say=said.append)
    (tmp_path / "r").mkdir()
    log.path.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 2, "loss": 1.0}, {"step": 5, "loss": 0.5}, {"done": True}]))
    (tmp_path / "r" / ".last.pt.abc123.tmp").write_text("x")
    log.start(3, resumed=True)
    assert [json.loads(x) for x in log.path.read_text().splitlines()] == [{"step": 2, "loss": 1.0}]
    assert any("dropped 2 record(s)" in m and "resumes" in m for m in said) and any("removed 1 temporary" in m for m in said)
    log.append({"step": 4, "x": 1})
    assert json.loads(log.path.read_text().splitlines()[-1]) == {"step": 4, "x": 1}
    quiet = TrainLog(tmp_path / "q", is_main=False, tensorboard=True)
    quiet.start(0, resumed=False)
    quiet.append({"step": 1})
    quiet.open_tensorboard()
    assert not (tmp_path / "q").exists() and quiet.writer is None


def test_stat_window_means_each_key_over_the_steps_that_had_it():
    clock = Clock()
    w = StatWindow(clock)
    w.add({"loss": torch.tensor(1.0)}, 16)
    w.add({"loss": torch.tensor(3.0), "margin": torch.tensor(0.5)}, 16)
    clock.t = 2.0
    means, ips = w.flush()
    assert means == {"loss": 2.0, "margin": 0.5} and ips == 16.0
    w.add({"loss": torch.tensor(5.0)}, 8)
    clock.t = 3.0
    assert w.flush() == ({"loss": 5.0}, 8.0)  # a new window after a flush


# --- TimeBudget --------------------------------------------------------------------------------
def test_time_budget_plans_after_the_window_and_replans_a_slower_run(tmp_path):
    clock, said = Clock(), []
    log = TrainLog(tmp_path, say=said.append)
    run = RunState(steps_per_epoch=10, total_steps=10, warmup=10, planned=False)
    totals = []
    budget = TimeBudget(1.0, run, eval_every_steps=10, log=log, elapsed=clock, on_total=lambda r: totals.append(r.total_steps),
                        clock=clock)
    assert (budget.cal_start, budget.cal_end) == (5, 25) and run.end == 25
    done = []
    for _ in range(25):  # 0.1 s per step
        run.step += 1
        clock.t += 0.1
        done.append(budget.calibration_done(run))
    assert done == [False] * 24 + [True]
    budget.plan(run, eval_seconds=lambda: 1.0)
    # 60 s budget, 2.5 s spent, 0.1 s/step, 1 s per evaluation every 10 steps: r = floor((60 - 2.5 - 1) / 0.2) = 282
    assert run.planned and run.total_steps == 25 + 282 == totals[-1]
    plan = _records(tmp_path)[-1]
    assert plan["step"] == 25 and plan["time_budget_plan"]["total_steps"] == 307
    assert not budget.calibration_done(run)  # never calibrates again
    for _ in range(5):  # to step 30 at 0.4 s/step: four times slower than planned
        run.step += 1
        clock.t += 0.4
    budget.evaluated(run, t_eval0=clock.t)
    assert run.total_steps < 307 and "time_budget_replan" in _records(tmp_path)[-1]
    assert _records(tmp_path)[-1]["time_budget_replan"]["previous_total_steps"] == 307


def test_time_budget_refuses_a_budget_below_the_window_and_one_evaluation(tmp_path):
    clock = Clock()
    log = TrainLog(tmp_path, say=lambda m: None)
    run = RunState(steps_per_epoch=10, total_steps=10, warmup=10, planned=False)
    budget = TimeBudget(0.01, run, eval_every_steps=10, log=log, elapsed=clock, clock=clock)
    for _ in range(25):
        run.step += 1
        clock.t += 0.1
        budget.calibration_done(run)
    with pytest.raises(TrainingError, match=r"time budget 0.01 min is too small"):
        budget.plan(run, eval_seconds=lambda: 1.0)
    assert _records(tmp_path)[-1]["time_budget_refused"]["minimum_seconds"] == pytest.approx(3.5)
    assert not run.planned


# --- train_step, gradient accumulation, the lr rule ---------------------------------------------
def test_train_step_with_two_micro_batches_equals_one_step_on_their_union():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(n.parameters(), lr=0.1) for n in nets]

    def loss_of(z, t):
        loss = torch.nn.functional.cross_entropy(z, t)
        return loss, {"loss": loss.detach()}

    one = train_step(nets[0], opts[0], [(x, y)], loss_of, lr=0.05)
    two = train_step(nets[1], opts[1], [(x[:8], y[:8]), (x[8:], y[8:])], loss_of, lr=0.05, accum=2)
    assert opts[1].param_groups[0]["lr"] == 0.05
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a, torch.zeros_like(a))
    assert float(two["loss"]) == pytest.approx(float(one["loss"]), rel=1e-5)


def test_memory_micro_batches_are_the_rows_of_the_step_batch():
    data = synthetic_dataset(64, seed=1)
    whole = MemoryBatches(data, _cfg("x", batch_size=16, channels_last=False))
    halves = MemoryBatches(data, _cfg("x", batch_size=8, grad_accum=2, channels_last=False))
    assert whole.steps_per_epoch == halves.steps_per_epoch == 4
    for step in (0, 5):
        (xw, yw), = whole.micro_batches(step)
        parts = list(halves.micro_batches(step))
        assert len(parts) == 2
        assert torch.equal(torch.cat([p[0] for p in parts]), xw) and torch.equal(torch.cat([p[1] for p in parts]), yw)


def test_grad_accum_two_of_b_trains_like_one_of_2b(tmp_path):
    # group norm (no batch statistics) and the continuous loss terms: the two runs differ by float rounding only
    kw = dict(model_kwargs={"width": 8, "norm": "gn"}, margin_weight=0.0, optimizer="sgd", lr=0.05, ema=0.0, epochs=1)
    data = synthetic_dataset(64, seed=1)
    train(_cfg(tmp_path / "one", batch_size=32, **kw), data, None, **QUIET)
    acc = train(_cfg(tmp_path / "acc", batch_size=16, grad_accum=2, **kw), data, None, **QUIET)
    assert acc["steps"] == 2
    a, b = _weights(tmp_path / "one" / "model.pt"), _weights(tmp_path / "acc" / "model.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    src = _weights(tmp_path / "one" / "model.pt")
    assert any(not torch.equal(src[k], v) for k, v in bagcert.create_model("cifar_bagnet5_s2", width=8, norm="gn").state_dict().items())


def test_lr_scale_batch_is_the_linear_rule_and_is_logged(tmp_path):
    cfg = _cfg(tmp_path / "r", lr=0.1, batch_size=16, grad_accum=2, lr_scale_batch=256, schedule="constant", epochs=1)
    assert base_lr(cfg) == pytest.approx(0.1 * 32 / 256) and base_lr(_cfg("x", lr=0.1)) == 0.1
    train(cfg, synthetic_dataset(64, seed=1), None, **QUIET)
    recs = _records(tmp_path / "r")
    rule = next(r["lr_rule"] for r in recs if "lr_rule" in r)
    assert rule["global_batch"] == 32 and rule["base_batch"] == 256 and rule["peak_lr"] == pytest.approx(0.0125)
    assert all(r["lr"] == pytest.approx(0.0125) for r in recs if "lr" in r)
    with pytest.raises(ValueError, match="^grad_accum must be an int >= 1"):
        _cfg("x", grad_accum=0).check()


# --- the stream data path -----------------------------------------------------------------------
def _png_folder(root, per_class=8, classes=3):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("test", 4)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for k in range(n):
                base = torch.tensor([c * 80, 255 - c * 60, 40], dtype=torch.float32).view(1, 1, 3)
                img = (base + 40 * torch.rand(40, 44, 3, generator=g)).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(img).save(root / split / f"c{c}" / f"{k}.png")
    return root


def test_evaluation_is_the_same_on_the_memory_and_the_stream_path(tmp_path):
    root = _png_folder(tmp_path / "d")
    mem = load_dataset(str(root), "test", size=32, resize=36, num_classes=3)
    stream = open_stream(str(root), "test", size=32, resize=36, num_classes=3)
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=3, width=8).eval()
    a = evaluate(model, mem, [2, 5], batch_size=5)
    b = evaluate(model, stream, [2, 5], batch_size=5)
    assert a == b and a["n"] == 12
    ev = Evaluator(stream, [2, 5], "cpu")
    assert ev(model) == a and ev.probe_seconds(model) > 0


def _stream(root, **kw):
    return open_stream(str(root), "train", size=32, resize=36, num_classes=3, augment="pad-crop", **kw)


def test_stream_batches_resume_at_the_step_of_the_epoch(tmp_path):
    root = _png_folder(tmp_path / "d")
    cfg = _cfg("x", batch_size=4, num_classes=3, channels_last=False)
    full = StreamBatches(_stream(root), cfg)
    assert full.steps_per_epoch == 6
    seq = [list(full.micro_batches(s)) for s in range(9)]  # into the second epoch
    late = StreamBatches(_stream(root), cfg)
    for s in (4, 7, 8):
        (x, y), = late.micro_batches(s)
        assert torch.equal(x, seq[s][0][0]) and torch.equal(y, seq[s][0][1])
    assert not torch.equal(seq[0][0][0], seq[6][0][0])  # epoch 1 is another order and augmentation


def test_stream_run_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path):
    root = _png_folder(tmp_path / "d")
    kw = dict(num_classes=3, batch_size=6, epochs=2, workers=0, cutout=4)
    held = open_stream(str(root), "test", size=32, resize=36, num_classes=3)
    full = train(_cfg(tmp_path / "full", **kw), _stream(root), held, **QUIET)
    assert full["steps"] == 8
    cut = train(_cfg(tmp_path / "cut", max_steps=3, **kw), _stream(root), held, **QUIET)
    assert cut["steps"] == 3
    again = train(_cfg(tmp_path / "cut", **kw), _stream(root), held, resume=True, **QUIET)
    assert again["steps"] == 8
    a, b = _weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rec = next(r for r in _records(tmp_path / "full") if "data_path" in r)["data_path"]
    assert rec["path"] == "stream" and rec["workers"] == 0 and rec["images"] == 24
    # the memory path is another run (another augmentation): a resume there is refused before anything is written
    mem = load_dataset(str(root), "train", size=32, resize=36, num_classes=3)
    log_before = (tmp_path / "cut" / "train_log.jsonl").read_text()
    with pytest.raises(TrainingError, match="trained on the stream data path .* --data-path stream"):
        train(_cfg(tmp_path / "cut", epochs=3, **{k: v for k, v in kw.items() if k != "epochs"}), mem, held, resume=True, **QUIET)
    assert (tmp_path / "cut" / "train_log.jsonl").read_text() == log_before


def test_stream_run_with_two_workers_equals_one_without(tmp_path):
    data = synthetic_dataset(48, seed=1)
    kw = dict(batch_size=8, epochs=1, ema=0.0)
    train(_cfg(tmp_path / "w0", workers=0, **kw), TensorStream(data), None, **QUIET)
    train(_cfg(tmp_path / "w2", workers=2, max_steps=4, **kw), TensorStream(data), None, **QUIET)
    train(_cfg(tmp_path / "w2", workers=2, **kw), TensorStream(data), None, resume=True, **QUIET)
    a, b = _weights(tmp_path / "w0" / "model.pt"), _weights(tmp_path / "w2" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_stream_path_refuses_an_augmentation_it_does_not_have(tmp_path):
    assert stream_augmentation(_cfg("x")) == "pad-crop"
    assert stream_augmentation(_cfg("x", random_crop=True)) == "resized-crop"
    assert stream_augmentation(_cfg("x", flip=False, pad=0)) == "none"
    with pytest.raises(TrainingError, match="exists only on the in-memory path"):
        stream_augmentation(_cfg("x", pad=2))
    with pytest.raises(TrainingError, match="augments with 'none' but the config asks for 'pad-crop'"):
        train(_cfg(tmp_path / "r"), TensorStream(synthetic_dataset(32), augment="none"), None, **QUIET)
    assert not (tmp_path / "r").exists()


def test_train_cli_data_path_is_chosen_said_and_logged(tmp_path, capsys):
    import train as train_cli

    common = ["--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}', "--epochs", "1",
              "--batch-size", "16", "--eval-images", "16", "--no-progress", "--no-tensorboard", "--threads", "1"]
    assert train_cli.main(common + ["--output", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert "data path memory: " in out and "fits the budget" in out
    rec = next(r for r in _records(tmp_path / "auto") if "data_path" in r)["data_path"]
    assert rec["path"] == "memory" and "fits the budget" in rec["reason"]
    assert train_cli.main(common + ["--output", str(tmp_path / "s"), "--data-path", "stream", "--workers", "0"]) == 0
    assert "data path stream: forced" in capsys.readouterr().out
    assert next(r for r in _records(tmp_path / "s") if "data_path" in r)["data_path"]["path"] == "stream"
    with pytest.raises(SystemExit, match="exists only on the in-memory path"):
        train_cli.main(common + ["--output", str(tmp_path / "p"), "--data-path", "stream", "--pad", "2"])
    with pytest.raises(SystemExit) as e:
        train_cli.main(common + ["--data-path", "disk"])
    assert e.value.code == 2 and "argument --data-path: invalid choice: 'disk'" in capsys.readouterr().err


def test_training_without_tensorboard_installed_says_one_line_and_goes_on(tmp_path, monkeypatch, capsys):
    """TensorBoard is an optional extra: a run that asks for its logs while it is not installed (simulated by
    blocking the import) trains to the end, without a tb folder, after one line on stderr."""
    import sys

    from bagcert.training.log import TrainLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    log = TrainLog(tmp_path / "r", tensorboard=True, say=lambda m: None)
    log.start(0, resumed=False)
    log.open_tensorboard()
    log.scalars("train", {"loss": 1.0}, 1)
    log.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorboard is not installed" in err and "pip install 'bagcert[tensorboard]'" in err
    assert log.writer is None and not (tmp_path / "r" / "tb").exists()

    import train as train_cli

    out = tmp_path / "run"
    assert train_cli.main(["--dataset", "synthetic", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}',
                           "--batch-size", "8", "--max-steps", "1", "--eval-images", "8", "--no-progress", "--threads", "1",
                           "--no-amp", "--eval-patch-sizes", "2", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1 and "Traceback" not in err
    assert (out / "model.pt").exists() and not (out / "tb").exists()
