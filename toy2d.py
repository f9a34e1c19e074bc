"""RealUID on 2-D Gaussian mixtures, on the CPU: teacher -> one-step generator, with and without real data.

    python toy2d.py --real-data                      # flow matching: the README's figure and table
    python toy2d.py --real-data --seeds 5            # 5 paired seeds: mean +- sd, RealUID - data-free +- se
    python toy2d.py --path bridge --real-data        # every family: fm | diffusion | bridge | si
    python toy2d.py --teacher exact --teacher-error 0.5 --real-data   # a corrupted teacher (App. A.1.4)

Paper convention: data x0 at t = 0, the other end x1 at t = 1. Writes, atomically, DIR/toy2d_<path>.png
(samples, distance to the data along training, and the optimal fake model of Eq. (22) that real data
changes), DIR/results.json (arguments, per-seed metrics and curves, the summary over seeds) and
DIR/samples.npz (the first seed's samples).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

import losses
import paths
from nets import MLP


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--path", default="fm", choices=list(paths.PATHS), help="matching family: flow matching, VP diffusion, Brownian "
      "bridge (corrupted observation x1 -> clean x0) or stochastic interpolant (a two-mode source x1 -> x0)")
    a("--real-data", action="store_true", help="also distil a RealUID student with real data (alpha, beta below)")
    a("--alpha", type=float, default=0.9, help="alpha in RealUM, Eq. (16): weight of generated data; in (0, 1]")
    a("--beta", type=float, default=0.94, help="beta in RealUM, Eq. (16); in (0, 1]; beta/alpha != 1 lets real data "
      "change the fake model's optimum, Eq. (22)")
    a("--gamma", type=float, default=None, help="gamma of the general RealUID loss, App. A.2 Def. 3 (default: the "
      "losses of Eqs. (16)-(17), i.e. gamma = alpha)")
    a("--delta-beta", action="store_true", help="with --gamma: parametrise delta = beta (f* - f) instead of f* - f")
    a("--teacher", default="trained", choices=["trained", "exact"], help="f*: a network trained with the UM loss, "
      "Eq. (3), or the closed-form field of the mixture (the generator always starts from the trained network)")
    a("--teacher-error", type=float, default=0.0, help="corrupted teacher (App. A.1.4): f* + E (f_wrong - f*), f_wrong "
      "the exact field of the mixture with its mode weights reversed; E = 1 teaches the wrong weights")
    a("--modes", type=int, default=5, help="modes of p0* (radius 2.5, variance 0.15, weights proportional to 5, ..., 1)")
    a("--nfe", type=int, default=32, help="N, the teacher sampler's number of network calls")
    a("--teacher-steps", type=int, default=2000, help="teacher training steps (Adam (0.9, 0.999))")
    a("--steps", type=int, default=None, help="distillation: generator steps, each after K fake-model steps "
      "(default 1000; diffusion 2000)")
    a("--fake-steps", type=int, default=1, help="K, fake-model steps per generator step (paper, CIFAR-10: 5, from "
      "random weights)")
    a("--fake-init", default="teacher", choices=["random", "teacher"], help="fake model f's initial weights (paper, "
      "CIFAR-10: random; here the teacher's, so that K = 1 suffices)")
    a("--batch", type=int, default=512, help="batch size of every step")
    a("--lr-teacher", type=float, default=2e-3, help="teacher learning rate, in (0, 1)")
    a("--lr", type=float, default=2e-3, help="generator and fake-model peak learning rate, in (0, 1) (Adam betas "
      "(0, 0.999)); linear warm-up, then cosine decay to 0.1x over --steps")
    a("--warmup", type=int, default=50, help="generator steps of learning-rate warm-up")
    a("--ema", type=float, default=0.99, help="EMA decay of the generator, in [0, 1); the EMA is what is sampled")
    a("--hidden", type=int, default=128, help="MLP width (teacher, fake model and generator share it)")
    a("--depth", type=int, default=3, help="MLP hidden layers")
    a("--bridge-eps", type=float, default=0.5, help="eps_b, the Brownian bridge's noise level")
    a("--bridge-noise", type=float, default=1.0, help="sigma of the bridge's observation x1 = x0 + sigma n")
    a("--si-a", type=float, default=1.0, help="a in the interpolant's gamma(t) = a t (1 - t)")
    a("--n-eval", type=int, default=4000, help="samples per model for the final metrics (W2 on 4 blocks of 500)")
    a("--eval-every", type=int, default=25, help="generator steps between points of the distance curve")
    a("--seed", type=int, default=0, help="first random seed (data, networks, draws)")
    a("--seeds", type=int, default=1, help="paired seeds seed, seed + 1, ...: both students share the seed, teacher "
      "and fake-model initialisation")
    a("--out", default="runs/toy2d", help="output folder")
    args = p.parse_args(argv)
    if args.steps is None:  # the VP-diffusion students converge slower (README, "Every family")
        args.steps = 2000 if args.path == "diffusion" else 1000
    # Validate everything before any training (a bad flag must not cost a trained teacher).
    for name, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    try:
        losses.check_alpha_beta(args.alpha, args.beta)
        if args.gamma is not None:
            losses.check_gamma(args.gamma)
    except ValueError as e:
        p.error(str(e))
    if args.delta_beta and args.gamma is None:
        p.error("--delta-beta parametrises the general loss: give --gamma too (App. A.2)")
    counts = ["nfe", "teacher_steps", "steps", "fake_steps", "batch", "hidden", "depth", "n_eval", "eval_every", "seeds"]
    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.modes < 2 or args.warmup < 0 or args.seed < 0:
        p.error("--modes must be at least 2, --warmup and --seed non-negative")
    if not (0 < args.lr < 1 and 0 < args.lr_teacher < 1):
        p.error(f"--lr and --lr-teacher must be in (0, 1); got {args.lr}, {args.lr_teacher}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if min(args.bridge_eps, args.bridge_noise) <= 0 or args.si_a < 0 or args.teacher_error < 0:
        p.error("--bridge-eps and --bridge-noise must be positive, --si-a and --teacher-error non-negative")
    return args


# ---- the problem: p0* a K-mode mixture with unequal weights, and the pairs (x0, x1) of each family
VAR = 0.15  # each mode's variance per axis


def mixture(K, weights=None):
    """K modes on a circle of radius 2.5, weights K : K - 1 : ... : 1 unless given."""
    angles = torch.arange(K) * 2 * math.pi / K
    means = 2.5 * torch.stack([angles.cos(), angles.sin()], 1)  # (K, 2)
    w = torch.arange(K, 0, -1).double() / (K * (K + 1) / 2) if weights is None else weights
    return paths.GaussianMixture(means, VAR * torch.eye(2).repeat(K, 1, 1), w)


def make_path(args):
    return {"fm": paths.FlowMatching(), "diffusion": paths.Diffusion(), "si": paths.Interpolant(args.si_a),
            "bridge": paths.Bridge(args.bridge_eps)}[args.path]


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
def energy_distance(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic), >= 0, = 0 iff same law."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def w2(x, y, block=500, blocks=4):
    """Exact W2 between samples by optimal assignment, averaged over `blocks` disjoint blocks of `block`
    points (an exact W2 on 500 points costs 0.1-1 s; its finite-sample floor is in the "real" row)."""
    out, block = [], min(block, len(x), len(y))  # at least one block, however small the sample
    for i in range(0, min(len(x), len(y), block * blocks) - block + 1, block):
        cost = torch.cdist(x[i:i + block].double(), y[i:i + block].double()).pow(2).numpy()
        rows, cols = linear_sum_assignment(cost)
        out.append(math.sqrt(cost[rows, cols].mean()))
    return float(np.mean(out))


def mode_metrics(x, p0):
    """Share of samples within 3 std of a mode, and total variation between the per-mode weights of
    those samples and the true weights ("mode-weight error")."""
    d2 = torch.cdist(x.double(), p0.means).pow(2) / VAR  # squared Mahalanobis distance to each mode
    near = d2.min(1).values < 9.0
    counts = torch.bincount(d2.argmin(1)[near], minlength=len(p0.weights)).double()
    return float(near.double().mean()), float(0.5 * (counts / max(1.0, float(counts.sum())) - p0.weights).abs().sum())


def metrics(x, x_ref, p0):
    near, tv = mode_metrics(x, p0)
    return {"energy": energy_distance(x, x_ref), "w2": w2(x, x_ref), "near_mode": near, "mode_tv": tv}


# ---- one seed: teacher, the two students, their metrics
def lr_factor(args, it):
    """Linear warm-up over --warmup generator steps, then cosine decay from 1 to 0.1."""
    return min(1.0, (it + 1) / max(1, args.warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * it / args.steps)))


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


def distil(args, path, joint, net, f_star, alpha, beta, evaluate, seed):
    """K fake steps (Eq. 16), then one generator step (Eq. 17); returns the EMA generator and the
    distance curve [(generator step, energy distance)] of the EMA generator."""
    torch.manual_seed(seed + 1)  # both students see the same fake-model init and draws
    G = copy.deepcopy(net).requires_grad_(True)  # Sec. 3: the generator starts from the teacher
    G_ema = copy.deepcopy(net)
    f_fake = copy.deepcopy(net).requires_grad_(True) if args.fake_init == "teacher" else MLP(
        net.body[0].in_features - net.t_dim, 2, args.hidden, args.depth)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=True)
    opt_f = torch.optim.Adam(f_fake.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=True)
    general = args.gamma is not None and (alpha, beta) != (1.0, 1.0)  # the data-free student is always Eq. (13)
    gamma, scale = (args.gamma if general else alpha), (beta if args.delta_beta else 1.0)
    curve = [(0, evaluate(G_ema))]
    name = "RealUID" if (alpha, beta) != (1.0, 1.0) else "data-free UID"
    for it in tqdm(range(args.steps), desc=f"{name}, seed {seed}", mininterval=1, leave=False):
        for opt in (opt_g, opt_f):
            opt.param_groups[0]["lr"] = args.lr * lr_factor(args, it)
        for _ in range(args.fake_steps):
            x0_real, x1 = pairs(joint, args.batch)
            with torch.no_grad():  # fake step: the generator is fixed
                x0_gen = path.generate(G, generator_input(args, joint, x1), x1)
            loss_f = losses.realum_loss(path, f_fake, x0_gen, x0_real, x1, alpha, beta) if not general else \
                losses.general_fake_loss(path, f_star, f_fake, x0_gen, x0_real, x1, alpha, beta, gamma, scale)
            update(opt_f, loss_f.mean(), "fake-model", it)  # Eq. (16), or App. A.2
        _, x1 = pairs(joint, args.batch)  # the bridge's observations of real data; noise / source otherwise
        # generator step: the losses hold f and f* fixed, gradients reach theta through their inputs
        x0_gen = path.generate(G, generator_input(args, joint, x1), x1)
        loss_g = losses.realuid_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta) if not general else \
            losses.general_generator_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta, gamma, scale)
        update(opt_g, loss_g.mean(), "generator", it)  # Eq. (17), or App. A.2
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        if (it + 1) % args.eval_every == 0 or it + 1 == args.steps:
            if not all(torch.isfinite(p).all() for p in G_ema.parameters()):
                raise FloatingPointError(f"generator weights are not finite at generator step {it}: lower --lr")
            curve.append((it + 1, evaluate(G_ema)))
    return G_ema, curve


def run_seed(args, seed):
    """Everything for one seed: {"table": {model: metrics}, "curves": {student: curve}, "samples": {...}}."""
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

    torch.manual_seed(seed + 1000)  # fixed held-out data for the curves and the final metrics
    x_curve, x1_curve = pairs(joint, 2000)
    z_curve = generator_input(args, joint, x1_curve)
    x_test, x1_test = pairs(joint, args.n_eval)
    z_test = generator_input(args, joint, x1_test)
    x_ref = pairs(joint, args.n_eval)[0]  # a second real sample: the floor of finite samples

    def evaluate(G):
        with torch.no_grad():
            return energy_distance(path.generate(G, z_curve, x1_curve), x_curve)

    students = {"data-free UID": distil(args, path, joint, net, f_star, 1.0, 1.0, evaluate, seed)}
    if args.real_data:
        students["RealUID"] = distil(args, path, joint, net, f_star, args.alpha, args.beta, evaluate, seed)
    with torch.no_grad():
        samples = {"real": x_test, "teacher": path.sample(f_star, x1_test, args.nfe),
                   "generator at init": path.generate(net, z_test, x1_test),
                   **{k: path.generate(G, z_test, x1_test) for k, (G, _) in students.items()}}
        levels = {"teacher": energy_distance(path.sample(f_star, x1_curve, args.nfe), x_curve),
                  "generator at init": evaluate(net), "real": energy_distance(x_test[:2000], x_curve)}
    return {"seed": seed, "table": {k: metrics(x, x_ref, p0) for k, x in samples.items()},
            "curves": {k: c for k, (_, c) in students.items()}, "levels": levels, "samples": samples,
            "x1": x1_test}


def reach(curve, level):
    """First generator step at which a distance curve is at or below `level` (the last step if never)."""
    return next((s for s, e in curve if e <= level), curve[-1][0])


def summarise(runs):
    """Per model: mean and sd over seeds of each metric. RealUID - data-free, paired by seed: mean, standard
    error and the number of seeds where RealUID is lower, at the end, as the mean log10 distance over the
    trajectory, and as the generator steps each student needs to reach the data-free student's final distance."""
    out = {}
    for model in runs[0]["table"]:
        out[model] = {m: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
                      for m in runs[0]["table"][model] for v in [[r["table"][model][m] for r in runs]]}
    if "RealUID" in runs[0]["table"]:
        diffs = {m: [r["table"]["RealUID"][m] - r["table"]["data-free UID"][m] for r in runs]
                 for m in ("energy", "w2", "near_mode", "mode_tv")}
        traj = lambda r, k: np.mean([math.log10(e) for _, e in r["curves"][k][1:]])  # noqa: E731
        diffs["log10 energy, trajectory"] = [traj(r, "RealUID") - traj(r, "data-free UID") for r in runs]
        diffs["steps to data-free end"] = [reach(r["curves"]["RealUID"], r["curves"]["data-free UID"][-1][1]) -
                                           reach(r["curves"]["data-free UID"], r["curves"]["data-free UID"][-1][1])
                                           for r in runs]
        se = lambda v: float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None  # noqa: E731
        out["RealUID - data-free"] = {m: {"mean": float(np.mean(v)), "se": se(v), "lower_in": int(np.sum(np.array(v) < 0)),
                                          "seeds": len(v)} for m, v in diffs.items()}
    return out


