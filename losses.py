"""Losses of RealUID, generic over the path (paths.py). Paper convention: data x0 at t = 0.

Every loss has one shape: draw t and the family noise xi (unless given), build x_t and c with the path (`draw`,
`target`), call the models, and return one formula (its `# Eq. (n)` line) as per-sample values of
shape (B,), summed over the data dimensions; callers take the mean. The generated and the real
terms of one loss share t, x1 and xi, as in the paper. Models are callables f(x, t) (see paths.py).

Two kinds of gradient cut, one mechanism each, both applied here next to their equation:
- a generated sample is plain data for the fake step (no gradient to theta): `x0_gen.detach()`;
- a network is fixed in a step (f* always, f in the generator step): `fixed(f)`, which keeps the
  gradient through the network's input and gives its weights none.
"""
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


def _draws(path, x0, t, xi):
    t = path.sample_t(len(x0), x0.device) if t is None else t
    return t, torch.randn_like(x0) if xi is None else xi


def check_real(x0_real, alpha, gamma=None):
    """Real data is needed unless the loss is data-free: alpha = 1 (so beta = 1) and gamma = 1 (or absent)."""
    if x0_real is None and (alpha < 1 or (gamma is not None and gamma < 1)):
        raise ValueError("x0_real is required unless alpha = beta = gamma = 1 (data-free UID, Eq. 13)")


class _InputGradOnly(torch.autograd.Function):
    """y = f(x, t) whose backward returns dy/dx only: f's weights get no gradient (and no .grad).
    One backward per forward, like the rest of a training step (the inner graph is then freed)."""

    @staticmethod
    def forward(ctx, x, t, f):
        with torch.set_grad_enabled(ctx.needs_input_grad[0]):
            ctx.x = x.detach().requires_grad_(ctx.needs_input_grad[0])
            ctx.y = f(ctx.x, t)
        return ctx.y.detach()

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.y is None:
            raise RuntimeError("losses.fixed: second backward through a loss; evaluate the loss again")
        x, y, ctx.x, ctx.y = ctx.x, ctx.y, None, None
        grad_x = torch.autograd.grad(y, x, grad_y, allow_unused=True)[0] if y.requires_grad else None
        return (torch.zeros_like(x) if grad_x is None else grad_x), None, None


def fixed(f):
    """The model f held fixed: the same values, with gradients through its input x only; works for
    any callable (an nn.Module, a wrapper around one, an ExactField)."""
    return lambda x, t: _InputGradOnly.apply(x, t, f)


def um_loss(path, f, x0, x1, t=None, xi=None):
    """Teacher loss, Eq. (3): ||f(x_t) - c||^2, (B,)."""
    t, xi = _draws(path, x0, t, xi)
    # BEGIN SOLUTION 2
    xt, c = path.draw(x0, x1, t, xi), path.target(x0, x1, t, xi)
    return sq(path.field(f, xt, t, x1) - c)  # Eq. (3)
    # END SOLUTION 2


def realum_loss(path, f_fake, x0_gen, x0_real, x1, alpha, beta, t=None, xi=None):
    """Fake-model step, Eq. (16), (B,). x0_real may be None when alpha = beta = 1 (data-free UID, Eq. 13)."""
    check_alpha_beta(alpha, beta)
    check_real(x0_real, alpha)
    t, xi = _draws(path, x0_gen, t, xi)
    # BEGIN SOLUTION 3
    # BEGIN SOLUTION 5
    x0_gen = x0_gen.detach()  # cut: the fake step trains f only, the generated sample is plain data
    # END SOLUTION 5
    xt, c = path.draw(x0_gen, x1, t, xi), path.target(x0_gen, x1, t, xi)
    loss = alpha * sq(path.field(f_fake, xt, t, x1) - beta / alpha * c)  # Eq. (16), generated term
    if alpha < 1:  # alpha = 1 forces beta = 1: no real term, data-free (Eq. 13)
        xt_r, c_r = path.draw(x0_real, x1, t, xi), path.target(x0_real, x1, t, xi)
        loss = loss + (1 - alpha) * sq(path.field(f_fake, xt_r, t, x1) - (1 - beta) / (1 - alpha) * c_r)  # real term
    return loss
    # END SOLUTION 3


