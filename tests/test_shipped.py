"""Shipped models and samples by name (bagcert.shipped), ``bagcert models``, and what an installed package carries."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import bagcert
from bagcert import shipped
from bagcert.cli import certify, models as models_cli
from bagcert.cli import train as train_cli
from bagcert.cli.main import main
from bagcert.report import _plot, code_version_text, git_sha
from conftest import ROOT

MANIFEST = json.loads((ROOT / "bagcert" / "shipped.json").read_text())
NAMES = [m["name"] for m in MANIFEST["models"]]


def test_each_name_resolves_to_its_file_in_the_checkout():
    assert len(NAMES) == len(set(NAMES)) == 6 and shipped.DEFAULT_MODEL == NAMES[0] == "bagcert-cifar10-r5-dm"
    assert shipped.data_location() == "source tree"
    for m in MANIFEST["models"]:
        path = shipped.resolve_checkpoint(m["name"])
        assert path.resolve() == (ROOT / m["file"]).resolve() and path.is_file()
        assert shipped.shipped_name(ROOT / m["file"]) == m["name"]
    # every top-level checkpoint is shipped (the folders beside them hold reports and logs, not models)
    assert sorted(p.name for p in (ROOT / "checkpoints").glob("*.pt")) == sorted(Path(m["file"]).name for m in MANIFEST["models"])


def test_load_checkpoint_by_name_is_the_file():
    torch.set_num_threads(1)
    by_name, meta_name = bagcert.load_checkpoint("bagcert-cifar10-r5-v1")
    by_path, meta_path = bagcert.load_checkpoint(ROOT / "checkpoints" / "bagcert_cifar10_r5s2.pt")
    assert meta_name == meta_path
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_path.state_dict().items()):
        assert torch.equal(a, b), k


def test_paths_pass_through_unchanged(tmp_path):
    assert shipped.resolve_checkpoint(str(tmp_path / "mine.pt")) == tmp_path / "mine.pt"  # missing: the loader says so
    existing = tmp_path / "bagcert-cifar10-r9x"
    existing.write_bytes(b"")
    assert shipped.resolve_checkpoint(existing) == existing
    with pytest.raises(bagcert.CheckpointError, match="checkpoint file not found"):
        bagcert.load_checkpoint(tmp_path / "mine.pt")


def test_unknown_name_is_one_line_listing_the_shipped_names(tmp_path):
    with pytest.raises(bagcert.CheckpointError) as exc:
        shipped.resolve_checkpoint("bagcert-cifar10-r7")
    message = str(exc.value)
    assert "\n" not in message and "'bagcert-cifar10-r7' is neither a checkpoint file nor a shipped model name" in message
    assert all(name in message for name in NAMES)
    with pytest.raises(SystemExit) as exc:  # the CLI: one line, before any work, nothing written
        certify.main(["--checkpoint", "bagcert-cifar10-r7", "--output", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    assert str(exc.value.code).startswith("--checkpoint bagcert-cifar10-r7: ") and "\n" not in str(exc.value.code)
    assert all(name in str(exc.value.code) for name in NAMES)


def test_certify_by_name_records_the_name_and_the_file(tmp_path, capsys):
    out = tmp_path / "r"
    assert certify.main(["--checkpoint", "bagcert-cifar10-r9", "--dataset", "synthetic:4", "--patch-sizes", "5",
                         "--output", str(out), "--no-progress", "--quiet", "--threads", "1"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["checkpoint"]["name"] == "bagcert-cifar10-r9" and doc["config"]["checkpoint_name"] == "bagcert-cifar10-r9"
    assert Path(doc["checkpoint"]["path"]).resolve() == (ROOT / "checkpoints" / "bagcert_cifar10_r9s2.pt").resolve()
    assert doc["checkpoint"]["model"] == "cifar_bagnet9_s2"
    assert "- checkpoint: bagcert-cifar10-r9 (" in (out / "summary.md").read_text()


def test_a_missing_copy_of_a_shipped_file_names_the_model(tmp_path):
    with pytest.raises(bagcert.CheckpointError, match=r"addressed by name: bagcert-imagenette-r17"):
        bagcert.load_checkpoint(tmp_path / "checkpoints" / "bagcert_imagenette_r17s8.pt")


def test_card_numbers_are_the_shipped_reports_and_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "checkpoints/bagcert_" in line]
    for name, m in shipped.shipped_models().items():
        doc = json.loads((ROOT / MANIFEST["models"][NAMES.index(name)]["report"]).read_text())
        assert m.clean_accuracy == doc["clean_accuracy"] and m.certified_accuracy == doc["certified_accuracy"][m.card_patch]
        assert f"{doc['num_images']} images" in m.evaluated_on
        row = [r for r in rows if f"`{m.file}`" in r]
        assert len(row) == 1, (name, rows)
        assert f"{100 * m.clean_accuracy:.2f} %" in row[0] and f"{100 * m.certified_accuracy:.2f} %" in row[0], row[0]


def test_bagcert_models_lists_names_files_and_card_numbers(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "data", "clean", "certified", "measured", "on", "file"]
    for name, m in shipped.shipped_models().items():
        row = [line for line in lines if line.split()[:1] == [name]]
        assert len(row) == 1, name
        patch = f"{m.card_patch}x{m.card_patch}"
        assert f"{100 * m.clean_accuracy:.2f} %" in row[0] and f"{100 * m.certified_accuracy:.2f} % ({patch})" in row[0]
        assert row[0].rstrip().endswith(m.file) and (row[0].split()[1] == "*") == (name == shipped.DEFAULT_MODEL)
    assert models_cli.main(["--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == NAMES and listed[3]["card_patch"] == "18"
    assert listed[0]["clean_accuracy"] == shipped.shipped_models()[NAMES[0]].clean_accuracy


def test_samples_by_name():
    folder = shipped.samples_path("cifar10")
    assert folder.resolve() == (ROOT / "samples" / "cifar10").resolve()
    assert len(list(folder.glob("test/*/*.jpg"))) == 200 and certify.DEFAULT_DATASET == folder
    with pytest.raises(ValueError, match="bundles cifar10"):
        shipped.samples_path("imagenette")


def test_help_names_the_default_model_not_a_path(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse would break the name at a hyphen
    with pytest.raises(SystemExit):
        certify.main(["--help"])
    text = " ".join(capsys.readouterr().out.split("\noptions:", 1)[1].split())
    ckpt = text.split("--checkpoint CHECKPOINT", 1)[1].split(" --dataset", 1)[0]
    data = text.split("--dataset DATASET", 1)[1].split(" --split", 1)[0]
    assert "(default: bagcert-cifar10-r5-dm, the shipped default model)" in ckpt and "bagcert models" in ckpt
    assert "default: the 200 CIFAR-10 test images bundled with bagcert" in data
    assert str(ROOT) not in ckpt + data and ".pt" not in ckpt.split("(default:")[1]


def test_train_default_dataset_is_the_recipes_where_it_exists_else_the_samples(tmp_path, monkeypatch, capsys):
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    from bagcert.runs.train import resolve_dataset  # train_run reads the dataset it returns

    cfg = train_cli.resolve_config(train_cli.build_parser().parse_args([]))
    assert cfg.dataset == "../shared/data/cifar10" and capsys.readouterr().err == ""  # the recipe's, resolved by the run
    assert Path(resolve_dataset(cfg.dataset)).resolve() == (ROOT / "samples" / "cifar10" / "test").resolve()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bundled with bagcert" in err and "give --dataset" in err
    # beside ../shared/data/cifar10 (a checkout next to the shared data): the recipe's dataset, as before
    (tmp_path / "shared" / "data" / "cifar10").mkdir(parents=True)
    assert resolve_dataset(train_cli.resolve_config(train_cli.build_parser().parse_args([])).dataset) == "../shared/data/cifar10"
    given = train_cli.resolve_config(train_cli.build_parser().parse_args(["--dataset", "synthetic:8"]))
    assert resolve_dataset(given.dataset) == "synthetic:8" and capsys.readouterr().err == ""


def test_missing_matplotlib_is_one_line_on_stderr(tmp_path, monkeypatch, capsys):
    import bagcert.report as report

    monkeypatch.setattr(report, "_pyplot", lambda: None)
    _plot(tmp_path / "certified_accuracy.png", {})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "certified_accuracy.png skipped" in err and "bagcert[plots]" in err
    assert not (tmp_path / "certified_accuracy.png").exists()


def test_report_names_the_commit_or_the_installed_version():
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            assert git_sha() == head.stdout.strip()
    env = {"bagcert_version": "0.1.0", "torch_version": "2.14.1"}
    assert code_version_text(dict(env, git_sha="abc123", code_origin="git checkout")) == "bagcert 0.1.0, torch 2.14.1, git abc123"
    assert (code_version_text(dict(env, git_sha=None, code_origin="installed package"))
            == "bagcert 0.1.0 (installed package, no git checkout), torch 2.14.1")


def _build_wheel(out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
                        "-q", "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("bagcert-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_carries_the_models_reports_and_samples_and_runs_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools")
    wheel = _build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    data = {n[len("bagcert/_data/"):] for n in names if n.startswith("bagcert/_data/")}
    expected = {m["file"] for m in MANIFEST["models"]} | {m["report"] for m in MANIFEST["models"]} | {"samples/README.md"}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "samples" / "cifar10").rglob("*") if p.is_file()}
    assert data == expected and len([n for n in data if n.endswith(".jpg")]) == 200
    assert "bagcert/shipped.json" in names and not any(n.startswith(("checkpoints/", "samples/", "tests/")) for n in names)
    assert wheel.stat().st_size < 8_000_000
    target = tmp_path / "target"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                        "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = ("import json, bagcert, bagcert.shipped as s; from bagcert.report import code_origin, git_sha;"
             "m, meta = bagcert.load_checkpoint('bagcert-imagenette-r17');"
             "print(json.dumps({'file': bagcert.__file__, 'where': s.data_location(), 'samples': str(s.samples_path()),"
             "'classes': len(meta['classes']), 'origin': code_origin(), 'sha': git_sha(),"
             "'card': s.shipped_models()['bagcert-cifar10-r5-dm'].clean_accuracy}))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=work, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(target)) and got["where"] == "package" and got["samples"].startswith(str(target))
    assert got["classes"] == 10 and got["origin"] == "installed package" and got["sha"] is None
    assert got["card"] == shipped.shipped_models()["bagcert-cifar10-r5-dm"].clean_accuracy
    r = subprocess.run([sys.executable, "-m", "bagcert", "certify", "--help"], cwd=work, capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "COLUMNS": "400"})
    assert r.returncode == 0 and "site-packages" not in r.stdout and str(target) not in r.stdout
    assert re.search(r"default:\s+bagcert-cifar10-r5-dm", r.stdout)
