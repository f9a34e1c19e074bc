"""cifar.py on the CPU: the loader on tiny CIFAR-format tarballs built here, training, distillation,
the generator update's precision under bf16 autocast, exact resume, sampling and the fid command
(random Inception weights), with the tiny U-Net."""
import copy
import io
import json
import math
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import cifar
import nets

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")  # tests/conftest.py

N_PER_BATCH = 4  # 5 batches: 20 training images
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # cifar.py's folder


@pytest.fixture(scope="module", autouse=True)
def small_grids():
    """Runs write 10-image sample grids, not 100: the same code (test_png_grid checks the file's pixels)."""
    grid, cifar.GRID = cifar.GRID, 10
    yield
    cifar.GRID = grid


def images_for(labels, rng):
    """One flat colour per class plus a little noise, (N, 3072) uint8 in the CIFAR layout."""
    colours = np.linspace(20, 235, 30).reshape(10, 3)[np.asarray(labels)]  # (N, 3)
    x = colours[:, :, None] + rng.normal(0, 8, (len(labels), 3, 1024))
    return np.clip(x, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def add(tar, name, data, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = len(data), kind, linkname
    tar.addfile(info, io.BytesIO(data))


def make_tarball(path, batches=None, extra=()):
    """A CIFAR-10-python-format .tar.gz; batches: {name: (data (N, 3072) uint8, labels)}."""
    rng = np.random.default_rng(0)
    if batches is None:
        batches = {}
        for b in range(1, 6):
            labels = [(b * N_PER_BATCH + i) % 10 for i in range(N_PER_BATCH)]
            batches[f"data_batch_{b}"] = (images_for(labels, rng), labels)
    with tarfile.open(path, "w:gz") as tar:
        for name, (data, labels) in batches.items():
            add(tar, f"cifar-10-batches-py/{name}", pickle.dumps({"data": data, "labels": labels}, protocol=2))
        for args in extra:
            add(tar, *args)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tarball = make_tarball(root / "tiny.tar.gz")
    return ["--device", "cpu", "--data-tarball", tarball, "--md5", cifar.md5sum(tarball), "--data-dir", str(root)]


RUN = ["--batch", "8", "--log-every", "1", "--fid-every", "0"]  # small runs, every step logged
TRAIN = [*RUN, "--net", "tiny", "--nfe", "2"]  # teacher grids with 2 Euler steps


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cifar.main(["train", *data, *TRAIN, "--out", str(out), "--steps", "40", "--lr", "2e-3",
                "--warmup", "1", "--dropout", "0", "--ema", "0"])  # EMA 0: its weights are the trained ones
    return out


def metrics(out):
    return [row for row in map(json.loads, open(out / "metrics.jsonl")) if "step" in row]


def test_loader_reads_rgb_planes_row_major_and_labels(tmp_path):
    data = np.zeros((2, 3072), np.uint8)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30  # R, G, B planes of image 0
    data[1, 32:64] = np.arange(32)  # second row of image 1's red plane
    batches = {f"data_batch_{b}": (data, [b, 9]) for b in range(1, 6)}
    images, labels = cifar.load_cifar(make_tarball(tmp_path / "t.tar.gz", batches))
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert images[0, :, 5, 7].tolist() == [10, 20, 30]
    assert images[1, 0, 1].tolist() == list(range(32)) and images[1, 0, 0].sum() == 0
    assert labels.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]


def test_fetch_checks_the_md5_unless_told_not_to(tmp_path):
    tarball = make_tarball(tmp_path / "t.tar.gz")
    assert cifar.fetch(str(tmp_path), tarball, cifar.md5sum(tarball)) == tarball
    with pytest.raises(SystemExit, match="--md5"):  # default: the official CIFAR-10 checksum
        cifar.fetch(str(tmp_path), tarball)
    assert cifar.fetch(str(tmp_path), tarball, "none") == tarball


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(cifar.urllib.request, "urlretrieve", offline)
    with pytest.raises(SystemExit, match=str(tmp_path / "cifar-10-python.tar.gz")):
        cifar.fetch(str(tmp_path))


@pytest.mark.parametrize("member", [("../evil", b"x"), ("/tmp/evil", b"x"),
                                    ("cifar-10-batches-py/link", b"", tarfile.SYMTYPE, "/etc/passwd")])
def test_loader_refuses_path_traversal_and_links(tmp_path, member):
    tarball = make_tarball(tmp_path / "t.tar.gz", extra=[member])
    with pytest.raises(ValueError, match="unsafe member"):
        cifar.load_cifar(tarball)


def test_loader_refuses_pickles_that_call_code(tmp_path):
    batches = {f"data_batch_{b}": (np.zeros((1, 3072), np.uint8), [0]) for b in range(1, 6)}
    batches["data_batch_3"] = (np.zeros((1, 3072), np.uint8), print)  # pickles a reference to builtins.print
    with pytest.raises(ValueError, match="refusing the global .*print"):
        cifar.load_cifar(make_tarball(tmp_path / "t.tar.gz", batches))


def test_real_batches_are_scaled_to_minus_one_one_and_half_are_mirrored():
    image = (torch.arange(3 * 32 * 32) % 256).reshape(1, 3, 32, 32).to(torch.uint8)  # not mirror-symmetric
    x0, y = cifar.real_batch(image, torch.tensor([7]), 400, torch.Generator().manual_seed(0), torch.device("cpu"))
    plain = image.float() / 127.5 - 1  # 0 -> -1, 255 -> 1
    is_plain, is_mirrored = ((x0 == ref).flatten(1).all(1) for ref in (plain, plain.flip(3)))
    assert (is_plain ^ is_mirrored).all() and 150 < is_plain.sum() < 250 and (y == 7).all()


def test_png_grid_has_the_right_size_and_pixels(tmp_path):
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    cifar.save_grid(str(tmp_path / "g.png"), images, nrow=3, pad=2)
    png = np.asarray(Image.open(tmp_path / "g.png"))
    assert png.shape == (2 + 3 * 34, 2 + 3 * 34, 3)  # 3 rows of 3, 2-pixel borders
    assert (png[2 + 34:2 + 34 + 32, 2 + 34:2 + 34 + 32] == images[4].permute(1, 2, 0).numpy()).all()


def test_teacher_training_lowers_the_flow_matching_loss(teacher):
    loss = [row["loss"] for row in metrics(teacher)]
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5])


