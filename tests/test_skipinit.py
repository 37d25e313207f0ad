"""The normalisation-free SkipInit variant of the CIFAR backbones (De & Smith, NeurIPS 2020)."""

import torch

import bagcert


def test_skipinit_blocks_start_as_the_identity_and_have_no_normalisation():
    torch.manual_seed(0)
    model = bagcert.create_model("cifar_bagnet5_s2", width=16, norm="skipinit").eval()
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in model.modules())
    x = torch.randn(2, 16, 8, 8).relu()
    for block in model.blocks:
        assert float(block.gain.detach()) == 0.0
        assert torch.equal(block(x), x)  # relu(x + 0 * branch) == x for x >= 0
    with torch.no_grad():
        block.gain.fill_(0.5)
    assert not torch.equal(model.blocks[-1](x), x)


def test_skipinit_trains_and_keeps_the_geometry():
    torch.manual_seed(0)
    ref = bagcert.create_model("cifar_bagnet5_s2", width=16)
    model = bagcert.create_model("cifar_bagnet5_s2", width=16, norm="skipinit").train()
    assert model.geometry == ref.geometry
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = torch.nn.functional.cross_entropy(model.local_logits(x).mean(dim=(2, 3)), y)
    loss.backward()
    assert all(b.gain.grad is not None and float(b.gain.grad.abs()) > 0 for b in model.blocks)
    opt.step()
    assert all(float(b.gain.detach()) != 0.0 for b in model.blocks)
