"""Safe, strict, self-describing checkpoints.

A checkpoint is a plain dict of tensors and Python builtins::

    {"format": "bagcert-checkpoint", "format_version": 1,
     "model": {"name": <registry name>, "kwargs": {...}},
     "state_dict": {name: tensor}, "metadata": {...builtins...}}

It is loaded with ``torch.load(weights_only=True)``: a file carrying any other pickled object is
refused before anything from it runs. The model is rebuilt from the registry and its weights are
loaded with ``strict=True``. Writes go to a temporary file in the same folder, then
``os.replace`` (atomic on POSIX), so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

FORMAT = "bagcert-checkpoint"
FORMAT_VERSION = 1

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "atomic_torch_save", "atomic_write_text", "safe_torch_load"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, foreign or of an unknown format."""


def _plain(value, where: str):
    """Return ``value`` as exact builtins and tensors (subclasses such as TorchVersion become their base
    type, tuples become lists); raise TypeError for anything else."""
    if value is None or type(value) in (str, int, float, bool) or isinstance(value, torch.Tensor):
        return value
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict keys must be str or int, got {type(k).__name__}")
            out[_plain(k, where)] = _plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors and builtins "
        "(str, int, float, bool, None, list, tuple, dict)"
    )


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_torch_save(obj, path) -> None:
    """torch.save to a temporary file next to ``path``, fsync, then atomically replace ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_torch_load(path, what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` with clear errors for missing, truncated and foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what_found = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it contains a pickled object{what_found} that is not a tensor or builtin; "
            "weights_only=True rejected it and nothing from it was run"
        ) from None
    except Exception as e:  # any other failure of the reader: the bytes are not a complete torch file
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def save_checkpoint(path, model, **metadata) -> Path:
    """Save ``model`` (a registry model) and builtin ``metadata`` atomically to ``path``."""
    config = getattr(model, "config", None)
    if not config or "name" not in config:
        raise ValueError("model has no registry config; build it with bagcert.create_model(...)")
    kwargs = _plain(dict(config.get("kwargs", {})), "model kwargs")
    metadata = _plain(metadata, "metadata")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": config["name"], "kwargs": kwargs},
        "state_dict": state,
        "metadata": metadata,
    }
    atomic_torch_save(obj, path)
    return Path(path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely: returns ``(model, metadata)``; the model is in eval mode."""
    from .models import create_model  # local import: models import nothing from here

    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bagcert checkpoint (no 'format': '{FORMAT}' entry)")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this bagcert reads version {FORMAT_VERSION}")
    for key in ("model", "state_dict", "metadata"):
        if key not in obj:
            raise CheckpointError(f"{path} is malformed: missing {key!r}")
    spec = obj["model"]
    try:
        model = create_model(spec["name"], **spec.get("kwargs", {}))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild model {spec.get('name')!r}: {e}") from None
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture: {str(e)[:500]}") from None
    model.to(map_location).eval()
    return model, obj["metadata"]
