"""CIFAR-10 on one GPU: a flow-matching teacher, RealUID distillation, sampling, FID and a benchmark.

Convention (paths.py): data x0 at t = 0, Gaussian noise x1 at t = 1; images in [-1, 1] of shape
(B, 3, 32, 32). Defaults are the paper's recipe, PAPER.md section 7 (paper App. D).

  python cifar.py train    --out runs/teacher                                     # f*, Eq. (3)
  python cifar.py distill  --teacher runs/teacher/ckpt.pt --out runs/uid          # Eqs. (16)-(17)
  python cifar.py finetune --teacher runs/teacher/ckpt.pt --generator runs/uid/ckpt.pt --out runs/ft
  python cifar.py sample   --ckpt runs/uid/ckpt.pt --png grid.png
  python cifar.py fid      --ckpt runs/uid/ckpt.pt
  python cifar.py bench
Every command takes --device cpu (with --net small or tiny) for a smoke run without a GPU.
"""
import argparse
import copy
import hashlib
import json
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


# ----------------------------------------------------------------------------- data, without torchvision
def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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

    The batches are read from the archive in place, so nothing is ever extracted (let alone written
    outside --data-dir); an archive with an absolute or '..' member, or a link, is refused anyway."""
    xs, ys = [], []
    with tarfile.open(path, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            if m.name.startswith(("/", "\\")) or ".." in m.name.replace("\\", "/").split("/") \
                    or not (m.isfile() or m.isdir()):
                raise ValueError(f"{path}: unsafe member {m.name!r} (absolute, '..' or a link); refusing the archive")
        by_name = {m.name: m for m in members}
        for b in range(1, 6):
            name = f"cifar-10-batches-py/data_batch_{b}"
            if name not in by_name:
                raise ValueError(f"{path}: no {name}; not a CIFAR-10 python archive")
            batch = BatchUnpickler(tar.extractfile(by_name[name]), encoding="bytes").load()
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # R, G, B planes
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def real_batch(images, labels, n, gen, dev):
    """n random training images in [-1, 1], randomly flipped left-right, and their labels (n,)."""
    i = torch.randint(len(images), (n,), generator=gen)
    flip = (torch.rand(n, generator=gen) < 0.5)[:, None, None, None]
    x0 = images[i].float() / 127.5 - 1  # (n, 3, 32, 32)
    x0 = torch.where(flip, x0.flip(3), x0).to(dev)
    return x0.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x0, labels[i].to(dev)


# ----------------------------------------------------------------------------- PNG grids and checkpoints
def write_png(path, img):
    """img (H, W, 3) uint8 numpy -> an 8-bit RGB PNG, written atomically."""
    h, w, _ = img.shape

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + img[r].tobytes() for r in range(h))  # filter type 0 before each row
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    with open(path + ".tmp", "wb") as f:
        f.write(png)
    os.replace(path + ".tmp", path)


def save_grid(path, images, nrow=10, pad=2):
    """images (B, 3, H, W) uint8 -> a PNG grid of nrow columns with pad-pixel black borders."""
    u8 = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    B, H, W, _ = u8.shape
    grid = np.zeros((pad + -(-B // nrow) * (H + pad), pad + nrow * (W + pad), 3), np.uint8)
    for k in range(B):
        top, left = pad + (k // nrow) * (H + pad), pad + (k % nrow) * (W + pad)
        grid[top:top + H, left:left + W] = u8[k]
    write_png(path, grid)


def save_ckpt(path, ckpt):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_ckpt(path, dev="cpu"):
    return torch.load(path, map_location=dev, weights_only=True)


def rng_state(data_gen):
    return {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state, data_gen):
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- shared pieces
def setup(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("cifar.py: no CUDA GPU found. Real runs (the paper's recipe) need one; for a smoke "
                         "run pass --device cpu (and --net small or tiny).")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return dev


def autocast(dev):
    """bf16 autocast on CUDA; plain float32 on the CPU."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def make_net(unet, dev):
    net = nets.UNet(**unet).to(dev)
    return net.to(memory_format=torch.channels_last) if dev.type == "cuda" else net


def adam(net, args, dev, betas):
    return torch.optim.Adam(net.parameters(), lr=args.lr, betas=betas, fused=dev.type == "cuda")


def set_lr(opt, args, step):
    """Linear warm-up over args.warmup steps, then constant (a function of the step: resumes exactly)."""
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))


