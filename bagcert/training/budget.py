"""A wall-clock budget for a whole run (``time_budget_minutes``): the pure planning functions and
:class:`TimeBudget`, which measures the speed over a calibration window, plans the number of steps and re-plans
after evaluations."""

from __future__ import annotations

import math
import time

from .distributed import _from_rank0
from .errors import TrainingError
from .log import TrainLog
from .schedule import _progress
from .state import RunState

__all__ = ["calibration_window", "plan_total_steps", "projected_seconds", "replan_total_steps", "REPLAN_WINDOW",
           "window_seconds_per_step", "TimeBudget"]


def calibration_window(warmup: int) -> tuple[int, int]:
    """Steps (start, end) whose wall time a time-budgeted run measures before planning its length.

    The window skips the first 5 steps (allocation, first-call overheads) and ends inside the learning-rate
    warm-up where possible (at most 105 steps), so that no step before the plan depends on the planned total.
    """
    return 5, max(25, min(warmup, 105))


def plan_total_steps(step: int, elapsed_s: float, budget_s: float, step_s: float, eval_s: float, eval_every_steps: int) -> int:
    """Total number of steps that fits a wall-clock budget.

    After ``step`` steps and ``elapsed_s`` seconds, each further step costs ``step_s`` seconds and an
    evaluation of ``eval_s`` seconds follows every ``eval_every_steps`` steps (plus one at the end), so
    ``r`` more steps cost ``r * step_s + (r / eval_every_steps + 1) * eval_s``. Returns ``step + r`` for the
    largest such ``r`` within the budget (at least ``step``: a spent budget ends the run now).
    """
    if not budget_s > 0:
        raise ValueError(f"time budget must be > 0 seconds, got {budget_s}")
    if not step_s > 0 or eval_s < 0 or eval_every_steps < 1:
        raise ValueError(f"need step_s > 0, eval_s >= 0 and eval_every_steps >= 1, got {step_s}, {eval_s}, {eval_every_steps}")
    left = budget_s - elapsed_s - eval_s
    per_step = step_s + eval_s / eval_every_steps
    return step + max(0, math.floor(left / per_step))


def projected_seconds(step: int, total_steps: int, elapsed_s: float, step_s: float, eval_s: float, eval_every_steps: int) -> float:
    """Wall seconds at which a run at ``step`` after ``elapsed_s`` seconds ends ``total_steps``, at the given speed."""
    remaining = max(0, total_steps - step)
    return elapsed_s + remaining * step_s + (remaining / eval_every_steps + 1) * eval_s


def replan_total_steps(
    step: int, total_steps: int, elapsed_s: float, budget_s: float, step_s: float, eval_s: float, eval_every_steps: int,
    tolerance: float = 0.01,
) -> int:
    """A budgeted run's total after an evaluation, from the speed of the steps since the previous one.

    The speed measured at the start of a run need not hold to its end (another job starts on the machine,
    the CPU clocks down). If the remaining ``total_steps - step`` steps at ``step_s`` seconds each, with their
    evaluations of ``eval_s`` seconds, would end more than ``tolerance * budget_s`` away from the budget, the
    total is planned again with :func:`plan_total_steps`; otherwise it is kept.
    """
    projected = projected_seconds(step, total_steps, elapsed_s, step_s, eval_s, eval_every_steps)
    if abs(projected - budget_s) <= tolerance * budget_s:
        return total_steps
    return plan_total_steps(step, elapsed_s, budget_s, step_s, eval_s, eval_every_steps)


REPLAN_WINDOW = 3  # evaluation intervals whose steps together give the speed a re-plan uses


