"""Reports: JSON (canonical), per-sample CSV, Markdown summary and figures.

``results.json`` schema (``schema_version`` 1; the ``empirical``, ``certified_broken``, ``method``,
``forward_passes_per_image`` and ``peer`` keys were added without breaking older readers)::

    {
      "schema_version": 1,
      "tool": "bagcert.certify", "bagcert_version": str, "torch_version": str, "git_sha": str | null,
      "code_origin": "git checkout" | "installed package" | "source tree",   # where the running bagcert came from
      "created": ISO-8601 UTC, "device": str, "hardware": str,
      "config": {...command-line options...},
      "checkpoint": {"path": str, "model": str, "model_kwargs": {...}, "metadata_summary": {...}} | null,
                                                         # peer classifiers also "format", "in_channels"; the model
                                                         # is the backbone, metadata_summary holds "peer"; a
                                                         # shipped model also "name" (bagcert.shipped)
      "dataset": {"name": str, "root": str | null, "split": str, "num_images": int,
                  "skipped_images": {"count": int, "files": [str, ...], "dataset_index": [int, ...],
                                     "errors": [str, ...]}},   # only with certify --skip-bad-images and files
                                                         # that could not be decoded; they are in no count below
      "aggregation": str,                                # bagcert models: votes / majority / clipped; peers: = method
      "method": str,                                     # "bagcert" for a bagcert model, else the peer certifier's
                                                         # name: "drs-column-b4", "drs-block-b12", "patchcleanser-k6"
      "forward_passes_per_image": int,                   # network evaluations per image (1 for a bagcert model)
      "peer": null | {                                   # null for a bagcert model; else the spec recorded in the
        "spec": str, "method": "drs" | "patchcleanser", ...,   # peer classifier (bagcert.peers.PeerSpec.to_dict; its
                                                         #   num_masks = masks per training image) plus
        "affected_ablations": {"<size>": int, ...},      #   DRS: Δ, ablations a patch of each size meets
        "mask_set": {"patch_size": [h, w], "rebuilt": bool, "k": [kr, kc], "num_masks": int, "mask_size": [h, w],
                     "stride": [h, w], "row_starts": [int, ...], "col_starts": [int, ...], "fill": float}
      },                                                 #   PatchCleanser: the mask set certified with
      "clean_accuracy": float,                           # correct_count / num_images (double precision)
      "clean_accuracy_ci95": [lo, hi] | null,            # 95 % Clopper-Pearson interval of that fraction (see below)
      "certified_accuracy": {"<size>": float, ...},      # certified_count / num_images; size '5' or '3x7' (h x w px)
      "certified_accuracy_ci95": {"<size>": [lo, hi] | null, ...},
      "certified_count": {"<size>": int, ...}, "correct_count": int, "num_images": int,
                                                         # the counts are canonical: every fraction in this file is
                                                         # a count divided by its image count in double precision
                                                         # (112 / 200 -> 0.56, never a float32 value 0.5600000023841858)
      "images_per_s": float,                             # images / wall time of forward + certificates
      "certify_forward_ratio": float,                    # (forward + certificates) / forward time; peers: forward
                                                         # = all network evaluations (ablations, masked images)
      "timing": {"forward_s": float, "certify_s": float, "total_s": float},
      "certified_broken": {"<size>": int, ...},          # {} without --attacks; anything > 0 is a soundness bug
      "empirical": null | {                              # null without --attacks
        "attacks": [str, ...],                           # requested: pgd, pgd-adaptive, universal, imagenet-patch, feature-space
        "num_images_attacked": int, "subset_seed": int,  # the first N of a seeded permutation of the certified images
        "settings": {"<attack>": {...}, ...},            # steps, step size, locations, surrogate, seed, ...
        "skipped": {"<attack>": str, ...},               # why an attack did not run (e.g. imagenet-patch on CIFAR)
        "notes": [str, ...],
        "per_size": {"<size>": {
          "patch_size": [h, w], "num_images": int,
          "clean_accuracy": float, "certified_accuracy": float,      # on the attacked images
          "robust_accuracy": {"<attack>": float, ...},               # empirical robust accuracy per attack
          "certified_count": int, "robust_count": {"<attack>": int, ...},  # the counts behind those fractions
          "correct_count": int, "overall_robust_count": int | null,
          "clean_accuracy_ci95": [lo, hi], "certified_accuracy_ci95": [lo, hi],     # 95 % Clopper-Pearson
          "robust_accuracy_ci95": {"<attack>": [lo, hi], ...},       #   intervals of the fractions above
          "overall_robust_accuracy_ci95": [lo, hi] | null,
          "overall_robust_accuracy": float | null,                   # robust against every image-space attack
          "overall_attacks": [str, ...],                             #   inside the threat model
          "in_threat_model": {"<attack>": bool, ...},                # every patch fit in the certified rectangle
          "certified_broken": int, "broken_by": {"<attack>": [int, ...]},   # indices into the attacked subset
          "feature_space_mismatch": int | null,                      # feature-space broken != not certified
          "prediction_mismatch": int,
          "time_s": {"<attack>": float, ...}, "attack_info": {"<attack>": {...}},
          "figures": [str, ...]
        }, ...}
      }
    }

Every ``*_ci95`` value is the exact (Clopper-Pearson) 95 % confidence interval ``[lo, hi]`` of the accuracy next
to it, computed from its integer count ``k`` of ``n`` images (:func:`binomial_ci95`; null when ``n`` is 0). It
treats the images as a random sample of the test distribution: the accuracy of the whole distribution (e.g. the
full test set) lies in it with 95 % confidence. It says nothing about the certificate itself, which is exact per
image: certified images are certified, the interval only bounds what the fraction would be on other images.

``results.json`` also holds ``run_id`` (a random hex string, new for every run), and ``dataset`` holds
``index_base`` (``"dataset"``: ``dataset_index`` below points into the whole dataset; see :func:`sample_provenance`).

``per_sample.csv``: one row per image: index (the row, 0..N-1, as in ``broken_by``), dataset_index (the
image's index in the whole dataset as loaded: the torchvision index for CIFAR-10 batches, the position in
the class-then-file-name listing for image folders, before any seeded split or ``--num-images`` subset),
source (the image file relative to ``dataset.root`` of results.json, ``<batch file>:<row>`` for CIFAR-10
batches, empty for synthetic data), label,
prediction, correct, then for each patch size ``certified_<size>``, ``margin_<size>``, ``worst_row_<size>``,
``worst_col_<size>``; with attacks also ``attacked`` (1/0) and ``robust_<attack>_<size>`` (1/0, empty for
images that were not attacked).

Report folders: :class:`ReportFolder` writes a report into a private staging folder beside ``--output`` and
moves the finished set into place, so a report folder always holds the complete files of one run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import errno
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import torch

from . import __version__
from .checkpoint import atomic_write_text

SCHEMA_VERSION = 1

__all__ = [
    "ReportFolder",
    "ReportFolderError",
    "foreign_files",
    "REPORT_FILE_NAMES",
    "sample_provenance",
    "write_certification_report",
    "binomial_ci95",
    "format_accuracy",
    "threat_model_note",
    "git_sha",
    "code_origin",
    "hardware_string",
    "SCHEMA_VERSION",
    "environment_info",
    "plot_attack_examples",
    "plot_uncertified_positions",
    "attack_examples_figure",
    "uncertified_positions_figure",
    "accuracy_figure",
    "accuracy_series",
    "select_example_rows",
    "class_name",
    "WNID_NAMES",
]


def git_sha() -> str | None:
    """The commit of the git checkout that the running bagcert package lies in (its folder's parent is the top of
    the work tree), else None: an installed package (site-packages, a ``pip install --target`` folder) or a
    source tree without git. A package installed inside some other repository (a virtualenv in a checkout)
    does not take that repository's commit."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2:
        return None
    try:
        same = Path(lines[0]).resolve() == root
    except OSError:
        return None
    return lines[1] if same else None


