"""toy2d.py: its metrics against closed forms, Eq. (22)'s push and its two terms, argument checks, atomic
outputs, and end to end as a user runs it (tiny sizes, CPU)."""
import errno
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import special

import paths
import toy2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher-steps", "40", "--generator-steps", "6", "--fake-steps", "2", "--batch", "64", "--hidden", "32",
        "--depth", "2", "--nfe", "4", "--n-eval", "300", "--n-ref", "2", "--eval-every", "3", "--jobs", "1"]


def run(out, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "toy2d.py"), "--out", str(out), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---- metrics: closed forms
def test_energy_distance_of_two_point_masses_is_twice_their_distance():
    a, b = torch.zeros(50, 2), torch.tensor([[3.0, 4.0]]).expand(60, 2)
    assert toy2d.energy_distance(a, b) == pytest.approx(10.0)  # 2 |a - b| - 0 - 0


def test_energy_distance_is_unbiased_zero_in_expectation_for_one_law():
    """Two samples of one law: the U-statistic's mean over draws is 0 within its standard error, while the
    V-statistic (diagonal zeros included) sits a floor E|X - X'| (1/n + 1/m) above 0, many standard errors away."""
    g, n, u, v = torch.Generator().manual_seed(0), 100, [], []
    for _ in range(400):
        x, y = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
        u.append(toy2d.energy_distance(x, y))
        v.append(float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()))
    se = np.std(u, ddof=1) / math.sqrt(len(u))
    assert abs(np.mean(u)) < 3 * se, f"mean unbiased energy distance of one law: {np.mean(u):.2e}, se {se:.2e}"
    assert np.mean(v) > 10 * se, f"the V-statistic's floor should show: {np.mean(v):.2e}, se {se:.2e}"


def rice_mean(nu, sigma):
    """E|W| for W ~ N(m, sigma^2 I) in 2-D, |m| = nu: the Rice mean sigma sqrt(pi / 2) L_1/2(-nu^2 / (2 sigma^2))."""
    x = nu ** 2 / (2 * sigma ** 2)  # L_1/2(-x) = e^{-x/2} [(1 + x) I0(x/2) + x I1(x/2)]; i0e/i1e carry e^{-x/2}
    return sigma * math.sqrt(math.pi / 2) * ((1 + x) * special.i0e(x / 2) + x * special.i1e(x / 2))


def test_energy_distance_matches_the_closed_form_for_two_gaussians():
    """X ~ N(0, s1^2 I), Y ~ N(m, s2^2 I): 2 E|X - Y| - E|X - X'| - E|Y - Y'| with each term a Rice mean."""
    s1, s2, m = 1.0, 0.6, torch.tensor([0.8, -0.3])
    exact = (2 * rice_mean(float(m.norm()), math.hypot(s1, s2)) - rice_mean(0.0, math.sqrt(2) * s1)
             - rice_mean(0.0, math.sqrt(2) * s2))
    g = torch.Generator().manual_seed(1)
    d = [toy2d.energy_distance(s1 * torch.randn(150, 2, generator=g), m + s2 * torch.randn(150, 2, generator=g))
         for _ in range(300)]
    se = np.std(d, ddof=1) / math.sqrt(len(d))
    assert abs(np.mean(d) - exact) < 3 * se, f"mean energy distance {np.mean(d):.4f} vs closed form {exact:.4f}"


def test_distances_to_data_average_fresh_references():
    g = torch.Generator().manual_seed(2)
    x, refs = torch.randn(100, 2, generator=g), [torch.randn(80, 2, generator=g) + 1 for _ in range(3)]
    d = toy2d.distances_to_data(x, refs, [toy2d.mean_distance(y) for y in refs])
    assert d == pytest.approx([toy2d.energy_distance(x, y) for y in refs])


