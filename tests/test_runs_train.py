"""bagcert.train_run: a whole training run from a TrainConfig (data loading, checks, the loop), as `bagcert train`
runs it: the same files with the same metadata, and one-line errors before anything is written."""

import json

import pytest
import torch

import bagcert
import bagcert.models as models
import bagcert.models.plugins as plugins
from bagcert import TrainConfig, train_run
from bagcert.cli import train as train_cli
from bagcert.training import TrainingError
from conftest import ROOT

SAMPLES = ROOT / "samples" / "cifar10" / "test"  # 200 images, no train split: the run makes a seeded one
# the tiniest run: a width-8 BagNet-5, two steps of 8 images, 8 held-out images; no EMA (the recipe has one: its copy
# of the model is checked by tracing when model.pt is written, 2 s)
OPTIONS = dict(dataset=str(SAMPLES), model="cifar_bagnet5_s2", model_kwargs={"width": 8}, batch_size=8, max_steps=2,
               eval_images=8, tensorboard=False, progress=False, threads=1)
ARGV = ["--dataset", str(SAMPLES), "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}', "--batch-size", "8",
        "--max-steps", "2", "--eval-images", "8", "--ema", "0", "--no-tensorboard", "--no-progress", "--threads", "1"]
QUIET = dict(log=lambda *a: None)


def _log_keys(out) -> dict:
    """{kind of train_log.jsonl record: the union of its keys}."""
    kinds = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        kind = next(k for k in ("data_path", "eval", "done", "lr", "step") if k in rec)
        kinds.setdefault(kind, set()).update(rec)
    return kinds


def test_train_run_writes_the_files_and_metadata_of_the_cli(tmp_path, one_thread, capsys):
    assert train_cli.main(ARGV + ["--output", str(tmp_path / "cli")]) == 0
    summary = train_run(TrainConfig(**OPTIONS, output=str(tmp_path / "lib")), **QUIET)
    assert summary["steps"] == 2 and summary["output"] == str(tmp_path / "lib") and summary["eval"]["n"] == 8
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == sorted(p.name for p in (tmp_path / "cli").iterdir())
    _, cli_meta = bagcert.load_checkpoint(tmp_path / "cli" / "model.pt")
    _, meta = bagcert.load_checkpoint(tmp_path / "lib" / "model.pt")
    assert set(meta) == set(cli_meta) and {"dataset", "classes", "split", "input_size", "trained_steps", "eval"} <= set(meta)
    for key in ("dataset", "classes", "split", "input_size", "trained_steps", "epochs"):
        assert meta[key] == cli_meta[key], key
    assert meta["split"]["num_images"] == 200 and meta["eval"]["n"] == 8
    assert _log_keys(tmp_path / "lib") == _log_keys(tmp_path / "cli")
    cli_config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert json.loads((tmp_path / "lib" / "config.json").read_text()).keys() == cli_config.keys()

    # the CLI's run is train_run of the config it wrote: the same config gives the same weights
    again = train_run(TrainConfig(**{**cli_config, "output": str(tmp_path / "again")}), **QUIET)
    assert again["steps"] == 2
    a = bagcert.load_checkpoint(tmp_path / "cli" / "model.pt")[0].state_dict()
    b = bagcert.load_checkpoint(tmp_path / "again" / "model.pt")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,error,match", [
    (dict(batch_size=0), ValueError, r"^batch_size must be an int >= 1, got 0$"),
    (dict(max_steps=0), ValueError, r"^max_steps must be >= 1 \(or None\), got 0: 0 steps train nothing$"),
    (dict(device="warp"), ValueError, r"^device 'warp': not a torch device"),
    (dict(model_kwargs={"width": 8, "colour": "red"}), TrainingError, r"^--model cifar_bagnet5_s2 --model-kwargs .*colour"),
    (dict(workers=1, data_path="memory"), TrainingError, r"^--workers 1 applies to the stream path only"),
    (dict(image_size=64, dataset="synthetic"), None, None),  # a valid config: the control of the parametrisation
])
def test_a_bad_config_is_one_line_before_anything_is_written(change, error, match, tmp_path, one_thread):
    cfg = TrainConfig(**{**OPTIONS, **change, "output": str(tmp_path / "run")})
    if error is None:
        assert train_run(cfg, **QUIET)["steps"] == 2
        return
    with pytest.raises(error, match=match) as e:
        train_run(cfg, **QUIET)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_an_output_folder_inside_the_dataset_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    with pytest.raises(TrainingError, match=r"^output .*run lies inside the dataset folder .*; write outside the dataset$"):
        train_run(TrainConfig(**{**OPTIONS, "dataset": str(data), "output": str(data / "run")}), **QUIET)
    assert sorted(p.name for p in data.iterdir()) == ["cat"]


