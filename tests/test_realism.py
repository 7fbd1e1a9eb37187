"""scripts/realism.py: each statistic on drawn inputs whose answer is known, and the command line
on tiny folders (bad input gives one line naming the path)."""
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import realism  # noqa: E402


def blank(h=300, w=400):
    return np.full((h, w), 255, np.uint8)


@pytest.mark.parametrize("w", [1, 2, 5, 12])
def test_horizontal_line_has_its_width(w):
    img = blank()
    img[100:100 + w, 50:350] = 0
    ink = img < 192
    sw = realism.stroke_width(ink)[ink]
    assert np.median(sw) == w
    assert np.abs(sw - w).max() <= 1  # the line's ends included
    p = realism.Pool()
    p.add(img)
    s = p.summary()
    assert s["median, ink"] == w and s["p90, ink"] == w
    assert s["median, dark ink (< 128)"] == w


def test_vertical_line_and_run_lengths():
    img = blank()
    img[20:220, 30:37] = 0
    ink = img < 192
    assert realism.run_lengths(ink)[100, 33] == 7  # horizontal run through a 7 px vertical stroke
    assert realism.run_lengths(ink.T).T[100, 33] == 200
    assert realism.stroke_width(ink)[100, 33] == 7
    assert realism.stroke_width(ink)[0, 0] == 0


def test_line_spacing_is_the_gap_between_parallel_lines():
    img = blank()
    for x in range(20, 380, 10):  # 2 px vertical lines, 8 px apart
        img[:, x:x + 2] = 0
    gaps = realism.paper_gaps(img < 192)
    assert len(gaps) > 0 and np.all(gaps == 8)


def test_blank_tile_has_no_ink_and_counts_as_blank():
    img = blank(224, 448)
    img[:112, 224:] = 0  # second tile half black
    t = realism.tile_ink(img < 192)
    np.testing.assert_allclose(t, [0.0, 0.5])
    p = realism.Pool()
    p.add(img)
    assert p.summary()["blank tiles (< 2% ink) (%)"] == "50.0"
    assert len(realism.tile_ink(blank(200, 200) < 192)) == 0  # no whole tile, nothing counted


@pytest.mark.parametrize("k", [1, 3, 17])
def test_k_separate_dots_are_k_components(k):
    img = blank(200, 600)
    for j in range(k):
        x, y = 10 + 33 * j, 20 + (j % 4) * 40
        img[y:y + 3, x:x + 3] = 0
    pixels, height, width = realism.components(img < 192)
    assert len(pixels) == k
    assert np.all(pixels == 9) and np.all(height == 3) and np.all(width == 3)


def test_components_use_8_connectivity_and_merge_u_shapes():
    img = blank(50, 50)
    for i in range(10):  # two diagonal staircases, one each way: connected only through corners
        img[5 + i, 5 + i] = 0
        img[5 + i, 45 - i] = 0
    img[30:40, 10] = img[30:40, 20] = 0  # a U: two prongs joined by the bottom row
    img[39, 10:21] = 0
    pixels, height, width = realism.components(img < 192)
    assert sorted(pixels.tolist()) == [10, 10, 29]
    assert sorted(zip(height.tolist(), width.tolist())) == [(10, 10), (10, 10), (10, 11)]
    assert len(realism.components(blank(20, 20) < 192)[0]) == 0


def test_text_like_components_are_letters_not_lines():
    img = Image.fromarray(blank(120, 600))
    d = ImageDraw.Draw(img)
    d.text((20, 20), "A B C 1 2 3", fill=0, font_size=24)
    d.line([(20, 90), (580, 90)], fill=0, width=3)  # a long line: not text
    d.rectangle([500, 20, 520, 40], fill=0)  # a solid square: not text
    pixels, height, width = realism.components(np.asarray(img) < 192)
    text = realism.text_like(pixels, height, width)
    assert 4 <= text.sum() <= 6  # the letters and digits (a "1" is nearly solid and may drop out)
    assert not text[np.argmax(pixels)]