def optimise(opt, net, loss, clip, step, name):
    """One optimiser step on a scalar loss with gradient-norm clipping; returns the norm before clipping."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite {name} loss {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    opt.step()
    return norm.item()


@torch.no_grad()
def ema_update(ema, net, decay):
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def conditioned(net, y):
    """The model callable f(x, t) of paths.py, with the class labels y (B,) bound (None: unconditional)."""
    return lambda x, t: net(x, t, y)


def sampler(path, net, kind, steps):
    """(z, y) -> images: one step G(z) for a generator, `steps` Euler steps from t = 1 for a teacher."""
    if kind == "generator":
        return lambda z, y: path.generate(conditioned(net, y), z)
    return lambda z, y: path.sample(conditioned(net, y), z, steps)


@torch.no_grad()
def generate_uint8(sample, n, batch, cond, dev, seed=0):
    """n uint8 images in batches, from seeded noise; class-balanced labels y = i mod 10 when conditional."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z = torch.randn(b, 3, 32, 32, generator=gen, device=dev)
        y = torch.arange(i, i + b, device=dev) % NUM_CLASSES if cond else None
        with autocast(dev):
            x = sample(z, y)
        yield fid.to_uint8(x.float()).cpu()


def inception_and_reference(args, dev):
    """The FID Inception network and the reference (mu, sigma): --fid-ref, or the training images' (the
    paper's protocol), computed once and cached in --data-dir."""
    if args.inception_weights == "random":  # tests: the FID plumbing with an untrained network, no cache
        model = fid.InceptionV3().eval().to(dev)
        return model, fid.stats(fid.features(model, load_cifar(args.tarball)[0].split(250), dev))
    model = fid.load_inception(args.inception_weights, device=dev)
    if args.fid_ref:
        return model, fid.load_stats(args.fid_ref)
    weights = args.inception_weights or fid.download_weights()
    cache = os.path.join(args.data_dir, f"fid_ref_{md5sum(args.tarball)[:8]}_{md5sum(weights)[:8]}.npz")
    if not os.path.exists(cache):
        os.makedirs(args.data_dir, exist_ok=True)
        fid.save_stats(cache, *fid.stats(fid.features(model, load_cifar(args.tarball)[0].split(250), dev)))
    return model, fid.load_stats(cache)


def fid_of(sample, n, args, cond, dev, inception, ref):
    feats = fid.features(inception, generate_uint8(sample, n, args.fid_batch, cond, dev), dev)
    return fid.frechet_distance(*fid.stats(feats), *ref)


def begin_run(args, dev, state):
    """Data RNG and start step (restored with `state`, {checkpoint key: module or optimiser}, on
    --resume), periodic-FID tools, and the metrics log with the arguments as its first row."""
    data_gen, start, ckpt_path = torch.Generator().manual_seed(args.seed), 0, os.path.join(args.out, "ckpt.pt")
    if args.resume:
        ckpt = load_ckpt(ckpt_path, dev)
        for key, m in state.items():
            m.load_state_dict(ckpt[key])
        set_rng_state(ckpt["rng"], data_gen)
        start = ckpt["step"]
    fid_tools = inception_and_reference(args, dev) if 0 < args.fid_every <= args.steps else None
    log = open(os.path.join(args.out, "metrics.jsonl"), "a")
    log.write(json.dumps({"args": vars(args), "start": start}) + "\n")
    return data_gen, start, ckpt_path, fid_tools, log


def distill_losses(path, args):
    """The fake-model and generator losses: Eqs. (16)-(17), or the general loss of App. A.2 when
    --gamma is given or --delta beta (delta = beta (f* - f))."""
    a, b = args.alpha, args.beta
    if args.gamma is None and args.delta == "one":
        return (lambda f_star, f, x_gen, x_real, x1: losses.realum_loss(path, f, x_gen, x_real, x1, a, b),
                lambda f_star, f, x_gen, x1: losses.realuid_loss(path, f_star, f, x_gen, x1, a, b))
    g, s = (a if args.gamma is None else args.gamma), (b if args.delta == "beta" else 1.0)
    return (lambda f_star, f, x_gen, x_real, x1: losses.general_fake_loss(path, f_star, f, x_gen, x_real, x1, a, b, g, s),
            lambda f_star, f, x_gen, x1: losses.general_generator_loss(path, f_star, f, x_gen, x1, a, b, g, s))


