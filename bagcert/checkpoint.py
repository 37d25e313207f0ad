"""Safe, strict, self-describing checkpoints.

A checkpoint is a plain dict of tensors and Python builtins::

    {"format": "bagcert-checkpoint", "format_version": 1,
     "model": {"name": <registry name>, "kwargs": {...}},
     "state_dict": {name: tensor}, "metadata": {...builtins...},
     "geometry": {"image_size": [H, W], "grid": [h, w], "receptive_field": [r, r], "stride": [s, s], "padding": [p, p]}}

``geometry`` is written only for models that are not built-in registry classes (a plugin factory, or a
:func:`bagcert.wrap_model` model built by a registered factory): their verified geometry at ``input_size``,
checked again against the rebuilt model on loading (a changed architecture is refused).

It is stored as torch's zip archive and loaded with ``torch.load(weights_only=True)``: a file that is
not a zip archive (truncated, random bytes, a bare pickle, torch's legacy format) is refused without
unpickling anything, the archive's CRC-32 sums are checked, and a file carrying any pickled object
other than tensors and builtins is refused before anything from it runs. The model is rebuilt from
the registry, its weights must match the architecture exactly, and the metadata bagcert reads back
(``input_size``, ``resize``, ``classes``) is checked. Every failure is one :class:`CheckpointError`
line naming the file, what is wrong and what was expected. Writes go to a temporary file in the same
folder, then ``os.replace`` (atomic on POSIX), so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT = "bagcert-checkpoint"
FORMAT_VERSION = 1

__all__ = [
    "save_checkpoint", "load_checkpoint", "check_metadata", "CheckpointError", "atomic_torch_save", "atomic_write_text",
    "safe_torch_load",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, foreign, unsafe, of an unknown format or malformed.

    The message is one line that names the file. A RuntimeError (not a ValueError): it is about a file,
    not about an argument."""


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


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space, cut at ``limit``."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ZIP_MAGIC = b"PK\x03\x04"


def _is_zip_file(path: Path, label: str, expected: str) -> bool:
    """Whether ``path`` is a zip archive (torch's file format since 1.6), read from its first bytes only.

    Raises CheckpointError (one line, naming ``label`` and the path) for a folder (``expected`` says what was
    wanted), a missing file or one that cannot be read."""
    if path.is_dir():
        raise CheckpointError(f"{label} {path} is a folder; expected {expected}")
    if not path.is_file():
        raise CheckpointError(f"{label} not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        return head == _ZIP_MAGIC and zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {label} {path}: {_one_line(e)}") from None


def safe_torch_load(path, what: str = "checkpoint", verify: bool = False):
    """Read a file written by :func:`atomic_torch_save` with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        what: what the file should be, for the messages ("checkpoint", "training checkpoint", ...).
        verify: also check the CRC-32 of every member of the archive first (reads the file once more), so that
            flipped bytes inside the tensor data are reported instead of loaded.

    Returns:
        The stored object (dicts, lists, tensors and builtins only), tensors on the CPU.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it: missing, a folder, not a torch
            file (not a zip archive: truncated, random bytes or another format; nothing is unpickled then),
            a damaged archive, or pickled content other than tensors and builtins (refused by weights-only
            loading before anything from it runs).
    """
    path = Path(path)
    is_zip = _is_zip_file(path, f"{what} file", "a .pt file")
    if not is_zip:
        raise CheckpointError(
            f"{path} is not a torch checkpoint file (not a zip archive: truncated, corrupt or another kind of file; "
            f"size {path.stat().st_size} bytes); expected a {what} written by bagcert"
        )
    if verify:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{path} is a damaged torch archive (truncated or corrupt: {_one_line(e, 200)})") from None
        if bad is not None:
            raise CheckpointError(
                f"{path} is corrupt: the archive member {bad!r} fails its CRC-32 check (changed bytes); "
                f"expected an intact {what}"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found or "GLOBAL" in text:
            what_found = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refusing to load {path}: not a bagcert {what}: it holds a pickled object{what_found} that is not a "
                "tensor or builtin; weights-only loading refused this unsafe content and nothing from it was run"
            ) from None
        found = re.search(r"WeightsUnpickler error: (.*?)(?:Check the documentation|$)", text, re.S)
        detail = _one_line(found.group(1), 120) if found else "unreadable pickle data"
        raise CheckpointError(
            f"{path} is a damaged torch checkpoint: its pickle data cannot be read ({detail}); truncated or corrupt, "
            f"expected a {what} written by bagcert"
        ) from None
    except Exception as e:  # any other failure of the reader: the archive is incomplete or damaged
        raise CheckpointError(
            f"{path} is truncated or not a complete torch checkpoint ({type(e).__name__}: {_one_line(e, 200)})"
        ) from None


