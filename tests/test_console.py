"""The ``bagcert`` console command (setup.cfg entry point, ``python -m bagcert``): subcommands, help, errors."""

import json
import subprocess
import sys

import pytest

from bagcert.cli.main import COMMANDS, main
from conftest import ROOT

SCRIPT = ROOT / ".venv" / "bin" / "bagcert"


@pytest.mark.skipif(not SCRIPT.is_file(), reason="the bagcert script is installed by pip install -e .")
def test_installed_bagcert_help_lists_every_subcommand_with_one_line():
    r = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in ("certify", "train", "imagenet-a", "defensive-patch", "roi"):
        described = [l for l in lines if l.split()[:1] == [name]]
        assert len(described) == 1 and len(described[0].split()) > 2, (name, r.stdout)


def test_python_m_bagcert_runs_the_same_command():
    r = subprocess.run([sys.executable, "-m", "bagcert", "certify", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: bagcert certify") and "--data-path" in r.stdout


def test_certify_help_is_certifys_help_with_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["certify", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: bagcert certify" in out and "bagcert-cifar10-r5-dm" in out
    options = out.split("\noptions:", 1)[1]
    for flag, default in (("--batch-size", "250"), ("--data-path", "auto"), ("--workers", "0"), ("--split", "test"),
                          ("--attack-steps", "150"), ("--output", "outputs/certify")):
        block = options.split(f"\n  {flag}", 1)[1].split("\n  -", 1)[0]
        assert f"(default: {default})" in " ".join(block.split()), (flag, block)


@pytest.mark.parametrize("command", ["imagenet-a", "defensive-patch", "roi"])
def test_every_report_command_help_shows_its_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: bagcert {command}")
    assert "--dataset" in out and "(default: 0)" in out  # --seed
    assert "r9s2" not in out  # the examples use the shipped models


def test_unknown_subcommand_is_one_line_and_exit_2(capsys):
    assert main(["certfy"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown command 'certfy'" in err and "did you mean certify" in err
    assert main([]) == 2  # no command: the help, on stderr


def test_bagcert_certify_on_synthetic_data_writes_a_report(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["certify", "--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--patch-sizes", "2,5",
               "--threads", "1", "--no-progress", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", "per_sample.csv", "summary.md", "certified_accuracy.png"])
    assert f"report written to {out}/ (certified_accuracy.png, per_sample.csv, results.json, summary.md)" in printed
    assert json.loads(printed.strip().splitlines()[-1])["num_images"] == 8


def test_train_dispatches_to_bagcert_cli_train(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0 and "usage: bagcert train" in capsys.readouterr().out
