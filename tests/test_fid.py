"""fid.py: Frechet distance in closed form, TensorFlow 1's resize, the pytorch-fid weight layout,
end-to-end runs with random weights, and the error paths. CPU, no download.

Graders by name: `pytest -k frechet_distance` (closed forms of the Frechet distance), `pytest -k resize_tf1`
(TensorFlow 1's bilinear rule, against a per-pixel loop and a ramp's closed form). Their references never
call another function of fid.py."""
import errno
import io
import hashlib
import math
import os
import struct
import subprocess
import sys
import urllib.error
import zlib

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fid  # noqa: E402


def random_spd(d, rng):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Frechet distance
@pytest.mark.ex10
def test_frechet_distance_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.standard_normal(6), rng.standard_normal(6), random_spd(6, rng)
    got, expected = fid.frechet_distance(mu1, sigma, mu2, sigma), np.sum((mu1 - mu2) ** 2)
    assert got == pytest.approx(expected, abs=1e-8), \
        f"equal covariances: got {got:.8f}, expected ||mu1 - mu2||^2 = {expected:.8f}"


@pytest.mark.ex10
def test_frechet_distance_diagonal_covariances_closed_form():
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for sigma1 = diag(a), sigma2 = diag(b)
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10), \
        f"diagonal covariances: got {got:.8f}, expected ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2 = {expected:.8f}"


@pytest.mark.ex10
def test_frechet_distance_scaled_full_covariance_closed_form():
    # sigma2 = c^2 sigma1 gives (sigma1 sigma2)^(1/2) = c sigma1, so d^2 = (1 - c)^2 Tr(sigma1)
    rng = np.random.default_rng(2)
    mu, sigma, c = rng.standard_normal(7), random_spd(7, rng), 2.5
    expected = (1 - c) ** 2 * np.trace(sigma)
    got = fid.frechet_distance(mu, sigma, mu, c ** 2 * sigma)
    assert got == pytest.approx(expected, rel=1e-8), \
        f"sigma2 = c^2 sigma1: got {got:.8f}, expected (1 - c)^2 Tr(sigma1) = {expected:.8f}"


@pytest.mark.ex10
def test_frechet_distance_non_commuting_2x2_closed_form():
    # for 2 x 2 M = sigma1 sigma2 (eigenvalues l1, l2 > 0): Tr M^(1/2) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr M + 2 sqrt(det M));
    # the two covariances do not commute, so Tr(sigma1^(1/2) sigma2^(1/2)) is another number
    s1, s2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[1.0, -0.4], [-0.4, 0.5]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([-0.2, 0.5])
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.5, "the oracle's covariances must not commute"
    m = s1 @ s2
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * math.sqrt(np.trace(m) + 2 * math.sqrt(
        np.linalg.det(m)))
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-10), (
        f"non-commuting 2 x 2 covariances: got {got:.8f}, expected {expected:.8f} from Tr (sigma1 sigma2)^(1/2) = "
        "sqrt(tr M + 2 sqrt(det M))")


@pytest.mark.ex10
def test_frechet_distance_of_a_gaussian_with_itself_is_zero():
    # Tr(sigma + sigma - 2 (sigma sigma)^(1/2)) = 0, here with eigenvalues spread over four decades
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    mu, sigma = rng.standard_normal(16), q @ np.diag(np.logspace(-2, 2, 16)) @ q.T
    got = fid.frechet_distance(mu, sigma, mu, sigma)
    assert abs(got) < 1e-8, f"a Gaussian against itself: got {got:.3g}, expected 0"


@pytest.mark.ex10
def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(4)
    mu1, mu2, s1, s2 = rng.standard_normal(8), rng.standard_normal(8), random_spd(8, rng), random_spd(8, rng)
    d12, d21 = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    assert d12 > 0.1 and d12 == pytest.approx(d21, rel=1e-9), \
        f"symmetry: d(1, 2) = {d12:.8f}, d(2, 1) = {d21:.8f}; expected equal and > 0.1"


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's own note on the singular product
def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite():
    # a nilpotent Jordan block has no square root (sqrtm returns inf); with eps on the diagonals
    # Tr((sigma1 + eps) (sigma2 + eps))^(1/2) = 2 sqrt(eps (1 + eps))
    sigma1, sigma2, eps = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), 1e-6
    with pytest.warns(UserWarning, match="not finite"):
        d = fid.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2, eps=eps)
    assert d == pytest.approx(2 - 4 * math.sqrt(eps * (1 + eps)), rel=1e-6)