def test_distillation_lowers_the_fake_model_loss(data, teacher, tmp_path):
    cifar.main(["distill", *data, *RUN, "--teacher", str(teacher / "ckpt.pt"), "--out", str(tmp_path),
                "--steps", "60", "--fake-steps", "5", "--lr", "1e-3", "--warmup", "1", "--batch", "4"])
    loss = [row["loss_fake"] for row in metrics(tmp_path)][::6]  # f learns the generator's field, Eq. (16)
    assert np.mean(loss[-3:]) < 0.9 * np.mean(loss[:3])
    G = torch.load(tmp_path / "ckpt.pt", weights_only=True)["G"]
    t = torch.load(teacher / "ckpt.pt", weights_only=True)["ema"]
    assert any((G[k] != t[k]).any() for k in G)  # the generator moved away from the teacher's weights


@pytest.mark.parametrize("cmd", ["train", "distill"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(data, teacher, tmp_path, cmd):
    extra = ["--net", "tiny", "--dropout", "0.1", "--nfe", "2"] if cmd == "train" else \
        ["--teacher", str(teacher / "ckpt.pt"), "--fake-steps", "2", "--alpha", "0.9", "--beta", "0.92"]
    base = ["--batch", "4", "--fid-every", "0", "--warmup", "2", "--lr", "1e-3", "--log-every", "1", *extra]
    cifar.main([cmd, *data, *base, "--out", str(tmp_path / "a"), "--steps", "7"])
    cifar.main([cmd, *data, *base, "--out", str(tmp_path / "b"), "--steps", "4"])  # stops mid-iteration
    with open(tmp_path / "b" / "metrics.jsonl", "a") as log:  # a row of a step lost in a crash after the checkpoint
        log.write(json.dumps({"step": 5, "lost": True}) + "\n")
    cifar.main([cmd, *data, *base, "--out", str(tmp_path / "b"), "--steps", "7", "--resume"])
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in "ab")
    assert a["step"] == b["step"] == 7
    a.pop("args"), b.pop("args")  # --steps and --out differ; everything else must be identical
    assert_identical(a, b)
    assert [r["step"] for r in metrics(tmp_path / "b")] == list(range(1, 8))  # each step once, the lost row gone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: a checkpoint loaded onto the GPU")
def test_on_cuda_a_run_resumes(data, tmp_path):
    # load_ckpt maps every tensor to the GPU, the RNG states too; they must go back to the CPU to be set.
    base = [*data[2:], "--device", "cuda", *TRAIN, "--warmup", "2"]  # data without its "--device cpu"
    cifar.main(["train", *base, "--out", str(tmp_path / "a"), "--steps", "4"])
    cifar.main(["train", *base, "--out", str(tmp_path / "b"), "--steps", "2"])
    cifar.main(["train", *base, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"])
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in "ab")
    assert a["step"] == b["step"] == 4
    assert_identical(a["rng"], b["rng"])  # the same draws after the resume as without the interruption
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2, 3, 4]


def assert_identical(a, b, where="ckpt"):
    """Nested dicts / lists of tensors, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, (dict, list, tuple)):
        keys = a.keys() if isinstance(a, dict) else range(len(a))
        assert len(a) == len(b), where
        for k in keys:
            assert_identical(a[k], b[k], f"{where}/{k}")
    else:
        assert a == b, where


def test_sample_writes_a_grid_of_the_requested_size(teacher, tmp_path):
    png = tmp_path / "s.png"
    cifar.main(["sample", "--device", "cpu", "--ckpt", str(teacher / "ckpt.pt"), "--png", str(png), "--n", "12",
                "--nrow", "5", "--nfe", "2"])
    assert Image.open(png).size == (2 + 5 * 34, 2 + 3 * 34)


class PooledPixels(torch.nn.Module):
    """A cheap stand-in for InceptionV3: 16-d features of (B, 3, 299, 299), so that even the Frechet
    distance (a matrix square root, seconds at 2048-d) is instant."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 16)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))


def test_fid_command_runs_with_random_inception_weights(data, teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.fid, "InceptionV3", PooledPixels)  # the network itself: tests/test_fid.py
    value = cifar.main(["fid", *data, "--ckpt", str(teacher / "ckpt.pt"), "--inception-weights", "random",
                        "--n", "10", "--nfe", "2", "--fid-batch", "5"])
    assert np.isfinite(value) and value > 0
    assert json.loads(open(teacher / "fid.jsonl").readline())["n"] == 10


def test_distillation_logs_a_periodic_fid_of_the_ema_generator(data, teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.fid, "InceptionV3", PooledPixels)  # --inception-weights random builds this
    cifar.main(["distill", *data, *RUN, "--teacher", str(teacher / "ckpt.pt"), "--out", str(tmp_path), "--steps", "3",
                "--fake-steps", "1", "--log-every", "5", "--fid-every", "2", "--fid-samples", "5", "--fid-batch", "5",
                "--inception-weights", "random"])
    rows = metrics(tmp_path)  # step 2 for the FID although it is no logging step, step 3 as the last one
    assert [r["step"] for r in rows] == [2, 3] and "fid" not in rows[1]
    assert np.isfinite(rows[0]["fid"]) and rows[0]["fid"] > 0


def test_class_conditional_teacher_distils_and_samples(data, tmp_path):
    cifar.main(["train", *data, *TRAIN, "--cond", "--out", str(tmp_path / "t"), "--steps", "2"])
    cifar.main(["distill", *data, *RUN, "--teacher", str(tmp_path / "t" / "ckpt.pt"), "--out", str(tmp_path / "g"),
                "--steps", "2", "--fake-steps", "1", "--delta-beta", "--gamma", "0.95"])
    cifar.main(["sample", "--device", "cpu", "--ckpt", str(tmp_path / "g" / "ckpt.pt"), "--png",
                str(tmp_path / "s.png"),
                "--n", "10"])
    assert torch.load(tmp_path / "g" / "ckpt.pt", weights_only=True)["unet"]["num_classes"] == 10


def test_distill_refuses_alpha_one_with_beta_below_one(data, teacher, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cifar.main(["distill", *data, "--teacher", str(teacher / "ckpt.pt"), "--out", str(tmp_path),
                    "--alpha", "1", "--beta", "0.9"])
    assert "alpha = 1 requires beta = 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_the_default_device_says_so():
    with pytest.raises(SystemExit, match="--device cpu"):
        cifar.main(["bench", "--net", "tiny"])


# ----------------------------------------------------------------------------- precision of the generator update
def randomised(unet, seed):
    """A U-Net of config `unet` with every weight drawn from `seed` (the zero-initialised output layers too, so
    that f* is far from zero): the same network in every run."""
    torch.manual_seed(seed)
    net, gen = cifar.nets.UNet(**unet), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()) if p.dim() > 1
                    else p + 0.1 * torch.randn(p.shape, generator=gen))
    return net


