"""The errors of a training run: :class:`TrainingError` (a run that cannot start or continue as configured) and
:class:`TrainingFailed` (a run ended by an unexpected error after it started training)."""

from __future__ import annotations

__all__ = ["TrainingError", "TrainingFailed"]


class TrainingError(ValueError):
    """A run that cannot start or continue as configured: a resume whose arguments differ from the run's, an
    output folder that cannot be written or already holds another run, a time budget too small for its
    calibration, data fewer than one batch. ``train.py`` prints the message as one line and exits non-zero."""


class TrainingFailed(TrainingError):
    """A run ended by an unexpected error after it started training (a DataLoader worker killed, an undecodable
    image on the stream path, ...). ``step``: the optimiser steps finished; ``checkpoint``: the ``last.pt`` that
    holds them (None when the error hit inside a step whose weights could not be saved consistently);
    ``__cause__`` is the original exception. The message is one line with the continuation command."""

    def __init__(self, message: str, step: int, checkpoint):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint
