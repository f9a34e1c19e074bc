"""toy2d.py: its metrics against closed forms, Eq. (22)'s push, argument checks, atomic outputs, and
end to end as a user runs it (tiny sizes, CPU)."""
import errno
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import paths
import toy2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher-steps", "40", "--steps", "6", "--fake-steps", "2", "--batch", "64", "--hidden", "32",
        "--depth", "2", "--nfe", "4", "--n-eval", "600", "--eval-every", "3"]


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
    assert toy2d.energy_distance(a, a) == 0.0


def test_energy_distance_separates_laws_and_not_samples_of_one_law():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    assert toy2d.energy_distance(x, y) < 0.01 < toy2d.energy_distance(x, y + 0.5)


def test_w2_of_a_translated_sample_is_the_translation_length():
    """For y = x + v the identity assignment is optimal (cyclical monotonicity), so W2 = |v| exactly."""
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    assert toy2d.w2(x, x + torch.tensor([0.3, -0.4])) == pytest.approx(0.5, abs=1e-6)  # float32 rounding of x + v


def test_w2_matches_brute_force_on_a_tiny_sample():
    from itertools import permutations
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    best = min(sum(float((x[i] - y[j]).pow(2).sum()) for i, j in enumerate(p)) for p in permutations(range(6)))
    assert toy2d.w2(x, y, block=6, blocks=1) == pytest.approx(math.sqrt(best / 6))


def test_mode_metrics_of_exact_mode_centres():
    p0 = toy2d.mixture(5)
    x = p0.means.float().repeat_interleave(torch.tensor([1, 1, 1, 1, 6]), 0)  # 10 points, weights 0.1 ... 0.6
    near, tv = toy2d.mode_metrics(x, p0)
    assert near == 1.0
    assert tv == pytest.approx(0.5 * float((torch.tensor([.1, .1, .1, .1, .6]).double() - p0.weights).abs().sum()))
    far = torch.zeros(7, 2)  # the centre of the circle: more than 3 std from every mode
    assert toy2d.mode_metrics(far, p0)[0] == 0.0


# ---- Eq. (22): the optimal fake model's push
def test_eq22_push_data_free_is_the_generators_own_field_minus_the_teachers():
    args = toy2d.parse(["--alpha", "0.9", "--beta", "0.94"])
    out = toy2d.eq22_push(args, t=0.4, n=5)
    p0, fm, noise = toy2d.mixture(5), paths.FlowMatching(), paths.GaussianMixture.standard(2)
    w = p0.weights.clone()
    w[2] = 0
    gen = paths.ExactField(fm, paths.independent(paths.GaussianMixture(p0.means, p0.covs, w / w.sum()), noise))
    real = paths.ExactField(fm, paths.independent(p0, noise))
    t = torch.full((len(out["x"]),), 0.4, dtype=torch.float64)
    torch.testing.assert_close(out["data-free UID"], gen(out["x"], t) - real(out["x"], t))


def test_eq22_push_with_beta_equal_alpha_vanishes_where_the_generator_has_no_mass():
    """beta/alpha = 1: f_opt = [a p_g f_g + (1 - a) p* f*] / [a p_g + (1 - a) p*] -> f* where p_g = 0, so
    real data adds no pull toward a missed mode (Sec. 3.4); beta > alpha pulls toward it, beta < alpha away."""
    pulls = {b: toy2d.eq22_push(toy2d.parse(["--alpha", "0.9", "--beta", str(b)]), t=0.1, n=41)["RealUID pull"]
             for b in (0.86, 0.9, 0.94)}
    assert abs(pulls[0.9]) < 1e-3 < pulls[0.94] and pulls[0.86] < -1e-3, pulls


# ---- arguments and outputs
@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.0", "--beta", "0.9"], "alpha = 1 requires beta = 1"),
    (["--gamma", "0"], "gamma must be in"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--teacher-error", "inf"], "--teacher-error must be a finite number"),
    (["--nfe", "0"], "--nfe must be a positive integer"),
    (["--hidden", "0"], "--hidden must be a positive integer"),
    (["--depth", "-2"], "--depth must be a positive integer"),
    (["--seeds", "0"], "--seeds must be a positive integer"),
    (["--steps", "0"], "--steps must be a positive integer"),  # not taken for "no value given"
    (["--lr", "1e3"], "--lr and --lr-teacher must be in (0, 1)"),
    (["--ema", "1"], "--ema must be in [0, 1)"),
    (["--delta-beta"], "give --gamma too"),
])
def test_bad_arguments_are_refused_before_any_training(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        toy2d.parse(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_generator_steps_default_per_family_and_as_given():
    assert [toy2d.parse(["--path", p]).steps for p in ("fm", "diffusion", "bridge", "si")] == [1000, 2000, 1000, 1000]
    assert toy2d.parse(["--path", "diffusion", "--steps", "7"]).steps == 7


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


def test_a_sample_smaller_than_a_w2_block_still_gives_a_finite_w2():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    assert toy2d.w2(x, x + torch.tensor([0.0, 1.0])) == pytest.approx(1.0, abs=1e-6)


# ---- end to end
@pytest.mark.parametrize("path", ["fm", "diffusion", "bridge", "si"])
def test_every_family_runs_end_to_end_and_writes_its_outputs(tmp_path, path):
    if path == "fm":  # as a user runs it; the other families in-process (saves the interpreter start)
        run(tmp_path, "--path", path, "--real-data", *TINY)
    else:
        toy2d.main(["--out", str(tmp_path), "--path", path, "--real-data", *TINY])
    samples = np.load(tmp_path / "samples.npz")
    for key in ["real", "teacher", "data_free_UID", "RealUID"]:
        assert samples[key].shape == (600, 2) and np.isfinite(samples[key]).all(), key
    assert ("x1" in samples) == (path == "bridge")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["args"]["path"] == path
    curve = results["seeds"][0]["curves"]["RealUID"]
    assert [s for s, _ in curve] == [0, 3, 6]  # step 0, then every --eval-every steps
    png = (tmp_path / f"toy2d_{path}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_seeds_are_paired_and_summarised(tmp_path):
    toy2d.main(["--out", str(tmp_path), "--real-data", "--seeds", "2", "--teacher", "exact", "--teacher-error", "0.5",
                "--gamma", "0.5", "--delta-beta", *TINY])
    results = json.loads((tmp_path / "results.json").read_text())
    seeds = results["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    diff = results["summary"]["RealUID - data-free"]["energy"]
    d = [s["table"]["RealUID"]["energy"] - s["table"]["data-free UID"]["energy"] for s in seeds]
    assert diff["mean"] == pytest.approx(np.mean(d)) and diff["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(2))
    assert diff["lower_in"] == sum(v < 0 for v in d)
    # paired: both students start from the same generator, so their step-0 curve points are equal
    assert seeds[0]["curves"]["RealUID"][0] == seeds[0]["curves"]["data-free UID"][0]


def test_distillation_brings_the_generator_close_to_the_data(tmp_path):
    """Exact teacher, no error: a short data-free distillation lowers the energy distance to the data
    far below that of the generator at initialisation (which outputs about the data mean)."""
    toy2d.main(["--out", str(tmp_path), "--teacher", "exact", "--teacher-steps", "300", "--steps", "300",
                "--batch", "256", "--hidden", "64", "--n-eval", "1000", "--nfe", "8", "--eval-every", "50",
                "--ema", "0.9", "--lr", "2e-3", "--warmup", "10"])
    table = json.loads((tmp_path / "results.json").read_text())["seeds"][0]["table"]
    assert table["data-free UID"]["energy"] < 0.3 * table["generator at init"]["energy"], table
