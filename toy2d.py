"""RealUID on 2-D Gaussian mixtures, on the CPU: teacher -> one-step generator, with and without real data.

    python toy2d.py --real-data                      # flow matching: the README's figure and table
    python toy2d.py --real-data --seeds 10           # 10 paired seeds: mean +- sd, RealUID - data-free +- se
    python toy2d.py --path bridge --real-data        # every family: fm | diffusion | bridge | si
    python toy2d.py --teacher exact --teacher-error 0.5 --real-data   # a corrupted teacher (App. A.1.4)
    python toy2d.py --missed-mode 2 --real-data --beta 0.94 0.9 0.86  # students start without mode 2

Paper convention: data x0 at t = 0, the other end x1 at t = 1. The distance to the data is the unbiased
energy distance (its mean over draws is 0 for a model that equals the data), averaged over --n-ref fresh
reference samples of the mixture. Writes, atomically, DIR/toy2d_<path>.png (samples, distance to the data
along training, and the optimal fake model of Eq. (22) split into its two terms), DIR/results.json
(arguments, per-seed metrics and curves, the summary over seeds) and DIR/samples.npz (the first seed's
samples). An existing run in DIR is kept unless --force.
"""
import argparse
import copy
import json
import math
import multiprocessing
import os
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import losses
import paths
from nets import MLP

