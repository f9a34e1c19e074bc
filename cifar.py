"""CIFAR-10 on one GPU: a flow-matching teacher, RealUID distillation, sampling, FID and a benchmark.

Convention (paths.py): data x0 at t = 0, Gaussian noise x1 at t = 1; images in [-1, 1], (B, 3, 32, 32).
Defaults are the paper's recipe (App. D). A step is one optimiser update of one network: `distill`
alternates K = 5 fake-model updates with one generator update, so its 500k steps are the paper's
500,000 gradient updates (83,333 of them the generator's), as in the authors' code.

  python cifar.py train    --out runs/teacher                                     # f*, Eq. (3)
  python cifar.py distill  --teacher runs/teacher/ckpt.pt --out runs/realuid      # Eqs. (16)-(17)
  python cifar.py finetune --teacher runs/teacher/ckpt.pt --generator runs/realuid/ckpt.pt --out runs/ft
  python cifar.py sample   --ckpt runs/realuid/ckpt.pt --png grid.png
  python cifar.py fid      --ckpt runs/realuid/ckpt.pt
  python cifar.py bench
Every command takes --device cpu (with --net small or tiny) for a smoke run without a GPU.
--teacher, --generator and --ckpt also take the authors' released files (README, "The authors' checkpoints").
"""
import argparse
import copy
import fcntl
import hashlib
import json
import math
import os
import pickle
import resource
import struct
import tarfile
import time
import urllib.request
import zlib

import numpy as np
import torch
from tqdm import tqdm

import fid
import losses
import nets
import paths

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
NUM_CLASSES = 10
GRID = 100  # images in each sample grid of a run: 10 x 10, column k = class k when conditional
MAX_N = {"sample": 10_000, "fid": 200_000}  # samples: a grid of 10k images is 100 MB, 200k FID features 3.3 GB
MAX_BATCH = 8192  # images per batch (the paper's: 256)
MAX_MEMBER = 256 * 2 ** 20  # bytes of one archive member once decompressed (a CIFAR-10 batch: 31 MB)
RESUME_FLAGS = ("net", "cond", "dropout", "lr", "batch", "ema", "clip", "warmup", "precision", "data_md5",
                "alpha", "beta", "gamma", "delta_beta", "fake_steps", "fake_init", "teacher_md5")  # the maths
EXPECTED = (OSError, ValueError, KeyError, FloatingPointError)  # failures main reports in one line