# ---- the mechanism: the optimal fake model of Eq. (22) for a generator that misses a mode
def eq22_push(args, t=0.2, missed=2, n=17):
    """On an n x n grid at time t (flow matching, exact fields), the push f_opt - f* that the optimal
    fake model of Eq. (22), f_opt = [beta p_gen f_gen + (1 - beta) p* f*] / [alpha p_gen + (1 - alpha) p*],
    gives a generator whose p_gen is the data with mode `missed` removed: data-free (alpha = beta = 1,
    f_opt = f_gen) and RealUID. Drawn where the generator has mass (the only place it gets gradient)."""
    p0, path, noise = mixture(args.modes), paths.FlowMatching(), paths.GaussianMixture.standard(2)
    w = p0.weights.clone()
    w[missed] = 0
    real = paths.ExactField(path, paths.independent(p0, noise))
    gen = paths.ExactField(path, paths.independent(paths.GaussianMixture(p0.means, p0.covs, w / w.sum()), noise))
    g = torch.linspace(-4, 4, n, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)  # (n * n, 2)
    tt = torch.full((len(x),), t, dtype=torch.float64)
    f_real, f_gen = real(x, tt), gen(x, tt)
    p_real, p_gen = real.log_marginal(x, tt).exp()[:, None], gen.log_marginal(x, tt).exp()[:, None]
    toward = (p0.means[missed] - x) / (p0.means[missed] - x).norm(dim=1, keepdim=True)  # unit vectors to the mode
    out = {"x": x, "p_real": p_real[:, 0], "p_gen": p_gen[:, 0], "t": t, "drawn": p_gen[:, 0] > 1e-3 * p_gen.max()}
    for name, (al, be) in {"data-free UID": (1.0, 1.0), "RealUID": (args.alpha, args.beta)}.items():
        push = (be * p_gen * f_gen + (1 - be) * p_real * f_real) / (al * p_gen + (1 - al) * p_real) - f_real  # Eq. (22)
        out[name] = push
        out[name + " pull"] = float((p_gen[:, 0] * (push * toward).sum(1)).sum() / p_gen.sum())  # E_gen <push, toward>
    return out