# ----------------------------------------------------------------------------- commands
def train(args):
    """Flow-matching teacher f*, Eq. (3): ||f(x_t) - (x1 - x0)||^2 with x_t = (1 - t) x0 + t x1."""
    dev, path = setup(args), paths.FlowMatching()
    images, labels = load_cifar(args.tarball)
    unet = dict(nets.UNET_PRESETS[args.net], dropout=args.dropout, num_classes=NUM_CLASSES if args.cond else 0)
    net = make_net(unet, dev)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = adam(net, args, dev, betas=(0.9, 0.999))
    f = torch.compile(net) if args.compile else net
    data_gen, start, ckpt_path, fid_tools, log = begin_run(args, dev, {"net": net, "ema": ema, "opt": opt})
    grid_z = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev)  # fixed grid noise
    grid_y = torch.arange(100, device=dev) % NUM_CLASSES if args.cond else None  # column k: class k
    tic = time.time()
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc="teacher"):
        x0, y = real_batch(images, labels, args.batch, data_gen, dev)
        set_lr(opt, args, step)
        with autocast(dev):
            loss = losses.um_loss(path, conditioned(f, y if args.cond else None), x0, torch.randn_like(x0)).mean()
        grad_norm = optimise(opt, net, loss, args.clip, step, "teacher")
        ema_update(ema, net, args.ema)

        done = step + 1
        fid_now = fid_tools is not None and done % args.fid_every == 0
        if fid_now or done % args.log_every == 0 or done == args.steps:
            row = {"step": done, "loss": loss.item(), "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"],
                   "sec_per_it": (time.time() - tic) / (done - start)}
            if fid_now:
                row["fid"] = fid_of(sampler(path, ema, "teacher", args.sample_steps), args.fid_samples, args,
                                    args.cond, dev, *fid_tools)
            log.write(json.dumps(row) + "\n")
            log.flush()
        if done % args.sample_every == 0 or done == args.steps:
            with torch.no_grad(), autocast(dev):
                x = path.sample(conditioned(ema, grid_y), grid_z, args.sample_steps)
            save_grid(os.path.join(args.out, f"samples_{done:07d}.png"), fid.to_uint8(x.float()))
        if done % args.ckpt_every == 0 or done == args.steps:
            save_ckpt(ckpt_path, {"kind": "teacher", "args": vars(args), "step": done, "unet": unet,
                                  "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                  "rng": rng_state(data_gen)})


def distill(args):
    """RealUID, Eqs. (16)-(17): per iteration K fake-model steps, then one generator step."""
    losses.check_alpha_beta(args.alpha, args.beta)
    if args.gamma is not None:
        losses.check_gamma(args.gamma)
    dev, path = setup(args), paths.FlowMatching()
    images, labels = load_cifar(args.tarball)
    teacher = load_ckpt(args.teacher, dev)
    unet = dict(teacher["unet"], dropout=0.0)  # no dropout in distillation
    cond = unet["num_classes"] > 0
    f_star = make_net(unet, dev)
    f_star.load_state_dict(teacher["ema"])
    f_star.eval().requires_grad_(False)  # the teacher is never trained
    G = make_net(unet, dev)  # generator G(z) = z - g(z, 1): the teacher's EMA weights (fine-tuning: a G_ema)
    G.load_state_dict(load_ckpt(args.generator, dev)["G_ema"] if args.generator else teacher["ema"])
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    f_fake = make_net(unet, dev)  # fake model f: random weights, or the teacher's
    if args.fake_init == "teacher":
        f_fake.load_state_dict(teacher["ema"])
    opt_G, opt_fake = adam(G, args, dev, betas=(0.0, 0.999)), adam(f_fake, args, dev, betas=(0.0, 0.999))
    g, f, fs = (torch.compile(m) if args.compile else m for m in (G, f_fake, f_star))
    fake_loss, generator_loss = distill_losses(path, args)
    data_free = args.alpha == 1 and args.beta == 1 and args.gamma in (None, 1)  # no real-data term: UID
    data_gen, start, ckpt_path, fid_tools, log = begin_run(
        args, dev, {"G": G, "G_ema": G_ema, "f_fake": f_fake, "opt_G": opt_G, "opt_fake": opt_fake})
    grid_z = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev)
    grid_y = torch.arange(100, device=dev) % NUM_CLASSES if cond else None
    tic = time.time()
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc="distill"):
        set_lr(opt_G, args, step)
        set_lr(opt_fake, args, step)
        for _ in range(args.K):  # fake steps: f learns the generator's own field, Eq. (16)
            x0_real, y = real_batch(images, labels, args.batch, data_gen, dev)
            y = y if cond else None
            with autocast(dev):
                with torch.no_grad():  # generated images are plain data for the fake step: no graph into G
                    x0_gen = path.generate(conditioned(g, y), torch.randn_like(x0_real))
                loss_fake = fake_loss(conditioned(fs, y), conditioned(f, y), x0_gen,
                                      None if data_free else x0_real, torch.randn_like(x0_real)).mean()
            fake_norm = optimise(opt_fake, f_fake, loss_fake, args.clip, step, "fake-model")
        x0_real, y = real_batch(images, labels, args.batch, data_gen, dev)  # only the labels reach G
        y = y if cond else None
        with autocast(dev), losses.frozen(f_star, f_fake):  # generator step, Eq. (17): only G moves
            x0_gen = path.generate(conditioned(g, y), torch.randn_like(x0_real))
            loss_G = generator_loss(conditioned(fs, y), conditioned(f, y), x0_gen, torch.randn_like(x0_gen)).mean()
        G_norm = optimise(opt_G, G, loss_G, args.clip, step, "generator")
        ema_update(G_ema, G, args.ema)

        done = step + 1
        fid_now = fid_tools is not None and done % args.fid_every == 0
        if fid_now or done % args.log_every == 0 or done == args.steps:
            row = {"step": done, "loss_fake": loss_fake.item(), "loss_G": loss_G.item(), "grad_norm_fake": fake_norm,
                   "grad_norm_G": G_norm, "lr": opt_G.param_groups[0]["lr"],
                   "sec_per_it": (time.time() - tic) / (done - start)}
            if fid_now:
                row["fid"] = fid_of(sampler(path, G_ema, "generator", 1), args.fid_samples, args, cond, dev, *fid_tools)
            log.write(json.dumps(row) + "\n")
            log.flush()
        if done % args.sample_every == 0 or done == args.steps:
            with torch.no_grad(), autocast(dev):
                x = path.generate(conditioned(G_ema, grid_y), grid_z)
            save_grid(os.path.join(args.out, f"samples_{done:07d}.png"), fid.to_uint8(x.float()))
        if done % args.ckpt_every == 0 or done == args.steps:
            save_ckpt(ckpt_path, {"kind": "generator", "args": vars(args), "step": done, "unet": unet,
                                  "G": G.state_dict(), "G_ema": G_ema.state_dict(), "f_fake": f_fake.state_dict(),
                                  "opt_G": opt_G.state_dict(), "opt_fake": opt_fake.state_dict(),
                                  "rng": rng_state(data_gen)})


