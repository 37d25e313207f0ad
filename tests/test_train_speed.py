"""The training loop's speed changes keep its numbers: faster window sums, per-image augmentation, the epoch order
drawn once, and the speed options of TrainConfig (fused optimiser, bf16 evaluation, a compiled step)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bagcert
from bagcert.data import _cutout, augment_batch, synthetic_dataset
from bagcert.geometry import parse_patch_size
from bagcert.losses import BagCertLoss, _window_sum_all
from bagcert.training import MemoryBatches, TrainConfig, _seeded, train

ROOT = Path(__file__).resolve().parent.parent


def _window_sums_reference(votes, rows, cols):
    """The integral image indexed as [B, C, h+1, w+1] (the formula before the permuted layout)."""
    S = F.pad(votes.cumsum(2).cumsum(3), (1, 0, 1, 0))
    r0, r1 = rows[:, 0], rows[:, 1] + 1
    c0, c1 = cols[:, 0], cols[:, 1] + 1
    S_r1, S_r0 = S.index_select(2, r1), S.index_select(2, r0)
    return (S_r1.index_select(3, c1) - S_r1.index_select(3, c0)) - (S_r0.index_select(3, c1) - S_r0.index_select(3, c0))


@pytest.mark.parametrize("name,size", [("cifar_bagnet5_s2", 5), ("cifar_bagnet5", 3), ("cifar_bagnet9_s2", (2, 7))])
def test_window_sums_are_bit_identical_to_the_integral_image_forward_and_equal_backward(name, size):
    model = bagcert.create_model(name, width=8)
    h, w = model.geometry.grid_size(32, 32)
    rows, cols = model.geometry.affected_ranges((32, 32), parse_patch_size(size))
    rows, cols = torch.unique(rows, dim=0), torch.unique(cols, dim=0)
    g = torch.Generator().manual_seed(0)
    votes = (torch.randn(6, 10, h, w, generator=g) > 0).float()
    grad = torch.randn(6, 10, len(rows), len(cols), generator=g)
    outs = []
    for f in (_window_sum_all, _window_sums_reference):
        v = votes.clone().requires_grad_()
        win = f(v, rows, cols)
        win.backward(grad)
        outs.append((win.detach(), v.grad))
    # 0/1 votes: every window sum is an exact whole number, whatever the order of the additions
    assert torch.equal(outs[0][0], outs[1][0])
    # the backward pass adds the same terms in another order (products with the range matrices, not index_add)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=2e-5)  # sums of ~25 N(0, 1) terms
    assert not torch.equal(outs[0][1], torch.zeros_like(outs[0][1]))


def _mean_hinge_reference(z, y, geometry, sizes, kappa, tau):
    """margin_reduce="mean" as the mean of worst_case_margin(reduce="none")'s finite entries."""
    from bagcert.losses import straight_through_votes, worst_case_margin

    margins = worst_case_margin(straight_through_votes(z, tau), y, geometry, (32, 32), sizes, reduce="none")
    finite = torch.isfinite(margins)
    hinge = (F.relu(kappa - margins / (z.shape[2] * z.shape[3])) * finite).sum(1) / finite.sum(1)
    return hinge.mean(), margins.min(dim=1).values


@pytest.mark.parametrize("sizes", [[5], [3, (2, 7)]])
def test_the_mean_hinge_is_the_mean_over_every_window_and_wrong_class(sizes):
    model = bagcert.create_model("cifar_bagnet5_s2", width=8)
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(8, 10, 16, 16, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    loss_fn = BagCertLoss(model.geometry, (32, 32), sizes, tau=2.0, kappa=0.25, margin_weight=1.0, bce_weight=0.0,
                          margin_reduce="mean")
    z = z0.clone().requires_grad_()
    loss, stats = loss_fn(z, y)
    loss.backward()
    zr = z0.clone().requires_grad_()
    ref, ref_margin = _mean_hinge_reference(zr, y, model.geometry, sizes, 0.25, 2.0)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=0)
    assert torch.equal(stats["margin"], ref_margin)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-9)
    assert z.grad.abs().sum() > 0