# ============================================================================= settings
def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    cmd = {name: sub.add_parser(name, help=text) for name, text in (
        ("train", "train the flow-matching teacher f*, Eq. (3)"),
        ("distill", "RealUID distillation of a teacher into a one-step generator, Eqs. (16)-(17)"),
        ("finetune", "fine-tune a distilled generator with RealUID (App. D): f from the teacher, lr 1e-5"),
        ("sample", "write a PNG grid of samples"),
        ("fid", "FID of a teacher (--nfe Euler steps) or a generator (one step)"),
        ("bench", "updates per second of the teacher, fake and generator updates (random data), peak memory"))}

    def add(names, flag, **kwargs):  # the flag, for each command named
        for name in names.split():
            cmd[name].add_argument(flag, **kwargs)

    R, D, ALL = "train distill finetune", "distill finetune", "train distill finetune sample fid bench"
    add(ALL, "--device", default="cuda", help="cuda (real runs) or cpu (smoke runs)")
    add(ALL, "--seed", type=int, default=0, help="seed of initialisation, noise and data order, in [0, 2^64)")
    # data and FID
    add(f"{R} fid", "--data-dir", default="data", help="home of cifar-10-python.tar.gz (downloaded) and FID caches")
    add(f"{R} fid", "--data-tarball", default=None, help="a local tarball in the CIFAR-10 python layout")
    add(f"{R} fid", "--md5", default=CIFAR_MD5, help="the tarball's MD5 (default: CIFAR-10's); 'none' skips it")
    add(f"{R} fid", "--inception-weights", default=None, help="FID weights (default: pytorch-fid's); 'random': tests")
    add(f"{R} fid", "--fid-ref", default=None, help="reference FID stats .npz (mu, sigma); default: the training set's")
    add(f"{R} fid", "--fid-batch", type=int, default=500, help=f"images per batch for FID, at most {MAX_BATCH}")
    # speed
    add(f"{R} bench", "--precision", default=None, choices=["bf16", "fp32"], help="bf16 (default on cuda): bf16 "
        "autocast for teacher and fake updates and G's forward; f* and f in G's updates, sampling, FID: float32")
    add(f"{R} bench", "--compile", action="store_true", help="torch.compile the networks (CUDA)")
    # the run folder
    add(R, "--out", required=True, help="run folder: ckpt.pt, metrics.jsonl, samples_*.png, lock")
    add(R, "--resume", action="store_true", help="continue OUT/ckpt.pt exactly (nets, EMA, optimisers, step, RNG); "
        f"refused if a flag of the maths differs from the run's: {', '.join(RESUME_FLAGS)}")
    add(R, "--override", action="append", default=[], metavar="FLAG", help="with --resume: continue although FLAG "
        "differs (repeat for each); metrics.jsonl records it")
    add(f"{R} bench", "--batch", type=int, default=256, help=f"batch size of every update, at most {MAX_BATCH}")
    add(R, "--clip", type=float, default=1.0, help="gradient-norm clipping of every update (> 0)")
    add(R, "--ema", type=float, default=0.999, help="EMA decay of the weights that are sampled, in [0, 1)")
    add(R, "--log-every", type=int, default=100, help="steps between metrics.jsonl rows")
    add(R, "--sample-every", type=int, default=5000, help="steps between sample grids")
    add(R, "--ckpt-every", type=int, default=5000, help="steps between checkpoints (and at the end)")
    add(R, "--fid-samples", type=int, default=10000, help=f"samples of the periodic FID, at most {MAX_N['fid']}")
    # the teacher f*, Eq. (3)
    add("train bench", "--net", default="paper", choices=list(nets.UNET_PRESETS), help="U-Net preset")
    add("train bench", "--cond", action="store_true", help="class-conditional (labels added to the time embedding)")
    add("train", "--lr", type=float, default=2e-4, help="Adam learning rate, betas (0.9, 0.999); in (0, 1)")
    add("train", "--steps", type=int, default=400_000, help="teacher updates")
    add("train", "--warmup", type=int, default=5000, help="linear learning-rate warm-up, in updates")
    add("train", "--dropout", type=float, default=0.1, help="U-Net dropout, in [0, 1)")
    add("train", "--nfe", type=int, default=100, help="Euler steps of the sample grids and the periodic FID")
    add("train", "--fid-every", type=int, default=20000, help="steps between FIDs of the EMA teacher (0: never)")
    # distillation, Eqs. (16)-(17); bench times its updates
    add(f"{D} bench", "--alpha", type=float, default=0.92, help="alpha of RealUM, Eq. (16); in (0, 1], 1 needs beta 1")
    add(f"{D} bench", "--beta", type=float, default=0.94, help="beta of RealUM, Eq. (16); in (0, 1]; alpha = beta = 1: "
        "data-free UID")
    add(f"{D} bench", "--gamma", type=float, default=None, help="gamma of the general RealUID loss, App. A.2 "
        "(default: Eqs. (16)-(17), i.e. gamma = alpha)")
    add(f"{D} bench", "--delta-beta", action="store_true", help="with --gamma: delta = beta (f* - f), not f* - f")
    add(f"{D} bench", "--fake-steps", type=int, default=5, help="K, fake-model updates per generator update")
    add(f"{D} bench", "--lr", type=float, default=3e-5,
        help="Adam learning rate of G and f, betas (0, 0.999), in (0, 1)")
    add(D, "--teacher", required=True, help="teacher checkpoint (train's, or the authors' file); its EMA is f*")
    add(D, "--ema-key", default=None, help="the EMA decay (0.999, 0.9999) to read from each authors' file given; "
        "needed where a file holds several")
    add(D, "--teacher-ema-key", default=None, help="the teacher file's, where it differs (default: --ema-key)")
    add(D, "--steps", type=int, default=500_000, help="updates of either network: a generator update after every K "
        "fake-model updates (500k: the paper's)")
    add(D, "--warmup", type=int, default=500, help="linear learning-rate warm-up of each network, in its own updates")
    add(D, "--fake-init", default="random", choices=["random", "teacher"], help="initial weights of the fake model f")
    add("distill", "--generator", default=None, help="start G from this distilled checkpoint's G_ema")
    add("finetune", "--generator", required=True, help="the distilled checkpoint whose G_ema G starts from")
    add(D, "--fid-every", type=int, default=5000, help="steps between FIDs of G_ema (0: never)")
    # the authors' fine-tuning run: beta/alpha ~ 0.94, lr 1e-5, f from the teacher, 100k updates
    cmd["finetune"].set_defaults(alpha=0.92, beta=0.86, lr=1e-5, warmup=0, fake_init="teacher", steps=100_000)
    add("bench", "--iters", type=int, default=10, help="timed updates per kind")
    add("bench", "--warmup-iters", type=int, default=3, help="untimed updates first")
    cmd["bench"].set_defaults(clip=1.0, ema=0.999, warmup=0, dropout=0.1)  # the defaults of train and distill
    # sampling
    add("sample fid", "--ckpt", required=True, help="a teacher or generator checkpoint, or the authors' file")
    add("sample fid", "--ema-key", default=None, help="the EMA decay to read from an authors' file with several")
    add("sample fid", "--nfe", type=int, default=100, help="Euler steps of a teacher; a generator takes one")
    add("sample", "--n", type=int, default=100, help=f"number of samples, at most {MAX_N['sample']}")
    add("fid", "--n", type=int, default=50_000, help=f"number of samples, at most {MAX_N['fid']}")
    add("sample", "--png", required=True, help="output PNG (a file, not a folder)")
    add("sample", "--nrow", type=int, default=10, help="images per grid row")
    return check_args(parser, parser.parse_args(argv))


