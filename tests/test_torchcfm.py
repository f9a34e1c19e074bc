"""The authors' checkpoints: nets.from_torchcfm and nets.load_authors against torchcfm 1.0.7's own
outputs (tests/torchcfm_fixture.pt, made by tests/make_torchcfm_fixture.py; torchcfm is not needed here)."""
import functools
from pathlib import Path

import pytest
import torch

import nets
from make_torchcfm_fixture import UNET, fixture_weights

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")  # tests/conftest.py

FIXTURE = torch.load(Path(__file__).with_name("torchcfm_fixture.pt"), weights_only=True)


@functools.cache
def weights_of(name, salt=None):
    """The fixture's torchcfm-layout weights (cached: copy before changing); another salt, other values."""
    return fixture_weights(FIXTURE[name]["shapes"], salt=int(name == "cond") if salt is None else salt)


def converted(name, dtype=torch.float32, weights=None):
    """Our UNet holding the fixture's torchcfm weights, or `weights` in their layout."""
    config, state = nets.from_torchcfm(weights or weights_of(name), **UNET)
    net = nets.UNet(**config).eval()
    net.load_state_dict(state)
    return net.to(dtype)


def rel_error(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("name", ["uncond", "cond"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_converted_unet_is_minus_torchcfm_velocity_at_flipped_time(name, dtype):
    # f(x, t) = -u(x, 1 - t): the authors' u has noise at s = 0 and velocity data - noise
    x, t, y = FIXTURE["x"], FIXTURE["t"], FIXTURE["y"] if name == "cond" else None
    f = converted(name, dtype)
    assert rel_error(f(x.to(dtype), t.to(dtype), y), -FIXTURE[name]["u"]) < 1e-5


@pytest.mark.parametrize("name", ["uncond", "cond"])
@torch.no_grad()
def test_one_step_generator_is_the_authors_z_plus_u_at_zero(name):
    # G(z) = z - g(z, 1) (paths.FlowMatching.generate) equals the authors' z + G(s = 0, z)
    z, y = FIXTURE["z"], FIXTURE["y"][:2] if name == "cond" else None
    g = converted(name)
    G = z - g(z, torch.ones(len(z)), y)
    assert rel_error(G, FIXTURE[name]["G"]) < 1e-5
    u0 = FIXTURE[name]["G"] - z  # the authors' u(z, 0) (up to float32 rounding of z + u - z)
    assert rel_error(-g(z, torch.ones(len(z)), y), u0) < 1e-5


def test_conversion_strips_dataparallel_prefix_and_drops_the_gan_head():
    wrapped = {"module." + k: v for k, v in weights_of("uncond").items()}
    wrapped["module.cls_pred_branch.0.weight"] = torch.zeros(256, 256, 2, 2)
    config, state = nets.from_torchcfm(wrapped, **UNET)
    assert config["num_classes"] == 0 and config["authors_time"]
    assert state.keys() == nets.UNet(**config).state_dict().keys()


@pytest.mark.parametrize("change", ["unknown", "missing", "misshapen"])
def test_conversion_refuses_unknown_missing_and_misshapen_keys(change):
    weights = dict(weights_of("uncond"))
    if change == "unknown":
        weights["input_blocks.1.0.extra.weight"] = torch.zeros(1)
    elif change == "missing":
        del weights["middle_block.1.qkv.weight"]
    else:
        weights["out.2.weight"] = weights["out.2.weight"][:, :-1]
    with pytest.raises(ValueError, match=f"1 {change}"):
        nets.from_torchcfm(weights, **UNET)


def test_paper_config_refuses_a_reduced_size_network():
    with pytest.raises(ValueError, match="not a torchcfm UNetModelWrapper"):
        nets.from_torchcfm(weights_of("uncond"))


def authors_file(kind, decays):
    weights = weights_of("uncond")
    if kind == "teacher":
        return {"net_model": weights, "ema_models": {d: weights for d in decays}, "step": 1}
    return {"gen": weights, "u": weights, "ema_gens": {d: weights for d in decays}, "optim_gen": {}}


@pytest.mark.parametrize("kind", ["teacher", "generator"])
def test_load_authors_picks_the_ema_decay(kind):
    ckpt = authors_file(kind, ["0.999", "0.9999"])
    ckpt["ema_models" if kind == "teacher" else "ema_gens"]["0.9999"] = weights_of("uncond", salt=5)
    for key in ("0.9999", 0.9999, "0.99990"):
        got_kind, config, state = nets.load_authors(ckpt, ema_key=key, **UNET)
        assert got_kind == kind and config["authors_time"]
        assert torch.equal(state["out.2.weight"], weights_of("uncond", salt=5)["out.2.weight"])
    with pytest.raises(ValueError, match=r"\['0.999', '0.9999'\]"):
        nets.load_authors(ckpt, **UNET)  # two decays and no ema_key
    with pytest.raises(ValueError, match="no EMA decay 0.9996"):
        nets.load_authors(ckpt, ema_key=0.9996, **UNET)
    assert nets.load_authors(authors_file(kind, ["0.999"]), **UNET)[0] == kind  # the only one


def test_load_authors_refuses_other_files():
    assert nets.authors_kind({"kind": "teacher", "ema": {}}) is None
    with pytest.raises(ValueError, match="net_model and ema_models"):
        nets.load_authors({"kind": "teacher", "ema": {}})


def same(a, b):
    """The same names in the same order, holding the same tensors."""
    return list(a) == list(b) and all(a[k] is b[k] for k in a)


def test_to_torchcfm_is_the_inverse_of_from_torchcfm():
    # both ways round: the fixture's real torchcfm names, and our presets (how tests make authors'-style files)
    theirs = weights_of("cond")
    assert same(nets.to_torchcfm(nets.from_torchcfm(theirs, **UNET)[1]), theirs)
    for preset in ("tiny", "paper"):
        with torch.device("meta"):
            ours = nets.UNet(**nets.UNET_PRESETS[preset], num_classes=10).state_dict()
        config, back = nets.from_torchcfm(nets.to_torchcfm(ours), **nets.UNET_PRESETS[preset])
        assert same(back, ours) and config["num_classes"] == 10
