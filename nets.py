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
    """Sinusoidal embedding of t (B,) in [0, 1] -> (B, dim); t is scaled by 1000 first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
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
        return self.body(torch.cat([x, time_embedding(t, self.t_dim)], dim=1))
