"""certify.py and benchmarks/peers_compare.py with the peer classifiers of train.py --peer (de-randomized
smoothing, PatchCleanser): the report's numbers are the certifier's numbers, the schema is the bagcert
model's, and everything a peer cannot do is refused with a clear error."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import bagcert
import certify
from bagcert import peers
from bagcert.data import load_dataset, synthetic_dataset
from bagcert.training import TrainConfig, train
from conftest import ROOT, load_benchmark

CLASSES = [f"class{i}" for i in range(10)]


def _save_peer(path, text, seed=0):
    """A randomly initialised tiny peer classifier saved like train.py --peer saves one (spec in the metadata)."""
    spec = peers.parse_peer_spec(text)
    torch.manual_seed(seed)
    clf = spec.build_classifier("cifar_bagnet5_s2", 10, width=8).eval()
    peers.save_peer_classifier(path, clf, peer=spec.to_dict(), input_size=32, classes=CLASSES)
    return path


@pytest.fixture(scope="module")
def trained_drs(tmp_path_factory):
    """A DRS column b=3 classifier from a tiny train.py run (4 steps on synthetic data)."""
    out = tmp_path_factory.mktemp("drs_run")
    cfg = TrainConfig(dataset="synthetic", model="cifar_bagnet5_s2", model_kwargs={"width": 8}, epochs=1, batch_size=16, ema=0.0,
                      loss="ce", output=str(out), tensorboard=False, progress=False, eval_every=1.0, checkpoint_minutes=0.0,
                      peer="drs-column:3")
    train(cfg, synthetic_dataset(64, seed=1), synthetic_dataset(16, seed=2), log=lambda *a: None)
    return out / "peer_classifier.pt"


@pytest.fixture
def pc_file(tmp_path):
    return _save_peer(tmp_path / "pc.pt", "patchcleanser:5,k=3")


def _run(argv, capsys):
    rc = certify.main(argv + ["--no-progress", "--quiet"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _direct(path, dataset, sizes, certify_with=None):
    """The certifier called from Python on the same images: {size key: CertResult}."""
    cert, clf, _ = peers.load_peer_certifier(path)
    data = load_dataset(dataset, "test")
    x, y = data.float_images(), data.labels
    return {k: cert.certify(clf, x, y, certify_with or s) for k, s in sizes.items()}


def _assert_report_matches(out, direct):
    res = json.loads((out / "results.json").read_text())
    rows = _csv(out / "per_sample.csv")
    for k, d in direct.items():
        assert res["certified_count"][k] == int(d.certified_correct.sum())
        assert res["certified_accuracy"][k] == pytest.approx(d.certified_accuracy)
        assert [int(r[f"certified_{k}"]) for r in rows] == d.certified.int().tolist()
        assert [int(r[f"margin_{k}"]) for r in rows] == d.margin.tolist()
    first = next(iter(direct.values()))
    assert [int(r["prediction"]) for r in rows] == first.prediction.tolist()
    assert [int(r["label"]) for r in rows] == first.label.tolist()
    assert res["correct_count"] == int(first.correct.sum()) and res["clean_accuracy"] == pytest.approx(first.clean_accuracy)
    return res, rows


# ----------------------------------------------------------------------------------------------
# certify.py
# ----------------------------------------------------------------------------------------------
def test_certify_cli_on_a_trained_drs_classifier_equals_the_certifier(trained_drs, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "drs"
    rc, line = _run(["--checkpoint", str(trained_drs), "--dataset", "synthetic:10", "--patch-sizes", "1,5,3x7",
                     "--batch-size", "4", "--output", str(out)], capsys)
    assert rc == 0
    direct = _direct(trained_drs, "synthetic:10", {"1": 1, "5": 5, "3x7": (3, 7)})
    assert sum(int(d.certified.sum()) for d in direct.values()) > 0  # not a vacuous comparison
    res, rows = _assert_report_matches(out, direct)
    assert len(rows) == 10
    assert res["method"] == res["aggregation"] == "drs-column-b3" and res["forward_passes_per_image"] == 32
    assert res["peer"]["spec"] == "drs-column:3,encoding=mask"
    assert res["peer"]["affected_ablations"] == {"1": 3, "5": 7, "3x7": 9}  # Δ = min(W, pw + b - 1)
    assert res["checkpoint"]["format"] == "bagcert-peer-classifier" and res["checkpoint"]["model"] == "cifar_bagnet5_s2"
    assert res["checkpoint"]["metadata_summary"]["peer"]["band_size"] == 3
    # images/s measured like for bagcert models: images / wall time of the whole loop
    assert res["images_per_s"] == pytest.approx(10 / res["timing"]["total_s"])
    assert res["timing"]["forward_s"] > 0 and res["certify_forward_ratio"] >= 1.0
    assert line["method"] == "drs-column-b3" and line["forward_passes_per_image"] == 32 and line["num_images"] == 10
    assert line["certified_accuracy"] == {k: round(d.certified_accuracy, 6) for k, d in direct.items()}
    summary = (out / "summary.md").read_text()
    assert "- method: drs-column-b3 (32 network evaluations per image)" in summary

    # the same schema as a bagcert model's report, plus nothing else
    ref = tmp_path / "ref"
    rc, ref_line = _run(["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:10", "--patch-sizes", "1,5,3x7",
                         "--output", str(ref)], capsys)
    ref_res = json.loads((ref / "results.json").read_text())
    assert rc == 0 and set(ref_res) == set(res) and set(ref_line) == set(line)
    assert set(ref_res["timing"]) == set(res["timing"]) and set(ref_res["dataset"]) == set(res["dataset"])
    assert list(_csv(ref / "per_sample.csv")[0]) == list(rows[0])
    assert (ref_res["method"], ref_res["forward_passes_per_image"], ref_res["peer"]) == ("bagcert", 1, None)


def test_certify_cli_on_a_patchcleanser_classifier_equals_the_certifier(pc_file, tmp_path, capsys):
    # default patch sizes: the one its mask set was built for
    rc, line = _run(["--checkpoint", str(pc_file), "--dataset", "synthetic:8", "--batch-size", "3", "--output", str(tmp_path / "a")], capsys)
    assert rc == 0 and set(line["certified_accuracy"]) == {"5"}
    direct5 = _direct(pc_file, "synthetic:8", {"5": 5})
    assert int(direct5["5"].certified.sum()) > 0
    res, _ = _assert_report_matches(tmp_path / "a", direct5)
    cert, _, _ = peers.load_peer_certifier(pc_file)
    assert res["method"] == "patchcleanser-k3" and res["forward_passes_per_image"] == 45 == cert.forward_passes_per_image((32, 32), 5)
    ms = peers.MaskSet.for_patch((32, 32), 5, 3)
    assert res["peer"]["mask_set"] == {
        "patch_size": [5, 5], "rebuilt": False, "k": [3, 3], "num_masks": 9, "mask_size": list(ms.mask_size), "stride": list(ms.stride),
        "row_starts": list(ms.row_starts), "col_starts": list(ms.col_starts), "fill": 0.5,
    }
    # smaller patches are certified with the same (trained) mask set: the same defended prediction and certificate
    rc, line = _run(["--checkpoint", str(pc_file), "--dataset", "synthetic:8", "--patch-sizes", "2,3x4,5",
                     "--output", str(tmp_path / "b")], capsys)
    assert rc == 0
    _assert_report_matches(tmp_path / "b", _direct(pc_file, "synthetic:8", {"2": 2, "3x4": (3, 4), "5": 5}, certify_with=5))
    assert line["forward_passes_per_image"] == 45


@pytest.mark.parametrize("image, mask_patch, k", [(32, 5, 3), (32, 5, 6), (20, (7, 4), (2, 3))])
def test_a_mask_set_covers_every_smaller_patch(image, mask_patch, k):
    """Why the mask set built for P certifies every patch p <= P (per dimension): each p-patch inside the image is
    covered by some mask, which is all the two-mask certificate needs. Checked at every position."""
    masks = peers.MaskSet.for_patch((image, image), mask_patch, k).masks().float()[:, None]  # [M, 1, H, W]
    P = bagcert.parse_patch_size(mask_patch)
    for ph in range(1, P[0] + 1):
        for pw in range(1, P[1] + 1):
            # masked pixels under the patch at every top-left position (a, b) inside the image, per mask (exact sums)
            under = torch.nn.functional.conv2d(masks, torch.ones(1, 1, ph, pw))[:, 0]  # [M, H - ph + 1, W - pw + 1]
            assert under.shape[1:] == (image - ph + 1, image - pw + 1)
            assert bool((under == ph * pw).any(dim=0).all()), (ph, pw)  # some mask holds the whole patch


def test_patchcleanser_larger_patch_is_refused_or_certified_with_a_rebuilt_mask_set(pc_file, tmp_path, capsys):
    out = tmp_path / "big"
    with pytest.raises(SystemExit, match=r"mask set built for 5x5 patches: its certificate covers patches up to 5x5 only, not 7x7, 3x6"):
        certify.main(["--checkpoint", str(pc_file), "--dataset", "synthetic:4", "--patch-sizes", "3,7,3x6", "--output", str(out)])
    assert not out.exists()
    # --mask-patch-size 7 certifies double masking with the mask set for 7x7 patches (sound, a different defense)
    out = tmp_path / "rebuilt"
    rc, line = _run(["--checkpoint", str(pc_file), "--dataset", "synthetic:6", "--patch-sizes", "3,7,3x6", "--mask-patch-size", "7",
                     "--output", str(out)], capsys)
    assert rc == 0
    res, _ = _assert_report_matches(out, _direct(pc_file, "synthetic:6", {"3": 3, "7": 7, "3x6": (3, 6)}, certify_with=7))
    cert, _, _ = peers.load_peer_certifier(pc_file)
    assert res["peer"]["mask_set"]["patch_size"] == [7, 7] and res["peer"]["mask_set"]["rebuilt"] is True
    assert res["forward_passes_per_image"] == cert.forward_passes_per_image((32, 32), 7)
    assert "rebuilt with --mask-patch-size" in (out / "summary.md").read_text()
    with pytest.raises(SystemExit, match="covers patches up to 4x4 only, not 5x5"):
        certify.main(["--checkpoint", str(pc_file), "--dataset", "synthetic:4", "--patch-sizes", "5", "--mask-patch-size", "4",
                      "--output", str(tmp_path / "x")])


def test_options_that_do_not_apply_to_peers_are_refused(pc_file, tiny_checkpoint, tmp_path):
    drs = _save_peer(tmp_path / "drs.pt", "drs-block:4")
    base = ["--dataset", "synthetic:4", "--patch-sizes", "2", "--output", str(tmp_path / "o"), "--no-progress"]
    for path in (drs, pc_file):
        with pytest.raises(SystemExit, match="--attacks does not apply to peer classifiers"):
            certify.main(["--checkpoint", str(path), "--attacks", "pgd"] + base)
        with pytest.raises(SystemExit, match="--aggregation votes applies to bagcert models only"):
            certify.main(["--checkpoint", str(path), "--aggregation", "votes"] + base)
    with pytest.raises(SystemExit, match="--mask-patch-size applies only to PatchCleanser; .* is drs-block:4"):
        certify.main(["--checkpoint", str(drs), "--mask-patch-size", "5"] + base)
    with pytest.raises(SystemExit, match="--mask-patch-size applies only to a PatchCleanser peer classifier"):
        certify.main(["--checkpoint", str(tiny_checkpoint), "--mask-patch-size", "5"] + base)
    with pytest.raises(SystemExit, match="--peer-batch-size must be >= 1"):
        certify.main(["--checkpoint", str(drs), "--peer-batch-size", "0"] + base)
    with pytest.raises(SystemExit, match="larger than the 32x32 images"):
        certify.main(["--checkpoint", str(drs), "--dataset", "synthetic:4", "--patch-sizes", "33", "--output", str(tmp_path / "p")])
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_peer_block_ablation_and_fill_encoding_through_the_cli(tmp_path, capsys):
    path = _save_peer(tmp_path / "fill.pt", "drs-column:6,encoding=fill,fill=0.25", seed=1)
    rc, line = _run(["--checkpoint", str(path), "--dataset", "synthetic:5", "--patch-sizes", "2,4x1", "--output", str(tmp_path / "f")], capsys)
    assert rc == 0 and line["method"] == "drs-column-b6"
    _assert_report_matches(tmp_path / "f", _direct(path, "synthetic:5", {"2": 2, "4x1": (4, 1)}))
    path = _save_peer(tmp_path / "block.pt", "drs-block:12,encoding=levine_feizi", seed=2)
    rc, line = _run(["--checkpoint", str(path), "--dataset", "synthetic:2", "--patch-sizes", "1", "--output", str(tmp_path / "b")], capsys)
    assert rc == 0 and line["forward_passes_per_image"] == 32 * 32
    _assert_report_matches(tmp_path / "b", _direct(path, "synthetic:2", {"1": 1}))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_certify_a_peer_like_one(tmp_path):
    path = _save_peer(tmp_path / "drs.pt", "drs-column:3")
    common = [str(ROOT / "certify.py"), "--checkpoint", str(path), "--dataset", "synthetic:7", "--patch-sizes", "1,5",
              "--batch-size", "2", "--threads", "1", "--no-progress", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(_free_port())] + common + ["--output", str(tmp_path / "ddp")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["config"]["world_size"] == 2 and res["num_images"] == 7
    _assert_report_matches(tmp_path / "ddp", _direct(path, "synthetic:7", {"1": 1, "5": 5}))


# ----------------------------------------------------------------------------------------------
# benchmarks/peers_compare.py
# ----------------------------------------------------------------------------------------------
def _peers_compare():
    return load_benchmark("peers_compare")


def test_peers_compare_reads_the_spec_and_refuses_mismatched_flags(trained_drs, pc_file, tmp_path):
    mod = _peers_compare()
    base = ["--dataset", "synthetic:4", "--num-images", "4", "--model", "cifar_bagnet5_s2", "--width", "8", "--patch-size", "3",
            "--methods", "drs", "patchcleanser", "--output", str(tmp_path / "c.json")]
    # no --band-size / --k flags: band, mode, encoding, k and fill come from the files
    assert mod.main(base + ["--drs-checkpoint", str(trained_drs), "--pc-checkpoint", str(pc_file)]) == 0
    out = json.loads((tmp_path / "c.json").read_text())["methods"]
    drs, pc = out["drs"], out["patchcleanser"]
    assert drs["name"] == "drs-column-b3" and drs["spec"] == "drs-column:3,encoding=mask" and not drs["random_init"]
    assert pc["name"] == "patchcleanser-k3" and pc["spec"] == "patchcleanser:5,k=3,masks=2,fill=0.5" and not pc["random_init"]
    assert pc["certified_with_patch_size"] == [5, 5] and pc["forward_passes_per_image"] == 45  # its own mask set, covering 3x3
    x, y = load_dataset("synthetic:4", "test").float_images(), load_dataset("synthetic:4", "test").labels
    for path, r, p in ((trained_drs, drs, 3), (pc_file, pc, 5)):
        cert, clf, _ = peers.load_peer_certifier(path)
        ref = cert.certify(clf, x, y, p)
        assert r["certified_count"] == int(ref.certified_correct.sum()) and r["correct_count"] == int(ref.correct.sum())
    # matching flags are accepted
    assert mod.main(base + ["--drs-checkpoint", str(trained_drs), "--band-size", "3", "--drs-mode", "column", "--drs-encoding", "mask",
                            "--pc-checkpoint", str(pc_file), "--k", "3", "--fill", "0.5"]) == 0
    # a flag that contradicts the stored spec is an error, not a silently different configuration
    for flags, match in [
        (["--drs-checkpoint", str(trained_drs), "--band-size", "4"], r"--band-size 4 \(the file records 3\)"),
        (["--drs-checkpoint", str(trained_drs), "--drs-mode", "block"], r"--drs-mode block \(the file records column\)"),
        (["--drs-checkpoint", str(trained_drs), "--drs-encoding", "fill"], r"--drs-encoding fill \(the file records mask\)"),
        (["--pc-checkpoint", str(pc_file), "--k", "6"], r"--k 6 \(the file records 3\)"),
        (["--pc-checkpoint", str(pc_file), "--fill", "0.0"], r"--fill 0.0 \(the file records 0.5\)"),
        (["--drs-checkpoint", str(pc_file)], "not de-randomized smoothing; give it as --pc-checkpoint"),
        (["--pc-checkpoint", str(trained_drs)], "not PatchCleanser; give it as --drs-checkpoint"),
        (["--pc-checkpoint", str(pc_file), "--patch-size", "6"], "certifies patches up to that size only, not --patch-size 6x6"),
    ]:
        with pytest.raises(SystemExit, match=match):
            mod.main(base + flags)


def test_peers_compare_keeps_bagcert_and_hand_saved_checkpoints(tiny_checkpoint, tmp_path):
    mod = _peers_compare()
    clf = peers.ablation_classifier("cifar_bagnet5_s2", 10, encoding="levine_feizi", width=8).eval()
    hand = peers.save_peer_classifier(tmp_path / "hand.pt", clf)  # no recorded spec: the flags configure the certifier
    argv = ["--dataset", "synthetic:3", "--num-images", "3", "--model", "cifar_bagnet5", "--width", "8", "--methods", "drs", "patchcleanser",
            "--drs-checkpoint", str(hand), "--drs-encoding", "levine_feizi", "--band-size", "2", "--pc-checkpoint", str(tiny_checkpoint),
            "--k", "2", "--output", str(tmp_path / "h.json")]
    assert mod.main(argv) == 0
    out = json.loads((tmp_path / "h.json").read_text())["methods"]
    assert out["drs"]["name"] == "drs-column-b2" and out["drs"]["spec"] is None
    assert out["patchcleanser"]["name"] == "patchcleanser-k2" and out["patchcleanser"]["forward_passes_per_image"] == 10
    with pytest.raises(SystemExit, match="reads 6 channels; --drs-encoding fill feeds 3"):
        mod.main(argv[:-2] + ["--drs-encoding", "fill"])
    with pytest.raises(SystemExit, match="is a bagcert model checkpoint; DRS needs a peer classifier"):
        mod.main(argv[:8] + ["--drs-checkpoint", str(tiny_checkpoint)])


def test_num_images_subset_and_split_are_handled_like_for_bagcert_models(pc_file, tmp_path, capsys):
    """--num-images picks the same seeded subset as for a bagcert model; the report certifies exactly those images."""
    rc, line = _run(["--checkpoint", str(pc_file), "--dataset", "synthetic:12", "--num-images", "5", "--seed", "3",
                     "--output", str(tmp_path / "s")], capsys)
    assert rc == 0 and line["num_images"] == 5
    data = load_dataset("synthetic:12", "test", seed=3)
    pick = torch.randperm(12, generator=torch.Generator().manual_seed(3))[:5].sort().values
    cert, clf, _ = peers.load_peer_certifier(pc_file)
    ref = cert.certify(clf, data.float_images(pick), data.labels[pick], 5)
    _assert_report_matches(tmp_path / "s", {"5": ref})