def code_origin(sha: str | None = None) -> str:
    """Where the running bagcert comes from: ``"git checkout"`` (``git_sha`` finds a commit; pass it as ``sha``
    to skip a second look-up), ``"installed package"`` (a ``bagcert-*.dist-info`` lies beside the package: pip
    installed it, into site-packages or a ``--target`` folder) or ``"source tree"`` (no git, not installed)."""
    if sha is None:
        sha = git_sha()
    if sha:
        return "git checkout"
    here = Path(__file__).resolve().parent.parent
    if any(here.glob("bagcert-*.dist-info")):
        return "installed package"
    return "source tree"


def code_version_text(s: dict) -> str:
    """The report's account of the code that made it (from a report summary ``s``): ``bagcert 0.1.0, torch
    2.14.1, git <sha>`` from a checkout, else ``bagcert 0.1.0 (installed package, no git checkout), torch 2.14.1``."""
    if s.get("git_sha"):
        return f"bagcert {s['bagcert_version']}, torch {s['torch_version']}, git {s['git_sha']}"
    origin = s.get("code_origin") or "origin unknown"
    return f"bagcert {s['bagcert_version']} ({origin}, no git checkout), torch {s['torch_version']}"


def hardware_string(device="cpu", threads: int | None = None) -> str:
    """The GPU's name, or the CPU's model, core count and torch threads (``threads``: those of the measured
    process, when it is not this one; default this process's)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads() if threads is None else threads}"


def environment_info(device="cpu") -> dict:
    sha = git_sha()
    return {
        "bagcert_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "git_sha": sha,
        "code_origin": code_origin(sha),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "device": str(device),
        "hardware": hardware_string(device),
    }


# ------------------------------------------------------------------------------------------------
# report folders: one run's complete set, moved into place at once
# ------------------------------------------------------------------------------------------------
class ReportFolderError(ValueError):
    """A report folder cannot be written: the path is a file or lies under one, its parent is not writable,
    it holds files that are not a bagcert report, or it holds another run's report and overwriting was not asked."""


def _one_report_tool(folder: Path) -> str | None:
    """The ``tool`` of ``folder/results.json`` when that file is a bagcert report, else None."""
    try:
        doc = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None
    tool = doc.get("tool") if isinstance(doc, dict) else None
    return tool if isinstance(tool, str) and tool.startswith("bagcert") else None


#: The files the report tools write into a report folder (besides the figures its results.json lists under
#: ``"figures"``): replacing a report (``--overwrite``) may remove these and nothing else.
REPORT_FILE_NAMES = frozenset({
    "results.json", "summary.md", "per_sample.csv", "certified_accuracy.png", "defensive_patch.pt", "patches.png",
    "corruptions.png", "response_rate.png", "iou.png", "heatmaps.png",
})
REPORT_FILE_PATTERNS = ("attack_examples_*.png", "uncertified_positions_*.png")


