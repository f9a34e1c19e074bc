"""toy2d.py end to end, as a user runs it (subprocess, tiny sizes, CPU)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher-steps", "40", "--steps", "4", "--fake-steps", "2", "--batch", "64", "--hidden", "32",
        "--depth", "2", "--nfe", "4", "--n-eval", "300"]


def run(out, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "toy2d.py"), "--out", str(out), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("path", ["fm", "diffusion", "bridge", "si"])
def test_every_family_runs_end_to_end_and_writes_its_outputs(tmp_path, path):
    run(tmp_path, "--path", path, "--real-data", *TINY)
    samples = np.load(tmp_path / "samples.npz")
    for key in ["real", "teacher", "data_free_UID", "RealUID"]:
        assert samples[key].shape == (300, 2) and np.isfinite(samples[key]).all(), key
    assert ("x1" in samples) == (path == "bridge")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["args"]["path"] == path
    assert {r["model"] for r in results["table"]} >= {"teacher", "data-free UID", "RealUID"}
    png = (tmp_path / f"toy2d_{path}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_general_loss_and_corrupted_exact_teacher_run(tmp_path):
    run(tmp_path, "--real-data", "--teacher", "exact", "--teacher-error", "0.5", "--gamma", "0.5", "--delta-beta", *TINY)
    assert np.isfinite(np.load(tmp_path / "samples.npz")["RealUID"]).all()


def test_distillation_brings_the_generator_close_to_the_data(tmp_path):
    """Exact teacher, no error: a short data-free distillation lowers the energy distance to the data
    far below that of the generator at initialisation (which outputs about the data mean)."""
    run(tmp_path, "--teacher", "exact", "--teacher-steps", "300", "--steps", "150", "--batch", "256",
        "--hidden", "64", "--lr", "1e-3", "--n-eval", "1000", "--nfe", "8")
    table = {r["model"]: r for r in json.loads((tmp_path / "results.json").read_text())["table"]}
    assert table["data-free UID"]["energy"] < 0.3 * table["generator at init"]["energy"], table


def test_bad_arguments_fail_before_training(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    for flags, message in [(["--alpha", "1.0", "--beta", "0.9"], "alpha = 1 requires beta = 1"),
                           (["--gamma", "0"], "gamma must be in"), (["--nfe", "0"], "must be positive")]:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "toy2d.py"), "--out", str(tmp_path), *flags],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
