"""Interpolation paths in the paper's convention: data x0 at t = 0, the other end x1 at t = 1.

| paper        | code          | shape     | meaning                                                        |
|--------------|---------------|-----------|----------------------------------------------------------------|
| x0           | x0            | (B, *D)   | data end: real (p0*) or generated (p0^theta)                   |
| x1           | x1            | (B, *D)   | noise (fm; diffusion's eps), observation of x0 (bridge), source (si) |
| t            | t             | (B,)      | float time in [0, 1]; sampling runs from t = 1 to t = 0        |
| xi (si: z)   | xi            | (B, *D)   | the family's own N(0, I) noise (bridge, si); unused otherwise  |
| a_t, s_t     | a, s          | ()/(B,)   | diffusion's signal and noise scales, Eq. (1)                   |
| eps_b        | eps_b         | float     | the bridge's noise level, App. C.1 (`--bridge-eps`)            |
| a in gamma(t)| si_a          | float     | the interpolant's noise amplitude, gamma(t) = a t (1 - t) (`--si-a`) |
| x_t          | xt            | (B, *D)   | point on the path, `draw`                                      |
| f_t(x_t|x0)  | c = target    | (B, *D)   | conditional target, affine in x0 (Eq. 3), `target`            |
| f            | f(x, t)       | callable  | matching model: teacher f_star, fake f_fake, or ExactField     |
| z            | z             | (B, *D)   | generator latent, N(0, I)                                      |
| G_theta      | generate(g, z)| (B, *D)   | one-step generator, initialised from the teacher's weights     |

Each family writes x_t (`draw`) and c (`target`) as one formula line with its equation number;
both are linear in (x0, x1, xi) with scalar coefficients of t, which is all `ExactField` assumes.
Models are always called through `path.field(f, xt, t, x1)`: the bridge model also sees x1,
concatenated on dim 1.
"""
import math

import torch


def bcast(t, x):
    """Time (B,) -> (B, 1, ..., 1), broadcastable against x (B, *D)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Path:
    """Shared interface: draw x_t, its target c, the time sampler, a sampler, the generator.
    The default sampler and generator are Euler on a velocity field (fm, si)."""
    observes_x1 = False  # True for the bridge: the model input is (x_t, x1)

    def draw(self, x0, x1, t, xi):
        """x_t given the data end x0, the other end x1 and the family's noise xi, (B, *D)."""
        raise NotImplementedError

    def target(self, x0, x1, t, xi):
        """The conditional target c = f_t(x_t | x0, x1, xi), (B, *D)."""
        raise NotImplementedError

    def sample_t(self, n, device=None):
        return torch.rand(n, device=device)

    def field(self, f, xt, t, x1):
        return f(xt, t)

    @torch.no_grad()
    def sample(self, f, x1, steps):
        """Euler from t = 1 to 0: x <- x - dt f(x, t); `steps` network calls (NFE)."""
        ts = torch.linspace(1.0, 0.0, steps + 1, device=x1.device)
        x = x1
        for i in range(steps):
            x = x - (ts[i] - ts[i + 1]) * self.field(f, x, ts[i].expand(len(x)), x1)
        return x

    def generate(self, g, z, x1=None):
        """One-step generator G(z) = z - g(z, 1): one Euler step from t = 1 with z ~ p1 (fm, si).
        The gradient reaches g's weights (the generator is trained through it)."""
        # BEGIN SOLUTION 8
        return z - self.field(g, z, torch.ones(len(z), device=z.device), x1)
        # END SOLUTION 8


class FlowMatching(Path):
    """Rectified flow / I-CFM, Eq. (2): x1 ~ N(0, I), velocity target."""

    def draw(self, x0, x1, t, xi):
        t = bcast(t, x0)
        return (1 - t) * x0 + t * x1  # Eq. (2): x_t = (1 - t) x0 + t x1

    def target(self, x0, x1, t, xi):
        return x1 - x0  # Eq. (2): c = x1 - x0