def _named_files(obj, out: set, key: str | None = None) -> set:
    """The file names a results.json document lists under ``"figures"`` keys (the attack figures)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _named_files(v, out, k)
    elif isinstance(obj, list):
        for v in obj:
            _named_files(v, out, key)
    elif key == "figures" and isinstance(obj, str) and "/" not in obj and "\\" not in obj:
        out.add(obj)
    return out


def foreign_files(folder) -> list:
    """The entries of a report folder that bagcert did not write (sorted names): anything but the report tools'
    files (:data:`REPORT_FILE_NAMES`, :data:`REPORT_FILE_PATTERNS`) and the figures its ``results.json`` lists.
    Sub-folders always count as foreign (no tool writes one). Replacing the report would delete them."""
    import fnmatch

    folder = Path(folder)
    try:
        doc = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        doc = None
    named = _named_files(doc, set())
    out = []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        own = e.is_file(follow_symlinks=False) and (
            e.name in REPORT_FILE_NAMES or e.name in named or any(fnmatch.fnmatchcase(e.name, p) for p in REPORT_FILE_PATTERNS))
        if not own:
            out.append(e.name)
    return out


class ReportFolder:
    """A report folder that always holds the complete files of one run, or nothing.

    The run writes into a private staging folder (``.<name>.staging-<random>``, made with
    :func:`tempfile.mkdtemp` in the same parent folder, so on the same file system), and :meth:`commit`
    moves the finished set into place with :func:`os.rename` of the whole folder. Readers and concurrent
    runs therefore never see a mix of two runs' files, and a rerun that writes fewer files (fewer patch
    sizes) leaves no stale file of the previous run behind. Replacing an existing report (``overwrite``)
    renames the old folder aside (``.<name>.old-<random>``), renames the new one into place and then
    deletes the old one: between the two renames (microseconds) the path does not exist, and a run killed
    exactly there leaves the old report in the ``.old-`` folder. A run killed before :meth:`commit` leaves
    its staging folder (hidden, beside the report), never a half-written report.

    Staging was chosen over a lock file (``fcntl.flock``): a lock serialises writers but not readers,
    leaves a half-written or mixed folder when a run dies mid-write, and does not remove stale files.

    Args:
        path: the report folder (``--output``). A symbolic link to a folder is followed.
        overwrite: allow replacing a folder that already holds a bagcert report (all of its files). A report
            folder that also holds files bagcert did not write (a user's notes: :func:`foreign_files`) is refused
            even then, naming them, because replacing the folder would delete them.

    Construction checks, without leaving anything behind, that the folder can be written: the path is not a
    file, no component of it is a file, the nearest existing folder takes a new folder (an empty probe folder
    is made and removed there), and an existing folder is empty or (with ``overwrite``) holds a bagcert report
    (a ``results.json`` with a ``bagcert`` tool).
    Raises :class:`ReportFolderError` with one line saying what is wrong.
    """

    def __init__(self, path, overwrite: bool = False):
        p = Path(os.path.abspath(os.fspath(path)))
        if p.is_symlink() and p.is_dir():
            p = p.resolve()
        if not p.name:
            raise ReportFolderError(f"report folder {path}: give a folder path below the file system root")
        self.path, self.overwrite = p, bool(overwrite)
        self.run_id = uuid.uuid4().hex
        self._stage: Path | None = None
        self.check()

    def check(self) -> None:
        """Raise :class:`ReportFolderError` when the report could not be written into :attr:`path` now."""
        p, shown = self.path, self.path
        if os.path.lexists(p):
            if not p.is_dir():
                raise ReportFolderError(f"report folder {shown} is an existing file, not a folder; give a new folder path")
            self._check_existing_contents()
            writable = p.parent
        else:
            writable = p.parent
            while not os.path.lexists(writable) and writable != writable.parent:
                writable = writable.parent
            if not writable.is_dir():
                raise ReportFolderError(f"report folder {shown} lies under {writable}, which is a file, not a folder")
        if not os.access(writable, os.W_OK | os.X_OK):
            raise ReportFolderError(f"report folder {shown} cannot be created: {writable} is not writable (permission denied or read-only)")
        try:  # the real test (read-only mounts, /proc, ACLs, root): make and remove an empty folder there
            os.rmdir(tempfile.mkdtemp(prefix=".bagcert-write-probe-", dir=writable))
        except OSError as e:
            raise ReportFolderError(f"report folder {shown} cannot be created: cannot write into {writable} ({e.strerror})") from None

    def _check_existing_contents(self) -> None:
        p = self.path
        try:
            entries = sorted(os.listdir(p))
        except OSError as e:
            raise ReportFolderError(f"report folder {p} cannot be read: {e.strerror}") from None
        if not entries:
            return
        tool = _one_report_tool(p)
        if tool is None:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ReportFolderError(
                f"report folder {p} holds files that are not a bagcert report ({shown}); give a new or empty folder "
                "(--overwrite replaces only a folder holding a bagcert report)"
            )
        if not self.overwrite:
            raise ReportFolderError(f"report folder {p} already holds a report ({tool}); pass --overwrite to replace it, or give another folder")
        self._refuse_foreign(p)

    @staticmethod
    def _refuse_foreign(p: Path) -> None:
        """Raise :class:`ReportFolderError` when the report folder ``p`` holds files bagcert did not write."""
        try:
            foreign = foreign_files(p)
        except OSError as e:
            raise ReportFolderError(f"report folder {p} cannot be read: {e.strerror}") from None
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise ReportFolderError(
                f"report folder {p} holds a report and files bagcert did not write ({shown}); replacing the report "
                "would delete them: move them elsewhere or give another folder"
            )

    def stage(self) -> Path:
        """Create (once) and return the private staging folder the run writes its files into."""
        if self._stage is None:
            self.check()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.staging-", dir=self.path.parent))
            except OSError as e:
                raise ReportFolderError(f"report folder {self.path} cannot be created: {e.strerror} ({e.filename})") from None
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(self._stage, 0o777 & ~mask)  # mkdtemp makes 0700; the report gets the usual permissions
        return self._stage

    def commit(self) -> Path:
        """Move the staging folder into place as :attr:`path`; returns the path.

        If another run filled :attr:`path` meanwhile, it is replaced when ``overwrite`` was given and the
        folder holds a bagcert report; otherwise :class:`ReportFolderError` says where this run's report was
        left (the staging folder is kept; :meth:`discard` no longer removes it)."""
        if self._stage is None:
            raise RuntimeError("nothing to commit: stage() was never called")
        stage, target = self._stage, self.path
        for _ in range(20):  # another run may swap the folder between our renames: try again
            try:
                os.rename(stage, target)  # succeeds when the target is missing or an empty folder
                self._stage = None
                return target
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    self._stage = None  # handed over to the user: discard() keeps it
                    raise ReportFolderError(f"cannot move the report into {target}: {e.strerror} (it is kept in {stage})") from None
            if not target.is_dir() or not self.overwrite or _one_report_tool(target) is None or foreign_files(target):
                self._stage = None
                raise ReportFolderError(
                    f"report folder {target} was filled by something else while this run worked"
                    f"{'' if self.overwrite else ' (another run?)'}; nothing there was changed and this run's complete "
                    f"report is in {stage}"
                )
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.rename(target, old)  # replaces the empty placeholder folder `old`
            except FileNotFoundError:  # another run moved it first
                os.rmdir(old)
                continue
            try:
                os.rename(stage, target)
            except OSError:
                if not os.path.lexists(target):  # put the old report back rather than leave nothing
                    os.rename(old, target)
                continue
            shutil.rmtree(old, ignore_errors=True)
            self._stage = None
            return target
        self._stage = None
        raise ReportFolderError(f"report folder {target} kept changing under this run; its report is in {stage}")

    @property
    def staging(self) -> Path | None:
        """The staging folder while the run owns it (None before :meth:`stage`, after :meth:`commit` or :meth:`keep`)."""
        return self._stage

    def keep(self) -> Path | None:
        """Hand the staging folder over to the user (a failed run's finished files): :meth:`discard` no longer
        removes it. Returns its path (None when there is none)."""
        stage, self._stage = self._stage, None
        return stage

    def discard(self) -> None:
        """Remove the staging folder (a failed run leaves nothing behind)."""
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None


def sample_provenance(data) -> dict:
    """Where each image of ``data`` (a :class:`bagcert.data.Dataset`) came from, for ``per_sample.csv``.

    Returns ``{"dataset_index": [int] * N, "source": [str] * N, "index_base": str}``: ``data.indices`` (the
    image's index in the whole dataset as loaded, before any seeded split or subset; ``index_base``
    ``"dataset"``) and ``data.sources`` (the image file relative to the dataset root, ``<batch file>:<row>``
    for CIFAR-10 batches; empty strings when the dataset records none, e.g. synthetic data). A dataset object
    without ``indices`` gets its row numbers (``index_base`` ``"loaded"``).
    """
    n = len(data)
    indices = getattr(data, "indices", None)
    sources = getattr(data, "sources", None)
    if indices is not None and len(indices) == n:
        index = [int(v) for v in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        base = "dataset"
    else:
        index, base = list(range(n)), "loaded"
    source = ["" if s is None else str(s) for s in sources] if sources is not None and len(sources) == n else [""] * n
    return {"dataset_index": index, "source": source, "index_base": base}


def binomial_ci95(count: int, n: int) -> list | None:
    """The exact (Clopper-Pearson) two-sided 95 % confidence interval ``[lo, hi]`` of a binomial proportion
    ``count / n``: lo is the 2.5 % quantile of Beta(count, n - count + 1) (0 when count is 0), hi the 97.5 %
    quantile of Beta(count + 1, n - count) (1 when count is n); ``scipy.stats.binomtest(count, n)
    .proportion_ci(method="exact")`` (Clopper & Pearson, Biometrika 1934). Its coverage is at least 95 % for
    every true proportion. 0 of 10 gives [0, 0.3085], 112 of 200 [0.4883, 0.6299].

    Args:
        count: successes (correct, certified or robust images), an integer in [0, n].
        n: images, an integer >= 0.

    Returns:
        ``[lo, hi]`` (Python floats in [0, 1]), or None when ``n`` is 0 (no interval without images).

    Raises:
        ValueError: a count or n that is not an integer, or a count outside [0, n].
    """
    if isinstance(count, bool) or isinstance(n, bool) or int(count) != count or int(n) != n:
        raise ValueError(f"binomial_ci95: count and n must be integers, got {count!r} and {n!r}")
    count, n = int(count), int(n)
    if n < 0 or not 0 <= count <= max(n, 0):
        raise ValueError(f"binomial_ci95: need 0 <= count <= n, got count {count} of n {n}")
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(count, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def _count_of(fraction, n: int) -> int | None:
    """The count behind ``fraction`` of ``n`` images (fractions are counts / n in double precision, so rounding
    recovers the count exactly); None for a missing fraction."""
    if fraction is None or not n or fraction != fraction:
        return None
    return int(round(fraction * n))


def _empirical_with_ci(e: dict | None) -> dict | None:
    """A copy of the ``"empirical"`` object with the ``*_ci95`` intervals of every fraction (from its counts)."""
    if not e:
        return e
    out = dict(e, per_size={})
    for key, r in e["per_size"].items():
        r = dict(r)
        n = int(r["num_images"])
        counts = {
            "clean": r.get("correct_count", _count_of(r.get("clean_accuracy"), n)),
            "certified": r.get("certified_count", _count_of(r.get("certified_accuracy"), n)),
            "overall": r.get("overall_robust_count", _count_of(r.get("overall_robust_accuracy"), n)),
        }
        robust = dict(r.get("robust_count") or {})
        for a, v in r["robust_accuracy"].items():
            robust.setdefault(a, _count_of(v, n))
        ci = lambda k: None if k is None else binomial_ci95(k, n)  # noqa: E731
        r["clean_accuracy_ci95"] = ci(counts["clean"])
        r["certified_accuracy_ci95"] = ci(counts["certified"])
        r["robust_accuracy_ci95"] = {a: ci(robust[a]) for a in r["robust_accuracy"]}
        r["overall_robust_accuracy_ci95"] = ci(counts["overall"])
        out["per_size"][key] = r
    return out


def format_accuracy(fraction, ci=None, digits: int = 2) -> str:
    """An accuracy for people: ``"56.00 % (48.8-63.0)"``: the fraction in percent, then its 95 % confidence
    interval in percent (one decimal) when ``ci`` ([lo, hi] fractions) is given; ``"n/a"`` for None."""
    if fraction is None:
        return "n/a"
    text = f"{100 * fraction:.{digits}f} %"
    if ci is not None:
        text += f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"
    return text


def write_certification_report(output, results: dict, timing: dict, config: dict, dataset: dict, checkpoint: dict | None, device="cpu", empirical: dict | None = None, method: dict | None = None, provenance: dict | None = None, run_id: str | None = None) -> dict:
    """Write results.json, per_sample.csv, summary.md and certified_accuracy.png into the folder ``output``.

    The files are written into ``output`` as given: to write a report folder as one set, pass the staging
    folder of a :class:`ReportFolder` and commit it afterwards (``certify.py`` does).

    ``results`` maps size keys ('5', '3x7') to :class:`~bagcert.certification.CertResult`.
    ``method`` (optional): ``{"method": str, "forward_passes_per_image": int, "peer": dict | None}``; the
    default describes a bagcert model (``"bagcert"``, 1 pass, no peer).
    ``empirical`` (optional): ``{"summary": <the "empirical" JSON object>, "indices": [attacked image indices],
    "robust": {size_key: {attack: bool tensor over the attacked images}}}``.
    ``provenance`` (optional): :func:`sample_provenance` of the certified images (default: row numbers as
    ``dataset_index`` and empty sources). ``run_id`` (optional): recorded as ``run_id`` (default: a new random one).
    Returns the JSON summary dict.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    n = first.num_samples
    method = method or {"method": "bagcert", "forward_passes_per_image": 1, "peer": None}
    if provenance is None:
        provenance = {"dataset_index": list(range(n)), "source": [""] * n, "index_base": "loaded"}
    if len(provenance["dataset_index"]) != n or len(provenance["source"]) != n:
        raise ValueError(f"provenance describes {len(provenance['dataset_index'])} images, the results {n}")
    # counts first (integers), fractions from them in double precision: 112 / 200 is stored as 0.56
    correct = int(first.correct.sum())
    certified = {k: int(r.certified_correct.sum()) for k, r in results.items()}
    summary = {"schema_version": SCHEMA_VERSION, "tool": "bagcert.certify", "run_id": run_id or uuid.uuid4().hex,
               **environment_info(device)}
    summary.update(
        {
            "config": config,
            "checkpoint": checkpoint,
            "dataset": dict(dataset, num_images=n, index_base=provenance["index_base"]),
            "aggregation": first.aggregation,
            "method": method["method"],
            "forward_passes_per_image": int(method["forward_passes_per_image"]),
            "peer": method.get("peer"),
            "num_images": n,
            "correct_count": correct,
            "clean_accuracy": correct / n if n else float("nan"),
            "clean_accuracy_ci95": binomial_ci95(correct, n),
            "certified_accuracy": {k: c / n if n else float("nan") for k, c in certified.items()},
            "certified_accuracy_ci95": {k: binomial_ci95(c, n) for k, c in certified.items()},
            "certified_count": certified,
            "images_per_s": n / timing["total_s"] if timing["total_s"] > 0 else None,
            "certify_forward_ratio": (timing["forward_s"] + timing["certify_s"]) / timing["forward_s"] if timing["forward_s"] > 0 else None,
            "timing": {k: timing[k] for k in ("forward_s", "certify_s", "total_s")},
            "certified_broken": {k: v["certified_broken"] for k, v in empirical["summary"]["per_size"].items()} if empirical else {},
            "empirical": _empirical_with_ci(empirical["summary"]) if empirical else None,
        }
    )
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "per_sample.csv", _per_sample_csv(results, empirical, provenance))
    atomic_write_text(out / "summary.md", _markdown(summary))
    _plot(out / "certified_accuracy.png", summary)
    return summary


def _per_sample_csv(results, empirical=None, provenance=None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = list(results)
    first = results[keys[0]]
    n = first.num_samples
    provenance = provenance or {"dataset_index": list(range(n)), "source": [""] * n}
    header = ["index", "dataset_index", "source", "label", "prediction", "correct"]
    for k in keys:
        header += [f"certified_{k}", f"margin_{k}", f"worst_row_{k}", f"worst_col_{k}"]
    cols = [provenance["dataset_index"], provenance["source"], first.label.tolist(), first.prediction.tolist(), first.correct.int().tolist()]
    per = []
    for k in keys:
        r = results[k]
        m = r.margin
        per += [r.certified.int().tolist(), (m.tolist() if not m.is_floating_point() else [f"{v:.6g}" for v in m.tolist()]), r.worst_position[:, 0].tolist(), r.worst_position[:, 1].tolist()]
    if empirical:
        n = first.num_samples
        attacked = [0] * n
        for i in empirical["indices"]:
            attacked[i] = 1
        header.append("attacked")
        per.append(attacked)
        for k, by_attack in empirical["robust"].items():
            for name, flags in by_attack.items():
                col = [""] * n
                for i, f in zip(empirical["indices"], flags.tolist()):
                    col[i] = int(f)
                header.append(f"robust_{name}_{k}")
                per.append(col)
    w.writerow(header)
    for i in range(first.num_samples):
        w.writerow([i] + [c[i] for c in cols] + [c[i] for c in per])
    return buf.getvalue()


def _is_dense(model_kwargs) -> bool:
    """Whether a model's registry keyword arguments (a dict, or anything else for unknown) ask for a dense evaluation."""
    return isinstance(model_kwargs, dict) and model_kwargs.get("dense") is True


def model_label(name: str | None, model_kwargs=None) -> str | None:
    """A model's name for titles: its registry name, with " (dense)" for a dense evaluation; None if unknown."""
    if not name:
        return None
    return name + (" (dense)" if _is_dense(model_kwargs) else "")


def _dense_note(s: dict) -> str:
    """", evaluated densely (every pixel a location)" for a report of a dense model, else ""."""
    return ", evaluated densely (every pixel a location)" if _is_dense((s.get("checkpoint") or {}).get("model_kwargs")) else ""


def _markdown_precision(s: dict) -> list:
    """The precision line of summary.md ("fp32", or "bf16": certificates of the model as evaluated in bf16)."""
    p = (s.get("config") or {}).get("precision")
    if p is None:
        return []
    note = " (predictions and certificates are those of the model as evaluated in bf16 autocast)" if p == "bf16" else ""
    return [f"- precision: {p}{note}"]


def _markdown(s: dict) -> str:
    lines = [
        "# Certification report",
        "",
        f"- dataset: {s['dataset'].get('name')} ({s['num_images']} images, split {s['dataset'].get('split')})",
        *_markdown_skipped(s["dataset"].get("skipped_images")),
        f"- checkpoint: {_checkpoint_text(s.get('checkpoint'))}{_dense_note(s)}",
        f"- aggregation: {s['aggregation']}",
        *_markdown_precision(s),
        *_markdown_method(s),
        f"- device: {s['device']} ({s['hardware']})",
        f"- {code_version_text(s)}, {s['created']}",
        "",
        f"Clean accuracy: **{100 * s['clean_accuracy']:.2f} %** ({s['correct_count']} / {s['num_images']}; 95 % CI "
        f"{_ci_text(s.get('clean_accuracy_ci95'))})",
        "",
        "| patch (pixels) | certified accuracy (95 % CI) | certified and correct |",
        "| --- | ---: | ---: |",
    ]
    cis = s.get("certified_accuracy_ci95") or {}
    for k, v in s["certified_accuracy"].items():
        lines.append(f"| {k if 'x' in k else f'{k}x{k}'} | {format_accuracy(v, cis.get(k))} | {s['certified_count'][k]} |")
    lines += [
        "",
        f"In parentheses: the exact (Clopper-Pearson) 95 % confidence interval, in percent, of the accuracy on the data "
        f"these {s['num_images']} images are a random sample of (e.g. the full test set). The certificate of each image "
        "is exact; the interval only says how far the fraction may be from that of other images.",
        "",
        f"Throughput: {s['images_per_s']:.1f} images/s; certify / forward time ratio {s['certify_forward_ratio']:.3f}.",
        "",
    ]
    if s.get("empirical"):
        lines += _markdown_empirical(s["empirical"])
    return "\n".join(lines)


def _checkpoint_text(ckpt) -> str:
    """The summary's checkpoint: its path, after the shipped model's name when it was addressed by one."""
    if not ckpt:
        return "none"
    return f"{ckpt['name']} ({ckpt['path']})" if ckpt.get("name") else str(ckpt["path"])


def _markdown_skipped(rec) -> list:
    """The files ``certify --skip-bad-images`` left out (not counted in any number of the report)."""
    if not rec:
        return []
    files = ", ".join(f"`{f}`" for f in rec["files"][:10]) + (f", ... ({rec['count']} in all)" if rec["count"] > 10 else "")
    return [f"- skipped (--skip-bad-images): {rec['count']} image(s) that could not be decoded, not counted in any number "
            f"below: {files}"]


def _markdown_method(s: dict) -> list:
    """The certification method, its network evaluations per image and, for a peer, its spec / mask set."""
    method = s.get("method")
    if method is None:
        return []
    n = s.get("forward_passes_per_image")
    lines = [f"- method: {method} ({n} network evaluation{'' if n == 1 else 's'} per image)"]
    peer = s.get("peer")
    if peer:
        lines.append(f"- peer spec: `{peer.get('spec')}`")
        ms = peer.get("mask_set")
        if ms:
            note = " (rebuilt with --mask-patch-size, not the mask set the classifier was trained with)" if ms.get("rebuilt") else ""
            lines.append(
                f"- mask set: {ms['num_masks']} masks of {ms['mask_size'][0]}x{ms['mask_size'][1]} px built for "
                f"{ms['patch_size'][0]}x{ms['patch_size'][1]} patches{note}; it certifies every patch size up to that one"
            )
    return lines


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _ci_text(ci) -> str:
    """``"48.8-63.0 %"`` for an interval of fractions, ``"n/a"`` for None."""
    return "n/a" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f} %"


def _markdown_empirical(e: dict) -> list:
    ran = [a for a in e["attacks"] if a not in e.get("skipped", {})]
    lines = [
        "## Empirical robustness (attacks) next to the certificate",
        "",
        f"{e['num_images_attacked']} images attacked (seeded subset, seed {e['subset_seed']}). Empirical robust accuracy is the",
        "fraction still classified correctly after the attack; it can never be below the certified accuracy on the",
        "same images. `overall` = robust against every image-space attack inside the threat model. `certified broken`",
        "counts certified samples some attack broke: anything but 0 is a soundness bug. In parentheses: the exact 95 %",
        "confidence interval (percent) over the attacked images.",
        "",
        "| " + " | ".join(["patch", "certified"] + ran + ["overall", "certified broken"]) + " |",
        "| --- | " + " | ".join("---:" for _ in range(len(ran) + 3)) + " |",
    ]
    for k, r in e["per_size"].items():
        cells = []
        robust_ci = r.get("robust_accuracy_ci95") or {}
        for a in ran:
            v = format_accuracy(r["robust_accuracy"].get(a), robust_ci.get(a))
            if a in r["in_threat_model"] and not r["in_threat_model"][a]:
                v += " (outside threat model)"
            cells.append(v)
        broken = r["certified_broken"]
        row = [k if "x" in k else f"{k}x{k}", format_accuracy(r["certified_accuracy"], r.get("certified_accuracy_ci95"))] + cells
        row += [format_accuracy(r["overall_robust_accuracy"], r.get("overall_robust_accuracy_ci95")),
                str(broken) if not broken else f"**{broken} SOUNDNESS VIOLATION**"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for a, why in e.get("skipped", {}).items():
        lines.append(f"- {a} skipped: {why}")
    for note in e.get("notes", []):
        lines.append(f"- {note}")
    figs = [f for r in e["per_size"].values() for f in r.get("figures", [])]
    if figs:
        lines.append("- figures: " + ", ".join(figs))
    lines.append("")
    return lines


def _plot(path: Path, s: dict) -> None:
    """Write ``certified_accuracy.png`` for the report summary ``s``; without matplotlib, one line on stderr
    says that the figure was skipped and how to get it."""
    plt = _pyplot()
    if plt is None:
        print(f"{path.name} skipped: matplotlib is not installed (pip install 'bagcert[plots]')", file=sys.stderr)
        return
    _save(accuracy_figure(s), path, plt, dpi=120)


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
#: Readable names of the ImageNet wnids this package knows: the ten Imagenette classes (names from the
#: ImageNet-1k class list). A class named by another wnid is shown as the wnid.
WNID_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}


def class_name(classes, i) -> str:
    """The readable name of class index ``i``: ``classes[i]`` (a wnid listed in :data:`WNID_NAMES` becomes its
    name), or the index as text when ``classes`` is None or too short."""
    i = int(i)
    if classes is None or not 0 <= i < len(classes):
        return str(i)
    c = str(classes[i])
    return WNID_NAMES.get(c, c)


_name = class_name


def margin_unit(aggregation: str) -> str:
    """The unit of a certificate margin of ``aggregation``: ``"votes"`` for votes / majority, else the
    summed clipped scores."""
    return "votes" if aggregation in ("votes", "majority") else f"{aggregation} score sum"


def certificate_method(aggregation: str | None = None, model: str | None = None, method: str | None = None) -> str:
    """A figure title's name of the certification method, e.g. ``"BagCert (votes aggregation), cifar_bagnet5_s2"``."""
    name = "BagCert" if method in (None, "bagcert") else str(method)
    if aggregation and method in (None, "bagcert"):
        name += f" ({aggregation} aggregation)"
    return f"{name}, {model}" if model else name


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _wrap_title(text: str, width_in: float, fontsize: float = 9) -> str:
    """``text`` broken into lines (at spaces) that fit a figure ``width_in`` inches wide at ``fontsize`` points."""
    import textwrap

    per_line = max(20, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, per_line, break_on_hyphens=False) for line in text.split("\n"))


