"""Models from outside the package: installed plugins (entry points) and model modules (a .py file or a module).

Two ways to add a model to the registry without editing bagcert (docs/own_model_plugin.md):

* **A plugin package.** A distribution declares an entry point in the group ``bagcert.models`` whose object is
  a module (importing it runs its :func:`bagcert.register_model` calls, as a pytest plugin module registers its
  hooks) or a function taking no arguments that makes those calls::

      [options.entry_points]              # setup.cfg; in pyproject.toml: [project.entry-points."bagcert.models"]
      bagcert.models =
          my_models = my_package.models             # a module
          more = my_package.models:register         # or a function that calls bagcert.register_model(...)

  The entry point's name labels the plugin in messages. Plugins are loaded once, lazily: when a model name is
  not in the registry (``create_model``, ``load_checkpoint``, ``bagcert train --model``) and when
  :func:`~bagcert.models.list_models` is called; bagcert's own models never load them.
* **A model module**, for a script or a notebook: :func:`load_model_module` imports a ``.py`` file or a dotted
  module name once; ``bagcert train`` and ``bagcert certify`` take it as ``--model-module FILE_OR_MODULE``.

Either way the model is rebuilt from its registered constructor when a checkpoint is loaded: a checkpoint
records only the registry name, the keyword arguments and the weights, never code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "load_plugins", "load_model_module"]

#: The entry point group that model plugins declare.
ENTRY_POINT_GROUP = "bagcert.models"


class PluginError(ValueError):
    """A model plugin (an entry point of :data:`ENTRY_POINT_GROUP`) or a model module could not be loaded.

    The message is one line naming the plugin or the module, what went wrong (the exception and the file and
    line where it was raised) and what to do. A ValueError, so that the command-line tools print it as their
    one-line error. ``detail`` is the message without the leading ``model module SPEC:`` (for ``--model-module
    SPEC: ...``)."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = message if detail is None else detail


def _module_error(spec: str, detail: str) -> PluginError:
    return PluginError(f"model module {spec}: {detail}", detail)


# loaded: the names of the entry points loaded so far (None: not looked at yet); error: the PluginError of a
# failed load, raised again by every later lookup (a plugin is never half-loaded twice)
_STATE: dict = {"loaded": None, "error": None}


def _one_line(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(exc: BaseException, files: tuple = ()) -> str:
    """`` (file.py, line N)`` of the innermost frame of ``exc``'s traceback (preferring one in ``files``), or ''."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({Path(exc.filename).name}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    inside = [f for f in frames if files and str(Path(f.filename).resolve()) in files]
    frame = (inside or frames)[-1]
    if "importlib" in frame.filename and not inside:
        return ""
    return f" ({Path(frame.filename).name}, line {frame.lineno})"


def _describe_error(exc: BaseException, files: tuple = ()) -> str:
    # str(SyntaxError) already ends in "(file, line N)": use its message alone, the location once
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else exc
    return f"{type(exc).__name__}: {_one_line(text, 200)}{_where(exc, files)}"


def _entry_points() -> list:
    """The entry points of :data:`ENTRY_POINT_GROUP`, one per (name, value) (a distribution found twice on
    ``sys.path`` lists its entry points twice)."""
    seen, out = set(), []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            out.append(ep)
    return sorted(out, key=lambda ep: (ep.name, ep.value))


def _label(ep) -> str:
    dist = getattr(ep, "dist", None)
    dist_text = f" of the package {dist.name} {dist.version}" if dist is not None and getattr(dist, "name", None) else ""
    return f"model plugin {ep.name!r} (entry point {ep.name} = {ep.value} in group {ENTRY_POINT_GROUP}{dist_text})"


def load_plugins() -> list[str]:
    """Load every installed model plugin (entry points of group ``bagcert.models``) once.

    Each entry point's object is loaded: a module is imported (its ``register_model`` calls take effect), a
    function is called with no arguments. Later calls do nothing.

    Returns:
        the names of the loaded entry points, sorted.

    Raises:
        PluginError (a ValueError): one line naming the plugin (entry point and package) that failed: its import
            raised, its function raised or returned something (it should register models and return None), or
            it registered a name that is already taken. The same error is raised by every later call.
    """
    if _STATE["error"] is not None:
        raise _STATE["error"]
    if _STATE["loaded"] is not None:
        return list(_STATE["loaded"])
    loaded = []
    for ep in _entry_points():
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, ModuleType):
                result = obj()
                if result is not None:
                    raise TypeError(
                        f"{ep.value} returned a {type(result).__name__}; the object of a {ENTRY_POINT_GROUP} entry point "
                        "is a module or a function that calls bagcert.register_model(...) and returns None"
                    )
        except Exception as e:  # whatever the plugin's code raised: one line naming the plugin
            _STATE["error"] = PluginError(
                f"{_label(ep)} failed to load: {_describe_error(e)}; fix that package or uninstall it"
            )
            raise _STATE["error"] from None
        loaded.append(ep.name)
    _STATE["loaded"] = loaded
    return list(loaded)


def _module_name_for(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in path.stem)
    return f"bagcert_model_module_{stem}_{digest}"


def load_model_module(spec) -> ModuleType:
    """Import a model module: a ``.py`` file or a dotted module name, so that its ``register_model`` calls
    take effect (``--model-module`` of ``bagcert train`` and ``bagcert certify``).

    Args:
        spec: a path to a ``.py`` file (``my_models.py``, ``models/mine.py``: anything ending in ``.py`` or
            naming an existing file), or an importable dotted module name (``my_package.models``). A file is
            imported once per resolved path, under a private module name; a later call with the same file
            returns the same module without running it again. A module name is imported with
            :func:`importlib.import_module` (once, as Python does).

    Returns:
        the imported module.

    Raises:
        PluginError (a ValueError): one line naming ``spec``: a file that does not exist or is not a ``.py``
            file, a module that cannot be found (with a hint when ``spec.py`` exists in the working folder),
            or the exception its code raised, with the file and line.
    """
    text = str(spec).strip()
    if not text:
        raise _module_error("''", "empty; expected a .py file or a dotted module name such as my_package.models")
    path = Path(text).expanduser()
    if text.endswith(".py") or path.is_file() or "/" in text or "\\" in text:
        return _load_file(text, path)
    try:
        return importlib.import_module(text)
    except ModuleNotFoundError as e:
        if e.name is not None and (text == e.name or text.startswith(e.name + ".")):
            guess = Path(*text.split(".")).with_suffix(".py")
            hint = f"; {guess} exists here: pass the file, --model-module {guess}" if guess.is_file() else (
                "; give a .py file or a module importable from the Python path (an installed package, or run from "
                "the folder that holds it)")
            raise _module_error(text, f"no module named {e.name!r}{hint}") from None
        raise _module_error(text, f"failed to import: {_describe_error(e)}") from None
    except Exception as e:  # the module's own code raised
        raise _module_error(text, f"failed to import: {_describe_error(e)}") from None


def _load_file(text: str, path: Path) -> ModuleType:
    if path.is_dir():
        raise _module_error(text, "is a folder; expected a .py file (or a dotted module name)")
    if not path.is_file():
        raise _module_error(text, "file not found; expected a .py file that calls bagcert.register_model(...)")
    if path.suffix != ".py":
        raise _module_error(text, "not a .py file; expected a Python source file")
    path = path.resolve()
    name = _module_name_for(path)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses, pickling and relative lookups expect the module to be registered
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the file's own code raised: one line with the file and line
        del sys.modules[name]
        raise _module_error(text, f"failed to import: {_describe_error(e, (str(path),))}") from None
    return module