@pytest.mark.parametrize("rising,bin_deg", [(True, 45), (False, 135)])
def test_diagonal_line_lands_in_its_bin(rising, bin_deg):
    img = Image.fromarray(blank(300, 300))
    ImageDraw.Draw(img).line([(20, 280), (280, 20)] if rising else [(20, 20), (280, 280)], fill=0, width=3)
    h = realism.orientation_hist(np.asarray(img))
    assert np.argmax(h) == bin_deg // 15
    assert h[bin_deg // 15] / h.sum() > 0.5


def test_axis_lines_land_in_0_and_90_bins():
    img = blank()
    img[100:103, 20:380] = 0
    h = realism.orientation_hist(img)
    assert h[0] / h.sum() > 0.9
    h = realism.orientation_hist(img.T.copy())
    assert h[6] / h.sum() > 0.9


def test_black_and_white_image_is_all_extremes():
    img = blank()
    img[:, :100] = 0
    g = realism.grey_hist(img)
    assert g[0] + g[255] == img.size and g[0] == 300 * 100
    p = realism.Pool()
    p.add(img)
    s = p.summary()
    assert s["pixels at exactly 0 (%)"] == "25.0" and s["pixels at exactly 255 (%)"] == "75.0"
    assert s["pixels strictly between (%)"] == "0.0"
    assert s["paper median, pooled"] == 255 and s["1st percentile of all pixels, pooled"] == 0
    grey = np.full((100, 100), 240, np.uint8)
    p = realism.Pool()
    p.add(grey)
    assert p.summary()["pixels strictly between (%)"] == "100.0" and p.summary()["paper median, pooled"] == 240
    assert p.summary()["sheets with grey paper (paper median < 250) (%)"] == "100.0"


def test_bounded_downsamples_only_huge_sheets():
    img, resized = realism.bounded(blank(300, 400), 500)
    assert not resized and img.shape == (300, 400)
    img, resized = realism.bounded(blank(1000, 3000), 1500)
    assert resized and img.shape == (500, 1500)


def test_cli_writes_table_and_picture(tmp_path, capsys):
    d = tmp_path / "sheets"
    d.mkdir()
    img = blank(500, 700)
    img[100:110, 50:650] = 0
    Image.fromarray(img).save(d / "a.png")
    (d / "README.md").write_text("not a sheet")
    out, png = tmp_path / "r.md", tmp_path / "r.png"
    assert realism.main([str(d), "--out", str(out), "--png", str(png)]) == 0
    table = out.read_text()
    assert table.startswith("`python scripts/realism.py ")
    assert "| sheets analysed (of those selected) | 1 of 1 |" in table and "| median, ink | 10 |" in table
    assert Image.open(png).size == (1500, 780)


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_bad_source_is_one_line_naming_the_path(tmp_path, capsys, make):
    p = tmp_path / "x"
    if make == "empty":
        p.mkdir()
        (p / "notes.txt").write_text("no images")
    elif make == "file":
        p.write_text("hello")
    assert realism.main([str(p), "--out", str(tmp_path / "r.md"), "--png", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(p) in err and "Traceback" not in err
    assert not (tmp_path / "r.md").exists()


def test_grey_poche_is_ink_but_not_dark_ink():
    img = blank()
    img[100:130, 20:380] = 150  # a 30 px grey wall fill
    img[200:202, 20:380] = 0  # a 2 px black line
    p = realism.Pool()
    p.add(img)
    s = p.summary()
    assert s["wall-thickness proxy: commonest stroke width 4-63 px, ink (px)"] == 30
    assert s["the same, dark ink (px)"] == "-" and s["median, dark ink (< 128)"] == 2
    assert s["grey ink (128-191), share of ink (%)"] == f"{100 * 30 / 32:.1f}"


def test_cli_caps_sheets_and_time(tmp_path):
    d = tmp_path / "sheets"
    d.mkdir()
    for k in range(3):
        img = blank(300, 300)
        img[50:50 + 2 * (k + 1), 20:280] = 0
        Image.fromarray(img).save(d / f"s{k}.png")
    (d / "broken.png").write_bytes(b"not a png")  # skipped with a warning, not fatal
    out, png = tmp_path / "r.md", tmp_path / "r.png"
    with pytest.warns(RuntimeWarning, match="broken.png"):
        assert realism.main([str(d), "--max_sheets", "2", "--out", str(out), "--png", str(png)]) == 0
    assert "| sheets analysed (of those selected) | 2 of 2 |" in out.read_text()
    assert realism.main([str(d), "--budget_s", "0", "--out", str(out), "--png", str(png)]) == 0
    assert "| sheets analysed (of those selected) | 1 of 3 |" in out.read_text()
