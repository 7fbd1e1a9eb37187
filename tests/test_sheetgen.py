"""The synthetic sheet generator is a pure function of its seeds: sheets, labels and ink masks
are compared, as hashes, with values recorded from the generator before it moved out of
common.py into sheetgen.py. Any change to the order of random draws or to what is drawn shows
up here. Text rasterisation depends on Pillow and FreeType, so the values only hold with the
versions they were recorded with; with other versions the test is skipped."""
import hashlib

import numpy as np
import PIL
import pytest
from PIL import features

import common
import sheetgen

RECORDED_WITH = {"pillow": "13.0.0", "freetype2": "2.14.3"}
versions = {"pillow": PIL.__version__, "freetype2": features.version("freetype2")}
pytestmark = pytest.mark.skipif(versions != RECORDED_WITH,
                                reason=f"hashes recorded with {RECORDED_WITH}, running {versions}")

# (seed, split, index) -> (sheet_type, name, image, label, ink)
SHEETS = {
    (0, "train", 0): (0, "synthetic/train/0/0", "2f9be810a6b53521", "5899fa9922b7b604", "187ab69a284d1425"),
    (0, "train", 1): (3, "synthetic/train/0/1", "159b9130ba2a6a5d", "1a1fb27d4145bd12", "12810cda6aed2c49"),
    (0, "train", 5): (1, "synthetic/train/0/5", "c9e62dbd0967d44b", "d025fe7aa3d11d73", "29fe75d2304b76d2"),
    (0, "train", 17): (0, "synthetic/train/0/17", "d45fcfdb9c8d0f21", "09607faf89a80ae7", "9ea297d1485a4b10"),
    (0, "probe_train", 0): (3, "synthetic/probe_train/0/0", "acab2f072e9ef9ee", "bb4d6bc89bb9826a",
                            "d01b92afe5e08dfd"),
    (0, "probe_train", 1): (0, "synthetic/probe_train/0/1", "8e46556559c2ced8", "a6e88c7180bb7d74",
                            "3a29ce67405f1843"),
    (0, "probe_train", 5): (0, "synthetic/probe_train/0/5", "56af87bb3f12dd7a", "3afc7cd994ce4928",
                            "f997f4f81500d0c3"),
    (0, "probe_train", 17): (2, "synthetic/probe_train/0/17", "0ddcf803dbe79be9", "bc9aafe4fb5271ef",
                             "4d7312743a9a4465"),
    (0, "probe_val", 0): (0, "synthetic/probe_val/0/0", "6d6ae897184ab1fb", "9bb58e9403e97d95", "b46d94c8fda8e2a8"),
    (0, "probe_val", 1): (1, "synthetic/probe_val/0/1", "aaa19cff6ff699dd", "c90081d5aa5ac405", "868a4b7cea88aa65"),
    (0, "probe_val", 5): (3, "synthetic/probe_val/0/5", "9022efb1a3ab9439", "a61d62fb074728d3", "1333490f43d9c883"),
    (0, "probe_val", 17): (3, "synthetic/probe_val/0/17", "c7fa2a02e542c1d9", "261749e43d58dc48",
                           "fd6d4a0dd3202521"),
    (7, "train", 0): (0, "synthetic/train/7/0", "5ec08a9f01d18470", "090a22f159a66e64", "dad31a334fb6e67e"),
    (7, "train", 5): (0, "synthetic/train/7/5", "d7db760513904b14", "efc7c82a5a07519c", "7465146514d4e7e4"),
    (7, "probe_val", 1): (0, "synthetic/probe_val/7/1", "604f44db48a28415", "33e1af3e78e037ed", "b4a045d0cb0058aa"),
    (7, "probe_val", 17): (0, "synthetic/probe_val/7/17", "ae5e4675135e10ec", "dc0e102b18a98816",
                           "a55921854fe7247a"),
}
# (sheet_type, scan) -> hash of (image, label, ink) of render_sheet(default_rng([11, type index]), ...)
RENDERED = {
    ("plan", 0.0): "54aa55f9fe4c5651", ("plan", 1.0): "b8ed29c177680d0d",
    ("section", 0.0): "08e1a392f19cc756", ("section", 1.0): "d358dd52ff0b76d1",
    ("detail", 0.0): "aa1c2eacbca8d7f6", ("detail", 1.0): "cae43149b591908f",
    ("schedule", 0.0): "456ac24243d94bf2", ("schedule", 1.0): "42ec263dea61f7c0",
}
PROBE_VAL_4 = "a8777087f3b4e92f"  # synthetic_probe_set("val", 4): images, masks and sheet types


def digest(*arrays):
    """First 16 hex digits of sha256 over each array's dtype, shape and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def test_sheets_match_the_recorded_hashes():
    got = {}
    for seed, split, i in SHEETS:
        s = sheetgen.SyntheticSheets(seed=seed, split=split).get_sheet(i)
        got[(seed, split, i)] = (s["sheet_type"], s["name"], digest(s["image"]), digest(s["label"]),
                                 digest(s["ink"]))
    assert got == SHEETS


def test_render_sheet_matches_the_recorded_hashes_for_every_type_with_and_without_scan_noise():
    got = {}
    for t, scan in RENDERED:
        rng = np.random.default_rng([11, common.SHEET_TYPES.index(t)])
        got[(t, scan)] = digest(*sheetgen.render_sheet(rng, t, scan=scan))
    assert got == RENDERED


def test_synthetic_probe_set_matches_the_recorded_hash():
    tiles = sheetgen.synthetic_probe_set("val", 4)
    assert digest(*[a for image, mask, t in tiles for a in (image, mask, np.int64(t))]) == PROBE_VAL_4


def test_open_sheets_synthetic_is_the_generator():
    assert isinstance(common.open_sheets("synthetic", seed=0), sheetgen.SyntheticSheets)


@pytest.mark.parametrize("box", [(10, 10, 60, 15), (10, 10, 15, 60), (10, 10, 60, 60)])
def test_concrete_hatch_fits_any_box(box):
    """Concrete = dots + aggregate triangles 4 px inside the box: a box under 8 px on a side (a
    thin slab in a detail) gets the dots only instead of failing the sheet's render."""
    canvas = sheetgen.Canvas(80, 80)
    sheetgen.hatch(canvas, np.random.default_rng(0), box, 6, "concrete")
    ink = np.asarray(canvas.image) == 0
    x0, y0, x1, y1 = box
    assert ink.any() and not ink[:y0].any() and not ink[:, :x0].any()
    assert not ink[y1 + 4:].any() and not ink[:, x1 + 4:].any()
