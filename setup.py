"""Build hook: a wheel (and an sdist) carries the shipped models and sample images.

The shipped models (``checkpoints/*.pt``), their reports' ``results.json`` and the bundled samples
(``samples/cifar10``) live at the top of the source tree, where the README, the docs and a checkout's
``python certify.py`` use them. ``bagcert/shipped.json`` lists them; when setuptools builds a wheel, the files
it names are copied into the package as ``bagcert/_data/<same relative path>`` (read by ``bagcert.shipped``),
and an sdist carries them at their source-tree paths. Nothing is duplicated in git. An editable install
(``pip install -e .``) reads them from the source tree and copies nothing. The rest of the configuration is in
setup.cfg.
"""

import json
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


def shipped_files(root=HERE):
    """The files named by bagcert/shipped.json, relative to ``root`` (sorted): each model's checkpoint and report
    results.json, every file under the sample folders, and the extra files. A missing one stops the build."""
    manifest = json.loads((root / "bagcert" / "shipped.json").read_text(encoding="utf-8"))
    files = [m["file"] for m in manifest["models"]] + [m["report"] for m in manifest["models"]]
    files += list(manifest.get("files", []))
    for folder in manifest["samples"].values():
        found = [p for p in sorted((root / folder).rglob("*")) if p.is_file()]
        if not found:
            raise SystemExit(f"setup.py: the sample folder {folder} named by bagcert/shipped.json is empty or missing")
        files += [p.relative_to(root).as_posix() for p in found]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"setup.py: files named by bagcert/shipped.json are missing: {', '.join(missing)}")
    return sorted(files)


class BuildPyWithShippedData(build_py):
    """build_py, then the shipped files copied to <build_lib>/bagcert/_data (replacing an earlier build's copy)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the source tree
        target = Path(self.build_lib) / "bagcert" / "_data"
        shutil.rmtree(target, ignore_errors=True)
        for rel in shipped_files():
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HERE / rel, dest)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        target = Path(self.build_lib) / "bagcert" / "_data"
        return outputs + [str(target / rel) for rel in shipped_files()]


class SdistWithShippedData(sdist):
    """sdist, plus the shipped files at their source-tree paths (so a wheel built from the sdist carries them)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        for rel in shipped_files():
            dest = Path(base_dir) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HERE / rel, dest)


setup(cmdclass={"build_py": BuildPyWithShippedData, "sdist": SdistWithShippedData})