def _require_pyplot():
    plt = _pyplot()
    if plt is None:
        raise ImportError("figures need matplotlib: pip install 'bagcert[plots]'")
    return plt


def _save(fig, path: Path, plt, dpi: int = 110) -> None:
    """Save ``fig`` atomically under a unique temporary name in the same folder (two runs saving the same
    figure name never share a temporary file), then rename it to ``path``."""
    from .checkpoint import _umask_mode

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600: give the figure the permissions of the other files
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


#: Bar colours of :func:`accuracy_figure`: clean, certified, then one per attack in this order.
_BAR_COLOURS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


def accuracy_series(s: dict) -> list:
    """The bars of ``certified_accuracy.png`` for a report summary ``s``: a list of ``(label, {size key:
    (fraction, ci95 or None)}, outside)``, first clean (whole set), then certified (whole set), then, when
    attacks ran, the empirical robust accuracy of each attack that ran (on the attacked images, only the sizes
    attacked). ``outside`` is True for an attack whose patches did not all fit in the certified size (e.g.
    ImageNet-Patch): its bars are not bounded below by the certified ones."""
    keys = list(s["certified_accuracy"])
    cis = s.get("certified_accuracy_ci95") or {}
    out = [("clean", {k: (s["clean_accuracy"], s.get("clean_accuracy_ci95")) for k in keys}, False),
           ("certified", {k: (s["certified_accuracy"][k], cis.get(k)) for k in keys}, False)]
    e = s.get("empirical") or {}
    per = e.get("per_size") or {}
    for a in e.get("attacks", []):
        if a in (e.get("skipped") or {}):
            continue
        vals = {k: (per[k]["robust_accuracy"][a], (per[k].get("robust_accuracy_ci95") or {}).get(a))
                for k in keys if k in per and a in per[k]["robust_accuracy"]}
        if vals:
            outside = any(per[k].get("in_threat_model", {}).get(a) is False for k in vals)
            out.append((a, vals, outside))
    return out


