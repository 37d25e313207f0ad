"""Plain checks of run option values: each returns the value read (``"4"`` -> 4) or raises ``ValueError`` with a
one-line message saying what was expected (``must be a positive integer, got 0``). The run configs
(:mod:`bagcert.runs`) prefix the message with the field's name; the command-line tools' ``type=`` functions
(``bagcert/cli/_common.py``) turn it into the parser's ``argument --flag: ...`` line."""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = ["int_at_least", "positive_int", "nonnegative_int", "parse_number", "number_in_range", "device", "workers"]


def int_at_least(value, minimum: int, expected: str) -> int:
    """``value`` (an int or its text) as an int >= ``minimum``; ``ValueError`` otherwise (``expected`` names the
    range in the message: ``must be <expected>, got <value>``). A bool or a float is not an integer."""
    if isinstance(value, bool):
        raise ValueError(f"not an integer: {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"not an integer: {value!r}") from None
    if number < minimum:
        raise ValueError(f"must be {expected}, got {number}")
    return number


def positive_int(value) -> int:
    """``"4"`` or 4 -> 4; zero, negative or non-integer values are refused (``ValueError``)."""
    return int_at_least(value, 1, "a positive integer")


def nonnegative_int(value) -> int:
    """``"0"`` or 0 -> 0; negative or non-integer values are refused (``ValueError``), for counts where 0 means none."""
    return int_at_least(value, 0, "an integer >= 0")


def parse_number(value) -> float:
    """``"0.03"``, ``"8/255"``, 0.03 -> a finite float; anything else is ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r} (give e.g. 0.03 or 8/255)")
    try:
        number = float(Fraction(str(value).strip())) if "/" in str(value) else float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"not a number: {value!r} (give e.g. 0.03 or 8/255)") from None
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def number_in_range(value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
                    what: str | None = None) -> float:
    """:func:`parse_number` of ``value``, refused (``ValueError``: ``must be a number > 0, got -1``; ``what`` replaces
    "a number > 0" when given) outside ``[lo, hi]`` (``lo_open`` / ``hi_open``: that end excluded; None: unbounded)."""
    number = parse_number(value)
    ok = (lo is None or (number > lo if lo_open else number >= lo)) and (hi is None or (number < hi if hi_open else number <= hi))
    if not ok:
        bounds = " and ".join(f"{op} {b:g}" for op, b in ((">" if lo_open else ">=", lo), ("<" if hi_open else "<=", hi))
                              if b is not None)
        what = what or f"a number{' ' + bounds if bounds else ''}"
        raise ValueError(f"must be {what}, got {value}")
    return number


def device(value) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``, ... -> its text, checked: an unknown device type or an
    accelerator this machine does not have is refused (``ValueError``)."""
    import torch

    try:
        dev = torch.device(str(value).strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"not a torch device: {value!r} (expected cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{value!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{value!r}: MPS is not available on this machine (use cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{value!r}: bagcert runs on cpu, cuda or mps, not {dev.type}")
    return str(dev)


def workers(value) -> int:
    """``"4"`` or 4 -> 4 DataLoader worker processes: an integer >= 0 and at most
    :func:`bagcert.streaming.max_loader_workers` (usable CPU cores and available memory, shared by the torchrun
    processes on this machine); more is refused (``ValueError``) instead of ending in the OOM killer."""
    from ..streaming import max_loader_workers

    number = nonnegative_int(value)
    if number == 0:
        return 0
    limit, why = max_loader_workers(explain=True)
    if number > limit:
        raise ValueError(f"{number} loader processes is more than this machine can run: at most {limit} ({why})")
    return number
