"""Frechet Inception Distance (FID) with TensorFlow's Inception network, readable in one sitting.

FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Frechet distance between
Gaussians fitted to the 2048-d pool3 features of InceptionV3 (Heusel et al., 2017). Each step copies
the TensorFlow protocol (clean-fid's "legacy_tensorflow" mode), so the numbers match the paper's:

  images    uint8 (B, 3, H, W); a generator's [-1, 1] output goes through to_uint8 first
  resize    bilinear to 299 x 299 with TensorFlow 1's rule (resize_tf1), then (x - 128) / 128
  network   the FID variant of the 2015-12-05 InceptionV3 graph, pytorch-fid's converted weights
  stats     float64 mean and covariance (N - 1); the matrix square root by scipy.linalg.sqrtm

  python fid.py stats SRC --out stats.npz   # SRC: a folder of PNGs or an .npz of uint8 images
  python fid.py fid SRC1 SRC2               # either SRC may also be a stats .npz (mu, sigma)
  python fid.py bench                       # feature-extraction throughput, images/s

The command line checks every argument and output path before the network runs; an expected failure
is one line on stderr and exit status 1.
"""
import argparse
import hashlib
import os
import sys
import time
import urllib.request
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the hash prefix is part of the file name
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "realuid")


# ----------------------------------------------------------------------------- the network
class Conv(nn.Module):
    """Conv2d without bias, BatchNorm with TensorFlow's eps 1e-3, ReLU (pytorch-fid's BasicConv2d names)."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    # TensorFlow's SAME average pool divides by the number of real pixels, not counting the padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)


class InceptionA(nn.Module):
    """Mixed_5b/c/d, 35 x 35: c_in -> 224 + pool_features channels."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(c_in, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a, 35 x 35 -> 17 x 17: 288 -> 768 channels."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e, 17 x 17, 768 channels; factorised 7 x 7 convolutions with c7 channels inside."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1 = Conv(c_in, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a, 17 x 17 -> 8 x 8: 768 -> 1280 channels."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(c_in, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(c_in, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b/c, 8 x 8: c_in -> 2048 channels; pool is avg_pool in Mixed_7b, max_pool in Mixed_7c."""

    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
                          self.branch_pool(self.pool(x))], dim=1)


class InceptionV3(nn.Module):
    """InceptionV3, FID variant: (B, 3, 299, 299) scaled as (x - 128) / 128 -> (B, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg_pool)
        self.Mixed_7c = InceptionE(2048, max_pool)  # the 2015 graph's quirk: a max pool in the last block

    def forward(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 299, 299):
            raise ValueError(f"InceptionV3 takes (B, 3, 299, 299) from preprocess(); got {tuple(x.shape)}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,  # -> (B, 768, 17, 17)
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):  # -> (B, 2048, 8, 8)
            x = block(x)
        return x.mean(dim=(2, 3))  # (B, 2048) pool3


# ----------------------------------------------------------------------------- weights
def atomic_write(path, write):
    """write(f) into a temporary file, then os.replace: path holds the old file or the whole new one, never a
    part; a failed write (a full disk) removes the temporary file and says why."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"could not write {path}: {e.strerror or e}; the partial file was removed") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_weights(cache_dir=None):
    """Path of pytorch-fid's weight file in cache_dir; downloaded once, SHA-256 prefix checked."""
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    path = os.path.join(cache_dir, os.path.basename(WEIGHTS_URL))
    if not os.path.exists(path):
        try:
            with urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response:
                data = response.read()  # 91 MB
        except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
            raise RuntimeError(f"could not download the Inception weights from {WEIGHTS_URL} ({e}); "
                               "fetch that file elsewhere and pass --inception-weights PATH "
                               "(load_inception(weights=PATH) in Python)") from e
        digest = hashlib.sha256(data).hexdigest()
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise RuntimeError(f"{WEIGHTS_URL} downloaded with SHA-256 {digest}, which does not start with "
                               f"{WEIGHTS_SHA256_PREFIX}: a corrupt download or not the FID weights")
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
    return path


def load_inception(weights=None, device="cpu", cache_dir=None):
    """The FID InceptionV3 in eval mode on device, from a weight file (None: download pytorch-fid's)."""
    path = download_weights(cache_dir) if weights is None else weights
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing or text file, a truncated download, a pickle of more than tensors
        why = (str(e).splitlines() or [""])[0]
        raise ValueError(f"could not load {path} as a PyTorch weight file ({type(e).__name__}: {why})") from e
    # drop the 1008-way ImageNet classifier fc: FID uses the pool3 features before it
    state = {k: v for k, v in state.items() if not k.startswith("fc.")} if isinstance(state, dict) else {}
    model = InceptionV3()
    ours = model.state_dict()  # num_batches_tracked may be missing: old files lack it, eval mode ignores it
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in ours]
    misshapen = [k for k in state if k in ours and getattr(state[k], "shape", None) != ours[k].shape]
    if missing or unexpected or misshapen:
        shapes = f", {len(misshapen)} of the wrong shape" if misshapen else ""
        raise ValueError(f"{path}: not pytorch-fid's FID InceptionV3 weights: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys{shapes} (first: {(missing + unexpected + misshapen)[0]})")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


# ----------------------------------------------------------------------------- the input pipeline
def to_uint8(x):
    """Generator output, float in [-1, 1] -> uint8: clip, x * 127.5 + 128, truncate (the authors' convention)."""
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 takes a float tensor in [-1, 1]; got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("to_uint8: the generator output has non-finite values")
    return (x.clamp(-1, 1) * 127.5 + 128).to(torch.uint8)  # in [0.5, 255.5]; the cast truncates


def check_images(images):
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 tensor (use to_uint8 for a generator's [-1, 1] output); "
                        f"got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " - channels last? use .permute(0, 3, 1, 2)" if images.ndim == 4 and images.shape[3] == 3 else ""
        raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}{hint}")


def resize_tf1(x, size=299):
    """Bilinear resize of float (B, C, H, W) to (B, C, size, size) by TensorFlow 1's rule: output pixel i
    samples input coordinate i * in / size, between floor and floor + 1 clamped at the border
    (F.interpolate with align_corners=False samples (i + 0.5) * in / size - 0.5 instead)."""
    # BEGIN SOLUTION 9
    def taps(n_in):
        src = torch.arange(size, device=x.device, dtype=torch.float32) * (n_in / size)  # float32, as TF
        i0 = src.floor().long()
        return i0, (i0 + 1).clamp(max=n_in - 1), src - i0  # neighbours and the weight of the second one

    r0, r1, wr = taps(x.shape[2])
    c0, c1, wc = taps(x.shape[3])
    left, right = x[:, :, :, c0], x[:, :, :, c1]  # (B, C, H, size), TF interpolates along x first
    x = left + (right - left) * wc
    top, bottom = x[:, :, r0], x[:, :, r1]  # (B, C, size, size)
    return top + (bottom - top) * wr[:, None]
    # END SOLUTION 9


def preprocess(images):
    """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [-1, 1), the network's input."""
    check_images(images)
    return (resize_tf1(images.float(), 299) - 128) / 128


# ----------------------------------------------------------------------------- statistics and distance
@torch.no_grad()
def features(model, batches, device=None, batch_size=50, total=None):
    """pool3 features, float64 (N, 2048), of uint8 images: one (N, 3, H, W) tensor, cut into batch_size
    batches, or an iterable of (b, 3, H, W) batches (total: how many, for the progress bar). Runs on device
    (default: the model's)."""
    if model.training:
        raise ValueError("features: call model.eval() first (BatchNorm must use its stored statistics)")
    if batch_size < 1:
        raise ValueError(f"features: batch_size must be >= 1; got {batch_size}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.to(device)
    if isinstance(batches, torch.Tensor):
        check_images(batches)
        batches = batches.split(batch_size)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 (10-bit mantissa) convolutions would perturb the features
    try:
        feats = [model(preprocess(b.to(device))).double().cpu()  # float64 from here on
                 for b in tqdm(batches, desc="inception", leave=False, total=total)]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if not feats:
        raise ValueError("features: no images")
    return torch.cat(feats).numpy()


def stats(feats):
    """Mean (D,) and covariance (D, D) with N - 1, float64, of features (N, D)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"stats needs features (N, D) with N >= 2 for a covariance; got {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("stats: the features have non-finite values")
    n, d = feats.shape
    if n < d:
        warnings.warn(f"FID from {n} samples < feature dimension {d}: the covariance is rank-deficient and the "
                      f"FID biased upwards; use at least {d} samples (the paper uses 50000)")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)  # np.cov divides by N - 1


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D) float64 -> float,
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). As pytorch-fid: when the square root is
    not finite, warn and retry with eps added to both diagonals; a square root with an imaginary diagonal
    (> 1e-3) is an error, otherwise its real part is used."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape} "
                         "are not mu (D,), sigma (D, D) of one D")
    check_finite("frechet_distance", mu1, sigma1, mu2, sigma2)
    # BEGIN SOLUTION 10
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)  # (sigma1 sigma2)^(1/2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"sqrtm(sigma1 sigma2) is not finite (near-singular product); adding {eps} to the diagonals")
        offset = eps * np.eye(d)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary part {imag:.3g} on its diagonal: "
                             "sigma1, sigma2 are not valid covariances (symmetric positive semi-definite)")
        covmean = covmean.real
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    # END SOLUTION 10
    check_finite("frechet_distance: the result", fd)  # finite inputs can still overflow
    return fd


def check_finite(name, *arrays):
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(f"{name} has NaN or inf entries: not valid FID statistics")


def save_stats(path, mu, sigma):
    """Write mu (D,), sigma (D, D) to an .npz, atomically; NaN or inf is refused, never written."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    check_finite(f"save_stats({path})", mu, sigma)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def open_npz(path):
    """np.load of an .npz without pickles, with a clear error for a missing file, an .npy or anything else."""
    with open(path, "rb") as f:  # FileNotFoundError names the path
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError(f"{path} is an .npy array, not an .npz: save images with np.savez(path, images=x) "
                         "and statistics with fid.save_stats")
    if magic[:2] != b"PK":  # .npz files are zip archives
        raise ValueError(f"{path} is not an .npz file (nor a folder of PNGs)")
    return np.load(path, allow_pickle=False)


def load_stats(path):
    """(mu, sigma) float64 from an .npz with keys mu (D,) and sigma (D, D), finite."""
    with open_npz(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise KeyError(f"{path} holds {sorted(data.files)}; FID statistics need the keys mu and sigma")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    check_finite(str(path), mu, sigma)
    return mu, sigma


# ----------------------------------------------------------------------------- command line
MAX_PIXELS = 4096 * 4096  # per PNG, read from its header before decoding (CIFAR-10: 32 x 32)


def read_png(path):
    """uint8 (H, W, 3) of one PNG. 16 bits per channel keep the high byte, as TensorFlow's decode_png(dtype=uint8)
    does (libpng's png_set_strip_16); PIL already does so for colour, but would clip 16-bit grey to 255."""
    from PIL import Image  # pillow comes with matplotlib
    try:
        with Image.open(path) as img:  # reads the header only
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"{path}: {img.width} x {img.height} pixels, above the {MAX_PIXELS} this reads")
            if img.mode.startswith("I"):  # 16-bit greyscale ("I;16", "I;16B", or "I" in older Pillow)
                grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as e:  # not an image, truncated, beyond Pillow's own bound
        raise ValueError(f"{path}: not a readable PNG ({type(e).__name__}: {e})") from e


def load_images(path):
    """uint8 (N, 3, H, W), N >= 2, from a folder of PNGs or an .npz holding uint8 (N, H, W, 3) or (N, 3, H, W)."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        files = [f for f in names if f.lower().endswith(".png") and os.path.isfile(os.path.join(path, f))]
        if len(files) < len(names):
            skipped = sorted(set(names) - set(files))
            warnings.warn(f"{path}: skipped {len(skipped)} non-PNG entries: {', '.join(skipped[:5])}"
                          + (", ..." if len(skipped) > 5 else ""))
        if not files:
            raise ValueError(f"no .png files in {path}")
        images = [read_png(os.path.join(path, f)) for f in files]
        for f, img in zip(files, images):
            if img.shape != images[0].shape:
                raise ValueError(f"{os.path.join(path, f)} is {img.shape[0]}x{img.shape[1]} but "
                                 f"{files[0]} is {images[0].shape[0]}x{images[0].shape[1]}: one size per image set")
        images = np.stack(images)
    else:
        with open_npz(path) as data:
            if "images" not in data.files and len(data.files) != 1:
                raise KeyError(f"{path} holds {sorted(data.files)}; put the images under the key 'images'")
            images = data["images" if "images" in data.files else data.files[0]]  # e.g. np.savez's arr_0
    if images.dtype != np.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]) or not images.size:
        raise ValueError(f"{path}: expected uint8 images (N, H, W, 3) or (N, 3, H, W); "
                         f"got {images.dtype} {images.shape}")
    if images.shape[1] != 3:
        images = images.transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    if len(images) < 2:
        raise ValueError(f"{path}: {len(images)} image; FID statistics need N >= 2 for a covariance")
    if images.max() <= 1:
        warnings.warn(f"{path}: the largest pixel value is {images.max()}; FID takes uint8 in 0..255 "
                      "(were [0, 1] floats cast to uint8? a generator's [-1, 1] output goes through to_uint8)")
    return torch.from_numpy(np.ascontiguousarray(images))


def load_source(path):
    """A command-line source: (mu, sigma) from a stats .npz, else uint8 images (N, 3, H, W)."""
    if not os.path.isdir(path):
        with open_npz(path) as data:
            if "mu" in data.files and "sigma" in data.files:
                return load_stats(path)
    return load_images(path)


def positive_int(s):
    if int(s) < 1:  # a ValueError here: argparse says "invalid positive_int value"
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {s}")
    return int(s)


def check_out(out, sources, force):
    """Before any work: --out is a file in a writable folder, not an input, and new unless --force."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.exists(out) and any(os.path.exists(s) and os.path.samefile(s, out) for s in sources):
        raise ValueError(f"--out {out} is also an input: it would be replaced by its own statistics")
    if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: not a file in an existing, writable folder")
    if os.path.exists(out) and not force:
        raise ValueError(f"--out {out} exists; pass --force to replace it")


def main():
    p = argparse.ArgumentParser(description="TensorFlow-compatible Inception FID (see README, FID section)")
    p.add_argument("command", choices=["stats", "fid", "bench"],
                   help="stats: (mu, sigma) of SRC; fid: FID between SRC1 and SRC2; bench: images/s")
    p.add_argument("sources", nargs="*", help="folders of PNGs, .npz of uint8 images, or stats .npz (mu, sigma)")
    p.add_argument("--out", help="stats: where to write the .npz with mu, sigma (never one of the sources)")
    p.add_argument("--force", action="store_true", help="stats: replace an existing --out file")
    p.add_argument("--inception-weights", help="local copy of pt_inception-2015-12-05-6726825d.pth (offline use)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the downloaded weights are kept")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per network call, >= 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--n", type=positive_int, default=64, help="bench: number of images timed, >= 1")
    p.add_argument("--size", type=positive_int, default=32, help="bench: side of the random uint8 images "
                   "(CIFAR-10: 32)")
    args = p.parse_args()
    n_sources = {"stats": 1, "fid": 2, "bench": 0}[args.command]
    if len(args.sources) != n_sources or (args.command == "stats" and not args.out):
        p.error(f"{args.command} takes {n_sources} source(s)" + (" and --out" if args.command == "stats" else ""))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    try:
        run(args)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # expected failures: one line, exit status 1
        print(f"fid.py: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        sys.exit(1)


def run(args):
    if args.command == "bench":  # throughput does not depend on the weights: random ones unless given
        model = load_inception(args.inception_weights, args.device) if args.inception_weights else \
            InceptionV3().eval().to(args.device)
        images = torch.randint(0, 256, (args.n, 3, args.size, args.size), dtype=torch.uint8)
        features(model, images[:args.batch_size], batch_size=args.batch_size)  # warm-up
        t0 = time.perf_counter()
        features(model, images, batch_size=args.batch_size)  # returns on the host, so the GPU has finished
        dt = time.perf_counter() - t0
        print(f"{args.n / dt:.1f} images/s ({args.n} images {args.size}x{args.size}, batch {args.batch_size}, "
              f"{args.device}, {torch.get_num_threads()} CPU threads)")
        return
    if args.command == "stats":
        check_out(args.out, args.sources, args.force)
    sources = [load_source(src) for src in args.sources]  # every source read and checked before the network
    if any(isinstance(s, torch.Tensor) for s in sources):
        model = load_inception(args.inception_weights, args.device, args.cache_dir)
        sources = [stats(features(model, s, batch_size=args.batch_size)) if isinstance(s, torch.Tensor) else s
                   for s in sources]
    if args.command == "stats":
        save_stats(args.out, *sources[0])
        print(f"wrote {args.out}")
    else:
        print(f"FID {frechet_distance(*sources[0], *sources[1]):.4f}")


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"fid.py: warning: {message}\n"
    main()
