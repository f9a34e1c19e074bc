"""Theory checks of the RealUM / RealUID losses in 1-D, with exact Gaussian(-mixture) fields.

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

FM = paths.FlowMatching()
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


def test_realum_minimiser_on_real_data_is_the_teacher():
    """Teacher invariance, Sec. 5: with p^theta = p*, argmin_f L_R-UM = f* for beta/alpha != 1;
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


def test_eq22_optimal_fake_model_minimises_the_realum_loss():
    p_star, p_gen = real_mixture(), gauss(0.5, 0.3)
    f_opt = eq22(field(p_star), field(p_gen), ALPHA, BETA)
    x1, t, z = draws(100000, 1)
    x0_gen, x0_real = p_gen.sample(100000).double(), p_star.sample(100000).double()
    B, C = slope_and_curvature(lambda e: float(losses.realum_loss(
        FM, perturbed(f_opt, e), x0_gen, x0_real, x1, ALPHA, BETA, t, z).mean()))
    assert C > 0 and abs(B) < 0.03 * C, (B, C)


@pytest.mark.parametrize("alpha,beta", [(ALPHA, BETA), (0.9, 0.95), (1.0, 1.0)])
def test_lemma2_inner_max_matches_monte_carlo(alpha, beta):
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


@pytest.mark.parametrize("alpha,beta", [(ALPHA, BETA), (1.0, 1.0)])
def test_generator_gradient_is_the_gradient_of_lemma2(alpha, beta):
    """Danskin: with the fake model frozen at f_opt (Eq. 22), the gradient of the generator loss
    (Eq. 17) in theta = (mu, sigma) equals d/dtheta int l_t(x; theta) dx (finite differences of
    the quadrature). Checks that gradients flow through x_t and through c^theta."""
    p_star, mu, sigma = gauss(-2.0, 1.0), 0.5, 0.6
    f_star = field(p_star)
    theta = torch.tensor([mu, sigma], dtype=torch.float64, requires_grad=True)
    f_opt = eq22(f_star, field(gauss(mu, sigma ** 2)), alpha, beta)
    x1, t, z = draws(200000, 3)
    noise = torch.randn(200000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0_gen = theta[0] + theta[1] * noise  # G_theta(noise)
    per_sample = losses.realuid_loss(FM, f_star, f_opt, x0_gen, x1, alpha, beta, t, z)
    grads = torch.stack([torch.autograd.grad(per_sample[i::4].mean(), theta, retain_graph=True)[0] for i in range(4)])
    mc, se = grads.mean(0), grads.std(0) / 2

    def value(m, s):
        return lemma2_value(f_star, field(gauss(m, s ** 2)), alpha, beta, T0)
    h = 1e-4
    exact = torch.tensor([(value(mu + h, sigma) - value(mu - h, sigma)) / (2 * h),
                          (value(mu, sigma + h) - value(mu, sigma - h)) / (2 * h)], dtype=torch.float64)
    assert exact[0] > 0.5  # the generator sits right of mu* = -2: moving left lowers the value
    assert torch.all((mc - exact).abs() < 4 * se + 0.02 * exact.abs()), (mc, se, exact)


@pytest.mark.parametrize("alpha,beta,gamma,s", [(ALPHA, BETA, 0.5, BETA), (0.9, 0.95, 0.6, 1.0)])
def test_general_generator_gradient_is_the_gradient_of_the_general_value(alpha, beta, gamma, s):
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
    per_sample = losses.general_generator_loss(FM, f_star, f_fake, theta[0] + theta[1] * noise, x1,
                                               alpha, beta, gamma, s, t, z)
    grads = torch.stack([torch.autograd.grad(per_sample[i::4].mean(), theta, retain_graph=True)[0] for i in range(4)])
    mc, se = grads.mean(0), grads.std(0) / 2

    def value(m, sd):
        return general_value(f_star, field(gauss(m, sd ** 2)), alpha, beta, gamma, T0)
    h = 1e-4
    exact = torch.tensor([(value(mu + h, sigma) - value(mu - h, sigma)) / (2 * h),
                          (value(mu, sigma + h) - value(mu, sigma - h)) / (2 * h)], dtype=torch.float64)
    assert torch.all((mc - exact).abs() < 4 * se + 0.02 * exact.abs()), (mc, se, exact)


def test_alpha_beta_one_is_the_data_free_uid_loss():
    """alpha = beta = 1: the fake loss is L_UM(f, p^theta) (Eq. 13, no real data needed) and the
    generator loss is L_UM(f*, p^theta) - L_UM(f, p^theta) (Eq. 12)."""
    p_star, p_gen = real_mixture(), gauss(0.5, 0.3)
    f_star, f_fake = field(p_star), perturbed(field(p_gen), 0.3)
    x0_gen = p_gen.sample(1000).double()
    x1, _, z = draws(1000, 5)
    t = torch.rand(1000, dtype=torch.float64)
    fake = losses.realum_loss(FM, f_fake, x0_gen, None, x1, 1.0, 1.0, t, z)
    assert torch.allclose(fake, losses.um_loss(FM, f_fake, x0_gen, x1, t, z))
    gen = losses.realuid_loss(FM, f_star, f_fake, x0_gen, x1, 1.0, 1.0, t, z)
    uid = losses.um_loss(FM, f_star, x0_gen, x1, t, z) - losses.um_loss(FM, f_fake, x0_gen, x1, t, z)
    assert torch.allclose(gen, uid)


def mlps(seed=0):
    torch.manual_seed(seed)
    return [nets.MLP(1, 1, hidden=32, depth=2).double() for _ in range(3)]  # teacher, fake, generator


def grads(module, loss):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)])