def accuracy_figure(s: dict):
    """The grouped bar chart of ``certified_accuracy.png`` (a matplotlib Figure) for a report summary ``s``.

    Per patch size one group of bars (:func:`accuracy_series`): clean and certified accuracy on all images
    and, when attacks ran, the empirical robust accuracy of each attack on the attacked images (hatched and
    marked "outside threat model" when its patches do not fit in the certified size). Every bar carries its
    value in percent; error bars are the 95 % Clopper-Pearson intervals when ``s`` holds them (``*_ci95``).
    Bars are ``ax.containers`` labelled with the series' legend text. The title names the method (certifier,
    aggregation, model), the data set and the image counts."""
    plt = _require_pyplot()
    keys = list(s["certified_accuracy"])
    series = accuracy_series(s)
    m = len(series)
    crowded = m * len(keys) > 10
    width = 0.84 / m
    fig, ax = plt.subplots(figsize=(max(5.0, 0.95 + 0.32 * m * len(keys)), 3.9), layout="constrained")
    e = s.get("empirical") or {}
    attacked = e.get("num_images_attacked")
    for j, (name, vals, outside) in enumerate(series):
        idx = [i for i, k in enumerate(keys) if k in vals]
        xs = [i + (j - (m - 1) / 2) * width for i in idx]
        heights = [100 * vals[keys[i]][0] for i in idx]
        cis = [vals[keys[i]][1] for i in idx]
        yerr = None
        if all(c is not None for c in cis) and cis:
            yerr = [[h - 100 * c[0] for h, c in zip(heights, cis)], [100 * c[1] - h for h, c in zip(heights, cis)]]
        label = name if j < 2 else f"{name} (robust{', outside threat model' if outside else ''})"
        ax.bar(xs, heights, width, color=_BAR_COLOURS[j % len(_BAR_COLOURS)], label=label, yerr=yerr,
               hatch="//" if outside else None, edgecolor="white" if outside else None,
               error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": "black"})
        for x, h, c in zip(xs, heights, cis):
            top = 100 * c[1] if c is not None else h
            ax.text(x, top + 1.0, f"{h:.1f}", ha="center", va="bottom", fontsize=6, rotation=90 if crowded else 0)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k if "x" in k else f"{k}x{k}" for k in keys])
    ax.set_xlabel("patch size (pixels)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 118 if crowded else 112)
    ax.set_yticks(range(0, 101, 20))
    fig.legend(loc="outside lower center", fontsize=7, ncols=min(m, 3), frameon=False)
    ckpt = s.get("checkpoint") or {}
    model = model_label(ckpt.get("model"), ckpt.get("model_kwargs"))
    what = f"certified accuracy on {s['dataset'].get('name')}, n={s['num_images']}"
    if m > 2:
        what = (f"clean, certified (n={s['num_images']}) and empirical robust accuracy (n={attacked} attacked) on "
                f"{s['dataset'].get('name')}")
    if s.get("clean_accuracy_ci95") is not None:
        what += "; error bars: 95 % CI"
    ax.set_title(_wrap_title(f"{certificate_method(s.get('aggregation'), model, s.get('method'))}\n{what}",
                             fig.get_figwidth(), 8), fontsize=8)
    return fig


def select_example_rows(correct, attacked_pred, labels, certified, k: int) -> torch.Tensor:
    """The images an attack example figure shows, best first.

    Args:
        correct: bool [N], the clean prediction is the label.
        attacked_pred: long [N] or [A, N], the prediction on the attacked image (one row per attack).
        labels: long [N].
        certified: bool [N], the certificate's flag (shown, not used to choose).
        k: the most rows wanted, >= 0.

    Returns:
        long [min(k, number correct)]: indices of images classified correctly on clean input only (an image
        that is wrong already shows nothing about the attack), first those some attack broke (an attacked
        prediction differs from the label), then those every attack left correct; each group in index order.

    Raises:
        ValueError: shapes that do not match, or a negative ``k``.
    """
    correct = torch.as_tensor(correct).bool().cpu().flatten()
    labels = torch.as_tensor(labels).long().cpu().flatten()
    certified = torch.as_tensor(certified).bool().cpu().flatten()
    pred = torch.as_tensor(attacked_pred).long().cpu()
    if pred.dim() == 1:
        pred = pred.unsqueeze(0)
    n = correct.numel()
    if pred.dim() != 2 or pred.shape[1] != n or labels.numel() != n or certified.numel() != n:
        raise ValueError(f"select_example_rows: expected correct, labels, certified [N] and attacked_pred [N] or [A, N]; got "
                         f"{n}, {labels.numel()}, {certified.numel()} and {tuple(pred.shape)}")
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"select_example_rows: k must be an integer >= 0, got {k!r}")
    broken = (pred != labels.unsqueeze(0)).any(dim=0)
    order = torch.cat([(correct & broken).nonzero().flatten(), (correct & ~broken).nonzero().flatten()])
    return order[: int(k)]


