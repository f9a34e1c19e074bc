"""Networks: a small time-conditioned MLP for the 2-D toy and a compact U-Net for CIFAR-10.

Every network is called as net(x, t) with t a float tensor of shape (B,) in [0, 1]
(the U-Net also takes optional class labels y). Bridge models see the observation x1 as extra
input features; paths.py concatenates it, so the networks need not know about it.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_embedding(t, dim, max_period=10000.0, scale=1000.0):
    """Sinusoidal embedding of scale * t, t (B,) in [0, 1] -> (B, dim): cos then sin, as torchcfm's
    timestep_embedding (the MLP scales t by 1000, the U-Net, like torchcfm, by 1).
    Computed in t's dtype (float32 at least), so a float64 network is float64 throughout."""
    half = dim // 2
    t = t if t.dtype == torch.float64 else t.float()
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = scale * t[:, None] * freqs[None]  # (B, half)
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
# U-Net for 32 x 32 images (CIFAR-10): torchcfm 1.0.7's UNetModelWrapper (after guided-diffusion),
# computation for computation, so that the authors' checkpoints load into it (`from_torchcfm`).
# The paper's teacher (App. D): 128 channels, multipliers (1, 2, 2, 2), 2 residual blocks per level,
# attention at 16 x 16 with heads of 64 channels, dropout 0.1, labels added to the time embedding:
# 35,746,307 parameters, as torchcfm's.

UNET_PRESETS = {  # plain keyword dicts for UNet(**preset); "paper" is the default
    "paper": dict(ch=128, mult=(1, 2, 2, 2), blocks=2, attn_res=(16,), groups=32),
    "small": dict(ch=32, mult=(1, 2, 2), blocks=1, attn_res=(16,), groups=8),   # ~1.1M, quick runs on a CPU
    "tiny": dict(ch=16, mult=(1, 2), blocks=1, attn_res=(16,), groups=4),       # ~0.18M, tests
}
# groups: GroupNorm groups in every norm. torchcfm always uses 32; the small presets use fewer, so that
# a group keeps at least 4 channels (with one channel per group, the norm after the embedding is added
# would subtract it again).