def check_args(parser, args):
    """Every number before any work: counts (0 only where it means none; an FID needs 2 samples), rates, Eq. (16)."""
    least = dict(steps=1, batch=1, fake_steps=1, log_every=1, sample_every=1, ckpt_every=1, fid_batch=1, nfe=1,
                 n=2 if args.cmd == "fid" else 1, nrow=1, iters=1, fid_samples=2, warmup=0, fid_every=0,
                 warmup_iters=0)
    for name, low in least.items():
        if getattr(args, name, low) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}; got {getattr(args, name)}")
    most = dict(n=MAX_N.get(args.cmd, 0), fid_samples=MAX_N["fid"], batch=MAX_BATCH, fid_batch=MAX_BATCH)
    for name, high in most.items():
        if getattr(args, name, 0) > high:
            parser.error(f"--{name.replace('_', '-')} must be at most {high}; got {getattr(args, name)}")
    for name, low, high in (("lr", 0, 1), ("clip", 0, math.inf), ("ema", 0, 1), ("dropout", 0, 1)):
        value = getattr(args, name, 0.5)
        if not (low < value < high if name in ("lr", "clip") else low <= value < high):
            interval = {"clip": "(0, inf)", "lr": "(0, 1)"}.get(name, "[0, 1)")
            parser.error(f"--{name} must be in {interval}; got {value}")
    if not 0 <= args.seed < 2 ** 64:
        parser.error(f"--seed must be in [0, 2^64); got {args.seed}")
    if getattr(args, "out", "x") == "" or getattr(args, "png", "x") == "":
        parser.error("--out and --png need a path; got ''")
    args.override = [flag.lstrip("-").replace("-", "_") for flag in getattr(args, "override", [])]
    if any(flag not in RESUME_FLAGS for flag in args.override) or (args.override and not args.resume):
        parser.error(f"--override takes flags of the maths ({', '.join(RESUME_FLAGS)}), with --resume; "
                     f"got {args.override}")
    if getattr(args, "delta_beta", False) and args.gamma is None:
        parser.error("--delta-beta parametrises the general loss: give --gamma too (App. A.2)")
    try:
        if hasattr(args, "alpha"):
            losses.check_alpha_beta(args.alpha, args.beta)
            if args.gamma is not None:
                losses.check_gamma(args.gamma)
    except ValueError as e:
        parser.error(str(e))
    if getattr(args, "precision", "") is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def setup(args):
    """Device, seed and precision. TF32 stays off: the generator update needs true float32 (README, Precision)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("cifar.py: no CUDA GPU found. Real runs (the paper's recipe) need one; for a smoke "
                         "run pass --device cpu (and --net small or tiny).")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # cudnn's default is True
    return dev


def recipe(args):
    """The settings of distill_update, from distill's (or bench's) flags."""
    return dict(K=args.fake_steps, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                delta_scale=args.beta if args.delta_beta else 1.0, lr=args.lr, warmup=args.warmup,
                clip=args.clip, ema=args.ema, bf16=args.precision == "bf16")


# ============================================================================= the method
def autocast(dev, bf16):
    """bf16 autocast when asked (on the CPU it emulates the CUDA rounding)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)


def conditioned(net, y):
    """The model callable f(x, t) of paths.py, with the class labels y (B,) bound (None: unconditional)."""
    return lambda x, t: net(x, t, y)


def warmup_lr(lr, warmup, n):
    """Learning rate of a network's update number n (from 0): linear warm-up over `warmup` of its own updates."""
    return lr * min(1.0, (n + 1) / max(1, warmup))