def perturbed(net, eps, seed):
    """A copy with every weight moved by eps times its layer's mean magnitude: the fake model near f*."""
    gen, net = torch.Generator().manual_seed(seed), copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(eps * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return net


def relative_gap(f_star, f_fake, x):
    t = torch.rand(len(x), generator=torch.Generator().manual_seed(0)).to(x.device)
    with torch.no_grad():
        return ((f_star(x, t) - f_fake(x, t)).norm() / f_star(x, t).norm()).item()


def distill_args(**changes):
    """distill_update's settings for one update; lr 0 and no clipping, so the gradient stays in .grad untouched."""
    return {**dict(K=5, alpha=0.92, beta=0.94, gamma=None, delta_scale=1.0, lr=0.0, warmup=0, clip=math.inf,
                   ema=0.999, bf16=False), **changes}


def gradient_of_update(step, G, f_star, f_fake, x0, args, dtype):
    """The gradient that cifar.distill_update leaves on the network it updates (G at step K, f otherwise)."""
    G, f_star, f_fake = (copy.deepcopy(m).to(dtype) for m in (G, f_star, f_fake))
    f_star.requires_grad_(False)
    opt_G, opt_fake = (torch.optim.Adam(m.parameters(), lr=0.0, betas=(0.0, 0.999)) for m in (G, f_fake))
    torch.manual_seed(1)  # the same draws in every precision (they are made in float32)
    cifar.distill_update(step, G, copy.deepcopy(G), f_star, f_fake, opt_G, opt_fake, x0.to(dtype), None, **args)
    updated = G if step % (args["K"] + 1) == args["K"] else f_fake
    return torch.cat([p.grad.flatten().double() for p in updated.parameters()])


@pytest.mark.parametrize("update", ["generator", "fake"])
def test_update_under_bf16_autocast_has_the_float64_gradient_when_f_is_close_to_the_teacher(update):
    # CUDA runs with --precision bf16; CPU autocast with bf16 rounds the same way. Late in training
    # f ~ f*, and the generator's gradient is driven by their difference: at gap 1e-3 it must survive.
    unet = dict(cifar.nets.UNET_PRESETS["tiny"], dropout=0.0, num_classes=0)
    f_star = randomised(unet, 0)
    x0 = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    f_fake = perturbed(f_star, 1e-2 * 1e-3 / relative_gap(f_star, perturbed(f_star, 1e-2, 1), x0), 1)
    assert 0.7e-3 < relative_gap(f_star, f_fake, x0) < 1.4e-3  # |f* - f| / |f*| = 1e-3
    step = 5 if update == "generator" else 0  # K = 5: update 5 is the first generator update
    reference = gradient_of_update(step, f_star, f_star, f_fake, x0, distill_args(), torch.float64)
    bf16 = gradient_of_update(step, f_star, f_star, f_fake, x0, distill_args(bf16=True), torch.float32)
    assert torch.nn.functional.cosine_similarity(bf16, reference, 0) >= 0.999


def near_teacher_on(dev, preset, gap, batch):
    """(f*, f, x0) on dev: random-weight U-Nets with |f* - f| / |f*| = gap (within 1.4x), laid out as cifar.py
    runs them."""
    unet = dict(cifar.nets.UNET_PRESETS[preset], dropout=0.0, num_classes=0)
    f_star = randomised(unet, 0)
    x0 = (torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(dev)
    layout = dict(memory_format=torch.channels_last) if dev.type == "cuda" else {}
    on = lambda net: net.to(dev, **layout)  # noqa: E731
    probe = relative_gap(on(copy.deepcopy(f_star)), on(perturbed(f_star, 1e-2, 1)), x0)
    f_fake = on(perturbed(f_star, 1e-2 * gap / probe, 1))
    f_star = on(f_star)
    assert gap / 1.4 < relative_gap(f_star, f_fake, x0) < gap * 1.4
    return f_star, f_fake, x0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the paper U-Net's generator update on a GPU")
@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-3])
def test_on_cuda_the_paper_unet_generator_update_has_the_float64_gradient(gap, monkeypatch):
    # What a CUDA run does (cifar.setup): bf16 autocast for G's forward, f* and f in float32 with TF32 off.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    f_star, f_fake, x0 = near_teacher_on(torch.device("cuda"), "paper", gap, 8)
    reference = gradient_of_update(5, f_star, f_star, f_fake, x0, distill_args(), torch.float64)
    bf16 = gradient_of_update(5, f_star, f_star, f_fake, x0, distill_args(bf16=True), torch.float32)
    assert torch.nn.functional.cosine_similarity(bf16, reference, 0) >= 0.999