def test_model_modules_are_imported_and_recorded(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # what the module registers is gone after the test
    monkeypatch.setattr(plugins, "_STATE", {"loaded": None, "error": None})
    module = tmp_path / "runs_test_models.py"
    module.write_text("import bagcert\nfrom bagcert.models import create_model\n\n\n"
                      "def tiny(num_classes=10, width=8):\n"
                      "    return create_model('cifar_bagnet5_s2', num_classes=num_classes, width=width)\n\n\n"
                      "bagcert.register_model('runs_test_tiny', tiny, 'a width-8 BagNet-5 under another name')\n")
    cfg = TrainConfig(**{**OPTIONS, "model": "runs_test_tiny", "model_kwargs": {}, "output": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"^model must be a registered model name, got 'runs_test_tiny'"):
        train_run(cfg, **QUIET)  # not imported: unknown
    assert train_run(cfg, model_modules=[module], **QUIET)["steps"] == 2  # a Path: recorded as its text
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_modules"] == [str(module)]
    assert bagcert.load_checkpoint(tmp_path / "run" / "model.pt")[1]["config"]["model"] == "runs_test_tiny"


def test_train_run_is_exported_and_the_library_has_no_argument_parser():
    assert bagcert.train_run is train_run and bagcert.TrainConfig is TrainConfig
    assert {"train_run", "TrainConfig"} <= set(bagcert.__all__)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "bagcert").rglob("*.py")
                 if "cli" not in p.relative_to(ROOT / "bagcert").parts[:1] and "argparse" in p.read_text()]
    assert offenders == []
    assert not (ROOT / "bagcert" / "training_parts.py").exists() and (ROOT / "bagcert" / "training" / "__init__.py").is_file()


@pytest.mark.parametrize("change,match", [
    (dict(flip="no"), r"^flip must be True or False, got 'no'$"),  # a truthy string: flips would stay on
    (dict(tensorboard="false"), r"^tensorboard must be True or False, got 'false'$"),
    (dict(amp=1), r"^amp must be True or False, got 1$"),  # was a TrainingFailed inside the first step
    (dict(seed="3"), r"^seed must be an int, got '3'$"),  # was a RuntimeError inside torch.manual_seed
    (dict(split_seed=None), r"^split_seed must be an int, got None$"),
    (dict(dataset=None), r"^dataset must be a path \(str or pathlib.Path\), got None$"),  # was an AttributeError
    (dict(output=5), r"^output must be a path \(str or pathlib.Path\), got 5$"),
    (dict(init_from=5), r"^init_from must be a path \(str or pathlib.Path\) or None, got 5$"),
    (dict(device=None), r"^device must be non-empty text, got None$"),  # was a TypeError in torch.device
    (dict(model_kwargs=None), r"^model_kwargs must be a dict of keyword arguments"),  # was a TypeError mid-run
    (dict(patch_sizes="15"), r"^patch_sizes must be a list of patch sizes .*, got '15'$"),  # was read as [1, 5]
    (dict(eval_patch_sizes=5), r"^eval_patch_sizes must be a list of patch sizes .*, got 5$"),
    (dict(model_modules="my_models.py"), r"^config.model_modules must be a list of .py files"),  # was read letter by letter
])
def test_a_field_of_the_wrong_type_is_one_line_naming_it(change, match, tmp_path):
    cfg = TrainConfig(**{**OPTIONS, "output": str(tmp_path / "run"), **change})
    with pytest.raises(ValueError, match=match) as e:
        train_run(cfg, **QUIET)
    assert type(e.value) is ValueError and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_paths_may_be_path_objects_and_are_recorded_as_text(tmp_path, one_thread):
    summary = train_run(TrainConfig(**{**OPTIONS, "dataset": SAMPLES, "output": tmp_path / "run", "max_steps": 1}), **QUIET)
    assert summary["steps"] == 1
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["dataset"], recorded["output"]) == (str(SAMPLES), str(tmp_path / "run"))


def test_a_config_file_of_the_wrong_type_is_one_line_naming_only_options_that_exist(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"flip": "no", "dataset": "synthetic:16"}))
    with pytest.raises(SystemExit) as e:  # flip has no command-line option: only the config file's key is named
        train_cli.main(["--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "run")])
    assert e.value.code == "flip must be True or False, got 'no' ('flip' in the config file)"
    (tmp_path / "c.json").write_text(json.dumps({"seed": "3", "dataset": "synthetic:16"}))
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--config", str(tmp_path / "c.json"), "--output", str(tmp_path / "run")])
    assert e.value.code == "seed must be an int, got '3' (--seed or 'seed' in the config file)"
    assert not (tmp_path / "run").exists()


def test_a_missing_init_from_file_is_one_line_before_anything_is_written(tmp_path):
    cfg = TrainConfig(**{**OPTIONS, "output": str(tmp_path / "run"), "init_from": str(tmp_path / "nope.pt")})
    with pytest.raises(TrainingError, match=r"^--init-from .*nope.pt: file not found; expected a bagcert model checkpoint"):
        train_run(cfg, **QUIET)
    assert not (tmp_path / "run").exists()  # config.json and train_log.jsonl were written before the file was read
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(bagcert.CheckpointError, match=r"^--init-from .*bad.pt: "):  # names the option
        train_run(TrainConfig(**{**OPTIONS, "output": str(tmp_path / "run2"), "init_from": str(tmp_path / "bad.pt")}), **QUIET)


def test_resume_and_log_are_checked(tmp_path):
    cfg = TrainConfig(**{**OPTIONS, "output": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"^resume must be True or False, got 'no'$"):  # "no" was truthy: a resume
        train_run(cfg, resume="no", **QUIET)
    with pytest.raises(ValueError, match=r"^log must be a function taking one line of text"):
        train_run(cfg, log=None)
    assert not (tmp_path / "run").exists()
