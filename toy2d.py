"""RealUID on 2-D Gaussian mixtures, on the CPU: teacher -> one-step generator, with and without real data.

    python toy2d.py --real-data                      # flow matching, the README's figure and table
    python toy2d.py --path bridge --real-data        # every family: fm | diffusion | bridge | si
    python toy2d.py --teacher exact --teacher-error 0.5 --real-data   # a corrupted teacher (App. A.1.4)

Paper convention: data x0 at t = 0, the other end x1 at t = 1. Writes DIR/toy2d_<path>.png,
DIR/results.json (arguments, metrics table, loss curves) and DIR/samples.npz.
"""
import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import losses
import paths
from nets import MLP

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--path", default="fm", choices=list(paths.PATHS), help="matching family: flow matching, VP diffusion, "
               "Brownian bridge (corrupted observation x1 -> clean x0) or stochastic interpolant (a two-mode source x1 -> x0)")
p.add_argument("--real-data", action="store_true", help="also distil a RealUID generator with real data (alpha, beta below)")
p.add_argument("--alpha", type=float, default=0.9, help="alpha in RealUM, Eq. (16): weight of generated data; in (0, 1]")
p.add_argument("--beta", type=float, default=0.94, help="beta in RealUM, Eq. (16); in (0, 1]; beta/alpha != 1 lets real "
               "data change the fake model's optimum, Eq. (22)")
p.add_argument("--gamma", type=float, default=None, help="gamma of the general RealUID loss, App. A.2 (default: the "
               "losses of Eqs. (16)-(17), i.e. gamma = alpha)")
p.add_argument("--delta-beta", action="store_true", help="with --gamma: parametrise delta = beta (f* - f) instead of f* - f")
p.add_argument("--teacher", default="trained", choices=["trained", "exact"], help="f*: a network trained with the UM loss, "
               "Eq. (3), or the closed-form field of the mixture (the generator always starts from the trained network)")
p.add_argument("--teacher-error", type=float, default=0.0, help="corrupted teacher (App. A.1.4): f* + E (f_wrong - f*), "
               "f_wrong the exact field of the mixture with its mode weights reversed; E = 1 teaches the wrong weights")
p.add_argument("--modes", type=int, default=5, help="K, modes of p0* (radius 2.5, variance 0.15, weights proportional to K, ..., 1)")
p.add_argument("--nfe", type=int, default=32, help="N, the teacher sampler's number of network calls")
p.add_argument("--teacher-steps", type=int, default=3000, help="teacher training steps (Adam (0.9, 0.999))")
p.add_argument("--steps", type=int, default=600, help="distillation: generator steps (each after K fake steps)")
p.add_argument("--fake-steps", type=int, default=5, help="K, fake-model steps per generator step (paper: 5)")
p.add_argument("--fake-init", default="random", choices=["random", "teacher"], help="fake model f's initial weights")
p.add_argument("--batch", type=int, default=512, help="batch size for every step")
p.add_argument("--lr-teacher", type=float, default=2e-3, help="teacher learning rate")
p.add_argument("--lr", type=float, default=3e-4, help="generator and fake-model learning rate (Adam betas (0, 0.999))")
p.add_argument("--hidden", type=int, default=128, help="MLP width (teacher, fake model and generator share it)")
p.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
p.add_argument("--bridge-eps", type=float, default=0.5, help="eps_b, the Brownian bridge's noise level")
p.add_argument("--bridge-noise", type=float, default=1.0, help="sigma of the bridge's observation x1 = x0 + sigma n")
p.add_argument("--si-a", type=float, default=1.0, help="a in the interpolant's gamma(t) = a t (1 - t)")
p.add_argument("--n-eval", type=int, default=4000, help="samples per model for the metrics")
p.add_argument("--seed", type=int, default=0, help="random seed (data, networks, draws)")
p.add_argument("--out", default="runs/toy2d", help="output folder")
args = p.parse_args()
losses.check_alpha_beta(args.alpha, args.beta)  # fail now, not after training the teacher
if args.gamma is not None:
    losses.check_gamma(args.gamma)
if min(args.nfe, args.teacher_steps, args.steps, args.fake_steps, args.batch, args.n_eval) < 1:
    p.error("--nfe, --teacher-steps, --steps, --fake-steps, --batch and --n-eval must be positive")
if min(args.bridge_eps, args.bridge_noise, args.modes) <= 0 or args.si_a < 0:
    p.error("--bridge-eps, --bridge-noise and --modes must be positive and --si-a non-negative")
torch.manual_seed(args.seed)
os.makedirs(args.out, exist_ok=True)

