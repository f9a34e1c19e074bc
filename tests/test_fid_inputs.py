"""fid.py on hostile image folders: sizes read from the PNG header before decoding, Pillow's bomb error
named, and only regular files read (a FIFO named x.png would block forever)."""
import os
import threading

import numpy as np
import pytest
from PIL import Image

import fid


def write_png(path, size=(4, 4), mode="RGB"):
    Image.new(mode, size, 200 if mode == "RGB" else 0).save(path)
    return str(path)


def test_a_png_larger_than_the_bound_is_refused_from_its_header(tmp_path, monkeypatch):
    # 1-bit, 5000 x 5000: a few kB on disk, 75 MB once decoded to RGB; refused before any decoding
    path = write_png(tmp_path / "big.png", (5000, 5000), mode="1")
    assert os.path.getsize(path) < 100_000
    decoded = []
    monkeypatch.setattr(Image.Image, "convert", lambda *a, **k: decoded.append(1))
    with pytest.raises(ValueError, match=r"big.png: 5000 x 5000 pixels, above the 16777216"):
        fid.read_png(path)
    assert not decoded


def test_pillows_decompression_bomb_error_names_the_file(tmp_path, monkeypatch):
    path = write_png(tmp_path / "bomb.png", (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is more than twice this: Pillow raises
    with pytest.raises(ValueError, match="bomb.png: not a readable PNG .DecompressionBombError"):
        fid.read_png(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_named_like_a_png_is_skipped_not_read(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    os.mkfifo(tmp_path / "x.png")  # opening it for reading would wait for a writer forever
    result = {}
    reader = threading.Thread(target=lambda: result.update(images=fid.load_images(str(tmp_path))), daemon=True)
    with pytest.warns(UserWarning, match="skipped 1 non-PNG entries: x.png"):
        reader.start()
        reader.join(timeout=20)
    if reader.is_alive():  # unblock the reader, then fail
        with open(tmp_path / "x.png", "wb"):
            pass
        pytest.fail("load_images blocked on a FIFO")
    assert result["images"].shape == (2, 3, 4, 4)


def test_features_bar_has_a_total_for_a_generator_of_batches(monkeypatch):
    totals = []
    real_tqdm = fid.tqdm
    monkeypatch.setattr(fid, "tqdm", lambda it, **kw: totals.append(kw.get("total")) or real_tqdm(it, **kw))

    class Flat(fid.torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = fid.torch.nn.Parameter(fid.torch.ones(1))

        def forward(self, x):
            return x.mean(dim=(2, 3)) * self.w

    batches = (fid.torch.zeros(2, 3, 8, 8, dtype=fid.torch.uint8) for _ in range(3))
    feats = fid.features(Flat().eval(), batches, total=3)
    assert feats.shape == (6, 3) and totals == [3] and np.allclose(feats, -1.0)  # (0 - 128) / 128
