"""The validators of run inputs, in two layers.

* Value-only rules (:func:`positive_int`, :func:`nonnegative_int`, :func:`parse_number`, :func:`number_in_range`,
  :func:`device`, :func:`workers`): each returns the value read (``"4"`` -> 4) or raises ``ValueError`` with a
  one-line message saying what was expected (``must be a positive integer, got 0``), without a field's name. The
  command-line tools' ``type=`` functions (bagcert/cli/_common.py) turn it into the parser's ``argument --flag: ...``
  line; the certification and training runs prefix it with the field's name.
* Field-named checks (``check_*``), built on those rules: each takes the field's name and value, returns the value
  (normalised: an int, a float, a tuple) and raises :class:`FieldError` (a :class:`RunInputError`, a ``ValueError``)
  with one line naming the field, ``<name> must be a positive integer, got 0``.

The command-line tools call the same checks from their option-parser ``type=`` wrappers (bagcert/cli/_common.py) and
turn a :class:`FieldError` of a config into the same line spelled with the option, ``--num-train must be ...``.
Nothing here parses argv or exits.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from numbers import Integral, Real

__all__ = ["RunInputError", "FieldError", "int_at_least", "positive_int", "nonnegative_int", "parse_number", "number_in_range",
           "number_range_text", "device", "workers", "check_int", "check_bool", "check_choice", "check_device", "check_list",
           "check_nonnegative_int", "check_number", "check_path", "check_paths", "check_text", "check_positive_int"]


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


# ------------------------------------------------------------------------------------------------
# value-only rules: ValueError without the field's name
# ------------------------------------------------------------------------------------------------
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


def number_range_text(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> str:
    """``"a number > 0"``, ``"a number >= 0 and <= 1"``, ``"a number"``: the words of a range for error messages."""
    bounds = " and ".join(f"{op} {b:g}" for op, b in ((">" if lo_open else ">=", lo), ("<" if hi_open else "<=", hi))
                          if b is not None)
    return f"a number{' ' + bounds if bounds else ''}"


def _in_range(number: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    return (lo is None or (number > lo if lo_open else number >= lo)) and (hi is None or (number < hi if hi_open else number <= hi))


def number_in_range(value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
                    what: str | None = None) -> float:
    """:func:`parse_number` of ``value``, refused (``ValueError``: ``must be a number > 0, got -1``; ``what`` replaces
    "a number > 0" when given) outside ``[lo, hi]`` (``lo_open`` / ``hi_open``: that end excluded; None: unbounded)."""
    number = parse_number(value)
    if not _in_range(number, lo, hi, lo_open, hi_open):
        raise ValueError(f"must be {what or number_range_text(lo, hi, lo_open=lo_open, hi_open=hi_open)}, got {value}")
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


# ------------------------------------------------------------------------------------------------
# field-named checks: FieldError
# ------------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, expected: str, *, allow_none: bool = False):
    """``value`` as an int >= ``minimum`` (``expected`` words the rule: "a positive integer"); None passes when
    ``allow_none``. A bool, a float or text is refused (no silent truncation of 2.5)."""
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise FieldError(name, f"must be {expected}, got {value!r}")
    try:
        return int_at_least(int(value), minimum, expected)
    except ValueError as e:
        raise FieldError(name, str(e)) from None


def check_positive_int(name: str, value, *, allow_none: bool = False):
    """``value`` as an int >= 1 (counts, sizes, batch sizes); None passes when ``allow_none``."""
    return check_int(name, value, 1, "a positive integer", allow_none=allow_none)


def check_nonnegative_int(name: str, value, *, allow_none: bool = False):
    """``value`` as an int >= 0 (counts where 0 means none: epochs, steps)."""
    return check_int(name, value, 0, "an integer >= 0", allow_none=allow_none)


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
    if not _in_range(v, lo, hi, lo_open, hi_open):
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
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> the same text, checked (:func:`device`): an unknown device type
    or an accelerator this machine does not have is refused."""
    try:
        return device(value)
    except ValueError as e:
        raise FieldError(name, f": {e}") from None
