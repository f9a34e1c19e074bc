"""Graders of losses.py, one group per function, named `test_<function>_<equation>_<property>`
(`pytest -k realuid_loss` selects Eq. (17)'s graders; `-k test_um_loss` Eq. (3)'s; `-k cut` the
gradient cuts). References are oracles: the path written by hand in the test, quadrature of
Eq. (22), Lemma 2 (Eq. 18) and App. A.2's optimum with exact Gaussian(-mixture) fields, finite
differences, plain PyTorch autograd. No test uses one loss of losses.py as another's reference.

Throughout: flow matching, p* the real data, p^theta a Gaussian generator, a fixed time t0 where
a closed form is pointwise in x (Eq. 22, Lemma 2), common random numbers for Monte Carlo.
"""
import math

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

    def draw(self, x0, x1, t, xi):
        return fm_by_hand(x0, x1, t)[0]

    def target(self, x0, x1, t, xi):
        return fm_by_hand(x0, x1, t)[1]

    def field(self, f, xt, t, x1):
        return f(xt, t)


class HandBridge(HandFlowMatching):
    """The bridge (Eq. 41, eps_b = 0.5) by hand: x_t = (1 - t) x0 + t x1 + sqrt(eps_b t (1 - t)) xi, c = x0,
    and the model's input is (x_t, x1)."""
    observes_x1 = True

    def draw(self, x0, x1, t, xi):
        return fm_by_hand(x0, x1, t)[0] + torch.sqrt(0.5 * t * (1 - t))[:, None] * xi

    def target(self, x0, x1, t, xi):
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
    x1, xi = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x1, torch.full((n,), t0, dtype=torch.float64), xi


def slope_and_curvature(loss_of):
    """For a loss quadratic in e along f + e h: L(e) = L0 + 2 e B + e^2 C; returns (B, C)."""
    e = 0.1
    lp, lm, l0 = loss_of(e), loss_of(-e), loss_of(0.0)
    return (lp - lm) / (4 * e), (lp + lm - 2 * l0) / (2 * e * e)


class Remembered:
    """An exact field with its values and densities kept per input: the stationarity graders evaluate the
    loss at three e on the same x_t (values only, no gradients)."""

    def __init__(self, f):
        self.f, self.values = f, {}

    def get(self, fn, x, t):
        key = (fn.__name__, x.detach().numpy().tobytes(), t.detach().numpy().tobytes())
        if key not in self.values:
            self.values[key] = fn(x, t).detach()
        return self.values[key]

    def __call__(self, x, t):
        return self.get(self.f.__call__, x, t)

    def log_marginal(self, x, t):
        return self.get(self.f.log_marginal, x, t)


def perturbed(f, e):
    return lambda x, t: f(x, t) + e * (torch.sin(x) + 0.5)



def mlps(seed=0):
    torch.manual_seed(seed)
    return [nets.MLP(1, 1, hidden=32, depth=2).double() for _ in range(3)]  # teacher, fake, generator


def sq(v):
    return v.flatten(1).pow(2).sum(1)


def assert_close(got, expected, what, rtol=1e-12, atol=0.0):
    """got against expected (tensors), with a message that says what was compared."""
    assert got.shape == expected.shape, f"{what}: got shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert torch.allclose(got, expected, rtol=rtol, atol=atol), (
        f"{what}: got {[round(v, 5) for v in got.flatten()[:3].tolist()]}..., expected "
        f"{[round(v, 5) for v in expected.flatten()[:3].tolist()]}... (largest difference "
        f"{float((got - expected).abs().max()):.3g})")


def assert_stationary(B, C, what, stationary=True):
    """A loss quadratic along f + e h (slope B, curvature C) is minimised at e = 0 iff |B| << C."""
    assert C > 0, f"{what}: the loss along f + e h has curvature {C:.4g}, expected > 0 (a minimum)"
    if stationary:
        assert abs(B) < 0.03 * C, (f"{what}: slope {B:.4g} at e = 0 against curvature {C:.4g}; expected |slope| < "
                                   f"0.03 curvature (the minimiser)")
    else:
        assert abs(B) >= 0.03 * C, f"{what}: slope {B:.4g}, curvature {C:.4g}; expected not to be the minimiser"