# ------------------------------------------------------------------ the paper's recipe, counted as the authors count it
def test_teacher_loss_is_the_authors_mean_squared_error_over_pixels():
    net = randomised(dict(cifar.nets.UNET_PRESETS["tiny"], dropout=0.0, num_classes=0), 0)
    opt = torch.optim.Adam(net.parameters(), lr=0.0)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(3)
    row = cifar.teacher_update(0, net, copy.deepcopy(net), opt, x0, None, lr=0.0, warmup=1, clip=math.inf, ema=0.999,
                               bf16=False)
    torch.manual_seed(3)  # the same draws: x1, then t
    x1 = torch.randn_like(x0)
    t = torch.rand(4)
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
    with torch.no_grad():
        authors = torch.nn.functional.mse_loss(x1 - x0, net(xt, t))  # their F.mse_loss, in our time convention
    assert row["loss"] == pytest.approx(authors.item(), rel=1e-5)


def test_a_step_is_one_update_of_either_network_and_each_warms_up_over_its_own_updates(data, teacher, tmp_path):
    cifar.main(["distill", *data, *RUN, "--teacher", str(teacher / "ckpt.pt"), "--out", str(tmp_path),
                "--steps", "12", "--fake-steps", "2", "--lr", "4e-3", "--warmup", "4"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["opt_fake"]["state"][0]["step"] == 8 and ckpt["opt_G"]["state"][0]["step"] == 4  # 12 = 8 + 4
    rows = metrics(tmp_path)
    lr_fake = [r["lr_fake"] for r in rows if r["step"] % 3 != 0]  # steps 1, 2, 4, 5, ...: fake updates
    lr_G = [r["lr_G"] for r in rows if r["step"] % 3 == 0]
    assert lr_fake == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 4e-3, 4e-3, 4e-3, 4e-3])
    assert lr_G == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    assert [r["generator_updates"] for r in rows] == [k // 3 for k in range(1, 13)]


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong
def test_a_run_is_never_replaced_without_resume(data, teacher, tmp_path):
    before = (teacher / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="--resume"):  # distill pointed at the teacher's own folder
        cifar.main(["distill", *data, *RUN, "--teacher", str(teacher / "ckpt.pt"), "--out", str(teacher)])
    with pytest.raises(SystemExit, match="no .*ckpt.pt to continue"):
        cifar.main(["train", *data, *TRAIN, "--out", str(tmp_path), "--resume"])
    assert (teacher / "ckpt.pt").read_bytes() == before


def test_non_finite_weights_are_never_saved(data, teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "ema_update", lambda ema, net, decay: [p.fill_(math.nan) for p in ema.parameters()])
    with pytest.raises(SystemExit, match="non-finite weights in G_ema at step 2"):
        cifar.main(["distill", *data, *RUN, "--teacher", str(teacher / "ckpt.pt"), "--out", str(tmp_path),
                    "--steps", "2", "--fake-steps", "1"])
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--batch", "-1"], ["--fake-steps", "0"], ["--ema", "1.5"],
                                   ["--ema", "nan"], ["--clip", "0"], ["--clip", "nan"], ["--lr", "inf"],
                                   ["--log-every", "0"], ["--warmup", "-1"], ["--fid-samples", "1"], ["--delta-beta"]])
