"""The shipped model's own default certificate (bagcert/shipped.json "certifier"): ``bagcert certify`` uses it when
no certificate flag is given, ``--certifier votes`` gives the vote count, and the flags that need the vote count or
name another certificate keep working."""

import csv
import json

import pytest

import bagcert
from bagcert import shipped
from bagcert.cli import certify
from bagcert.data import load_dataset
from bagcert.peers import LocalDoubleMasking

DEFAULT = shipped.DEFAULT_MODEL


def _run(argv, capsys):
    rc = certify.main(argv + ["--no-progress", "--quiet", "--threads", "1"])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_the_dense_models_name_double_masking_of_clipped_logits_and_the_others_none():
    spec = shipped.shipped_certifier(DEFAULT)
    assert spec == {"kind": "double-masking", "evidence": "logits", "clip": [-1, 1]}
    models = shipped.shipped_models()
    assert models[DEFAULT].certifier == spec
    # the two dense CIFAR-10 models carry it (the default, and v2's weights at every pixel); the others none
    assert models["bagcert-cifar10-r5-dense"].certifier == spec
    with_spec = {n for n, m in models.items() if m.certifier is not None}
    assert with_spec == {DEFAULT, "bagcert-cifar10-r5-dense"}
    assert all(shipped.shipped_certifier(n) is None for n in models if n not in with_spec)
    assert shipped.shipped_certifier("no-such-model") is None


def test_default_certify_uses_the_shipped_certificate_at_the_card_patch(tmp_path, capsys):
    out = tmp_path / "r"
    rc, line, err = _run(["--num-images", "8", "--output", str(out)], capsys)  # the bundled samples
    assert rc == 0 and line["method"] == "double-masking-logits" and list(line["certified_accuracy"]) == ["5"]
    assert "--certifier votes" in err
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["shipped_certifier"] == shipped.shipped_certifier(DEFAULT) and cfg["certifier"] is None
    assert (cfg["double_masking"], cfg["double_masking_evidence"], cfg["double_masking_clip"]) == (True, "logits", [-1.0, 1.0])
    model, _ = bagcert.load_checkpoint(DEFAULT)
    data = load_dataset(str(shipped.samples_path("cifar10")), "test")
    with open(out / "per_sample.csv") as f:
        rows = list(csv.DictReader(f))
    idx = [int(r["dataset_index"]) for r in rows]
    x, y = data.images[idx].float() / 255, data.labels[idx]
    direct = LocalDoubleMasking("logits", clip=(-1, 1)).certify(model, x, y, 5)
    assert [int(r["prediction"]) for r in rows] == direct.prediction.tolist()
    assert [int(r["certified_5"]) for r in rows] == direct.certified.int().tolist()


def test_given_patch_sizes_are_kept(tmp_path, capsys):
    rc, line, _ = _run(["--dataset", "synthetic:4", "--patch-sizes", "3", "--output", str(tmp_path / "r")], capsys)
    assert rc == 0 and line["method"] == "double-masking-logits" and list(line["certified_accuracy"]) == ["3"]


@pytest.mark.parametrize("extra", [["--certifier", "votes"], ["--aggregation", "votes"], ["--precision", "bf16"], []])
def test_certifier_votes_and_vote_count_flags_give_the_vote_count(tmp_path, capsys, extra):
    """--certifier votes, a flag of the vote count, or several patch sizes (one double-masking run shares one mask set
    among them; the vote count certifies each size on its own)."""
    out = tmp_path / "r"
    rc, line, err = _run(["--checkpoint", DEFAULT, "--dataset", "synthetic:4", "--patch-sizes", "2,5", "--output", str(out)]
                         + extra, capsys)
    assert rc == 0 and line["method"] == "bagcert" and set(line["certified_accuracy"]) == {"2", "5"}
    assert "certificate: the vote count" in err
    assert "shipped_certifier" not in json.loads((out / "results.json").read_text())["config"]


def test_other_models_keep_the_vote_count_and_explicit_double_masking_its_flags(tmp_path, capsys):
    rc, line, _ = _run(["--checkpoint", "bagcert-cifar10-r9", "--dataset", "synthetic:4", "--patch-sizes", "5",
                        "--output", str(tmp_path / "a")], capsys)
    assert rc == 0 and line["method"] == "bagcert"
    rc, line, _ = _run(["--dataset", "synthetic:4", "--patch-sizes", "5", "--double-masking", "--output", str(tmp_path / "b")],
                       capsys)
    assert rc == 0 and line["method"] == "double-masking-votes"


@pytest.mark.parametrize("extra, message", [
    (["--certifier", "votes", "--double-masking"], "--certifier votes cannot be combined with --double-masking"),
    (["--certifier", "shipped", "--robust-masking"], "--certifier shipped cannot be combined with --robust-masking"),
    (["--certifier", "shipped", "--attacks", "pgd"], "--certifier shipped cannot be combined with --attacks"),
    (["--certifier", "shipped", "--checkpoint", "bagcert-cifar10-r9"], "--certifier shipped: bagcert-cifar10-r9 has no"),
    (["--certifier", "shipped", "--precision", "bf16"], "--certifier shipped cannot be combined with --precision bf16"),
])
def test_certifier_refusals_are_one_line(tmp_path, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        certify.main(["--dataset", "synthetic:4", "--patch-sizes", "5", "--output", str(out), "--no-progress"] + extra)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith(message), e.value.code
    assert not out.exists()


def test_certifier_shipped_with_several_sizes_shares_one_mask_set(tmp_path, capsys):
    rc, line, _ = _run(["--dataset", "synthetic:4", "--patch-sizes", "2,3", "--certifier", "shipped",
                        "--output", str(tmp_path / "r")], capsys)
    assert rc == 0 and line["method"] == "double-masking-logits"
    assert line["certified_accuracy"]["2"] == line["certified_accuracy"]["3"]


def test_certifier_is_refused_for_a_peer_classifier(tmp_path):
    from bagcert import peers

    spec = peers.parse_peer_spec("drs-column:3")
    clf = spec.build_classifier("cifar_bagnet5_s2", 10, width=8).eval()
    path = tmp_path / "peer.pt"
    peers.save_peer_classifier(path, clf, peer=spec.to_dict(), input_size=32, classes=[str(i) for i in range(10)])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        certify.main(["--checkpoint", str(path), "--dataset", "synthetic:4", "--certifier", "votes", "--output", str(out),
                      "--no-progress"])
    assert str(e.value.code).startswith("--certifier applies to bagcert models only") and not out.exists()