def test_the_loss_and_its_gradient_are_those_of_the_reference_window_sums(monkeypatch):
    import bagcert.losses as losses

    model = bagcert.create_model("cifar_bagnet5_s2", width=8)
    z0 = torch.randn(4, 10, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7, 9])
    results = []
    for impl in (losses._window_sum_all, _window_sums_reference):
        monkeypatch.setattr(losses, "_window_sum_all", impl)
        for reduce in ("min", "mean"):
            z = z0.clone().requires_grad_()
            loss, _ = BagCertLoss(model.geometry, (32, 32), [3, 5], tau=2.0, margin_weight=5.0, margin_reduce=reduce)(z, y)
            loss.backward()
            results.append((loss.detach(), z.grad))
    for (la, ga), (lb, gb) in zip(results[:2], results[2:]):
        assert torch.equal(la, lb)  # the window sums of hard votes are exact
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-9)


def test_a_tensor_margin_weight_gives_the_loss_of_the_same_float():
    model = bagcert.create_model("cifar_bagnet5_s2", width=8)
    z = torch.randn(4, 10, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2, 3, 4])
    loss_fn = BagCertLoss(model.geometry, (32, 32), [5], tau=2.0, margin_weight=5.0, margin_reduce="mean")
    for mw in (0.0, 2.5):
        a, sa = loss_fn(z, y, margin_weight=mw)
        b, sb = loss_fn(z, y, margin_weight=torch.tensor(mw))
        assert torch.equal(a, b)
        assert "loss_margin" in sb and ("loss_margin" in sa) == (mw > 0)


def _augment_reference(x, generator, flip=True, pad=4, cutout=0, rows=None, global_size=None, crop=None):
    """augment_batch's generic path (the whole-batch flip and the gather of the padded batch)."""
    B, C, H, W = x.shape
    n = B if global_size is None else global_size
    sel = torch.arange(B) if rows is None else rows
    if flip:
        f = (torch.rand(n, generator=generator) < 0.5)[sel]
        x = torch.where(f.view(B, 1, 1, 1), x.flip(3), x)
    if pad > 0 or (crop is not None and (crop, crop) != (H, W)):
        xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
        Ho, Wo = (H, W) if crop is None else (crop, crop)
        dy = torch.randint(0, H + 2 * pad - Ho + 1, (n,), generator=generator)[sel]
        dx = torch.randint(0, W + 2 * pad - Wo + 1, (n,), generator=generator)[sel]
        r = dy.view(B, 1) + torch.arange(Ho).view(1, Ho)
        c = dx.view(B, 1) + torch.arange(Wo).view(1, Wo)
        x = xp.permute(0, 2, 3, 1)[torch.arange(B).view(B, 1, 1), r.view(B, Ho, 1), c.view(B, 1, Wo)].permute(0, 3, 1, 2)
    return _cutout(x, generator, cutout, n, sel)


@pytest.mark.parametrize("kwargs", [
    {}, {"flip": False}, {"pad": 0, "crop": 24}, {"pad": 4, "crop": 28, "cutout": 8}, {"pad": 12},
    {"pad": 2, "cutout": 5, "rows": torch.arange(1, 40, 2), "global_size": 40},
])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_the_per_image_augmentation_gives_the_pixels_of_the_batch_gather(kwargs, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (20, 3, 32, 32), generator=g).to(dtype)
    a = augment_batch(x, torch.Generator().manual_seed(9), **kwargs)
    b = _augment_reference(x, torch.Generator().manual_seed(9), **kwargs)
    assert a.dtype == dtype and a.is_contiguous() and torch.equal(a, b)


def test_memory_batches_draw_the_epoch_order_once_and_give_float_channels_last_batches(monkeypatch):
    data = synthetic_dataset(40, seed=3)
    cfg = TrainConfig(batch_size=8, seed=4)
    batches = MemoryBatches(data, cfg)
    calls = {"n": 0}
    real = torch.randperm

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch, "randperm", counting)
    got = [next(iter(batches.micro_batches(s))) for s in range(7)]  # 5 steps per epoch: epochs 0 and 1
    assert calls["n"] == 2
    for step, (x, y) in enumerate(got):
        epoch, k = divmod(step, batches.steps_per_epoch)
        idx = real(40, generator=_seeded(cfg.seed, epoch))[k * 8 : (k + 1) * 8]
        ref = augment_batch(data.images[idx], _seeded(cfg.seed, epoch, k, 7), flip=cfg.flip, pad=cfg.pad)
        assert torch.equal(y, data.labels[idx])
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, ref.float().div_(255.0))


def _tiny(tmp_path, **kw):
    values = dict(model="cifar_bagnet5_s2", model_kwargs={"width": 8}, batch_size=8, epochs=1, max_steps=3, ema=0.0,
                  output=str(tmp_path), tensorboard=False, progress=False, eval_images=8, seed=0, threads=1)
    return TrainConfig(**{**values, **kw})