def test_bad_numbers_are_refused_before_any_work(flags, capsys):
    with pytest.raises(SystemExit):
        cifar.parse(["distill", "--teacher", "missing.pt", "--out", "nowhere", *flags])
    assert f"{flags[0]} must be" in capsys.readouterr().err or flags[0] in ("--fid-samples", "--delta-beta")


@pytest.mark.parametrize("cmd", [["sample", "--png", "x.png", "--nfe", "0"], ["sample", "--png", "x.png", "--n", "0"],
                                 ["fid", "--n", "1"], ["fid", "--nfe", "-1"]])
def test_sampling_needs_at_least_one_step_and_sample(cmd, capsys):
    with pytest.raises(SystemExit):
        cifar.parse([cmd[0], "--ckpt", "missing.pt", *cmd[1:]])
    assert "at least" in capsys.readouterr().err


def test_a_checkpoint_of_the_wrong_kind_or_shape_is_named(teacher, tmp_path):
    with pytest.raises(SystemExit, match="not a generator checkpoint .kind 'teacher'"):
        cifar.load_ckpt(str(teacher / "ckpt.pt"), "generator")
    ckpt = torch.load(teacher / "ckpt.pt", weights_only=True)
    ckpt["unet"] = dict(ckpt["unet"], ch=100_000)  # would allocate tens of GB
    torch.save(ckpt, tmp_path / "big.pt")
    with pytest.raises(SystemExit, match="none of nets.UNET_PRESETS"):
        cifar.load_ckpt(str(tmp_path / "big.pt"), "teacher")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable"):
        cifar.load_ckpt(str(tmp_path / "text.pt"), None)


@pytest.mark.parametrize("batch", [(np.zeros((2, 3072), np.float32), [0, 1]), (np.zeros((2, 3000), np.uint8), [0, 1]),
                                   (np.zeros((2, 3072), np.uint8), [0]), (np.zeros((2, 3072), np.uint8), [0, 10])])
def test_loader_refuses_batches_of_the_wrong_dtype_shape_or_labels(tmp_path, batch):
    batches = {f"data_batch_{b}": (np.zeros((2, 3072), np.uint8), [0, 1]) for b in range(1, 6)}
    batches["data_batch_2"] = batch
    with pytest.raises(ValueError, match="data_batch_2: data must be uint8"):
        cifar.load_cifar(make_tarball(tmp_path / "t.tar.gz", batches))


def test_loader_names_a_truncated_archive(tmp_path):
    tarball = make_tarball(tmp_path / "t.tar.gz")
    (tmp_path / "cut.tar.gz").write_bytes(open(tarball, "rb").read()[:300])
    with pytest.raises(ValueError, match="cut.tar.gz"):
        cifar.load_cifar(str(tmp_path / "cut.tar.gz"))


def test_teacher_update_under_bf16_autocast_has_the_float64_gradient():
    # No difference of two networks is taken here (the target x1 - x0 is far from f), so bf16 may stay.
    unet = dict(cifar.nets.UNET_PRESETS["tiny"], dropout=0.0, num_classes=0)
    f = randomised(unet, 0)
    x0 = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    grads = []
    for dtype, bf16 in ((torch.float64, False), (torch.float32, True)):
        net = copy.deepcopy(f).to(dtype)
        torch.manual_seed(1)
        cifar.teacher_update(0, net, copy.deepcopy(net), torch.optim.Adam(net.parameters(), lr=0.0), x0.to(dtype), None,
                             lr=0.0, warmup=0, clip=math.inf, ema=0.999, bf16=bf16)
        grads.append(torch.cat([p.grad.flatten().double() for p in net.parameters()]))
    assert torch.nn.functional.cosine_similarity(*grads, 0) >= 0.999


# ----------------------------------------------------------------------------- the authors' files (torchcfm layout)
def authors_weights(seed, num_classes=0):
    """A tiny UNet's random weights under torchcfm's names (as the authors' files hold the paper-sized ones),
    every layer perturbed: the initial U-Net's zero-initialised layers would make it output 0."""
    torch.manual_seed(seed)
    w = nets.UNet(**nets.UNET_PRESETS["tiny"], num_classes=num_classes).state_dict()
    return nets.to_torchcfm({k: v + 0.05 * torch.randn_like(v) for k, v in w.items()})


