"""Plain validators of run-config fields: each takes the field's name and value, returns the value (normalised:
an int, a float, a tuple) and raises :class:`FieldError` (a :class:`RunInputError`, a ``ValueError``) with one line naming the field,
``<name> must be a positive integer, got 0``.

The command-line tools call the same checks from their option-parser ``type=`` wrappers (bagcert/cli/_common.py) and
turn a :class:`FieldError` of a config into the same line spelled with the option, ``--num-train must be ...``.
Nothing here parses argv or exits.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

__all__ = ["RunInputError", "FieldError", "check_bool", "check_choice", "check_device", "check_list", "check_nonnegative_int", "check_number",
           "check_path", "check_paths", "check_text", "check_positive_int", "number_range_text"]


class RunInputError(ValueError):
    """A mistake in a run's input -- its config, the files and data it names, the report folder -- found before
    the work or while reading the input; the message is one line saying what was wrong and what was expected.
    The command-line tools print it and exit 1; any other exception out of a run is a bug and keeps its traceback."""


class FieldError(RunInputError):
    """A config field holds a value the run refuses. ``str(e)`` is ``field + detail`` on one line
    (``"num_train must be a positive integer, got 0"``, ``"corruptions: unknown ['fog']; ..."``); ``field`` and
    ``detail`` are kept apart so that a command line can name its option instead of the field."""

    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, " ".join(str(detail).split())
        if self.detail and self.detail[0] not in ":;,":
            self.detail = " " + self.detail
        super().__init__(f"{field}{self.detail}")

    def __reduce__(self):  # picklable (a worker process may raise it)
        return type(self), (self.field, self.detail)

    def option_message(self) -> str:
        """The same line with the field spelled as a command-line option (``num_train`` -> ``--num-train``)."""
        return f"--{self.field.replace('_', '-')}{self.detail}"


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, expected: str, *, allow_none: bool = False):
    """``value`` as an int >= ``minimum`` (``expected`` words the rule: "a positive integer"); None passes when
    ``allow_none``. A bool, a float or text is refused (no silent truncation of 2.5)."""
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise FieldError(name, f"must be {expected}, got {value!r}")
    if value < minimum:
        raise FieldError(name, f"must be {expected}, got {value}")
    return int(value)


def check_positive_int(name: str, value, *, allow_none: bool = False):
    """``value`` as an int >= 1 (counts, sizes, batch sizes); None passes when ``allow_none``."""
    return check_int(name, value, 1, "a positive integer", allow_none=allow_none)


def check_nonnegative_int(name: str, value, *, allow_none: bool = False):
    """``value`` as an int >= 0 (counts where 0 means none: epochs, steps)."""
    return check_int(name, value, 0, "an integer >= 0", allow_none=allow_none)


def number_range_text(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> str:
    """``"a number > 0"``, ``"a number >= 0 and <= 1"``, ``"a number"``: the words of a range for error messages."""
    bounds = " and ".join(f"{op} {b:g}" for op, b in ((">" if lo_open else ">=", lo), ("<" if hi_open else "<=", hi))
                          if b is not None)
    return f"a number{' ' + bounds if bounds else ''}"


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, what: str | None = None, allow_none: bool = False):
    """``value`` (an int or float, finite) as a float inside ``[lo, hi]`` (``lo_open`` / ``hi_open``: that end
    excluded; None: unbounded). ``what`` replaces the generated range words (``"a decay factor in (0, 1]"``)."""
    if value is None and allow_none:
        return None
    what = what or number_range_text(lo, hi, lo_open=lo_open, hi_open=hi_open)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise FieldError(name, f"must be {what}, got {value!r}")
    v = float(value)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        raise FieldError(name, f"must be {what}, got {value:g}")
    return v


def check_bool(name: str, value) -> bool:
    """``value`` as a bool: True or False only (``"no"`` would be truthy)."""
    if not isinstance(value, bool):
        raise FieldError(name, f"must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices, *, allow_none: bool = False):
    """``value`` when it is one of ``choices`` (else one line listing them)."""
    if value is None and allow_none:
        return None
    if value not in tuple(choices):
        raise FieldError(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_path(name: str, value, *, allow_none: bool = False):
    """A file or folder path (``str`` or ``os.PathLike``) as ``str``; empty text is refused."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise FieldError(name, f"must be a path (str or pathlib.Path), got {value!r}")
    return str(os.fspath(value))


def check_text(name: str, value, *, allow_none: bool = False):
    """Non-empty text (a split name, a dataset spec)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise FieldError(name, f"must be non-empty text, got {value!r}")
    return value


def check_paths(name: str, value) -> tuple:
    """A sequence of paths as a tuple of ``str`` (one path alone is taken as a sequence of one)."""
    if isinstance(value, (str, os.PathLike)):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise FieldError(name, f"must be a list of paths, got {value!r}")
    return tuple(check_path(name, v) for v in value)


def check_list(name: str, value, kind: type = int) -> tuple:
    """A comma-separated string (``"1,2,5"``) or a sequence of ``kind`` values as a tuple of ``kind``."""
    items = [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise FieldError(name, f": cannot read {value!r} as a comma-separated list of {kind.__name__} values")
    out = []
    for item in items:
        if kind is str:
            ok = isinstance(item, str)
        elif kind is int:
            ok = _is_int(item) or (isinstance(item, str) and item.strip().lstrip("+-").isdigit())
        else:
            ok = isinstance(item, str) or (isinstance(item, Real) and not isinstance(item, bool))
        try:
            v = kind(item) if ok else None
        except ValueError:
            v = None
        if v is None or (kind is float and not math.isfinite(v)):
            raise FieldError(name, f": cannot read {value!r} as a comma-separated list of {kind.__name__} values")
        out.append(v)
    return tuple(out)


def check_device(name: str, value) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> the same text, checked: an unknown device type or an
    accelerator this machine does not have is refused."""
    import torch

    try:
        dev = torch.device(str(value).strip())
    except (RuntimeError, ValueError):
        raise FieldError(name, f": not a torch device: {value!r} (expected cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FieldError(name, f": {value!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FieldError(name, f": {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise FieldError(name, f": {value!r}: MPS is not available on this machine (use cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise FieldError(name, f": {value!r}: bagcert runs on cpu, cuda or mps, not {dev.type}")
    return str(dev)