# ---- data: p0* a K-mode mixture with unequal weights; the pairs (x0, x1) of each family
angles = torch.arange(args.modes) * 2 * math.pi / args.modes
MEANS = 2.5 * torch.stack([angles.cos(), angles.sin()], 1)  # (K, 2) on a circle of radius 2.5
WEIGHTS = torch.arange(args.modes, 0, -1).float() / (args.modes * (args.modes + 1) / 2)  # K, K - 1, ..., 1
VAR = 0.15  # each mode's variance per axis
p0 = paths.GaussianMixture(MEANS, VAR * torch.eye(2).repeat(args.modes, 1, 1), WEIGHTS)
p0_wrong = paths.GaussianMixture(MEANS, p0.covs, WEIGHTS.flip(0))  # the corrupted teacher's data
path = {"fm": paths.FlowMatching(), "diffusion": paths.Diffusion(), "si": paths.Interpolant(args.si_a),
        "bridge": paths.Bridge(args.bridge_eps)}[args.path]


def joint_of(p):
    """The mixture of pairs (x0, x1) for data p: x1 noise, a corrupted copy of x0, or the source."""
    if args.path == "bridge":
        return paths.corrupted(p, torch.eye(2), args.bridge_noise)
    if args.path == "si":
        return paths.independent(p, paths.GaussianMixture([[-1.5, 0.0], [1.5, 0.0]], 0.5 * torch.eye(2).repeat(2, 1, 1),
                                                          [0.5, 0.5]))
    return paths.independent(p, paths.GaussianMixture.standard(2))


joint = joint_of(p0)


def pairs(n):
    """(x0*, x1) ~ pi: real data and its other end, (n, 2) each."""
    xx = joint.sample(n)
    return xx[:, :2], xx[:, 2:]


def generator_input(x1):
    """z of the one-step generator: a fresh draw from p1 (fm, diffusion, si) or N(0, I) beside x1 (bridge)."""
    return torch.randn_like(x1) if args.path in ("bridge", "diffusion") else pairs(len(x1))[1]


# ---- teacher network (also the generator's initialisation), Eq. (3)
in_dim = 4 if path.observes_x1 else 2
net = MLP(in_dim, 2, args.hidden, args.depth)
opt = torch.optim.Adam(net.parameters(), lr=args.lr_teacher)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, 2 * (1 - i / args.teacher_steps)))
teacher_losses = []
for it in tqdm(range(args.teacher_steps), desc="teacher", mininterval=1):
    x0, x1 = pairs(args.batch)
    loss = losses.um_loss(path, net, x0, x1).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"teacher loss is {loss.item()} at step {it}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    teacher_losses.append(loss.item())
net.requires_grad_(False)

exact = paths.ExactField(path, joint)
error = paths.ExactField(path, joint_of(p0_wrong))
base = net if args.teacher == "trained" else (lambda x, t: exact(x, t))
if args.teacher_error:
    def f_star(x, t):  # App. A.1.4: the corrupted teacher f* + E (f_wrong - f*)
        return base(x, t) + args.teacher_error * (error(x, t) - exact(x, t))
else:
    f_star = base


# ---- distillation: K fake steps (Eq. 16), then one generator step (Eq. 17)
def distil(alpha, beta, real):
    torch.manual_seed(args.seed + 1)  # both students see the same fake-model init and draws
    G = copy.deepcopy(net).requires_grad_(True)  # Sec. 3: the generator starts from the teacher
    f_fake = copy.deepcopy(net).requires_grad_(True) if args.fake_init == "teacher" else MLP(in_dim, 2, args.hidden, args.depth)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(f_fake.parameters(), lr=args.lr, betas=(0.0, 0.999))
    gamma, scale = (alpha if args.gamma is None else args.gamma), (beta if args.delta_beta else 1.0)
    curves = {"fake": [], "generator": []}
    for it in tqdm(range(args.steps), desc="RealUID" if real else "data-free UID", mininterval=1):
        for _ in range(args.fake_steps):
            x0_real, x1 = pairs(args.batch)
            with torch.no_grad():  # fake step: the generator is fixed
                x0_gen = path.generate(G, generator_input(x1), x1)
            if args.gamma is None:
                loss_f = losses.realum_loss(path, f_fake, x0_gen, x0_real, x1, alpha, beta)
            else:
                loss_f = losses.general_fake_loss(path, f_star, f_fake, x0_gen, x0_real, x1, alpha, beta, gamma, scale)
            if not torch.isfinite(loss_f).all():
                raise FloatingPointError(f"non-finite fake-model loss at generator step {it}")
            opt_f.zero_grad(set_to_none=True)
            loss_f.mean().backward()
            opt_f.step()
        _, x1 = pairs(args.batch)  # the bridge's observations of real data; noise / source otherwise
        with losses.frozen(f_fake, net):  # generator step: f and f* are fixed, gradients reach theta via their inputs
            x0_gen = path.generate(G, generator_input(x1), x1)
            if args.gamma is None:
                loss_g = losses.realuid_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta)
            else:
                loss_g = losses.general_generator_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta, gamma, scale)
            if not torch.isfinite(loss_g).all():
                raise FloatingPointError(f"non-finite generator loss at generator step {it}")
            opt_g.zero_grad(set_to_none=True)
            loss_g.mean().backward()
        opt_g.step()
        curves["fake"].append(loss_f.mean().item())
        curves["generator"].append(loss_g.mean().item())
    return G.requires_grad_(False), curves


