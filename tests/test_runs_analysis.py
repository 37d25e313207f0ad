"""bagcert.runs: the defensive-patch, ImageNet-A and RoI runs as typed configs + one function.

Each run function gives the report the command line gives with the same options (the CLI only maps argv to the
config); a bad config value is a one-line ValueError naming the field, and the library never exits.
"""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bagcert
from bagcert.cli import defensive_patch as cli_defpatch
from bagcert.cli import imagenet_a as cli_ina
from bagcert.cli import roi as cli_roi
from bagcert.runs import (AnalysisReport, DefensivePatchConfig, FieldError, ImageNetAConfig, RoiConfig, RunInputError,
                          defensive_patch_run, imagenet_a_run, roi_run)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "cifar10"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: what differs between two runs of the same config: the run id and the clock
VOLATILE = ("run_id", "created", "timing_s", "seconds")


def _checkpoint(path, classes, **meta):
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=len(classes), width=8).eval()
    bagcert.save_checkpoint(path, model, input_size=32, classes=list(classes), **meta)
    return path


def _comparable(doc):
    """A results.json document without what two runs of the same config cannot share: the run id, the clock
    (``created``, every ``timing_s`` / ``seconds``) and the report folder."""
    if isinstance(doc, list):
        return [_comparable(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {k: _comparable(v) for k, v in doc.items() if k not in VOLATILE}
    if out.get("tool", "").startswith("bagcert"):  # the document itself, not one of its parts
        out["config"].pop("output")
        if isinstance(out.get("patch"), dict):
            out["patch"].pop("file")
    return out


@pytest.fixture
def no_figures(monkeypatch):
    """The figures are the CLI tests' business (tests/test_cli_extra.py); here they only cost time."""
    for module in ("roi", "defensive_patch", "imagenet_a"):
        monkeypatch.setattr(f"bagcert.runs.{module}.plt_or_none", lambda: None)


def _cli_and_library(cli_main, argv, run, config, tmp_path, capsys):
    """Run the CLI with ``argv`` into tmp/cli and ``run(config)`` into tmp/lib; both reports and summaries."""
    assert cli_main(argv + ["--output", str(tmp_path / "cli"), "--quiet"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = run(dataclasses.replace(config, output=str(tmp_path / "lib"), quiet=True))
    assert isinstance(report, AnalysisReport) and report.output == tmp_path / "lib"
    assert capsys.readouterr().out == ""  # the library prints nothing on stdout
    cli_doc = json.loads((tmp_path / "cli" / "results.json").read_text())
    lib_doc = json.loads((tmp_path / "lib" / "results.json").read_text())
    assert lib_doc == json.loads(json.dumps(report.results, default=str))
    assert (tmp_path / "lib" / "summary.md").read_text() == report.markdown
    line.pop("output"), report.summary.pop("output")
    return cli_doc, lib_doc, line, report


def test_roi_run_gives_the_cli_report(tmp_path, capsys, one_thread, no_figures):
    ckpt = _checkpoint(tmp_path / "m.pt", CIFAR10)
    argv = ["--checkpoint", str(ckpt), "--dataset", str(SAMPLES), "--num-images", "2", "--steps", "1", "--qs", "5,20",
            "--num-figures", "1", "--q-roi", "30"]
    config = RoiConfig(checkpoint=str(ckpt), dataset=str(SAMPLES), num_images=2, steps=1, qs="5,20", num_figures=1, q_roi=30)
    assert config.qs == (5.0, 20.0)  # text normalised to the typed tuple
    cli_doc, lib_doc, line, report = _cli_and_library(cli_roi.main, argv, roi_run, config, tmp_path, capsys)
    assert _comparable(lib_doc) == _comparable(cli_doc)
    assert lib_doc["n"] == 2 and lib_doc["config"]["qs"] == [5.0, 20.0] and lib_doc["config"]["q_roi"] == 30.0
    assert report.summary == line and report.markdown == (tmp_path / "cli" / "summary.md").read_text()


def test_defensive_patch_run_gives_the_cli_report(tmp_path, capsys, one_thread, no_figures):
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b", "c"])
    argv = ["--checkpoint", str(ckpt), "--dataset", "synthetic:12", "--num-train", "6", "--num-eval", "4",
            "--stage1-epochs", "1", "--stage2-epochs", "1", "--milestones", "1", "--batch-size", "6", "--corruptions", "jpeg",
            "--severities", "2", "--pgd-steps", "1", "--attack-steps", "1", "--eval-batch-size", "4"]
    config = DefensivePatchConfig(checkpoint=str(ckpt), dataset="synthetic:12", num_train=6, num_eval=4, stage1_epochs=1,
                                  stage2_epochs=1, milestones=[1], batch_size=6, corruptions="jpeg", severities=(2,),
                                  pgd_steps=1, attack_steps=1, eval_batch_size=4)
    cli_doc, lib_doc, line, report = _cli_and_library(cli_defpatch.main, argv, defensive_patch_run, config, tmp_path, capsys)
    assert _comparable(lib_doc) == _comparable(cli_doc)  # same patch (seeded), same evaluations
    assert report.summary == line and set(lib_doc["evaluations"]["source"]["corruptions"]) == {"jpeg"}
    cli_patch = bagcert.defense.DefensivePatch.load(tmp_path / "cli" / "defensive_patch.pt")
    lib_patch = bagcert.defense.DefensivePatch.load(tmp_path / "lib" / "defensive_patch.pt")
    assert torch.equal(cli_patch.values, lib_patch.values)


def test_imagenet_a_run_gives_the_cli_report(tmp_path, capsys, one_thread, no_figures):
    wnids = ["n01440764", "n02102040"]
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for w in wnids:
        (root / w).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / w / f"{k}.png")
    ckpt = _checkpoint(tmp_path / "s.pt", wnids)
    argv = ["--checkpoint", str(ckpt), "--dataset", str(root), "--resize", "32", "--num-images", "4", "--bin-size", "2"]
    config = ImageNetAConfig(checkpoint=ckpt, dataset=root, resize=32, num_images=4, bin_size=2)
    assert config.checkpoint == str(ckpt) and config.dataset == str(root)  # paths normalised to text
    cli_doc, lib_doc, line, report = _cli_and_library(cli_ina.main, argv, imagenet_a_run, config, tmp_path, capsys)
    assert _comparable(lib_doc) == _comparable(cli_doc)
    assert lib_doc["mode"] == "subset" and lib_doc["n"] == 4 and lib_doc["config"]["size"] == 32  # resolved defaults recorded
    assert report.summary == line


@pytest.mark.parametrize("cls,field,value,message", [
    (RoiConfig, "roa_box", 2, "roa_box must be an odd integer >= 1, got 2"),
    (RoiConfig, "num_images", 0, "num_images must be a positive integer, got 0"),
    (RoiConfig, "eps", 2.0, "eps must be a number in [0, 1] (pixel units), got 2"),
    (RoiConfig, "qs", "5,x", "qs: cannot read '5,x' as a comma-separated list of float values"),
    (RoiConfig, "q_roa", 150, "q_roa values are percentages in [0, 100], got 150.0"),
    (RoiConfig, "fill", "grey", "fill must be zero, mean, blur or a number in [0, 1], got 'grey'"),
    (RoiConfig, "attack", "fgsm", "attack must be one of patch, pgd, got 'fgsm'"),
    (RoiConfig, "threads", 0, "threads must be a positive integer, got 0"),
    (DefensivePatchConfig, "severities", "1,7", "severities must lie in 1..5, got [1, 7]"),
    (DefensivePatchConfig, "corruptions", "fog", "corruptions: unknown ['fog']; choose from"),
    (DefensivePatchConfig, "gamma", 0, "gamma must be a decay factor in (0, 1], got 0"),
    (DefensivePatchConfig, "stage1_lr", -1, "stage1_lr must be a number > 0, got -1"),
    (DefensivePatchConfig, "stage1_epochs", 2.5, "stage1_epochs must be an integer >= 0, got 2.5"),
    (DefensivePatchConfig, "eot", "yes", "eot must be True or False, got 'yes'"),
    (ImageNetAConfig, "bin_size", 0, "bin_size must be a positive integer, got 0"),
    (ImageNetAConfig, "device", "tpu", "device: not a torch device: 'tpu'"),
    (ImageNetAConfig, "split", "val", "split must be one of auto, test, train, all, got 'val'"),
])
def test_a_bad_config_value_is_one_line_naming_the_field(cls, field, value, message):
    with pytest.raises(ValueError) as exc:
        cls(checkpoint="m.pt", dataset="synthetic:8", **{field: value})
    text = str(exc.value)
    assert isinstance(exc.value, FieldError) and isinstance(exc.value, RunInputError) and exc.value.field == field
    assert text.startswith(message) and "\n" not in text


def test_the_cli_spells_a_config_refusal_with_its_option(tmp_path, capsys):
    """A FieldError reaches the command line as the same line with the option's spelling, exit status 1."""
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    with pytest.raises(SystemExit) as exc:
        cli_roi.main(["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--roa-box", "4", "--output", str(tmp_path / "o")])
    assert exc.value.code == "--roa-box must be an odd integer >= 1, got 4"
    with pytest.raises(SystemExit) as exc:
        cli_defpatch.main(["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--milestones", "1,x", "--output", str(tmp_path / "o")])
    assert exc.value.code == "--milestones: cannot read '1,x' as a comma-separated list of int values"
    assert not (tmp_path / "o").exists()


def test_the_runs_refuse_input_mistakes_with_value_errors_not_exits(tmp_path):
    """What needs the data (more images than the split has, an attack patch larger than the images, overlapping
    train / evaluation images, a folder holding a report) is a ValueError from the library, before any work."""
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    common = dict(checkpoint=str(ckpt), dataset="synthetic:8", quiet=True)
    with pytest.raises(RunInputError, match=r"^--num-images 9 is larger than the data set \(8 images\)"):
        roi_run(RoiConfig(**common, num_images=9, output=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="--attack-patch-size 40 is larger than the 32x32 images"):
        roi_run(RoiConfig(**common, attack_patch_size=40, output=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="--width applies to --shape frame only"):
        defensive_patch_run(DefensivePatchConfig(**common, shape="square", width=3, output=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="--train-split and --eval-split are both 'test'"):
        defensive_patch_run(DefensivePatchConfig(**common, train_split="test", num_train=4, num_eval=4, output=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="--checkpoint .*nowhere.pt"):
        imagenet_a_run(ImageNetAConfig(checkpoint=str(tmp_path / "nowhere.pt"), dataset=str(tmp_path / "nodata"), output=str(tmp_path / "e")))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "results.json").write_text(json.dumps({"tool": "bagcert.cli.roi"}))
    with pytest.raises(bagcert.report.ReportFolderError, match="already holds a report"):
        roi_run(RoiConfig(**common, num_images=2, output=str(tmp_path / "f")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "m.pt"]  # nothing written by the refused runs
    with pytest.raises(TypeError, match="roi_run needs a RoiConfig"):
        roi_run(dict(common))


def test_configs_are_frozen_typed_and_match_the_cli_options():
    """One field per CLI option, same names as the argument dests and the same defaults (the output folder
    aside: None stands for the tool's default folder)."""
    for cls, module in ((RoiConfig, cli_roi), (DefensivePatchConfig, cli_defpatch), (ImageNetAConfig, cli_ina)):
        args = vars(module.build_parser().parse_args(["--checkpoint", "m.pt", "--dataset", "synthetic:8"]))
        args.pop("output_given")
        names = [f.name for f in dataclasses.fields(cls)]
        assert sorted(names) == sorted(args), cls
        config = cls(checkpoint="m.pt", dataset="synthetic:8")
        via_cli = cli_roi.config_from_args(cls, module.build_parser().parse_args(["--checkpoint", "m.pt", "--dataset", "synthetic:8"]))
        assert via_cli == config and config.output is None
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.seed = 1


def test_no_argparse_in_the_library():
    pattern = re.compile(r"^\s*(import argparse|from argparse import)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "bagcert").rglob("*.py")
                 if "cli" not in p.relative_to(ROOT / "bagcert").parts and pattern.search(p.read_text())]
    assert offenders == []


def test_imagenet_a_run_names_an_unreadable_wnids_or_indices_file(tmp_path):
    """A missing --wnids-file or an --indices-json that is not JSON was a traceback; now one line naming it."""
    ckpt = tmp_path / "in1k.pt"
    torch.manual_seed(0)
    bagcert.save_checkpoint(ckpt, bagcert.create_model("cifar_bagnet5_s2", num_classes=1000, width=8).eval(), input_size=32)
    (tmp_path / "data").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    common = dict(checkpoint=str(ckpt), dataset=str(tmp_path / "data"), quiet=True)
    with pytest.raises(ValueError, match=r"^--wnids-file .*missing.txt: \[Errno 2\] No such file"):
        imagenet_a_run(ImageNetAConfig(**common, wnids_file=str(tmp_path / "missing.txt"), output=str(tmp_path / "o1")))
    with pytest.raises(ValueError, match=r"^--indices-json .*bad.json: Expecting property name"):
        imagenet_a_run(ImageNetAConfig(**common, indices_json=str(tmp_path / "bad.json"), output=str(tmp_path / "o2")))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_failure_inside_the_computation_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the runs' refusals of their input become one line on the command line: a ValueError raised by the
    computation is a bug and reaches the caller as itself (docs/guarantees.md, command-line tools)."""
    import bagcert.analysis.roi as roi_lib

    def broken(*a, **k):
        raise ValueError("a bug inside the computation")

    monkeypatch.setattr(roi_lib, "evaluate_neutralization", broken)
    ckpt = _checkpoint(tmp_path / "m.pt", ["a", "b"])
    with pytest.raises(ValueError, match="a bug inside the computation") as exc:
        cli_roi.main(["--checkpoint", str(ckpt), "--dataset", "synthetic:8", "--num-images", "2", "--output", str(tmp_path / "o"),
                      "--quiet"])
    assert not isinstance(exc.value, bagcert.runs.RunInputError) and not (tmp_path / "o").exists()
