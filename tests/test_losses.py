"""Graders of losses.py, one group per function, named `test_<function>_<equation>_<property>`
(`pytest -k realuid_loss` selects Eq. (17)'s graders; `-k test_um_loss` Eq. (3)'s; `-k cut` the
gradient cuts). References are oracles: the path written by hand in the test, quadrature of
Eq. (22), Lemma 2 (Eq. 18) and App. A.2's optimum with exact Gaussian(-mixture) fields, finite
differences, plain PyTorch autograd. No test uses one loss of losses.py as another's reference.

Throughout: flow matching, p* the real data, p^theta a Gaussian generator, a fixed time t0 where
a closed form is pointwise in x (Eq. 22, Lemma 2), common random numbers for Monte Carlo.
"""
import math

import numpy as np
import pytest
import torch

import losses
import nets
import paths



def fm_by_hand(x0, x1, t):
    """Eq. (2) written out in the test: x_t = (1 - t) x0 + t x1, c = x1 - x0."""
    t = t.reshape(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + t * x1, x1 - x0


class HandFlowMatching:
    """The path interface of paths.py with flow matching (Eq. 2) written in the test, so that the
    loss graders do not lean on paths.py's families (graded in tests/test_paths.py)."""
    observes_x1 = False

    def sample_t(self, n, device=None):
        return torch.rand(n, device=device)

    def draw(self, x0, x1, t, z):
        return fm_by_hand(x0, x1, t)[0]

    def target(self, x0, x1, t, z):
        return fm_by_hand(x0, x1, t)[1]

    def field(self, f, xt, t, x1):
        return f(xt, t)


class HandBridge(HandFlowMatching):
    """The bridge (Eq. 41, eps_b = 0.5) by hand: x_t = (1 - t) x0 + t x1 + sqrt(eps_b t (1 - t)) z, c = x0,
    and the model's input is (x_t, x1)."""
    observes_x1 = True

    def draw(self, x0, x1, t, z):
        return fm_by_hand(x0, x1, t)[0] + torch.sqrt(0.5 * t * (1 - t))[:, None] * z

    def target(self, x0, x1, t, z):
        return x0

    def field(self, f, xt, t, x1):
        return f(torch.cat([xt, x1], 1), t)


FM = HandFlowMatching()
T0 = 1.0 / 3.0  # the paper's 1-D illustration time (Fig. 4)
ALPHA, BETA = 0.8, 0.7  # beta / alpha != 1: real data changes the optimum


def gauss(mu, var):
    return paths.GaussianMixture([[mu]], [[[var]]], [1.0])


def real_mixture():
    return paths.GaussianMixture([[-2.0], [1.5]], [[[0.25]], [[0.25]]], [0.7, 0.3])


def field(p0):
    """Exact flow-matching field of data p0 (x1 ~ N(0, 1))."""
    return paths.ExactField(FM, paths.independent(p0, paths.GaussianMixture.standard(1)))


def density(f, x, t):
    """p_t(x), (B, 1) to broadcast against fields."""
    return f.log_marginal(x, t).exp()[:, None]


def eq22(f_star, f_gen, alpha, beta):
    """Eq. (22): f_opt = [beta p^theta f^theta + (1 - beta) p* f*] / [alpha p^theta + (1 - alpha) p*]."""
    def f_opt(x, t):
        p_s, p_g = density(f_star, x, t), density(f_gen, x, t)
        return (beta * p_g * f_gen(x, t) + (1 - beta) * p_s * f_star(x, t)) / (alpha * p_g + (1 - alpha) * p_s)
    return f_opt


def lemma2_value(f_star, f_gen, alpha, beta, t0):
    """Lemma 2, Eq. (18): int l_t(x) dx by the trapezoid rule on a fine grid."""
    x = torch.linspace(-12, 12, 24001, dtype=torch.float64)[:, None]
    t = torch.full((len(x),), t0, dtype=torch.float64)
    p_s, p_g, fs, fg = density(f_star, x, t), density(f_gen, x, t), f_star(x, t), f_gen(x, t)
    num = ((p_s * (beta / alpha - 1) + p_g) * fs - beta / alpha * p_g * fg).pow(2).sum(1)
    l_t = alpha ** 2 * num / ((1 - alpha) * p_s + alpha * p_g)[:, 0]
    return float(torch.trapezoid(l_t, x[:, 0]))


def general_delta_opt(f_star, f_gen, alpha, beta, gamma):
    """App. A.2 pointwise optimum: delta_opt = b / A with b = p^th (alpha f* - beta f^th) + (beta - alpha) p* f*,
    A = gamma p^th + (1 - gamma) p*; the maximised objective is int ||b||^2 / A dx."""
    def delta(x, t):
        p_s, p_g, fs = density(f_star, x, t), density(f_gen, x, t), f_star(x, t)
        return (p_g * (alpha * fs - beta * f_gen(x, t)) + (beta - alpha) * p_s * fs) / (gamma * p_g + (1 - gamma) * p_s)
    return delta


def general_value(f_star, f_gen, alpha, beta, gamma, t0):
    """int A ||delta_opt||^2 dx = int ||b||^2 / A dx at time t0, by the trapezoid rule."""
    x = torch.linspace(-12, 12, 24001, dtype=torch.float64)[:, None]
    t = torch.full((len(x),), t0, dtype=torch.float64)
    A = gamma * density(f_gen, x, t) + (1 - gamma) * density(f_star, x, t)
    d = general_delta_opt(f_star, f_gen, alpha, beta, gamma)(x, t)
    return float(torch.trapezoid((A * d ** 2).sum(1), x[:, 0]))


def draws(n, seed, t0=T0):
    g = torch.Generator().manual_seed(seed)
    x1, z = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x1, torch.full((n,), t0, dtype=torch.float64), z


def slope_and_curvature(loss_of):
    """For a loss quadratic in e along f + e h: L(e) = L0 + 2 e B + e^2 C; returns (B, C)."""
    e = 0.1
    lp, lm, l0 = loss_of(e), loss_of(-e), loss_of(0.0)
    return (lp - lm) / (4 * e), (lp + lm - 2 * l0) / (2 * e * e)


def perturbed(f, e):
    return lambda x, t: f(x, t) + e * (torch.sin(x) + 0.5)



def mlps(seed=0):
    torch.manual_seed(seed)
    return [nets.MLP(1, 1, hidden=32, depth=2).double() for _ in range(3)]  # teacher, fake, generator


def sq(v):
    return v.flatten(1).pow(2).sum(1)


def smooth(x, t):
    """A model f(x, t) that is no one's optimum."""
    return torch.sin(2 * x) * (1 + t.reshape(-1, *[1] * (x.dim() - 1))) - 0.3 * x


# ---------------------------------------------------------------------------------- um_loss, Eq. (3)

@pytest.mark.ex2
@pytest.mark.parametrize("shape", [(6, 1), (3, 2, 4, 4)])
def test_um_loss_eq3_is_the_squared_error_to_the_target_summed_over_dimensions(shape):
    """Eq. (3) per sample, (B,): ||f(x_t) - c||^2 summed (not averaged) over the data dimensions."""
    g = torch.Generator().manual_seed(0)
    x0, x1, z = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(shape[0], generator=g, dtype=torch.float64)
    xt, c = fm_by_hand(x0, x1, t)
    loss = losses.um_loss(FM, smooth, x0, x1, t, z)
    assert loss.shape == (shape[0],)
    assert torch.allclose(loss, sq(smooth(xt, t) - c), rtol=1e-12)


@pytest.mark.ex2
def test_um_loss_eq3_bridge_model_sees_x_t_and_x1():
    """With the bridge's path, the model is called through path.field on (x_t, x1)."""
    g = torch.Generator().manual_seed(1)
    x0, x1, z = (torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(6, generator=g, dtype=torch.float64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1 + torch.sqrt(0.5 * t * (1 - t))[:, None] * z
    f = lambda x, s: smooth(x[:, :2], s) + x[:, 2:]  # noqa: E731
    loss = losses.um_loss(HandBridge(), f, x0, x1, t, z)
    assert torch.allclose(loss, sq(smooth(xt, t) + x1 - x0), rtol=1e-12)


@pytest.mark.ex2
def test_um_loss_eq3_is_minimised_by_the_exact_field():
    """Eq. (3): the minimiser is E[c | x_t], the exact mixture field; with common random numbers,
    perturbing it by +-0.2 h raises the Monte Carlo loss."""
    torch.manual_seed(1)
    p0 = real_mixture()
    f_star = field(p0)
    x0, x1 = p0.sample(20000).double(), torch.randn(20000, 1, dtype=torch.float64)
    t, z = torch.rand(20000, dtype=torch.float64), torch.randn(20000, 1, dtype=torch.float64)
    base = losses.um_loss(FM, f_star, x0, x1, t, z).mean()
    for e in [0.2, -0.2]:
        assert losses.um_loss(FM, perturbed(f_star, e), x0, x1, t, z).mean() > base


# ---------------------------------------------------------------------------- realum_loss, Eq. (16)

@pytest.mark.ex3
def test_realum_loss_eq16_minimiser_on_real_data_is_the_teacher():
    """Teacher invariance of Eq. (16): with p^theta = p*, argmin_f L_R-UM = f* for beta/alpha != 1;
    with a different p^theta, f* is no longer the minimiser."""
    p_star = real_mixture()
    f_star = field(p_star)
    x1, t, z = draws(100000, 0)
    x0_real = p_star.sample(100000).double()
    for x0_gen, at_teacher in [(p_star.sample(100000).double(), True), (gauss(0.5, 0.3).sample(100000).double(), False)]:
        B, C = slope_and_curvature(lambda e: float(losses.realum_loss(
            FM, perturbed(f_star, e), x0_gen, x0_real, x1, ALPHA, BETA, t, z).mean()))
        assert C > 0
        assert (abs(B) < 0.03 * C) == at_teacher, (B, C)


@pytest.mark.ex3
def test_realum_loss_eq16_minimiser_is_the_eq22_optimal_fake_model():
    p_star, p_gen = real_mixture(), gauss(0.5, 0.3)
    f_opt = eq22(field(p_star), field(p_gen), ALPHA, BETA)
    x1, t, z = draws(100000, 1)
    x0_gen, x0_real = p_gen.sample(100000).double(), p_star.sample(100000).double()
    B, C = slope_and_curvature(lambda e: float(losses.realum_loss(
        FM, perturbed(f_opt, e), x0_gen, x0_real, x1, ALPHA, BETA, t, z).mean()))
    assert C > 0 and abs(B) < 0.03 * C, (B, C)


@pytest.mark.ex3
@pytest.mark.parametrize("alpha,beta", [(ALPHA, BETA), (0.9, 0.95), (1.0, 1.0)])
def test_realum_loss_eq16_inner_max_is_lemma2_eq18(alpha, beta):
    """max_f L_R-UID = L_R-UM(f*) - L_R-UM(f_opt) (Monte Carlo) equals int l_t(x) dx (quadrature)."""
    p_star, p_gen = real_mixture(), gauss(0.5, 0.3)
    f_star, f_gen = field(p_star), field(p_gen)
    f_opt = eq22(f_star, f_gen, alpha, beta)
    x1, t, z = draws(200000, 2)
    x0_gen, x0_real = p_gen.sample(200000).double(), p_star.sample(200000).double()
    gap = (losses.realum_loss(FM, f_star, x0_gen, x0_real, x1, alpha, beta, t, z)
           - losses.realum_loss(FM, f_opt, x0_gen, x0_real, x1, alpha, beta, t, z))
    mc, se = float(gap.mean()), float(gap.std() / math.sqrt(len(gap)))
    exact = lemma2_value(f_star, f_gen, alpha, beta, T0)
    assert abs(mc - exact) < 4 * se + 1e-3, (mc, se, exact)


@pytest.mark.ex3
def test_realum_loss_eq16_is_both_terms_by_hand_and_eq13_at_alpha_beta_one():
    """Eq. (16) per sample: alpha ||f(x_t^th) - (beta/alpha) c^th||^2 + (1 - alpha) ||f(x_t*) -
    ((1 - beta)/(1 - alpha)) c*||^2, both terms at the same t, x1; at alpha = beta = 1 it is the
    data-free Eq. (13), ||f(x_t^th) - c^th||^2, and needs no real data."""
    g = torch.Generator().manual_seed(5)
    x0_gen, x0_real, x1 = (torch.randn(50, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(50, generator=g, dtype=torch.float64)
    (xt, c), (xt_r, c_r) = fm_by_hand(x0_gen, x1, t), fm_by_hand(x0_real, x1, t)
    expected = ALPHA * sq(smooth(xt, t) - BETA / ALPHA * c) + (1 - ALPHA) * sq(
        smooth(xt_r, t) - (1 - BETA) / (1 - ALPHA) * c_r)
    assert torch.allclose(losses.realum_loss(FM, smooth, x0_gen, x0_real, x1, ALPHA, BETA, t), expected, rtol=1e-12)
    data_free = losses.realum_loss(FM, smooth, x0_gen, None, x1, 1.0, 1.0, t)
    assert torch.allclose(data_free, sq(smooth(xt, t) - c), rtol=1e-12)


@pytest.mark.ex5
def test_realum_loss_eq16_cut_no_gradient_reaches_the_generator():
    """Fake step: the generated sample is plain data (detached); only f gets gradients."""
    f_star, f_fake, gen = mlps(2)
    x0_gen = gen(torch.randn(64, 1, dtype=torch.float64), torch.ones(64, dtype=torch.float64))
    loss = losses.realum_loss(FM, f_fake, x0_gen, real_mixture().sample(64).double(),
                              torch.randn(64, 1, dtype=torch.float64), ALPHA, BETA)
    loss.mean().backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None for p in f_fake.parameters())


def test_realum_loss_eq16_validates_its_arguments():
    x, f = torch.randn(4, 1), lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="alpha = 1 requires beta = 1"):
        losses.realum_loss(FM, f, x, x, x, 1.0, 0.9)
    with pytest.raises(ValueError, match="x0_real is required"):
        losses.realum_loss(FM, f, x, None, x, ALPHA, BETA)


# --------------------------------------------------------------------------- realuid_loss, Eq. (17)

@pytest.mark.ex4
@pytest.mark.parametrize("alpha,beta", [(ALPHA, BETA), (1.0, 1.0)])
def test_realuid_loss_eq17_gradient_is_the_gradient_of_lemma2_eq18(alpha, beta):
    """Danskin: with the fake model frozen at f_opt (Eq. 22), the gradient of the generator loss
    (Eq. 17) in theta = (mu, sigma) equals d/dtheta int l_t(x; theta) dx (finite differences of
    the quadrature). Checks that gradients flow through x_t and through c^theta."""
    p_star, mu, sigma = gauss(-2.0, 1.0), 0.5, 0.6
    f_star = field(p_star)
    theta = torch.tensor([mu, sigma], dtype=torch.float64, requires_grad=True)
    f_opt = eq22(f_star, field(gauss(mu, sigma ** 2)), alpha, beta)
    x1, t, z = draws(200000, 3)
    noise = torch.randn(200000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = torch.stack([torch.autograd.grad(losses.realuid_loss(  # four independent batches of G_theta(noise)
        FM, f_star, f_opt, theta[0] + theta[1] * noise[i::4], x1[i::4], alpha, beta, t[i::4], z[i::4]).mean(),
        theta)[0] for i in range(4)])
    mc, se = grads.mean(0), grads.std(0) / 2

    def value(m, s):
        return lemma2_value(f_star, field(gauss(m, s ** 2)), alpha, beta, T0)
    h = 1e-4
    exact = torch.tensor([(value(mu + h, sigma) - value(mu - h, sigma)) / (2 * h),
                          (value(mu, sigma + h) - value(mu, sigma - h)) / (2 * h)], dtype=torch.float64)
    assert exact[0] > 0.5  # the generator sits right of mu* = -2: moving left lowers the value
    assert torch.all((mc - exact).abs() < 4 * se + 0.02 * exact.abs()), (mc, se, exact)


@pytest.mark.ex4
def test_realuid_loss_eq17_is_the_generated_terms_by_hand_and_eq12_at_alpha_beta_one():
    """Eq. (17), generator step, per sample: alpha ||f*(x_t) - (beta/alpha) c||^2 - alpha ||f(x_t) -
    (beta/alpha) c||^2 at generated x0; at alpha = beta = 1 the data-free Eq. (12)."""
    g = torch.Generator().manual_seed(6)
    x0_gen, x1 = (torch.randn(50, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(50, generator=g, dtype=torch.float64)
    xt, c = fm_by_hand(x0_gen, x1, t)
    f_fake = lambda x, s: smooth(x, s) + 0.5 * x  # noqa: E731
    for a, b in [(ALPHA, BETA), (1.0, 1.0)]:
        expected = a * (sq(smooth(xt, t) - b / a * c) - sq(f_fake(xt, t) - b / a * c))
        assert torch.allclose(losses.realuid_loss(FM, smooth, f_fake, x0_gen, x1, a, b, t), expected, rtol=1e-12)


@pytest.mark.ex5
@pytest.mark.parametrize("name", ["realuid_loss", "general_generator_loss"])
def test_generator_step_cut_only_the_generator_gets_gradients(name):
    """Generator step: f* and f are fixed (no gradient, flags untouched), also when passed wrapped in
    a lambda; theta's gradient is the one plain autograd gives with f*, f switched off by hand."""
    f_star, f_fake, gen = mlps(1)
    x1, u = torch.randn(64, 1, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    t, z = torch.rand(64, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    extra = (ALPHA, 1.0) if name == "general_generator_loss" else ()

    def loss(fs, ff):
        x0_gen = gen(u, torch.ones(64, dtype=torch.float64))
        return getattr(losses, name)(FM, fs, ff, x0_gen, x1, ALPHA, BETA, *extra, t=t, z=z).mean()
    for fs, ff in [(f_star, f_fake), (lambda x, s: f_star(x, s), lambda x, s: f_fake(x, s))]:
        g_theta = torch.autograd.grad(loss(fs, ff), list(gen.parameters()) + list(f_star.parameters())
                                      + list(f_fake.parameters()), allow_unused=True)
        n = len(list(gen.parameters()))
        assert all(g is not None for g in g_theta[:n]) and all(g is None for g in g_theta[n:])
        assert all(p.requires_grad for m in (f_star, f_fake) for p in m.parameters())
    for p in list(f_star.parameters()) + list(f_fake.parameters()):
        p.requires_grad_(False)  # the reference: plain autograd with f*, f off
    reference = torch.autograd.grad(loss(f_star, f_fake), list(gen.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(g_theta[:n], reference))


def test_realuid_loss_eq17_validates_its_arguments():
    x, f = torch.randn(4, 1), lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="alpha = 1 requires beta = 1"):
        losses.realuid_loss(FM, f, f, x, x, 1.0, 0.9)


# ------------------------------------------------ general_fake_loss, general_generator_loss: App. A.2

@pytest.mark.ex6
def test_general_fake_loss_def3_optimum_for_gamma_and_delta_scale():
    """App. A.2 pointwise optimum: delta_opt = [p^th (alpha f* - beta f^th) + (beta - alpha) p* f*] /
    [gamma p^th + (1 - gamma) p*], f_opt = f* - delta_opt / s for delta = s (f* - f). Eq. (22), the
    gamma = alpha optimum, is not optimal when gamma != alpha."""
    gamma, s = 0.5, BETA
    p_star, p_gen = real_mixture(), gauss(0.5, 0.3)
    f_star, f_gen = field(p_star), field(p_gen)
    delta_opt = general_delta_opt(f_star, f_gen, ALPHA, BETA, gamma)

    def f_opt(x, t):
        return f_star(x, t) - delta_opt(x, t) / s
    x1, t, z = draws(100000, 7)
    x0_gen, x0_real = p_gen.sample(100000).double(), p_star.sample(100000).double()
    for f, optimal in [(f_opt, True), (eq22(f_star, f_gen, ALPHA, BETA), False)]:
        B, C = slope_and_curvature(lambda e: float(losses.general_fake_loss(
            FM, f_star, perturbed(f, e), x0_gen, x0_real, x1, ALPHA, BETA, gamma, s, t, z).mean()))
        assert C > 0 and (abs(B) < 0.03 * C) == optimal, (B, C)


@pytest.mark.ex6
def test_general_fake_loss_def3_with_gamma_alpha_is_eq16_up_to_a_constant():
    """App. A.2: with gamma = alpha and delta = f* - f, minus Def. 3's objective is, per sample,
    Eq. (16) at f minus Eq. (16) at f* (a constant in f: the same gradients as RealUM), both written
    by hand here; gamma != alpha gives other values (gamma is really used)."""
    g = torch.Generator().manual_seed(8)
    x0_gen, x0_real, x1 = (torch.randn(50, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(50, generator=g, dtype=torch.float64)
    (xt, c), (xt_r, c_r) = fm_by_hand(x0_gen, x1, t), fm_by_hand(x0_real, x1, t)
    f_fake = lambda x, s: smooth(x, s) + 0.5 * x  # noqa: E731

    def eq16(f):
        return ALPHA * sq(f(xt, t) - BETA / ALPHA * c) + (1 - ALPHA) * sq(f(xt_r, t) - (1 - BETA) / (1 - ALPHA) * c_r)
    loss = losses.general_fake_loss(FM, smooth, f_fake, x0_gen, x0_real, x1, ALPHA, BETA, ALPHA, 1.0, t)
    assert torch.allclose(loss, eq16(f_fake) - eq16(smooth), rtol=1e-10, atol=1e-12)
    other = losses.general_fake_loss(FM, smooth, f_fake, x0_gen, x0_real, x1, ALPHA, BETA, 0.5, 1.0, t)
    assert (other - loss).abs().max() > 1e-3


@pytest.mark.ex5
def test_general_fake_loss_def3_cut_no_gradient_reaches_the_generator_or_the_teacher():
    f_star, f_fake, gen = mlps(2)
    x0_gen = gen(torch.randn(64, 1, dtype=torch.float64), torch.ones(64, dtype=torch.float64))
    loss = losses.general_fake_loss(FM, f_star, f_fake, x0_gen, real_mixture().sample(64).double(),
                                    torch.randn(64, 1, dtype=torch.float64), ALPHA, BETA, 0.5, BETA)
    loss.mean().backward()
    assert all(p.grad is None for p in list(gen.parameters()) + list(f_star.parameters()))
    assert all(p.grad is not None for p in f_fake.parameters())


def test_general_fake_loss_def3_validates_its_arguments():
    x, f = torch.randn(4, 1), lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="gamma must be in"):
        losses.general_fake_loss(FM, f, f, x, x, x, ALPHA, BETA, 1.5)
    with pytest.raises(ValueError, match="alpha = 1 requires beta = 1"):
        losses.general_fake_loss(FM, f, f, x, x, x, 1.0, 0.9, 0.5)


@pytest.mark.ex6
@pytest.mark.parametrize("alpha,beta,gamma,s", [(ALPHA, BETA, 0.5, BETA), (0.9, 0.95, 0.6, 1.0)])
def test_general_generator_loss_def3_gradient_is_the_gradient_of_the_general_value(alpha, beta, gamma, s):
    """App. A.2 with gamma != alpha and delta = s (f* - f): with f frozen at its optimum
    f* - delta_opt / s, the generator loss's gradient in theta = (mu, sigma) equals the derivative of
    the maximised objective int ||b||^2 / A dx (finite differences of the quadrature)."""
    p_star, mu, sigma = gauss(-2.0, 1.0), 0.5, 0.6
    f_star = field(p_star)
    theta = torch.tensor([mu, sigma], dtype=torch.float64, requires_grad=True)
    delta_opt = general_delta_opt(f_star, field(gauss(mu, sigma ** 2)), alpha, beta, gamma)
    f_fake = lambda x, t: f_star(x, t) - delta_opt(x, t) / s  # noqa: E731
    x1, t, z = draws(200000, 8)
    noise = torch.randn(200000, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.stack([torch.autograd.grad(losses.general_generator_loss(  # four independent batches
        FM, f_star, f_fake, theta[0] + theta[1] * noise[i::4], x1[i::4], alpha, beta, gamma, s, t[i::4],
        z[i::4]).mean(), theta)[0] for i in range(4)])
    mc, se = grads.mean(0), grads.std(0) / 2

    def value(m, sd):
        return general_value(f_star, field(gauss(m, sd ** 2)), alpha, beta, gamma, T0)
    h = 1e-4
    exact = torch.tensor([(value(mu + h, sigma) - value(mu - h, sigma)) / (2 * h),
                          (value(mu, sigma + h) - value(mu, sigma - h)) / (2 * h)], dtype=torch.float64)
    assert torch.all((mc - exact).abs() < 4 * se + 0.02 * exact.abs()), (mc, se, exact)


@pytest.mark.ex6
def test_general_generator_loss_def3_is_the_generated_bracket_and_eq17_at_gamma_alpha():
    """App. A.2 generated bracket by hand, delta = s (f* - f): -gamma ||delta||^2 + 2 alpha <delta, f*>
    - 2 beta <delta, c>; with gamma = alpha and s = 1 it is Eq. (17)'s generator loss, per sample."""
    g = torch.Generator().manual_seed(10)
    x0_gen, x1 = (torch.randn(50, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(50, generator=g, dtype=torch.float64)
    xt, c = fm_by_hand(x0_gen, x1, t)
    f_fake = lambda x, s: smooth(x, s) + 0.5 * x  # noqa: E731
    fs, ff = smooth(xt, t), f_fake(xt, t)
    gamma, s = 0.5, BETA
    delta = s * (fs - ff)
    expected = -gamma * sq(delta) + 2 * ALPHA * (delta * fs).sum(1) - 2 * BETA * (delta * c).sum(1)
    loss = losses.general_generator_loss(FM, smooth, f_fake, x0_gen, x1, ALPHA, BETA, gamma, s, t)
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-12)
    eq17 = ALPHA * (sq(fs - BETA / ALPHA * c) - sq(ff - BETA / ALPHA * c))
    at_alpha = losses.general_generator_loss(FM, smooth, f_fake, x0_gen, x1, ALPHA, BETA, ALPHA, 1.0, t)
    assert torch.allclose(at_alpha, eq17, rtol=1e-10, atol=1e-12)


def test_general_generator_loss_def3_validates_its_arguments():
    x, f = torch.randn(4, 1), lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="gamma must be in"):
        losses.general_generator_loss(FM, f, f, x, x, ALPHA, BETA, 0.0)


# ------------------------------------------------------- argument checks, gradient-cut helpers

@pytest.mark.parametrize("alpha,beta,match", [
    (0.0, 0.5, "alpha must be in \\(0, 1\\]"), (1.2, 0.5, "alpha must be in"),
    (0.9, 0.0, "beta must be in \\(0, 1\\]"), (0.9, 1.5, "beta must be in"),
    (1.0, 0.9, "alpha = 1 requires beta = 1")])
def test_check_alpha_beta_eq16_rejects_values_outside_the_constraint(alpha, beta, match):
    with pytest.raises(ValueError, match=match):
        losses.check_alpha_beta(alpha, beta)


def test_check_alpha_beta_eq16_accepts_the_allowed_values():
    for alpha, beta in [(1.0, 1.0), (0.92, 0.94), (0.5, 1.0), (1e-3, 1e-3)]:
        losses.check_alpha_beta(alpha, beta)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.1])
def test_check_gamma_def3_rejects_values_outside_0_1(gamma):
    with pytest.raises(ValueError, match="gamma must be in \\(0, 1\\]"):
        losses.check_gamma(gamma)
    losses.check_gamma(0.5)
    losses.check_gamma(1.0)


def test_fixed_cut_keeps_the_input_gradient_and_gives_the_weights_none():
    """fixed(f): the same values; backward fills x.grad as plain autograd with f's weights off, and
    leaves the weights' .grad empty."""
    net = mlps(3)[0]
    x, t = torch.randn(8, 1, dtype=torch.float64, requires_grad=True), torch.rand(8, dtype=torch.float64)
    out = losses.fixed(net)(x, t)
    out.pow(3).sum().backward()
    assert all(p.grad is None for p in net.parameters())
    net.requires_grad_(False)  # the reference
    ref = net(x, t)
    assert torch.equal(out.detach(), ref.detach())
    assert torch.allclose(x.grad, torch.autograd.grad(ref.pow(3).sum(), x)[0], rtol=1e-12)


def test_realuid_loss_eq17_same_gradient_inside_a_callers_frozen():
    """Callers may still wrap the generator step in `frozen` (nested too): the same gradient for theta."""
    f_star, f_fake, gen = mlps(4)
    x1, u = torch.randn(32, 1, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    t, z = torch.rand(32, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)

    def grad_theta():
        x0_gen = gen(u, torch.ones(32, dtype=torch.float64))
        loss = losses.realuid_loss(FM, f_star, f_fake, x0_gen, x1, ALPHA, BETA, t, z).mean()
        return torch.autograd.grad(loss, list(gen.parameters()))
    plain = grad_theta()
    with losses.frozen(f_fake, f_star), losses.frozen(f_fake):
        nested = grad_theta()
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(plain, nested))


def test_frozen_switches_weights_off_and_restores_each_flag_when_nested():
    f_star, f_fake, _ = mlps(4)
    f_star.requires_grad_(False)
    with losses.frozen(f_fake, f_star, lambda x, t: x):  # non-modules are ignored
        with losses.frozen(f_fake):
            assert not any(p.requires_grad for m in (f_star, f_fake) for p in m.parameters())
        assert not any(p.requires_grad for p in f_fake.parameters())
    assert all(p.requires_grad for p in f_fake.parameters())
    assert not any(p.requires_grad for p in f_star.parameters())  # it was off before