def update(net, opt, loss, lr, clip, what, step):
    """One optimiser update of net on loss, gradient norm clipped to clip: {loss, grad_norm, lr}."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite {what} loss {loss.item()} at step {step}")
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}


@torch.no_grad()
def ema_update(ema, net, decay):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def teacher_update(step, net, net_ema, opt, x0, y, lr, warmup, clip, ema, bf16):
    """Teacher update number `step`, Eq. (3), then the EMA. Returns the metrics row."""
    dev, path = x0.device, paths.FlowMatching()
    with autocast(dev, bf16):  # bf16 is harmless here: no difference of two networks is taken
        x1 = torch.randn(x0.shape, device=dev).to(x0.dtype)  # (B, 3, 32, 32) noise end, drawn as in distill_update
        # Eq. (3) in the authors' units: averaged over the 3 x 32 x 32 values (their F.mse_loss), not summed,
        # so that clip 1.0 and lr 2e-4 act as in App. D
        loss = losses.um_loss(path, conditioned(net, y), x0, x1).mean() / x0[0].numel()
    row = update(net, opt, loss, warmup_lr(lr, warmup, step), clip, "teacher", step)
    ema_update(net_ema, net, ema)
    return row


def distill_update(step, G, G_ema, f_star, f_fake, opt_G, opt_fake, x0_real, y,
                   K, alpha, beta, gamma, delta_scale, lr, warmup, clip, ema, bf16):
    """Distillation update number `step`: a fake-model update, Eq. (16), except every (K + 1)-th, which
    updates the generator, Eq. (17) (then its EMA); gamma: the general loss of App. A.2 instead, with
    delta = delta_scale (f* - f). Returns the metrics row of the updated network."""
    dev, path = x0_real.device, paths.FlowMatching()
    f_star_y, f_fake_y, G_y = conditioned(f_star, y), conditioned(f_fake, y), conditioned(G, y)  # f(x, t)
    # x1: the path's noise end; z: the generator's input; drawn in float32 whatever x0's dtype, so that a
    # float64 reference (the tests) sees the same draws
    x1, z = (torch.randn(x0_real.shape, device=dev).to(x0_real.dtype) for _ in range(2))
    if step % (K + 1) < K:  # fake update: f learns the generator's own field (RealUM, Eq. 16)
        name, net, opt, n = "fake", f_fake, opt_fake, step - step // (K + 1)  # n: f's updates before this one
        with autocast(dev, bf16):
            with torch.no_grad():  # generated images are plain data for the fake update: no graph into G
                x0_gen = path.generate(G_y, z)
            if gamma is None:
                loss = losses.realum_loss(path, f_fake_y, x0_gen, x0_real, x1, alpha, beta).mean()
            else:
                loss = losses.general_fake_loss(path, f_star_y, f_fake_y, x0_gen, x0_real, x1, alpha, beta, gamma,
                                                delta_scale).mean()
    else:  # generator update (RealUID, Eq. 17): the losses hold f* and f fixed; G gets the gradient via x_t, c
        name, net, opt, n = "G", G, opt_G, step // (K + 1)
        with autocast(dev, bf16):
            x0_gen = path.generate(G_y, z)
        # f* and f in float32: the gradient is driven by f*(x_t) - f(x_t), a small difference that bf16's
        # rounding would swamp late in training (README, Precision; tests: f_is_close_to_the_teacher)
        with torch.autocast(dev.type, enabled=False):
            if gamma is None:
                loss = losses.realuid_loss(path, f_star_y, f_fake_y, x0_gen, x1, alpha, beta).mean()
            else:
                loss = losses.general_generator_loss(path, f_star_y, f_fake_y, x0_gen, x1, alpha, beta, gamma,
                                                     delta_scale).mean()
    row = update(net, opt, loss, warmup_lr(lr, warmup, n), clip, name, step)
    if name == "G":
        ema_update(G_ema, G, ema)
    return {f"{key}_{name}": value for key, value in row.items()}


def train(args):
    """Flow-matching teacher f*, Eq. (3): ||f(x_t) - (x1 - x0)||^2 with x_t = (1 - t) x0 + t x1."""
    dev, path = setup(args), paths.FlowMatching()
    unet = dict(nets.UNET_PRESETS[args.net], dropout=args.dropout, num_classes=NUM_CLASSES if args.cond else 0)
    net = make_net(unet, dev, args.compile)
    net_ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), fused=dev.type == "cuda")
    bf16 = args.precision == "bf16"
    run(args, dev, "teacher", unet, {"net": net, "ema": net_ema, "opt": opt},
        lambda z, y: path.sample(conditioned(net_ema, y), z, args.nfe),  # grids and FID: nfe Euler steps
        lambda step, x0, y: teacher_update(step, net, net_ema, opt, x0, y, args.lr, args.warmup, args.clip,
                                           args.ema, bf16))


def distill(args):
    """RealUID, Eqs. (16)-(17): K fake-model updates, then one generator update, `--steps` updates in all."""
    dev, path = setup(args), paths.FlowMatching()
    teacher = load_ckpt(args.teacher, "teacher", dev, args.teacher_ema_key or args.ema_key)
    unet = dict(teacher["unet"], dropout=0.0)  # no dropout in distillation
    f_star = make_net(unet, dev, args.compile)
    f_star.load_state_dict(teacher["ema"])
    f_star.eval().requires_grad_(False)  # the teacher is never trained
    unet_G, start = unet, teacher["ema"]  # generator G(z) = z - g(z, 1): the teacher's EMA weights, or a G_ema
    if args.generator:  # in its own time convention; its preset and classes must be the teacher's
        generator = load_ckpt(args.generator, "generator", dev, args.ema_key)
        unet_G, start = dict(generator["unet"], dropout=0.0), generator["G_ema"]
        if {**unet_G, "authors_time": 0} != {**unet, "authors_time": 0}:
            raise SystemExit(f"--generator {args.generator} has the U-Net {describe(unet_G)}, the teacher "
                             f"{args.teacher} {describe(unet)}: the preset and classes must agree")
    G = make_net(unet_G, dev, args.compile)
    G.load_state_dict(start)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    f_fake = make_net(unet, dev, args.compile)  # fake model f: random weights, or the teacher's
    if args.fake_init == "teacher":
        f_fake.load_state_dict(teacher["ema"])
    opt_G, opt_fake = (torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=dev.type == "cuda")
                       for net in (G, f_fake))
    settings = recipe(args)

    def one_update(step, x0_real, y):  # the generator update uses only y of the real batch
        row = distill_update(step, G, G_ema, f_star, f_fake, opt_G, opt_fake, x0_real, y, **settings)
        return dict(row, generator_updates=(step + 1) // (args.fake_steps + 1))
    run(args, dev, "generator", unet_G, {"G": G, "G_ema": G_ema, "f_fake": f_fake, "opt_G": opt_G,
                                       "opt_fake": opt_fake},
        lambda z, y: path.generate(conditioned(G_ema, y), z), one_update)  # grids and FID: one step


def run(args, dev, kind, unet, state, sampler, one_update):
    """The training loop of train and distill: a real batch, one_update(step, x0, y) -> metrics, then the
    periodic FID, the metrics row, the checkpoint and the sample grid, when due. state: {checkpoint key:
    module or optimiser}, restored by --resume."""
    images, labels = load_cifar(args.tarball)
    cond = unet["num_classes"] > 0
    data_gen, start, log, fid_tools = begin_run(args, dev, kind, state)
    row, tic, bar = {}, time.time(), tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.cmd)
    for step in bar:
        x0, y = real_batch(images, labels, args.batch, data_gen, dev)
        row.update(one_update(step, x0, y if cond else None))
        done = step + 1
        if fid_tools and done % args.fid_every == 0:
            row["fid"] = fid_of(sampler, args.fid_samples, args.fid_batch, cond, dev, *fid_tools)
        if "fid" in row or done % args.log_every == 0 or done == args.steps:
            log_row(log, dict(step=done, **row, sec_per_step=(time.time() - tic) / (done - start)))
            bar.unpause() if "fid" in row else None  # the bar's rate and ETA: updates only
            row.pop("fid", None)
        if done % args.ckpt_every == 0 or done == args.steps:
            save_ckpt(os.path.join(args.out, "ckpt.pt"), {"kind": kind, "args": vars(args), "step": done,
                      "unet": unet, **{key: m.state_dict() for key, m in state.items()}, "rng": rng_state(data_gen)})
        if done % args.sample_every == 0 or done == args.steps:  # fixed noise; conditional: column k = class k
            save_grid(os.path.join(args.out, f"samples_{done:07d}.png"),
                      next(generate_uint8(sampler, GRID, GRID, cond, dev, seed=1)))
            bar.unpause()


def sample(args):
    dev = setup(args)
    if os.path.abspath(args.png) == os.path.abspath(args.ckpt) or os.path.isdir(args.png) \
            or not os.path.isdir(os.path.dirname(os.path.abspath(args.png))):
        raise SystemExit(f"--png {args.png}: a folder, the checkpoint itself, or in a folder that does not exist")
    sampler, cond = load_sampler(args.ckpt, args.ema_key, args.nfe, dev)
    save_grid(args.png, torch.cat(list(generate_uint8(sampler, args.n, 500, cond, dev, args.seed))), args.nrow)
    print(f"wrote {args.png} ({args.n} samples{', column k = class k' if cond and args.nrow == 10 else ''})")


def fid_command(args):
    dev = setup(args)
    log_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "fid.jsonl")
    if not os.access(log_path if os.path.exists(log_path) else os.path.dirname(log_path), os.W_OK):
        raise SystemExit(f"{log_path}: not writable; the FID would be lost")
    sampler, cond = load_sampler(args.ckpt, args.ema_key, args.nfe, dev)
    inception, ref = inception_and_reference(args, dev)
    tic = time.time()
    value = fid_of(sampler, args.n, args.fid_batch, cond, dev, inception, ref, args.seed)
    if not math.isfinite(value):
        raise SystemExit(f"FID is {value} (non-finite statistics); nothing written")
    result = {"fid": value, "ckpt": args.ckpt, "n": args.n, "seconds": time.time() - tic, "args": vars(args)}
    print(json.dumps(result))
    with open(log_path, "a") as log:
        log.write(json.dumps(result) + "\n")
    return value


def bench(args):
    """Updates per second of teacher_update and distill_update (the code train and distill run) on random data."""
    dev, K = setup(args), args.fake_steps
    adam = lambda m, b1: torch.optim.Adam(m.parameters(), lr=args.lr, betas=(b1, 0.999),  # noqa: E731
                                          fused=dev.type == "cuda")
    unet = dict(nets.UNET_PRESETS[args.net], num_classes=NUM_CLASSES if args.cond else 0)
    teacher, f_star, G, f_fake = (make_net(dict(unet, dropout=d), dev, args.compile) for d in (args.dropout, 0, 0, 0))
    teacher_ema, G_ema = copy.deepcopy(teacher).requires_grad_(False), copy.deepcopy(G).requires_grad_(False)
    f_star.requires_grad_(False)
    opt_teacher, opt_G, opt_fake = adam(teacher, 0.9), adam(G, 0.0), adam(f_fake, 0.0)
    x0 = torch.rand(args.batch, 3, 32, 32, device=dev) * 2 - 1  # (B, 3, 32, 32)
    y = torch.randint(NUM_CLASSES, (args.batch,), device=dev) if args.cond else None
    settings, bf16 = recipe(args), args.precision == "bf16"
    updates = {
        "teacher": lambda: teacher_update(0, teacher, teacher_ema, opt_teacher, x0, y, args.lr, args.warmup, args.clip,
                                          args.ema, bf16),
        "fake": lambda: distill_update(0, G, G_ema, f_star, f_fake, opt_G, opt_fake, x0, y, **settings),
        "generator": lambda: distill_update(K, G, G_ema, f_star, f_fake, opt_G, opt_fake, x0, y, **settings)}
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
              f"cpu, {torch.get_num_threads()} threads", "net": args.net,
              "params_M": round(sum(p.numel() for p in G.parameters()) / 1e6, 2), "batch": args.batch,
              "precision": args.precision, "compile": args.compile}
    for name, step in updates.items():
        for i in range(args.warmup_iters + args.iters):
            if i == args.warmup_iters:  # the timed updates start
                torch.cuda.synchronize() if dev.type == "cuda" else None
                tic = time.time()
            step()
        torch.cuda.synchronize() if dev.type == "cuda" else None
        result[f"{name}_it_per_s"] = round(args.iters / (time.time() - tic), 3)
    result["distill_iteration_per_s"] = round(1 / (K / result["fake_it_per_s"] + 1 / result["generator_it_per_s"]), 3)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_GiB"] = round(peak / 2 ** (30 if dev.type == "cuda" else 20), 2)  # CPU: the peak RSS (KiB)
    print(json.dumps(result))
    return result


def main(argv=None):
    """Run a command; an expected failure (a bad file, a checkpoint, statistics, a download, a non-finite loss)
    ends in one line and exit status 1, anything else in its traceback."""
    args, lock = parse(argv), None
    command = {"train": train, "distill": distill, "finetune": distill, "sample": sample, "fid": fid_command,
               "bench": bench}
    try:
        if args.cmd in ("train", "distill", "finetune"):
            os.makedirs(args.out, exist_ok=True)
            lock = lock_run(args.out)  # before any work: one run per folder
        if args.cmd in ("train", "distill", "finetune") or (args.cmd == "fid" and not args.fid_ref):
            args.tarball = fetch(args.data_dir, args.data_tarball, args.md5)
            args.data_md5 = args.md5 if args.md5 != "none" else md5sum(args.tarball)
        if lock is not None:
            check_run(args)
        return command[args.cmd](args)
    except EXPECTED as e:
        raise SystemExit(f"cifar.py: error: {e.args[0] if isinstance(e, KeyError) else e}") from e
    finally:
        if lock is not None:
            unlock_run(lock)


# ============================================================================= not part of the method:
# networks and checkpoints on disk, the run folder, sampling for FID, the data without torchvision, PNG grids
def make_net(unet, dev, compile=False):
    net = nets.UNet(**unet).to(dev)
    net = net.to(memory_format=torch.channels_last) if dev.type == "cuda" else net
    if compile:
        net.compile()  # in place: the module (and its state_dict keys) stay the same
    return net


def save_ckpt(path, ckpt):
    """torch.save to a temporary file, then rename; never with non-finite weights, never a partial file."""
    for key, value in ckpt.items():
        if key in ("net", "ema", "G", "G_ema", "f_fake") and not all(v.isfinite().all() for v in value.values()
                                                                     if v.is_floating_point()):
            raise FloatingPointError(f"non-finite weights in {key} at step {ckpt['step']}; {path} keeps the last "
                                     "good ones")
    try:
        torch.save(ckpt, path + ".tmp")
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise SystemExit(f"could not write {path} ({e}); no space left on the device? The last checkpoint is "
                         "kept.") from e
    os.replace(path + ".tmp", path)


def load_ckpt(path, kind, dev="cpu", ema_key=None):
    """A checkpoint of this kind ('teacher', 'generator' or None for either), with a U-Net config of nets.py's
    presets. The authors' files are read as one (ema_key: the EMA decay in it)."""
    try:
        ckpt = torch.load(path, map_location=dev, weights_only=True)
    except Exception as e:  # a missing, truncated or foreign file
        raise SystemExit(f"{path}: not a readable cifar.py checkpoint ({type(e).__name__}: {e})") from e
    if nets.authors_kind(ckpt):
        ckpt = authors_ckpt(path, ckpt, ema_key)
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ((kind,) if kind else ("teacher", "generator")):
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"{path}: not a {kind or 'cifar.py'} checkpoint (kind {found!r})")
    unet = ckpt.get("unet")
    shape = {k: v for k, v in unet.items() if k not in ("dropout", "num_classes", "authors_time")} \
        if isinstance(unet, dict) else None
    if shape not in list(nets.UNET_PRESETS.values()) or unet.get("num_classes") not in (0, NUM_CLASSES) \
            or not 0 <= unet.get("dropout", -1) < 1:
        raise SystemExit(f"{path}: its U-Net config {unet} is none of nets.UNET_PRESETS; refusing to build it")
    for key in ("net", "ema", "G", "G_ema", "f_fake"):
        weights = ckpt.get(key, {})
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise SystemExit(f"{path}: {key} is not a state_dict of tensors")
        bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise SystemExit(f"{path}: non-finite weights in {key} ({len(bad)} tensors, first {bad[0]})")
    return ckpt


