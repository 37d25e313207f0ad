"""bagcert.runs.certify: the certification run as a config + one function gives the report of `bagcert certify` with
the same options, refuses bad values with one line naming the field before any work, and keeps argparse and process
exits out of the library."""

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest

import bagcert
from bagcert.cli import certify as cli_certify
from bagcert.runs import CertifyConfig, CertifyError, CertifyResult, certify_run

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "cifar10"
#: the numbers of results.json that must not depend on how the run was started
NUMBERS = ("method", "forward_passes_per_image", "num_images", "correct_count", "clean_accuracy", "clean_accuracy_ci95",
           "certified_accuracy", "certified_accuracy_ci95", "certified_count", "aggregation")


def _rows(folder):
    with open(folder / "per_sample.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("options, argv", [
    ({"patch_sizes": [2, (3, 5)], "certifier": "votes"}, ["--patch-sizes", "2,3x5", "--certifier", "votes"]),
    ({}, []),  # the shipped model's own certificate: double masking of clipped logits at its card patch size
])
def test_certify_run_gives_the_cli_report(options, argv, tmp_path, capsys, one_thread):
    common = ["--dataset", str(SAMPLES), "--num-images", "8", "--threads", "1", "--no-progress", "--quiet"]
    assert cli_certify.main(common + argv + ["--output", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    capsys.readouterr()

    config = CertifyConfig(dataset=SAMPLES, num_images=8, threads=1, progress=False, quiet=True, output=tmp_path / "lib",
                           **options)
    result = certify_run(config)
    assert isinstance(result, CertifyResult) and capsys.readouterr().out == ""  # the library prints no result
    lib = json.loads((tmp_path / "lib" / "results.json").read_text())
    assert {k: lib[k] for k in NUMBERS} == {k: cli[k] for k in NUMBERS}
    assert lib["num_images"] == 8 and lib["checkpoint"] == cli["checkpoint"]
    same_config = {k: v for k, v in lib["config"].items() if k not in ("output", "data_path_reason")}
    assert same_config == {k: v for k, v in cli["config"].items() if k not in ("output", "data_path_reason")}
    assert _rows(tmp_path / "lib") == _rows(tmp_path / "cli")
    # the result is what was written
    assert result.summary["run_id"] == lib["run_id"] and result.summary["certified_count"] == lib["certified_count"]
    assert result.markdown == (tmp_path / "lib" / "summary.md").read_text()
    assert result.empirical is None and result.broken == {}


@pytest.mark.parametrize("field, value, expected", [
    ("num_images", 0, "must be a positive integer, got 0"),
    ("batch_size", "many", "not an integer: 'many'"),
    ("threads", -2, "must be a positive integer, got -2"),
    ("workers", -1, "must be an integer >= 0, got -1"),
    ("device", "tpu:0", "not a torch device: 'tpu:0' (expected cpu, cuda, cuda:N or mps)"),
    ("data_path", "disk", "must be one of auto, memory, stream, got 'disk'"),
    ("precision", "fp16", "must be one of fp32, bf16, got 'fp16'"),
    ("aggregation", "mean", "must be one of votes, majority, clipped or None, got 'mean'"),
    ("dense", "yes", "must be True or False, got 'yes'"),
    ("attack_step_size", "big", "not a number: 'big'"),
    ("seed", 1.5, "not an integer: 1.5"),
])
def test_a_bad_field_is_one_line_naming_the_field(field, value, expected):
    with pytest.raises(ValueError) as info:
        CertifyConfig(**{field: value})
    text = str(info.value)
    assert isinstance(info.value, CertifyError) and "\n" not in text
    assert text.startswith(f"{field}: ") and expected in text, text


@pytest.mark.parametrize("field, flag, value", [("num_images", "--num-images", "0"), ("batch_size", "--batch-size", "x"),
                                                ("workers", "--workers", "-3"), ("device", "--device", "tpu")])
def test_the_cli_refuses_the_same_values_with_the_same_message(field, flag, value, capsys):
    with pytest.raises(ValueError) as info:
        CertifyConfig(**{field: value})
    with pytest.raises(SystemExit) as e:
        cli_certify.main([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"argument {flag}: {str(info.value)[len(field) + 2:]}" in err, err


def test_option_combinations_are_refused_when_the_config_is_built():
    with pytest.raises(CertifyError, match=r"^--robust-masking cannot be combined with --attacks: "):
        CertifyConfig(robust_masking=True, attacks=["pgd"])
    with pytest.raises(CertifyError, match=r"^--double-masking-clip applies only with --double-masking"):
        CertifyConfig(double_masking_clip=(-2, 2))
    with pytest.raises(CertifyError, match=r"^--patch-sizes: patch size 'abc' is not understood"):
        CertifyConfig(patch_sizes="5,abc")
    with pytest.raises(CertifyError, match=r"^--attacks: unknown attack 'pdg' \(did you mean pgd\?\)"):
        CertifyConfig(attacks="pdg")


def test_values_are_normalised_and_the_config_is_frozen(tmp_path):
    config = CertifyConfig(patch_sizes=[5, (3, 7), "2%"], attack_patch_sizes=[(3, 7)], attacks=("pgd", "universal"),
                           num_images="8", output=tmp_path / "x", model_modules=["m.py"])
    assert (config.patch_sizes, config.attacks, config.attack_patch_sizes) == ("5,3x7,2%", "pgd,universal", "3x7")
    assert CertifyConfig(double_masking=True, double_masking_clip=(-2, 2.5)).double_masking_clip == "-2,2.5"
    assert CertifyConfig(patch_sizes=5).patch_sizes == "5" and CertifyConfig(attacks=None).attacks == ""
    assert config.num_images == 8 and config.output == str(tmp_path / "x") and config.model_modules == ("m.py",)
    assert config.checked() is config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_images = 9
    # one field per option of the command, by its argument name, with the command's defaults
    args = cli_certify.build_parser().parse_args([])
    assert {f.name for f in dataclasses.fields(CertifyConfig)} == set(vars(args)) - {"output_given"}
    assert cli_certify.config_from_args(args) == CertifyConfig()


def test_input_mistakes_are_exceptions_not_exits(tiny_checkpoint, tmp_path, capsys, one_thread):
    folder = tmp_path / "report"
    config = CertifyConfig(checkpoint=tiny_checkpoint, dataset="synthetic:4", patch_sizes="2", threads=1, progress=False,
                           output=folder)
    assert certify_run(config).summary["num_images"] == 4
    before = (folder / "results.json").read_text()
    with pytest.raises(CertifyError, match=r"^--output: .*already holds a report"):
        certify_run(config)
    assert (folder / "results.json").read_text() == before  # refused before any work: the report is kept
    with pytest.raises(CertifyError, match=r"^--checkpoint no-such-model: "):
        certify_run(dataclasses.replace(config, checkpoint="no-such-model", overwrite=True))
    with pytest.raises(CertifyError, match=r"^--num-images 5 is larger than the data set \(4 images"):
        certify_run(dataclasses.replace(config, num_images=5, overwrite=True))
    # run_certification takes a config too (alone), and returns its summary
    summary = bagcert.run_certification(config=dataclasses.replace(config, overwrite=True))
    assert summary["num_images"] == 4 and summary["certified_count"] == json.loads(before)["certified_count"]
    with pytest.raises(ValueError, match="config= is given with num_images"):
        bagcert.run_certification(config=config, num_images=2)
    assert capsys.readouterr().out == ""


_ARGPARSE = re.compile(r"^\s*(import\s+argparse|from\s+argparse\s+import)\b", re.M)
_EXIT = re.compile(r"\bSystemExit\b|\bsys\.exit\(|^\s*exit\(", re.M)


def test_the_library_run_has_no_argparse_and_no_process_exit():
    """No argparse in the library: the CLI maps argv to a CertifyConfig. (Scoped to bagcert/runs and the modules the
    certification run uses; to be widened to all of bagcert/ outside bagcert/cli.)"""
    package = ROOT / "bagcert"
    files = sorted((package / "runs").rglob("*.py"))
    files += [package / f for f in ("__init__.py", "certification.py", "evaluation.py", "report.py", "streaming.py", "data.py",
                                    "shipped.py", "empirical.py", "geometry.py", "geometry_inference.py", "checkpoint.py")]
    files += sorted((package / "peers").rglob("*.py"))
    assert len(files) > 12 and all(f.is_file() for f in files)
    assert [str(f.relative_to(ROOT)) for f in files if _ARGPARSE.search(f.read_text())] == []
    certify_files = [package / "runs" / f for f in ("certify.py", "_certify_parts.py", "_checks.py")]
    assert [str(f.relative_to(ROOT)) for f in certify_files if _EXIT.search(f.read_text())] == []


@pytest.mark.parametrize("value, expected", [
    (5.5, "patch size '5.5' is not understood"), ("", "patch size '' is not understood"),  # "" was taken as not given
    (0, "patch size must be positive, got 0x0"), ([1, 2, 3], "patch size '[1, 2, 3]' is not understood"),
])
def test_a_bad_mask_patch_size_is_refused_when_the_config_is_built(value, expected, capsys):
    with pytest.raises(CertifyError) as info:
        CertifyConfig(mask_patch_size=value)
    assert str(info.value).startswith(f"--mask-patch-size: {expected}") and "\n" not in str(info.value)
    if isinstance(value, str):  # the command refuses it with the same line, exit status 1, no traceback
        with pytest.raises(SystemExit) as e:
            cli_certify.main(["--mask-patch-size", value])
        assert e.value.code == str(info.value)
    assert CertifyConfig(mask_patch_size=(3, 7)).mask_patch_size == "3x7"


def test_model_modules_as_a_lone_path_is_one_line_not_a_type_error():
    with pytest.raises(CertifyError, match=r"^model_modules must be a list of .py files or dotted module names, got "
                                           r"PosixPath\('m.py'\)$"):
        CertifyConfig(model_modules=Path("m.py"))
    assert CertifyConfig(model_modules=[Path("m.py")]).model_modules == ("m.py",)


def test_run_certification_checks_overwrite_instead_of_taking_its_truth_value(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text("{}")  # bool("no") is True: it would have been replaced
    with pytest.raises(CertifyError, match=r"^overwrite: must be True or False, got 'no'$"):
        bagcert.run_certification(output=tmp_path / "report", overwrite="no", num_images=2)
    assert (tmp_path / "report" / "results.json").read_text() == "{}"


def test_an_output_inside_the_bundled_samples_is_refused_when_no_dataset_is_given(capsys):
    inside = SAMPLES / "test" / "report"  # was written there: an 11th class folder for every later run on the samples
    with pytest.raises(CertifyError, match=r"^--output .*report lies inside the dataset folder .*cifar10: "):
        certify_run(CertifyConfig(num_images=2, output=inside, progress=False, quiet=True))
    assert not inside.exists()
    with pytest.raises(SystemExit) as e:
        cli_certify.main(["--num-images", "2", "--output", str(inside)])
    assert "lies inside the dataset folder" in str(e.value.code) and not inside.exists()


def test_run_certification_checks_a_given_quiet_instead_of_overriding_it():
    with pytest.raises(CertifyError, match=r"^quiet: must be True or False, got 'yes'$"):
        bagcert.run_certification(quiet="yes", num_images=2)


@pytest.mark.parametrize("field, value, message", [
    ("attack_steps", -1, r"^--attack-steps must be >= 0, got -1"),
    ("attack_locations", 0, r"^--attack-locations must be >= 1, got 0"),
    ("attack_step_size", 2.0, r"^--attack-step-size is a signed-gradient step"),
])
def test_a_bad_attack_setting_is_refused_even_without_attacks(field, value, message, capsys):
    # without --attacks the setting is unused, but a bad value is still the user's mistake: refused, not ignored
    with pytest.raises(CertifyError, match=message):
        CertifyConfig(**{field: value})
    flag = "--" + field.replace("_", "-")
    with pytest.raises(SystemExit) as e:
        cli_certify.main([flag, str(value), "--num-images", "2"])
    assert isinstance(e.value.code, str) and re.search(message.lstrip("^"), e.value.code)