def _image(t) -> "object":
    return t.detach().cpu().float().permute(1, 2, 0).clamp(0, 1).numpy()


def _mask_box(mask):
    """(top, left, bottom, right) of the nonzero pixels of ``mask`` [1, H, W] or [H, W], None when empty."""
    m = torch.as_tensor(mask).detach().cpu()
    m = m.reshape(m.shape[-2:]) != 0
    if not bool(m.any()):
        return None
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def _box_sizes(masks) -> torch.Tensor:
    """long [N, 2]: (height, width) in pixels of the bounding box of the nonzero pixels of each mask [N, 1, H, W]
    (0, 0 for an empty mask)."""
    m = torch.as_tensor(masks).detach().cpu()
    m = m.reshape(m.shape[0], *m.shape[-2:]) != 0
    out = torch.zeros(m.shape[0], 2, dtype=torch.long)
    for dim, axis in ((0, 2), (1, 1)):  # rows: any over columns; columns: any over rows
        hit = m.any(dim=axis)
        idx = torch.arange(hit.shape[1]).expand_as(hit)
        first = torch.where(hit, idx, hit.shape[1]).min(dim=1).values
        last = torch.where(hit, idx, -1).max(dim=1).values
        out[:, dim] = (last - first + 1).clamp(min=0)
    return out