class GroupNorm(nn.GroupNorm):
    """torchcfm's GroupNorm32: normalise in float32 (float64 stays float64), return the input's dtype."""

    def forward(self, x):
        return super().forward(x if x.dtype == torch.float64 else x.float()).to(x.dtype)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the embedding; GroupNorm, SiLU, dropout, conv (zero-init); skip."""

    def __init__(self, cin, cout, emb_dim, dropout, groups):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop = GroupNorm(groups, cout), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))  # the block starts as the identity
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over the H * W positions, heads of head_dim channels: x + proj(softmax(q k^T / √d) v).
    qkv's 3C output channels hold (q, k, v) head after head: torchcfm's legacy order."""

    def __init__(self, ch, head_dim=64, groups=32):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv = GroupNorm(groups, ch), nn.Conv1d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv1d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W)
        qkv = self.qkv(self.norm(x)).reshape(B, self.heads, 3, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(2)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        return (x + self.proj(h.transpose(-1, -2).reshape(B, C, H * W))).reshape(B, C, H, W)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3 x 3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """net(x (B, 3, R, R), t (B,) in [0, 1], y (B,) long or None) -> (B, 3, R, R).

    num_classes > 0 makes it class-conditional (a label embedding is added to the time embedding);
    then y is required. authors_time=True serves a network trained in the authors' (torchcfm's)
    convention, u(x, s) with noise at s = 0, data at s = 1 and velocity data - noise, in ours:
    f(x, t) = -u(x, 1 - t).
    """

    def __init__(self, ch=128, mult=(1, 2, 2, 2), blocks=2, attn_res=(16,), dropout=0.1,
                 num_classes=0, res=32, in_ch=3, groups=32, head_dim=64, authors_time=False):
        super().__init__()
        self.ch, self.authors_time, emb_dim = ch, authors_time, 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        res_block = lambda cin, cout: ResBlock(cin, cout, emb_dim, dropout, groups)
        attention = lambda c: Attention(c, head_dim, groups)

        # Encoder (torchcfm's input_blocks): the input conv, then per level `blocks` ResBlocks (with
        # attention at the resolutions in attn_res) and a stride-2 conv (not at the last level).
        # Every block's output is kept as a skip connection for the decoder.
        c = ch * mult[0]
        self.down, skips = nn.ModuleList([nn.ModuleList([nn.Conv2d(in_ch, c, 3, padding=1)])]), [c]
        for level, m in enumerate(mult):
            for _ in range(blocks):
                block = nn.ModuleList([res_block(c, ch * m)])
                c = ch * m
                if res in attn_res:
                    block.append(attention(c))
                self.down.append(block)
                skips.append(c)
            if level < len(mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([res_block(c, c), attention(c), res_block(c, c)])

        # Decoder (output_blocks): per level `blocks + 1` blocks, each a ResBlock eating one skip
        # (concatenated on channels), attention where the encoder had it, and on the level's last
        # block a 2x upsampling (not at the first level).
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(blocks + 1):
                block = nn.ModuleList([res_block(c + skips.pop(), ch * m)])
                c = ch * m
                if res in attn_res:
                    block.append(attention(c))
                if level > 0 and i == blocks:
                    block.append(Upsample(c))
                    res *= 2
                self.up.append(block)
        self.out = nn.Sequential(GroupNorm(groups, c), nn.SiLU(), zero_init(nn.Conv2d(c, in_ch, 3, padding=1)))

    def forward(self, x, t, y=None):
        if (y is None) != (self.label_emb is None):
            raise ValueError("labels y (B,) go with a class-conditional U-Net (num_classes > 0), and only there")
        t = t.to(x.dtype)
        if self.authors_time:
            t = 1 - t  # the authors' s = 1 - t; the output's sign is flipped at the end
        emb = self.time_mlp(time_embedding(t, self.ch, scale=1.0))  # (B, 4 ch); torchcfm embeds t unscaled
        if y is not None:
            emb = emb + self.label_emb(y)  # class conditioning: label embedding added to the time embedding
        h, skips = x, []
        for block in self.down:
            h = self.run(block, h, emb)
            skips.append(h)
        h = self.run(self.mid, h, emb)
        for block in self.up:
            h = self.run(block, torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h)
        return -out if self.authors_time else out

    @staticmethod
    def run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


# ----------------------------------------------------------------------------------------------
# The authors' checkpoints: torch.save dicts of torchcfm UNetModelWrapper state_dicts, in their time
# convention (noise at s = 0, data at s = 1). UNet mirrors torchcfm's block layout, so converting is
# renaming: the block indices stay, the names inside the blocks change.

TORCHCFM_NAMES = [  # (torchcfm's name part, ours), applied in this order to every key
    ("time_embed.", "time_mlp."), ("input_blocks.", "down."), ("middle_block.", "mid."),
    ("output_blocks.", "up."), (".in_layers.0.", ".norm1."), (".in_layers.2.", ".conv1."),
    (".emb_layers.1.", ".emb."), (".out_layers.0.", ".norm2."), (".out_layers.3.", ".conv2."),
    (".skip_connection.", ".skip."), (".proj_out.", ".proj."), (".op.", "."),  # op: the stride-2 conv
]
GAN_HEAD = "cls_pred_branch."  # the authors' GAN head: on every network of theirs, used only by the fake model


def from_torchcfm(state_dict, **unet):
    """torchcfm-layout state_dict -> (config, state_dict) for UNet(**config), in our time convention.

    unet: UNet arguments, default the paper preset (what the authors trained); num_classes is read from
    label_emb. Strips a `module.` prefix, drops the GAN head, and refuses any other unknown, missing or
    misshapen key."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        raise ValueError(f"expected a state_dict (names -> tensors); got {_kinds(state_dict)}")
    stripped = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DataParallel's prefix
    if len(stripped) < len(state_dict):
        twice = sorted({k.removeprefix("module.") for k in state_dict if k.startswith("module.")} & set(state_dict))
        raise ValueError(f"{len(twice)} keys appear with and without the prefix 'module.' (first {twice[0]!r})")
    state_dict = stripped
    label_emb = state_dict.get("label_emb.weight", torch.zeros(0, 1))
    if label_emb.ndim != 2:
        raise ValueError(f"label_emb.weight must be (classes, channels); got shape {tuple(label_emb.shape)}")
    num_classes = len(label_emb)
    config = dict(UNET_PRESETS["paper"], num_classes=num_classes, authors_time=True) | unet
    ours, theirs = {}, {}  # our name -> tensor, our name -> torchcfm's name
    for key, value in state_dict.items():
        if key.startswith(GAN_HEAD):
            continue
        name = key
        for old, new in TORCHCFM_NAMES:
            name = name.replace(old, new)
        ours[name], theirs[name] = value, key
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: v.shape for k, v in UNet(**config).state_dict().items()}
    unknown = [theirs[k] for k in ours if k not in expected]
    missing = [k for k in expected if k not in ours]
    misshapen = [f"{theirs[k]} {tuple(v.shape)} (UNet wants {tuple(expected[k])})"
                 for k, v in ours.items() if k in expected and v.shape != expected[k]]
    if unknown or missing or misshapen:
        raise ValueError(f"not a torchcfm UNetModelWrapper with UNet config {config}: {len(unknown)} unknown keys "
                         f"{unknown[:3]}, {len(missing)} missing (our names) {missing[:3]}, "
                         f"{len(misshapen)} misshapen {misshapen[:3]}")
    return config, ours


def to_torchcfm(state_dict):
    """UNet state_dict -> torchcfm's names: from_torchcfm's inverse (tests write authors'-style files with it)."""
    theirs = {}
    for key, value in state_dict.items():
        if re.fullmatch(r"down\.[1-9]\d*\.0\.(weight|bias)", key):  # a stride-2 conv: torchcfm's Downsample.op
            key = key.replace(".0.", ".0.op.")
        for old, new in reversed(TORCHCFM_NAMES[:-1]):
            key = key.replace(new, old)
        theirs[key] = value
    return theirs


def authors_kind(ckpt):
    """'teacher' for the authors' teacher file (net_model, ema_models), 'generator' for their
    distillation file (gen, u, ema_gens), None for anything else."""
    if isinstance(ckpt, dict) and {"net_model", "ema_models"} <= ckpt.keys():
        return "teacher"
    if isinstance(ckpt, dict) and {"gen", "ema_gens"} <= ckpt.keys():
        return "generator"
    return None


def load_authors(ckpt, ema_key=None, **unet):
    """The authors' file, as torch.load(path, weights_only=True) returns it -> (kind, config, state_dict).

    kind 'teacher': the EMA teacher f*; 'generator': the EMA generator's g, G(z) = z - g(z, 1). Both
    for UNet(**config), in our time convention. ema_key picks the EMA decay ('0.999' or 0.9999, the
    file's ema_models / ema_gens keys); None works when the file holds one. unet: see from_torchcfm."""
    kind = authors_kind(ckpt)
    if kind is None:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"not an authors' file: a teacher holds net_model and ema_models, a distillation "
                         f"file gen and ema_gens; this holds {found}")
    name = "ema_models" if kind == "teacher" else "ema_gens"
    emas = ckpt[name]
    if not isinstance(emas, dict) or not emas or not all(isinstance(k, str) and isinstance(v, dict)
                                                         for k, v in emas.items()):
        raise ValueError(f"{name} must map EMA decays (strings such as '0.999') to state_dicts; "
                         f"got {_kinds(emas)}")
    if ema_key is None and len(emas) != 1:
        raise ValueError(f"the {kind} file holds the EMA decays {sorted(emas)}: pick one (ema_key)")
    key = next(iter(emas)) if ema_key is None else str(ema_key)
    if key not in emas:  # 0.9990 and '0.9990' name the file's '0.999'
        key = next((k for k in emas if _same_number(k, ema_key)), None)
    if key is None:
        raise ValueError(f"no EMA decay {ema_key} in the {kind} file; it holds {sorted(emas)}")
    return (kind, *from_torchcfm(emas[key], **unet))


def _kinds(x):
    """What x is, briefly: a dict's key and value types, or x's type."""
    if not isinstance(x, dict):
        return type(x).__name__
    return "a dict of " + ", ".join(sorted({f"{type(k).__name__} -> {type(v).__name__}" for k, v in x.items()})[:3])


def _same_number(a, b):
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False