class Diffusion(Path):
    """VP diffusion with noise prediction, Eq. (1): x1 = eps ~ N(0, I) is the noise, c = x1."""

    def __init__(self, beta_min=0.1, beta_max=20.0, t_min=1e-3, sigma_gen=2.5):
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min
        # Generator noise level (SiD): s_tg / a_tg = sigma_gen, i.e. int_0^tg beta = log(1 + sigma_gen^2).
        db, L = beta_max - beta_min, math.log(1 + sigma_gen ** 2)
        self.t_gen = (-beta_min + math.sqrt(beta_min ** 2 + 2 * db * L)) / db

    def alpha_sigma(self, t):
        """a_t = exp(-1/2 int_0^t beta), s_t = sqrt(1 - a_t^2) for beta(t) linear in t."""
        t = torch.as_tensor(t)
        a = torch.exp(-0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2))
        return a, torch.sqrt(1 - a ** 2)

    def draw(self, x0, x1, t, xi):
        a, s = (bcast(v, x0) for v in self.alpha_sigma(t))
        return a * x0 + s * x1  # Eq. (1): x_t = a_t x0 + s_t eps, eps = x1

    def target(self, x0, x1, t, xi):
        return x1  # Eq. (1): c = eps = (x_t - a_t x0) / s_t (DSM with weight s_t^2)

    def sample_t(self, n, device=None):
        return self.t_min + (1 - self.t_min) * torch.rand(n, device=device)

    @torch.no_grad()
    def sample(self, f, x1, steps):
        """Deterministic DDIM: x0_hat = (x - s x1_hat) / a, x' = a' x0_hat + s' x1_hat (x1_hat: the noise)."""
        # BEGIN SOLUTION 7
        ts = torch.linspace(1.0, 0.0, steps + 1, device=x1.device)
        x = x1
        for i in range(steps):
            a, s = self.alpha_sigma(ts[i])
            a_next, s_next = self.alpha_sigma(ts[i + 1])
            x1_hat = self.field(f, x, ts[i].expand(len(x)), x1)
            x = a_next * (x - s * x1_hat) / a + s_next * x1_hat
        return x
        # END SOLUTION 7

    def generate(self, g, z, x1=None):
        """One-step generator as in SiD: x = s_tg z, G(z) = (x - s_tg g(x, t_g)) / a_tg (the teacher's x0 estimate)."""
        t = torch.full((len(z),), self.t_gen, device=z.device)
        a, s = self.alpha_sigma(t[0])
        x = s * z
        return (x - s * self.field(g, x, t, x1)) / a


class Bridge(Path):
    """Brownian bridge with x0-prediction, Eq. (41), App. C.1: (x0, x1) paired (x1 a corrupted
    observation of x0), noise level eps_b; the model sees (x_t, x1)."""
    observes_x1 = True

    def __init__(self, eps_b=0.5, t_gen=0.5):
        self.eps_b, self.t_gen = eps_b, t_gen

    def draw(self, x0, x1, t, xi):
        # BEGIN SOLUTION 1
        t = bcast(t, x0)
        return (1 - t) * x0 + t * x1 + torch.sqrt(self.eps_b * t * (1 - t)) * xi  # Eq. (41): + sqrt(eps_b t (1 - t)) xi
        # END SOLUTION 1

    def target(self, x0, x1, t, xi):
        # BEGIN SOLUTION 1
        return x0  # Eq. (41): c = x0 (x0-prediction)
        # END SOLUTION 1

    def field(self, f, xt, t, x1):
        return f(torch.cat([xt, x1], dim=1), t)

    @torch.no_grad()
    def sample(self, f, x1, steps):
        """Euler-Maruyama from t = 1 (x = x1) to 0, drift (x - x0_hat) / t, with the exact
        Brownian-bridge step variance eps_b dt (t - dt) / t, so the last step lands on x0_hat."""
        ts = torch.linspace(1.0, 0.0, steps + 1, device=x1.device)
        x = x1
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            x0_hat = self.field(f, x, t.expand(len(x)), x1)
            mean = x - (t - t_next) * (x - x0_hat) / t
            x = mean + torch.sqrt(self.eps_b * (t - t_next) * t_next / t) * torch.randn_like(x)
        return x

    def generate(self, g, z, x1=None):
        """One-step generator G(z, x1) = g(x, t_g, x1) with x = x1 + sqrt(eps_b t_g (1 - t_g)) z, a noised copy of
        x1: the bridge's x_t at t_g drawn from x0 = x1 with xi = z."""
        t = torch.full((len(z),), self.t_gen, device=z.device)
        x = self.draw(x1, x1, t, z)
        return self.field(g, x, t, x1)


