"""Report folders hold one run's complete set; every input mistake of the report CLIs is one line before any work.

certify.py, python -m bagcert.cli.roi and python -m bagcert.cli.defensive_patch run in-process on tiny synthetic
models and data. A user mistake raises SystemExit with a one-line message (Python prints it on stderr, exit
status 1) or exits with status 2 and one line from argparse.
"""

import csv
import gzip
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import bagcert
import bagcert.evaluation
import bagcert.report
import certify
from bagcert.attacks.imagenet_patch_attack import IMAGENETTE_WNIDS
from conftest import ROOT

SHIPPED = ROOT / "checkpoints" / "bagcert_cifar10_r5s2_v2.pt"
REAL_PATCH_FILE = ROOT.parent / "shared" / "data" / "imagenet-patch" / "imagenet_patch.gz"
FAST = ["--threads", "1", "--no-progress", "--quiet"]


def _certify(ckpt, out, *extra, dataset="synthetic:6", sizes="2,5"):
    return certify.main(["--checkpoint", str(ckpt), "--dataset", dataset, "--patch-sizes", sizes, "--output", str(out), *FAST, *extra])


def _report(out):
    """(results.json, per_sample.csv rows as dicts)."""
    res = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader(io.StringIO((out / "per_sample.csv").read_text())))
    return res, rows


def _consistent(out):
    """results.json and per_sample.csv describe the same run: same images, same sizes, same counts."""
    res, rows = _report(out)
    assert len(rows) == res["num_images"] == res["dataset"]["num_images"]
    sizes = [k[len("certified_"):] for k in rows[0] if k.startswith("certified_")]
    assert sizes == list(res["certified_accuracy"]) == res["config"]["patch_sizes"]
    for k in sizes:
        assert sum(int(r[f"certified_{k}"]) * int(r["correct"]) for r in rows) == res["certified_count"][k]
    assert sum(int(r["correct"]) for r in rows) == res["correct_count"]
    assert f"({res['num_images']} images" in (out / "summary.md").read_text()
    return res


def _one_line_failure(excinfo, capsys) -> str:
    """The message a user sees for a SystemExit: a str code is printed by Python on stderr (status 1); an int
    code was printed by the tool itself. Asserts one line, no traceback, non-zero status."""
    code = excinfo.value.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(code, str):
        message = code
    else:
        assert code not in (0, None)
        message = err
    message = message.strip()
    assert message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ report folders
def test_interleaved_runs_into_one_folder_leave_one_complete_set(tiny_checkpoint, tmp_path, monkeypatch):
    """Run A writes its results.json, then run B (another data set, other sizes) runs to the end into the same
    folder, then A goes on. The folder must end with one run's files only (the old code ended with B's
    results.json beside A's per_sample.csv); A, finding the folder taken, fails and keeps its own report."""
    out = tmp_path / "rep"
    real = bagcert.report.atomic_write_text
    state = {"nested": False}

    def interleave(path, text):
        real(path, text)
        if path.name == "results.json" and not state["nested"]:
            state["nested"] = True
            assert _certify(tiny_checkpoint, out, dataset="synthetic:9", sizes="3") == 0  # run B, start to end

    monkeypatch.setattr(bagcert.report, "atomic_write_text", interleave)
    with pytest.raises(SystemExit, match="filled by something else while this run worked") as exc:
        _certify(tiny_checkpoint, out, dataset="synthetic:6", sizes="2,5")  # run A
    res = _consistent(out)
    assert res["num_images"] == 9 and res["config"]["patch_sizes"] == ["3"]  # B's complete set
    kept = exc.value.code.rsplit("report is in ", 1)[1]
    kept_res = _consistent(tmp_path / os.path.basename(kept))  # A's complete set, handed to the user
    assert kept_res["num_images"] == 6 and kept_res["run_id"] != res["run_id"]


