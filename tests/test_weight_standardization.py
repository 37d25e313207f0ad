"""The ``norm="nf"`` backbone: SkipInit plus Scaled Weight Standardization (Brock et al., ICLR 2021)."""

import math

import torch
from torch.nn.utils import parametrize

import bagcert
from bagcert.models.cifar import ScaledWeightStandardization


def _nf(width=16, **kw):
    torch.manual_seed(0)
    return bagcert.create_model("cifar_bagnet5_s2", width=width, norm="nf", **kw)


def test_every_conv_but_the_head_is_standardised():
    model = _nf()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in model.modules())
    assert not parametrize.is_parametrized(model.head)
    standardised = [m for m in convs if m is not model.head]
    assert standardised and all(parametrize.is_parametrized(m, "weight") for m in standardised)
    for conv in standardised:
        w = conv.weight.detach().flatten(1).double()
        fan_in = w.shape[1]
        # each filter: mean 0 and sum of squares 2 (variance 2 / fan_in, He's ReLU gain) times gain^2 = 1
        torch.testing.assert_close(w.mean(1), torch.zeros(w.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(w.pow(2).sum(1), torch.full((w.shape[0],), 2.0, dtype=torch.float64), rtol=1e-3, atol=0)  # eps 1e-6 in var
        assert fan_in == conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    for block in model.blocks:  # SkipInit: every block starts as the identity
        assert float(block.gain.detach()) == 0.0


def test_the_output_does_not_depend_on_the_raw_weights_scale_and_follows_the_gain():
    model = _nf().eval()
    for block in model.blocks:
        block.gain.data.fill_(0.5)
    x = torch.rand(2, 3, 32, 32)
    ref = model.local_logits(x)
    conv = model.blocks[1].conv1
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(7.0).add_(0.1)  # scale and shift: standardised away
    torch.testing.assert_close(model.local_logits(x), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        conv.parametrizations.weight[0].gain[0] = 3.0
    assert not torch.allclose(model.local_logits(x), ref, rtol=1e-3, atol=1e-3)


def test_standardisation_formula():
    torch.manual_seed(1)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 0.2 + 0.05
    ws = ScaledWeightStandardization(5, 36, eps=0.0).double()
    with torch.no_grad():
        ws.gain.copy_(torch.arange(1.0, 6.0))
    out = ws(w)
    flat = w.flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)) / flat.std(1, correction=0, keepdim=True)
    expected = expected * math.sqrt(2 / 36) * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out.flatten(1), expected)


def test_nf_trains_saves_and_reloads(tmp_path):
    model = _nf().train()
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model.local_logits(x).mean(dim=(2, 3)), y)
        opt.zero_grad()
        loss.backward()
        gains = [m.parametrizations.weight[0].gain for m in model.modules() if parametrize.is_parametrized(m)]
        assert all(g.grad is not None for g in gains)
        opt.step()
    model.eval()
    path = bagcert.save_checkpoint(tmp_path / "nf.pt", model)
    loaded, _ = bagcert.load_checkpoint(path)
    torch.testing.assert_close(loaded.local_logits(x), model.local_logits(x), rtol=0, atol=0)


def test_a_1x1_first_conv_is_not_standardised_so_grey_stays_visible():
    # cifar_bagnet7_s2 starts with a 1x1 conv over the 3 colours: centred, each filter would sum to zero over
    # them and a shift along the grey direction (in normalised units) would vanish at every pixel
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet7_s2", width=8, norm="nf").eval()
    assert model.stem[0].kernel_size == (1, 1) and not parametrize.is_parametrized(model.stem[0])
    assert all(parametrize.is_parametrized(m) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d) and m is not model.stem[0] and m is not model.head)
    for block in model.blocks:
        block.gain.data.fill_(1.0)
    std = model.std.detach().reshape(1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32) * 0.5 + 0.2
    assert (model.local_logits(x + 0.1 * std) - model.local_logits(x)).abs().max() > 1e-2