def window_seconds_per_step(intervals: list[tuple[int, float]], window: int = REPLAN_WINDOW) -> float:
    """Seconds per step over the last ``window`` intervals between evaluations, each ``(steps, seconds)``.

    The speed of one interval alone is noisy (checkpoint writes, the machine's clock, other processes): on a run
    alone on the machine it varied by 20 % between intervals, and the 1 % tolerance of
    :func:`replan_total_steps` then re-planned at most evaluations. The steps of the last few intervals together
    vary less, and a lasting change of speed (a neighbour job) is fully seen after ``window`` intervals.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 interval, got {window}")
    recent = intervals[-window:]
    steps = sum(n for n, _ in recent)
    if not recent or steps < 1:
        raise ValueError(f"need at least one interval with steps, got {intervals!r}")
    return sum(t for _, t in recent) / steps


class TimeBudget:
    """A wall-clock budget for the whole run: measure, plan the number of steps, re-plan after evaluations.

    The speed is measured over the calibration window (:func:`calibration_window`; a run resumed inside it
    measures steps ``step + 5`` to ``step + 25``), then :meth:`plan` sets ``run.total_steps`` with
    :func:`plan_total_steps`; after each evaluation :meth:`evaluated` re-plans from the speed of the last
    intervals (:func:`window_seconds_per_step`, :func:`replan_total_steps`). Rank 0 decides every number.
    ``elapsed()`` gives the run's wall seconds so far (earlier invocations included), ``on_total(run)`` is
    called after each change of the total (config.json, progress bar); plans are logged to ``log``.
    """

    def __init__(self, minutes: float, run: RunState, eval_every_steps: int, log: TrainLog, elapsed, on_total=None,
                 world: int = 1, clock=time.perf_counter, sync=lambda: None):
        self.minutes, self.budget_s = minutes, 60.0 * minutes
        self.eval_every_steps, self.log, self.elapsed = eval_every_steps, log, elapsed
        self.on_total = on_total or (lambda run: None)
        self.world, self.clock, self.sync = world, clock, sync
        self.cal_start, self.cal_end = calibration_window(run.warmup)
        if not run.planned:
            if run.step >= self.cal_start:  # resumed inside the window of a run that had not planned yet
                self.cal_start, self.cal_end = run.step + 5, run.step + 25
            run.min_end = self.cal_end  # the provisional length must reach the end of the window
        self.t_cal = None
        self.intervals = []  # (steps, training seconds) of the intervals between evaluations since the plan
        self.seg_t0, self.seg_step0 = clock(), run.step

    def calibration_done(self, run: RunState) -> bool:
        """Call after every step: True once, after the last step of the calibration window (then :meth:`plan`)."""
        if run.planned:
            return False
        if run.step == self.cal_start:
            self.sync()  # queued GPU work belongs to the steps before the window
            self.t_cal = self.clock()
        return run.step == self.cal_end

    def plan(self, run: RunState, eval_seconds) -> None:
        """Plan the total from the calibration window's speed and ``eval_seconds()`` (one full evaluation).

        Raises :class:`TrainingError` (after a ``time_budget_refused`` log record) when the budget cannot hold
        the window and one evaluation."""
        self.sync()
        step_s = (self.clock() - self.t_cal) / (self.cal_end - self.cal_start)
        eval_s = float(eval_seconds())
        elapsed = self.elapsed()
        self._refuse_below(run, elapsed + eval_s, elapsed, eval_s)
        total = int(_from_rank0([plan_total_steps(run.step, elapsed, self.budget_s, step_s, eval_s, self.eval_every_steps)], self.world)[0])
        self._set_total(run, total, "time_budget_plan", f"{step_s:.3f} s/step over steps {self.cal_start}-{self.cal_end}",
                        step_s, eval_s, elapsed)
        self.seg_t0, self.seg_step0 = self.clock(), run.step

    def evaluated(self, run: RunState, t_eval0: float) -> None:
        """After an evaluation that began at ``t_eval0`` (this clock): close the interval and re-plan if needed."""
        if not (run.planned and self.seg_step0 < run.step < run.end):
            return
        self.sync()
        self.intervals.append((run.step - self.seg_step0, t_eval0 - self.seg_t0))
        self._replan(run, window_seconds_per_step(self.intervals), self.clock() - t_eval0)
        self.seg_t0, self.seg_step0 = self.clock(), run.step

    def _replan(self, run: RunState, step_s: float, eval_s: float) -> None:
        elapsed = self.elapsed()
        args = (run.step, run.total_steps, elapsed, self.budget_s, step_s, eval_s, self.eval_every_steps)
        total = int(_from_rank0([replan_total_steps(*args)], self.world)[0])
        if total == run.total_steps:
            return
        before = run.total_steps
        if run.step > run.warmup:  # keep the learning rate continuous across the change
            run.anchor = (run.step, _progress(run.step, run.total_steps, run.warmup, run.anchor))
        over = f"the last {min(len(self.intervals), REPLAN_WINDOW)} evaluation interval(s)"
        self._set_total(run, total, "time_budget_replan", f"{step_s:.3f} s/step over {over}", step_s, eval_s, elapsed,
                        previous_total_steps=before, projected_seconds_before=projected_seconds(*args[:3], *args[4:]))

    def _set_total(self, run, total, key, speed, step_s, eval_s, elapsed, **extra) -> None:
        before = run.total_steps
        run.set_total(total)
        epochs = total / run.steps_per_epoch
        self.on_total(run)
        if self.log.is_main:
            what = "planned" if key == "time_budget_plan" else f"re-planned from {before} to"
            self.log.say(
                f"time budget {self.minutes:g} min at step {run.step}: {speed}, {eval_s:.1f} s per evaluation, "
                f"{elapsed:.0f} s spent; {what} {total} steps ({epochs:.2f} epochs, written to config.json)"
            )
            self.log.append({"step": run.step, key: {
                "budget_seconds": self.budget_s, "seconds_per_step": step_s, "seconds_per_eval": eval_s,
                "elapsed_seconds": elapsed, "total_steps": total, "epochs": epochs, **extra}})

    def _refuse_below(self, run, minimum_s, elapsed, eval_s) -> None:
        """A budget that cannot hold the calibration window and one evaluation: refused (rank 0 decides)."""
        minimum_s = _from_rank0([minimum_s], self.world)[0]
        if self.budget_s >= minimum_s:
            return
        minutes = math.ceil(minimum_s / 60 * 100) / 100
        self.log.append({"step": run.step, "time_budget_refused": {
            "budget_seconds": self.budget_s, "minimum_seconds": minimum_s, "elapsed_seconds": elapsed, "seconds_per_eval": eval_s}})
        raise TrainingError(
            f"time budget {self.minutes:g} min is too small: the calibration window (steps {self.cal_start}-{self.cal_end}) "
            f"ended after {elapsed:.1f} s here and one evaluation takes {eval_s:.1f} s, so no budget below {minutes:.2f} min "
            f"can train past the calibration; give --time-budget-minutes {minutes:.2f} or more (refused at step {run.step}; "
            f"no plan, no model written)"
        )