def test_near_radius_scales_with_the_mode_spacing():
    """3 modes: 3 sd; 5 modes: a third of their spacing 2.94; 8 modes: a third of 1.91, so the point midway between
    two neighbours is near neither (with 3 sd, 1.16, it would be near both)."""
    assert toy2d.near_radius(3) == pytest.approx(3 * math.sqrt(toy2d.VAR))
    assert toy2d.near_radius(5) == pytest.approx(5 * math.sin(math.pi / 5) / 3)
    p8 = toy2d.mixture(8)
    midway = (p8.means[0] + p8.means[1]).float()[None] / 2
    assert toy2d.mode_metrics(midway, p8)["near_mode"] == 0.0
    assert toy2d.mode_metrics(p8.means[:1].float() + torch.tensor([0.6, 0.0]), p8)["near_mode"] == 1.0  # 0.6 < 0.64


def test_mode_metrics_of_exact_mode_centres():
    p0 = toy2d.mixture(5)
    x = p0.means.float().repeat_interleave(torch.tensor([1, 1, 1, 1, 6]), 0)  # 10 points, weights 0.1 ... 0.6
    m = toy2d.mode_metrics(x, p0)
    assert m["near_mode"] == 1.0 and m["mode_weights"] == pytest.approx([.1, .1, .1, .1, .6])
    shares = torch.tensor([.1, .1, .1, .1, .6]).double()
    assert m["mode_tv"] == pytest.approx(0.5 * float((shares - p0.weights).abs().sum()))
    far = torch.zeros(7, 2)  # the centre of the circle: far from every mode
    assert toy2d.mode_metrics(far, p0)["near_mode"] == 0.0


def test_mixture_without_a_mode_shares_its_weight_out_in_proportion():
    full, missing = toy2d.mixture(5), toy2d.mixture(5, drop=2)
    assert len(missing.weights) == 4 and torch.equal(missing.means, full.means[[0, 1, 3, 4]])
    assert missing.weights.tolist() == pytest.approx((full.weights[[0, 1, 3, 4]] / (1 - full.weights[2])).tolist())


# ---- Eq. (22): the optimal fake model's push, and its two terms
@pytest.fixture(scope="module")
def push():
    return toy2d.eq22_push(toy2d.parse(["--alpha", "0.9", "--beta", "0.94"]), t=0.2, n=41)


def fields(t, x):
    p0, fm, noise = toy2d.mixture(5), paths.FlowMatching(), paths.GaussianMixture.standard(2)
    w = p0.weights.clone()
    w[2] = 0  # the generator misses mode 2, written here with a zero weight rather than a dropped mode
    gen = paths.ExactField(fm, paths.independent(paths.GaussianMixture(p0.means, p0.covs, w / w.sum()), noise))
    real = paths.ExactField(fm, paths.independent(p0, noise))
    tt = torch.full((len(x),), t, dtype=torch.float64)
    return gen(x, tt), real(x, tt), gen.log_marginal(x, tt).exp()[:, None], real.log_marginal(x, tt).exp()[:, None]


def test_eq22_push_is_eq22_and_data_free_is_the_generators_field_minus_the_teachers(push):
    f_gen, f_real, p_gen, p_real = fields(0.2, push["x"])
    torch.testing.assert_close(push["data-free UID"], f_gen - f_real)
    a, b = 0.9, 0.94  # Eq. (22): f_opt = [b p_g f_g + (1 - b) p* f*] / [a p_g + (1 - a) p*]
    f_opt = (b * p_gen * f_gen + (1 - b) * p_real * f_real) / (a * p_gen + (1 - a) * p_real)
    torch.testing.assert_close(push["RealUID"], f_opt - f_real, msg="RealUID push: got vs Eq. (22) by hand")


def test_eq22_push_is_the_sum_of_its_two_terms(push):
    torch.testing.assert_close(push["RealUID own"] + push["RealUID real"], push["RealUID"],
                               msg="own + real-data terms must add up to f_opt - f*")