def describe(unet):
    preset = next((k for k, v in nets.UNET_PRESETS.items() if all(unet.get(a) == b for a, b in v.items())), "?")
    classes = f"{unet['num_classes']} classes" if unet["num_classes"] else "unconditional"
    return f"{preset!r} ({classes}, {'authors' if unet.get('authors_time') else 'our'} time convention)"


def authors_ckpt(path, ckpt, ema_key):
    """The authors' torchcfm-layout file (nets.load_authors) as a cifar.py checkpoint of its EMA network only:
    a teacher's f* ("ema") or a generator's g ("G_ema"), G(z) = z - g(z, 1) = z + u(z, 0) in their convention."""
    errors = []
    for preset in nets.UNET_PRESETS.values():  # the preset of the file's shapes; "paper" for the authors' own
        try:
            kind, unet, weights = nets.load_authors(ckpt, ema_key, **preset)
            return {"kind": kind, "unet": dict(unet, dropout=0.0), "ema" if kind == "teacher" else "G_ema": weights}
        except ValueError as e:
            errors.append(e)
    raise SystemExit(f"{path} (the authors' file; --ema-key picks its EMA decay): {errors[0]}")  # paper's complaint


def load_sampler(path, ema_key, nfe, dev):
    """(sampler(z, y), conditional?) of a checkpoint: a teacher's EMA with nfe Euler steps, or G_ema."""
    ckpt = load_ckpt(path, None, dev, ema_key)
    net = make_net(ckpt["unet"], dev).eval().requires_grad_(False)
    net.load_state_dict(ckpt["ema"] if ckpt["kind"] == "teacher" else ckpt["G_ema"])
    path, cond = paths.FlowMatching(), ckpt["unet"]["num_classes"] > 0
    if ckpt["kind"] == "generator":  # one step G(z); a teacher: nfe Euler steps from t = 1
        return (lambda z, y: path.generate(conditioned(net, y), z)), cond
    return (lambda z, y: path.sample(conditioned(net, y), z, nfe)), cond


