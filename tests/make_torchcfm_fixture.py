"""Make tests/torchcfm_fixture.pt: what torchcfm 1.0.7's UNetModelWrapper (the authors' network, at a
reduced size; unconditional and class-conditional) outputs on fixed inputs, for tests/test_torchcfm.py.

torchcfm is not a dependency; run this once where it is installed:

    python -m venv /tmp/cfm --system-site-packages && /tmp/cfm/bin/pip install --no-deps torchcfm==1.0.7
    /tmp/cfm/bin/python tests/make_torchcfm_fixture.py

The fixture holds torchcfm's key names and shapes, not the weights: `fixture_weights` makes those from
the names and shapes with integer arithmetic only (the same numbers on every machine and torch version),
and the test calls it too. The authors' time convention: noise at s = 0, data at s = 1; ours t = 1 - s.
"""
import math
from pathlib import Path

import torch

# Reduced size, same design as the paper's (128 channels, (1, 2, 2, 2), 2 blocks, attention at 16 of 32,
# heads of 64 channels): 64 channels keep 2 channels in each of torchcfm's 32 GroupNorm groups (with 1,
# the norm after the embedding is added would cancel it), and heads of 32 channels give 4 heads, so
# the order of q, k, v and heads in qkv matters.
TORCHCFM = dict(dim=(3, 16, 16), num_channels=64, num_res_blocks=2, channel_mult=(1, 2, 2), num_heads=4,
                num_head_channels=32, attention_resolutions="8", dropout=0.1)
UNET = dict(ch=64, mult=(1, 2, 2), blocks=2, attn_res=(8,), res=16, groups=32, head_dim=32)  # nets.UNet's
NUM_CLASSES = 10
M = 2**31 - 1  # a prime; every product below stays under 2**62, exact in int64


def fixture_weights(shapes, salt):
    """Pseudo-random weights {name: float32 tensor} for a state_dict layout {name: shape}.

    Every value is k / 128 * 2**-e with integer k in [-128, 128): exact in float32 and float64. Convs and
    linears are about PyTorch's default scale (bound 2**-e near 1/sqrt(fan_in)), label embeddings of
    size 1, GroupNorm weights 1 + u/4 and biases u/4; torchcfm's zero-initialised layers get weights too,
    so every tensor matters."""
    weights = {}
    for n, (name, shape) in enumerate(shapes.items()):
        i = (torch.arange(math.prod(shape), dtype=torch.int64) + 1_000_003 * n + 500_000_009 * salt) % M
        x = (i * 48271 + 12345) % M
        x = (x * x) % M
        x = ((x ^ (x >> 13)) * 16807) % M
        u = ((x % 256) - 128).double().reshape(shape) / 128  # in [-1, 1)
        owner = shapes[name.removesuffix("bias") + "weight"] if name.endswith("bias") else shape
        if len(owner) == 1:  # GroupNorm
            w = 1 + u / 4 if name.endswith("weight") else u / 4
        elif name.startswith("label_emb"):
            w = u
        else:
            fan_in = math.prod(owner[1:])
            w = u * 2.0 ** -round(math.log2(fan_in) / 2)
        weights[name] = w.float()
    return weights


def inputs():
    """x (4, 3, 16, 16), our times t (4,), labels y (4,), and noise z (2, 3, 16, 16) for the one-step map."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    t = torch.tensor([0.0, 0.3, 0.75, 1.0])  # ours; the authors' s = 1 - t; t = 0.5 would hide a missing flip
    return x, t, torch.tensor([3, 7, 0, 9]), torch.randn(2, 3, 16, 16, generator=gen)


def torchcfm_unet():
    """torchcfm.models.unet's UNetModelWrapper, imported by file path: the package's __init__ needs POT."""
    import importlib.metadata
    import importlib.util
    import sys
    version = importlib.metadata.version("torchcfm")
    assert version == "1.0.7", f"made with torchcfm 1.0.7, found {version}"
    sys.path.insert(0, str(Path(importlib.util.find_spec("torchcfm").submodule_search_locations[0]) / "models"))
    from unet.unet import UNetModelWrapper
    return UNetModelWrapper


@torch.no_grad()
def main():
    UNetModelWrapper = torchcfm_unet()
    x, t, y, z = inputs()
    s = 1 - t  # the authors' time
    fixture = dict(torchcfm="1.0.7", torchcfm_config=TORCHCFM, unet=UNET, x=x, t=t, y=y, z=z)
    for name, cond in (("uncond", False), ("cond", True)):
        u = UNetModelWrapper(**TORCHCFM, class_cond=cond, num_classes=NUM_CLASSES).eval()
        shapes = {k: list(v.shape) for k, v in u.state_dict().items()}
        u.load_state_dict(fixture_weights(shapes, salt=int(cond)))
        labels = y if cond else None
        fixture[name] = dict(
            shapes=shapes,
            u=u(s, x, labels),  # the authors' velocity u(x, s), data - noise
            G=z + u(torch.zeros(len(z)), z, labels[:2] if cond else None),  # their one-step map, src/generate.py
        )
    path = Path(__file__).with_name("torchcfm_fixture.pt")
    torch.save(fixture, path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