def test_distill_takes_the_authors_teacher_file(data, tmp_path):
    w = authors_weights(0)
    torch.save({"net_model": w, "ema_models": {"0.999": w}}, tmp_path / "teacher.pt")
    cifar.main(["distill", *data, *RUN, "--teacher", str(tmp_path / "teacher.pt"), "--ema-key", "0.999",
                "--out", str(tmp_path / "g"), "--steps", "3", "--fake-steps", "2"])
    ckpt = torch.load(tmp_path / "g" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["unet"]["authors_time"] and ckpt["unet"]["ch"] == 16  # the tiny preset, found


def test_sample_of_the_authors_generator_file_is_their_one_step_map(tmp_path):
    u = authors_weights(1)
    torch.save({"gen": u, "u": authors_weights(2), "ema_gens": {"0.999": u}}, tmp_path / "gen.pt")
    n, png = 6, tmp_path / "s.png"
    cifar.main(["sample", "--device", "cpu", "--ckpt", str(tmp_path / "gen.pt"), "--png", str(png), "--n", str(n),
                "--nrow", str(n), "--seed", "3"])  # no --ema-key: the file holds one decay
    theirs = nets.UNet(**nets.UNET_PRESETS["tiny"], authors_time=False).eval()  # u(x, s) as the authors run it
    theirs.load_state_dict(nets.from_torchcfm(u, **nets.UNET_PRESETS["tiny"])[1])
    z = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # cifar.generate_uint8's noise
    with torch.no_grad():
        expected = cifar.fid.to_uint8(z + theirs(z, torch.zeros(n)))  # the authors' z + u(z, 0)
        unflipped = cifar.fid.to_uint8(z - theirs(z, torch.ones(n)))  # what a missing time flip would give
    grid = torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1)  # (3, H, W)
    tiles = torch.stack([grid[:, 2:34, 2 + 34 * k:34 + 34 * k] for k in range(n)])
    assert torch.equal(tiles, expected)
    assert (expected != unflipped).float().mean() > 0.5 and (expected != cifar.fid.to_uint8(z)).float().mean() > 0.5


def test_an_authors_file_with_two_ema_decays_needs_the_ema_key(tmp_path):
    w, w2 = authors_weights(0), authors_weights(1)
    torch.save({"gen": w, "u": w, "ema_gens": {"0.999": w, "0.9999": w2}}, tmp_path / "gen.pt")
    with pytest.raises(SystemExit, match=r"0\.999'.*0\.9999"):
        cifar.load_ckpt(str(tmp_path / "gen.pt"), "generator")
    got = cifar.load_ckpt(str(tmp_path / "gen.pt"), "generator", ema_key="0.9999")["G_ema"]
    assert all(torch.equal(got[k], v) for k, v in nets.from_torchcfm(w2, **nets.UNET_PRESETS["tiny"])[1].items())


def test_finetune_reads_each_authors_file_at_its_own_ema_decay(data, tmp_path):
    w, w2 = authors_weights(0, cifar.NUM_CLASSES), authors_weights(1, cifar.NUM_CLASSES)  # conditional, as theirs
    torch.save({"net_model": w, "ema_models": {"0.999": w}}, tmp_path / "teacher.pt")
    torch.save({"gen": w, "u": w, "ema_gens": {"0.999": w, "0.9999": w2}}, tmp_path / "gen.pt")
    cifar.main(["finetune", *data, *RUN, "--teacher", str(tmp_path / "teacher.pt"), "--teacher-ema-key", "0.999",
                "--generator", str(tmp_path / "gen.pt"), "--ema-key", "0.9999", "--out", str(tmp_path / "ft"),
                "--steps", "1"])  # one fake-model update: G_ema stays the file's 0.9999 weights
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["unet"]["num_classes"] == cifar.NUM_CLASSES
    expected = nets.from_torchcfm(w2, **nets.UNET_PRESETS["tiny"])[1]
    assert all(torch.equal(ckpt["G_ema"][k], v) for k, v in expected.items())
    with pytest.raises(SystemExit, match="no EMA decay 0.9999 in the teacher file"):  # --ema-key alone: both files
        cifar.main(["finetune", *data, *RUN, "--teacher", str(tmp_path / "teacher.pt"), "--generator",
                    str(tmp_path / "gen.pt"), "--ema-key", "0.9999", "--out", str(tmp_path / "ft2"), "--steps", "1"])


# ----------------------------------------------------------------------------- a run knows what it is
def test_resume_refuses_changed_maths_and_names_each_flag_old_and_new(data, teacher, tmp_path, capsys):
    base = ["distill", *data, *RUN, "--out", str(tmp_path / "g"), "--fake-steps", "1"]
    cifar.main([*base, "--teacher", str(teacher / "ckpt.pt"), "--steps", "2"])
    other = torch.load(teacher / "ckpt.pt", weights_only=True)  # the same preset, other weights
    other["ema"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in other["ema"].items()}
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as refused:
        cifar.main([*base, "--teacher", str(tmp_path / "other.pt"), "--steps", "4", "--resume", "--alpha", "0.9",
                    "--lr", "1e-4"])
    message = str(refused.value)
    assert "--alpha 0.92 -> 0.9" in message and "--lr 3e-05 -> 0.0001" in message and "--teacher-md5" in message
    assert "--beta" not in message and "\n" not in message  # one line, the differing flags only
    with pytest.raises(SystemExit, match="at step 2 already"):  # nothing to do is said, not done silently
        cifar.main([*base, "--teacher", str(teacher / "ckpt.pt"), "--steps", "2", "--resume"])
    cifar.main([*base, "--teacher", str(teacher / "ckpt.pt"), "--steps", "3", "--resume", "--alpha", "0.9",
                "--override", "alpha"])  # continued on purpose: the log's args rows say so
    runs = [row["args"] for row in map(json.loads, open(tmp_path / "g" / "metrics.jsonl")) if "args" in row]
    assert [(r["alpha"], r["override"]) for r in runs] == [(0.92, []), (0.9, ["alpha"])]