def load_sampler(args, dev):
    """(sample(z, y), conditional?) of a checkpoint: a teacher's EMA with args.steps Euler steps, or G_ema."""
    ckpt = load_ckpt(args.ckpt, dev)
    net = make_net(ckpt["unet"], dev).eval().requires_grad_(False)
    net.load_state_dict(ckpt["ema"] if ckpt["kind"] == "teacher" else ckpt["G_ema"])
    return sampler(paths.FlowMatching(), net, ckpt["kind"], args.steps), ckpt["unet"]["num_classes"] > 0


def sample(args):
    dev = setup(args)
    sample_fn, cond = load_sampler(args, dev)
    save_grid(args.png, torch.cat(list(generate_uint8(sample_fn, args.n, args.n, cond, dev, args.seed))), args.nrow)
    print(f"wrote {args.png} ({args.n} samples{', column k = class k' if cond and args.nrow == 10 else ''})")


def fid_command(args):
    dev = setup(args)
    sample_fn, cond = load_sampler(args, dev)
    inception, ref = inception_and_reference(args, dev)
    tic = time.time()
    result = {"fid": fid_of(sample_fn, args.n, args, cond, dev, inception, ref), "ckpt": args.ckpt, "n": args.n,
              "seconds": time.time() - tic, "args": vars(args)}
    print(json.dumps(result))
    with open(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "fid.jsonl"), "a") as log:
        log.write(json.dumps(result) + "\n")
    return result["fid"]


