"""Replay the re-planning of a time-budgeted training run with speed estimates over different windows.

A run with ``--time-budget-minutes`` plans its length once, then after every evaluation compares the end it
projects with its budget and plans again when they differ by more than 1 %. The speed it projects with is the
mean over the last ``window`` evaluation intervals (``bagcert.training.REPLAN_WINDOW``). This script takes the
training log of a finished budgeted run, reconstructs the measured speed of each interval between evaluations,
and replays the decisions ``bagcert.training.replan_total_steps`` would have taken with each window:
how often the total changed, by how much, and when the run would have ended.

    python benchmarks/replan_replay.py --windows 1,2,3,4 checkpoints/bagcert_cifar10_r5s2_v2/train_log.jsonl

The interval boundaries do not depend on the total (an evaluation follows every ``--eval-every`` epochs), so the
replay sees exactly the speeds the run saw. Where a replayed total runs past the logged steps, the last interval's
speed is extrapolated. Evaluations whose duration the log does not record are given the median of those it does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagcert.training import replan_total_steps, window_seconds_per_step  # noqa: E402


def read_run(path: Path) -> dict:
    """Plan, evaluations (step, wall seconds after the evaluation) and evaluation durations of a budgeted run."""
    plan, evals, eval_seconds = None, [], {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "time_budget_plan" in rec:
            plan = dict(rec["time_budget_plan"], step=rec["step"])
        elif "time_budget_replan" in rec:
            eval_seconds[rec["step"]] = rec["time_budget_replan"]["seconds_per_eval"]
        elif "eval" in rec:
            while evals and evals[-1][0] >= rec["step"]:  # a resumed run redid these steps: its later records count
                evals.pop()
            evals.append((rec["step"], rec["wall_seconds"]))
    if plan is None:
        raise SystemExit(f"{path}: no time_budget_plan record; only runs trained with --time-budget-minutes can be replayed")
    if len(evals) < 3:
        raise SystemExit(f"{path}: {len(evals)} evaluations logged; a replay needs at least 3")
    return {"plan": plan, "evals": evals, "eval_seconds": eval_seconds}


def intervals_of(run: dict) -> list[dict]:
    """Training speed of each interval between evaluations after the plan."""
    default_eval = statistics.median(run["eval_seconds"].values()) if run["eval_seconds"] else run["plan"]["seconds_per_eval"]
    out, prev_step, prev_wall = [], run["plan"]["step"], run["plan"]["elapsed_seconds"]
    for step, wall in run["evals"]:
        if step <= prev_step:
            continue
        eval_s = run["eval_seconds"].get(step, default_eval)
        out.append({"step": step, "wall": wall, "steps": step - prev_step, "seconds": wall - prev_wall - eval_s, "eval_s": eval_s})
        prev_step, prev_wall = step, wall
    return out


def end_seconds(total: int, intervals: list[dict]) -> float:
    """Wall seconds at which a run of ``total`` steps ends, at the logged speeds (the last one extrapolated).

    Inside an interval the run ends ``total - start`` steps after the interval's start (its wall time less its
    training seconds and its evaluation), then evaluates once more.
    """
    iv = next((iv for iv in intervals if total <= iv["step"]), None)
    if iv is None:  # past the log: the last interval's speed, after its evaluation
        last = intervals[-1]
        return last["wall"] + (total - last["step"]) * last["seconds"] / last["steps"] + last["eval_s"]
    start = iv["step"] - iv["steps"]
    return iv["wall"] - iv["seconds"] + (total - start) * iv["seconds"] / iv["steps"]


def replay(run: dict, intervals: list[dict], window: int, eval_every_steps: int, tolerance: float) -> dict:
    budget, total = run["plan"]["budget_seconds"], run["plan"]["total_steps"]
    changes, seen = [], []
    for iv in intervals:
        if iv["step"] >= total:
            break
        seen.append((iv["steps"], iv["seconds"]))
        new = replan_total_steps(iv["step"], total, iv["wall"], budget, window_seconds_per_step(seen, window), iv["eval_s"],
                                 eval_every_steps, tolerance=tolerance)
        if new != total:
            changes.append(abs(new - total) / total)
            total = new
    end = end_seconds(total, intervals)
    return {
        "window": window,
        "evaluations": len(seen),
        "replans": len(changes),
        "mean_change_percent": 100 * statistics.fmean(changes) if changes else 0.0,
        "max_change_percent": 100 * max(changes) if changes else 0.0,
        "total_steps": total,
        "end_seconds": end,
        "off_budget_percent": 100 * (end - budget) / budget,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", type=Path, help="train_log.jsonl files of runs trained with --time-budget-minutes")
    ap.add_argument("--windows", default="1,2,3,4", help="speed windows to replay, in evaluation intervals (default 1,2,3,4)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="re-plan tolerance, a fraction of the budget (default 0.01)")
    ap.add_argument("--output", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",")]
    results = {}
    print("| run | window | evaluations | re-plans | mean change % | max change % | steps | end s | off budget % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in args.logs:
        run = read_run(path)
        intervals = intervals_of(run)
        eval_every = statistics.mode(iv["steps"] for iv in intervals)
        rows = [replay(run, intervals, w, eval_every, args.tolerance) for w in windows]
        speeds = [iv["seconds"] / iv["steps"] for iv in intervals]
        results[str(path)] = {"budget_seconds": run["plan"]["budget_seconds"], "interval_seconds_per_step": speeds, "replays": rows}
        for r in rows:
            print(f"| {path.parent.name} | {r['window']} | {r['evaluations']} | {r['replans']} | {r['mean_change_percent']:.1f} | "
                  f"{r['max_change_percent']:.1f} | {r['total_steps']} | {r['end_seconds']:.0f} | {r['off_budget_percent']:+.1f} |")
    if args.output:
        from bagcert.checkpoint import atomic_write_text

        atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
