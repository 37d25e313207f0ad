"""The training loop: :func:`train` (set-up, checks, the loop over steps, evaluations, checkpoints, the final
export) and :func:`train_step` (one optimiser step over ``grad_accum`` micro-batches).

``train`` reads as a loop over the parts of this package: the batches of a step (:mod:`.batches`), the loss
(:mod:`.loss`), the learning rate (:mod:`.schedule`), the EMA (:mod:`.ema`), the run state and ``last.pt``
(:mod:`.state`), the log (:mod:`.log`), the time budget (:mod:`.budget`), the evaluations (:mod:`.evaluation`)
and the export (:mod:`.export`). Names are looked up in this module, so a test or a profiler that wraps one of
them (``ema_update``, ``train_step``, ...) patches ``bagcert.training.loop``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .batches import _resolve_workers, _training_batches
from .budget import TimeBudget
from .config import TrainConfig, _peer_spec, check_run_inputs
from .distributed import _checkpoint_and_stop, _from_rank0, _sync, check_sync_bn, distributed_env
from .ema import ema_decay, ema_update
from .errors import TrainingError, TrainingFailed
from .evaluation import Evaluator
from .export import _data_record, _export_final
from .log import StatWindow, TrainLog, log_ends_done
from .model import _build_model, _LocalLogits
from .loss import _compiled_step_loss, _identity, _loss_function
from .schedule import _lr_at, _make_optimizer, base_lr
from .state import Checkpointer, RunState, StopSignals, _write_config, check_output_folder, resume_config_changes

__all__ = ["train", "train_step"]


def train(cfg: TrainConfig, train_data, eval_data=None, resume: bool = False, log=print, data_path_reason: str | None = None) -> dict:
    """Train a model with ``cfg``; returns a summary dict (``steps``, ``wall_seconds``, ``output``, ``eval``).

    ``train_data`` / ``eval_data``: in-memory :class:`~bagcert.data.Dataset` (uint8 images, the fast path) or
    :mod:`bagcert.streaming` datasets (decoded per batch by ``cfg.workers`` loader processes; the training stream's
    ``augment`` must be :func:`stream_augmentation` of ``cfg``). Which path runs is logged, with
    ``data_path_reason`` (e.g. :func:`bagcert.streaming.choose_data_path`'s) when given, as a ``data_path`` record.

    Writes into ``cfg.output``: ``config.json``, ``train_log.jsonl`` (JSON lines), ``last.pt`` (every
    ``checkpoint_minutes`` and at the end) and ``model.pt`` (``peer_classifier.pt`` for a peer) at the end.

    Stop: SIGINT or SIGTERM during the call finishes the current step, writes ``last.pt`` and a ``stopped`` log
    record, and returns with ``summary["stopped"]`` (the signal's name) and ``summary["exit_status"]``
    (128 + signal number); no model.pt is written. Under torch.distributed every rank stops after the same step.
    The previous signal handlers are restored on return. An unexpected error once training has started (a loader
    worker killed, an undecodable image on the stream path, ...) likewise writes ``last.pt`` with the finished steps
    and an ``error`` log record, and raises :class:`TrainingFailed` (one line; ``__cause__`` is the error).

    Resume (``resume=True`` with a ``last.pt``): the arguments are compared with the stored config before anything
    is written (:func:`resume_config_changes`), and the data path (memory or stream) must be the stored one; the
    log is cut back to the checkpoint's step (:func:`cut_log`) and a ``resumed`` record lists the allowed changes.
    A finished run (its log ends with the ``done`` record of the checkpoint's step and no later end is asked for)
    is left byte-identical: ``summary["already_finished"]``.

    Before anything is written, :func:`check_run_inputs` refuses data of another image size or other held-out classes,
    patch sizes that do not fit the image and a configuration whose model.pt could not be saved.

    Raises :class:`TrainingError` (a ValueError) for a run that cannot start or continue as configured, ValueError
    from :meth:`TrainConfig.check`, :class:`~bagcert.checkpoint.CheckpointError` for an unreadable ``last.pt``.
    """
    with StopSignals() as stop:
        return _train_run(cfg, train_data, eval_data, resume, log, stop, data_path_reason)


def train_step(fwd, optimizer, micro_batches, loss_of, lr: float, accum: int = 1, no_sync=None, amp: bool = False,
               device_type: str = "cpu") -> dict:
    """One optimiser step over ``accum`` micro-batches; returns the statistics (0-d device tensors), averaged.

    ``micro_batches``: ``accum`` pairs ``(x, y)``; ``loss_of(output, y)`` returns ``(loss, stats)``. The learning
    rate of every parameter group is set to ``lr``, each micro-batch's loss is divided by ``accum`` and its
    gradient added, so that for a loss that is a mean over samples (and a model without batch statistics) the
    step equals one step on the concatenated batch, up to float rounding. ``no_sync``: the DDP module's
    ``no_sync`` context manager, entered for all but the last micro-batch (one gradient all-reduce per step).
    ``amp``: bf16 autocast of the forward pass.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    sums = {}
    for j, (x, y) in enumerate(micro_batches):
        sync = no_sync() if no_sync is not None and j < accum - 1 else contextlib.nullcontext()
        with sync:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
                z = fwd(x)
            loss, stats = loss_of(z, y)
            # DDP averages gradients over ranks; per-rank losses are means over the rank's samples
            (loss / accum if accum > 1 else loss).backward()
        for key, v in stats.items():
            sums[key] = sums[key] + v if key in sums else v
    optimizer.step()
    return sums if accum == 1 else {k: v / accum for k, v in sums.items()}


def _train_run(cfg: TrainConfig, train_data, eval_data, resume: bool, log, stop: StopSignals, data_path_reason=None) -> dict:
    # --- setup: process group, checks (nothing written before they pass) ---
    cfg.check()
    rank, world, local_rank = distributed_env()
    device = torch.device(cfg.device if cfg.device != "cuda" or world == 1 else f"cuda:{local_rank}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads is not None:
        if type(cfg.threads) is not int or cfg.threads < 1:
            raise TrainingError(f"threads must be a positive int (or None for torch's default), got {cfg.threads!r}")
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise TrainingError(f"batch size {cfg.batch_size} is not divisible by the number of processes {world}")
    sync_note = check_sync_bn(cfg, world, device.type)
    peer = _peer_spec(cfg)  # None for a bagcert model; checks the spec before anything is written
    out = check_output_folder(cfg.output)
    is_main = rank == 0
    check_run_inputs(cfg, train_data, eval_data, peer)
    batches = _training_batches(cfg, train_data, rank, world, device, peer)
    steps_per_epoch = batches.steps_per_epoch
    if steps_per_epoch < 1:
        accum = f" x {cfg.grad_accum} accumulated micro-batches" if cfg.grad_accum > 1 else ""
        raise TrainingError(f"{batches.n} training images are fewer than one batch of {cfg.batch_size}{accum}")

    ckpt = Checkpointer(out, is_main, cfg.checkpoint_minutes)
    state, changes = ckpt.load(resume, lambda stored: resume_config_changes(stored, cfg))  # refuses before writing
    budgeted = cfg.time_budget_minutes is not None
    run = RunState(steps_per_epoch, 0, max_steps=cfg.max_steps, planned=not budgeted)
    if state is not None:
        stored_path = (state.get("data") or {}).get("data_path", "memory")
        if stored_path != batches.path:
            raise TrainingError(
                f"--resume: the run in {out} trained on the {stored_path} data path and this one would use the {batches.path} "
                f"path (its augmentation differs): resume with --data-path {stored_path}"
            )
        run.step, run.wall_before = int(state["step"]), float(state.get("wall_seconds", 0.0))
        if budgeted and state.get("planned_total_steps") is not None:
            run.planned = True
            cfg = replace(cfg, epochs=int(state["planned_total_steps"]) / steps_per_epoch)  # config.json keeps the plan
            if state.get("schedule_anchor") is not None:
                run.anchor = (int(state["schedule_anchor"][0]), float(state["schedule_anchor"][1]))
    run.total_steps = int(round(cfg.epochs * steps_per_epoch))
    if state is not None and budgeted and state.get("planned_total_steps") is not None:
        run.total_steps = int(state["planned_total_steps"])
    run.warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    margin_warm = max(1, int(round(cfg.margin_warmup_epochs * steps_per_epoch)))

    tlog = TrainLog(out, is_main, cfg.tensorboard, log)
    if state is not None and run.step >= run.end:
        finished = _from_rank0([1.0 if is_main and log_ends_done(tlog.path, run.step) else 0.0], world)[0]
        if finished:
            if is_main:
                unused = f"; the changed {', '.join(changes)} were not applied" if changes else ""
                log(f"{out} holds a finished run ({run.step} steps, model written, log done); nothing to do, nothing changed "
                    f"(a later end, --epochs or --max-steps, continues it){unused}")
            return {"steps": run.step, "wall_seconds": run.wall_before, "output": str(out), "already_finished": True}

    # --- the model first: a model bagcert refuses (a wrong geometry) leaves nothing written ---
    model, init_info = _build_model(cfg, peer, device)

    # --- the run's folder and log ---
    tlog.start(run.step, resumed=state is not None)
    if is_main:
        _write_config(out, cfg)
        if state is not None:
            tlog.append({"step": run.step, "resumed": {"wall_seconds": run.wall_before, "changed": changes}})
    workers = _resolve_workers(cfg) if batches.path == "stream" else 0
    reason = data_path_reason or (f"{batches.path}: a {'bagcert.streaming' if batches.path == 'stream' else 'in-memory'} "
                                  f"dataset was passed to train()")
    tlog.append({"step": run.step, "data_path": {"path": batches.path, "reason": reason, "workers": workers,
                                                 "images": batches.n}})
    if is_main:
        log(f"data path {reason}" + (f"; {workers} loader worker(s)" if batches.path == "stream" else ""))
    if cfg.lr_scale_batch is not None:
        rule = {"lr": cfg.lr, "global_batch": cfg.batch_size * cfg.grad_accum, "base_batch": cfg.lr_scale_batch,
                "peak_lr": base_lr(cfg), "rule": "lr * batch_size * grad_accum / lr_scale_batch"}
        tlog.append({"step": run.step, "lr_rule": rule})
        if is_main:
            log(f"learning rate scaled linearly with the global batch: {cfg.lr:g} x {rule['global_batch']} / "
                f"{cfg.lr_scale_batch} = {rule['peak_lr']:g}")

    # --- optimiser, EMA, loss ---
    if is_main and init_info and init_info.get("summary"):
        log(f"--init-from: {init_info['summary']}")
    opt = _make_optimizer(cfg, model)
    ema = copy.deepcopy(model).eval() if cfg.ema > 0 else None
    loss_of = _loss_function(cfg, model, peer, margin_warm)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if is_main:
            log(f"resumed from {ckpt.path} at step {run.step}/{run.total_steps}"
                + (f"; changed: {', '.join(f'{k} {o!r} -> {v!r}' for k, (o, v) in changes.items())}" if changes else ""))
    elif resume and is_main:
        log(f"no checkpoint at {ckpt.path}; starting from scratch")
    state = None  # the weights are loaded; the checkpointer builds its own
    data_record = _data_record(train_data, steps_per_epoch, batches.path)

    # forward = local_logits (a peer classifier: its logits), so DDP and torch.compile see the training output
    net = model if peer is not None else _LocalLogits(model)
    if is_main and sync_note:
        log(sync_note)
    if world > 1 and cfg.sync_bn:
        # in place: model's BatchNorm layers become SyncBatchNorm sharing their parameters and buffers (the optimiser
        # and the checkpoint see the same tensors; the state-dict keys are those of BatchNorm2d)
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
        if is_main:
            log(f"--sync-bn: {bn} batch-norm layer(s) normalise with the statistics of the global batch"
                if bn else "--sync-bn: the model has no batch-norm layer; nothing to synchronise")
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    fwd = torch.compile(net) if cfg.compile and not cfg.compile_step else net
    if cfg.compile_step:  # forward and loss in one compiled function; train_step's forward is then the identity
        loss_of = _compiled_step_loss(cfg, net, model, peer, margin_warm)
        fwd = _identity
    no_sync = net.no_sync if world > 1 and cfg.grad_accum > 1 else None
    tlog.open_tensorboard()

    eval_every_steps = max(1, int(round(cfg.eval_every * steps_per_epoch)))
    evaluator = None if eval_data is None else Evaluator(
        eval_data, cfg.eval_patch_sizes, device, rank, world, peer, cfg.seed, workers=workers, amp=cfg.eval_amp)
    pbar = None
    t_start = time.perf_counter()

    def elapsed() -> float:
        return run.wall_before + time.perf_counter() - t_start

    def new_total(run: RunState) -> None:  # a (re-)planned budget: config.json records it, the bar follows
        nonlocal cfg
        cfg = replace(cfg, epochs=run.total_steps / steps_per_epoch)
        if is_main:
            _write_config(out, cfg)
        if pbar is not None:
            pbar.total = run.end
            pbar.refresh()

    budget = None if not budgeted else TimeBudget(
        cfg.time_budget_minutes, run, eval_every_steps, tlog, elapsed, new_total, world, sync=lambda: _sync(device))
    if is_main and cfg.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=run.end, initial=run.step, unit="step", dynamic_ncols=True, mininterval=2.0)

    def save() -> None:
        ckpt.save(run, json.loads(json.dumps(asdict(cfg))), model, opt, ema, data_record, elapsed(), budgeted)

    # --- the loop ---
    window = StatWindow()
    summary, stopped = {}, 0
    model.train()
    # True from the optimiser's step (the first change of the weights) until run.step counts the step
    partial = {"step": False}
    opt.register_step_pre_hook(lambda *a: partial.__setitem__("step", True))
    try:
        while run.step < run.end:
            lr = _lr_at(cfg, run.step, run.total_steps, run.warmup, run.anchor)
            stats = train_step(fwd, opt, batches.micro_batches(run.step), loss_of(run.step), lr, cfg.grad_accum, no_sync,
                               cfg.amp, device.type)
            if ema is not None:
                ema_update(ema, model, ema_decay(cfg.ema, run.step))
            run.step += 1
            partial["step"] = False
            window.add(stats, batches.step_batch)
            if budget is not None and budget.calibration_done(run):
                budget.plan(run, lambda: evaluator.probe_seconds(ema if ema is not None else model) if evaluator else 0.0)
            if pbar is not None:
                pbar.update(1)
            if run.step % cfg.log_every == 0 or run.step == run.end:
                means, ips = window.flush()
                rec = {"step": run.step, "epoch": run.epoch, "lr": lr, "images_per_s": ips, **means}
                tlog.append(rec)
                tlog.scalars("train", rec, run.step)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{means['loss']:.3f}", ips=f"{ips:.0f}", ep=f"{run.epoch:.2f}")
            if evaluator is not None and (run.step % eval_every_steps == 0 or run.step == run.end):
                _sync(device)
                t_eval0 = time.perf_counter()
                m_eval = ema if ema is not None else model
                ev = evaluator(m_eval)
                tlog.append({"step": run.step, "epoch": run.epoch, "eval": ev, "wall_seconds": elapsed()})
                summary["eval"] = ev
                if is_main:
                    log(f"[eval] epoch {run.epoch:.2f}: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k != "n"))
                tlog.scalars("eval", ev, run.step)
                if tlog.writer is not None:
                    tlog.figure("eval/vote_map", evaluator.vote_figure(m_eval), run.step)
                if budget is not None:
                    budget.evaluated(run, t_eval0)
            # checkpoint and stop decisions must be identical on all ranks: rank 0's clock decides the checkpoint, a
            # signal on any rank stops every rank after this step (one all_reduce of both flags)
            due, signum = _checkpoint_and_stop(ckpt.due(), stop, world)
            if due or signum:
                save()
            if signum:
                stopped = signum
                break
    except TrainingError:  # a refusal of the run's own (a time budget too small): as it says, nothing to keep
        batches.close()
        raise
    except Exception as e:  # an unexpected error (a loader worker killed, an undecodable file): keep the finished steps
        batches.close()
        if pbar is not None:
            pbar.close()
        raise _failed_run(e, run, out, partial["step"], save, tlog, elapsed) from e
    batches.close()
    if pbar is not None:
        pbar.close()
    if stopped:
        name = signal.Signals(stopped).name
        wall = elapsed()
        tlog.append({"step": run.step, "stopped": name, "wall_seconds": wall})
        tlog.close()
        summary.update({"steps": run.step, "wall_seconds": wall, "output": str(out), "stopped": name,
                        "exit_status": 128 + stopped})
        return summary
    save()
    wall = elapsed()
    if is_main:
        _export_final(cfg, ema if ema is not None else model, peer, out, data_record, init_info, run, wall, world, summary)
        tlog.append({"done": True, "steps": run.step, "wall_seconds": wall})
    tlog.close()
    summary.update({"steps": run.step, "wall_seconds": wall, "output": str(out)})
    return summary


def _error_line(e: BaseException) -> str:
    """One line for an exception: a DataLoader worker's wrapped error is cut to its original last line."""
    text = str(e).strip()
    if "Original Traceback" in text:  # "...\nbagcert.data.DatasetError: <message>": the original's last line
        text = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        head, sep, rest = text.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum():
            return f"{head.rsplit('.', 1)[-1]}: {' '.join(rest.split())}"
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text}"


def _failed_run(e: Exception, run: RunState, out: Path, in_step: bool, save, tlog, elapsed) -> TrainingFailed:
    """Save what a run finished before the error ``e`` (as a signal stop does: ``last.pt`` and a log record) and
    return the :class:`TrainingFailed` to raise. ``in_step``: the error came after the optimiser began to change
    the weights of a step not yet counted (inside ``optimizer.step`` or the EMA update); those weights match no step,
    so the last periodic ``last.pt`` is kept then. An error while reading a step's data, in its forward or backward
    pass or in an evaluation leaves the weights of the finished steps: they are saved."""
    what = _error_line(e)
    saved = None
    if not in_step:
        try:
            save()
            saved = out / "last.pt"
        except Exception as save_error:  # the disk is full, ...: say so, keep the original error
            what += f"; writing last.pt failed too ({_error_line(save_error)})"
    try:
        tlog.append({"step": run.step, "error": what, "wall_seconds": elapsed(), "checkpoint": saved is not None})
        tlog.close()
    except Exception:
        pass
    if saved is not None:
        tail = (f"{saved} holds the {run.step} finished steps; fix the cause and continue with: train.py --config "
                f"{out / 'config.json'} --resume")
    elif (out / "last.pt").is_file():
        tail = f"{out / 'last.pt'} holds the last periodic checkpoint; continue with: train.py --config {out / 'config.json'} --resume"
    else:
        tail = "no checkpoint was written"
    return TrainingFailed(f"training failed during step {run.step + 1} ({what}); {tail}", run.step, saved)