def bench(args):
    """Iterations per second of a teacher step, a fake step and a generator step (random data), peak memory."""
    dev, path = setup(args), paths.FlowMatching()
    unet = dict(nets.UNET_PRESETS[args.net], dropout=0.0, num_classes=NUM_CLASSES if args.cond else 0)
    teacher = make_net(dict(unet, dropout=0.1), dev)  # the teacher trains with dropout, the rest without
    f_star, G, f_fake = (make_net(unet, dev) for _ in range(3))
    f_star.requires_grad_(False)
    opts = [adam(teacher, args, dev, (0.9, 0.999)), adam(G, args, dev, (0.0, 0.999)), adam(f_fake, args, dev, (0.0, 0.999))]
    t, g, f, fs = (torch.compile(m) if args.compile else m for m in (teacher, G, f_fake, f_star))
    fake_loss, generator_loss = distill_losses(path, args)
    x0 = torch.rand(args.batch, 3, 32, 32, device=dev) * 2 - 1
    y = torch.randint(NUM_CLASSES, (args.batch,), device=dev) if args.cond else None

    def teacher_step():
        with autocast(dev):
            loss = losses.um_loss(path, conditioned(t, y), x0, torch.randn_like(x0)).mean()
        optimise(opts[0], teacher, loss, args.clip, 0, "teacher")

    def fake_step():
        with autocast(dev):
            with torch.no_grad():
                x0_gen = path.generate(conditioned(g, y), torch.randn_like(x0))
            loss = fake_loss(conditioned(fs, y), conditioned(f, y), x0_gen, x0, torch.randn_like(x0)).mean()
        optimise(opts[2], f_fake, loss, args.clip, 0, "fake-model")

    def generator_step():
        with autocast(dev), losses.frozen(f_star, f_fake):
            x0_gen = path.generate(conditioned(g, y), torch.randn_like(x0))
            loss = generator_loss(conditioned(fs, y), conditioned(f, y), x0_gen, torch.randn_like(x0)).mean()
        optimise(opts[1], G, loss, args.clip, 0, "generator")

    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
              "net": args.net, "params_M": round(sum(p.numel() for p in G.parameters()) / 1e6, 2), "batch": args.batch}
    for name, step in (("teacher", teacher_step), ("fake", fake_step), ("generator", generator_step)):
        for _ in range(args.warmup_iters):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tic = time.time()
        for _ in range(args.iters):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        result[f"{name}_it_per_s"] = round(args.iters / (time.time() - tic), 3)
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result[f"{name}_peak_GiB"] = round(peak / 2 ** 30, 2)  # CPU: peak resident memory of the process so far
    # one distillation iteration = K fake steps + 1 generator step
    result["distill_it_per_s"] = round(1 / (args.K / result["fake_it_per_s"] + 1 / result["generator_it_per_s"]), 3)
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- command line
def parse(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda", help="cuda (real runs) or cpu (smoke runs)")
    common.add_argument("--seed", type=int, default=0, help="seed of the networks' initialisation, noise and data order")
    common.add_argument("--data-dir", default="data", help="where cifar-10-python.tar.gz is (or is downloaded to), and the FID reference cache")
    common.add_argument("--data-tarball", default=None, help="a local tarball in the CIFAR-10 python layout instead of data-dir's")
    common.add_argument("--md5", default=CIFAR_MD5, help="expected MD5 of the tarball (default: the official CIFAR-10's); 'none' skips the check")
    common.add_argument("--inception-weights", default=None, help="FID Inception weight file (default: download pytorch-fid's); 'random' for tests")
    common.add_argument("--fid-ref", default=None, help="reference FID statistics .npz (mu, sigma); default: "
                        "computed from the training images once, cached in --data-dir")
    common.add_argument("--fid-batch", type=int, default=500, help="images per batch when generating for FID")
    run = argparse.ArgumentParser(add_help=False)  # the training commands
    run.add_argument("--out", required=True, help="run folder: ckpt.pt, metrics.jsonl, samples_*.png")
    run.add_argument("--resume", action="store_true", help="continue exactly from OUT/ckpt.pt (nets, EMA, optimisers, step, RNG)")
    run.add_argument("--batch", type=int, default=256, help="batch size")
    run.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    run.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights that are sampled")
    run.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA)")
    run.add_argument("--log-every", type=int, default=100, help="steps between metrics.jsonl rows")
    run.add_argument("--sample-every", type=int, default=5000, help="steps between sample grids")
    run.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints (and at the end)")
    run.add_argument("--fid-samples", type=int, default=10000, help="samples of the periodic FID (the fid command: 50k)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", parents=[common, run], help="train the flow-matching teacher f*, Eq. (3)")
    p.add_argument("--net", default="paper", choices=list(nets.UNET_PRESETS), help="U-Net preset (nets.UNET_PRESETS)")
    p.add_argument("--cond", action="store_true", help="class-conditional teacher (label embedding added to the time embedding)")
    p.add_argument("--steps", type=int, default=400_000, help="optimiser steps")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate, betas (0.9, 0.999)")
    p.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    p.add_argument("--dropout", type=float, default=0.1, help="U-Net dropout")
    p.add_argument("--sample-steps", type=int, default=100, help="Euler steps (NFE) of the sample grids and the periodic FID")
    p.add_argument("--fid-every", type=int, default=20000, help="steps between FIDs of the EMA teacher (0: never)")

    for name, help_ in (("distill", "RealUID distillation of a teacher into a one-step generator, Eqs. (16)-(17)"),
                        ("finetune", "fine-tune a distilled generator with RealUID (PAPER.md section 7)")):
        p = sub.add_parser(name, parents=[common, run], help=help_)
        p.add_argument("--teacher", required=True, help="teacher checkpoint (train's ckpt.pt); its EMA weights are f*")
        p.add_argument("--alpha", type=float, default=0.92, help="alpha of RealUM, Eq. (16); in (0, 1], alpha = 1 needs beta = 1")
        p.add_argument("--beta", type=float, default=0.94, help="beta of RealUM, Eq. (16); alpha = beta = 1 is data-free UID")
        p.add_argument("--gamma", type=float, default=None, help="gamma of the general RealUID loss, App. A.2 (default: = alpha)")
        p.add_argument("--delta", default="one", choices=["one", "beta"], help="delta = f* - f (one) or beta (f* - f), App. A.2")
        p.add_argument("--K", type=int, default=5, help="fake-model steps per generator step")
        p.add_argument("--steps", type=int, default=500_000, help="generator steps (one step = K fake steps + 1 generator step)")
        p.add_argument("--lr", type=float, default=3e-5, help="Adam learning rate of G and f, betas (0, 0.999)")
        p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
        p.add_argument("--fake-init", default="random", choices=["random", "teacher"], help="initial weights of the fake model f")
        p.add_argument("--generator", default=None, required=name == "finetune",
                       help="start G from this distilled checkpoint's G_ema (fine-tuning)")
        p.add_argument("--fid-every", type=int, default=5000, help="steps between FIDs of G_ema (0: never)")
        if name == "finetune":  # the authors' fine-tuning run: beta/alpha ~ 0.94, lr 1e-5, f from the teacher
            p.set_defaults(alpha=0.92, beta=0.86, lr=1e-5, warmup=0, fake_init="teacher", steps=100_000)

    for name, help_ in (("sample", "write a PNG grid of samples"), ("fid", "FID of a teacher (N steps) or a generator (1 step)")):
        p = sub.add_parser(name, parents=[common], help=help_)
        p.add_argument("--ckpt", required=True, help="a teacher (train) or generator (distill, finetune) checkpoint")
        p.add_argument("--steps", type=int, default=100, help="Euler steps (NFE) of a teacher; a generator takes one")
        p.add_argument("--n", type=int, default=100 if name == "sample" else 50_000, help="number of samples")
    sub.choices["sample"].add_argument("--png", required=True, help="output PNG")
    sub.choices["sample"].add_argument("--nrow", type=int, default=10, help="images per grid row")

    p = sub.add_parser("bench", parents=[common], help="it/s of teacher, fake and generator steps, and peak memory")
    p.add_argument("--net", default="paper", choices=list(nets.UNET_PRESETS), help="U-Net preset")
    p.add_argument("--cond", action="store_true", help="class-conditional networks")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--alpha", type=float, default=0.92, help="alpha, Eq. (16) (alpha < 1: the fake step also sees real data)")
    p.add_argument("--beta", type=float, default=0.94, help="beta, Eq. (16)")
    p.add_argument("--gamma", type=float, default=None, help="gamma, App. A.2")
    p.add_argument("--delta", default="one", choices=["one", "beta"], help="delta parametrisation, App. A.2")
    p.add_argument("--K", type=int, default=5, help="fake steps per generator step (for distill_it_per_s)")
    p.add_argument("--lr", type=float, default=3e-5, help="Adam learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per step type")
    p.add_argument("--warmup-iters", type=int, default=3, help="untimed iterations first")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.cmd in ("train", "distill", "finetune") or (args.cmd == "fid" and not args.fid_ref):
        args.tarball = fetch(args.data_dir, args.data_tarball, args.md5)
    if args.cmd in ("train", "distill", "finetune"):
        os.makedirs(args.out, exist_ok=True)
    command = {"train": train, "distill": distill, "finetune": distill, "sample": sample, "fid": fid_command, "bench": bench}
    return command[args.cmd](args)


if __name__ == "__main__":
    main()