MAX_EVAL, MAX_SEED = 20000, 2 ** 62  # largest --n-eval (memory of the distance matrices), largest --seed


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--path", default="fm", choices=list(paths.PATHS), help="matching family: flow matching, VP diffusion, Brownian "
      "bridge (corrupted observation x1 -> clean x0) or stochastic interpolant (a two-mode source x1 -> x0)")
    a("--real-data", action="store_true", help="also distil a RealUID student with real data (alpha, beta below)")
    a("--alpha", type=float, default=0.9, help="alpha in RealUM, Eq. (16): weight of generated data; in (0, 1]")
    a("--beta", type=float, nargs="+", default=[0.94], help="beta in RealUM, Eq. (16); in (0, 1]; beta/alpha != 1 "
      "lets real data change the fake model's optimum, Eq. (22). Several values: one RealUID student each")
    a("--gamma", type=float, default=None, help="gamma of the general RealUID loss, App. A.2 Def. 3 (default: the "
      "losses of Eqs. (16)-(17), i.e. gamma = alpha)")
    a("--delta-beta", action="store_true", help="with --gamma: parametrise delta = beta (f* - f) instead of f* - f")
    a("--teacher", default="trained", choices=["trained", "exact"], help="f*: a network trained with the UM loss, "
      "Eq. (3), or the closed-form field of the mixture (the generator always starts from the trained network)")
    a("--teacher-error", type=float, default=0.0, help="corrupted teacher (App. A.1.4): f* + E (f_wrong - f*), f_wrong "
      "the exact field of the mixture with its mode weights reversed; E = 1 teaches the wrong weights")
    a("--missed-mode", type=int, default=None, help="the missed-mode experiment: both students start from a generator "
      "first distilled (data-free, exact field) from the mixture without this mode, then learn from the full teacher")
    a("--modes", type=int, default=5, help="modes of p0* (radius 2.5, variance 0.15, weights proportional to K, ..., "
      "1)")
    a("--nfe", type=int, default=32, help="N, the teacher sampler's number of network calls")
    a("--teacher-steps", type=int, default=2000, help="teacher training steps (Adam (0.9, 0.999))")
    a("--generator-steps", type=int, default=2000, help="distillation length in generator steps, each after K "
      "fake-model steps")
    a("--fake-steps", type=int, default=1, help="K, fake-model steps per generator step (paper, CIFAR-10: 5, from "
      "random weights)")
    a("--fake-init", default="teacher", choices=["random", "teacher"], help="fake model f's initial weights (paper, "
      "CIFAR-10: random; here the teacher's, so that K = 1 suffices)")
    a("--batch", type=int, default=512, help="batch size of every step")
    a("--lr-teacher", type=float, default=2e-3, help="teacher learning rate, in (0, 1)")
    a("--lr", type=float, default=2e-3, help="generator and fake-model peak learning rate, in (0, 1) (Adam betas "
      "(0, 0.999)); linear warm-up, then cosine decay to 0.1x over --generator-steps")
    a("--generator-warmup", type=int, default=50, help="generator steps of learning-rate warm-up")
    a("--ema", type=float, default=0.99, help="EMA decay of the generator, in [0, 1); the EMA is what is sampled")
    a("--hidden", type=int, default=128, help="MLP width (teacher, fake model and generator share it)")
    a("--depth", type=int, default=3, help="MLP hidden layers")
    a("--bridge-eps", type=float, default=0.5, help="eps_b, the Brownian bridge's noise level")
    a("--bridge-noise", type=float, default=1.0, help="sigma of the bridge's observation x1 = x0 + sigma n")
    a("--si-a", type=float, default=1.0, help="a in the interpolant's gamma(t) = a t (1 - t)")
    a("--n-eval", type=int, default=2000, help=f"points in every sample the metrics compare: each model's and each "
      f"reference's (100 to {MAX_EVAL})")
    a("--n-ref", type=int, default=5, help="fresh reference samples of the data for the final distances (2 to 50)")
    a("--eval-every", type=int, default=25, help="generator steps between points of the distance curve")
    a("--seed", type=int, default=0, help=f"first random seed (data, networks, draws), 0 to 2^62")
    a("--seeds", type=int, default=1, help="paired seeds seed, seed + 1, ...: all students share the seed, teacher "
      "and fake-model initialisation")
    a("--jobs", type=int, default=os.cpu_count() or 1, help="processes for the independent trainings (the seeds, "
      "or the students of a seed); default: the number of cores. Each runs one thread: the results do not depend "
      "on --jobs")
    a("--animate", action="store_true", help="also write toy2d_<path>.gif: the first seed's students learning, "
      "one frame per point of the distance curve")
    a("--out", default="runs/toy2d", help="output folder")
    a("--force", action="store_true", help="replace the outputs of an earlier run in --out")
    args = p.parse_args(argv)
    # Validate everything before any training (a bad flag must not cost a trained teacher).
    for name, v in vars(args).items():
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, float) and not math.isfinite(x):
                p.error(f"--{name.replace('_', '-')} must be a finite number, got {x}")
    try:
        for beta in args.beta:
            losses.check_alpha_beta(args.alpha, beta)
        if args.gamma is not None:
            losses.check_gamma(args.gamma)
    except ValueError as e:
        p.error(str(e))
    if len(set(args.beta)) != len(args.beta):
        p.error(f"--beta values must differ, got {args.beta}")
    if args.delta_beta and args.gamma is None:
        p.error("--delta-beta parametrises the general loss: give --gamma too (App. A.2)")
    counts = ["nfe", "teacher_steps", "generator_steps", "fake_steps", "batch", "hidden", "depth", "eval_every",
              "seeds", "jobs"]
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not (100 <= args.n_eval <= MAX_EVAL and 2 <= args.n_ref <= 50):
        p.error(f"--n-eval must be in [100, {MAX_EVAL}] and --n-ref in [2, 50]; got {args.n_eval}, {args.n_ref}")
    if args.modes < 2 or args.generator_warmup < 0 or not 0 <= args.seed <= MAX_SEED:
        p.error("--modes must be at least 2, --generator-warmup non-negative, --seed in [0, 2^62]")
    if args.missed_mode is not None and not 0 <= args.missed_mode < args.modes:
        p.error(f"--missed-mode must name a mode, 0 to {args.modes - 1}; got {args.missed_mode}")
    if not (0 < args.lr < 1 and 0 < args.lr_teacher < 1):
        p.error(f"--lr and --lr-teacher must be in (0, 1); got {args.lr}, {args.lr_teacher}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if min(args.bridge_eps, args.bridge_noise) <= 0 or args.si_a < 0 or args.teacher_error < 0:
        p.error("--bridge-eps and --bridge-noise must be positive, --si-a and --teacher-error non-negative")
    if not args.out.strip() or (os.path.exists(args.out) and not os.path.isdir(args.out)):
        p.error(f"--out must name a folder, got {args.out!r}")
    return args


# ---- the problem: p0* a K-mode mixture with unequal weights, and the pairs (x0, x1) of each family
VAR, RADIUS = 0.15, 2.5  # each mode's variance per axis; the circle the modes sit on


def mixture(K, weights=None, drop=None):
    """K modes on a circle of radius 2.5, weights K : K - 1 : ... : 1 unless given; without mode `drop`
    (its weight shared out in proportion) if given."""
    angles = torch.arange(K) * 2 * math.pi / K
    means = RADIUS * torch.stack([angles.cos(), angles.sin()], 1)  # (K, 2)
    w = torch.arange(K, 0, -1).double() / (K * (K + 1) / 2) if weights is None else weights
    keep = torch.arange(K) != (-1 if drop is None else drop)
    return paths.GaussianMixture(means[keep], VAR * torch.eye(2).repeat(int(keep.sum()), 1, 1), w[keep] / w[keep].sum())


def make_path(args):
    return paths.PATHS[args.path](*{"bridge": [args.bridge_eps], "si": [args.si_a]}.get(args.path, []))


def joint_of(args, p):
    """The mixture of pairs (x0, x1) for data p: x1 noise, a corrupted copy of x0, or the source."""
    if args.path == "bridge":
        return paths.corrupted(p, torch.eye(2), args.bridge_noise)
    if args.path == "si":
        source = paths.GaussianMixture([[-1.5, 0.0], [1.5, 0.0]], 0.5 * torch.eye(2).repeat(2, 1, 1), [0.5, 0.5])
        return paths.independent(p, source)
    return paths.independent(p, paths.GaussianMixture.standard(2))


def pairs(joint, n):
    """(x0*, x1) ~ pi: real data and its other end, (n, 2) each."""
    xx = joint.sample(n)
    return xx[:, :2], xx[:, 2:]


def generator_input(args, joint, x1):
    """z of the one-step generator: N(0, I) beside x1 (bridge, diffusion) or a fresh draw from p1 (fm, si)."""
    return torch.randn_like(x1) if args.path in ("bridge", "diffusion") else pairs(joint, len(x1))[1]


# ---- metrics against real samples
def mean_distance(x, y=None):
    """E|X - Y| between samples, or E|X - X'| within x without its zero diagonal (n (n - 1) pairs), float64."""
    if y is None:
        return float(torch.cdist(x.double(), x.double()).sum()) / (len(x) * (len(x) - 1))
    return float(torch.cdist(x.double(), y.double()).mean())


def energy_distance(x, y):
    """Unbiased energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistic): its mean over draws is the
    distance between the laws, 0 for one law, so it has no finite-sample floor (one draw can be below 0)."""
    return 2 * mean_distance(x, y) - mean_distance(x) - mean_distance(y)


def distances_to_data(x, refs, self_terms):
    """The unbiased energy distance of x to each reference sample, (R,); self_terms[r] = E|Y - Y'| of refs[r]."""
    xx = mean_distance(x)
    return np.array([2 * mean_distance(x, y) - xx - yy for y, yy in zip(refs, self_terms)])


def near_radius(K):
    """A sample is near a mode within min(3 sd, a third of the spacing of neighbouring modes): at 8 or more modes
    3 sd would cover the whole ring."""
    return min(3 * math.sqrt(VAR), 2 * RADIUS * math.sin(math.pi / K) / 3)


def mode_metrics(x, p0):
    """Share of samples near a mode (`near_radius`), the share of all samples each mode holds, and the total
    variation between the near samples' per-mode shares and the true weights ("mode-weight error")."""
    d = torch.cdist(x.double(), p0.means)  # (n, K)
    near = d.min(1).values < near_radius(len(p0.weights))
    counts = torch.bincount(d.argmin(1)[near], minlength=len(p0.weights)).double()
    tv = 0.5 * (counts / max(1.0, float(counts.sum())) - p0.weights).abs().sum()
    return {"near_mode": float(near.double().mean()), "mode_weights": (counts / len(x)).tolist(), "mode_tv": float(tv)}


def metrics(x, refs, self_terms, p0):
    d = distances_to_data(x, refs, self_terms)
    return {"energy": float(d.mean()), "energy_sd_refs": float(d.std(ddof=1)), **mode_metrics(x, p0)}


# ---- one seed: teacher, the students, their metrics
def lr_factor(args, it):
    """Linear warm-up over --generator-warmup generator steps, then cosine decay from 1 to 0.1."""
    warm = min(1.0, (it + 1) / max(1, args.generator_warmup))
    return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * it / args.generator_steps)))


