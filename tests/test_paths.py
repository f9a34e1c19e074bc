"""Graders of paths.py, named `test_<function>_<property>` with the family and its equation in the
parameter id (`fm_eq2`, `diffusion_eq1`, `bridge_eq41`, `si_eq42`): `pytest -k bridge` selects the
bridge's, `-k "draw or target"` every family's x_t and c. References are oracles: endpoints, d x_t / dt
by torch.func.jvp, quadrature, a Monte Carlo Brownian motion, Gaussian conditioning by hand (numpy),
the 1-D Gaussian flow-matching closed form, scipy; the exact mixture field is checked before it serves."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

import paths

D = 2


def mixture():
    """Three modes with unequal weights and anisotropic covariances."""
    covs = torch.tensor([[[0.10, 0.03], [0.03, 0.05]], [[0.05, 0.0], [0.0, 0.20]], [[0.08, -0.02], [-0.02, 0.08]]])
    return paths.GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], covs, [0.5, 0.3, 0.2])


def source():
    return paths.GaussianMixture([[0.0, 2.0], [0.0, -2.0]], 0.2 * torch.eye(2).repeat(2, 1, 1), [0.5, 0.5])


def setup(name):
    """(path, joint mixture of (x0, x1)) for every family as the project instantiates it."""
    p0 = mixture()
    if name == "bridge":  # x1 = x0 + strong noise, paired with x0
        return paths.Bridge(eps_b=0.5), paths.corrupted(p0, torch.eye(D), 1.0)
    if name == "si":  # a non-Gaussian source independent of x0
        return paths.Interpolant(si_a=1.0), paths.independent(p0, source())
    path = paths.FlowMatching() if name == "fm" else paths.Diffusion()
    return path, paths.independent(p0, paths.GaussianMixture.standard(D))


EQ = {"fm": "fm_eq2", "diffusion": "diffusion_eq1", "bridge": "bridge_eq41", "si": "si_eq42"}


def families(*names, graded=None):
    """pytest params, one per family; graded = (family or "all", marker) marks those as a course exercise's graders."""
    def marks(n):
        return [graded[1]] if graded and graded[0] in (n, "all") else []
    return [pytest.param(n, id=EQ[n], marks=marks(n)) for n in (names or EQ)]


def assert_close(got, expected, what, atol=1e-12):
    assert got.shape == expected.shape, f"{what}: got shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert torch.allclose(got, expected, atol=atol), (
        f"{what}: got {[round(v, 5) for v in got.flatten()[:4].tolist()]}..., expected "
        f"{[round(v, 5) for v in expected.flatten()[:4].tolist()]}... (largest difference "
        f"{float((got - expected).abs().max()):.3g})")


