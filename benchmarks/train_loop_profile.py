#!/usr/bin/env python3
"""Where the whole training loop's time goes: N steps of the real ``bagcert.training.train()``, timed by phase.

The loop is not re-implemented: ``train()`` runs as ``train.py`` runs it, and the parts it calls are wrapped with
clocks (the data of a step, i.e. indexing and augmenting the uint8 batch and converting it to float; the forward
pass; the loss; the backward pass, i.e. the rest of ``train_step``; the optimiser's step; the EMA update; the
evaluation; the checkpoint; logging, i.e. the log records and the statistics window). What no clock covers is the
loop's own overhead (learning rate, progress bar, stop checks). Steps before ``--warmup`` (allocation, the first
compilation) are reported apart from the steady state. With ``compile_step`` the forward pass runs inside the
compiled loss function: its time is in ``loss`` (and ``forward`` is about 0).

Evaluation and checkpoints happen once here (at the last step), and are amortised per step as in a real run of the
recipe: one evaluation every ``eval_every`` epochs of the full training set (``--full-train-images``, 50,000 for
CIFAR-10), one checkpoint every ``checkpoint_minutes`` at the measured step time.

Presets (``--variant``; ``+fast`` adds the speed options ``compile_step``, ``fused_optimizer`` and ``eval_amp`` of
:class:`bagcert.training.TrainConfig`, ``+skipinit`` the normalisation-free backbone (a model change, measured for
accuracy in docs/experiments/2026-12-01-skipinit-compile.md), ``+nf`` the same with Scaled Weight Standardization, ``+b64`` a batch of 64 images; ``--set key=JSON`` changes any
other field):

* ``recipe``: ``train.py``'s defaults (bagcert-cifar10-r5 (v2): ``cifar_bagnet5_s2`` width 128, bf16 autocast,
  channels_last, batch 128, EMA 0.999, evaluation every 2 epochs on 1,000 images);
* ``stride1``: the natively stride-1 ``cifar_bagnet5`` (width 128) with the recipe's training settings;
* ``dense``: the recipe's network trained as its dense (a trous, stride-1) evaluation (``dense: true``).

Compare mode (``--compare A B [C ...]``) runs the variants in fresh processes, interleaved round after round (A, B,
C, A, B, C, ...), and reports the median of each and its speed-up over A (images per second), so that all come from the same minutes of
one machine. ``--baseline-path DIR`` imports bagcert for the first variant from another checkout (e.g. the commit
before the changes): today's loop against the improved ones. Measure with nothing else running.

    python benchmarks/train_loop_profile.py --variant recipe --steps 60 --threads 2 --output docs/results/train_loop_profile.json
    python benchmarks/train_loop_profile.py --compare recipe recipe+fast --rounds 3 --steps 60 --threads 2 \\
        --baseline-path ../main --output docs/results/train_loop_compare.json
    python benchmarks/train_loop_profile.py --variant stride1 --torch-profiler      # also torch.profiler's top operators
    python benchmarks/train_loop_profile.py --synthetic --steps 4 --warmup 1 --set model_kwargs='{"width":16}'   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
FAST = {"compile_step": True, "fused_optimizer": True, "eval_amp": True}
PRESETS = {
    "recipe": {},
    "stride1": {"model": "cifar_bagnet5", "model_kwargs": {"width": 128}},
    "dense": {"model_kwargs": {"width": 128, "dense": True}},
}
STEP_PHASES = ("data", "forward", "loss", "backward", "optimizer")  # train_step (with the step's data)
PHASES = STEP_PHASES + ("ema", "logging", "loop overhead")
AMORTISED = ("evaluation", "checkpoint")


def variant_config(name: str, sets: list[str]) -> dict:
    """TrainConfig keyword arguments of a preset name (``recipe``, ``stride1``, ``dense``, each with an optional
    ``+fast``) and ``key=JSON`` overrides."""
    from bagcert.cli.train import RECIPE

    base, *extras = name.split("+")
    batches = [e for e in extras if re.fullmatch(r"b[1-9][0-9]*", e)]
    extras = [e for e in extras if e not in batches]
    if (base not in PRESETS or not set(extras) <= {"fast", "skipinit", "nf"} or {"skipinit", "nf"} <= set(extras)
            or len(batches) > 1):
        raise SystemExit(f"--variant must be one of {', '.join(PRESETS)}, each optionally with +fast, one of "
                         f"+skipinit / +nf and one batch size +bN (e.g. +b64); got {name!r}")
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RECIPE.items()}
    values.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[base].items()})
    if "fast" in extras:
        values.update(FAST)
    if "skipinit" in extras:  # no normalisation layers (SkipInit): a model change, see docs/experiments
        values["model_kwargs"] = {**values["model_kwargs"], "norm": "skipinit"}
    if "nf" in extras:  # SkipInit + Scaled Weight Standardization (bagcert.models.cifar)
        values["model_kwargs"] = {**values["model_kwargs"], "norm": "nf"}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=JSON, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        # a dict (model_kwargs) updates the preset's dict: recipe+skipinit with model_kwargs={"width":8} keeps its norm
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) else value
    if batches:  # a variant's own batch size wins over --set; compare mode's ratios are per image
        values["batch_size"] = int(batches[0][1:])
    return values


class PhaseClock:
    """Seconds per phase and per step: ``add(phase, seconds)`` books onto the step being run (``step``)."""

    def __init__(self):
        self.step = -1  # index of the current train_step call
        self.per_step: dict[str, dict[int, float]] = {}
        self.calls: dict[str, int] = {}

    def add(self, phase: str, seconds: float) -> None:
        book = self.per_step.setdefault(phase, {})
        book[self.step] = book.get(self.step, 0.0) + seconds
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def total(self, phase: str, first: int = 0) -> float:
        return sum(v for k, v in self.per_step.get(phase, {}).items() if k >= first)

    def timed(self, phase: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(phase, time.perf_counter() - t)
        return wrapper


def instrument(clock: PhaseClock) -> list:
    """Wrap the parts ``bagcert.training.train`` calls with ``clock``; returns the (owner, name, original) to undo."""
    import importlib

    import bagcert.training as P  # the parts' classes: patched on the class, seen by every module

    try:  # the functions the loop calls: patched where the loop looks them up (bagcert.training.loop, or the
        T = importlib.import_module("bagcert.training.loop")  # single module bagcert.training of older checkouts,
    except ModuleNotFoundError:  # for --baseline-path)
        T = P

    undo = []

    def patch(owner, name, new):
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    orig_step = T.train_step

    def timed_train_step(fwd, optimizer, micro_batches, loss_of, *a, **k):
        clock.step += 1
        clock.loop_t = getattr(clock, "loop_t", None) or time.perf_counter()

        def batches():
            it = iter(micro_batches)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    clock.add("data", time.perf_counter() - t)
                    return
                clock.add("data", time.perf_counter() - t)
                yield item

        opt_step = optimizer.step
        optimizer.step = clock.timed("optimizer", opt_step)
        t = time.perf_counter()
        try:
            return orig_step(clock.timed("forward", fwd), optimizer, batches(), clock.timed("loss", loss_of), *a, **k)
        finally:
            clock.add("train_step", time.perf_counter() - t)
            del optimizer.step  # back to the class's method

    patch(T, "train_step", timed_train_step)
    patch(T, "ema_update", clock.timed("ema", T.ema_update))
    patch(P.Evaluator, "__call__", clock.timed("evaluation", P.Evaluator.__call__))
    patch(P.Evaluator, "vote_figure", clock.timed("evaluation", P.Evaluator.vote_figure))
    patch(P.Checkpointer, "save", clock.timed("checkpoint", P.Checkpointer.save))
    for name in ("append", "scalars", "figure"):
        patch(P.TrainLog, name, clock.timed("logging", getattr(P.TrainLog, name)))
    for name in ("add", "flush"):
        patch(P.StatWindow, name, clock.timed("logging", getattr(P.StatWindow, name)))
    orig_export = T._export_final

    def timed_export(*a, **k):
        clock.loop_end = time.perf_counter()
        return orig_export(*a, **k)

    patch(T, "_export_final", timed_export)
    return undo


def load_data(args, cfg_values: dict):
    """(train, eval) in-memory datasets: ``--train-images`` of the CIFAR-10 training split (class-balanced) and
    ``eval_images`` of its test split, or synthetic images with ``--synthetic``."""
    import torch

    from bagcert.data import load_dataset, stratified_subset, synthetic_dataset

    n_eval = int(cfg_values.get("eval_images", 1000)) or 1000
    if args.synthetic:
        size = int(cfg_values.get("image_size", 32))
        return (synthetic_dataset(args.train_images, size=size, seed=0),
                synthetic_dataset(n_eval, size=size, seed=1))
    train = load_dataset(str(args.data), "train")
    test = load_dataset(str(args.data), "test")
    if args.train_images < len(train):
        train = stratified_subset(train, args.train_images, seed=0)
    return train, test.subset(torch.arange(min(n_eval, len(test))))


def profile_once(args, variant: str) -> dict:
    """Run ``train()`` for ``--steps`` steps of ``variant`` with every phase clocked; the per-step table as a dict."""
    import torch

    from bagcert.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    values = variant_config(variant, args.set)
    train_data, eval_data = load_data(args, values)
    clock = PhaseClock()
    undo = instrument(clock)
    try:
        with tempfile.TemporaryDirectory(prefix="train_loop_profile_") as out:
            recipe_eval_every = float(values.get("eval_every", 1.0))
            recipe_ckpt_min = float(values.get("checkpoint_minutes", 5.0))
            values.update(dataset=str(args.data), output=out, max_steps=args.steps, progress=False,
                          tensorboard=args.tensorboard, threads=args.threads, eval_every=1e6, checkpoint_minutes=1e6,
                          log_every=values.get("log_every", 20))
            cfg = TrainConfig(**values)
            profiler = None
            if args.torch_profiler:
                from torch.profiler import ProfilerActivity, profile

                profiler = profile(activities=[ProfilerActivity.CPU])
                profiler.__enter__()
            t0 = time.perf_counter()
            summary = train(cfg, train_data, eval_data, log=lambda *a, **k: None)
            wall = time.perf_counter() - t0
            if profiler is not None:
                profiler.__exit__(None, None, None)
    finally:
        for owner, name, orig in reversed(undo):
            setattr(owner, name, orig)
    steps = clock.step + 1
    first = min(args.warmup, steps - 1)
    n = steps - first
    loop_s = getattr(clock, "loop_end", time.perf_counter()) - clock.loop_t
    ms = {}
    inner = sum(clock.total(p, first) for p in ("data", "forward", "loss", "optimizer"))
    for p in ("data", "forward", "loss", "optimizer", "ema", "logging"):
        ms[p] = 1e3 * clock.total(p, first) / n
    ms["backward"] = 1e3 * (clock.total("train_step", first) - inner) / n
    # the loop's overhead over the steady steps: the wall time between the first steady step and the end, minus what
    # the clocks saw in it (the evaluation and checkpoint at the end are taken out, they are amortised below)
    steady_wall = loop_s - sum(clock.per_step.get("train_step", {}).get(k, 0.0) for k in range(first))
    for p in ("ema", "logging", "evaluation", "checkpoint"):
        steady_wall -= sum(v for k, v in clock.per_step.get(p, {}).items() if k < first)
    seen = sum(clock.total(p, first) for p in ("train_step", "ema", "logging", "evaluation", "checkpoint"))
    ms["loop overhead"] = max(0.0, 1e3 * (steady_wall - seen) / n)
    step_ms = sum(ms[p] for p in STEP_PHASES)  # train_step alone
    loop_ms = sum(ms[p] for p in PHASES)
    batch = cfg.batch_size * cfg.grad_accum
    full_steps_per_epoch = max(1, args.full_train_images // batch)
    eval_s = clock.total("evaluation")
    ckpt_s = clock.total("checkpoint")
    ms["evaluation"] = 1e3 * eval_s / (recipe_eval_every * full_steps_per_epoch)
    ms["checkpoint"] = 1e3 * ckpt_s * (loop_ms / 1e3) / (recipe_ckpt_min * 60)
    total_ms = loop_ms + ms["evaluation"] + ms["checkpoint"]
    import bagcert

    res = {
        "variant": variant,
        "bagcert": str(Path(bagcert.__file__).resolve().parent),
        "config": {k: v for k, v in values.items() if k not in ("output",)},
        "steps": steps, "warmup_steps": first, "batch": batch,
        "first_steps_seconds": sum(clock.per_step.get("train_step", {}).get(k, 0.0) for k in range(first)),
        "ms_per_step": ms,
        "step_ms": step_ms,
        "loop_ms_per_step": total_ms,
        "images_per_s_step": batch / (step_ms / 1e3),
        "images_per_s_loop": batch / (total_ms / 1e3),
        "evaluation_seconds": eval_s, "evaluation_images": len(eval_data),
        "checkpoint_seconds": ckpt_s,
        "train_wall_seconds": wall,
        "final_eval": summary.get("eval"),
    }
    if profiler is not None:
        res["torch_profiler_top"] = [
            {"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]]
    return res


def print_profile(res: dict) -> None:
    ms, total = res["ms_per_step"], res["loop_ms_per_step"]
    print(f"{res['variant']}: {res['steps']} steps of {res['batch']} images ({res['warmup_steps']} warm-up steps, "
          f"{res['first_steps_seconds']:.1f} s)")
    for p in PHASES + AMORTISED:
        note = " (amortised)" if p in AMORTISED else ""
        print(f"  {p + note:26s} {ms[p]:9.2f} ms/step  {100 * ms[p] / total:5.1f} %")
    print(f"  {'whole loop':26s} {total:9.2f} ms/step  {res['images_per_s_loop']:.0f} images/s "
          f"(train_step alone {res['images_per_s_step']:.0f} images/s)")
    for row in res.get("torch_profiler_top", [])[:15]:
        print(f"    {row['name'][:50]:50s} {row['self_cpu_ms']:10.1f} ms  {row['calls']:7d} calls")


def child_command(args, variant: str, json_path: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads), "--data", str(args.data), "--train-images",
           str(args.train_images), "--full-train-images", str(args.full_train_images), "--child-json", json_path]
    for item in args.set:
        cmd += ["--set", item]
    if args.synthetic:
        cmd.append("--synthetic")
    return cmd


def compare(args) -> dict:
    """Interleaved rounds of the variants in fresh processes (the first one from ``--baseline-path`` when given);
    the median of each and its ratio to the first."""
    labels = [(chr(ord("A") + i), v, args.baseline_path if i == 0 else None) for i, v in enumerate(args.compare)]
    runs: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="train_loop_compare_") as tmp:
        for r in range(args.rounds):
            for tag, variant, path in labels:
                json_path = os.path.join(tmp, f"{tag}{r}.json")
                env = dict(os.environ)
                env["BAGCERT_PROFILE_PATH"] = str(Path(path).resolve()) if path else str(ROOT)
                proc = subprocess.run(child_command(args, variant, json_path), env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{tag} ({variant}) failed:\n{proc.stderr[-3000:]}")
                res = json.loads(Path(json_path).read_text())
                runs.setdefault(f"{tag}:{variant}", []).append(res)
                print(f"round {r + 1} {tag} {variant} ({res['bagcert']}): loop {res['loop_ms_per_step']:.1f} ms/step, "
                      f"step {res['step_ms']:.1f} ms", flush=True)

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    first = next(iter(runs.values()))
    rows = []
    for (tag, variant, path), (key, rs) in zip(labels, runs.items()):
        rows.append({
            "label": key, "variant": variant, "code": rs[0]["bagcert"],
            "loop_ms_per_step": med(rs, "loop_ms_per_step"), "step_ms": med(rs, "step_ms"),
            "batch": rs[0]["batch"],
            # images per second against the first variant's: the ms-per-step ratio when the batch sizes are equal
            "loop_speedup_over_A": med(rs, "images_per_s_loop") / med(first, "images_per_s_loop"),
            "step_speedup_over_A": med(rs, "images_per_s_step") / med(first, "images_per_s_step"),
            "phases_ms": {p: statistics.median(r["ms_per_step"][p] for r in rs) for p in PHASES + AMORTISED},
        })
    out = {"baseline_path": args.baseline_path, "rounds": args.rounds, "variants": rows, "runs": runs}
    print(f"\n{'phase':26s}" + "".join(f"{row['label'].split(':')[0] + ' ms/step':>12s}" for row in rows))
    for p in PHASES + AMORTISED:
        print(f"{p:26s}" + "".join(f"{row['phases_ms'][p]:12.2f}" for row in rows))
    for key in ("step_ms", "loop_ms_per_step"):
        print(f"{key:26s}" + "".join(f"{row[key]:12.2f}" for row in rows))
    for row in rows[1:]:
        print(f"{row['label']}: whole loop {row['loop_speedup_over_A']:.2f}x, step {row['step_speedup_over_A']:.2f}x "
              f"as fast as {rows[0]['label']} (images per second)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", help="preset(s) to profile one after the other (default: recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="change a TrainConfig field")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="first steps reported apart (compilation; default 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 folder (train/ and test/)")
    p.add_argument("--synthetic", action="store_true", help="synthetic images instead of --data (smoke runs)")
    p.add_argument("--train-images", type=int, default=5120, help="class-balanced subset of the training split")
    p.add_argument("--full-train-images", type=int, default=50000,
                   help="training-set size a real run has, for amortising evaluations (default 50000)")
    p.add_argument("--tensorboard", action="store_true", help="with TensorBoard (its vote figure at each evaluation)")
    p.add_argument("--torch-profiler", action="store_true", help="also torch.profiler's top operators (slows the run)")
    p.add_argument("--compare", nargs="+", metavar="VARIANT",
                   help="interleaved comparison of two or more variants, each against the first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-path", help="a bagcert checkout whose code runs the first variant of --compare")
    p.add_argument("--output", help="JSON file (e.g. docs/results/train_loop_profile.json)")
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compare is not None and len(args.compare) < 2:
        raise SystemExit("--compare needs at least two variants")
    if args.steps < 2 or args.warmup < 0 or args.threads < 1 or args.rounds < 1 or args.train_images < 1:
        raise SystemExit("--steps must be >= 2, --warmup >= 0, --threads, --rounds and --train-images >= 1")
    sys.path.insert(0, os.environ.get("BAGCERT_PROFILE_PATH") or str(ROOT))  # before bagcert is imported
    for name in (args.compare or []) + (args.variant or []):
        variant_config(name, args.set)  # every name and --set checked before the first run
    if args.compare:
        result = compare(args)
    else:
        result = {"profiles": []}
        for variant in args.variant or ["recipe"]:
            res = profile_once(args, variant)
            if args.child_json:
                Path(args.child_json).write_text(json.dumps(res))
                return 0
            print_profile(res)
            result["profiles"].append(res)
    if args.output:
        from bagcert.report import environment_info

        result = {"env": environment_info(), "threads": args.threads, "command": sys.argv, **result}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