def test_frechet_arguments_not_psd_rejected():
    # diag(1, -1) is no covariance: its square root has the imaginary entry i on the diagonal
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_frechet_arguments_mismatched_shapes_rejected():
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_frechet_arguments_nan_or_inf_rejected(bad):
    # never a NaN FID (issue D6): non-finite statistics are an error, not a number
    for i in range(4):
        args = [np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)]
        args[i] = args[i].copy()
        args[i][0] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            fid.frechet_distance(*args)


# ----------------------------------------------------------------------------- statistics
def test_stats_of_two_samples_is_their_midpoint_and_half_outer_difference():
    # with N - 1: the covariance of {a, b} is (a - b)(a - b)^T / 2
    a, b = np.array([1.0, 2.0, -1.0]), np.array([3.0, -2.0, 0.0])
    with pytest.warns(UserWarning, match="rank-deficient"):
        mu, sigma = fid.stats(np.stack([a, b]))
    np.testing.assert_allclose(mu, (a + b) / 2)
    np.testing.assert_allclose(sigma, np.outer(a - b, a - b) / 2)
    assert mu.dtype == sigma.dtype == np.float64


def test_stats_rejects_fewer_than_two_samples_and_non_finite_features():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        fid.stats(np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, 1.0]]))


def test_stats_file_round_trip_and_missing_keys(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(4), random_spd(4, rng)
    fid.save_stats(tmp_path / "s.npz", mu, sigma)
    mu2, sigma2 = fid.load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert os.listdir(tmp_path) == ["s.npz"]  # no temporary file left behind
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(KeyError, match="mu and sigma"):
        fid.load_stats(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- the input pipeline
def test_to_uint8_clips_maps_by_127_5_plus_128_and_truncates():
    x = torch.tensor([-2.0, -1.0, -1 + 1 / 127.5, -0.5, 0.0, 0.5, 0.999, 1.0, 3.0])
    # x * 127.5 + 128 = 0.5, 1.5, 64.25, 128, 191.75, 255.37, 255.5 after clipping, then truncated
    assert fid.to_uint8(x).tolist() == [0, 0, 1, 64, 128, 191, 255, 255, 255]
    with pytest.raises(TypeError):
        fid.to_uint8(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-finite"):
        fid.to_uint8(torch.tensor([0.0, float("nan")]))


def tf1_resize_loop(img, size):
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres) of (H, W), one pixel at a time."""
    h, w = img.shape
    out = np.zeros((size, size))
    for i in range(size):
        y = i * h / size
        y0 = math.floor(y)
        y1, dy = min(y0 + 1, h - 1), y - y0
        for j in range(size):
            x = j * w / size
            x0 = math.floor(x)
            x1, dx = min(x0 + 1, w - 1), x - x0
            top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
            bottom = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
            out[i, j] = top * (1 - dy) + bottom * dy
    return out


@pytest.mark.ex9
@pytest.mark.parametrize("h, w, size", [(5, 7, 9), (8, 6, 3), (32, 32, 299)])
def test_resize_tf1_matches_per_pixel_loop_of_tf1_rule(h, w, size):
    img = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
    out = fid.resize_tf1(img.float(), size)
    assert out.shape == (2, 3, size, size), f"resize to {size}: got shape {tuple(out.shape)}"
    for b, c in [(0, 0), (1, 2)]:
        expected = tf1_resize_loop(img[b, c].double().numpy(), size)
        np.testing.assert_allclose(out[b, c].numpy(), expected, atol=1e-3,  # float32 on a 0..255 scale
                                   err_msg=f"{h} x {w} -> {size}: against TF1's rule, one pixel at a time")


@pytest.mark.ex9
def test_resize_tf1_of_a_ramp_is_the_sampled_coordinate_clamped_at_the_border():
    # bilinear interpolation is exact on a linear ramp img[y, x] = x + 10 y, so output pixel (i, j) is the ramp
    # at TF1's sample point (i h / size, j w / size), clamped to the last row / column beyond it
    h, w, size = 4, 6, 10
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    out = fid.resize_tf1((x + 10 * y)[None, None].float(), size)[0, 0].double()
    i = torch.arange(size, dtype=torch.float64)
    ys, xs = (i * h / size).clamp(max=h - 1), (i * w / size).clamp(max=w - 1)
    torch.testing.assert_close(out, xs[None, :] + 10 * ys[:, None], rtol=0, atol=1e-4, msg=lambda m: (
        f"a ramp x + 10 y, {h} x {w} -> {size}: against the ramp at TF1's sample points i * in / size, clamped; {m}"))


@pytest.mark.ex9
def test_resize_tf1_is_not_interpolate_half_pixel_rule():
    # the two rules sample different coordinates, so they disagree by whole grey levels
    img = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float()
    other = torch.nn.functional.interpolate(img, size=299, mode="bilinear", align_corners=False)
    diff = float((fid.resize_tf1(img, 299) - other).abs().max())
    assert diff > 10, (f"resize_tf1 against F.interpolate's half-pixel rule: largest difference {diff:.3g} grey "
                       "levels, expected > 10 (TF1 samples i * in / size, not (i + 0.5) * in / size - 0.5)")


def test_preprocess_maps_uint8_to_network_range():
    # 299 x 299 input: the resize is the identity, then (x - 128) / 128 exactly
    img = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    img[0, 0, 0, 0], img[0, 0, 0, 1] = 0, 255
    x = fid.preprocess(img)
    assert torch.equal(x, (img.float() - 128) / 128)
    assert x[0, 0, 0, 0] == -1 and x[0, 0, 0, 1] == 127 / 128


def test_preprocess_rejects_wrong_dtype_and_shape():
    with pytest.raises(TypeError, match="uint8"):
        fid.preprocess(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="permute"):
        fid.preprocess(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fid.preprocess(torch.zeros(3, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------------------- the network
def conv_layout():
    """pytorch-fid's conv layers, name -> (c_out, c_in, kh, kw), written from the InceptionV3 architecture."""
    def a(c_in, pool):  # 35 x 35 block
        return {"branch1x1": (64, c_in, 1, 1), "branch5x5_1": (48, c_in, 1, 1), "branch5x5_2": (64, 48, 5, 5),
                "branch3x3dbl_1": (64, c_in, 1, 1), "branch3x3dbl_2": (96, 64, 3, 3),
                "branch3x3dbl_3": (96, 96, 3, 3), "branch_pool": (pool, c_in, 1, 1)}

    def c(c7):  # 17 x 17 block, 768 channels
        return {"branch1x1": (192, 768, 1, 1), "branch7x7_1": (c7, 768, 1, 1), "branch7x7_2": (c7, c7, 1, 7),
                "branch7x7_3": (192, c7, 7, 1), "branch7x7dbl_1": (c7, 768, 1, 1),
                "branch7x7dbl_2": (c7, c7, 7, 1), "branch7x7dbl_3": (c7, c7, 1, 7),
                "branch7x7dbl_4": (c7, c7, 7, 1), "branch7x7dbl_5": (192, c7, 1, 7),
                "branch_pool": (192, 768, 1, 1)}

    def e(c_in):  # 8 x 8 block
        return {"branch1x1": (320, c_in, 1, 1), "branch3x3_1": (384, c_in, 1, 1),
                "branch3x3_2a": (384, 384, 1, 3), "branch3x3_2b": (384, 384, 3, 1),
                "branch3x3dbl_1": (448, c_in, 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
                "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1),
                "branch_pool": (192, c_in, 1, 1)}

    blocks = {"Mixed_5b": a(192, 32), "Mixed_5c": a(256, 64), "Mixed_5d": a(288, 64),
              "Mixed_6a": {"branch3x3": (384, 288, 3, 3), "branch3x3dbl_1": (64, 288, 1, 1),
                           "branch3x3dbl_2": (96, 64, 3, 3), "branch3x3dbl_3": (96, 96, 3, 3)},
              "Mixed_6b": c(128), "Mixed_6c": c(160), "Mixed_6d": c(160), "Mixed_6e": c(192),
              "Mixed_7a": {"branch3x3_1": (192, 768, 1, 1), "branch3x3_2": (320, 192, 3, 3),
                           "branch7x7x3_1": (192, 768, 1, 1), "branch7x7x3_2": (192, 192, 1, 7),
                           "branch7x7x3_3": (192, 192, 7, 1), "branch7x7x3_4": (192, 192, 3, 3)},
              "Mixed_7b": e(1280), "Mixed_7c": e(2048)}
    layout = {"Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
              "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3)}
    for block, convs in blocks.items():
        layout.update({f"{block}.{name}": shape for name, shape in convs.items()})
    return layout


def pytorch_fid_state_shapes():
    """Every tensor of pytorch-fid's pt_inception-2015-12-05 file except fc and num_batches_tracked."""
    shapes = {}
    for name, (c_out, c_in, kh, kw) in conv_layout().items():
        shapes[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{k}"] = (c_out,)
    return shapes


def test_state_dict_matches_pytorch_fid_layout():
    ours = {k: tuple(v.shape) for k, v in fid.InceptionV3().state_dict().items()
            if not k.endswith("num_batches_tracked")}
    assert ours == pytorch_fid_state_shapes()
    assert len(conv_layout()) == 94


def test_parameter_count_is_the_tf_graphs():
    # 21,785,568 = conv weights + BatchNorm beta and gamma, counted in the TensorFlow graph's export
    assert sum(p.numel() for p in fid.InceptionV3().parameters()) == 21_785_568


def test_batchnorm_uses_tf_eps_and_pools_exclude_padding():
    model = fid.InceptionV3()
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(fid.avg_pool(x), x)  # corners average 4 real pixels, not 9 with zeros
    assert model.Mixed_7b.pool is fid.avg_pool and model.Mixed_7c.pool is fid.max_pool


def randomised_inception(seed=0):
    """InceptionV3 with He-initialised convs and random BatchNorm statistics: O(1) features at every depth."""
    torch.manual_seed(seed)
    model = fid.InceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A pytorch-fid-style file: our random weights plus the 1008-way fc the real file carries."""
    state = randomised_inception().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.zeros(1008)
    path = tmp_path_factory.mktemp("weights") / "pt_inception.pth"
    torch.save(state, path)
    return path


def test_weight_file_with_fc_loads_strictly_and_round_trips(weights_file):
    model = fid.load_inception(weights_file)
    assert not model.training
    saved = torch.load(weights_file, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_weight_file_without_num_batches_tracked_loads_but_unknown_keys_fail(weights_file, tmp_path):
    state = {k: v for k, v in torch.load(weights_file, weights_only=True).items() if "num_batches" not in k}
    torch.save(state, tmp_path / "old.pth")
    fid.load_inception(tmp_path / "old.pth")
    state["Mixed_8.conv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="0 missing, 1 unexpected keys .first: Mixed_8"):
        fid.load_inception(tmp_path / "bad.pth")


def test_wrong_weight_files_give_one_line_with_the_counts(weights_file, tmp_path):
    # 18 kB of key names before: now the counts, and the first offending name
    state = torch.load(weights_file, weights_only=True)
    renamed = {("x" + k if k.startswith("Mixed_5b.") else k): v for k, v in state.items()}
    n_5b = sum(k.startswith("Mixed_5b.") for k in state)  # 7 convs: 5 tensors each, plus num_batches_tracked
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError) as err:
        fid.load_inception(tmp_path / "renamed.pth")
    assert f"not pytorch-fid's FID InceptionV3 weights: {n_5b - 7} missing, {n_5b} unexpected keys" in str(err.value)
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="0 missing, 0 unexpected keys, 1 of the wrong shape"):
        fid.load_inception(tmp_path / "shape.pth")
    (tmp_path / "notes.txt").write_text("not weights\n")
    with pytest.raises(ValueError, match="as a PyTorch weight file"):
        fid.load_inception(tmp_path / "notes.txt")
    for path in (tmp_path / "renamed.pth", tmp_path / "notes.txt"):
        with pytest.raises(ValueError) as err:
            fid.load_inception(path)
        assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def two_images():
    """uint8 (2, 3, 8, 8): uniform noise and a smooth colour ramp, so their features differ."""
    noise = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    colour = torch.tensor([255.0, 128.0, 30.0])[:, None, None]
    ramp = (torch.linspace(0, 1, 8)[None, :, None] * colour).expand(3, 8, 8)
    return torch.stack([noise, ramp.to(torch.uint8)])


@pytest.fixture(scope="module")
def two_features(weights_file, two_images):
    return fid.features(fid.load_inception(weights_file), two_images, batch_size=1)


def test_features_are_float64_2048_and_independent_of_batch_size(weights_file, two_images, two_features):
    together = fid.features(fid.load_inception(weights_file), [two_images])
    assert two_features.shape == (2, 2048) and two_features.dtype == np.float64
    scale = np.abs(two_features).max()
    assert np.abs(two_features[0] - two_features[1]).max() > 0.1 * scale  # different images, different features
    np.testing.assert_allclose(together, two_features, rtol=1e-4, atol=1e-5 * scale)


def test_features_and_network_reject_misuse(weights_file):
    model = fid.load_inception(weights_file)
    with pytest.raises(ValueError, match=r"299"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="eval"):
        fid.features(model.train(), torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fid.features(model.eval(), torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------------- download
def test_offline_error_names_url_and_the_offline_option(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(fid.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as err:
        fid.load_inception(cache_dir=tmp_path)
    assert fid.WEIGHTS_URL in str(err.value) and "--inception-weights PATH" in str(err.value)
    assert os.listdir(tmp_path) == []  # no partial file


def test_download_rejects_wrong_sha256_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not the weights"))
    with pytest.raises(RuntimeError, match="SHA-256"):
        fid.load_inception(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_download_verifies_caches_and_loads(weights_file, tmp_path, monkeypatch):
    payload = weights_file.read_bytes()
    monkeypatch.setattr(fid, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(payload).hexdigest()[:8])
    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    fid.load_inception(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == ["pt_inception-2015-12-05-6726825d.pth"]
    monkeypatch.setattr(fid.urllib.request, "urlopen", None)  # a second call must not download
    model = fid.load_inception(cache_dir=tmp_path)
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight,
                       torch.load(weights_file, weights_only=True)["Mixed_7c.branch_pool.conv.weight"])


# ----------------------------------------------------------------------------- command line
def test_image_sources_png_folder_and_both_npz_layouts_agree(tmp_path):
    from PIL import Image
    images = np.random.default_rng(6).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)  # (N, H, W, 3)
    (tmp_path / "png").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "png" / f"{i:05d}.png")
    np.savez(tmp_path / "nhwc.npz", images=images)
    np.savez(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2))  # stored as arr_0
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)
    for src in ("png", "nhwc.npz", "nchw.npz"):
        assert torch.equal(fid.load_images(str(tmp_path / src)), expected), src
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.load_images(str(tmp_path / "float.npz"))


def test_cli_stats_writes_the_statistics_of_the_images(weights_file, two_images, two_features, tmp_path,
                                                      monkeypatch):
    np.savez(tmp_path / "imgs.npz", images=two_images.permute(0, 2, 3, 1).numpy())  # (N, H, W, 3)
    monkeypatch.setattr(sys, "argv", ["fid.py", "stats", str(tmp_path / "imgs.npz"), "--out",
                                      str(tmp_path / "s.npz"), "--inception-weights", str(weights_file)])
    with pytest.warns(UserWarning, match="rank-deficient"):
        fid.main()
        mu, sigma = fid.stats(two_features)
    mu_cli, sigma_cli = fid.load_stats(tmp_path / "s.npz")
    np.testing.assert_allclose(mu_cli, mu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sigma_cli, sigma, rtol=1e-4, atol=1e-6)


def test_cli_fid_between_stats_files_prints_the_closed_form_distance(tmp_path, monkeypatch, capsys):
    # diagonal covariances: |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2, computed here without fid.py
    rng = np.random.default_rng(8)
    mu1, mu2, a, b = rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.1, 3, 4), rng.uniform(0.1, 3, 4)
    np.savez(tmp_path / "a.npz", mu=mu1, sigma=np.diag(a))
    np.savez(tmp_path / "b.npz", mu=mu2, sigma=np.diag(b))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    code, out, err = cli(monkeypatch, capsys, "fid", tmp_path / "a.npz", tmp_path / "b.npz")
    assert code == 0 and out.strip() == f"FID {expected:.4f}"  # stats files need no network and no weights


# --------------------------------------------------------------------- command line: wrong input, said in one line
def cli(monkeypatch, capsys, *argv):
    """fid.main() with these arguments -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fid.py", *map(str, argv)])
    try:
        fid.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if the command line gets as far as loading the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network was loaded before the arguments were checked")
    monkeypatch.setattr(fid, "load_inception", refuse)


def write_png(path, img):
    """uint8 or uint16 (H, W) grey or (H, W, 3) RGB -> a PNG with 8 or 16 bits per channel (numpy + zlib)."""
    depth, colour = (16, img.astype(">u2")) if img.dtype == np.uint16 else (8, img)
    rows = b"".join(b"\x00" + colour[r].tobytes() for r in range(img.shape[0]))  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", img.shape[1], img.shape[0], depth, 2 if img.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_cli_never_writes_over_an_input_or_an_existing_file(tmp_path, monkeypatch, capsys, no_network):
    # D3: `stats X --out X` replaced the images X with their statistics
    np.savez(tmp_path / "imgs.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    fid.save_stats(tmp_path / "s.npz", np.zeros(2), np.eye(2))
    before = {f: (tmp_path / f).read_bytes() for f in ("imgs.npz", "s.npz")}
    for src in ("imgs.npz", "s.npz"):
        code, out, err = cli(monkeypatch, capsys, "stats", tmp_path / src, "--out", tmp_path / src, "--force")
        assert code == 1 and "is also an input" in err and err.count("\n") == 1
    fid.save_stats(tmp_path / "t.npz", np.ones(2), 2 * np.eye(2))
    code, out, err = cli(monkeypatch, capsys, "stats", tmp_path / "s.npz", "--out", tmp_path / "t.npz")
    assert code == 1 and "exists; pass --force" in err
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert fid.load_stats(tmp_path / "t.npz")[0].tolist() == [1, 1]
    code, out, err = cli(monkeypatch, capsys, "stats", tmp_path / "s.npz", "--out", tmp_path / "t.npz", "--force")
    assert code == 0 and fid.load_stats(tmp_path / "t.npz")[0].tolist() == [0, 0]


@pytest.mark.parametrize("bad", ["mu", "sigma"])
def test_cli_nan_statistics_are_an_error_never_a_nan_fid(bad, tmp_path, monkeypatch, capsys):
    # D6: `fid.py fid nan.npz s.npz` printed "FID nan" with exit status 0
    stats = {"mu": np.zeros(3), "sigma": np.eye(3)}
    stats[bad][0] = np.nan
    np.savez(tmp_path / "nan.npz", **stats)
    fid.save_stats(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    code, out, err = cli(monkeypatch, capsys, "fid", tmp_path / "nan.npz", tmp_path / "s.npz")
    assert code == 1 and out == "" and "nan.npz has NaN or inf" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="NaN or inf"):  # and no NaN reaches a stats file
        fid.save_stats(tmp_path / "out.npz", *stats.values())
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "x"),
                                         ("--n", "0"), ("--size", "-3")])
def test_cli_bad_counts_are_rejected_by_argparse(flag, value, monkeypatch, capsys, no_network):
    # D9: --batch-size 0 failed inside torch.split after loading everything; bench --n 0 printed 0.0 images/s
    code, out, err = cli(monkeypatch, capsys, "bench", flag, value)
    assert code == 2 and f"argument {flag}:" in err.splitlines()[-1]


def test_cli_checks_counts_and_out_before_the_network(tmp_path, monkeypatch, capsys, no_network):
    # D9: one image failed in stats() after the network ran; D11: --out into a missing folder failed after it
    np.savez(tmp_path / "one.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    code, out, err = cli(monkeypatch, capsys, "stats", tmp_path / "one.npz", "--out", tmp_path / "s.npz")
    assert code == 1 and "1 image; FID statistics need N >= 2" in err
    for out_path in (tmp_path / "missing" / "s.npz", tmp_path):
        code, out, err = cli(monkeypatch, capsys, "stats", tmp_path / "two.npz", "--out", out_path)
        assert code == 1 and "not a file in an existing, writable folder" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "two.npz"]


def test_png_16_bit_keeps_the_high_byte_as_tensorflow_decode_png(tmp_path):
    # D15: 16-bit grey PNGs were clipped to 255; TF's decode_png(dtype=uint8) keeps the high byte (png_set_strip_16)
    rng = np.random.default_rng(9)
    grey = rng.integers(0, 65536, (2, 4, 5), dtype=np.uint16)
    rgb = rng.integers(0, 65536, (2, 4, 5, 3), dtype=np.uint16)
    grey8 = rng.integers(0, 256, (2, 4, 5), dtype=np.uint8)
    for name, imgs, expected in [("grey16", grey, np.repeat(grey[..., None] >> 8, 3, axis=3)),
                                 ("rgb16", rgb, rgb >> 8), ("grey8", grey8, np.repeat(grey8[..., None], 3, axis=3))]:
        (tmp_path / name).mkdir()
        for i, img in enumerate(imgs):
            write_png(tmp_path / name / f"{i}.png", img)
        loaded = fid.load_images(str(tmp_path / name))
        assert loaded.dtype == torch.uint8
        np.testing.assert_array_equal(loaded.permute(0, 2, 3, 1).numpy(), expected.astype(np.uint8), err_msg=name)


def test_cli_names_text_npy_and_missing_files(tmp_path, monkeypatch, capsys, no_network):
    # D16: a text file said "pickled data ... allow_pickle", an .npy a context-manager TypeError
    (tmp_path / "notes.txt").write_text("mu 0\nsigma 1\n")
    np.save(tmp_path / "arr.npy", np.zeros((2, 4, 4, 3), np.uint8))
    fid.save_stats(tmp_path / "s.npz", np.zeros(2), np.eye(2))
    (tmp_path / "empty").mkdir()
    for src, message in [("notes.txt", "is not an .npz file"), ("arr.npy", "is an .npy array, not an .npz"),
                         ("missing.npz", "No such file"), ("empty", "no .png files")]:
        code, out, err = cli(monkeypatch, capsys, "fid", tmp_path / src, tmp_path / "s.npz")
        assert code == 1 and message in err and err.startswith("fid.py: error: ") and err.count("\n") == 1, src


def test_image_sets_warn_on_0_1_values_and_skipped_files_and_name_two_sizes(tmp_path):
    np.savez(tmp_path / "unit.npz", images=np.random.default_rng(10).integers(0, 2, (3, 4, 4, 3), dtype=np.uint8))
    with pytest.warns(UserWarning, match=r"largest pixel value is 1; FID takes uint8 in 0\.\.255"):
        fid.load_images(str(tmp_path / "unit.npz"))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for name in ("a.png", "b.PNG"):
        write_png(folder / name, np.full((4, 5, 3), 200, np.uint8))
    (folder / "notes.txt").write_text("x")
    (folder / "c.jpg").write_bytes(b"jpeg")
    (folder / "sub").mkdir()
    with pytest.warns(UserWarning, match="skipped 3 non-PNG entries: c.jpg, notes.txt, sub"):
        assert fid.load_images(str(folder)).shape == (2, 3, 4, 5)
    write_png(folder / "c.png", np.full((6, 5, 3), 200, np.uint8))
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(ValueError, match="c.png is 6x5 but a.png is 4x5"):
        fid.load_images(str(folder))


def test_failed_write_keeps_the_old_file_removes_the_partial_one_and_says_why(tmp_path, monkeypatch, capsys):
    fid.save_stats(tmp_path / "src.npz", np.zeros(2), np.eye(2))
    fid.save_stats(tmp_path / "out.npz", np.ones(2), np.eye(2))
    old = (tmp_path / "out.npz").read_bytes()

    def full_disk(f, **arrays):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fid.np, "savez", full_disk)
    code, out, err = cli(monkeypatch, capsys, "stats", tmp_path / "src.npz", "--out", tmp_path / "out.npz", "--force")
    assert code == 1 and "No space left on device" in err and "partial file was removed" in err
    assert err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["out.npz", "src.npz"] and (tmp_path / "out.npz").read_bytes() == old


def test_cli_real_write_failure_is_one_line_and_exit_status_1(tmp_path):
    # a real failing write in a real process: the file-size limit (Python ignores SIGXFSZ, so write() fails)
    resource = pytest.importorskip("resource")
    a = np.random.default_rng(11).standard_normal((200, 100))
    fid.save_stats(tmp_path / "src.npz", a.mean(0), np.cov(a, rowvar=False))  # sigma alone is 80 kB

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, fid.__file__, "stats", str(tmp_path / "src.npz"), "--out",
                        str(tmp_path / "out.npz")],
                       capture_output=True, text=True, env=env, preexec_fn=limit, timeout=300)
    assert (r.returncode, r.stdout) == (1, "") and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("fid.py: error: could not write") and "File too large" in r.stderr
    assert os.listdir(tmp_path) == ["src.npz"]