def update(opt, loss, what, it, flag="--lr"):
    """One optimiser step on loss; a non-finite loss stops the run, naming the learning-rate flag to lower."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} loss is {loss.item()} at step {it}: lower {flag}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_teacher(args, path, joint, in_dim):
    """The teacher network, Eq. (3); it is also every generator's initialisation."""
    net = MLP(in_dim, 2, args.hidden, args.depth)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr_teacher)
    for it in tqdm(range(args.teacher_steps), desc="teacher", mininterval=1, leave=False):
        for group in opt.param_groups:  # linear decay to 0 over the second half
            group["lr"] = args.lr_teacher * min(1.0, 2 * (1 - it / args.teacher_steps))
        x0, x1 = pairs(joint, args.batch)
        update(opt, losses.um_loss(path, net, x0, x1).mean(), "teacher", it, "--lr-teacher")
    return net.requires_grad_(False)


def distil(args, path, joint, start, net, f_star, alpha, beta, evaluate, seed, name):
    """K fake steps (Eq. 16), then one generator step (Eq. 17), from the generator `start`; the fake model
    starts from the teacher `net` (or random weights). Returns the EMA generator and its curve: at step 0
    and every --eval-every generator steps, `evaluate(G_ema)` (a dict of metrics) with "step" added."""
    torch.manual_seed(seed + 1)  # all students of a seed see the same fake-model init and draws
    G = copy.deepcopy(start).requires_grad_(True)
    G_ema = copy.deepcopy(start)
    f_fake = copy.deepcopy(net).requires_grad_(True) if args.fake_init == "teacher" else MLP(
        net.body[0].in_features - net.t_dim, 2, args.hidden, args.depth)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=True)
    opt_fake = torch.optim.Adam(f_fake.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=True)
    general = args.gamma is not None and (alpha, beta) != (1.0, 1.0)  # the data-free student is always Eq. (13)
    gamma, delta_scale = (args.gamma if general else alpha), (beta if args.delta_beta else 1.0)
    curve = [{"step": 0, **evaluate(G_ema, name)}]
    for it in tqdm(range(args.generator_steps), desc=f"{name}, seed {seed}", mininterval=1, leave=False):
        for opt in (opt_G, opt_fake):
            opt.param_groups[0]["lr"] = args.lr * lr_factor(args, it)
        for _ in range(args.fake_steps):
            x0_real, x1 = pairs(joint, args.batch)
            with torch.no_grad():  # fake step: the generator is fixed
                x0_gen = path.generate(G, generator_input(args, joint, x1), x1)
            loss_fake = losses.realum_loss(path, f_fake, x0_gen, x0_real, x1, alpha, beta) if not general else \
                losses.general_fake_loss(path, f_star, f_fake, x0_gen, x0_real, x1, alpha, beta, gamma, delta_scale)
            update(opt_fake, loss_fake.mean(), "fake-model", it)  # Eq. (16), or App. A.2
        _, x1 = pairs(joint, args.batch)  # the bridge's observations of real data; noise / source otherwise
        # generator step: the losses hold f and f* fixed, gradients reach theta through their inputs
        x0_gen = path.generate(G, generator_input(args, joint, x1), x1)
        loss_G = losses.realuid_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta) if not general else \
            losses.general_generator_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta, gamma, delta_scale)
        update(opt_G, loss_G.mean(), "generator", it)  # Eq. (17), or App. A.2
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        if (it + 1) % args.eval_every == 0 or it + 1 == args.generator_steps:
            if not all(torch.isfinite(p).all() for p in G_ema.parameters()):
                raise FloatingPointError(f"generator weights are not finite at generator step {it}: lower --lr")
            curve.append({"step": it + 1, **evaluate(G_ema, name)})
    return G_ema, curve