def realuid_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta, t=None, xi=None):
    """Generator step of Eq. (17) at generated x0, (B,). The gradient reaches theta through x_t and c;
    the real term of Eq. (16) does not depend on theta and is dropped."""
    check_alpha_beta(alpha, beta)
    t, xi = _draws(path, x0_gen, t, xi)
    # BEGIN SOLUTION 4
    xt, c = path.draw(x0_gen, x1, t, xi), path.target(x0_gen, x1, t, xi)
    # BEGIN SOLUTION 5
    # cut: f* and f are fixed in the generator step; theta moves them only through their input x_t
    out_star, out_fake = path.field(fixed(f_star), xt, t, x1), path.field(fixed(f_fake), xt, t, x1)
    # END SOLUTION 5
    return alpha * (sq(out_star - beta / alpha * c) - sq(out_fake - beta / alpha * c))  # Eq. (17)
    # END SOLUTION 4


def bracket(delta, out_star, c, w_delta, w_star, w_c):
    """One bracket of App. A.2 Def. 3: -w_delta ||delta||^2 + 2 w_star <delta, f*> - 2 w_c <delta, c>, (B,)."""
    return -w_delta * sq(delta) + 2 * w_star * dot(delta, out_star) - 2 * w_c * dot(delta, c)


def general_fake_loss(path, f_star, f_fake, x0_gen, x0_real, x1, alpha, beta, gamma,
                      delta_scale=1.0, t=None, xi=None):
    """Fake step of the general RealUID loss (App. A.2 Def. 3) with delta = delta_scale (f* - f), (B,):
    minus [gen bracket (gamma, alpha, beta) + real bracket (1 - gamma, 1 - alpha, 1 - beta)].
    delta_scale = beta gives the delta = beta (f* - f) parametrisation."""
    check_alpha_beta(alpha, beta)
    check_gamma(gamma)
    check_real(x0_real, alpha, gamma)
    t, xi = _draws(path, x0_gen, t, xi)
    # BEGIN SOLUTION 6
    # BEGIN SOLUTION 5
    x0_gen = x0_gen.detach()  # cut: the fake step trains f only, the generated sample is plain data
    # END SOLUTION 5
    xt, c = path.draw(x0_gen, x1, t, xi), path.target(x0_gen, x1, t, xi)
    # BEGIN SOLUTION 5
    out_star = path.field(fixed(f_star), xt, t, x1)  # cut: the teacher is fixed
    # END SOLUTION 5
    delta = delta_scale * (out_star - path.field(f_fake, xt, t, x1))
    objective = bracket(delta, out_star, c, gamma, alpha, beta)  # App. A.2 Def. 3, generated bracket
    if gamma < 1 or alpha < 1:  # the real bracket vanishes only at alpha = beta = gamma = 1
        xt_r, c_r = path.draw(x0_real, x1, t, xi), path.target(x0_real, x1, t, xi)
        # BEGIN SOLUTION 5
        out_star_r = path.field(fixed(f_star), xt_r, t, x1)  # cut: the teacher is fixed
        # END SOLUTION 5
        delta_r = delta_scale * (out_star_r - path.field(f_fake, xt_r, t, x1))
        objective = objective + bracket(delta_r, out_star_r, c_r, 1 - gamma, 1 - alpha, 1 - beta)  # real bracket
    return -objective  # the fake model maximises the objective
    # END SOLUTION 6


def general_generator_loss(path, f_star, f_fake, x0_gen, x1, alpha, beta, gamma,
                           delta_scale=1.0, t=None, xi=None):
    """Generator step of the general RealUID loss (App. A.2 Def. 3): the generated bracket only, (B,),
    with the gradient through x_t^theta (inputs of f* and f) and c^theta."""
    check_alpha_beta(alpha, beta)
    check_gamma(gamma)
    t, xi = _draws(path, x0_gen, t, xi)
    # BEGIN SOLUTION 6
    xt, c = path.draw(x0_gen, x1, t, xi), path.target(x0_gen, x1, t, xi)
    # BEGIN SOLUTION 5
    # cut: f* and f are fixed in the generator step; theta moves them only through their input x_t
    out_star, out_fake = path.field(fixed(f_star), xt, t, x1), path.field(fixed(f_fake), xt, t, x1)
    # END SOLUTION 5
    return bracket(delta_scale * (out_star - out_fake), out_star, c, gamma, alpha, beta)  # App. A.2 Def. 3
    # END SOLUTION 6