students = {"data-free UID": distil(1.0, 1.0, False)}
if args.real_data:
    students["RealUID"] = distil(args.alpha, args.beta, True)


# ---- evaluation against fresh real samples
def energy_distance(x, y):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic), >= 0, = 0 iff same law."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_metrics(x):
    """Share of samples within 3 std of a mode, and total variation between the per-mode weights
    of those samples and the true weights."""
    d2 = torch.cdist(x, MEANS).pow(2) / VAR  # squared Mahalanobis distance to each mode
    near = d2.min(1).values < 9.0
    counts = torch.bincount(d2.argmin(1)[near], minlength=args.modes).float()
    weights = counts / max(1.0, float(counts.sum()))
    return float(near.float().mean()), float(0.5 * (weights - WEIGHTS).abs().sum())


def timed(fn, repeats=5):
    """(output, median seconds) of fn() over a few runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


torch.manual_seed(args.seed + 1000)
x0_test, x1_test = pairs(args.n_eval)  # fresh real data and, for the bridge, its observations
z_test = generator_input(x1_test)
samples, nfe, seconds = {"real": x0_test}, {"real": 0}, {"real": 0.0}
samples["teacher"], seconds["teacher"] = timed(lambda: path.sample(f_star, x1_test, args.nfe), repeats=3)
nfe["teacher"] = args.nfe
with torch.no_grad():
    samples["generator at init"], seconds["generator at init"] = timed(lambda: path.generate(net, z_test, x1_test))
    for name, (G, _) in students.items():
        samples[name], seconds[name] = timed(lambda: path.generate(G, z_test, x1_test))
x_ref = pairs(args.n_eval)[0]  # a second real sample: the distance floor of finite samples
rows = []
for name, x in samples.items():
    near, tv = mode_metrics(x)
    rows.append({"model": name, "energy": energy_distance(x, x_ref), "near_mode": near, "mode_tv": tv,
                 "nfe": nfe.get(name, 1), "seconds": seconds[name]})
print(f"\n{args.path}, teacher {args.teacher} (error {args.teacher_error}), {args.n_eval} samples; energy distance "
      f"to fresh real data, share near a mode, per-mode weight TV, NFE, sampling time")
print(f"{'model':18s} {'energy':>8s} {'near':>6s} {'TV':>6s} {'NFE':>4s} {'ms':>8s}")
for r in rows:
    print(f"{r['model']:18s} {r['energy']:8.4f} {r['near_mode']:6.3f} {r['mode_tv']:6.3f} {r['nfe']:4d} "
          f"{1e3 * r['seconds']:8.2f}")
one_step = seconds["data-free UID"]
print(f"one-step speedup over the teacher (NFE {args.nfe}): {seconds['teacher'] / one_step:.0f}x")

# ---- save: results, samples and the figure
with open(os.path.join(args.out, "results.json"), "w") as fh:
    json.dump({"args": vars(args), "table": rows, "speedup": seconds["teacher"] / one_step,
               "curves": {"teacher": teacher_losses, **{k: c for k, (_, c) in students.items()}}}, fh, indent=1)
np.savez(os.path.join(args.out, "samples.npz"), **{k.replace(" ", "_").replace("-", "_"): v.numpy()
                                                    for k, v in samples.items()},
         **({"x1": x1_test.numpy()} if args.path == "bridge" else {}))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

panels = ["real", "teacher", *students]
fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6.4))
for ax, name in zip(axes[0], panels):
    x = samples[name][:2000]
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
    ax.scatter(MEANS[:, 0], MEANS[:, 1], s=WEIGHTS * 400, facecolors="none", edgecolors="k", lw=0.8)
    r = next(r for r in rows if r["model"] == name)
    ax.set_title(f"{name} (NFE {r['nfe']})\nenergy {r['energy']:.3f}, mode TV {r['mode_tv']:.3f}", fontsize=9)
    ax.set_xlim(-4.5, 4.5), ax.set_ylim(-4.5, 4.5), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
axes[1, 0].plot(teacher_losses, lw=0.5)
axes[1, 0].set_title("teacher UM loss, Eq. (3)", fontsize=9)
for j, (name, (_, c)) in enumerate(students.items()):
    ax = axes[1, 1 + j]
    ax.plot(c["fake"], lw=0.5, label="fake model, Eq. (16)")
    ax.plot(c["generator"], lw=0.5, label="generator, Eq. (17)")
    ax.set_title(f"{name} losses", fontsize=9)
    ax.legend(fontsize=7)
for ax in axes[1, 1 + len(students):]:
    ax.axis("off")
fig.suptitle(f"RealUID on a 2-D mixture: {args.path}, teacher {args.teacher}, error {args.teacher_error}, "
             f"alpha {args.alpha}, beta {args.beta}", fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(args.out, f"toy2d_{args.path}.png"), dpi=110)
print(f"wrote {args.out}/toy2d_{args.path}.png, results.json, samples.npz")