def test_eq22_where_the_generator_has_no_mass_the_fake_model_is_a_scaled_teacher():
    """p_g -> 0: f_opt -> (1 - b) / (1 - a) f*, the only information real data gives there; at b = a, f* itself."""
    for b in (0.86, 0.9, 0.94):
        out = toy2d.eq22_push(toy2d.parse(["--alpha", "0.9", "--beta", str(b)]), t=0.05, n=41)
        at = int(((out["x"] - out["centre"]).norm(dim=1)).argmin())  # the grid point nearest the missed mode
        assert float(out["p_gen"][at] / out["p_real"][at]) < 1e-6
        f_real = fields(0.05, out["x"][at:at + 1])[1]
        torch.testing.assert_close(out["RealUID"][at:at + 1] + f_real, (1 - b) / (1 - 0.9) * f_real, rtol=1e-4,
                                   atol=1e-6)


def test_eq22_real_data_reaches_the_generator_as_a_radial_push_not_a_pull_into_the_missed_mode(push):
    """Weighted by p_gen (where the generator step has samples), RealUID's real-data term pushes the present modes
    toward the centre for b > a (radial < 0) and away for b < a; the part of its pull toward the missed mode that
    comes from the mode's own disk is under a tenth of the whole: the pull is that radial push seen from afar."""
    assert push["RealUID real radial"] < -1e-3, push["RealUID real radial"]
    assert abs(push["RealUID real pull inside"]) < 0.1 * push["RealUID real pull"], (
        push["RealUID real pull inside"], push["RealUID real pull"])
    low = toy2d.eq22_push(toy2d.parse(["--alpha", "0.9", "--beta", "0.86"]), t=0.2, n=41)
    assert low["RealUID real radial"] > 1e-3, low["RealUID real radial"]
    equal = toy2d.eq22_push(toy2d.parse(["--alpha", "0.9", "--beta", "0.9"]), t=0.2, n=41)
    assert float(equal["RealUID real"].abs().max()) < 1e-12  # b = a: no real-data term at all