def student_names(args):
    """{name: (alpha, beta)}: the data-free student, and one RealUID student per --beta (with --real-data)."""
    out = {"data-free UID": (1.0, 1.0)}
    for beta in (args.beta if args.real_data else []):
        out["RealUID" if len(args.beta) == 1 else f"RealUID b/a {beta / args.alpha:.3f}"] = (args.alpha, beta)
    return out


def run_seed(args, seed, only=None):
    """Everything for one seed: {"table": {model: metrics}, "curves": {student: curve}, "levels": {...},
    "samples": {model: (n_eval, 2)}, "x1": the observations / sources the samples used}; with `only`, just
    those students (the teacher, draws and metrics of the seed are the same whichever students run)."""
    torch.manual_seed(seed)
    p0, path = mixture(args.modes), make_path(args)
    joint = joint_of(args, p0)
    net = train_teacher(args, path, joint, 4 if path.observes_x1 else 2)
    exact = paths.ExactField(path, joint)
    base = net if args.teacher == "trained" else exact
    if args.teacher_error:  # App. A.1.4: the corrupted teacher f* + E (f_wrong - f*)
        wrong = paths.ExactField(path, joint_of(args, mixture(args.modes, p0.weights.flip(0))))
        f_star = lambda x, t: base(x, t) + args.teacher_error * (wrong(x, t) - exact(x, t))  # noqa: E731
    else:
        f_star = base

    torch.manual_seed(seed + 1000)  # held-out draws for every metric, the same for every model of the seed
    n = args.n_eval
    refs = [pairs(joint, n)[0] for _ in range(args.n_ref)]  # fresh samples of p0*
    self_terms = [mean_distance(y) for y in refs]
    x_real, x1_eval = pairs(joint, n)  # a further real sample: the noise level of two real samples
    z_eval = generator_input(args, joint, x1_eval)

    frames = {}  # with --animate, the first seed's samples at every curve point: {student: [(n_eval, 2), ...]}

    def evaluate(G, name=None):  # the curves: the first reference only (the table averages all)
        with torch.no_grad():
            x = path.generate(G, z_eval, x1_eval)
        if args.animate and seed == args.seed and name is not None:
            frames.setdefault(name, []).append(x)
        return {"energy": float(distances_to_data(x, refs[:1], self_terms[:1])[0]), **mode_metrics(x, p0)}

    start = net  # Sec. 3: the generator starts from the teacher
    if args.missed_mode is not None:  # first fit a generator to the mixture without the missed mode
        joint_missing = joint_of(args, mixture(args.modes, drop=args.missed_mode))
        start, _ = distil(args, path, joint_missing, net, net, paths.ExactField(path, joint_missing), 1.0, 1.0,
                          lambda G, name: {}, seed + 500, "generator without the mode")
    students = {name: distil(args, path, joint, start, net, f_star, alpha, beta, evaluate, seed, name)
                for name, (alpha, beta) in student_names(args).items() if only is None or name in only}
    start_name = "generator at init" if args.missed_mode is None else "generator at start"
    with torch.no_grad():
        samples = {"real": x_real, "teacher": path.sample(f_star, x1_eval, args.nfe),
                   start_name: path.generate(start, z_eval, x1_eval),
                   **{k: path.generate(G, z_eval, x1_eval) for k, (G, _) in students.items()}}
    table = {k: metrics(x, refs, self_terms, p0) for k, x in samples.items()}
    levels = {"real": distances_to_data(x_real, refs, self_terms).tolist()}  # noise level, per reference
    return {"seed": seed, "table": table, "curves": {k: c for k, (_, c) in students.items()}, "levels": levels,
            "frames": frames,
            "samples": samples, "x1": x1_eval}


def reach(curve, done):
    """First generator step whose curve point satisfies done(point), or None if none does."""
    return next((c["step"] for c in curve if done(c)), None)