@torch.no_grad()
def generate_uint8(sampler, n, batch, cond, dev, seed=0):
    """n uint8 images in batches, in float32, from seeded noise; class-balanced labels y = i mod 10 when conditional."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z = torch.randn(b, 3, 32, 32, generator=gen, device=dev)
        y = torch.arange(i, i + b, device=dev) % NUM_CLASSES if cond else None
        yield fid.to_uint8(sampler(z, y).float()).cpu()


def inception_and_reference(args, dev):
    """The FID Inception network and the reference (mu, sigma): --fid-ref, or the training images' (the
    paper's protocol), computed once and cached in --data-dir."""
    if args.inception_weights == "random":  # tests: the FID plumbing with an untrained network, no cache
        model = fid.InceptionV3().eval().to(dev)
        return model, fid.load_stats(args.fid_ref) if args.fid_ref else \
            fid.stats(fid.features(model, load_cifar(args.tarball)[0].split(250), dev))
    try:
        model = fid.load_inception(args.inception_weights, device=dev)
    except RuntimeError as e:  # the download failed
        raise OSError(str(e)) from e
    if args.fid_ref:
        return model, fid.load_stats(args.fid_ref)
    weights = args.inception_weights or fid.download_weights()  # downloaded by load_inception already
    cache = os.path.join(args.data_dir, f"fid_ref_{md5sum(args.tarball)[:8]}_{md5sum(weights)[:8]}.npz")
    if not os.path.exists(cache):
        os.makedirs(args.data_dir, exist_ok=True)
        fid.save_stats(cache, *fid.stats(fid.features(model, load_cifar(args.tarball)[0].split(250), dev)))
    return model, fid.load_stats(cache)