# ---- output
def save_atomic(writers):
    """{path: write(file object)}: every file into path + '.tmp' first, then all renamed, so a failed
    write (a full disk, a failing plot, Ctrl-C) leaves the previous outputs intact and nothing partial."""
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


def plot(args, runs, summary, fh):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"data-free UID": "tab:blue", "RealUID": "tab:red"}
    first, p0 = runs[0], mixture(args.modes)
    panels = ["real", "teacher", *first["curves"]]
    fig = plt.figure(figsize=(16, 9))
    grid = fig.add_gridspec(2, 4)
    for j, name in enumerate(panels):
        ax, x = fig.add_subplot(grid[0, j]), first["samples"][name][:2000]
        if name != "real":
            ax.scatter(*first["samples"]["real"][:2000].T, s=2, c="0.8")
        ax.scatter(*x.T, s=2, alpha=0.6, c=colors.get(name, "k" if name == "real" else "tab:green"))
        s = summary[name]
        nfe = {"real": "", "teacher": f", NFE {args.nfe}"}.get(name, ", NFE 1")
        ax.set_title(f"{name}{nfe}\nenergy {s['energy'][0]:.4f}, mode-weight error {s['mode_tv'][0]:.3f}"
                     + (f"\n(mean of {len(runs)} seeds; seed {first['seed']} shown)" if len(runs) > 1 else ""), fontsize=9)
        ax.set_xlim(-4.5, 4.5), ax.set_ylim(-4.5, 4.5), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])

    ax = fig.add_subplot(grid[1, :2])  # convergence: the paper's claim is about speed
    for name, c in colors.items():
        if name in first["curves"]:
            steps = [s for s, _ in first["curves"][name]]
            e = np.array([[v for _, v in r["curves"][name]] for r in runs])
            ax.plot(steps, e.mean(0), "o-", ms=2, c=c, label=f"{name} (EMA), mean of {len(runs)} seed(s)")
            if len(runs) > 1:
                ax.fill_between(steps, e.mean(0) - e.std(0, ddof=1), e.mean(0) + e.std(0, ddof=1), color=c, alpha=0.2)
    for key, style, label in [("generator at init", "-.", "generator at initialisation"),
                              ("teacher", "--", f"teacher (NFE {args.nfe})"), ("real", ":", "real vs real (floor)")]:
        level = float(np.mean([r["levels"][key] for r in runs]))
        ax.axhline(level, ls=style, c="k", lw=1, label=f"{label}: {level:.4f}")
    ax.set_yscale("log"), ax.set_xlabel("generator step"), ax.set_ylabel("energy distance to held-out data")
    ax.set_title("distance to the data during distillation" + (" (bands: +- sd over seeds)" if len(runs) > 1 else ""),
                 fontsize=9)
    ax.legend(fontsize=8)

    arrows, dens = eq22_push(args), eq22_push(args, n=81)
    grid_xy = [dens["x"][:, i].reshape(81, 81) for i in (0, 1)]
    scale = float((arrows["RealUID"] * arrows["p_gen"][:, None]).norm(dim=1).max()) * 6  # one scale for both panels
    for j, name in enumerate(["data-free UID", "RealUID"]):
        ax = fig.add_subplot(grid[1, 2 + j])
        ax.contourf(*grid_xy, dens["p_gen"].reshape(81, 81), levels=np.linspace(0.02, 1, 6) * float(dens["p_gen"].max()),
                    cmap="Oranges", alpha=0.6)
        ax.contour(*grid_xy, dens["p_real"].reshape(81, 81), levels=np.linspace(0.1, 1, 5) * float(dens["p_real"].max()),
                   colors="k", linewidths=0.6)
        force = arrows[name] * arrows["p_gen"][:, None]  # the push weighted by the generator's density at t
        x, v = arrows["x"][arrows["drawn"]], force[arrows["drawn"]]
        ax.quiver(x[:, 0], x[:, 1], v[:, 0], v[:, 1], color=colors[name], scale=scale, width=0.006)
        ab = "alpha = beta = 1" if name == "data-free UID" else f"alpha {args.alpha}, beta {args.beta}"
        ax.set_title(f"{name} ({ab}): p_gen (f_opt - f*), Eq. (22)\nexact, t = {arrows['t']}; mean pull toward the "
                     f"missed mode {arrows[name + ' pull']:+.4f}", fontsize=8)
        ax.set_xlim(-4, 4), ax.set_ylim(-4, 4), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"RealUID on a 2-D mixture: {args.path}, teacher {args.teacher}, error {args.teacher_error}, "
                 f"alpha {args.alpha}, beta {args.beta}" + (f", gamma {args.gamma}" if args.gamma is not None else ""),
                 fontsize=10)
    fig.tight_layout(h_pad=2.5, rect=(0, 0, 1, 0.97))
    fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def report(args, runs, summary):
    n = len(runs)
    print(f"\n{args.path}, teacher {args.teacher} (error {args.teacher_error}), {n} seed(s), {args.n_eval} samples: "
          f"energy distance and W2 to fresh real data, share near a mode, mode-weight error (mean +- sd over seeds)")
    print(f"{'model':18s} {'energy':>16s} {'W2':>16s} {'near':>16s} {'mode error':>16s}")
    for model, s in summary.items():
        if model != "RealUID - data-free":
            print(f"{model:18s} " + " ".join(f"{s[m][0]:.4f} +- {s[m][1]:.4f}" for m in ("energy", "w2", "near_mode",
                                                                                          "mode_tv")))
    if "RealUID - data-free" in summary:
        print("RealUID - data-free (paired, mean +- standard error; seeds where RealUID is lower):")
        for m, d in summary["RealUID - data-free"].items():
            se = "n/a (1 seed)" if d["se"] is None else f"{d['se']:.4f}"
            print(f"  {m:26s} {d['mean']:+.4f} +- {se}   lower in {d['lower_in']} of {d['seeds']}")


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    runs = [run_seed(args, args.seed + i) for i in range(args.seeds)]
    summary = summarise(runs)
    report(args, runs, summary)
    keep = ("seed", "table", "curves", "levels")
    results = {"args": vars(args), "summary": summary, "seeds": [{k: r[k] for k in keep} for r in runs],
               "seconds": time.perf_counter() - start}
    first = runs[0]
    arrays = {k.replace(" ", "_").replace("-", "_"): v.numpy() for k, v in first["samples"].items()}
    if args.path == "bridge":
        arrays["x1"] = first["x1"].numpy()
    png = os.path.join(args.out, f"toy2d_{args.path}.png")
    save_atomic({os.path.join(args.out, "results.json"): lambda fh: fh.write(json.dumps(results, indent=1,
                                                                                        allow_nan=False).encode()),
                 os.path.join(args.out, "samples.npz"): lambda fh: np.savez(fh, **arrays),
                 png: lambda fh: plot(args, runs, summary, fh)})
    print(f"wrote {png}, results.json, samples.npz ({time.perf_counter() - start:.0f} s)")
    return runs, summary


if __name__ == "__main__":
    main()
