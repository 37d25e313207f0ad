"""Training the base classifiers of the model-agnostic peers (train.py --peer): specs, transforms in the
training loop, exact resumption, data parallelism, and certification with the saved classifier."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import bagcert
import train as train_cli
from bagcert import peers
from bagcert.data import synthetic_dataset
from bagcert.training import TrainConfig, export_checkpoint, train
from conftest import ROOT, load_benchmark

QUIET = dict(log=lambda *a: None)


def _cfg(out, **kw):
    base = dict(dataset="synthetic", model="cifar_bagnet5_s2", model_kwargs={"width": 8}, epochs=3, batch_size=16, ema=0.9,
                loss="ce", output=str(out), tensorboard=False, progress=False, eval_every=1.0, checkpoint_minutes=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _data():
    return synthetic_dataset(64, seed=1), synthetic_dataset(16, seed=2)


def _state(path):
    clf, _ = peers.load_peer_classifier(path)
    return clf.state_dict()


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


class _Recorder:
    """Records every input a PooledClassifier sees in training mode (the batches of the training loop)."""

    def __init__(self, monkeypatch):
        self.inputs = []
        original = peers.PooledClassifier.forward

        def forward(module, x):
            if module.training:
                self.inputs.append(x.detach().clone())
            return original(module, x)

        monkeypatch.setattr(peers.PooledClassifier, "forward", forward)


# ----------------------------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------------------------
def test_peer_specs_parse_round_trip_and_build():
    drs = peers.parse_peer_spec("drs-column:4")
    assert (drs.method, drs.mode, drs.band_size, drs.encoding, drs.in_channels) == ("drs", "column", 4, "mask", 6)
    assert peers.parse_peer_spec("drs-block:12,encoding=levine_feizi").mode == "block"
    assert peers.parse_peer_spec("drs-column:3,encoding=fill,fill=0.25").in_channels == 3
    pc = peers.parse_peer_spec("patchcleanser:3x7,k=2x3,masks=1,fill=0")
    assert (pc.patch_size, pc.k, pc.num_masks, pc.fill, pc.in_channels) == ((3, 7), (2, 3), 1, 0.0, 3)
    default = peers.parse_peer_spec("patchcleanser:5")
    assert (default.k, default.num_masks, default.fill) == ((6, 6), 2, 0.5)
    for text in ["drs-column:4", "drs-block:2,encoding=fill,fill=0.1", "patchcleanser:5", "patchcleanser:3x7,k=2x3,masks=1,fill=0"]:
        spec = peers.parse_peer_spec(text)
        d = spec.to_dict()
        assert json.loads(json.dumps(d)) == d and peers.PeerSpec.from_dict(d) == spec and peers.parse_peer_spec(str(spec)) == spec
    cert = drs.certifier()
    assert isinstance(cert, peers.DerandomizedSmoothing) and cert.band_size == 4 and cert.encoding.encoding == "mask"
    cert = pc.certifier()
    assert isinstance(cert, peers.PatchCleanser) and cert.k == (2, 3) and cert.fill == 0.0
    clf = drs.build_classifier("cifar_bagnet5_s2", 4, width=8)
    assert isinstance(clf, peers.PooledClassifier) and clf.in_channels == 6


@pytest.mark.parametrize(
    "text, match",
    [
        ("drs:4", "unknown method 'drs'"),
        ("drs-column", "METHOD:ARG"),
        ("drs-column:0", "band size must be a positive int"),
        ("drs-column:four", "band size must be a positive int"),
        ("drs-block:4,encoding=rgb", "unknown encoding 'rgb'"),
        ("drs-column:4,fill=0.3", "fill applies only to encoding=fill"),
        ("patchcleanser:5,k=0", "k must be >= 1"),
        ("patchcleanser:5x", "patch size must be a positive int or HxW"),
        ("patchcleanser:5,masks=0", "masks must be a positive int"),
        ("patchcleanser:5,fill=2", r"fill must lie in \[0, 1\]"),
        ("patchcleanser:5,band=3", "unknown option 'band'"),
        ("patchcleanser:5,k=2,k=3", "given twice"),
        ("patchcleanser:5,k", "not key=value"),
    ],
)
def test_bad_peer_specs_give_clear_errors(text, match):
    with pytest.raises(ValueError, match=match):
        peers.parse_peer_spec(text)


def test_bad_peer_configs_are_refused_before_anything_is_written(tmp_path, tiny_checkpoint):
    data, held = _data()
    for kw, match in [
        (dict(peer="drs:4"), "unknown method"),
        (dict(peer="drs-column:4", loss="bagcert"), "trained with cross-entropy"),
        (dict(peer="drs-column:40"), "band size 40 is larger than the 32x32 image"),
        (dict(peer="patchcleanser:33"), "patch 33x33 is larger than the 32x32 image"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(_cfg(tmp_path / "bad", **kw), data, held, **QUIET)
        assert not (tmp_path / "bad").exists()
    # a bagcert checkpoint cannot start the 6-channel DRS classifier (it can start a PatchCleanser one: below)
    with pytest.raises(ValueError, match="3-channel input"):
        train(_cfg(tmp_path / "init", peer="drs-column:4", init_from=str(tiny_checkpoint), model="cifar_bagnet5", ema=0.0),
              data, held, **QUIET)


def test_cli_peer_defaults_to_ce_and_refuses_the_bagcert_loss(tmp_path, capsys):
    cfg = train_cli.resolve_config(train_cli.build_parser().parse_args(["--peer", "patchcleanser:5", "--output", str(tmp_path)]))
    assert cfg.peer == "patchcleanser:5" and cfg.loss == "ce"
    with pytest.raises(SystemExit, match="--loss bagcert .* does not apply; give --loss ce"):
        train_cli.main(["--peer", "drs-column:4", "--loss", "bagcert", "--output", str(tmp_path / "x")])
    conf = tmp_path / "bagcert_run.json"
    conf.write_text(json.dumps({"loss": "bagcert", "epochs": 1}))
    with pytest.raises(SystemExit, match="from the command line or the config file"):
        train_cli.main(["--config", str(conf), "--peer", "drs-column:4", "--output", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="--peer: peer spec 'patchcleanser:5,k=0'"):
        train_cli.main(["--peer", "patchcleanser:5,k=0", "--output", str(tmp_path / "z")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ----------------------------------------------------------------------------------------------
# the transforms under data parallelism: drawn for the global batch, each rank takes its rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["drs-column:3", "drs-block:5,encoding=levine_feizi", "patchcleanser:5,k=3,masks=2"])
def test_transform_rows_of_the_global_batch_match_one_process(text):
    spec = peers.parse_peer_spec(text)
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = spec.transform(x, torch.Generator().manual_seed(3))
    # without rows the batch is its own global batch: the same draws as before the rows argument existed
    same = spec.transform(x, torch.Generator().manual_seed(3), rows=torch.arange(12), global_size=12)
    assert torch.equal(whole, same)
    for world in (2, 3, 4):
        for rank in range(world):
            rows = torch.arange(rank, 12, world)
            part = spec.transform(x[rows], torch.Generator().manual_seed(3), rows=rows, global_size=12)
            assert torch.equal(part, whole[rows])
    with pytest.raises(ValueError, match="rows must lie in"):
        spec.transform(x[:2], torch.Generator(), rows=torch.tensor([0, 12]), global_size=12)
    with pytest.raises(ValueError, match="one global row per image"):
        spec.transform(x[:2], torch.Generator(), rows=torch.tensor([0]), global_size=12)


# ----------------------------------------------------------------------------------------------
# the training loop applies the transform
# ----------------------------------------------------------------------------------------------
def test_drs_training_batches_are_ablated_and_encoded(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    data, held = _data()
    train(_cfg(tmp_path / "r", peer="drs-column:3", epochs=1, ema=0.0, channels_last=False), data, held, **QUIET)
    assert len(rec.inputs) == 4  # 64 images / 16 per batch, one forward pass per step
    for x in rec.inputs:
        assert x.shape == (16, 6, 32, 32)
        keep = x[:, 3:]
        assert bool(((keep == 0) | (keep == 1)).all()) and bool((keep == keep[:, :1]).all())
        assert bool((x[:, :3][keep == 0] == 0).all())  # ablated pixels carry nothing of the image
        cols = keep[:, 0].amax(dim=1)  # [B, W]: kept columns
        assert bool((keep[:, 0] == cols[:, None, :]).all())  # whole columns are kept
        for c in cols:
            kept = c.nonzero().flatten().tolist()
            assert len(kept) == 3 and any(sorted((s + t) % 32 for t in range(3)) == kept for s in range(32))  # one wrapped band
        assert bool((x[:, :3][keep == 1] > 0).any())  # the band shows the image
    # different batches get different bands
    starts = {tuple(x[:, 3, 0].argmax(dim=1).tolist()) for x in rec.inputs}
    assert len(starts) == 4


def test_patchcleanser_training_batches_are_masked_from_the_mask_set(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    data, held = _data()
    fill = 0.123  # no pixel of a uint8 image / 255 equals it, so "== fill" marks exactly the masked pixels
    train(_cfg(tmp_path / "r", peer=f"patchcleanser:5,k=3,masks=1,fill={fill}", epochs=1, ema=0.0, channels_last=False),
          data, held, **QUIET)
    masks = peers.MaskSet.for_patch((32, 32), 5, 3).masks()
    assert len(rec.inputs) == 4
    used = set()
    for x in rec.inputs:
        assert x.shape == (16, 3, 32, 32)
        masked = (x == fill).all(dim=1)  # [B, H, W]
        assert bool(((x == fill).any(dim=1) == masked).all())
        for m in masked:
            hits = [i for i in range(len(masks)) if torch.equal(m, masks[i])]
            assert len(hits) == 1  # exactly one mask of the certification set
            used.add(hits[0])
    assert len(used) > 3


# ----------------------------------------------------------------------------------------------
# end to end: train, save, load, certify
# ----------------------------------------------------------------------------------------------
def test_drs_run_gives_a_peer_classifier_that_certifies(tmp_path):
    data, held = _data()
    out = tmp_path / "drs"
    summary = train(_cfg(out, peer="drs-column:3", epochs=2), data, held, **QUIET)
    assert summary["peer_classifier"] == str(out / "peer_classifier.pt") and not (out / "model.pt").exists()
    assert set(summary["eval"]) == {"n", "ablated_accuracy"} and summary["eval"]["n"] == 16
    evals = [r["eval"] for r in _log(out) if "eval" in r]
    assert len(evals) == 2 and all(0.0 <= e["ablated_accuracy"] <= 1.0 for e in evals)
    cert, clf, meta = peers.load_peer_certifier(out / "peer_classifier.pt")
    assert isinstance(cert, peers.DerandomizedSmoothing) and (cert.band_size, cert.mode) == (3, "column")
    assert clf.in_channels == 6 and not clf.training
    assert meta["peer"]["spec"] == "drs-column:3,encoding=mask" and meta["config"]["peer"] == "drs-column:3"
    assert meta["trained_steps"] == 8 and meta["input_size"] == 32 and len(meta["classes"]) == 10
    # the EMA weights of the run are what was saved
    last = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.equal(v, last["ema"][k]) for k, v in clf.state_dict().items())
    x, y = held.float_images(torch.arange(3)), held.labels[:3]
    res = cert.certify(clf, x, y, patch_size=2)
    ref = peers.DerandomizedSmoothing(3).certify(clf, x, y, patch_size=2)
    assert res.prediction.shape == (3,) and torch.equal(res.prediction, ref.prediction) and torch.equal(res.margin, ref.margin)
    # benchmarks/peers_compare.py takes it as --drs-checkpoint
    mod = load_benchmark("peers_compare")
    argv = ["--dataset", "synthetic:4", "--num-images", "2", "--model", "cifar_bagnet5_s2", "--width", "8", "--methods", "drs",
            "--drs-checkpoint", str(out / "peer_classifier.pt"), "--band-size", "3", "--patch-size", "2", "--output", str(tmp_path / "c.json")]
    assert mod.main(argv) == 0
    r = json.loads((tmp_path / "c.json").read_text())["methods"]["drs"]
    assert not r["random_init"] and r["forward_passes_per_image"] == 32


def test_patchcleanser_run_through_the_cli_gives_a_peer_classifier_that_certifies(tmp_path):
    out = tmp_path / "pc"
    argv = ["--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2", "--model-kwargs", '{"width": 8}', "--epochs", "1",
            "--batch-size", "16", "--peer", "patchcleanser:5,k=2", "--eval-images", "16", "--no-progress", "--no-tensorboard",
            "--output", str(out)]
    assert train_cli.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["peer"] == "patchcleanser:5,k=2" and config["loss"] == "ce"
    assert not (out / "model.pt").exists()
    ev = [r["eval"] for r in _log(out) if "eval" in r][-1]
    assert set(ev) == {"n", "masked_accuracy", "clean_accuracy"} and ev["n"] == 16
    cert, clf, meta = peers.load_peer_certifier(out / "peer_classifier.pt")
    assert isinstance(cert, peers.PatchCleanser) and cert.k == (2, 2) and cert.fill == 0.5 and clf.in_channels == 3
    patch = tuple(meta["peer"]["patch_size"])
    assert patch == (5, 5) and meta["peer"]["num_masks"] == 2
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = cert.certify(clf, x, torch.tensor([0, 1]), patch_size=patch)
    assert res.prediction.shape == (2,) and cert.last_forward_passes == 2 * 10  # M = 4 masks: 4 * 5 / 2 pairs
    assert torch.equal(cert.predict(clf, x, patch_size=patch), res.prediction)
    # --config replays the run (loss ce recorded, so no conflict with --peer)
    assert train_cli.resolve_config(train_cli.build_parser().parse_args(["--config", str(out / "config.json")])).peer == "patchcleanser:5,k=2"


@pytest.mark.parametrize("text", ["drs-column:4", "patchcleanser:5,k=3"])
def test_resume_gives_identical_peer_weights(tmp_path, text):
    data, held = _data()
    train(_cfg(tmp_path / "full", peer=text), data, held, **QUIET)
    first = train(_cfg(tmp_path / "cut", peer=text, max_steps=5), data, held, **QUIET)
    assert first["steps"] == 5 and (tmp_path / "cut" / "last.pt").is_file()
    second = train(_cfg(tmp_path / "cut", peer=text), data, held, resume=True, **QUIET)
    assert second["steps"] == 12
    a, b = _state(tmp_path / "full" / "peer_classifier.pt"), _state(tmp_path / "cut" / "peer_classifier.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev_full = [r["eval"] for r in _log(tmp_path / "full") if "eval" in r]
    ev_cut = [r["eval"] for r in _log(tmp_path / "cut") if "eval" in r]
    assert ev_full[-1] == ev_cut[-1]  # same weights, same seeded eval transform: the same numbers


def test_export_and_init_from_for_peer_runs(tmp_path, tiny_checkpoint):
    data, held = _data()
    train(_cfg(tmp_path / "a", peer="drs-column:4", epochs=1, max_steps=2), data, held, **QUIET)
    path = export_checkpoint(tmp_path / "a", tmp_path / "export.pt")
    cert, clf, meta = peers.load_peer_certifier(path)
    assert meta["intermediate_export"] and meta["trained_steps"] == 2 and meta["weights"] == "ema" and cert.band_size == 4
    # warm start from a peer classifier of the same spec: zero steps keep its weights exactly
    train(_cfg(tmp_path / "b", peer="drs-column:4", epochs=1, max_steps=0, ema=0.0, init_from=str(path)), data, held, **QUIET)
    a, b = clf.state_dict(), _state(tmp_path / "b" / "peer_classifier.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # PatchCleanser's 3-channel classifier can start from a bagcert model of the same backbone
    train(_cfg(tmp_path / "c", peer="patchcleanser:5,k=2", model="cifar_bagnet5", epochs=1, max_steps=0, ema=0.0,
               init_from=str(tiny_checkpoint)), data, held, **QUIET)
    src, _ = bagcert.load_checkpoint(tiny_checkpoint)
    pc, meta = peers.load_peer_classifier(tmp_path / "c" / "peer_classifier.pt")
    assert all(torch.equal(v, pc.backbone.state_dict()[k]) for k, v in src.state_dict().items())
    assert meta["init_from"]["path"] == str(tiny_checkpoint)
    with pytest.raises(ValueError, match="differs from the configured"):
        train(_cfg(tmp_path / "d", peer="drs-column:4", model_kwargs={"width": 16}, init_from=str(path)), data, held, **QUIET)


# ----------------------------------------------------------------------------------------------
# two processes equal one
# ----------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_peer_training_matches_single_process(tmp_path):
    common = [str(ROOT / "train.py"), "--dataset", "synthetic:64", "--model", "cifar_bagnet5_s2", "--model-kwargs",
              '{"width": 8, "norm": "gn"}', "--epochs", "2", "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.05",
              "--eval-images", "32", "--peer", "drs-column:3", "--no-amp", "--ema", "0", "--no-progress", "--no-tensorboard",
              "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(_free_port())] + common + ["--output", str(tmp_path / "ddp")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable] + common + ["--output", str(tmp_path / "one")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = _state(tmp_path / "ddp" / "peer_classifier.pt"), _state(tmp_path / "one" / "peer_classifier.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    _, meta = peers.load_peer_classifier(tmp_path / "ddp" / "peer_classifier.pt")
    assert meta["world_size"] == 2
    ev2 = [r["eval"] for r in _log(tmp_path / "ddp") if "eval" in r][-1]
    ev1 = [r["eval"] for r in _log(tmp_path / "one") if "eval" in r][-1]
    assert ev2["n"] == ev1["n"] == 32 and ev2["ablated_accuracy"] == ev1["ablated_accuracy"]
