import pytest
import torch

import bagcert
from bagcert.geometry import Geometry
from bagcert.losses import BagCertLoss, straight_through_votes, worst_case_margin


def test_straight_through_forward_is_hard_backward_is_sigmoid():
    z = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], dtype=torch.float64, requires_grad=True)
    tau = 0.7
    v = straight_through_votes(z, tau)
    assert v.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # H(z) = [z > 0], so z = 0 does not vote
    (g,) = torch.autograd.grad(v.sum(), z)
    eps = 1e-6
    numeric = (torch.sigmoid((z.detach() + eps) / tau) - torch.sigmoid((z.detach() - eps) / tau)) / (2 * eps)
    assert torch.allclose(g, numeric, atol=1e-8)


def test_worst_case_margin_gradient_numerically():
    torch.manual_seed(0)
    geometry = Geometry.from_layers([(3, 1, 1)])
    votes = torch.rand(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2])
    f = lambda v: worst_case_margin(v, labels, geometry, (6, 6), [(2, 2), (1, 3)])  # noqa: E731
    # the min is piecewise linear; random continuous votes make the minimiser unique
    assert torch.autograd.gradcheck(f, (votes,), eps=1e-6, atol=1e-5)


def test_full_loss_gradient_flows_and_is_finite():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", width=8)
    loss_fn = BagCertLoss(model.geometry, (32, 32), [5, (3, 7)], ce_weight=0.5)
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    loss, stats = loss_fn(model.local_logits(x), y)
    loss.backward()
    assert torch.isfinite(loss) and {"loss_margin", "loss_bce", "loss_ce", "margin"} <= set(stats)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("patch", [1, 5, (3, 7)])
def test_hard_margin_agrees_with_certificate(patch):
    torch.manual_seed(1)
    geometry = Geometry.from_layers([(3, 2, 1), (3, 1, 1)])
    H = W = 32
    h, w = geometry.grid_size(H, W)
    strength = torch.linspace(0, 4, 64).view(64, 1, 1, 1)  # from hopeless to clearly robust samples
    onehot = torch.nn.functional.one_hot(torch.randint(0, 4, (64,)), 4).float().view(64, 4, 1, 1)
    logits = torch.randn(64, 4, h, w) - 1.0 + strength * onehot
    labels = torch.randint(0, 4, (64,))
    labels[:32] = logits[:32].gt(0).sum((2, 3)).argmax(1)  # half the samples correct
    res = bagcert.certify_logits(logits, labels, geometry, (H, W), patch)
    margin = worst_case_margin((logits > 0).float(), labels, geometry, (H, W), [patch])
    assert torch.equal(margin > 0, res.certified & res.correct)
    ok = res.correct
    assert torch.equal(margin[ok], res.margin[ok].float())
    assert (margin > 0).any() and (margin <= 0).any()


def test_min_over_several_patch_sizes():
    geometry = Geometry.from_layers([(3, 1, 1)])
    logits = torch.randn(8, 3, 8, 8) + 0.5
    labels = torch.zeros(8, dtype=torch.long)
    v = (logits > 0).float()
    both = worst_case_margin(v, labels, geometry, (8, 8), [2, 4])
    a = worst_case_margin(v, labels, geometry, (8, 8), [2])
    b = worst_case_margin(v, labels, geometry, (8, 8), [4])
    assert torch.equal(both, torch.minimum(a, b))


def test_margin_reduce_none_holds_every_window_and_min_matches():
    torch.manual_seed(1)
    geometry = Geometry.from_layers([(3, 1, 1)])
    votes = (torch.rand(3, 4, 6, 6) > 0.5).float()
    labels = torch.tensor([0, 3, 1])
    sizes = [(2, 2), (1, 3)]
    every = worst_case_margin(votes, labels, geometry, (6, 6), sizes, reduce="none")
    worst = worst_case_margin(votes, labels, geometry, (6, 6), sizes)
    assert torch.equal(every.min(dim=1).values, worst)
    # one +inf per position for the label; the rest finite
    assert (torch.isinf(every).sum(1) * 3 == (~torch.isinf(every)).sum(1)).all()
    with pytest.raises(ValueError, match="reduce"):
        worst_case_margin(votes, labels, geometry, (6, 6), sizes, reduce="max")


def test_mean_margin_hinge_spreads_gradient_and_vanishes_when_certified():
    geometry = Geometry.from_layers([(3, 1, 1)])
    y = torch.tensor([2])
    # every location votes for the label only: every window clears a small kappa
    z = torch.full((1, 4, 8, 8), -3.0)
    z[:, 2] = 3.0
    z.requires_grad_(True)
    for reduce in ("min", "mean"):
        loss_fn = BagCertLoss(geometry, (8, 8), [2], kappa=0.1, margin_weight=1.0, bce_weight=0.0, margin_reduce=reduce)
        loss, stats = loss_fn(z, y)
        assert stats["loss_margin"] == 0.0 and stats["margin"].item() > 0
    # no location votes: every window fails; "mean" passes gradient to every location, "min" to fewer
    z0 = torch.zeros(1, 4, 8, 8, requires_grad=True)
    touched = {}
    for reduce in ("min", "mean"):
        loss_fn = BagCertLoss(geometry, (8, 8), [2], kappa=0.1, margin_weight=1.0, bce_weight=0.0, margin_reduce=reduce)
        loss, _ = loss_fn(z0, y)
        (g,) = torch.autograd.grad(loss, z0)
        touched[reduce] = int((g[0, 2] != 0).sum())
        assert g[0, 2].sum() < 0  # raising the label's logits lowers the loss
    assert touched["mean"] == 64 > touched["min"]
    with pytest.raises(ValueError, match="margin_reduce"):
        BagCertLoss(geometry, (8, 8), [2], margin_reduce="max")


def test_half_precision_votes_give_the_float32_margins():
    """A bf16 total above 256 rounds (e.g. 302 -> 304): low-precision votes are counted in float32."""
    model = bagcert.create_model("cifar_bagnet5", width=8)  # stride 1: a 32 x 32 map, totals up to 1,024
    assert model.geometry.grid_size(32, 32) == (32, 32)
    g = torch.Generator().manual_seed(3)
    votes = (torch.randn(4, 10, 32, 32, generator=g) > 0).float()  # totals around 512
    labels = torch.tensor([0, 4, 7, 9])
    ref = worst_case_margin(votes, labels, model.geometry, (32, 32), [5, (2, 7)])
    for dtype in (torch.bfloat16, torch.float16, torch.bool, torch.int64):
        got = worst_case_margin(votes.to(dtype), labels, model.geometry, (32, 32), [5, (2, 7)])
        assert got.dtype == torch.float32 and torch.equal(got, ref), dtype