class Interpolant(Path):
    """Stochastic interpolant, Eq. (42), App. C.2: x1 from a source independent of x0,
    gamma(t) = a t (1 - t), velocity target."""

    def __init__(self, si_a=1.0):
        self.si_a = si_a

    def draw(self, x0, x1, t, xi):
        t = bcast(t, x0)
        return (1 - t) * x0 + t * x1 + self.si_a * t * (1 - t) * xi  # Eq. (42): + gamma(t) z

    def target(self, x0, x1, t, xi):
        t = bcast(t, x0)
        return x1 - x0 + self.si_a * (1 - 2 * t) * xi  # Eq. (42): c = x1 - x0 + gamma'(t) z


PATHS = {"fm": FlowMatching, "diffusion": Diffusion, "bridge": Bridge, "si": Interpolant}


# ----------------------------------------------------------------------------------------------
# Gaussian mixtures and exact teachers (oracles for the tests and for toy2d.py)

class GaussianMixture:
    """sum_k w_k N(m_k, S_k); means (K, d), covs (K, d, d), weights (K,), float64."""

    def __init__(self, means, covs, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if self.means.dim() != 2 or self.covs.shape != (*self.means.shape, self.means.shape[1]):
            raise ValueError(f"need means (K, d) and covs (K, d, d); got {tuple(self.means.shape)}, "
                             f"{tuple(self.covs.shape)}")
        if w.shape != self.means.shape[:1] or (w < 0).any() or abs(float(w.sum()) - 1) > 1e-6:
            raise ValueError("weights must be K non-negative numbers summing to 1")
        self.weights, self.dim = w, self.means.shape[1]
        self.chol = torch.linalg.cholesky(self.covs)  # (K, d, d), S_k = L_k L_k^T; once, not at every draw

    @staticmethod
    def standard(d):
        return GaussianMixture(torch.zeros(1, d), torch.eye(d)[None], [1.0])

    def sample(self, n, generator=None):
        """(n, d) float32 samples."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + (self.chol[k] @ noise[:, :, None])[:, :, 0]).float()

    def component_log_probs(self, x):
        """log w_k + log N(x; m_k, S_k), (n, K)."""
        L = self.chol  # (K, d, d)
        diff = (x.double()[:, None, :] - self.means)[..., None]  # (n, K, d, 1)
        maha = torch.linalg.solve_triangular(L, diff, upper=False).pow(2).sum((-1, -2))
        log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return self.weights.log() - 0.5 * (maha + log_det + self.dim * math.log(2 * math.pi))

    def log_prob(self, x):
        return torch.logsumexp(self.component_log_probs(x), dim=1)

    def mean(self):
        return self.weights @ self.means


def independent(p0, p1):
    """Joint mixture of (x0, x1) with x0 ~ p0 and x1 ~ p1 independent (fm, diffusion, si)."""
    K, J, d = len(p0.weights), len(p1.weights), p0.dim
    means = torch.cat([p0.means[:, None].expand(K, J, d), p1.means[None].expand(K, J, d)], 2)
    covs = torch.zeros(K, J, 2 * d, 2 * d, dtype=torch.float64)
    covs[:, :, :d, :d], covs[:, :, d:, d:] = p0.covs[:, None], p1.covs[None]
    return GaussianMixture(means.reshape(K * J, 2 * d), covs.reshape(K * J, 2 * d, 2 * d),
                           (p0.weights[:, None] * p1.weights[None]).reshape(-1))


def corrupted(p0, H, sigma):
    """Joint mixture of (x0, x1) with x1 = H x0 + sigma n, n ~ N(0, I) (the bridge's pairs)."""
    H = torch.as_tensor(H, dtype=torch.float64)
    S, m = p0.covs, p0.means
    cross = S @ H.T  # Cov(x0, x1) = S H^T
    covs = torch.cat([torch.cat([S, cross], 2),
                      torch.cat([cross.transpose(1, 2), H @ cross + sigma ** 2 * torch.eye(len(H))], 2)], 1)
    return GaussianMixture(torch.cat([m, m @ H.T], 1), covs, p0.weights)


def unit_coefficients(fn, t):
    """(B, 3) coefficients of x0, x1, xi in fn(x0, x1, t, xi) (a path's `draw` or `target`), read off by
    evaluating fn at unit inputs in 1-D: the families are linear in (x0, x1, xi) with scalar coefficients."""
    one, zero = torch.ones(len(t), 1, dtype=torch.float64), torch.zeros(len(t), 1, dtype=torch.float64)
    return torch.cat([fn(one, zero, t, zero), fn(zero, one, t, zero), fn(zero, zero, t, one)], 1)


class ExactField:
    """The exact teacher f*(x, t) = E[c | x] for (x0, x1) ~ joint, a GaussianMixture over (x0, x1).

    x is the model input: x_t, or (x_t, x1) concatenated for the bridge. Per component, (x0, x1, xi)
    is Gaussian and x and c are linear in it (coefficients from the path's own `draw` and `target`),
    so E[c | x] is a posterior-weighted sum of Gaussian conditional means.
    """

    def __init__(self, path, joint):
        self.path, self.joint, self.d = path, joint, joint.dim // 2

    def _moments(self, t):
        """Per-sample, per-component mean and covariance of the observation x and of c."""
        d, I = self.d, torch.eye(self.d, dtype=torch.float64)

        def rows(coefs):  # (B, 3) -> (B, d, 3d): [c_0 I, c_1 I, c_2 I]
            return (coefs[:, None, :, None] * I[None, :, None, :]).reshape(len(t), d, 3 * d)

        t = t.double()
        M, C = rows(unit_coefficients(self.path.draw, t)), rows(unit_coefficients(self.path.target, t))
        if self.path.observes_x1:  # the bridge model also sees x1 = [0, I, 0] (x0, x1, xi)
            M = torch.cat([M, rows(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand(len(t), 3))], 1)
        K = len(self.joint.weights)
        mu = torch.cat([self.joint.means, torch.zeros(K, d, dtype=torch.float64)], 1)  # (K, 3d)
        cov = torch.zeros(K, 3 * d, 3 * d, dtype=torch.float64)
        cov[:, :2 * d, :2 * d], cov[:, 2 * d:, 2 * d:] = self.joint.covs, I
        M, C = M[:, None], C[:, None]  # (B, 1, ., 3d) against components (K, ...)
        mu_x, mu_c = (M @ mu[..., None])[..., 0], (C @ mu[..., None])[..., 0]
        # Tiny jitter: the bridge's observation (x_t, x1) is degenerate at t = 1, where x_t = x1.
        cov_xx = M @ cov @ M.transpose(-1, -2) + 1e-10 * torch.eye(M.shape[-2], dtype=torch.float64)
        return mu_x, cov_xx, mu_c, C @ cov @ M.transpose(-1, -2)

    def _posterior(self, x, t):
        # the moments once per distinct time (one for a sampler step or a test at fixed t), then per sample
        t = t.double()
        one_time = bool((t == t[0]).all())
        times, index = (t[:1], None) if one_time else torch.unique(t, return_inverse=True)
        mu_x, cov_xx, mu_c, cov_cx = self._moments(times)
        L = torch.linalg.cholesky(cov_xx)
        log_det = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        if not one_time:  # one time broadcasts as it is
            mu_x, L, mu_c, cov_cx, log_det = (v[index] for v in (mu_x, L, mu_c, cov_cx, log_det))
        diff = x.double()[:, None] - mu_x  # (B, K, dx)
        sol = torch.cholesky_solve(diff[..., None], L)  # cov_xx^{-1} (x - mu_x)
        log_p = -0.5 * ((diff[..., None] * sol).sum((-1, -2)) + log_det + diff.shape[-1] * math.log(2 * math.pi))
        return self.joint.weights.log() + log_p, mu_c + (cov_cx @ sol)[..., 0]  # (B, K), (B, K, d)

    def __call__(self, x, t):
        log_w, cond_mean = self._posterior(x, t)
        return (torch.softmax(log_w, 1)[..., None] * cond_mean).sum(1).to(x.dtype)

    def log_marginal(self, x, t):
        """log density of the model input x at time t (for the bridge: of (x_t, x1) jointly)."""
        return torch.logsumexp(self._posterior(x, t)[0], 1).to(x.dtype)