def test_the_fused_optimizer_and_bf16_evaluation_train_like_the_defaults(tmp_path):
    data, held = synthetic_dataset(32, seed=1), synthetic_dataset(8, seed=2)
    base = train(_tiny(tmp_path / "a"), data, held, log=lambda *a: None)
    fast = train(_tiny(tmp_path / "b", fused_optimizer=True, eval_amp=True), data, held, log=lambda *a: None)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), k
    assert fast["eval"]["n"] == base["eval"]["n"] == 8
    assert json.loads((tmp_path / "b" / "config.json").read_text())["fused_optimizer"] is True


def test_speed_options_may_change_on_resume_and_appear_in_train_py_help():
    from bagcert.training import RESUME_ALLOWED

    assert {"compile_step", "fused_optimizer", "eval_amp"} <= RESUME_ALLOWED
    from bagcert.cli.train import build_parser

    text = build_parser().format_help()
    for flag in ("--compile-step", "--fused-optimizer", "--eval-amp"):
        assert flag in text


@pytest.mark.slow
def test_a_compiled_step_trains_like_the_eager_step_without_recompiling(tmp_path):
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    data = synthetic_dataset(32, seed=1)
    losses = {}
    for name, kw in (("eager", {}), ("compiled", {"compile_step": True})):
        train(_tiny(tmp_path / name, log_every=1, max_steps=4, margin_warmup_epochs=1.0, **kw), data, None, log=lambda *a: None)
        recs = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs if "loss" in r]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    # the warming-up margin weight is a tensor: one compiled graph for every step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_the_loop_profile_runs_the_real_train_loop(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_loop_profile", ROOT / "benchmarks" / "train_loop_profile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "profile.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--synthetic", "--steps", "3", "--warmup", "1", "--threads", "1", "--train-images", "32",
                           "--set", 'model_kwargs={"width":8}', "--set", "batch_size=8", "--set", "eval_images=8",
                           "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    import bagcert.training.loop as T

    assert T.train_step.__name__ == "train_step" and T.ema_update.__name__ == "ema_update"  # the clocks are removed
    res = json.loads(out.read_text())["profiles"][0]
    ms = res["ms_per_step"]
    assert res["steps"] == 3 and res["warmup_steps"] == 1
    for phase in ("data", "forward", "loss", "backward", "optimizer", "ema", "evaluation", "checkpoint"):
        assert ms[phase] > 0, phase
    assert res["loop_ms_per_step"] == pytest.approx(sum(ms.values()))
    assert res["evaluation_images"] == 8 and res["final_eval"]["n"] == 8


def test_the_loop_comparison_reports_every_variant_against_the_first(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_loop_profile", ROOT / "benchmarks" / "train_loop_profile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "compare.json"
    assert bench.main(["--compare", "recipe", "recipe+skipinit+b4", "stride1", "--rounds", "1", "--synthetic",
                       "--steps", "2", "--warmup", "1", "--threads", "1", "--train-images", "16",
                       "--set", 'model_kwargs={"width":8}', "--set", "batch_size=8", "--set", "eval_images=8",
                       "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["variants"]
    assert [r["label"] for r in rows] == ["A:recipe", "B:recipe+skipinit+b4", "C:stride1"]
    assert [r["batch"] for r in rows] == [8, 4, 8]  # +b4 wins over --set batch_size=8
    assert rows[0]["loop_speedup_over_A"] == 1.0
    for r in rows:  # images per second: a step of 4 images that takes half as long is as fast
        ms_per_image = r["loop_ms_per_step"] / r["batch"]
        assert r["loop_speedup_over_A"] == pytest.approx(rows[0]["loop_ms_per_step"] / 8 / ms_per_image)
        assert len(res["runs"][r["label"]]) == 1
    # --set applies to every variant; the presets' own changes stay (stride1's model, skipinit's normalisation)
    configs = {k: v[0]["config"] for k, v in res["runs"].items()}
    assert configs["C:stride1"]["model"] == "cifar_bagnet5" and configs["A:recipe"]["model"] == "cifar_bagnet5_s2"
    assert configs["B:recipe+skipinit+b4"]["model_kwargs"] == {"width": 8, "norm": "skipinit"}
    with pytest.raises(SystemExit, match="at least two"):
        bench.main(["--compare", "recipe"])