# ---- arguments and outputs
@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.0", "--beta", "0.9"], "alpha = 1 requires beta = 1"),
    (["--gamma", "0"], "gamma must be in"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--beta", "0.9", "inf"], "--beta must be a finite number"),
    (["--beta", "0.9", "0.9"], "--beta values must differ"),
    (["--teacher-error", "inf"], "--teacher-error must be a finite number"),
    (["--nfe", "0"], "--nfe must be a positive integer"),
    (["--hidden", "0"], "--hidden must be a positive integer"),
    (["--depth", "-2"], "--depth must be a positive integer"),
    (["--seeds", "0"], "--seeds must be a positive integer"),
    (["--generator-steps", "0"], "--generator-steps must be a positive integer"),  # not taken for "no value given"
    (["--lr", "1e3"], "--lr and --lr-teacher must be in (0, 1)"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--delta-beta"], "give --gamma too"),
    (["--n-eval", "1"], "--n-eval must be in [100, 20000]"),
    (["--n-eval", "10000000"], "--n-eval must be in [100, 20000]"),
    (["--n-ref", "1"], "--n-ref in [2, 50]"),
    (["--seed", str(2 ** 64)], "--seed in [0, 2^62]"),
    (["--missed-mode", "5"], "--missed-mode must name a mode, 0 to 4"),
    (["--out", ""], "--out must name a folder"),
])
def test_bad_arguments_are_refused_before_any_training(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        toy2d.parse(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_generator_steps_default_and_as_given():
    assert [toy2d.parse(["--path", p]).generator_steps for p in ("fm", "diffusion", "bridge", "si")] == [2000] * 4
    assert toy2d.parse(["--path", "diffusion", "--generator-steps", "7"]).generator_steps == 7


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing_partial(tmp_path):
    first, second = str(tmp_path / "results.json"), str(tmp_path / "samples.npz")
    toy2d.save_atomic({first: lambda fh: fh.write(b"good 1"), second: lambda fh: fh.write(b"good 2")})

    def disk_full(fh):
        fh.write(b"trunc")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(SystemExit, match="No space left"):  # the second file fails: the first is not replaced
        toy2d.save_atomic({first: lambda fh: fh.write(b"new 1"), second: disk_full})
    assert open(first, "rb").read() == b"good 1" and open(second, "rb").read() == b"good 2"
    assert sorted(os.listdir(tmp_path)) == ["results.json", "samples.npz"]

    def plot_fails(fh):
        fh.write(b"half a png")
        raise ValueError("a matplotlib error")
    with pytest.raises(ValueError):  # not a disk error: raised as it is, but nothing partial is left either
        toy2d.save_atomic({first: lambda fh: fh.write(b"new 1"), second: plot_fails})
    assert open(first, "rb").read() == b"good 1" and sorted(os.listdir(tmp_path)) == ["results.json", "samples.npz"]


def test_sigterm_during_the_writes_leaves_the_previous_files_and_no_tmp(tmp_path):
    first = str(tmp_path / "results.json")
    toy2d.save_atomic({first: lambda fh: fh.write(b"good")})

    def killed(fh):
        fh.write(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
    old = signal.signal(signal.SIGTERM, toy2d.on_sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):
            toy2d.save_atomic({first: killed})
    finally:
        signal.signal(signal.SIGTERM, old)
    assert open(first, "rb").read() == b"good" and os.listdir(tmp_path) == ["results.json"]


def test_an_earlier_run_is_kept_unless_force(tmp_path):
    (tmp_path / "toy2d_si.png").write_bytes(b"an earlier figure")
    with pytest.raises(SystemExit, match="already holds a run"):
        toy2d.main(["--out", str(tmp_path), *TINY])
    toy2d.main(["--out", str(tmp_path), "--force", *TINY])
    assert sorted(os.listdir(tmp_path)) == ["results.json", "samples.npz", "toy2d_fm.png"]  # the si figure is gone


def test_a_non_finite_loss_ends_the_run_with_one_line_and_status_1(tmp_path, monkeypatch):
    """SystemExit with a message: Python prints that one line, no traceback, and exits with status 1."""
    monkeypatch.setattr(toy2d.losses, "um_loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as e:
        toy2d.cli(["--out", str(tmp_path), *TINY])
    assert str(e.value.code) == "toy2d.py: teacher loss is nan at step 0: lower --lr-teacher"
    assert not os.path.exists(tmp_path / "results.json")


# ---- end to end
@pytest.mark.parametrize("path", ["fm", "diffusion", "bridge", "si"])
def test_every_family_runs_end_to_end_and_writes_its_outputs(tmp_path, path):
    if path == "fm":  # as a user runs it; the other families in-process (saves the interpreter start)
        run(tmp_path, "--path", path, "--real-data", "--animate", *TINY)
        from PIL import Image
        gif = Image.open(tmp_path / "toy2d_fm.gif")  # a frame per curve point (steps 0, 3, 6), two students wide
        assert (gif.n_frames, gif.size) == (3, (2 * 256, 384))
    else:
        toy2d.main(["--out", str(tmp_path), "--path", path, "--real-data", *TINY])
    samples = np.load(tmp_path / "samples.npz")
    for key in ["real", "teacher", "data_free_UID", "RealUID"]:
        assert samples[key].shape == (300, 2) and np.isfinite(samples[key]).all(), key
    assert ("x1" in samples) == (path == "bridge")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["args"]["path"] == path
    curve = results["seeds"][0]["curves"]["RealUID"]
    assert [c["step"] for c in curve] == [0, 3, 6]  # step 0, then every --eval-every steps
    png = (tmp_path / f"toy2d_{path}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_seeds_are_paired_and_summarised(tmp_path):
    toy2d.main(["--out", str(tmp_path), "--real-data", "--seeds", "2", "--teacher", "exact", "--teacher-error", "0.5",
                "--gamma", "0.5", "--delta-beta", "--beta", "0.94", "0.86", *TINY])
    results = json.loads((tmp_path / "results.json").read_text())
    seeds = results["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    for name in ("RealUID b/a 1.044", "RealUID b/a 0.956"):
        diff = results["summary"][f"{name} - data-free"]["energy"]
        d = [s["table"][name]["energy"] - s["table"]["data-free UID"]["energy"] for s in seeds]
        assert diff["mean"] == pytest.approx(np.mean(d))
        assert diff["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(2))
        assert diff["lower_in"] == sum(v < 0 for v in d)
        # paired: every student starts from the same generator, so their step-0 curve points are equal
        assert seeds[0]["curves"][name][0] == seeds[0]["curves"]["data-free UID"][0]


def test_distillation_brings_the_generator_close_to_the_data(tmp_path):
    """Exact teacher, no error: a short data-free distillation lowers the distance to the data far below that of
    the generator at initialisation (which outputs about the data mean)."""
    toy2d.main(["--out", str(tmp_path), "--teacher", "exact", "--teacher-steps", "300", "--generator-steps", "300",
                "--batch", "256", "--hidden", "64", "--n-eval", "500", "--n-ref", "2", "--nfe", "8",
                "--eval-every", "100", "--ema", "0.9", "--lr", "2e-3", "--generator-warmup", "10"])
    table = json.loads((tmp_path / "results.json").read_text())["seeds"][0]["table"]
    assert table["data-free UID"]["energy"] < 0.3 * table["generator at init"]["energy"], table


def test_the_missed_mode_start_misses_the_mode(tmp_path):
    """--missed-mode 2: the students' common start (a generator distilled from the mixture without mode 2) puts
    almost none of its samples on mode 2 (true weight 0.2) and most on the others (here, after a short
    distillation), and the run records the modes' weights along training. (Distilled from the full mixture
    instead, the same start holds 0.09 on mode 2.)"""
    toy2d.main(["--out", str(tmp_path), "--missed-mode", "2", "--teacher", "exact",
                "--teacher-steps", "200", "--generator-steps", "150", "--batch", "256", "--hidden", "64",
                "--n-eval", "500", "--n-ref", "2", "--nfe", "4", "--eval-every", "50", "--ema", "0.9",
                "--lr", "3e-3", "--generator-warmup", "10", "--jobs", "1"])
    results = json.loads((tmp_path / "results.json").read_text())
    start = results["seeds"][0]["table"]["generator at start"]["mode_weights"]
    assert start[2] < 0.02 and sum(start[:2] + start[3:]) > 0.5, f"start's share per mode: {start}"
    curve = results["seeds"][0]["curves"]["data-free UID"]
    assert curve[0]["mode_weights"] == pytest.approx(start)  # step 0 of each student is that start


# ---- --jobs: processes change the wall time, never the numbers
def test_jobs_2_gives_the_numbers_of_jobs_1_bit_for_bit(tmp_path):
    flags = [*TINY, "--real-data", "--beta", "0.94", "0.86"]
    toy2d.main(["--out", str(tmp_path / "one"), *flags, "--jobs", "1"])
    toy2d.main(["--out", str(tmp_path / "two"), *flags, "--jobs", "2"])  # one student of the seed per process
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["seeds"] == two["seeds"] and one["summary"] == two["summary"]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_failing_worker_ends_the_run_with_its_message_and_no_files(tmp_path):
    """f* + 1e200 (f_wrong - f*) overflows float32: every worker's first generator loss is not finite."""
    with pytest.raises(SystemExit) as e:
        toy2d.cli(["--out", str(tmp_path), *TINY, "--real-data", "--jobs", "2", "--teacher", "exact",
                   "--teacher-error", "1e200"])
    assert str(e.value.code).startswith("toy2d.py: generator loss is"), e.value.code
    assert os.listdir(tmp_path) == []
