"""The models and sample images that ship with bagcert, addressed by name.

The shipped models (the top-level ``*.pt`` files of ``checkpoints/``) and the 200 bundled CIFAR-10 test images
(``samples/cifar10``) are listed in ``bagcert/shipped.json``. In a checkout they are read where they lie in the
source tree; an installed package (``pip install .``, a wheel) carries a copy in ``bagcert/_data/`` with the
same relative paths, which ``setup.py`` puts there when it builds the wheel (the files are not duplicated in
git). Either way::

    from bagcert.shipped import resolve_checkpoint, samples_path, shipped_models
    model, meta = bagcert.load_checkpoint("bagcert-cifar10-r5-dm")   # load_checkpoint resolves names itself
    resolve_checkpoint("bagcert-imagenette-r17")      # Path of the .pt file
    samples_path("cifar10")                           # Path of the bundled image folder (<root>/test/<class>/*.jpg)
    shipped_models()["bagcert-cifar10-r9"].clean_accuracy

A model's card numbers (clean and certified accuracy, the set they were measured on) are read from its shipped
report (``checkpoints/<model>/report/results.json``, also packaged), not written in code. ``bagcert models``
prints them.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from functools import lru_cache
from pathlib import Path

from .checkpoint import CheckpointError

__all__ = ["ShippedModel", "DEFAULT_MODEL", "shipped_models", "resolve_checkpoint", "samples_path", "shipped_name",
           "data_location", "model_names", "shipped_certifier"]

_SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when bagcert is imported from one


@lru_cache(maxsize=1)
def _manifest() -> dict:
    return json.loads(importlib.resources.files("bagcert").joinpath("shipped.json").read_text(encoding="utf-8"))


DEFAULT_MODEL: str = _manifest()["default"]


def _packaged_root() -> Path | None:
    """``bagcert/_data`` of an installed package (a folder on disk), or None when bagcert runs from a source tree."""
    root = importlib.resources.files("bagcert").joinpath("_data")
    if isinstance(root, Path) and root.is_dir():
        return root
    return None


def data_location() -> str:
    """Where the shipped files are read from: ``"package"`` (``bagcert/_data`` of an installed package) or
    ``"source tree"`` (a checkout's ``checkpoints/`` and ``samples/``)."""
    return "package" if _packaged_root() is not None else "source tree"


def _locate(relative: str) -> Path:
    """The shipped file or folder ``relative`` (a path of shipped.json, e.g. ``checkpoints/x.pt``): under
    ``bagcert/_data`` in an installed package, else in the source tree. The path may not exist (a damaged install)."""
    packaged = _packaged_root()
    return (packaged if packaged is not None else _SOURCE_ROOT) / relative


@dataclasses.dataclass(frozen=True)
class ShippedModel:
    """One shipped model: its name, file and card numbers.

    Attributes:
        name: the model card's name, e.g. ``"bagcert-cifar10-r5-dm"``; what ``--checkpoint`` and
            :func:`bagcert.load_checkpoint` accept.
        file: path of the checkpoint in the source tree, e.g. ``"checkpoints/bagcert_cifar10_r5s2_dm.pt"``.
        path: the checkpoint file this installation reads (may be missing in a damaged install).
        data: the data it was trained for, e.g. ``"CIFAR-10"``.
        about: one line on what it is.
        card: its model card in the source repository (``docs/...``).
        card_patch: the patch size of the card's headline certified accuracy (``"5"``: 5x5 pixels).
        clean_accuracy: fraction in [0, 1] on the card's evaluation set; None when the report is missing.
        certified_accuracy: fraction in [0, 1] certified and correct against ``card_patch`` patches; None likewise.
        evaluated_on: ``"<dataset name>, <split> split, <n> images"`` of the report; None likewise.
        report: the shipped report's results.json this installation reads.
        certifier: the model's default certificate (:func:`shipped_certifier`), None for the vote count.
    """

    name: str
    file: str
    path: Path
    data: str
    about: str
    card: str
    card_patch: str
    clean_accuracy: float | None
    certified_accuracy: float | None
    evaluated_on: str | None
    report: Path
    certifier: dict | None = None

    def as_dict(self) -> dict:
        """JSON-ready fields (paths as strings)."""
        out = dataclasses.asdict(self)
        out["path"], out["report"] = str(self.path), str(self.report)
        return out


def _read_card(report: Path, patch: str) -> tuple:
    try:
        doc = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, None
    d = doc.get("dataset") or {}
    seeded = "seeded " if d.get("seeded_split") else ""
    where = f"{d.get('name')}, {seeded}{d.get('split')} split, {doc.get('num_images')} images"
    return doc.get("clean_accuracy"), (doc.get("certified_accuracy") or {}).get(patch), where


def shipped_models() -> dict[str, ShippedModel]:
    """The shipped models by name, in the order of the README's table (the default first).

    Returns:
        dict name -> :class:`ShippedModel`; the card numbers are read from each model's shipped report.
    """
    out = {}
    for m in _manifest()["models"]:
        report = _locate(m["report"])
        clean, certified, where = _read_card(report, m["card_patch"])
        out[m["name"]] = ShippedModel(name=m["name"], file=m["file"], path=_locate(m["file"]), data=m["data"],
                                      about=m["about"], card=m["card"], card_patch=m["card_patch"], clean_accuracy=clean,
                                      certified_accuracy=certified, evaluated_on=where, report=report,
                                      certifier=shipped_certifier(m["name"]))
    return out


def model_names() -> list[str]:
    """The shipped model names, the default first."""
    return [m["name"] for m in _manifest()["models"]]


def shipped_certifier(name) -> dict | None:
    """The default certificate of the shipped model ``name`` (its ``"certifier"`` entry in shipped.json), which
    ``bagcert certify`` uses when no certifier flag is given: ``{"kind": "double-masking", "evidence": "logits" or
    "votes", "clip": [low, high] or None}``; None for a model certified by the vote count, and for a name that is
    not a shipped model."""
    for m in _manifest()["models"]:
        if m["name"] == name and m.get("certifier"):
            spec = dict(m["certifier"])
            spec.setdefault("clip", None)
            return spec
    return None


def _names_hint() -> str:
    return f"the shipped models are {', '.join(model_names())} (bagcert models lists them)"


def _looks_like_name(text: str) -> bool:
    """A bare word (no folder separator, no file suffix): meant as a model name, not as a file."""
    return bool(text) and "/" not in text and os.sep not in text and "." not in text


def resolve_checkpoint(name_or_path) -> Path:
    """The checkpoint file meant by ``name_or_path``: a shipped model's name, or a path (returned as given).

    A shipped name always means the shipped model, even if a file of that name lies in the working directory.

    Args:
        name_or_path: str or os.PathLike: ``"bagcert-cifar10-r5-dm"`` or a path to a ``.pt`` file.

    Returns:
        pathlib.Path: the shipped file for a name; ``Path(name_or_path)`` otherwise (whether it exists is for the
        loader to say, except in the two cases below).

    Raises:
        CheckpointError: one line: a shipped model whose file is missing from this installation; a bare word
            (no folder, no suffix) that is neither an existing file nor a shipped name (the names are listed);
            a missing path whose file name is a shipped model's file (the line names the model to use instead).
    """
    text = os.fspath(name_or_path)
    models = {m["name"]: m for m in _manifest()["models"]}
    if text in models:
        path = _locate(models[text]["file"])
        if not path.is_file():
            raise CheckpointError(f"shipped model {text}: its file {path} is missing from this installation; "
                                  "reinstall bagcert")
        return path
    path = Path(text)
    if path.exists():
        return path
    if _looks_like_name(text):
        raise CheckpointError(f"{text!r} is neither a checkpoint file nor a shipped model name; {_names_hint()}")
    for name, m in models.items():
        if path.name == Path(m["file"]).name:
            raise CheckpointError(f"checkpoint file not found: {text}; the shipped model in {path.name} is addressed by "
                                  f"name: {name} (bagcert models lists the shipped models)")
    return path


def shipped_name(path) -> str | None:
    """The name of the shipped model whose file ``path`` is (the same file on disk), else None."""
    try:
        p = Path(path).resolve()
    except (OSError, TypeError, ValueError):
        return None
    for m in _manifest()["models"]:
        if _locate(m["file"]).resolve() == p:
            return m["name"]
    return None


def samples_path(name: str = "cifar10") -> Path:
    """The folder of bundled sample images ``name``.

    Args:
        name: ``"cifar10"``: the first 20 CIFAR-10 test images of each class (200 JPEGs, ``<root>/test/<class>/``;
            provenance in ``samples/README.md``).

    Returns:
        pathlib.Path of the folder (a checkout's ``samples/cifar10``, or the installed package's copy).

    Raises:
        ValueError: an unknown name (the known ones are listed).
    """
    samples = _manifest()["samples"]
    if name not in samples:
        raise ValueError(f"no bundled samples named {name!r}; bagcert bundles {', '.join(samples)}")
    return _locate(samples[name])