def test_general_loss_with_gamma_equal_alpha_matches_realuid():
    """App. A.2: gamma = alpha with delta = f* - f gives exactly the gradients of Eqs. (16)-(17);
    gamma != alpha changes the fake model's gradient (gamma is really used)."""
    f_star, f_fake, gen = mlps()
    x0_real = real_mixture().sample(256).double()
    x1, _, z = draws(256, 6)
    t = torch.rand(256, dtype=torch.float64)
    x0_gen = gen(torch.randn(256, 1, dtype=torch.float64), torch.ones(256, dtype=torch.float64))
    fake_ref = grads(f_fake, losses.realum_loss(FM, f_fake, x0_gen, x0_real, x1, ALPHA, BETA, t, z).mean())
    fake_gen = grads(f_fake, losses.general_fake_loss(FM, f_star, f_fake, x0_gen, x0_real, x1, ALPHA, BETA, ALPHA,
                                                     1.0, t, z).mean())
    assert torch.allclose(fake_ref, fake_gen, rtol=1e-8, atol=1e-10)
    with losses.frozen(f_star, f_fake):
        g_ref = grads(gen, losses.realuid_loss(FM, f_star, f_fake, x0_gen, x1, ALPHA, BETA, t, z).mean())
        g_gen = grads(gen, losses.general_generator_loss(FM, f_star, f_fake, x0_gen, x1, ALPHA, BETA, ALPHA,
                                                         1.0, t, z).mean())
    assert torch.allclose(g_ref, g_gen, rtol=1e-8, atol=1e-10)
    other = grads(f_fake, losses.general_fake_loss(FM, f_star, f_fake, x0_gen, x0_real, x1, ALPHA, BETA, 0.5,
                                                  1.0, t, z).mean())
    assert (other - fake_ref).norm() > 1e-4 * fake_ref.norm()  # far above the 1e-8 agreement above


def test_general_loss_optimum_for_gamma_and_delta_scale():
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


def test_generator_step_changes_only_the_generator():
    f_star, f_fake, gen = mlps(1)
    before = [[p.detach().clone() for p in m.parameters()] for m in (f_star, f_fake, gen)]
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2, betas=(0.0, 0.999))
    x1 = torch.randn(64, 1, dtype=torch.float64)
    with losses.frozen(f_star, f_fake):
        x0_gen = FM.generate(gen, torch.randn(64, 1, dtype=torch.float64))
        losses.realuid_loss(FM, f_star, f_fake, x0_gen, x1, ALPHA, BETA).mean().backward()
    assert all(p.grad is None for m in (f_star, f_fake) for p in m.parameters())
    assert all(p.requires_grad for m in (f_star, f_fake) for p in m.parameters())  # restored
    opt.step()
    after = [list(m.parameters()) for m in (f_star, f_fake, gen)]
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
    assert any(not torch.equal(a, b) for a, b in zip(before[2], after[2]))


@pytest.mark.parametrize("general", [False, True])
def test_fake_step_does_not_reach_the_generator_or_the_teacher(general):
    f_star, f_fake, gen = mlps(2)
    x0_gen = FM.generate(gen, torch.randn(64, 1, dtype=torch.float64))
    x0_real = real_mixture().sample(64).double()
    x1 = torch.randn(64, 1, dtype=torch.float64)
    if general:
        loss = losses.general_fake_loss(FM, f_star, f_fake, x0_gen, x0_real, x1, ALPHA, BETA, 0.5, BETA)
    else:
        loss = losses.realum_loss(FM, f_fake, x0_gen, x0_real, x1, ALPHA, BETA)
    loss.mean().backward()
    assert all(p.grad is None for p in list(gen.parameters()) + list(f_star.parameters()))
    assert all(p.grad is not None for p in f_fake.parameters())


@pytest.mark.parametrize("alpha,beta,gamma,match", [
    (0.0, 0.5, 0.5, "alpha must be in \\(0, 1\\]"), (1.2, 0.5, 0.5, "alpha must be in"),
    (0.9, 0.0, 0.5, "beta must be in \\(0, 1\\]"), (0.9, 1.5, 0.5, "beta must be in"),
    (1.0, 0.9, 0.5, "alpha = 1 requires beta = 1"), (0.9, 0.9, 0.0, "gamma must be in \\(0, 1\\]"),
    (0.9, 0.9, 1.1, "gamma must be in")])
def test_bad_alpha_beta_gamma_raise_with_the_papers_constraint(alpha, beta, gamma, match):
    x = torch.randn(4, 1)
    f = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match=match):
        losses.general_fake_loss(FM, f, f, x, x, x, alpha, beta, gamma)
    if "gamma" not in match:
        with pytest.raises(ValueError, match=match):
            losses.realum_loss(FM, f, x, x, x, alpha, beta)
        with pytest.raises(ValueError, match=match):
            losses.realuid_loss(FM, f, f, x, x, alpha, beta)


def test_losses_are_per_sample_sums_over_data_dimensions():
    """Shape (B,) for image-shaped data, and a sum (not a mean) over the data dimensions."""
    x0, x1 = torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4)
    t = torch.full((3,), 0.5)
    loss = losses.um_loss(FM, lambda x, t: torch.zeros_like(x), x0, x1, t, torch.zeros_like(x0))
    assert loss.shape == (3,)
    assert np.allclose(loss.numpy(), 32.0)  # c = x1 - x0 = 1 in each of 2 * 4 * 4 dimensions
