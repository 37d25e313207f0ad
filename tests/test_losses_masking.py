"""The double-masking training loss (bagcert.losses_masking): its worst case against brute force and the certifier."""

import json

import pytest
import torch

import bagcert
from bagcert.geometry import Geometry
from bagcert.losses_masking import DoubleMaskingLoss, masked_worst_case
from bagcert.peers.local_masking import LocalDoubleMasking, feature_mask_set
from bagcert.training import TrainConfig
from conftest import ROOT

TINY = Geometry(receptive_field=3, stride=1, padding=1, layers=((3, 1, 1),))  # 10x10 images -> 10x10 map


def _logits(n, c, h, w, seed, bias=1.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    bias = torch.as_tensor(bias, dtype=dtype).expand(n)[:, None, None, None]  # one value, or one per sample
    z = torch.randn(n, c, h, w, generator=g, dtype=dtype) + bias * torch.nn.functional.one_hot(y, c).to(dtype)[:, :, None, None]
    return z, y


def _brute(u, y, ms, tie_adjust):
    """min over every mask pair (m1, m2) and c != y of count_y - count_c (+ [c > y]), from explicit keep masks."""
    masks = ms.masks().to(u.dtype)  # [M, h, w]
    keep = 1 - torch.maximum(masks[:, None], masks[None, :])  # [M, M, h, w]
    counts = torch.einsum("bchw,ijhw->bijc", u, keep)  # [B, M, M, C]
    B, C = u.shape[:2]
    D = counts.gather(3, y.view(B, 1, 1, 1).expand(*counts.shape[:3], 1)) - counts
    if tie_adjust:
        D = D + (torch.arange(C)[None, :] > y[:, None]).to(u.dtype)[:, None, None, :]
    D = D.masked_fill((torch.arange(C)[None, :] == y[:, None])[:, None, None, :], float("inf"))
    return D.amin(dim=3).flatten(1).amin(dim=1), counts


@pytest.mark.parametrize("evidence", ["logits", "votes"])
def test_all_pairs_is_the_brute_force_worst_case_and_greedy_an_upper_bound(evidence):
    ms = feature_mask_set(TINY, (10, 10), 1)  # 3x3 masks, 64 of them
    assert ms.num_masks == 64
    z, y = _logits(12, 4, 10, 10, seed=0, bias=0.8)
    u = z.clamp(-1, 1) if evidence == "logits" else (z > 0).to(z.dtype)
    votes = evidence == "votes"
    exact, counts_all_pairs = _brute(u, y, ms, votes)
    c_all, m_all, a1, a2 = masked_worst_case(u, y, ms, "all", tie_adjust=votes)
    torch.testing.assert_close(m_all, exact, rtol=0, atol=1e-9)
    # the counts returned are those of the chosen pair
    torch.testing.assert_close(c_all, counts_all_pairs[torch.arange(12), a1, a2], rtol=0, atol=1e-9)
    c_g, m_g, g1, g2 = masked_worst_case(u, y, ms, "greedy", tie_adjust=votes)
    torch.testing.assert_close(c_g, counts_all_pairs[torch.arange(12), g1, g2], rtol=0, atol=1e-9)
    assert (m_g >= exact - 1e-9).all()
    single = _brute_single(u, y, ms, votes)
    assert (m_g <= single + 1e-9).all()  # greedy's pair includes the worst single mask's m1


def _brute_single(u, y, ms, tie_adjust):
    masks = ms.masks().to(u.dtype)
    counts = torch.einsum("bchw,ihw->bic", u, 1 - masks)
    B, C = u.shape[:2]
    D = counts.gather(2, y.view(B, 1, 1).expand(B, counts.shape[1], 1)) - counts
    if tie_adjust:
        D = D + (torch.arange(C)[None, :] > y[:, None]).to(u.dtype)[:, None, :]
    D = D.masked_fill((torch.arange(C)[None, :] == y[:, None])[:, None, :], float("inf"))
    return D.amin(dim=2).amin(dim=1)


def test_greedy_misses_some_pairs_on_random_maps():
    # the greedy pair is a real upper bound, not the worst case: on enough random maps it is strictly above it
    ms = feature_mask_set(TINY, (10, 10), 1)
    z, y = _logits(64, 4, 10, 10, seed=3, bias=0.8)
    u = z.clamp(-1, 1)
    _, m_all, _, _ = masked_worst_case(u, y, ms, "all")
    _, m_g, _, _ = masked_worst_case(u, y, ms, "greedy")
    assert (m_g >= m_all - 1e-9).all() and (m_g > m_all + 1e-6).any()


@pytest.mark.parametrize("evidence", ["logits", "votes"])
def test_all_pairs_margin_is_the_certifiers_margin(evidence):
    # the recipe's geometry: 32 px images -> 16x16 map, 144 masks of 5x5 locations for 5x5 patches
    geometry = bagcert.create_model("cifar_bagnet5_s2", num_classes=10, width=8).geometry
    z, y = _logits(24, 10, 16, 16, seed=1, bias=torch.linspace(0.0, 1.5, 24))  # from hopeless to certified
    loss = DoubleMaskingLoss(geometry, (32, 32), [5], evidence=evidence, clip=1.0, pairs="all")
    u = loss.evidence_of(z)
    _, margin = loss.worst_case(u, y)
    cert = LocalDoubleMasking(evidence=evidence, exact_margin=True).certify_evidence(
        u.double() if evidence == "logits" else u, y, geometry, (32, 32), 5)
    right = cert.prediction == y
    assert right.any() and (~right).any()
    torch.testing.assert_close(margin[right].double(), cert.margin[right].double(), rtol=0, atol=1e-4)
    assert cert.certified.any() and (~cert.certified).any()
    tol = 1e-9 * 256 if evidence == "logits" else 0.0
    # a sample whose worst pair keeps the label is certified (and only those are certified with the label)
    assert torch.equal(cert.certified & right, margin.double() > tol)


def test_several_patch_sizes_take_the_worst_pair_over_sizes():
    z, y = _logits(16, 4, 10, 10, seed=2, bias=0.8)
    both = DoubleMaskingLoss(TINY, (10, 10), [1, 2], pairs="all")
    u = both.evidence_of(z)
    _, m = both.worst_case(u, y)
    per = [DoubleMaskingLoss(TINY, (10, 10), [s], pairs="all").worst_case(u, y)[1] for s in (1, 2)]
    torch.testing.assert_close(m, torch.minimum(*per))


@pytest.mark.parametrize("evidence", ["logits", "votes"])
def test_gradients_flow_to_the_local_logits(evidence):
    z, y = _logits(8, 4, 10, 10, seed=4, bias=0.3, dtype=torch.float32)
    z = (z * 0.5).requires_grad_(True)  # mostly inside the clip
    # the masked term alone (no clean CE, no BCE)
    loss_fn = DoubleMaskingLoss(TINY, (10, 10), [1], evidence=evidence, ce_weight=0.0, bce_weight=0.0, tau=1.0)
    loss, stats = loss_fn(z, y)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert set(stats) == {"margin", "loss_masked", "loss"} and stats["margin"].shape == (8,)
    # the masked locations of the chosen pair get no gradient from the masked term
    z.grad = None
    c, _, m1, m2 = masked_worst_case(loss_fn.evidence_of(z), y, loss_fn.mask_sets[0], "greedy")
    c.sum().backward()
    masks = loss_fn.mask_sets[0].masks()
    removed = masks[m1] | masks[m2]  # [B, h, w]
    assert (z.grad.abs().sum(1)[removed] == 0).all() and (z.grad.abs().sum(1)[~removed] > 0).all()


def test_margin_weight_zero_drops_the_masked_term_and_bad_settings_are_refused():
    z, y = _logits(4, 4, 10, 10, seed=5, dtype=torch.float32)
    loss_fn = DoubleMaskingLoss(TINY, (10, 10), [1])
    _, stats = loss_fn(z, y, margin_weight=0.0)
    assert "loss_masked" not in stats and "margin" in stats
    with pytest.raises(ValueError, match="evidence must be one of logits, votes"):
        DoubleMaskingLoss(TINY, (10, 10), [1], evidence="probs")
    with pytest.raises(ValueError, match="pairs must be one of greedy, all"):
        DoubleMaskingLoss(TINY, (10, 10), [1], pairs="some")
    with pytest.raises(ValueError, match="clip and scale must be > 0"):
        DoubleMaskingLoss(TINY, (10, 10), [1], clip=0)
    with pytest.raises(ValueError, match="compile_step does not support loss 'masking'"):
        TrainConfig(loss="masking", compile_step=True).check()
    with pytest.raises(ValueError, match="masking_pairs must be one of greedy, all"):
        TrainConfig(loss="masking", masking_pairs="both").check()


def test_train_cli_with_the_masking_loss_runs_end_to_end(tmp_path, capsys):
    import train as train_cli

    out = tmp_path / "m"
    argv = ["--dataset", str(ROOT / "samples" / "cifar10" / "test"), "--model-kwargs", '{"width": 8}', "--loss", "masking",
            "--masking-pairs", "all", "--max-steps", "3", "--batch-size", "16", "--eval-images", "16", "--log-every", "1",
            "--margin-warmup-epochs", "0", "--no-progress", "--no-tensorboard", "--threads", "1", "--output", str(out)]
    assert train_cli.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["loss"], config["masking_evidence"], config["masking_clip"], config["masking_pairs"]) == ("masking", "logits", 1.0, "all")
    steps = [json.loads(line) for line in open(out / "train_log.jsonl")]
    steps = [r for r in steps if "loss" in r]
    # the margin weight is warmed up from 0 at step 0 (as the bagcert loss's): the masked term enters from step 2
    assert len(steps) == 3 and all(0 <= r["robust_train"] <= 1 for r in steps) and all("loss_masked" in r for r in steps[1:])
    assert (out / "model.pt").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit, match="masking_clip must be"):
        train_cli.main(argv[:-1] + [str(tmp_path / "bad"), "--masking-clip", "0"])


def test_masking_settings_without_the_masking_loss_are_refused_not_ignored(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^masking_clip 2\.0 applies only with loss 'masking', not 'bagcert': give --loss "
                                         r"masking \(loss='masking'\) or drop it$"):
        TrainConfig(masking_clip=2.0).check()
    with pytest.raises(ValueError, match=r"^masking_evidence 'votes', masking_pairs 'all' apply only with loss 'masking', "
                                         r"not 'ce'"):
        TrainConfig(loss="ce", masking_evidence="votes", masking_pairs="all").check()
    TrainConfig(loss="masking", masking_clip=2.0).check()  # with the loss: fine
    TrainConfig().check()  # the defaults are not "given"
    import train as train_cli

    with pytest.raises(SystemExit) as e:  # the command: one line, before anything is written
        train_cli.main(["--dataset", "synthetic:16", "--model-kwargs", '{"width": 8}', "--masking-scale", "5",
                        "--output", str(tmp_path / "run")])
    assert str(e.value.code).startswith("masking_scale 5.0 applies only with loss 'masking'") and "\n" not in str(e.value.code)
    assert not (tmp_path / "run").exists()
