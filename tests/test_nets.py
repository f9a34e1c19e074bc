"""The CIFAR U-Net of nets.py: size of the paper's preset, initialisation, and what it may depend on."""
import math

import pytest
import torch
import torch.nn.functional as F

import nets

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")  # tests/conftest.py


def randomised(net):
    """Give the zero-initialised layers random weights, so every path through the network is live."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net


def test_paper_preset_has_torchcfms_parameter_count():
    # App. D: 128 channels, (1, 2, 2, 2), 2 blocks, attention at 16; torchcfm's UNetModelWrapper has
    # 35,746,307 parameters in 304 tensors
    state = nets.UNet(**nets.UNET_PRESETS["paper"]).state_dict()
    assert sum(p.numel() for p in state.values()) == 35_746_307 and len(state) == 304


def test_unet_starts_as_the_zero_field():
    # zero-initialised output conv: a fresh teacher predicts velocity 0, and G(z) = z - g(z, 1) = z
    net = nets.UNet(**nets.UNET_PRESETS["tiny"])
    out = net(torch.randn(3, 3, 32, 32), torch.rand(3))
    assert out.shape == (3, 3, 32, 32) and (out == 0).all()


def test_unet_samples_do_not_see_each_other():
    # GroupNorm and attention act per sample: row 0 of a batch equals the same input alone
    torch.manual_seed(0)
    net = randomised(nets.UNet(**nets.UNET_PRESETS["tiny"], num_classes=10)).eval()
    x, t, y = torch.randn(4, 3, 32, 32), torch.rand(4), torch.tensor([3, 1, 4, 1])
    batched = net(x, t, y)
    alone = net(x[:1], t[:1], y[:1])
    assert batched.abs().max() > 1e-3
    torch.testing.assert_close(batched[:1], alone, rtol=1e-4, atol=1e-5)


def test_unet_output_depends_on_time_and_label():
    torch.manual_seed(0)
    net = randomised(nets.UNet(**nets.UNET_PRESETS["tiny"], num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    base = net(x, torch.tensor([0.3]), torch.tensor([2]))
    assert (net(x, torch.tensor([0.7]), torch.tensor([2])) - base).abs().max() > 1e-3
    assert (net(x, torch.tensor([0.3]), torch.tensor([5])) - base).abs().max() > 1e-3


def test_unet_refuses_labels_it_cannot_use_and_needs_labels_it_can():
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    for net, y in ((nets.UNet(**nets.UNET_PRESETS["tiny"]), torch.tensor([0, 1])),
                   (nets.UNet(**nets.UNET_PRESETS["tiny"], num_classes=10), None)):
        try:
            net(x, t, y)
        except ValueError as e:
            assert "class-conditional" in str(e)
        else:
            raise AssertionError("a label mismatch went unnoticed")


def test_attention_is_softmax_of_scaled_dot_products():
    # the block computes x + proj(softmax(q k^T / sqrt(d)) v) over the H * W positions, per head, with
    # qkv's channels ordered (head, q/k/v, d): torchcfm's QKVAttentionLegacy
    torch.manual_seed(0)
    att = randomised(nets.Attention(128, head_dim=64)).double()
    x = torch.randn(2, 128, 4, 4, dtype=torch.float64)
    qkv = att.qkv(att.norm(x.reshape(2, 128, 16))).reshape(2, 2, 3, 64, 16)  # (B, heads, q/k/v, d, HW)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(64), dim=-1)  # (B, heads, HW, HW)
    h = torch.einsum("bhij,bhdj->bhdi", w, v).reshape(2, 128, 16)
    out = x.reshape(2, 128, 16) + F.conv1d(h, att.proj.weight, att.proj.bias)
    torch.testing.assert_close(att(x), out.reshape(2, 128, 4, 4))


def test_group_norm_keeps_float64_and_returns_the_input_dtype():
    # torchcfm's GroupNorm32 normalises in float32 and casts back; float64 must stay float64
    norm = nets.GroupNorm(2, 4).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64) * 1e-4 + 1
    ref = (x - x.reshape(3, 2, 10).mean(-1).repeat_interleave(2, 1)[..., None]) / (
        x.reshape(3, 2, 10).var(-1, unbiased=False).repeat_interleave(2, 1)[..., None] + 1e-5).sqrt()
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)
    assert norm.float()(x.bfloat16()).dtype == torch.bfloat16