def summarise(args, runs):
    """Per model: mean and sd over seeds of each metric, and the mean over seeds of the ratio to the teacher's
    energy. Each RealUID student - the data-free one, paired by seed: mean, standard error and the number of
    seeds where RealUID is lower, at the end, and the steps to reach the data-free student's final distance
    (with --missed-mode: the steps until the missed mode holds half its true weight, and the mode-weight
    error averaged along training)."""
    mean_sd = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)  # noqa: E731
    se = lambda v: float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None  # noqa: E731
    out = {}
    for model in runs[0]["table"]:
        out[model] = {m: mean_sd([r["table"][model][m] for r in runs]) for m in ("energy", "near_mode", "mode_tv")}
    w_missed = None if args.missed_mode is None else float(mixture(args.modes).weights[args.missed_mode])
    steps_to = {}
    for r in runs:
        df_end = r["curves"]["data-free UID"][-1]["energy"]
        for k, c in r["curves"].items():
            half = None if w_missed is None else reach(c, lambda p: p["mode_weights"][args.missed_mode] >= w_missed / 2)
            steps_to.setdefault(k, []).append({"data-free end": reach(c, lambda p: p["energy"] <= df_end),
                                               "half the missed weight": half,
                                               "mode error along training": float(np.mean([p["mode_tv"] for p in c]))})
    for k, rows in steps_to.items():
        for m in rows[0]:
            if all(v[m] is not None for v in rows):
                out[k]["steps to " + m if m != "mode error along training" else m] = mean_sd([v[m] for v in rows])
            elif m != "half the missed weight" or w_missed is not None:
                out[k][f"seeds reaching {m}"] = sum(v[m] is not None for v in rows)
    for k in runs[0]["curves"]:
        if k == "data-free UID":
            continue
        diffs = {m: [r["table"][k][m] - r["table"]["data-free UID"][m] for r in runs]
                 for m in ("energy", "near_mode", "mode_tv")}
        for m in steps_to[k][0]:
            pairs_ = [(a[m], b[m]) for a, b in zip(steps_to[k], steps_to["data-free UID"])]
            if all(a is not None and b is not None for a, b in pairs_):
                diffs["steps to " + m if m != "mode error along training" else m] = [a - b for a, b in pairs_]
        out[f"{k} - data-free"] = {m: {"mean": float(np.mean(v)), "se": se(v), "lower_in": int(np.sum(np.array(v) < 0)),
                                       "seeds": len(v)} for m, v in diffs.items()}
    return out


# ---- the mechanism: the optimal fake model of Eq. (22) for a generator that misses a mode
def eq22_push(args, t=0.2, missed=2, n=49):
    """Flow matching with exact fields, on an n x n grid over [-4, 4]^2 at time t: the push f_opt - f* that the
    optimal fake model of Eq. (22) gives a generator whose p_gen is the data with mode `missed` removed,
        f_opt - f* = [beta p_gen (f_gen - f*) + (beta - alpha) (p_gen - p*) f*] / [alpha p_gen + (1 - alpha) p*],
    for the data-free student (alpha = beta = 1: f_gen - f*) and RealUID (alpha, first --beta), with RealUID's two
    terms apart: "own" (the generator's own error, as data-free) and "real" (the term real data adds). The
    generator step sees the push only where it has samples, so each is summarised weighted by p_gen:
    "pull": E_gen <push, unit vector toward the missed mode>, and "pull inside" the part of it from the missed
    mode's neighbourhood (a disk of half the mode spacing around its centre at t); "radial": E_gen <push,
    x / |x|> over the rest, where the present modes are (< 0: toward the centre)."""
    p0, fm, noise = mixture(args.modes), paths.FlowMatching(), paths.GaussianMixture.standard(2)
    real = paths.ExactField(fm, paths.independent(p0, noise))
    gen = paths.ExactField(fm, paths.independent(mixture(args.modes, drop=missed), noise))
    g = torch.linspace(-4, 4, n, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)  # (n * n, 2)
    tt = torch.full((len(x),), t, dtype=torch.float64)
    f_real, f_gen = real(x, tt), gen(x, tt)
    p_real, p_gen = real.log_marginal(x, tt).exp()[:, None], gen.log_marginal(x, tt).exp()[:, None]
    centre = (1 - t) * p0.means[missed]  # the missed mode's mean at time t: x_t = (1 - t) x0 + t x1
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731 (0 where v = 0: no direction)
    toward, outward = unit(centre - x), unit(x)
    radius = (1 - t) * RADIUS * math.sin(math.pi / args.modes)  # half the spacing of the modes' means at t
    inside = (x - centre).norm(dim=1) < radius
    al, be = args.alpha, args.beta[0]
    D = al * p_gen + (1 - al) * p_real
    out = {"x": x, "p_real": p_real[:, 0], "p_gen": p_gen[:, 0], "t": t, "missed": missed, "centre": centre,
           "radius": radius, "inside": inside, "data-free UID": f_gen - f_real,
           "RealUID own": be * p_gen * (f_gen - f_real) / D, "RealUID real": (be - al) * (p_gen - p_real) * f_real / D}
    out["RealUID"] = (be * p_gen * f_gen + (1 - be) * p_real * f_real) / D - f_real  # Eq. (22) itself
    w = p_gen[:, 0] / p_gen.sum()
    for k in ("data-free UID", "RealUID", "RealUID own", "RealUID real"):
        pull = w * (out[k] * toward).sum(1)
        out[k + " pull"], out[k + " pull inside"] = float(pull.sum()), float(pull[inside].sum())
        out[k + " radial"] = float((w * (out[k] * outward).sum(1))[~inside].sum())
    return out


