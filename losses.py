"""Losses of RealUID, generic over the path (paths.py). Paper convention: data x0 at t = 0.

Every loss returns per-sample values of shape (B,), summed over the data dimensions; callers take
the mean. t and the path noise z are drawn here unless given; the generated and the real terms of
one loss share t, x1 and z, as in the paper. Models are callables f(x, t) (see paths.py).
"""
from contextlib import contextmanager

import torch


def check_alpha_beta(alpha, beta):
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], Eq. (16); got {alpha}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], Eq. (16); got {beta}")
    if alpha == 1 and beta != 1:
        raise ValueError(f"alpha = 1 requires beta = 1, Eq. (16): the real term's target "
                         f"(1 - beta)/(1 - alpha) is undefined; got beta = {beta}")


def check_gamma(gamma):
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], App. A.2 Def. 3; got {gamma}")


def sq(v):
    """||v||^2 per sample: (B, *D) -> (B,)."""
    return v.flatten(1).pow(2).sum(1)


def dot(u, v):
    """<u, v> per sample: (B, *D) -> (B,)."""
    return (u * v).flatten(1).sum(1)


def _draws(path, x0, t, z):
    t = path.sample_t(len(x0), x0.device) if t is None else t
    return t, torch.randn_like(x0) if z is None else z


def _model_and_target(path, f, x0, x1, t, z):
    """f(x_t) and the conditional target c, both built from x0 (gradients flow through both)."""
    xt = path.draw(x0, x1, t, z)
    return path.field(f, xt, t, x1), path.target(x0, x1, t, z)


def um_loss(path, f, x0, x1, t=None, z=None):
    """Teacher loss, Eq. (3): ||f(x_t) - f_t(x_t | x0)||^2, (B,)."""
    t, z = _draws(path, x0, t, z)
    out, c = _model_and_target(path, f, x0, x1, t, z)
    return sq(out - c)


def realum_loss(path, f_fake, x0_gen, x0_real, x1, alpha, beta, t=None, z=None):
    """Fake-model step, Eq. (16):
    alpha ||f(x_t^theta) - (beta/alpha) c^theta||^2 + (1 - alpha) ||f(x_t*) - ((1-beta)/(1-alpha)) c*||^2.
    x0_real may be None when alpha = beta = 1 (data-free UID, Eq. 13)."""
    check_alpha_beta(alpha, beta)
    t, z = _draws(path, x0_gen, t, z)
    # The fake step trains f only: cut the gradient to the generator's parameters.
    out, c = _model_and_target(path, f_fake, x0_gen.detach(), x1, t, z)
    loss = alpha * sq(out - beta / alpha * c)
    if alpha < 1:
        out_real, c_real = _model_and_target(path, f_fake, x0_real, x1, t, z)
        loss = loss + (1 - alpha) * sq(out_real - (1 - beta) / (1 - alpha) * c_real)
    return loss


def realuid_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta, t=None, z=None):
    """Generator step of Eq. (17): alpha ||f*(x_t) - (beta/alpha) c||^2 - alpha ||f(x_t) - (beta/alpha) c||^2
    at generated x0. The gradient reaches theta through x_t and c; the real term of Eq. (16) does not
    depend on theta and is dropped. Run it inside `frozen(f_star, f_fake)`: neither is trained here."""
    check_alpha_beta(alpha, beta)
    t, z = _draws(path, x0_gen, t, z)
    xt, c = path.draw(x0_gen, x1, t, z), path.target(x0_gen, x1, t, z)
    out_star, out_fake = path.field(f_star, xt, t, x1), path.field(f_fake, xt, t, x1)
    return alpha * (sq(out_star - beta / alpha * c) - sq(out_fake - beta / alpha * c))


def _general_part(path, f_star, f_fake, x0, x1, t, z, delta_scale, w_delta, w_star, w_c):
    """One bracket of App. A.2, Def. 3, at data x0 with delta = delta_scale (f* - f):
    -w_delta ||delta||^2 + 2 w_star <delta, f*> - 2 w_c <delta, c>."""
    xt, c = path.draw(x0, x1, t, z), path.target(x0, x1, t, z)
    out_star = path.field(f_star, xt, t, x1)
    delta = delta_scale * (out_star - path.field(f_fake, xt, t, x1))
    return -w_delta * sq(delta) + 2 * w_star * dot(delta, out_star) - 2 * w_c * dot(delta, c)


def general_fake_loss(path, f_star, f_fake, x0_gen, x0_real, x1, alpha, beta, gamma,
                      delta_scale=1.0, t=None, z=None):
    """Fake step of the general RealUID loss (App. A.2) with delta = delta_scale (f* - f):
    minus [gen part (gamma, alpha, beta) + real part (1 - gamma, 1 - alpha, 1 - beta)].
    delta_scale = beta gives the delta = beta (f* - f) parametrisation."""
    check_alpha_beta(alpha, beta)
    check_gamma(gamma)
    t, z = _draws(path, x0_gen, t, z)
    def f_star_fixed(x, s):
        with torch.no_grad():  # the teacher is fixed: no gradient into f_star
            return f_star(x, s)
    # The fake step trains f only: cut the gradient to the generator's parameters.
    objective = _general_part(path, f_star_fixed, f_fake, x0_gen.detach(), x1, t, z, delta_scale, gamma, alpha, beta)
    if gamma < 1 or alpha < 1:
        objective = objective + _general_part(path, f_star_fixed, f_fake, x0_real, x1, t, z, delta_scale,
                                              1 - gamma, 1 - alpha, 1 - beta)
    return -objective  # the fake model maximises the objective


def general_generator_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta, gamma,
                           delta_scale=1.0, t=None, z=None):
    """Generator step of the general RealUID loss (App. A.2): the generated part only, with the
    gradient through x_t^theta (inputs of f* and f) and c^theta. Run it inside `frozen(f_star, f_fake)`."""
    check_alpha_beta(alpha, beta)
    check_gamma(gamma)
    t, z = _draws(path, x0_gen, t, z)
    return _general_part(path, f_star, f_fake, x0_gen, x1, t, z, delta_scale, gamma, alpha, beta)


@contextmanager
def frozen(*modules):
    """Switch off requires_grad of the modules' parameters for the block (the generator step
    must move only theta: gradients still flow through these networks' inputs)."""
    params = [p for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