def save_checkpoint(path, model, **metadata) -> Path:
    """Save ``model`` (a registry model) and builtin ``metadata`` atomically to ``path``.

    The file records the model's registry name and keyword arguments (``model.config``) and its weights, no
    code: a model registered from outside the package (a plugin or a ``--model-module`` file) is saved the same
    way and loads wherever its constructor is registered under the same name.

    Raises:
        ValueError: the model was not built by :func:`bagcert.create_model` (no ``config``), its name is not
            registered, or a metadata entry bagcert reads back is unusable (see :func:`check_metadata`): nothing
            is written then.
        TypeError: metadata that is not tensors and builtins.
    """
    from .models import _is_registered  # local import: models import nothing from here

    config = getattr(model, "config", None)
    if hasattr(model, "infer_geometry_at") and not (isinstance(config, dict) and isinstance(config.get("name"), str)):
        raise ValueError(  # a bagcert.wrap_model model: its code is not in the registry
            "a wrapped model is saved under a registry name, so that loading can rebuild it: register a factory "
            "that returns it (bagcert.register_model(name, factory)) and build it with bagcert.create_model(name) "
            "(docs/own_model_plugin.md)"
        )
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ValueError(
            f"model has no registry config (a {type(model).__name__} with model.config = {_describe(config)}); a checkpoint "
            "records the registry name and arguments that rebuild the model: register its constructor with "
            "bagcert.register_model(name, factory) and build it with bagcert.create_model(name, ...) "
            "(docs/own_model_plugin.md)"
        )
    if not _is_registered(config["name"]):
        raise ValueError(
            f"model.config names {config['name']!r}, which is not registered, so the checkpoint could not be loaded back; "
            f"register its constructor with bagcert.register_model({config['name']!r}, factory) and build the model "
            "with bagcert.create_model"
        )
    kwargs = _plain(dict(config.get("kwargs", {})), "model kwargs")
    metadata = _plain(metadata, "metadata")
    problem = _metadata_problem(metadata, getattr(model, "num_classes", None), 1)
    if problem:
        raise ValueError(f"cannot save {path}: {problem}")
    geometry = _geometry_record(model, metadata)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": config["name"], "kwargs": kwargs},
        "state_dict": state,
        "metadata": metadata,
    }
    if geometry is not None:
        obj["geometry"] = geometry
    atomic_torch_save(obj, path)
    return Path(path)


def _geometry_record(model, metadata) -> dict | None:
    """The verified geometry of a model whose code is not a built-in registry class (a plugin or wrapped model), at
    the metadata's ``input_size`` (or the last image size a wrapped model saw), as builtins; None for built-in
    models (their geometry is derived from the layers they build) and when no image size is known. Raises
    GeometryError (a ValueError) for a declared geometry that does not cover the true one."""
    from .geometry_inference import _trusted, verify_geometry

    if _trusted(model) or not hasattr(model, "geometry"):
        return None
    size = metadata.get("input_size")
    if isinstance(size, int) and not isinstance(size, bool):
        image_size = (size, size)
    elif getattr(getattr(model, "geometry", None), "grid", None) is not None:
        image_size = model.geometry.grid[0]
    else:  # no image size to check it at: nothing recorded (certifying still checks it on its images)
        return None
    was = model.training
    model.eval()  # the geometry of the model as it certifies (BatchNorm with its running statistics)
    try:
        g = verify_geometry(model, image_size)  # a GeometryError (ValueError) for a declared geometry that is wrong
        grid = _grid_of(model, g, image_size)
    finally:
        model.train(was)
    return {"image_size": list(image_size), "grid": list(grid), "receptive_field": list(g.receptive_field),
            "stride": list(g.stride), "padding": list(g.padding)}


def _grid_of(model, geometry, image_size):
    """The grid of ``model`` on ``image_size`` images: the geometry's own, else the model's (one blank image)."""
    if geometry.knows_grid(*image_size):
        return geometry.grid_size(*image_size)
    p = next(iter(list(model.parameters()) + list(model.buffers())))
    with torch.no_grad():
        return tuple(model.local_logits(torch.zeros(1, 3, *image_size, device=p.device)).shape[-2:])