def threat_model_note(attack: str, masks, patch_size) -> str | None:
    """The note an attack figure carries when the attack's patches lie outside the certified threat model, e.g.
    ``"imagenet-patch: outside the certified threat model (patch 50x50 px > certified 5x5)"``; None when every
    patch fits.

    Args:
        attack: the attack's name.
        masks: [N, 1, H, W] (or [N, H, W]): the pixels each applied patch covers (nonzero).
        patch_size: (ph, pw): the certified patch size in pixels.

    A patch fits when the bounding box of its pixels is at most ``ph`` x ``pw`` (the rule of
    :class:`~bagcert.attacks.base.PatchAttack`'s ``in_threat_model``): such a patch lies inside some certified
    rectangle. The note gives the applied boxes' size (a range when they differ, e.g. the rotated and scaled
    ImageNet-Patch patches) and, when only some images' patches do not fit, how many.
    """
    ph, pw = (int(v) for v in patch_size)
    sizes = _box_sizes(masks)
    outside = (sizes[:, 0] > ph) | (sizes[:, 1] > pw)
    if not bool(outside.any()):
        return None
    hs, ws = sizes[outside, 0], sizes[outside, 1]
    span = lambda v: f"{int(v.min())}" if int(v.min()) == int(v.max()) else f"{int(v.min())}-{int(v.max())}"  # noqa: E731
    count = "" if bool(outside.all()) else f" for {int(outside.sum())} of {outside.numel()} images"
    shape = f"{span(hs)}x{span(ws)}" if "-" not in span(hs) + span(ws) else f"{span(hs)} x {span(ws)}"
    return f"{attack}: outside the certified threat model{count} (patch {shape} px > certified {ph}x{pw})"