def fid_of(sampler, n, batch, cond, dev, inception, ref, seed=0):
    feats = fid.features(inception, generate_uint8(sampler, n, batch, cond, dev, seed), dev, total=-(-n // batch))
    return fid.frechet_distance(*fid.stats(feats), *ref)


def lock_run(out):
    """An exclusive lock on the run folder for this process's life (fcntl.flock on OUT/lock, which names the
    holder's pid). The kernel drops it when the process dies: a lock file that still names a pid but is not
    held was left by a killed run, and is reported and taken over."""
    fd = os.open(os.path.join(out, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"{out} is in use by another run (pid {holder or '?'}, {out}/lock): one run per folder at "
                         "a time; wait for it, or choose another --out") from None
    stale = os.pread(fd, 64, 0).decode(errors="replace").strip()  # a run that ended cleanly emptied it
    if stale:
        print(f"{out}/lock: the run of pid {stale} ended without releasing it (killed?); taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_run(fd):
    os.ftruncate(fd, 0)  # empty: released by a run that ended
    os.close(fd)


def check_run(args):
    """Before any work: --resume exactly when OUT holds a checkpoint, and then only with the run's maths
    (RESUME_FLAGS, the teacher file's content included) and more --steps than it has taken."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt_path) != args.resume:
        raise SystemExit(f"--resume: no {ckpt_path} to continue" if args.resume else f"{ckpt_path} exists: pass "
                         "--resume to continue that run, or choose another --out (or delete that folder) to start over")
    if args.cmd != "train":
        args.teacher_md5 = md5sum(args.teacher)
    if not args.resume:
        return
    try:  # mmap: the args and the step, without reading the weights
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        old, step = dict(ckpt["args"]), int(ckpt["step"])
    except Exception as e:
        raise SystemExit(f"{ckpt_path}: not a readable cifar.py checkpoint ({type(e).__name__}: {e})") from e
    if args.steps <= step:
        raise SystemExit(f"--resume: {ckpt_path} is at step {step} already; pass --steps above it to continue")
    old["data_md5"] = old.get("data_md5", old.get("md5"))  # a checkpoint older than data_md5: the --md5 it checked
    changed = [k for k in RESUME_FLAGS if k in vars(args) and k not in args.override and old.get(k) != vars(args)[k]]
    if changed:
        raise SystemExit(f"--resume: {ckpt_path} is a run with other settings: " + ", ".join(
            f"--{k.replace('_', '-')} {old.get(k)} -> {vars(args)[k]}" for k in changed) + "; pass --override FLAG "
            "for each to continue it with the new values")


def begin_run(args, dev, kind, state):
    """(data RNG, start step, metrics log, periodic-FID tools). With --resume: restores `state` ({checkpoint key:
    module or optimiser}), the RNG and the step, and cuts the log back to the checkpoint (cut_log); without, a
    log left by a run killed before its first checkpoint is deleted."""
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "metrics.jsonl")
    data_gen, start = torch.Generator().manual_seed(args.seed), 0
    if args.resume:
        ckpt = load_ckpt(ckpt_path, kind, dev)
        for key, m in state.items():
            m.load_state_dict(ckpt[key])
        rng = ckpt["rng"]  # RNG states must be CPU ByteTensors; load_ckpt put every tensor on dev
        torch.set_rng_state(rng["torch"].cpu())
        data_gen.set_state(rng["data"].cpu())
        if rng["cuda"]:
            torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
        start = ckpt["step"]
        cut_log(log_path, start)
    elif os.path.exists(log_path):  # a run killed before its first checkpoint: its rows are not this run's
        os.remove(log_path)
    fid_tools = inception_and_reference(args, dev) if 0 < args.fid_every <= args.steps else None
    log = open(log_path, "a")
    log_row(log, {"args": vars(args), "start": start})
    return data_gen, start, log, fid_tools


def cut_log(log_path, start):
    """metrics.jsonl cut back to its complete rows of steps up to `start`, atomically: the rows after the
    checkpoint are run again, and a torn or blank line (a kill during a write) is dropped."""
    if not os.path.exists(log_path):
        return
    kept, dropped = [], 0
    with open(log_path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:  # a torn line: bytes of a row cut mid-write, or no JSON at all
                row = None
            if isinstance(row, dict) and row.get("step", 0) <= start and row.get("start", 0) <= start:
                kept.append(line)
            else:
                dropped += bool(line.strip())
    with open(log_path + ".tmp", "wb") as f:
        f.writelines(kept)
    os.replace(log_path + ".tmp", log_path)
    if dropped:
        print(f"{log_path}: dropped {dropped} rows after step {start} or torn")


def log_row(log, row):
    log.write(json.dumps(row) + "\n")
    log.flush()


def rng_state(data_gen):
    return {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def md5sum(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch(data_dir, tarball=None, md5=CIFAR_MD5):
    """Path of a checked CIFAR-10-format tarball: `tarball` if given, else data_dir/cifar-10-python.tar.gz,
    downloaded from the official URL when missing. Its MD5 must equal `md5` unless md5 = "none"."""
    path = tarball or os.path.join(data_dir, os.path.basename(CIFAR_URL))
    if tarball and not os.path.exists(path):
        raise SystemExit(f"--data-tarball {path}: no such file")
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        print(f"downloading {CIFAR_URL} -> {path}")
        try:
            urllib.request.urlretrieve(CIFAR_URL, path + ".part")
        except OSError as e:  # URLError, timeouts, refused connections
            raise SystemExit(f"could not download {CIFAR_URL} ({e}). Offline? Copy cifar-10-python.tar.gz "
                             f"to {path} (or pass --data-tarball PATH) and run again.") from e
        os.replace(path + ".part", path)
    if md5 != "none" and md5sum(path) != md5:
        raise SystemExit(f"{path}: MD5 {md5sum(path)} != expected {md5}. A broken download? Delete it and run "
                         "again. Another dataset in the CIFAR-10 layout: pass --md5 <its md5> (or --md5 none).")
    return path


class BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts, lists, numpy arrays) and refuses every other global:
    an arbitrary pickle can run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing the global {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def load_cifar(path):
    """Training set of a CIFAR-10-format tarball: images (N, 3, 32, 32) uint8, labels (N,) int64.

    The batches are read from the archive in place, so nothing is ever extracted; an archive with an
    absolute or '..' member, or a link, is refused anyway, and so is every batch not in the exact layout."""
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            members, total = [], 0
            for m in tar:  # one header at a time: a gzip bomb stops at the bound, not at the memory's end
                total += m.size
                if m.name.startswith(("/", "\\")) or ".." in m.name.replace("\\", "/").split("/") \
                        or not (m.isfile() or m.isdir()):
                    raise ValueError(f"unsafe member {m.name!r} (absolute, '..' or a link); refusing the archive")
                if m.size > MAX_MEMBER or total > 8 * MAX_MEMBER:
                    raise ValueError(f"{m.name!r} makes {total} bytes decompressed, above the bound of "
                                     f"{MAX_MEMBER} per member and {8 * MAX_MEMBER} in all (CIFAR-10: 31 MB per batch)")
                members.append(m)
            by_name = {m.name: m for m in members}
            for b in range(1, 6):
                name = f"cifar-10-batches-py/data_batch_{b}"
                if name not in by_name:
                    raise ValueError(f"no {name}; not a CIFAR-10 python archive")
                batch = BatchUnpickler(tar.extractfile(by_name[name]), encoding="bytes").load()
                batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
                data, labels = batch.get("data"), np.asarray(batch.get("labels"))
                if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                        and data.shape[1] == 3072 and labels.shape == (len(data),) and labels.dtype.kind in "iu"
                        and (len(labels) == 0 or 0 <= labels.min() <= labels.max() < NUM_CLASSES)):
                    raise ValueError(f"{name}: data must be uint8 (N, 3072) and labels N integers in 0..9")
                xs.append(data.reshape(-1, 3, 32, 32))  # R, G, B planes, each row-major
                ys.append(labels.astype(np.int64))
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, UnicodeDecodeError, AttributeError,
            TypeError, ValueError, zlib.error) as e:
        raise ValueError(f"{path}: {e}") from e
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def real_batch(images, labels, n, gen, dev):
    """n random training images in [-1, 1], randomly flipped left-right, and their labels (n,)."""
    i = torch.randint(len(images), (n,), generator=gen)
    flip = (torch.rand(n, generator=gen) < 0.5)[:, None, None, None]
    x0 = images[i].float() / 127.5 - 1  # (n, 3, 32, 32)
    x0 = torch.where(flip, x0.flip(3), x0).to(dev)
    return x0.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x0, labels[i].to(dev)


def save_grid(path, images, nrow=10, pad=2):
    """images (B, 3, H, W) uint8 -> an 8-bit RGB PNG grid of nrow columns, pad-pixel black borders; atomic."""
    u8 = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    B, H, W, _ = u8.shape
    grid = np.zeros((pad + -(-B // nrow) * (H + pad), pad + nrow * (W + pad), 3), np.uint8)
    for k in range(B):
        top, left = pad + (k // nrow) * (H + pad), pad + (k % nrow) * (W + pad)
        grid[top:top + H, left:left + W] = u8[k]

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + row.tobytes() for row in grid)  # filter type 0 before each row
    header = struct.pack(">IIBBBBB", grid.shape[1], grid.shape[0], 8, 2, 0, 0, 0)  # 8-bit RGB
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                    + chunk(b"IEND", b""))
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


if __name__ == "__main__":
    main()