# ---- output
def save_atomic(writers):
    """{path: write(file object)}: every file into path + '.tmp' first, then all renamed, so a failed
    write (a full disk, a failing plot, Ctrl-C, SIGTERM) leaves the previous outputs intact and nothing partial."""
    try:
        for path, write in writers.items():
            with open(path + ".tmp", "wb") as fh:
                write(fh)
    except BaseException as e:
        for tmp in (p + ".tmp" for p in writers):
            if os.path.exists(tmp):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise SystemExit(f"could not write {path}: {e.strerror or e} (nothing was replaced)") from e
        raise
    for path in writers:
        os.replace(path + ".tmp", path)


COLORS = ["tab:blue", "tab:red", "tab:purple", "tab:orange"]  # the students, in order


def plot(args, runs, summary, fh):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, p0, n_seeds = runs[0], mixture(args.modes), len(runs)
    students = list(first["curves"])
    colors = dict(zip(students, COLORS))
    top = [k for k in first["samples"] if k != "generator at init"]
    fig = plt.figure(figsize=(3.3 * max(len(top), 5), 8.6))
    seeds_note = f" (mean of {n_seeds} seeds; seed {first['seed']} shown)" if n_seeds > 1 else ""
    for j, name in enumerate(top):
        ax, x = fig.add_subplot(2, len(top), j + 1), first["samples"][name]
        if name != "real":
            ax.scatter(*first["samples"]["real"].T, s=2, c="0.8")
        ax.scatter(*x.T, s=2, alpha=0.6, c=colors.get(name, "k" if name == "real" else "tab:green"))
        s = summary[name]
        nfe = {"real": "", "teacher": f", NFE {args.nfe}"}.get(name, ", NFE 1")
        what = "a fresh real sample" if name == "real" else name
        ax.set_title(f"{what}{nfe}\ndistance to data {s['energy'][0]:.4f}, mode-weight error {s['mode_tv'][0]:.3f}"
                     + ("\n" + seeds_note if seeds_note else ""), fontsize=8)
        ax.set_xlim(-4.5, 4.5), ax.set_ylim(-4.5, 4.5), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])

    bottom = fig.add_gridspec(1, 5, left=0.04, right=0.98, bottom=0.05, top=0.44, wspace=0.25)
    ax = fig.add_subplot(bottom[0, :2])  # convergence: the paper's claim is about speed
    for name in students:
        steps = [c["step"] for c in first["curves"][name]]
        e = np.array([[c["energy"] for c in r["curves"][name]] for r in runs])
        for row in e if n_seeds > 1 else []:
            ax.plot(steps, row, "-", lw=0.5, c=colors[name], alpha=0.35)
        ax.plot(steps, e.mean(0), "o-", ms=2, c=colors[name], label=f"{name} (EMA), mean of {n_seeds} seed(s)")
    teacher = summary["teacher"]["energy"][0]
    ax.axhline(teacher, ls="--", c="k", lw=1, label=f"teacher (NFE {args.nfe}): {teacher:.4f}")
    noise = np.array([r["levels"]["real"] for r in runs]).ravel()
    lo, hi = 1e-4, float(noise.mean() + 2 * noise.std(ddof=1))
    ax.axhspan(lo, hi, color="0.85", label=f"two real samples (noise level): below {hi:.4f}")
    ax.set_yscale("log"), ax.set_ylim(bottom=lo), ax.set_xlabel("generator step")
    ax.set_ylabel(f"unbiased energy distance to {args.n_eval} real points")
    ax.set_title(f"distance to the data during distillation ({args.n_eval} samples each; thin lines: seeds)",
                 fontsize=9)
    ax.legend(fontsize=7)

    push = eq22_push(args)
    n = int(math.isqrt(len(push["x"])))
    xy = [push["x"][:, i].reshape(n, n) for i in (0, 1)]
    arrows = (torch.arange(n)[:, None] % 3 == 0) & (torch.arange(n)[None] % 3 == 0)  # every third grid point
    draw = arrows.reshape(-1) & (push["p_gen"] > 1e-3 * push["p_gen"].max())
    weighted = {k: push[k] * push["p_gen"][:, None] for k in ("data-free UID", "RealUID own", "RealUID real")}
    scale = float(max(v[draw].norm(dim=1).max() for v in weighted.values())) * 8 or 1.0  # one scale for all three
    titles = {"data-free UID": "data-free: f_gen - f*", "RealUID own": "RealUID: b p_g (f_gen - f*) / D",
              "RealUID real": "RealUID, real data: (b - a)(p_g - p*) f* / D"}
    for j, (key, v) in enumerate(weighted.items()):
        ax = fig.add_subplot(bottom[0, 2 + j])
        ax.contourf(*xy, push["p_gen"].reshape(n, n), levels=np.linspace(0.02, 1, 6) * float(push["p_gen"].max()),
                    cmap="Oranges", alpha=0.6)
        ax.contour(*xy, push["p_real"].reshape(n, n), levels=np.linspace(0.1, 1, 5) * float(push["p_real"].max()),
                   colors="k", linewidths=0.6)
        c = push["centre"]
        ax.add_patch(plt.Circle(c.tolist(), push["radius"], fill=False, ls="--", color="tab:green"))
        ax.annotate("missed mode", c.tolist(), xytext=(0, -45), textcoords="offset points", ha="center", fontsize=7,
                    color="tab:green")
        ax.quiver(push["x"][draw, 0], push["x"][draw, 1], v[draw, 0], v[draw, 1], scale=scale, width=0.006,
                  color=colors.get("RealUID" if key != "data-free UID" else key, "tab:red"))
        ax.set_title(f"{titles[key]}\ntoward the missed mode {push[key + ' pull']:+.4f} (from its disk "
                     f"{push[key + ' pull inside']:+.4f})\nradial on the rest {push[key + ' radial']:+.4f}",
                     fontsize=7)
        ax.set_xlim(-4, 4), ax.set_ylim(-4, 4), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
        if j == 0:
            ax.set_xlabel(f"Eq. (22) push x p_gen, flow matching, exact fields, t = {push['t']}; orange: p_gen "
                          f"(data without mode {push['missed']}), black: p*; a {args.alpha}, b {args.beta[0]}",
                          fontsize=7, loc="left")
    teacher_txt = "exact field" if args.teacher == "exact" else "trained network"
    error_txt = f", teacher error {args.teacher_error}" if args.teacher_error else ""
    missed_txt = f", students start without mode {args.missed_mode}" if args.missed_mode is not None else ""
    fig.suptitle(f"RealUID on a 2-D mixture ({args.path}): teacher = {teacher_txt}{error_txt}{missed_txt}, "
                 f"alpha {args.alpha}, beta {', '.join(map(str, args.beta))}"
                 + (f", gamma {args.gamma}" if args.gamma is not None else ""), fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.05, hspace=0.35)
    fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)