def test_interleaved_runs_with_overwrite_end_with_the_last_complete_set(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    real = bagcert.report.atomic_write_text
    state = {"nested": False}

    def interleave(path, text):
        real(path, text)
        if path.name == "results.json" and not state["nested"]:
            state["nested"] = True
            assert _certify(tiny_checkpoint, out, "--overwrite", dataset="synthetic:9", sizes="3") == 0

    monkeypatch.setattr(bagcert.report, "atomic_write_text", interleave)
    assert _certify(tiny_checkpoint, out, "--overwrite", dataset="synthetic:6", sizes="2,5") == 0
    res = _consistent(out)
    assert res["num_images"] == 6 and res["config"]["patch_sizes"] == ["2", "5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "tiny.pt"]  # no staging or old folder left


def test_concurrent_threads_into_one_folder(tiny_checkpoint, tmp_path, monkeypatch):
    """Two runs in threads at once, into one folder with --overwrite: whatever the timing, a consistent set.
    (The summary figure is left out: pyplot itself is not thread-safe.)"""
    import threading

    monkeypatch.setattr(bagcert.report, "_plot", lambda path, summary: None)
    out = tmp_path / "rep"
    rcs = []
    runs = [threading.Thread(target=lambda d=d, s=s: rcs.append(_certify(tiny_checkpoint, out, "--overwrite", dataset=d, sizes=s)))
            for d, s in (("synthetic:6", "2,5"), ("synthetic:9", "3"))]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert rcs == [0, 0]
    assert _consistent(out)["num_images"] in (6, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "tiny.pt"]


def test_figure_temporary_names_are_unique(tmp_path):
    """Another run's temporary figure file in the folder is neither reused nor moved away."""
    pytest.importorskip("matplotlib")
    other = tmp_path / "certified_accuracy.tmp.png"
    other.write_bytes(b"another run's half-written figure")
    summary = {"certified_accuracy": {"5": 0.5}, "clean_accuracy": 0.7, "dataset": {"name": "x"}, "num_images": 3}
    bagcert.report._plot(tmp_path / "certified_accuracy.png", summary)
    assert other.read_bytes() == b"another run's half-written figure"
    assert (tmp_path / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certified_accuracy.png", "certified_accuracy.tmp.png"]


def test_rerun_with_fewer_sizes_leaves_no_stale_files(tiny_checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    attack = ["--attacks", "pgd", "--attack-steps", "1", "--attack-locations", "1", "--attack-images", "2"]
    assert _certify(tiny_checkpoint, out, *attack, sizes="2,5") == 0
    assert (out / "attack_examples_5.png").is_file()
    assert _certify(tiny_checkpoint, out, "--overwrite", *attack, sizes="2") == 0
    res = _consistent(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.json", "per_sample.csv", "summary.md", "certified_accuracy.png", *res["empirical"]["per_size"]["2"]["figures"]])
    assert not (out / "attack_examples_5.png").exists()


def test_a_folder_with_a_report_is_refused_without_overwrite(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    assert _certify(tiny_checkpoint, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_work(*a, **k):
        raise AssertionError("the certification ran although the report folder was refused")

    monkeypatch.setattr(bagcert.evaluation, "certify_dataset", no_work)
    with pytest.raises(SystemExit) as exc:
        _certify(tiny_checkpoint, out, sizes="3")
    assert "already holds a report" in _one_line_failure(exc, capsys) and "--overwrite" in exc.value.code
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a folder of other files is never replaced, not even with --overwrite
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a bagcert report"):
        _certify(tiny_checkpoint, notes, "--overwrite")
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]


# ------------------------------------------------------------------------------------------------ unwritable outputs
def _unwritable(tmp_path, kind):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    if kind == "existing file":
        return blocker
    if kind == "under a file":
        return blocker / "sub" / "rep"
    if os.geteuid() == 0:
        pytest.skip("root may write into a read-only (chmod 555) folder; the path-under-a-file case covers it")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "rep"


@pytest.mark.parametrize("kind", ["existing file", "under a file", "read-only folder"])
@pytest.mark.parametrize("tool", ["certify", "roi", "defensive_patch"])
def test_unwritable_output_is_refused_before_any_work(tool, kind, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from bagcert.analysis import roi as roi_lib
    from bagcert.cli import defensive_patch as cli_dp
    from bagcert.cli import roi as cli_roi
    from bagcert import defense

    out = _unwritable(tmp_path, kind)

    def no_work(*a, **k):
        raise AssertionError("the work ran before the report folder was checked")

    for mod, name in ((bagcert.evaluation, "certify_dataset"), (roi_lib, "evaluate_neutralization"),
                      (defense, "make_defensive_patches"), (defense, "evaluate_defensive_patch")):
        monkeypatch.setattr(mod, name, no_work)
    common = ["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--output", str(out), "--threads", "1", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        if tool == "certify":
            certify.main(common + ["--patch-sizes", "2", "--no-progress"])
        elif tool == "roi":
            cli_roi.main(common + ["--num-images", "4", "--steps", "1"])
        else:
            cli_dp.main(common + ["--num-train", "8", "--num-eval", "4", "--stage1-epochs", "0", "--stage2-epochs", "0"])
    message = _one_line_failure(exc, capsys)
    assert message.startswith("--output") and str(tmp_path / "a_file") in message


# ------------------------------------------------------------------------------------------------ attacks that cannot run
def _imagenet_like_checkpoint(path):
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=10, width=8).eval()
    bagcert.save_checkpoint(path, model, input_size=32, classes=list(IMAGENETTE_WNIDS))
    return path


@pytest.mark.parametrize("patch_file", ["truncated", "refused", "missing"])
def test_imagenet_patch_that_cannot_run_is_an_error_before_any_work(patch_file, tmp_path, capsys, monkeypatch):
    ckpt = _imagenet_like_checkpoint(tmp_path / "inette.pt")
    bad = tmp_path / "imagenet_patch.gz"
    if patch_file == "truncated":
        whole = REAL_PATCH_FILE.read_bytes() if REAL_PATCH_FILE.is_file() else gzip.compress(b"\x80\x02" + bytes(5000))
        bad.write_bytes(whole[: len(whole) // 2])
    elif patch_file == "refused":  # a pickle that would call os.system: must be refused, never run
        bad.write_bytes(gzip.compress(pickle.dumps(os.system)))

    def no_work(*a, **k):
        raise AssertionError("images were certified although a requested attack cannot run")

    monkeypatch.setattr(bagcert.evaluation, "certify_dataset", no_work)
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        _certify(ckpt, out, "--attacks", "pgd,imagenet-patch", "--imagenet-patch-file", str(bad), dataset="synthetic:4", sizes="5")
    message = _one_line_failure(exc, capsys)
    assert message.startswith("--attacks: imagenet-patch cannot run") and "patch file" in message
    assert not out.exists()


def test_imagenet_patch_on_a_cifar_model_is_an_error(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        _certify(tiny_checkpoint, out, "--attacks", "imagenet-patch", "--attack-steps", "1", dataset="synthetic:4", sizes="5")
    assert "imagenet-patch cannot run" in _one_line_failure(exc, capsys)
    assert not out.exists()


def test_run_empirical_evaluation_raises_or_records_an_attack_that_cannot_run(tiny_checkpoint, tmp_path):
    from bagcert.empirical import AttackUnavailableError, run_empirical_evaluation

    model, meta = bagcert.load_checkpoint(tiny_checkpoint)
    data = bagcert.data.load_dataset("synthetic:4", "test")
    results, _ = bagcert.evaluation.certify_dataset(model, data, [3])
    with pytest.raises(AttackUnavailableError, match="imagenet-patch cannot run"):
        run_empirical_evaluation(model, data, results, ["feature-space", "imagenet-patch"], metadata=meta)
    emp = run_empirical_evaluation(model, data, results, ["feature-space", "imagenet-patch"], metadata=meta, allow_skip=True)
    assert "not ImageNet" in emp["summary"]["skipped"]["imagenet-patch"]


# ------------------------------------------------------------------------------------------------ provenance
def _class_folder(root, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f"img{k}.png")
    return root


def test_per_sample_rows_trace_back_to_their_image_files(tmp_path):
    """A folder without split folders, cut by the checkpoint's seeded split, then --num-images: every row's
    dataset_index and source name the very file whose pixels and class the row is about."""
    classes = ["ant", "bee", "cat"]
    root = _class_folder(tmp_path / "folder", classes, 6)
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", num_classes=3, width=8).eval()
    ckpt = bagcert.save_checkpoint(tmp_path / "m.pt", model, input_size=32, resize=32, classes=classes,
                                   split={"seed": 1, "test_fraction": 0.5, "num_images": 18})
    out = tmp_path / "rep"
    assert certify.main(["--checkpoint", str(ckpt), "--dataset", str(root), "--patch-sizes", "3", "--num-images", "5",
                         "--output", str(out), *FAST]) == 0
    res, rows = _report(out)
    assert len(rows) == 5 and res["dataset"]["index_base"] == "dataset"
    whole = bagcert.data.load_image_folder(root, size=32, resize=32)
    _, test_part = bagcert.data.seeded_split(18, 0.5, 1)
    assert {int(r["dataset_index"]) for r in rows} <= set(test_part.tolist())  # never a training image
    for r in rows:
        i, src = int(r["dataset_index"]), r["source"]
        pixels = torch.from_numpy(np.array(Image.open(root / src).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(whole.images[i], pixels)
        assert classes[int(r["label"])] == src.split("/")[0]


def test_per_sample_rows_of_a_subset_of_synthetic_data_give_the_generator_index(tiny_checkpoint, tmp_path):
    out = tmp_path / "rep"
    assert _certify(tiny_checkpoint, out, "--num-images", "4", dataset="synthetic:10") == 0
    _, rows = _report(out)
    full = bagcert.data.load_dataset("synthetic:10", "test")
    keep = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4].sort().values.tolist()
    assert [int(r["dataset_index"]) for r in rows] == keep
    assert [int(r["label"]) for r in rows] == full.labels[keep].tolist()


# ------------------------------------------------------------------------------------------------ bad inputs
def _bad_checkpoint(tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '_')}.pt"
    good = SHIPPED.read_bytes()
    if kind == "corrupt":
        b = bytearray(good)
        for k in range(len(b) // 2, len(b) // 2 + 64):
            b[k] ^= 0xFF
        path.write_bytes(bytes(b))
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "hostile pickle":
        torch.save({"format": "bagcert-checkpoint", "payload": os.system}, path)
    else:
        obj = torch.load(SHIPPED, map_location="cpu", weights_only=True)
        if kind == "future format":
            obj["format_version"] = 99
        elif kind == "unknown model":
            obj["model"]["name"] = "no_such_net"
        elif kind == "input_size abc":
            obj["metadata"]["input_size"] = "abc"
        elif kind == "input_size 0":
            obj["metadata"]["input_size"] = 0
        torch.save(obj, path)
    return path


CHECKPOINT_CASES = ["corrupt", "truncated", "random bytes", "hostile pickle", "future format", "unknown model", "input_size abc",
                    "input_size 0"]
ARGUMENT_CASES = {
    "patch larger than the image": (["--patch-sizes", "40"], "40"),
    "same size twice": (["--patch-sizes", "5,5"], "'5' and '5'"),
    "same size two ways": (["--patch-sizes", "3,5,5x5"], "'5' and '5x5'"),
    "same size as a share": (["--patch-sizes", "5,2%"], "'5' and '2%'"),
    "bogus device": (["--device", "bogus"], "bogus"),
    "empty synthetic set": (["--dataset", "synthetic:0"], "synthetic:0"),
    "missing split folder": (["--split", "val"], "val"),
    "more images than the set": (["--num-images", "50"], "50"),
    "attack size not certified": (["--attacks", "pgd", "--attack-patch-sizes", "3"], "3"),
    "attack step above one": (["--attacks", "pgd", "--attack-step-size", "2"], "(0, 1]"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES + list(ARGUMENT_CASES))
def test_bad_inputs_end_in_one_line_and_write_nothing(case, tmp_path, capsys):
    if not SHIPPED.is_file():
        pytest.skip("shipped checkpoint missing")
    data = _class_folder(tmp_path / "c10" / "test", bagcert.data.CIFAR10_CLASSES, 1).parent  # 10 images, CIFAR layout
    ckpt, extra = SHIPPED, []
    if case in CHECKPOINT_CASES:
        ckpt = _bad_checkpoint(tmp_path, case)
    else:
        extra, expected = ARGUMENT_CASES[case]
    argv = ["--checkpoint", str(ckpt), "--dataset", str(data), "--patch-sizes", "2,5", "--output", str(tmp_path / "out" / "rep"), *FAST]
    with pytest.raises(SystemExit) as exc:
        certify.main(argv + extra)
    message = _one_line_failure(exc, capsys)
    if case in CHECKPOINT_CASES:
        assert str(ckpt) in message
    else:
        assert expected in message
    assert not (tmp_path / "out").exists()


def test_split_test_without_a_split_record_is_refused_end_to_end(tmp_path, capsys):
    """An exported checkpoint of a run whose metadata has no split record, on a folder without split folders:
    --split test cannot be told from the training images and is refused (never widened to every image)."""
    import train
    from bagcert.training import export_checkpoint

    run = tmp_path / "run"
    assert train.main(["--dataset", "synthetic:16", "--num-classes", "3", "--model", "cifar_bagnet5_s2", "--model-kwargs",
                       '{"width": 8}', "--max-steps", "1", "--batch-size", "8", "--threads", "1", "--output", str(run),
                       "--no-progress", "--no-tensorboard"]) == 0
    classes = ["ant", "bee", "cat"]
    exported = export_checkpoint(run, tmp_path / "exported.pt", classes=classes)
    _, meta = bagcert.load_checkpoint(exported)
    assert "split" not in meta
    root = _class_folder(tmp_path / "folder", classes, 2)
    out = tmp_path / "rep"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        certify.main(["--checkpoint", str(exported), "--dataset", str(root), "--split", "test", "--patch-sizes", "3",
                      "--output", str(out), *FAST])
    message = _one_line_failure(exc, capsys)
    assert "no seeded split" in message and "--split test" in message
    assert not out.exists()
    assert certify.main(["--checkpoint", str(exported), "--dataset", str(root), "--split", "all", "--patch-sizes", "3",
                         "--output", str(out), *FAST]) == 0
    assert json.loads((out / "results.json").read_text())["num_images"] == 6


def test_analysis_clis_refuse_more_images_than_the_split_has(tiny_checkpoint, tmp_path, capsys):
    from bagcert.cli import defensive_patch as cli_dp
    from bagcert.cli import roi as cli_roi

    common = ["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:8", "--output", str(tmp_path / "rep"), "--threads", "1", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        cli_roi.main(common + ["--num-images", "9"])
    assert "--num-images 9 is larger than the data set (8 images)" in _one_line_failure(exc, capsys)
    with pytest.raises(SystemExit) as exc:
        cli_dp.main(common + ["--num-eval", "20"])
    assert "--num-eval 20 is larger than the data set (8 images)" in _one_line_failure(exc, capsys)
    assert not (tmp_path / "rep").exists()


def test_sigterm_during_a_run_leaves_no_staging_folder(tmp_path):
    """certify.py stopped with SIGTERM while its report is staged: exit 143, one line, neither the report nor its
    hidden staging folder left beside --output."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "rep"
    proc = subprocess.Popen([sys.executable, str(root / "certify.py"), "--checkpoint", str(root / "checkpoints/bagcert_cifar10_r5s2_v2.pt"),
                             "--dataset", "synthetic:64", "--patch-sizes", "5", "--attacks", "pgd", "--attack-steps", "100000",
                             "--attack-locations", "50", "--threads", "1", "--no-progress", "--quiet", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".rep.staging-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".rep.staging-*")), "the run never staged its report"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".rep*"))


# ------------------------------------------------------------------------------------------------ confidence intervals
def _cert(n, correct, certified):
    from bagcert.certification import CertResult

    flags = lambda k: torch.arange(n) < k  # noqa: E731
    return CertResult(prediction=torch.where(flags(correct), 0, 1), label=torch.zeros(n, dtype=torch.long), correct=flags(correct),
                      certified=flags(certified), margin=torch.where(flags(certified), 1, -1),
                      worst_position=torch.zeros(n, 2, dtype=torch.long), patch_size=(5, 5), aggregation="votes")


def test_binomial_ci95_is_the_exact_clopper_pearson_interval():
    from scipy.stats import beta

    from bagcert.report import binomial_ci95

    # by hand: with 0 of n the upper end solves (1 - p)^n = 0.025, with n of n the lower end p^n = 0.025
    lo, hi = binomial_ci95(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.1, abs=1e-12) and round(hi, 4) == 0.3085
    lo, hi = binomial_ci95(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** 0.1, abs=1e-12) and round(lo, 4) == 0.6915
    # against scipy's beta quantiles (the textbook definition, not the function used inside)
    lo, hi = binomial_ci95(112, 200)
    assert lo == pytest.approx(beta.ppf(0.025, 112, 89), abs=1e-12) and hi == pytest.approx(beta.ppf(0.975, 113, 88), abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.4883, 0.6299) and lo < 0.56 < hi
    assert binomial_ci95(0, 0) is None
    with pytest.raises(ValueError, match="need 0 <= count <= n"):
        binomial_ci95(11, 10)
    with pytest.raises(ValueError, match="must be integers"):
        binomial_ci95(0.5, 10)


def test_results_json_and_summary_md_give_the_interval_of_every_accuracy(tmp_path):
    from bagcert.report import binomial_ci95, write_certification_report

    results = {"5": _cert(200, 112, 67), "3x7": _cert(200, 112, 1)}
    robust = {"5": {"pgd": torch.tensor([True, True, True, False]), "imagenet-patch": torch.tensor([True, False, False, False])}}
    per = {"5": {"patch_size": [5, 5], "num_images": 4, "clean_accuracy": 1.0, "certified_accuracy": 0.5, "certified_count": 2,
                 "robust_accuracy": {"pgd": 0.75, "imagenet-patch": 0.25}, "robust_count": {"pgd": 3, "imagenet-patch": 1},
                 "correct_count": 4, "overall_robust_accuracy": 0.75, "overall_robust_count": 3, "overall_attacks": ["pgd"],
                 "in_threat_model": {"pgd": True, "imagenet-patch": False}, "certified_broken": 0, "broken_by": {}, "figures": []}}
    summary = {"attacks": ["pgd", "imagenet-patch"], "num_images_attacked": 4, "subset_seed": 0, "skipped": {}, "notes": [],
               "settings": {}, "per_size": per}
    doc = write_certification_report(tmp_path, results, {"forward_s": 1.0, "certify_s": 0.5, "total_s": 1.5}, {},
                                     {"name": "synthetic", "root": None, "split": "test"}, None,
                                     empirical={"summary": summary, "indices": [0, 1, 2, 3], "robust": robust})
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["clean_accuracy_ci95"] == binomial_ci95(112, 200)
    assert doc["certified_accuracy_ci95"] == {"5": binomial_ci95(67, 200), "3x7": binomial_ci95(1, 200)}
    e = doc["empirical"]["per_size"]["5"]
    assert e["certified_accuracy_ci95"] == binomial_ci95(2, 4) and e["clean_accuracy_ci95"] == binomial_ci95(4, 4)
    assert e["robust_accuracy_ci95"] == {"pgd": binomial_ci95(3, 4), "imagenet-patch": binomial_ci95(1, 4)}
    assert e["overall_robust_accuracy_ci95"] == binomial_ci95(3, 4)
    assert "robust_accuracy_ci95" not in per["5"]  # the caller's object is left as it was
    md = (tmp_path / "summary.md").read_text()
    assert "Clean accuracy: **56.00 %** (112 / 200; 95 % CI 48.8-63.0 %)" in md
    assert "| 5x5 | 33.50 % (27.0-40.5) | 67 |" in md and "| 3x7 | 0.50 % (0.0-2.8) | 1 |" in md
    assert "Clopper-Pearson" in md
    row = next(line for line in md.splitlines() if line.startswith("| 5x5 | 50.00 %"))
    assert row == ("| 5x5 | 50.00 % (6.8-93.2) | 75.00 % (19.4-99.4) | 25.00 % (0.6-80.6) (outside threat model) | "
                   "75.00 % (19.4-99.4) | 0 |")


def test_printed_summary_and_json_line_carry_the_intervals(tiny_checkpoint, tmp_path, capsys):
    from bagcert.report import binomial_ci95

    out = tmp_path / "rep"
    assert certify.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:12", "--patch-sizes", "2",
                         "--output", str(out), "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    line = json.loads(printed.strip().splitlines()[-1])
    ci = binomial_ci95(res["correct_count"], 12)
    assert line["clean_accuracy_ci95"] == [round(v, 6) for v in ci] and res["clean_accuracy_ci95"] == ci
    assert line["certified_accuracy_ci95"]["2"] == [round(v, 6) for v in binomial_ci95(res["certified_count"]["2"], 12)]
    assert f"95 % CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f} %" in printed