def draws(n=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("name", families(graded=("bridge", pytest.mark.ex1)))
def test_draw_starts_at_data_x0(name):
    path, _ = setup(name)
    x0, x1, xi = draws()
    assert_close(path.draw(x0, x1, torch.zeros(5, dtype=torch.float64), xi), x0, f"{name}: x_t at t = 0 against x0")


@pytest.mark.parametrize("name", families("fm", "bridge", "si", graded=("bridge", pytest.mark.ex1)))
def test_draw_ends_at_x1(name):
    path, _ = setup(name)
    x0, x1, xi = draws()
    assert_close(path.draw(x0, x1, torch.ones(5, dtype=torch.float64), xi), x1, f"{name}: x_t at t = 1 against x1")


@pytest.mark.parametrize("name", families("bridge", "si", graded=("bridge", pytest.mark.ex1)))
def test_draw_uses_the_given_noise(name):
    """x_t is a function of (x0, x1, t, xi): the same inputs give the same x_t (the losses' generated and real
    terms share xi), and another xi at t = 1/2 gives another x_t."""
    path, _ = setup(name)
    x0, x1, xi = draws()
    t = torch.full((5,), 0.5, dtype=torch.float64)
    assert_close(path.draw(x0, x1, t, xi), path.draw(x0, x1, t, xi), f"{name}: x_t twice from the same xi")
    assert (path.draw(x0, x1, t, xi) - path.draw(x0, x1, t, -xi)).abs().min() > 1e-3, \
        f"{name}: x_t from xi and from -xi at t = 1/2 agree; expected the noise term to change sign"


def test_alpha_sigma_diffusion_eq1_is_the_integrated_vp_schedule():
    """a_t = exp(-1/2 int_0^t beta(s) ds) by quadrature, s_t^2 = 1 - a_t^2, a_1 nearly 0."""
    path = paths.Diffusion()
    for t in [0.0, 0.1, 0.44, 0.9, 1.0]:
        integral = quad(lambda s: 0.1 + (20.0 - 0.1) * s, 0, t)[0]
        a, s = path.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        assert float(a) == pytest.approx(math.exp(-0.5 * integral), rel=1e-10)
        assert float(a ** 2 + s ** 2) == pytest.approx(1.0)
    assert float(path.alpha_sigma(torch.tensor(1.0))[0]) < 0.01


@pytest.mark.parametrize("name", families("fm", "si"))
def test_target_is_the_time_derivative_of_draw(name):
    path, _ = setup(name)
    x0, x1, xi = draws()
    t = torch.rand(5, dtype=torch.float64)
    _, dxt_dt = torch.func.jvp(lambda s: path.draw(x0, x1, s, xi), (t,), (torch.ones_like(t),))
    assert_close(path.target(x0, x1, t, xi), dxt_dt, f"{name}: target c against d x_t / dt (jvp)")


def test_target_diffusion_eq1_is_the_noise_that_draw_added():
    """Eq. (1): c = eps = x1, and x_t = a_t x0 + s_t eps, so (x_t - a_t x0) / s_t = c."""
    path = paths.Diffusion()
    x0, x1, xi = draws()
    t = path.sample_t(5).double()
    a, s = path.alpha_sigma(t)
    c = path.target(x0, x1, t, xi)
    assert_close(c, x1, "diffusion: target c against the noise eps = x1", atol=0)
    assert_close(c, (path.draw(x0, x1, t, xi) - a[:, None] * x0) / s[:, None], "diffusion: c against "
                 "(x_t - a_t x0) / s_t")


@pytest.mark.ex1
def test_target_bridge_eq41_is_x0():
    x0, x1, xi = draws()
    assert_close(paths.Bridge(eps_b=0.5).target(x0, x1, torch.rand(5, dtype=torch.float64), xi), x0,
                 "bridge: target c against x0 (x0-prediction, Eq. 41)", atol=0)


@pytest.mark.ex1
def test_draw_bridge_eq41_follows_the_brownian_bridge_law():
    """Eq. (41): given (x0, x1), x_t is a Brownian bridge of variance rate eps_b from x0 to x1.
    Oracle: Monte Carlo of a Brownian motion W from x0 (increments N(0, eps_b dt) on a grid of 50),
    pinned by X_t = W_t - t (W_1 - x1); draw's mean and variance match it at t = 0.2, 0.5, 0.9."""
    eps_b, n, steps = 0.3, 20000, 50
    path, g = paths.Bridge(eps_b=eps_b), torch.Generator().manual_seed(0)
    x0, x1 = torch.full((n, 1), -1.0, dtype=torch.float64), torch.full((n, 1), 2.0, dtype=torch.float64)
    dW = math.sqrt(eps_b / steps) * torch.randn(n, steps, generator=g, dtype=torch.float64)
    W = torch.cat([x0, x0 + dW.cumsum(1)], 1)  # (n, steps + 1) on the grid k / steps
    for k in [10, 25, 45]:
        t = k / steps
        bridge = W[:, k] - t * (W[:, -1] - x1[:, 0])
        xt = path.draw(x0, x1, torch.full((n,), t, dtype=torch.float64),
                       torch.randn(n, 1, generator=g, dtype=torch.float64))[:, 0]
        assert abs(float(xt.mean() - bridge.mean())) < 4 * math.sqrt(2 * float(bridge.var()) / n), (
            f"bridge: mean of x_t at t = {t}: got {float(xt.mean()):.4f}, expected {float(bridge.mean()):.4f} "
            "(Monte Carlo Brownian bridge)")
        assert float(xt.var() / bridge.var()) == pytest.approx(1.0, abs=0.06), (
            f"bridge: variance of x_t at t = {t}: got {float(xt.var()):.4f}, expected {float(bridge.var()):.4f} "
            f"(Monte Carlo Brownian bridge; eps_b t (1 - t) = {eps_b * t * (1 - t):.4f})")


def test_generate_diffusion_eq1_noise_level_is_sid_2_5():
    path = paths.Diffusion()
    a, s = path.alpha_sigma(torch.tensor(path.t_gen, dtype=torch.float64))
    assert float(s / a) == pytest.approx(2.5, rel=1e-9)


def test_sample_t_stays_in_range():
    t = paths.Diffusion(t_min=1e-3).sample_t(10000)
    assert t.min() >= 1e-3 and t.max() <= 1
    t = paths.FlowMatching().sample_t(10000)
    assert t.min() >= 0 and t.max() <= 1 and abs(float(t.mean()) - 0.5) < 0.02


def test_exact_field_fm_eq2_matches_the_1d_gaussian_closed_form():
    """The closed form for p0 = N(mu, 1) in 1-D: u_t(x) = -mu + (2t - 1)(x - (1 - t) mu) / ((1 - t)^2 + t^2)."""
    mu = -2.0
    p0 = paths.GaussianMixture([[mu]], [[[1.0]]], [1.0])
    f = paths.ExactField(paths.FlowMatching(), paths.independent(p0, paths.GaussianMixture.standard(1)))
    x, t = torch.linspace(-4, 3, 9, dtype=torch.float64)[:, None], torch.linspace(0, 1, 9, dtype=torch.float64)
    expected = -mu + (2 * t - 1) * (x[:, 0] - (1 - t) * mu) / ((1 - t) ** 2 + t ** 2)
    assert torch.allclose(f(x, t)[:, 0], expected, atol=1e-8)


def mode_weights(p0, x):
    """Share of samples whose most likely component is k."""
    k = p0.component_log_probs(x).argmax(1)
    return torch.bincount(k, minlength=len(p0.weights)).double() / len(x)


def errors(p0, x0_true, x):
    return (float((x.mean(0) - x0_true.mean(0)).norm()), float((torch.cov(x.T) - torch.cov(x0_true.T)).norm()),
            float((mode_weights(p0, x) - p0.weights).abs().max()))


@pytest.mark.parametrize("name", families(graded=("diffusion", pytest.mark.ex7)))
def test_sample_with_the_exact_field_reproduces_the_mixture(name):
    """Mean within 0.1, covariance within 0.25 (Frobenius), per-mode weights within 0.03 at 100
    steps (4000 samples), and 100 steps at least as good as 8 steps."""
    torch.manual_seed(0)
    path, joint = setup(name)
    f = paths.ExactField(path, joint)
    xx = joint.sample(4000)
    x0, x1 = xx[:, :D], xx[:, D:]
    p0 = mixture()
    coarse, fine = errors(p0, x0, path.sample(f, x1, 8)), errors(p0, x0, path.sample(f, x1, 100))
    assert fine[0] < 0.1 and fine[1] < 0.25 and fine[2] < 0.03, (
        f"{name}, 100 steps from the exact field: errors of mean {fine[0]:.3f}, covariance {fine[1]:.3f}, "
        f"mode weights {fine[2]:.3f}; expected < 0.1, 0.25, 0.03")
    assert fine[0] + fine[1] <= coarse[0] + coarse[1] + 0.02, (
        f"{name}: mean + covariance error at 100 steps {fine[0] + fine[1]:.3f}, at 8 steps "
        f"{coarse[0] + coarse[1]:.3f}; expected no worse with more steps")


class Recorder:
    """A field that records the times it is called at."""

    def __init__(self, f):
        self.f, self.times = f, []

    def __call__(self, x, t):
        self.times.append(float(t[0]))
        assert torch.all(t == t[0]), "a sampler step calls the field at one time for the whole batch"
        return self.f(x, t)


def point_mass_noise(path, mu):
    """The exact noise prediction of data x0 = mu (a point mass), by Eq. (1): eps = (x_t - a_t mu) / s_t."""
    def f(x, t):
        a, s = path.alpha_sigma(t)
        return (x - a[:, None] * mu) / s[:, None]
    return f


@pytest.mark.ex7
def test_sample_diffusion_eq1_ddim_at_8_steps_lands_on_a_point_mass_and_calls_the_field_at_the_grid_times():
    """DDIM with the exact field of a point mass mu: every x0 estimate is mu, so 8 steps end on mu exactly
    (an Euler step of the probability-flow ODE would not). The field is called once per step, at
    t = 1, 7/8, ..., 1/8 (the current time, never the next one or 0). Deterministic: two runs agree."""
    path, mu = paths.Diffusion(), torch.tensor([1.5, -0.5], dtype=torch.float64)
    x1 = torch.randn(64, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = Recorder(point_mass_noise(path, mu))
    out = path.sample(f, x1, 8)
    assert_close(out, mu.expand(64, D), "DDIM, 8 steps, exact field of a point mass: samples against the point",
                 atol=1e-6)
    expected = [1 - i / 8 for i in range(8)]
    assert f.times == pytest.approx(expected, abs=1e-6), \
        f"DDIM, 8 steps: the field was called at t = {[round(v, 4) for v in f.times]}, expected {expected}"
    assert_close(path.sample(f, x1, 8), out, "DDIM twice from the same x1 (deterministic)", atol=0)


@pytest.mark.ex7
def test_sample_diffusion_eq1_ddim_keeps_the_x0_estimate_of_a_constant_noise_prediction():
    """With a constant noise prediction e, DDIM's x0 estimate (x - s_t e) / a_t is the same at every step
    (Eq. 1: x_t = a_t x0 + s_t e), so after 8 steps (a_0 = 1, s_0 = 0) it returns (x1 - s_1 e) / a_1."""
    path = paths.Diffusion()
    x1 = torch.randn(16, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e = torch.tensor([0.7, -0.2], dtype=torch.float64)
    a1, s1 = path.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
    out = path.sample(lambda x, t: e.expand(len(x), D), x1, 8)
    assert_close(out, (x1 - s1 * e) / a1, "DDIM, 8 steps, constant noise prediction: samples against the x0 "
                 "estimate at t = 1", atol=1e-8)


@pytest.mark.parametrize("name", families("fm", "si", graded=("all", pytest.mark.ex8)))
def test_generate_one_euler_step_from_the_exact_teacher_returns_the_data_mean(name):
    """G(x1) = x1 - f*(x1, 1) = E[x0], since x_1 = x1 carries no information on x0."""
    path, joint = setup(name)
    z = joint.sample(50)[:, D:]  # z ~ p1
    out = path.generate(paths.ExactField(path, joint), z)
    assert_close(out, mixture().mean().float().expand(50, D), f"{name}: G(z) from the exact teacher against the "
                 "data mean", atol=1e-4)


class Linear(torch.nn.Module):
    """g(x, t) = x W + b t: a network whose weights the generator's gradient must reach."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor([[0.5, -0.2], [0.1, 0.3]], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([0.4, -0.6], dtype=torch.float64))

    def forward(self, x, t):
        return x @ self.W + self.b * t[:, None]


@pytest.mark.parametrize("name", families("fm", "si", graded=("all", pytest.mark.ex8)))
def test_generate_is_one_euler_step_from_t_1_and_passes_the_gradient_to_g(name):
    """G(z) = z - g(z, 1): g is called once, at t = 1, and the generator is trained through G, so
    d sum(G) / d b = -(number of samples) for g(x, t) = x W + b t and d sum(G) / d W = -z^T 1."""
    path, _ = setup(name)
    g, z = Linear(), torch.randn(6, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    recorder = Recorder(g)
    out = path.generate(recorder, z)
    assert recorder.times == [1.0], f"{name}: g was called at t = {recorder.times}, expected once at t = 1"
    assert_close(out.detach(), (z - g(z, torch.ones(6, dtype=torch.float64))).detach(),
                 f"{name}: G(z) against z - g(z, 1)")
    assert out.requires_grad, f"{name}: G(z) carries no gradient to g's weights (no_grad or detach?)"
    grad_W, grad_b = torch.autograd.grad(out.sum(), [g.W, g.b])
    assert_close(grad_b, torch.full((D,), -6.0, dtype=torch.float64), f"{name}: d sum(G) / d b")
    assert_close(grad_W, -z.T @ torch.ones(6, D, dtype=torch.float64), f"{name}: d sum(G) / d W")


def one_d(mu, v):
    return paths.GaussianMixture([[mu]], [[[v]]], [1.0])


def test_generate_diffusion_eq1_from_the_exact_teacher_is_the_posterior_mean_at_sigma_2_5():
    """SiD: x = s z at t_g, G(z) = E[x0 | x_t = x]; for p0 = N(mu, v) in 1-D that is
    mu + a v (x - a mu) / (a^2 v + s^2)."""
    mu, v = 1.5, 0.4
    path = paths.Diffusion()
    f = paths.ExactField(path, paths.independent(one_d(mu, v), paths.GaussianMixture.standard(1)))
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    a, s = (float(c) for c in path.alpha_sigma(torch.tensor(path.t_gen, dtype=torch.float64)))
    expected = mu + a * v * (s * z - a * mu) / (a * a * v + s * s)
    assert_close(path.generate(f, z), expected, "diffusion: G(z) against the posterior mean E[x0 | x_t = s z]",
                 atol=1e-8)


def test_generate_bridge_eq41_from_the_exact_teacher_is_the_posterior_mean_given_x1():
    """x = x1 + sqrt(eps t_g (1 - t_g)) z, G(z, x1) = E[x0 | x_t = x, x1]. For x0 ~ N(mu, v),
    x1 = x0 + sigma n in 1-D, condition the Gaussian (x0, x_t, x1) by hand (numpy)."""
    mu, v, sigma = 1.0, 0.5, 0.8
    path = paths.Bridge(eps_b=0.5, t_gen=0.5)
    f = paths.ExactField(path, paths.corrupted(one_d(mu, v), torch.eye(1), sigma))
    t, g2 = path.t_gen, path.eps_b * path.t_gen * (1 - path.t_gen)
    # x_t = (1 - t) x0 + t x1 + g xi = x0 + t sigma n + g xi
    cov_oo = np.array([[v + t * t * sigma ** 2 + g2, v + t * sigma ** 2], [v + t * sigma ** 2, v + sigma ** 2]])
    z = torch.tensor([[-1.0], [0.0], [2.0], [0.5]], dtype=torch.float64)
    x1 = torch.tensor([[-1.0], [0.3], [0.3], [2.5]], dtype=torch.float64)
    o = np.stack([(x1 + np.sqrt(g2) * z)[:, 0].numpy(), x1[:, 0].numpy()], 1)
    expected = mu + (o - mu) @ np.linalg.solve(cov_oo, np.array([v, v]))
    assert np.allclose(path.generate(f, z, x1)[:, 0].numpy(), expected, atol=1e-8)


def h(x, t):
    """A smooth perturbation direction of a field (acts on the first D inputs)."""
    return torch.sin(x[:, :D]) * (1 + t[:, None]) + 0.5


@pytest.mark.parametrize("name", families())
def test_exact_field_is_the_conditional_mean_of_the_target(name):
    """E[||f(x) - c||^2] (Eq. 3, written here) is smallest at f = E[c | x]: with common random numbers,
    perturbing the exact field by e = +-0.2 h raises the Monte Carlo error."""
    torch.manual_seed(1)
    path, joint = setup(name)
    f_star = paths.ExactField(path, joint)
    xx = joint.sample(20000).double()
    x0, x1 = xx[:, :D], xx[:, D:]
    t, xi = path.sample_t(len(x0)).double(), torch.randn_like(x0)
    xt, c = path.draw(x0, x1, t, xi), path.target(x0, x1, t, xi)
    x = torch.cat([xt, x1], 1) if path.observes_x1 else xt

    def error(f):
        return float((f(x, t) - c).pow(2).sum(1).mean())
    base = error(f_star)
    for e in [0.2, -0.2]:
        assert error(lambda x, s: f_star(x, s) + e * h(x, s)) > base, e


def test_gaussian_mixture_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sum"):
        paths.GaussianMixture([[0.0], [1.0]], torch.ones(2, 1, 1), [0.5, 0.6])
    with pytest.raises(ValueError, match="means"):
        paths.GaussianMixture([0.0, 1.0], torch.ones(2, 1, 1), [0.5, 0.5])


def test_gaussian_mixture_log_prob_matches_scipy():
    from scipy.stats import multivariate_normal
    p0 = mixture()
    x = torch.randn(7, D, dtype=torch.float64)
    ref = np.log(sum(float(w) * multivariate_normal(m.numpy(), S.numpy()).pdf(x.numpy())
                     for w, m, S in zip(p0.weights, p0.means, p0.covs)))
    assert np.allclose(p0.log_prob(x).numpy(), ref, atol=1e-10)


def test_exact_field_log_marginal_integrates_to_one():
    """log_marginal is a density of x_t: its integral over a wide grid is 1 (fm, t = 0.3)."""
    path, joint = setup("fm")
    g = torch.linspace(-8, 8, 401, dtype=torch.float64)
    x = torch.cartesian_prod(g, g)
    p = paths.ExactField(path, joint).log_marginal(x, torch.full((len(x),), 0.3, dtype=torch.float64)).exp()
    assert float(p.sum() * (g[1] - g[0]) ** 2) == pytest.approx(1.0, abs=1e-4)