def attack_examples_figure(images, labels, clean_pred, adversarial: dict, classes=None, title: str = "", certified=None,
                           patch_size=None):
    """The attack example figure (a matplotlib Figure): one row per image, the clean image with the clean
    prediction, then each attack's patched image with the prediction on it (red and "(wrong)" when it is not
    the label; the patch's bounding box outlined in yellow when masks are given); the row is labelled with the
    true class and, with ``certified``, whether the certificate holds.

    Args:
        images: float [k, 3, H, W] in [0, 1]; labels, clean_pred: long [k].
        adversarial: ``{attack name: (adv_images [k, 3, H, W], predictions [k])}`` or
            ``(adv_images, predictions, masks [k, 1, H, W])``.
        classes: class names (wnids are shown by name, see :func:`class_name`); None shows indices.
        title: the method (attack, patch size, model, aggregation): the figure's title.
        certified: optional bool [k].
        patch_size: optional (ph, pw), the certified patch size: with masks, a panel whose patch does not fit
            in it says "outside threat model (HxW px)" and the title gets :func:`threat_model_note` per attack.
    """
    plt = _require_pyplot()
    k = images.shape[0]
    if k < 1:
        raise ValueError("attack_examples_figure: no images to show")
    names = list(adversarial)
    has_mask = lambda n: len(adversarial[n]) > 2 and adversarial[n][2] is not None  # noqa: E731
    sizes, notes = {}, []
    if patch_size is not None:
        ph, pw = (int(v) for v in patch_size)
        for n in names:
            if has_mask(n):
                sizes[n] = _box_sizes(adversarial[n][2])
                note = threat_model_note(n, adversarial[n][2], (ph, pw))
                if note:
                    notes.append(note)
    cols = 1 + len(names)
    width = max(2.3 * cols, 5.0)
    fig, axes = plt.subplots(k, cols, figsize=(width, 2.05 * k + 1.1), squeeze=False, layout="constrained")
    for i in range(k):
        panels = [("clean", images[i], clean_pred[i], None)]
        for n in names:
            entry = adversarial[n]
            panels.append((n, entry[0][i], entry[1][i], entry[2][i] if len(entry) > 2 and entry[2] is not None else None))
        for j, (name, img, pred, mask) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(_image(img), interpolation="nearest")
            ok = int(pred) == int(labels[i])
            head = name
            if name in sizes and j > 0:
                h, w = (int(v) for v in sizes[name][i])
                if h > ph or w > pw:
                    head = f"{name}\noutside threat model ({h}x{w} px)"
            ax.set_title(f"{head}\npred: {class_name(classes, pred)}{'' if ok else ' (wrong)'}", fontsize=8,
                         color="black" if ok else "tab:red")
            box = _mask_box(mask) if mask is not None else None
            if box is not None:
                t, l, b, r = box
                ax.add_patch(plt.Rectangle((l - 0.5, t - 0.5), r - l + 1, b - t + 1, fill=False, edgecolor="yellow", lw=1.0))
            ax.set_xticks([])
            ax.set_yticks([])
        state = "" if certified is None else ("\ncertified" if bool(certified[i]) else "\nnot certified")
        axes[i][0].set_ylabel(f"true: {class_name(classes, labels[i])}{state}", fontsize=8)
    extra = "".join(f"\n{n}" for n in notes)
    fig.suptitle(_wrap_title(f"{title}{extra}\nred: the prediction is not the true class; yellow box: the patch", width),
                 fontsize=9)
    return fig


def plot_attack_examples(path, images, labels, clean_pred, adversarial: dict, classes=None, title: str = "", certified=None,
                         patch_size=None) -> bool:
    """Write :func:`attack_examples_figure` to ``path`` (PNG). Returns False when matplotlib is not installed
    (nothing written)."""
    plt = _pyplot()
    if plt is None:
        return False
    _save(attack_examples_figure(images, labels, clean_pred, adversarial, classes, title, certified, patch_size), Path(path), plt)
    return True


def uncertified_positions_figure(images, position_margins, labels, predictions, certified, patch_size, classes=None,
                                 aggregation: str = "votes", method: str = ""):
    """The certificate-margin figure (a matplotlib Figure): per image (columns) the image and the margin of
    every patch position (top-left pixel) as a heatmap with one shared colour bar in ``margin_unit``:
    red where the margin is <= 0 (a patch there may change the prediction), blue where it is > 0.

    Args:
        images: float [k, 3, H, W]; position_margins: [k, H - ph + 1, W - pw + 1] (``return_position_margins``);
        labels, predictions: long [k]; certified: bool [k] (the certificate's flag, right class or wrong);
        patch_size: (ph, pw) pixels; classes: class names or None; aggregation: the certified aggregation
        (decides the unit); method: the method's name for the title (default from ``aggregation``).
    """
    plt = _require_pyplot()
    from matplotlib.colors import TwoSlopeNorm

    k = images.shape[0]
    if k < 1:
        raise ValueError("uncertified_positions_figure: no images to show")
    ph, pw = patch_size
    maps = torch.as_tensor(position_margins).detach().cpu().double()
    integer = bool(torch.equal(maps, maps.round()))
    center = 0.5 if integer else 0.0  # integer margins: 0 (not certified) is red, 1 blue
    lo, hi = float(maps.min()), float(maps.max())
    norm = TwoSlopeNorm(vcenter=center, vmin=min(lo, center - 1), vmax=max(hi, center + 1))
    width = max(2.1 * k + 1.2, 5.0)
    fig, axes = plt.subplots(2, k, figsize=(width, 5.4), squeeze=False, layout="constrained")
    im = None
    for i in range(k):
        axes[0][i].imshow(_image(images[i]), interpolation="nearest")
        axes[0][i].set_title(f"true: {class_name(classes, labels[i])}\npred: {class_name(classes, predictions[i])}", fontsize=8)
        axes[0][i].set_xticks([])
        axes[0][i].set_yticks([])
        m = maps[i].numpy()
        im = axes[1][i].imshow(m, cmap="RdBu", norm=norm, interpolation="nearest")
        open_ = int((maps[i] <= 0).sum())
        state = "not certified" if not bool(certified[i]) else ("certified" if int(predictions[i]) == int(labels[i]) else "certified, wrong class")
        axes[1][i].set_title(f"{state}\n{open_} of {m.size} positions <= 0", fontsize=8)
        axes[1][i].tick_params(labelsize=6)
    axes[1][0].set_xlabel("patch left column (px)", fontsize=7)
    axes[1][0].set_ylabel("patch top row (px)", fontsize=7)
    cb = fig.colorbar(im, ax=list(axes[1]), shrink=0.9)
    cb.set_label(f"certificate margin ({margin_unit(aggregation)})", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    name = method or certificate_method(aggregation)
    fig.suptitle(_wrap_title(f"{name}: margin of every {ph}x{pw} patch position (top-left pixel)\n"
                             "red (<= 0): a patch there may change the prediction", width), fontsize=9)
    return fig


def plot_uncertified_positions(path, images, position_margins, labels, predictions, certified, patch_size, classes=None,
                               aggregation: str = "votes", method: str = "") -> bool:
    """Write :func:`uncertified_positions_figure` to ``path`` (PNG). Returns False when matplotlib is not
    installed (nothing written)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig = uncertified_positions_figure(images, position_margins, labels, predictions, certified, patch_size, classes,
                                       aggregation, method)
    _save(fig, Path(path), plt)
    return True
