"""Plain checks of the values a run's config carries, for the library's runs (:mod:`bagcert.runs`).

Each raises ``ValueError`` with one line that starts with the value's name, says what was wrong and what was
expected, and returns the value when it is fine. The command-line tools check their flags with their own parser
types; these checks apply the same rules to a config built in code or read from a file.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_positive_int", "check_nonnegative_int", "check_device", "check_workers", "check_output_outside_dataset"]


def _int_at_least(name: str, value, minimum: int, expected: str) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1 (bools are refused), else ValueError."""
    return _int_at_least(name, value, 1, "an int >= 1")


def check_nonnegative_int(name: str, value) -> int:
    """``value`` if it is an int >= 0 (bools are refused), else ValueError."""
    return _int_at_least(name, value, 0, "an int >= 0")


def check_device(value, name: str = "device") -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``: the device as torch names it, if this machine has it; an
    unknown device type or an accelerator this machine lacks is a ValueError."""
    import torch

    try:
        dev = torch.device(str(value).strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {value!r}: not a torch device (expected cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {value!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name} {value!r}: MPS is not available on this machine (use cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name} {value!r}: bagcert runs on cpu, cuda or mps, not {dev.type}")
    return str(dev)


def check_workers(value, name: str = "workers") -> int:
    """A number of loader processes: an int >= 0 and at most :func:`bagcert.streaming.max_loader_workers` (usable
    CPU cores and available memory, shared by the torchrun processes of this machine), else ValueError."""
    from ..streaming import max_loader_workers

    check_nonnegative_int(name, value)
    limit, why = max_loader_workers(explain=True)
    if value > limit:
        raise ValueError(f"{name} {value}: {value} loader processes is more than this machine can run: at most {limit} ({why})")
    return value


def check_output_outside_dataset(output, dataset, name: str = "output") -> None:
    """ValueError when the output folder is the dataset's folder or lies inside it: a run or report folder there
    would be listed as one more class folder by every later run on that dataset. ``dataset`` is a dataset spec
    (``synthetic[:N]``, ``cifar10:<root>``, ``folder:<root>`` or a path); a synthetic or missing one passes."""
    from ..data import _is_synthetic, _spec_root

    if output is None or dataset is None or _is_synthetic(str(dataset)):
        return
    root = _spec_root(str(dataset))
    if not root.is_dir():
        return
    out, root = Path(os.path.realpath(os.fspath(output))), Path(os.path.realpath(root))
    if out == root or root in out.parents:
        raise ValueError(f"{name} {output} lies inside the dataset folder {show_path(root)}: every later run would read it as one "
                         "more class folder; write outside the dataset")


def show_path(path) -> str:
    """``path`` as the tools print it: relative to the working directory when it lies inside it, else absolute."""
    p = Path(os.path.abspath(os.fspath(path)))
    try:
        return str(p.relative_to(Path(os.getcwd()))) or "."
    except ValueError:
        return str(p)