HAND = {"fm": FM, "bridge": HandBridge()}


def hand_paths():
    """Both hand-written families: flow matching, and the bridge whose model also sees x1."""
    return [pytest.param(name, id=name) for name in HAND]


def model(name, f):
    """f(x_t, t) as a model of the family: the bridge's model takes (x_t, x1) and must use both."""
    if name == "fm":
        return f
    return lambda x, t: f(x[:, :x.shape[1] // 2], t) + 0.5 * x[:, x.shape[1] // 2:]


def by_hand(name, f, x0, x1, t, xi):
    """(model output, target) for data x0, with the family's x_t written in the test (HAND)."""
    path = HAND[name]
    xt = path.draw(x0, x1, t, xi)
    return path.field(model(name, f), xt, t, x1), path.target(x0, x1, t, xi)


def batch(seed, n=50, d=2):
    g = torch.Generator().manual_seed(seed)
    x0_gen, x0_real, x1, xi = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4))
    return x0_gen, x0_real, x1, torch.rand(n, generator=g, dtype=torch.float64), xi


def smooth(x, t):
    """A model f(x, t) that is no one's optimum."""
    return torch.sin(2 * x) * (1 + t.reshape(-1, *[1] * (x.dim() - 1))) - 0.3 * x


# ---------------------------------------------------------------------------------- um_loss, Eq. (3)

@pytest.mark.ex2
@pytest.mark.parametrize("shape", [(6, 1), (3, 2, 4, 4)])
def test_um_loss_eq3_is_the_squared_error_to_the_target_summed_over_dimensions(shape):
    """Eq. (3) per sample, (B,): ||f(x_t) - c||^2 summed (not averaged) over the data dimensions."""
    g = torch.Generator().manual_seed(0)
    x0, x1, xi = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(shape[0], generator=g, dtype=torch.float64)
    xt, c = fm_by_hand(x0, x1, t)
    loss = losses.um_loss(FM, smooth, x0, x1, t, xi)
    assert_close(loss, sq(smooth(xt, t) - c), "Eq. (3) per sample against ||f(x_t) - c||^2 summed over dimensions")