def _check_geometry_record(path, model, record) -> None:
    """The rebuilt model's geometry must be the one recorded at saving (the architecture code may have changed)."""
    from .geometry_inference import GeometryError, verify_geometry

    try:
        H, W = (int(v) for v in record["image_size"])
        saved = ([int(v) for v in record[k]] for k in ("receptive_field", "stride", "padding", "grid"))
        saved = tuple(tuple(v) for v in saved)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is malformed: 'geometry' is {_describe(record)}; expected image_size, grid, "
                              "receptive_field, stride and padding as lists of ints") from None
    try:
        g = verify_geometry(model, (H, W))
        now = (g.receptive_field, g.stride, g.padding, tuple(_grid_of(model, g, (H, W))))
    except GeometryError as e:
        raise CheckpointError(f"{path}: the rebuilt model's geometry cannot be verified: {_one_line(e, 400)}") from None
    if now != saved:
        def text(v):
            return f"receptive field {list(v[0])}, stride {list(v[1])}, padding {list(v[2])}, grid {list(v[3])}"

        raise CheckpointError(
            f"{path}: the rebuilt model's geometry on {H}x{W} images is {text(now)} but the checkpoint recorded "
            f"{text(saved)}: the model's code changed since it was saved"
        )


def _describe(value) -> str:
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _metadata_problem(metadata, num_classes: int | None, min_input_size: int) -> str | None:
    """What is wrong with the metadata entries bagcert reads back, or None."""
    if not isinstance(metadata, dict):
        return f"'metadata' is {_describe(metadata)}; expected a dict"
    size = metadata.get("input_size")
    if "input_size" in metadata and (isinstance(size, bool) or not isinstance(size, int) or size < min_input_size):
        return (
            f"metadata 'input_size' is {_describe(size)}; expected an int >= {min_input_size} "
            "(the image side in pixels the model was trained on)"
        )
    resize = metadata.get("resize")
    if resize is not None:
        low = size if isinstance(size, int) else 1
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < low:
            return (
                f"metadata 'resize' is {_describe(resize)}; expected None or an int >= {low} "
                "(the shorter image side before the centre crop of input_size)"
            )
    if "classes" in metadata:
        classes = metadata["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            return f"metadata 'classes' is {_describe(classes)}; expected a list of class names (str)"
        if num_classes is not None and len(classes) != num_classes:
            return f"metadata 'classes' names {len(classes)} classes but the model predicts {num_classes}"
    return None


def check_metadata(metadata, path, num_classes: int | None = None, min_input_size: int = 1) -> dict:
    """Check the metadata entries that bagcert reads back; return ``metadata``.

    Checked when present: ``input_size`` (an int >= ``min_input_size``, the side in pixels of the square images
    the model was trained on), ``resize`` (None or an int >= ``input_size``, the shorter side before the centre
    crop), ``classes`` (a list of ``num_classes`` strings). Other entries are free-form builtins.

    Raises:
        CheckpointError: one line naming ``path``, the entry, what it holds and what was expected.
    """
    problem = _metadata_problem(metadata, num_classes, min_input_size)
    if problem:
        raise CheckpointError(f"{path} is malformed: {problem}")
    return metadata


def _check_state_dict(path, model, state) -> None:
    """Compare the stored weights with the rebuilt architecture; one line naming the first differences."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path} is malformed: 'state_dict' is {_describe(state)}; expected a dict of named tensors")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is malformed: state_dict entries {not_tensors[:3]} are not tensors (the first is {_describe(state[not_tensors[0]])}); expected a dict of named tensors"
        )
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {list(state[k].shape)} (expected {list(want[k].shape)})"
        for k in want
        if k in state and state[k].shape != want[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if shapes:
        problems.append(f"{len(shapes)} of the wrong shape ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
    if problems:
        name = getattr(model, "config", {}).get("name", type(model).__name__)
        raise CheckpointError(
            f"{path}: weights do not match the architecture {name!r} the file records: " + ", ".join(problems) + " tensors"
        )
    # NaN/Inf weights give NaN logits on every image: a damaged or diverged model, refused here with its name
    # rather than as a NaN error in the middle of a certification
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or Inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
            f"expected finite weights (a diverged or damaged model)"
        )


_OTHER_FORMATS = {
    "bagcert-peer-classifier": "a peer classifier: load it with bagcert.peers.load_peer_classifier (certify.py reads it too)",
    "bagcert-defensive-patch": "a defensive patch: load it with bagcert.defense.DefensivePatch.load",
}


def _unknown_model_message(path, name: str, metadata, known: list) -> str:
    """One line: which model the file needs, how to provide it (a --model-module the training run used, when its
    recorded config names one) and the registered names."""
    config = metadata.get("config") if isinstance(metadata, dict) else None
    modules = config.get("model_modules") if isinstance(config, dict) else None
    trained = ""
    if isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules):
        trained = f" (it was trained with {' '.join('--model-module ' + m for m in modules)})"
    return (
        f"{path} records an unknown model {name!r}, which is not registered here{trained}: provide its constructor: "
        f"pass --model-module FILE_OR_MODULE (the .py file or module that calls bagcert.register_model({name!r}, ...)), "
        f"install the plugin package that registers it (entry point group bagcert.models), or import that module "
        f"before load_checkpoint; this bagcert knows {', '.join(known)}"
    )


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely: returns ``(model, metadata)``; the model is in eval mode on ``map_location``.

    ``path`` is a file or the name of a shipped model (``"bagcert-cifar10-r5-dm"``; ``bagcert models`` lists
    them; :func:`bagcert.shipped.resolve_checkpoint`), which works in a checkout and in an installed package alike.

    The file is read with weights-only loading after a CRC-32 check of the archive, the model is rebuilt from
    the registry name and keyword arguments it records, its weights are loaded strictly (every tensor present,
    none extra, every shape equal) and the metadata bagcert reads back is checked (:func:`check_metadata`).

    Raises:
        CheckpointError: one line naming the file, what is wrong and what was expected: missing or unreadable
            file, not a torch file, damaged archive, unsafe pickled content (refused, never run), not a bagcert
            checkpoint, a bare word that is no shipped model name (the names are listed), another format version,
            an unknown model name (how to provide it: --model-module, a plugin package or an import; the known ones
            are listed), a model plugin that fails to load, model arguments this version cannot build, weights that
            do not fit the model, NaN or Inf weights, malformed metadata.
    """
    from .models import PluginError, _is_registered, create_model, list_models  # local import: models import nothing from here
    from .shipped import resolve_checkpoint

    path = resolve_checkpoint(path)
    obj = safe_torch_load(path, verify=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = f"format {obj.get('format')!r}" if isinstance(obj, dict) and "format" in obj else (
            "no 'format' entry" if isinstance(obj, dict) else f"a {type(obj).__name__}, not a dict"
        )
        other = _OTHER_FORMATS.get(obj.get("format")) if isinstance(obj, dict) else None
        hint = f"; it is {other}" if other else ""
        raise CheckpointError(f"{path} is not a bagcert checkpoint ({found}; expected 'format': '{FORMAT}'){hint}")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        hint = "; it was written by a newer bagcert: upgrade bagcert to read it" if newer else ""
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this bagcert reads version {FORMAT_VERSION}{hint}"
        )
    missing = [key for key in ("model", "state_dict", "metadata") if key not in obj]
    if missing:
        raise CheckpointError(f"{path} is malformed: missing {', '.join(repr(k) for k in missing)} (expected 'model', 'state_dict' and 'metadata')")
    spec = obj["model"]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs", {}), dict):
        raise CheckpointError(
            f"{path} is malformed: 'model' is {_describe(spec)}; expected a dict {{'name': <registry name>, 'kwargs': {{...}}}}"
        )
    try:
        registered = _is_registered(spec["name"])
    except PluginError as e:
        raise CheckpointError(f"{path} records model {spec['name']!r}, not one of bagcert's own: {e}") from None
    if not registered:
        raise CheckpointError(_unknown_model_message(path, spec["name"], obj.get("metadata"), list_models()))
    try:
        model = create_model(spec["name"], **spec.get("kwargs", {}))
    except Exception as e:  # the recorded arguments are data from the file: any failure is a malformed file
        raise CheckpointError(f"{path}: cannot rebuild model {spec['name']!r} from its recorded arguments: {_one_line(e, 300)}") from None
    _check_state_dict(path, model, obj["state_dict"])
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the architecture: {_one_line(e, 400)}") from None
    geometry_size = model.geometry.min_input_size() if model.geometry is not None else 1
    check_metadata(obj["metadata"], path, getattr(model, "num_classes", None), geometry_size)
    model.to(map_location).eval()
    if "geometry" in obj:  # a plugin or wrapped model: its geometry is checked again against the recorded one
        _check_geometry_record(path, model, obj["geometry"])
    return model, obj["metadata"]