@pytest.mark.parametrize("damage", ['{"step": 3, "loss": 0.5', "\n"], ids=["cut_line", "blank_line"])
def test_resume_survives_a_torn_metrics_log(data, tmp_path, damage):
    base = ["train", *data, *TRAIN, "--out", str(tmp_path), "--ckpt-every", "2"]
    cifar.main([*base, "--steps", "2"])
    with open(tmp_path / "metrics.jsonl", "a") as log:  # a kill during a write, after the checkpoint
        log.write(damage)
    cifar.main([*base, "--steps", "3", "--resume"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]  # every line parses
    assert [r["step"] for r in rows if "step" in r] == [1, 2, 3] and [r["start"] for r in rows if "args" in r] == [0, 2]


def test_a_fresh_start_drops_the_rows_of_a_run_killed_before_its_first_checkpoint(data, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    cifar.main(["train", *data, *TRAIN, "--out", str(tmp_path), "--steps", "1"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and "args" in rows[0] and rows[1]["step"] == 1 and rows[1]["loss"] != 9.0


def test_one_run_per_folder_at_a_time_and_a_killed_runs_lock_is_reported(data, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, cifar; cifar.lock_run(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # a second process holds the folder
        with pytest.raises(SystemExit, match=f"in use by another run .pid {holder.pid}"):
            cifar.main(["train", *data, *TRAIN, "--out", str(tmp_path), "--steps", "1"])
        assert not (tmp_path / "ckpt.pt").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    cifar.main(["train", *data, *TRAIN, "--out", str(tmp_path), "--steps", "1"])
    assert f"the run of pid {holder.pid} ended without releasing it" in capsys.readouterr().out
    assert (tmp_path / "lock").read_text() == "" and (tmp_path / "ckpt.pt").exists()  # released at the end


# ----------------------------------------------------------------------------- fine-tuning across conventions
def sample_pixels(ckpt, tmp_path, **ema_key):
    png = tmp_path / "s.png"
    cifar.main(["sample", "--device", "cpu", "--ckpt", str(ckpt), "--png", str(png), "--n", "4", "--nrow", "4",
                *sum((["--ema-key", v] for v in ema_key.values()), [])])
    return np.array(Image.open(png))


@pytest.mark.parametrize("mix", ["authors_generator_our_teacher", "our_generator_authors_teacher"])
def test_finetune_keeps_the_generators_own_time_convention(data, teacher, tmp_path, mix):
    if mix == "authors_generator_our_teacher":
        w = authors_weights(1)
        torch.save({"gen": w, "u": w, "ema_gens": {"0.999": w}}, tmp_path / "gen.pt")
        teacher_file, generator = teacher / "ckpt.pt", tmp_path / "gen.pt"
    else:
        w = authors_weights(0)
        torch.save({"net_model": w, "ema_models": {"0.999": w}}, tmp_path / "teacher.pt")
        cifar.main(["distill", *data, *RUN, "--teacher", str(teacher / "ckpt.pt"), "--out", str(tmp_path / "g"),
                    "--steps", "2", "--fake-steps", "1"])
        teacher_file, generator = tmp_path / "teacher.pt", tmp_path / "g" / "ckpt.pt"
    cifar.main(["finetune", *data, *RUN, "--teacher", str(teacher_file), "--generator", str(generator),
                "--out", str(tmp_path / "ft"), "--steps", "1"])  # one fake-model update: G_ema is the input's
    assert (sample_pixels(tmp_path / "ft" / "ckpt.pt", tmp_path) == sample_pixels(generator, tmp_path)).all()


def test_finetune_refuses_a_generator_of_other_classes_naming_both(data, teacher, tmp_path):
    w = authors_weights(1, cifar.NUM_CLASSES)
    torch.save({"gen": w, "u": w, "ema_gens": {"0.999": w}}, tmp_path / "gen.pt")
    with pytest.raises(SystemExit, match=r"'tiny' \(10 classes, authors.*the teacher .*'tiny' \(unconditional"):
        cifar.main(["finetune", *data, *RUN, "--teacher", str(teacher / "ckpt.pt"), "--generator",
                    str(tmp_path / "gen.pt"), "--out", str(tmp_path / "ft"), "--steps", "1"])


# ----------------------------------------------------------------------------- malformed files, one-line errors
MALFORMED = {
    "ema_entry_a_list": lambda w: {"gen": w, "u": w, "ema_gens": [w]},
    "ema_entry_a_string": lambda w: {"gen": w, "u": w, "ema_gens": "0.999"},
    "ema_entry_floats": lambda w: {"gen": w, "u": w, "ema_gens": {"0.999": 0.5}},
    "integer_keys": lambda w: {"gen": w, "u": w, "ema_gens": {0: w}},
    "mixed_keys": lambda w: {"gen": w, "u": w, "ema_gens": {"0.999": w, 0.9999: w}},
    "zero_d_label_embedding": lambda w: {"gen": w, "u": w, "ema_gens": {"0.999": dict(w, **{
        "label_emb.weight": torch.tensor(1.0)})}},
    "module_prefix_twice": lambda w: {"gen": w, "u": w, "ema_gens": {"0.999": dict(w, **{
        "module.out.2.weight": w["out.2.weight"] + 1})}},
    "weights_not_finite": lambda w: {"gen": w, "u": w, "ema_gens": {"0.999": dict(w, **{
        "out.2.weight": w["out.2.weight"] * math.nan})}},
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_authors_file_is_refused_in_a_sentence_naming_it(tmp_path, name):
    torch.save(MALFORMED[name](authors_weights(0)), tmp_path / "gen.pt")
    with pytest.raises(SystemExit) as refused:
        cifar.load_ckpt(str(tmp_path / "gen.pt"), "generator")
    message = str(refused.value)
    assert str(tmp_path / "gen.pt") in message and "\n" not in message
    assert any(word in message for word in ("must", "expected", "twice", "non-finite", "with and without"))


def truncated_tarball(tmp_path):
    tarball = make_tarball(tmp_path / "t.tar.gz")
    (tmp_path / "cut.tar.gz").write_bytes(open(tarball, "rb").read()[:300])
    return str(tmp_path / "cut.tar.gz")


def test_expected_errors_are_one_line_with_exit_status_one(teacher, tmp_path):
    np.savez(tmp_path / "nan.npz", mu=np.full(16, np.nan), sigma=np.eye(16))
    cases = {  # each an error of the input, not of the code
        "a truncated archive": ["train", "--net", "tiny", "--data-tarball", truncated_tarball(tmp_path), "--md5",
                                "none", "--out", str(tmp_path / "run")],
        "NaN statistics": ["fid", "--ckpt", str(teacher / "ckpt.pt"), "--fid-ref", str(tmp_path / "nan.npz"),
                           "--inception-weights", "random", "--n", "2", "--nfe", "1"],
        "missing statistics": ["fid", "--ckpt", str(teacher / "ckpt.pt"), "--fid-ref", str(tmp_path / "no.npz"),
                               "--inception-weights", "random", "--n", "2", "--nfe", "1"],
    }
    for what, argv in cases.items():
        with pytest.raises(SystemExit) as stopped:
            cifar.main([*argv, "--device", "cpu"])
        assert str(stopped.value).startswith("cifar.py: error: ") and "\n" not in str(stopped.value), what
    done = subprocess.run([sys.executable, "cifar.py", *cases["a truncated archive"], "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_non_finite_loss_stops_the_run_in_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.losses, "um_loss", lambda path, f, x0, x1: torch.full((len(x0),), math.nan))
    with pytest.raises(SystemExit, match="^cifar.py: error: non-finite teacher loss nan at step 0$"):
        cifar.main(["train", *data, *TRAIN, "--out", str(tmp_path), "--steps", "1"])


@pytest.mark.parametrize("flags", [["--seed", str(2 ** 64)], ["--out", ""], ["--lr", "3e38"], ["--batch", "100000"],
                                   ["--fid-samples", "10000000"], ["--override", "alpha"], ["--override", "log-every",
                                                                                           "--resume"]])
def test_out_of_range_flags_are_refused_before_any_work(flags, capsys):
    with pytest.raises(SystemExit):
        cifar.parse(["distill", "--teacher", "missing.pt", "--out", "nowhere", *flags])
    assert f"{flags[0]} " in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["sample", "--png", "x.png"], ["fid"]])
def test_a_huge_n_is_refused_with_the_limit(cmd, capsys):
    with pytest.raises(SystemExit):
        cifar.parse([*cmd, "--ckpt", "missing.pt", "--n", "10000000"])
    assert f"--n must be at most {cifar.MAX_N[cmd[0]]}" in capsys.readouterr().err


def test_sample_refuses_a_folder_and_leaves_no_temporary_file(teacher, tmp_path):
    (tmp_path / "grid").mkdir()
    with pytest.raises(SystemExit, match="a folder"):
        cifar.main(["sample", "--device", "cpu", "--ckpt", str(teacher / "ckpt.pt"), "--png", str(tmp_path / "grid")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid"]


def test_fid_with_random_weights_takes_the_reference_statistics(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar.fid, "InceptionV3", PooledPixels)
    rng = np.random.default_rng(0)
    cifar.fid.save_stats(str(tmp_path / "ref.npz"), rng.normal(size=16), np.eye(16))
    value = cifar.main(["fid", "--device", "cpu", "--ckpt", str(teacher / "ckpt.pt"), "--inception-weights", "random",
                        "--fid-ref", str(tmp_path / "ref.npz"), "--n", "4", "--nfe", "1"])
    assert np.isfinite(value) and value > 0


def test_the_loader_refuses_an_archive_beyond_the_decompressed_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "MAX_MEMBER", 1000)  # a real batch of 4 images is 12 kB: a bomb in miniature
    with pytest.raises(ValueError, match="above the bound of 1000"):
        cifar.load_cifar(make_tarball(tmp_path / "t.tar.gz"))


def test_non_finite_weights_are_named_on_load(teacher, tmp_path):
    ckpt = torch.load(teacher / "ckpt.pt", weights_only=True)
    ckpt["ema"]["out.2.bias"][0] = math.inf
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match=r"bad.pt: non-finite weights in ema \(1 tensors, first out.2.bias\)"):
        cifar.load_ckpt(str(tmp_path / "bad.pt"), "teacher")