def animate(args, run, fh):
    """A GIF of the first seed: each student's samples (EMA) over real data in grey, side by side, at every point
    of the distance curve, with the curves growing beneath; the last frame is held."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    students, real = list(run["frames"]), run["samples"]["real"]
    curves = {k: ([c["step"] for c in run["curves"][k]], [c["energy"] for c in run["curves"][k]]) for k in students}
    fig = plt.figure(figsize=(3.2 * len(students), 4.8), dpi=80)
    grid = fig.add_gridspec(2, len(students), height_ratios=(2.3, 1), left=0.1, right=0.97, bottom=0.1, top=0.9)
    dots, lines = [], []
    for j, name in enumerate(students):
        ax = fig.add_subplot(grid[0, j])
        ax.scatter(*real[:1000].T, s=1, c="0.8")
        dots.append(ax.scatter(*run["frames"][name][0][:1000].T, s=1, c=COLORS[j]))
        ax.set_title(name, fontsize=8), ax.set_xlim(-4.5, 4.5), ax.set_ylim(-4.5, 4.5), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
    ax = fig.add_subplot(grid[1, :])
    for j, name in enumerate(students):
        lines.append(ax.plot([], [], "-", c=COLORS[j], lw=1)[0])
    steps = curves[students[0]][0]
    ax.set_xlim(0, steps[-1]), ax.set_yscale("log"), ax.set_ylim(1e-4, 3), ax.tick_params(labelsize=7)
    ax.set_xlabel("generator step", fontsize=7), ax.set_ylabel("distance to data", fontsize=7)
    images = []
    for i, step in enumerate(steps):
        for j, name in enumerate(students):
            dots[j].set_offsets(run["frames"][name][i][:1000].numpy())
            lines[j].set_data(curves[name][0][:i + 1], curves[name][1][:i + 1])
        fig.suptitle(f"{args.path}: one-step students, generator step {step}", fontsize=9)
        fig.canvas.draw()
        images.append(Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert(
            "RGB").quantize(colors=32))
    plt.close(fig)
    durations = [120] * (len(images) - 1) + [2500]  # milliseconds; hold the last frame
    images[0].save(fh, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)


def report(args, runs, summary):
    n = len(runs)
    print(f"\n{args.path}, teacher {args.teacher} (error {args.teacher_error}), {n} seed(s), {args.n_eval} points per "
          f"sample: unbiased energy distance to the data (mean over {args.n_ref} fresh references), its ratio to the "
          f"teacher's, share near a mode, mode-weight error (mean +- sd over seeds)")
    print(f"{'model':26s} {'distance':>18s} {'/ teacher':>9s} {'near':>16s} {'mode error':>16s}")
    teacher = summary["teacher"]["energy"][0]
    for model, s in summary.items():
        if " - data-free" not in model:
            print(f"{model:26s} {s['energy'][0]:+.5f} +- {s['energy'][1]:.5f} {s['energy'][0] / teacher:8.2f}x "
                  + " ".join(f"{s[m][0]:.4f} +- {s[m][1]:.4f}" for m in ("near_mode", "mode_tv")))
    for model, s in summary.items():
        extra = [m for m in s if m not in ("energy", "near_mode", "mode_tv")] if " - data-free" not in model else []
        for m in extra:
            v = s[m]
            fmt = ".0f" if m.startswith("steps") else ".4f"
            print(f"  {model}: {m} " + (f"{v[0]:{fmt}} +- {v[1]:{fmt}}" if isinstance(v, tuple) else f"{v} of {n}"))
    for model, diffs in summary.items():
        if " - data-free" in model:
            print(f"{model} (paired, mean +- standard error; seeds where it is lower):")
            for m, d in diffs.items():
                se = "n/a (1 seed)" if d["se"] is None else f"{d['se']:.4f}"
                print(f"  {m:26s} {d['mean']:+.4f} +- {se}   lower in {d['lower_in']} of {d['seeds']}")


def run_all(args):
    """Every seed, in --jobs processes: whole seeds when there are at least as many seeds as jobs, otherwise one
    student of a seed per process (each retrains its seed's teacher, which costs no wall time: the students
    would wait for it anyway). Every process runs one thread, so the numbers do not depend on --jobs."""
    seeds = [args.seed + i for i in range(args.seeds)]
    units = [(args, s, None) for s in seeds] if len(seeds) >= args.jobs else [
        (args, s, [name]) for s in seeds for name in student_names(args)]
    if args.jobs == 1 or len(units) == 1:
        return [run_seed(args, s) for s in seeds]
    with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(units)), initializer=torch.set_num_threads,
                                                   initargs=(1,)) as pool:
        parts = pool.starmap(run_seed, units)  # a failure raises here, and leaving `with` ends every worker
        pool.close(), pool.join()
    runs = {}
    for part in parts:  # merge the students of each seed
        run = runs.setdefault(part["seed"], part)
        run["curves"].update(part["curves"]), run["table"].update(part["table"])
        run["samples"].update(part["samples"]), run["frames"].update(part["frames"])
    order = list(student_names(args))
    for run in runs.values():  # the students in their usual order, whichever process finished first
        run["curves"] = {k: run["curves"][k] for k in order}
        run["table"] = {k: v for k, v in run["table"].items() if k not in order} | {k: run["table"][k] for k in order}
        run["samples"] = {k: v for k, v in run["samples"].items() if k not in order} | {
            k: run["samples"][k] for k in order}
    return [runs[s] for s in seeds]


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every --jobs worker: the same arithmetic, so the same numbers
    try:
        return run_and_save(args)
    finally:
        torch.set_num_threads(threads)


def run_and_save(args):
    if not args.force:  # an earlier run's results, or its figure of another --path, are never silently mixed
        old = [f for f in os.listdir(args.out) if f in ("results.json", "samples.npz") or
               f.startswith("toy2d_")] if os.path.isdir(args.out) else []
        if old:
            raise SystemExit(f"{args.out} already holds a run ({', '.join(sorted(old))}): choose another --out, or "
                             f"--force to replace it")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    runs = run_all(args)
    summary = summarise(args, runs)
    report(args, runs, summary)
    keep = ("seed", "table", "curves", "levels")
    results = {"args": vars(args), "summary": summary, "seeds": [{k: r[k] for k in keep} for r in runs],
               "seconds": time.perf_counter() - start}
    first = runs[0]
    arrays = {k.replace(" ", "_").replace("-", "_").replace("/", ""): v.numpy() for k, v in first["samples"].items()}
    if args.path == "bridge":
        arrays["x1"] = first["x1"].numpy()
    results_json, samples_npz, png = (os.path.join(args.out, f) for f in ("results.json", "samples.npz",
                                                                           f"toy2d_{args.path}.png"))
    writers = {results_json: lambda fh: fh.write(json.dumps(results, indent=1, allow_nan=False).encode()),
               samples_npz: lambda fh: np.savez(fh, **arrays), png: lambda fh: plot(args, runs, summary, fh)}
    if args.animate:
        writers[png[:-4] + ".gif"] = lambda fh: animate(args, first, fh)
    for f in os.listdir(args.out) if args.force else []:  # an old figure of another --path, or an old GIF
        if f.startswith("toy2d_") and os.path.join(args.out, f) not in writers:
            os.remove(os.path.join(args.out, f))
    save_atomic(writers)
    print(f"wrote {', '.join(map(os.path.basename, writers))} in {args.out} ({time.perf_counter() - start:.0f} s)")
    return runs, summary


def on_sigterm(signum, frame):
    raise KeyboardInterrupt  # as Ctrl-C: save_atomic removes its .tmp files


def cli(argv=None):
    """main, with its expected failures as one line and exit status 1 (unexpected ones keep their traceback)."""
    try:
        return main(argv)
    except FloatingPointError as e:
        raise SystemExit(f"toy2d.py: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("toy2d.py: interrupted; the previous outputs are intact") from None


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)
    cli()
