"""The inference-optimised evaluation used by certification (bagcert.inference): the same logits as the trained
module (batch norm folded, dense models in space-to-batch form), per-image results independent of the batch, and
the opt-in bf16 precision."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import bagcert
from bagcert.certification import certify_logits
from bagcert.data import load_cifar10
from bagcert.inference import InferenceModel, chunk_size, evaluate_local_logits, inference_copy
from bagcert.models import CifarBagNet
from conftest import ROOT, SHARED

DENSE_CKPT = ROOT / "checkpoints" / "bagcert_cifar10_r5s2_dense.pt"
SAMPLES = ROOT / "samples" / "cifar10"
# the shared CIFAR-10 folder beside the checkout (or beside the folder of worktrees)
CIFAR = next((p for p in (SHARED / "cifar10", ROOT.parent.parent / "shared" / "data" / "cifar10") if (p / "test").is_dir()),
             SHARED / "cifar10")
SIZES = [1, 2, 3, 4, 5, 6, 7, 8, (3, 7), (7, 3), (2, 8), (8, 2)]
# a vote may flip between two float32 evaluations only where the logit is this close to the threshold 0
NEAR_ZERO = 1e-5

CONFIGS = [  # receptive field, stride, padding, norm, image size, dense
    (5, 2, "same", "bn", 32, True),
    (9, 2, "valid", "bn", 32, True),
    (13, 2, "same", "skipinit", 32, True),
    (9, 2, "valid", "nf", 32, True),
    (17, 4, "valid", "bn", 40, True),
    (33, 8, "same", "bn", 64, True),
    (9, 2, "same", "gn", 32, True),
    (9, 2, "same", "none", 30, True),
    (9, 2, "same", "bn", 31, True),  # 31 px: not a multiple of the dilation, the dilated form is used
    (9, 2, "same", "bn", 32, False),
    (7, 1, "same", "bn", 32, False),
]


def _random_model(rf, stride, padding, norm, dense, width=16):
    torch.manual_seed(0)
    m = CifarBagNet(receptive_field=rf, stride=stride, padding=padding, width=width, norm=norm, dense=dense).eval()
    with torch.no_grad():
        for p in m.parameters():  # away from the identity start, so every layer matters
            p.normal_(0, 0.3)
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("rf,stride,padding,norm,size,dense", CONFIGS)
def test_fused_copy_gives_the_modules_logits(rf, stride, padding, norm, size, dense):
    m = _random_model(rf, stride, padding, norm, dense)
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m.local_logits(x)
    fast = inference_copy(m)
    assert isinstance(fast, InferenceModel)
    z = fast.local_logits(x)
    assert z.shape == ref.shape and z.dtype == torch.float32
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # no batch norm is left in the copy; the dense model's dilated convolutions are gone where the size allows
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fast.modules())
    if dense and norm != "gn" and size % stride == 0 and rf > 5:
        assert fast.net.splits and all(c.dilation == (1, 1) for c in fast.net.phase.modules() if isinstance(c, torch.nn.Conv2d))


def test_dense_space_to_batch_is_exact_at_the_borders():
    """Without batch norm the folded weights are the module's own, so the only difference to the dilated model
    is the formulation: the sub-grid convolutions agree with the a trous ones to float32 rounding everywhere,
    including the border locations whose windows reach into the 'same' padding."""
    m = _random_model(9, 2, "same", "none", True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m.local_logits(x)
    fast = inference_copy(m)
    assert fast.net.splits == [2]
    z = fast.local_logits(x)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[4:-4, 4:-4] = False
    tol = 1e-6 * float(ref.abs().max())  # float32 rounding; a padding mistake would move border logits by O(1)
    torch.testing.assert_close(z[..., border], ref[..., border], rtol=1e-5, atol=tol)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=tol)
    with torch.no_grad():
        dilated = fast.net.dilated(((x - m.mean) / m.std).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(z, dilated, rtol=1e-5, atol=tol)


def test_bagnet_fused_copy_gives_the_modules_logits():
    torch.manual_seed(0)
    m = bagcert.create_model("bagnet17_w025", num_classes=10).eval()
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m.local_logits(x)
    z = inference_copy(m).local_logits(x)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_the_trained_module_and_its_state_dict_are_unchanged_and_the_copy_follows_new_weights():
    m = _random_model(9, 2, "same", "bn", True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fast = inference_copy(m)
    assert inference_copy(m) is fast  # cached while the weights are unchanged
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    other = _random_model(9, 2, "same", "bn", True)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    m.load_state_dict(other.state_dict())
    x = torch.rand(2, 3, 32, 32)
    refreshed = inference_copy(m)
    assert refreshed is not fast
    with torch.no_grad():
        torch.testing.assert_close(refreshed.local_logits(x), other.local_logits(x), rtol=1e-5, atol=1e-5)
    m.train()
    with pytest.raises(RuntimeError, match="training mode"):
        inference_copy(m)


def test_an_images_logits_are_the_same_bits_in_any_chunk_and_any_batch():
    m, _ = bagcert.load_checkpoint(DENSE_CKPT)
    c = chunk_size(m, (32, 32))
    x = torch.rand(3 * c, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    fast = inference_copy(m)
    whole = fast.local_logits(x[:c])
    for perm_seed in range(3):
        idx = torch.randperm(3 * c, generator=torch.Generator().manual_seed(perm_seed))[:c]
        idx[perm_seed] = 0
        assert torch.equal(fast.local_logits(x[idx])[perm_seed], whole[0])  # same shape, another position and company
    assert torch.equal(evaluate_local_logits(m, x[:1]), whole[:1])
    assert torch.equal(evaluate_local_logits(m, x[: c + 3])[:c], whole)


def _results_equal(a, b):
    for k in a:
        for f in ("prediction", "label", "correct", "certified", "margin", "worst_position"):
            assert torch.equal(getattr(a[k], f), getattr(b[k], f)), (k, f)


def _rows(results, n):
    return {k: bagcert.CertResult(*(getattr(r, f)[:n] for f in ("prediction", "label", "correct", "certified", "margin",
                                                                "worst_position")), r.patch_size, r.aggregation)
            for k, r in results.items()}


def test_certify_results_do_not_depend_on_the_batch_size():
    """The 200 sample images certified at batch sizes 7 and 200 and with the default batch, the first 8 one by one
    (logits: the first 70 in batches of 7, the first 8 one by one): identical logits and CertResults. A narrow dense
    model with dilated layers and batch norm keeps the test fast; the shipped model's rows are checked by the test
    above and, on the full test set, by the slow test below."""
    m = _random_model(9, 2, "same", "bn", True, width=8)
    data = load_cifar10(SAMPLES, "test")
    x, y = data.images.float() / 255, data.labels
    logits = {200: evaluate_local_logits(m, x), 7: torch.cat([evaluate_local_logits(m, x[i : i + 7]) for i in range(0, 70, 7)])}
    assert torch.equal(logits[7], logits[200][:70])
    assert torch.equal(torch.cat([evaluate_local_logits(m, x[i : i + 1]) for i in range(8)]), logits[200][:8])
    by_bs = {bs: bagcert.certify(m, x, y, patch_sizes=[1, 5, (3, 7)], batch_size=bs) for bs in (7, 200, None)}
    for bs in (7, None):
        _results_equal(by_bs[bs], by_bs[200])
    _results_equal(by_bs[200], certify_logits(logits[200], y, m.geometry, (32, 32), patch_sizes=[1, 5, (3, 7)]))
    _results_equal(bagcert.certify(m, x[:8], y[:8], patch_sizes=[1, 5, (3, 7)], batch_size=1), _rows(by_bs[200], 8))


def _reference_logits(model, x, bs=250):
    """The logits as certification computed them before bagcert.inference: the module itself, batches of 250."""
    with torch.no_grad():
        return torch.cat([model.local_logits(x[i : i + bs]) for i in range(0, len(x), bs)])


def _compare_to_reference(model, data):
    """Certify with the fused evaluation and with the module itself; every image whose prediction or certificate
    differs must owe it to a vote that flipped at a logit within NEAR_ZERO of the threshold 0. Returns the list of
    those images (printed with their logits)."""
    x, y = data.images.float() / 255, data.labels
    ref = _reference_logits(model, x)
    new = evaluate_local_logits(model, x)
    assert float((ref - new).abs().max()) < 1e-4
    a = certify_logits(ref, y, model.geometry, (32, 32), patch_sizes=SIZES)
    b = certify_logits(new, y, model.geometry, (32, 32), patch_sizes=SIZES)
    changed = torch.zeros(len(y), dtype=torch.bool)
    for k in a:
        changed |= (a[k].prediction != b[k].prediction) | (a[k].certified != b[k].certified) | (a[k].margin != b[k].margin)
    flip = (ref > 0) != (new > 0)
    flipped_images = flip.flatten(1).any(dim=1)
    assert not (changed & ~flipped_images).any()  # the certificate is a function of the votes
    explained = []
    for i in flipped_images.nonzero().flatten().tolist():
        worst = float(torch.maximum(ref[i].abs(), new[i].abs())[flip[i]].max())
        assert worst <= NEAR_ZERO, f"image {i}: a vote flipped at a logit of {worst:.3g}"
        if changed[i]:
            explained.append((i, worst))
            print(f"image {i}: result changed by a vote flip at |logit| <= {worst:.3g}")
    return explained


def test_samples_certify_as_the_module_does():
    m, _ = bagcert.load_checkpoint(DENSE_CKPT)
    _compare_to_reference(m, load_cifar10(SAMPLES, "test"))


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR / "test").is_dir(), reason="CIFAR-10 test set not available")
def test_full_test_set_certifies_as_the_module_does():
    m, _ = bagcert.load_checkpoint(DENSE_CKPT)
    explained = _compare_to_reference(m, load_cifar10(CIFAR, "test"))
    assert len(explained) <= 10  # a handful at most, each listed above


def _rows_by_dataset_index(folder):
    """per_sample.csv as {dataset_index: the row without its position in the run}."""
    import csv

    with open(folder / "per_sample.csv") as f:
        rows = list(csv.DictReader(f))
    return {r["dataset_index"]: {k: v for k, v in r.items() if k != "index"} for r in rows}


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR / "test").is_dir(), reason="CIFAR-10 test set not available")
def test_full_test_set_results_do_not_depend_on_batch_size_or_processes(tmp_path):
    """``bagcert certify`` on the full test set at --batch-size 7 and 500 and with two torchrun processes (gloo,
    the stream path, --batch-size 7), and 300 of its images one by one (--batch-size 1, each image its own padded
    chunk): every image's row of per_sample.csv is the same."""
    common = [str(ROOT / "certify.py"), "--checkpoint", str(DENSE_CKPT), "--dataset", str(CIFAR), "--patch-sizes", "1,3,5,8,3x7",
              "--no-progress", "--quiet", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs = {}
    for bs, extra in ((7, []), (500, []), (1, ["--num-images", "300"])):
        out = tmp_path / f"bs{bs}"
        r = subprocess.run([sys.executable] + common + ["--batch-size", str(bs), "--output", str(out)] + extra, cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[bs] = out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(port)] + common + ["--batch-size", "7", "--data-path", "stream", "--output",
                                                                  str(tmp_path / "ddp")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs["ddp"] = tmp_path / "ddp"
    rows = {k: _rows_by_dataset_index(v) for k, v in runs.items()}
    assert len(rows[500]) == 10000 and len(rows[1]) == 300
    assert rows[7] == rows[500] == rows["ddp"]
    assert all(rows[1][i] == rows[500][i] for i in rows[1])
    assert json.loads((runs["ddp"] / "results.json").read_text())["config"]["world_size"] == 2


def test_bf16_precision_certifies_the_bf16_evaluated_model():
    m, _ = bagcert.load_checkpoint(DENSE_CKPT)
    data = load_cifar10(SAMPLES, "test")
    x, y = data.images[:16].float() / 255, data.labels[:16]
    z16 = evaluate_local_logits(m, x, precision="bf16")
    z32 = evaluate_local_logits(m, x)
    assert z16.dtype == torch.float32 and not torch.equal(z16, z32)
    assert float((z16 - z32).abs().max()) < 0.1 * float(z32.abs().max())  # the same model, evaluated in bf16
    r = bagcert.certify(m, x, y, patch_sizes=[3, 5], precision="bf16", batch_size=7)
    expect = certify_logits(z16, y, m.geometry, (32, 32), patch_sizes=[3, 5])
    _results_equal(r, expect)
    _results_equal(r, bagcert.certify(m, x, y, patch_sizes=[3, 5], precision="bf16"))
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        bagcert.certify(m, x, y, patch_size=5, precision="fp16")


def test_cli_records_the_precision(tiny_checkpoint, tmp_path):
    from bagcert.cli import certify as cli_certify

    args = ["--checkpoint", str(tiny_checkpoint), "--dataset", "synthetic:12", "--patch-sizes", "3", "--no-progress", "--quiet",
            "--threads", "1", "--batch-size", "5"]
    assert cli_certify.main(args + ["--precision", "bf16", "--output", str(tmp_path / "bf16")]) == 0
    r16 = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert r16["config"]["precision"] == "bf16"
    assert "- precision: bf16" in (tmp_path / "bf16" / "summary.md").read_text()
    assert cli_certify.build_parser().parse_args([]).precision == "fp32"  # the default, recorded the same way
    with pytest.raises(SystemExit) as e:
        cli_certify.main(args + ["--precision", "fp16", "--output", str(tmp_path / "bad")])
    assert e.value.code == 2


def test_certify_without_batch_size_for_a_wrapped_module_that_does_not_name_its_classes():
    """A wrapped module (num_classes unknown) is chunked by default like a registry model, same results as one batch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    model = bagcert.wrap_model(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert getattr(model, "num_classes", None) is None
    x, y = torch.rand(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    a = bagcert.certify(model, x, y, patch_size=3)
    b = bagcert.certify(model, x, y, patch_size=3, batch_size=5)
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.margin, b.margin)
