"""Networks: a small time-conditioned MLP for the 2-D toy and a compact U-Net for CIFAR-10.

Every network is called as net(x, t) with t a float tensor of shape (B,) in [0, 1]
(the U-Net also takes optional class labels y). Bridge models see the observation x1 as extra
input features; paths.py concatenates it, so the networks need not know about it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of t (B,) in [0, 1] -> (B, dim); t is scaled by 1000 first.
    Computed in t's dtype (float32 at least), so a float64 network is float64 throughout."""
    half = dim // 2
    t = t if t.dtype == torch.float64 else t.float()
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = 1000.0 * t[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class MLP(nn.Module):
    """Time-conditioned MLP for 2-D fields: (B, in_dim), (B,) -> (B, out_dim)."""

    def __init__(self, in_dim=2, out_dim=2, hidden=256, depth=3, t_dim=64):
        super().__init__()
        self.t_dim = t_dim
        layers, d = [], in_dim + t_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        self.body = nn.Sequential(*layers, nn.Linear(d, out_dim))

    def forward(self, x, t):
        return self.body(torch.cat([x, time_embedding(t.to(x.dtype), self.t_dim)], dim=1))


# ----------------------------------------------------------------------------------------------
# U-Net for 32 x 32 images (CIFAR-10). The paper's teacher (PAPER.md section 7): 128 channels,
# multipliers (1, 2, 2, 2), 2 residual blocks per level, attention at 16 x 16 with heads of 64
# channels, dropout 0.1, labels added to the time embedding. About 36M parameters.

UNET_PRESETS = {  # plain keyword dicts for UNet(**preset); "paper" is the default
    "paper": dict(ch=128, mult=(1, 2, 2, 2), blocks=2, attn_res=(16,)),
    "small": dict(ch=32, mult=(1, 2, 2), blocks=1, attn_res=(16,)),   # ~1.1M, quick runs on a CPU
    "tiny": dict(ch=16, mult=(1, 2), blocks=1, attn_res=(16,)),       # ~0.18M, tests
}


def group_norm(ch):
    """32 groups, or groups of 4 channels in small nets: with one channel per group the norm would
    subtract the per-channel time/label embedding right after it is added."""
    return nn.GroupNorm(min(32, ch // 4), ch)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the embedding; GroupNorm, SiLU, dropout, conv (zero-init); skip."""

    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop = group_norm(cout), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))  # the block starts as the identity
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H * W positions, heads of head_dim channels."""

    def __init__(self, ch, head_dim=64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv = group_norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """net(x (B, 3, R, R), t (B,) in [0, 1], y (B,) long or None) -> (B, 3, R, R).

    num_classes > 0 makes it class-conditional (a label embedding is added to the time embedding);
    then y is required.
    """

    def __init__(self, ch=128, mult=(1, 2, 2, 2), blocks=2, attn_res=(16,), dropout=0.1,
                 num_classes=0, res=32, in_ch=3):
        super().__init__()
        self.ch, emb_dim = ch, 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # Encoder: `blocks` ResBlocks per level, then a stride-2 conv (except at the last level).
        # Every output is kept as a skip connection for the decoder.
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for level, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(nn.ModuleList([ResBlock(c, ch * m, emb_dim, dropout)]))
                c = ch * m
                if res in attn_res:
                    self.down[-1].append(Attention(c))
                skips.append(c)
            if level < len(mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), Attention(c),
                                  ResBlock(c, c, emb_dim, dropout)])

        # Decoder: `blocks + 1` ResBlocks per level, each eating one skip; then a 2x upsampling.
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), ch * m, emb_dim, dropout)]))
                c = ch * m
                if res in attn_res:
                    self.up[-1].append(Attention(c))
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(group_norm(c), nn.SiLU(), zero_init(nn.Conv2d(c, in_ch, 3, padding=1)))

    def forward(self, x, t, y=None):
        emb = self.time_mlp(time_embedding(t.to(x.dtype), self.ch)).to(x.dtype)  # (B, 4 ch)
        if (y is None) != (self.label_emb is None):
            raise ValueError("labels y (B,) go with a class-conditional U-Net (num_classes > 0), and only there")
        if y is not None:
            emb = emb + self.label_emb(y)  # class conditioning: label embedding added to the time embedding
        h, skips = self.conv_in(x), []
        skips.append(h)
        for layers in self.down:
            h = self.run(layers, h, emb)
            skips.append(h)
        h = self.run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self.run(layers, h, emb)
        return self.out(h)

    @staticmethod
    def run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h