@pytest.mark.ex2
def test_um_loss_eq3_bridge_model_sees_x_t_and_x1():
    """With the bridge's path, the model is called through path.field on (x_t, x1)."""
    g = torch.Generator().manual_seed(1)
    x0, x1, xi = (torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(6, generator=g, dtype=torch.float64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1 + torch.sqrt(0.5 * t * (1 - t))[:, None] * xi
    f = lambda x, s: smooth(x[:, :2], s) + x[:, 2:]  # noqa: E731
    loss = losses.um_loss(HandBridge(), f, x0, x1, t, xi)
    assert_close(loss, sq(smooth(xt, t) + x1 - x0), "Eq. (3) with the bridge (model input (x_t, x1), c = x0)")


@pytest.mark.ex2
def test_um_loss_eq3_is_minimised_by_the_exact_field():
    """Eq. (3): the minimiser is E[c | x_t], the exact mixture field; with common random numbers,
    perturbing it by +-0.2 h raises the Monte Carlo loss."""
    torch.manual_seed(1)
    p0 = real_mixture()
    f_star = field(p0)
    x0, x1 = p0.sample(20000).double(), torch.randn(20000, 1, dtype=torch.float64)
    t, xi = torch.rand(20000, dtype=torch.float64), torch.randn(20000, 1, dtype=torch.float64)
    base = losses.um_loss(FM, f_star, x0, x1, t, xi).mean()
    for e in [0.2, -0.2]:
        other = float(losses.um_loss(FM, perturbed(f_star, e), x0, x1, t, xi).mean())
        assert other > base, f"Eq. (3) at f* + {e} h: got {other:.5f}, expected more than at f* ({float(base):.5f})"


# ---------------------------------------------------------------------------- realum_loss, Eq. (16)

@pytest.mark.ex3
def test_realum_loss_eq16_minimiser_on_real_data_is_the_teacher():
    """Teacher invariance of Eq. (16): with p^theta = p*, argmin_f L_R-UM = f* for beta/alpha != 1;
    with a different p^theta, f* is no longer the minimiser."""
    p_star = real_mixture()
    f_teacher = Remembered(field(p_star))
    x1, t, xi = draws(100000, 0)
    x0_real = p_star.sample(100000).double()
    gens = [(p_star.sample(100000).double(), True), (gauss(0.5, 0.3).sample(100000).double(), False)]
    for x0_gen, at_teacher in gens:
        B, C = slope_and_curvature(lambda e: float(losses.realum_loss(
            FM, perturbed(f_teacher, e), x0_gen, x0_real, x1, ALPHA, BETA, t, xi).mean()))
        assert_stationary(B, C, f"Eq. (16) along f* + e h, p_gen {'=' if at_teacher else '!='} p*", at_teacher)


@pytest.mark.ex3
def test_realum_loss_eq16_minimiser_is_the_eq22_optimal_fake_model():
    p_star, p_gen = real_mixture(), gauss(0.5, 0.3)
    f_opt = eq22(Remembered(field(p_star)), Remembered(field(p_gen)), ALPHA, BETA)
    x1, t, xi = draws(100000, 1)
    x0_gen, x0_real = p_gen.sample(100000).double(), p_star.sample(100000).double()
    B, C = slope_and_curvature(lambda e: float(losses.realum_loss(
        FM, perturbed(f_opt, e), x0_gen, x0_real, x1, ALPHA, BETA, t, xi).mean()))
    assert_stationary(B, C, "Eq. (16) along f_opt + e h, f_opt the optimum of Eq. (22) by quadrature")


@pytest.mark.ex3
@pytest.mark.parametrize("alpha,beta", [(ALPHA, BETA), (0.9, 0.95), (1.0, 1.0)])
def test_realum_loss_eq16_inner_max_is_lemma2_eq18(alpha, beta):
    """max_f L_R-UID = L_R-UM(f*) - L_R-UM(f_opt) (Monte Carlo) equals int l_t(x) dx (quadrature)."""
    p_star, p_gen = real_mixture(), gauss(0.5, 0.3)
    f_star, f_gen = field(p_star), field(p_gen)
    f_opt = eq22(f_star, f_gen, alpha, beta)
    x1, t, xi = draws(200000, 2)
    x0_gen, x0_real = p_gen.sample(200000).double(), p_star.sample(200000).double()
    gap = (losses.realum_loss(FM, f_star, x0_gen, x0_real, x1, alpha, beta, t, xi)
           - losses.realum_loss(FM, f_opt, x0_gen, x0_real, x1, alpha, beta, t, xi))
    mc, se = float(gap.mean()), float(gap.std() / math.sqrt(len(gap)))
    exact = lemma2_value(f_star, f_gen, alpha, beta, T0)
    assert abs(mc - exact) < 4 * se + 1e-3, (f"L_R-UM(f*) - L_R-UM(f_opt): got {mc:.5f} +- {se:.5f} (Monte Carlo), "
                                             f"expected {exact:.5f} from Lemma 2, Eq. (18), by quadrature")


@pytest.mark.ex3
@pytest.mark.parametrize("name", hand_paths())
def test_realum_loss_eq16_is_both_terms_by_hand_and_eq13_at_alpha_beta_one(name):
    """Eq. (16) per sample: alpha ||f(x_t^th) - (beta/alpha) c^th||^2 + (1 - alpha) ||f(x_t*) -
    ((1 - beta)/(1 - alpha)) c*||^2, both terms at the same t, x1 and xi, the model called as the family's
    (the bridge's sees (x_t, x1)); at alpha = beta = 1 it is the data-free Eq. (13), ||f(x_t^th) - c^th||^2,
    and needs no real data."""
    x0_gen, x0_real, x1, t, xi = batch(5)
    (out, c), (out_r, c_r) = by_hand(name, smooth, x0_gen, x1, t, xi), by_hand(name, smooth, x0_real, x1, t, xi)
    expected = ALPHA * sq(out - BETA / ALPHA * c) + (1 - ALPHA) * sq(out_r - (1 - BETA) / (1 - ALPHA) * c_r)
    got = losses.realum_loss(HAND[name], model(name, smooth), x0_gen, x0_real, x1, ALPHA, BETA, t, xi)
    assert_close(got, expected, f"Eq. (16) per sample at alpha = {ALPHA}, beta = {BETA} against both terms by hand")
    data_free = losses.realum_loss(HAND[name], model(name, smooth), x0_gen, None, x1, 1.0, 1.0, t, xi)
    assert_close(data_free, sq(out - c), "Eq. (16) at alpha = beta = 1 against Eq. (13), ||f(x_t) - c||^2")


@pytest.mark.ex5
def test_realum_loss_eq16_cut_no_gradient_reaches_the_generator():
    """Fake step: the generated sample is plain data (detached); only f gets gradients."""
    f_star, f_fake, gen = mlps(2)
    x0_gen = gen(torch.randn(64, 1, dtype=torch.float64), torch.ones(64, dtype=torch.float64))
    loss = losses.realum_loss(FM, f_fake, x0_gen, real_mixture().sample(64).double(),
                              torch.randn(64, 1, dtype=torch.float64), ALPHA, BETA)
    loss.mean().backward()
    assert all(p.grad is None for p in gen.parameters()), "fake step: the generator's weights got a gradient"
    assert all(p.grad is not None for p in f_fake.parameters()), "fake step: the fake model's weights got none"


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
    x1, t, xi = draws(200000, 3)
    noise = torch.randn(200000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = torch.stack([torch.autograd.grad(losses.realuid_loss(  # four independent batches of G_theta(noise)
        FM, f_star, f_opt, theta[0] + theta[1] * noise[i::4], x1[i::4], alpha, beta, t[i::4], xi[i::4]).mean(),
        theta)[0] for i in range(4)])
    mc, se = grads.mean(0), grads.std(0) / 2

    def value(m, s):
        return lemma2_value(f_star, field(gauss(m, s ** 2)), alpha, beta, T0)
    h = 1e-4
    exact = torch.tensor([(value(mu + h, sigma) - value(mu - h, sigma)) / (2 * h),
                          (value(mu, sigma + h) - value(mu, sigma - h)) / (2 * h)], dtype=torch.float64)
    assert exact[0] > 0.5, f"the oracle: d value / d mu = {float(exact[0]):.3f}, expected > 0.5 (mu* = -2 is left)"
    assert torch.all((mc - exact).abs() < 4 * se + 0.02 * exact.abs()), (
        f"gradient of Eq. (17) in (mu, sigma): got {mc.tolist()} +- {se.tolist()} (Monte Carlo), expected "
        f"{exact.tolist()}, the derivative of Lemma 2's value, Eq. (18), by finite differences of quadrature")


@pytest.mark.ex4
@pytest.mark.parametrize("name", hand_paths())
def test_realuid_loss_eq17_is_the_generated_terms_by_hand_and_eq12_at_alpha_beta_one(name):
    """Eq. (17), generator step, per sample: alpha ||f*(x_t) - (beta/alpha) c||^2 - alpha ||f(x_t) -
    (beta/alpha) c||^2 at generated x0, models called as the family's; at alpha = beta = 1 the data-free Eq. (12)."""
    x0_gen, _, x1, t, xi = batch(6)
    f_fake = lambda x, s: smooth(x, s) + 0.5 * x  # noqa: E731
    (out_star, c), (out_fake, _) = by_hand(name, smooth, x0_gen, x1, t, xi), by_hand(name, f_fake, x0_gen, x1, t, xi)
    for a, b in [(ALPHA, BETA), (1.0, 1.0)]:
        expected = a * (sq(out_star - b / a * c) - sq(out_fake - b / a * c))
        got = losses.realuid_loss(HAND[name], model(name, smooth), model(name, f_fake), x0_gen, x1, a, b, t, xi)
        assert_close(got, expected, f"Eq. (17) per sample at alpha = {a}, beta = {b} against the generated terms "
                     "by hand")


@pytest.mark.ex5
@pytest.mark.parametrize("name", ["realuid_loss", "general_generator_loss"])
def test_generator_step_cut_only_the_generator_gets_gradients(name):
    """Generator step: f* and f are fixed (no gradient, flags untouched), also when passed wrapped in
    a lambda; theta's gradient is the one plain autograd gives for the loss written by hand (Eq. 17, or
    Def. 3's generated bracket at gamma = alpha, delta = f* - f) with f*, f switched off: the gradient
    reaches theta through x_t (into f* and f) and through c."""
    f_star, f_fake, gen = mlps(1)
    x1, u = torch.randn(64, 1, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    t, xi = torch.rand(64, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    extra = (ALPHA, 1.0) if name == "general_generator_loss" else ()

    def loss(fs, ff):
        x0_gen = gen(u, torch.ones(64, dtype=torch.float64))
        return getattr(losses, name)(FM, fs, ff, x0_gen, x1, ALPHA, BETA, *extra, t=t, xi=xi).mean()
    for fs, ff in [(f_star, f_fake), (lambda x, s: f_star(x, s), lambda x, s: f_fake(x, s))]:
        g_theta = torch.autograd.grad(loss(fs, ff), list(gen.parameters()) + list(f_star.parameters())
                                      + list(f_fake.parameters()), allow_unused=True)
        n = len(list(gen.parameters()))
        assert all(g is not None for g in g_theta[:n]), f"{name}: the generator's weights got no gradient"
        assert all(g is None for g in g_theta[n:]), f"{name}: the weights of f* or f got a gradient (they are fixed)"
        assert all(p.requires_grad for m in (f_star, f_fake) for p in m.parameters()), \
            f"{name}: requires_grad of f* or f was switched off and not restored"
    for p in list(f_star.parameters()) + list(f_fake.parameters()):
        p.requires_grad_(False)  # the reference: plain autograd with f*, f off, the loss written here
    xt, c = fm_by_hand(gen(u, torch.ones(64, dtype=torch.float64)), x1, t)
    out_star, out_fake = f_star(xt, t), f_fake(xt, t)
    if name == "realuid_loss":
        by_hand = ALPHA * (sq(out_star - BETA / ALPHA * c) - sq(out_fake - BETA / ALPHA * c))
    else:
        delta = out_star - out_fake
        by_hand = -ALPHA * sq(delta) + 2 * ALPHA * (delta * out_star).sum(1) - 2 * BETA * (delta * c).sum(1)
    reference = torch.autograd.grad(by_hand.mean(), list(gen.parameters()))
    for got, ref in zip(g_theta[:n], reference):
        assert_close(got, ref, f"{name}: theta's gradient against plain autograd of the loss by hand with f*, f "
                     "switched off (through x_t into f*, f and through c)", rtol=1e-10, atol=1e-14)


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
    f_star, f_gen = Remembered(field(p_star)), Remembered(field(p_gen))
    delta_opt = general_delta_opt(f_star, f_gen, ALPHA, BETA, gamma)

    def f_opt(x, t):
        return f_star(x, t) - delta_opt(x, t) / s
    x1, t, xi = draws(100000, 7)
    x0_gen, x0_real = p_gen.sample(100000).double(), p_star.sample(100000).double()
    for f, optimal in [(f_opt, True), (eq22(f_star, f_gen, ALPHA, BETA), False)]:
        B, C = slope_and_curvature(lambda e: float(losses.general_fake_loss(
            FM, f_star, perturbed(f, e), x0_gen, x0_real, x1, ALPHA, BETA, gamma, s, t, xi).mean()))
        which = "App. A.2's optimum" if optimal else "Eq. (22)'s optimum (not optimal when gamma != alpha)"
        assert_stationary(B, C, f"Def. 3 fake loss along f + e h with f {which}", optimal)


@pytest.mark.ex6
def test_general_fake_loss_def3_with_gamma_alpha_is_eq16_up_to_a_constant():
    """App. A.2: with gamma = alpha and delta = f* - f, minus Def. 3's objective is, per sample,
    Eq. (16) at f minus Eq. (16) at f* (a constant in f: the same gradients as RealUM), both written
    by hand here."""
    x0_gen, x0_real, x1, t, xi = batch(8)
    (xt, c), (xt_r, c_r) = fm_by_hand(x0_gen, x1, t), fm_by_hand(x0_real, x1, t)
    f_fake = lambda x, s: smooth(x, s) + 0.5 * x  # noqa: E731

    def eq16(f):
        return ALPHA * sq(f(xt, t) - BETA / ALPHA * c) + (1 - ALPHA) * sq(f(xt_r, t) - (1 - BETA) / (1 - ALPHA) * c_r)
    loss = losses.general_fake_loss(FM, smooth, f_fake, x0_gen, x0_real, x1, ALPHA, BETA, ALPHA, 1.0, t)
    assert_close(loss, eq16(f_fake) - eq16(smooth), "Def. 3 fake loss at gamma = alpha against Eq. (16) at f minus "
                 "at f*, by hand", rtol=1e-10, atol=1e-12)


@pytest.mark.ex6
@pytest.mark.parametrize("name", hand_paths())
@pytest.mark.parametrize("alpha,beta,gamma,s", [(ALPHA, BETA, 0.5, BETA), (1.0, 1.0, 0.5, 1.0), (0.9, 0.95, 1.0, 1.0)])
def test_general_fake_loss_def3_is_minus_both_brackets_by_hand(name, alpha, beta, gamma, s):
    """Def. 3 per sample, delta = s (f* - f): minus [-gamma ||delta||^2 + 2 alpha <delta, f*> - 2 beta <delta, c>
    at generated x0, plus -(1 - gamma) ||delta||^2 + 2 (1 - alpha) <delta, f*> - 2 (1 - beta) <delta, c> at real
    x0], both at the same t, x1, xi; the real bracket is there whenever gamma < 1 or alpha < 1, also at
    alpha = beta = 1 with gamma < 1."""
    x0_gen, x0_real, x1, t, xi = batch(11)
    f_fake = lambda x, u: smooth(x, u) + 0.5 * x  # noqa: E731
    objective = 0
    for x0, a, b, g in [(x0_gen, alpha, beta, gamma), (x0_real, 1 - alpha, 1 - beta, 1 - gamma)]:
        (fs, c), (ff, _) = by_hand(name, smooth, x0, x1, t, xi), by_hand(name, f_fake, x0, x1, t, xi)
        delta = s * (fs - ff)
        objective = objective - g * sq(delta) + 2 * a * (delta * fs).sum(1) - 2 * b * (delta * c).sum(1)
    got = losses.general_fake_loss(HAND[name], model(name, smooth), model(name, f_fake), x0_gen, x0_real, x1,
                                   alpha, beta, gamma, s, t, xi)
    assert_close(got, -objective, f"Def. 3 fake loss at alpha = {alpha}, beta = {beta}, gamma = {gamma}, "
                 f"delta = {s} (f* - f) against minus both brackets by hand", rtol=1e-10, atol=1e-12)


@pytest.mark.ex5
def test_general_fake_loss_def3_cut_no_gradient_reaches_the_generator_or_the_teacher():
    f_star, f_fake, gen = mlps(2)
    x0_gen = gen(torch.randn(64, 1, dtype=torch.float64), torch.ones(64, dtype=torch.float64))
    loss = losses.general_fake_loss(FM, f_star, f_fake, x0_gen, real_mixture().sample(64).double(),
                                    torch.randn(64, 1, dtype=torch.float64), ALPHA, BETA, 0.5, BETA)
    loss.mean().backward()
    assert all(p.grad is None for p in gen.parameters()), "fake step: the generator's weights got a gradient"
    assert all(p.grad is None for p in f_star.parameters()), "fake step: the teacher's weights got a gradient"
    assert all(p.grad is not None for p in f_fake.parameters()), "fake step: the fake model's weights got none"


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
    x1, t, xi = draws(200000, 8)
    noise = torch.randn(200000, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.stack([torch.autograd.grad(losses.general_generator_loss(  # four independent batches
        FM, f_star, f_fake, theta[0] + theta[1] * noise[i::4], x1[i::4], alpha, beta, gamma, s, t[i::4],
        xi[i::4]).mean(), theta)[0] for i in range(4)])
    mc, se = grads.mean(0), grads.std(0) / 2

    def value(m, sd):
        return general_value(f_star, field(gauss(m, sd ** 2)), alpha, beta, gamma, T0)
    h = 1e-4
    exact = torch.tensor([(value(mu + h, sigma) - value(mu - h, sigma)) / (2 * h),
                          (value(mu, sigma + h) - value(mu, sigma - h)) / (2 * h)], dtype=torch.float64)
    assert torch.all((mc - exact).abs() < 4 * se + 0.02 * exact.abs()), (
        f"gradient of the Def. 3 generator loss in (mu, sigma): got {mc.tolist()} +- {se.tolist()} (Monte Carlo), "
        f"expected {exact.tolist()}, the derivative of App. A.2's maximised objective by quadrature")


@pytest.mark.ex6
@pytest.mark.parametrize("name", hand_paths())
def test_general_generator_loss_def3_is_the_generated_bracket_and_eq17_at_gamma_alpha(name):
    """App. A.2 generated bracket by hand, delta = s (f* - f): -gamma ||delta||^2 + 2 alpha <delta, f*>
    - 2 beta <delta, c>, models called as the family's; with gamma = alpha and s = 1 it is Eq. (17)'s
    generator loss, per sample."""
    x0_gen, _, x1, t, xi = batch(10)
    f_fake = lambda x, s: smooth(x, s) + 0.5 * x  # noqa: E731
    (fs, c), (ff, _) = by_hand(name, smooth, x0_gen, x1, t, xi), by_hand(name, f_fake, x0_gen, x1, t, xi)
    gamma, s = 0.5, BETA
    delta = s * (fs - ff)
    expected = -gamma * sq(delta) + 2 * ALPHA * (delta * fs).sum(1) - 2 * BETA * (delta * c).sum(1)
    path, fs_model, ff_model = HAND[name], model(name, smooth), model(name, f_fake)
    loss = losses.general_generator_loss(path, fs_model, ff_model, x0_gen, x1, ALPHA, BETA, gamma, s, t, xi)
    assert_close(loss, expected, f"Def. 3 generator loss (gamma = {gamma}, delta = {s} (f* - f)) against the "
                 "generated bracket by hand", rtol=1e-10, atol=1e-12)
    eq17 = ALPHA * (sq(fs - BETA / ALPHA * c) - sq(ff - BETA / ALPHA * c))
    at_alpha = losses.general_generator_loss(path, fs_model, ff_model, x0_gen, x1, ALPHA, BETA, ALPHA, 1.0, t, xi)
    assert_close(at_alpha, eq17, "Def. 3 generator loss at gamma = alpha, delta = f* - f against Eq. (17) by hand",
                 rtol=1e-10, atol=1e-12)


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
