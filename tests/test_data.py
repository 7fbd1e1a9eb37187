import sys
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    CLASSES, SHEET_EXTENSIONS, SHEET_TYPES, FolderSheets, InfiniteSampler, TileDataset,
    cut_region, make_loader, multi_crop, open_sheets, random_crop, to_grayscale,
)
from eval_probe import load_labeled_folder  # noqa: E402
from sheetgen import DEFAULT_PX_PER_M, SyntheticSheets, render_sheet, synthetic_probe_set  # noqa: E402

INK_CLASSES = range(1, len(CLASSES))


@pytest.fixture(scope="module")
def sheets():
    """Three clean sheets of each type."""
    return [render_sheet(np.random.default_rng([7, k]), t, scan=0.0) + (t,) for t in SHEET_TYPES for k in range(3)]


def _lines_sheet(h=1200, w=1200, ink_box=(0, 0, 300, 300), seed=0):
    img = Image.new("L", (w, h), 255)
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = ink_box
    for _ in range(80):
        d.line([tuple(rng.uniform((x0, y0), (x1, y1))), tuple(rng.uniform((x0, y0), (x1, y1)))], fill=0, width=2)
    a = np.array(img)
    return dict(image=a, label=None, ink=a < 128, sheet_type=-1, name="lines")


# ------------------------------------------------------------------------------ synthetic sheets
def test_synthetic_deterministic_by_seed_and_index():
    a, b = SyntheticSheets(seed=3).get_sheet(5), SyntheticSheets(seed=3).get_sheet(5)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert np.array_equal(a["ink"], b["ink"])
    c = SyntheticSheets(seed=3).get_sheet(6)
    d = SyntheticSheets(seed=4).get_sheet(5)
    e = SyntheticSheets(seed=3, split="probe_val").get_sheet(5)
    for other in (c, d, e):
        assert a["image"].shape != other["image"].shape or not np.array_equal(a["image"], other["image"])
    ds1 = TileDataset(SyntheticSheets(seed=3), seed=3, tiles_per_sheet=4)
    ds2 = TileDataset(SyntheticSheets(seed=3), seed=3, tiles_per_sheet=4)
    t1, t2, t3 = ds1[9], ds2[9], ds1[10]
    assert torch.equal(t1["image"], t2["image"]) and torch.equal(t1["label"], t2["label"])
    assert not torch.equal(t1["image"], t3["image"])


def test_sheet_sizes_scale_and_types(sheets):
    for img, lab, ink, _ in sheets:
        assert img.dtype == np.uint8 and lab.dtype == np.uint8 and ink.dtype == bool
        assert img.shape == lab.shape == ink.shape and 1000 <= min(img.shape) and max(img.shape) <= 2100
        assert lab.max() < len(CLASSES)
        assert ink.mean() < 0.15 and 0.45 < (lab == 0).mean() < 0.97  # mostly empty paper
    assert DEFAULT_PX_PER_M[0] * 0.15 >= 12  # the thinnest wall is >= 12 px thick


def test_every_class_appears(sheets):
    seen = set()
    for _, lab, _, _ in sheets:
        seen |= set(np.unique(lab).tolist())
    assert seen == set(range(len(CLASSES)))


def test_labels_sit_under_ink(sheets):
    for img, lab, ink, t in sheets:
        # every drawn pixel belongs to some element's footprint
        assert (ink & (lab == 0)).sum() <= 0.002 * ink.sum(), t
        for k in INK_CLASSES:
            m = lab == k
            if m.sum() > 500:  # a footprint holds ink of its element (not an empty box)
                assert ink[m].mean() > 0.01, (t, CLASSES[k])
        assert ink.mean() > 0.01


def test_walls_are_thick_in_plans(sheets):
    # erode the wall mask with a 9 px box: wall footprints survive (>= 12 px thick)
    for img, lab, _, t in sheets:
        if t != "plan":
            continue
        w = torch.from_numpy((lab == 1).astype(np.float32))[None, None]
        eroded = -torch.nn.functional.max_pool2d(-w, 9, 1, 4)
        assert eroded.sum() > 0.2 * w.sum()


# --------------------------------------------------------------------------------- crops / views
def test_crop_at_native_scale_is_the_sheet_region():
    sh = SyntheticSheets(seed=1).get_sheet(0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        v = random_crop(sh, rng, 224)
        x0, y0, side = v["box"].tolist()
        assert side == 224 and v["image"].shape == (1, 224, 224) and v["image"].dtype == torch.float32
        assert np.array_equal((v["image"][0].numpy() * 255).round().astype(np.uint8), sh["image"][y0:y0 + 224, x0:x0 + 224])
        assert np.array_equal(v["label"].numpy(), sh["label"][y0:y0 + 224, x0:x0 + 224])


def test_scale_jitter_keeps_labels_aligned():
    # blocks of constant class; the image encodes the class as gray level 20*k
    rng = np.random.default_rng(0)
    lab = np.kron(rng.integers(0, 9, (40, 40)), np.ones((37, 37), np.int64)).astype(np.uint8)
    sh = dict(image=(255 - 20 * lab).astype(np.uint8), label=lab, ink=None, sheet_type=-1, name="blocks")
    for scale in ((0.6, 0.7), (1.5, 2.5)):
        v = random_crop(sh, rng, 128, scale, min_ink=0)
        x0, y0, side = v["box"].tolist()
        assert side != 128
        decoded = np.rint((255 - v["image"][0].numpy() * 255) / 20)
        agree = (decoded == v["label"].numpy()).mean()
        assert agree > 0.93, agree  # only block borders blend under bilinear resampling
        assert v["label"].numpy().max() <= 8
        ref = np.asarray(Image.fromarray(lab[y0:y0 + side, x0:x0 + side]).resize((128, 128), Image.NEAREST))
        assert np.array_equal(v["label"].numpy(), ref)


def test_hires_crop_is_the_same_region():
    sh = SyntheticSheets(seed=2).get_sheet(1)
    v = random_crop(sh, np.random.default_rng(3), 112, (1.5, 2.0), hires=True, contrast=0.0)
    hr = v["image_hr"]
    assert hr.shape == (1, 224, 224)
    down = torch.nn.functional.avg_pool2d(hr[None], 2)[0]
    assert (down - v["image"]).abs().mean() < 0.03


def test_multi_crop_shapes():
    sh = SyntheticSheets(seed=2).get_sheet(2)
    out = multi_crop(sh, np.random.default_rng(0), n_global=2, global_size=64, n_local=3, local_size=32, hires=True,
                     line_weight=1.0, contrast=0.3, noise=0.05)
    assert out["global"].shape == (2, 1, 64, 64) and out["local"].shape == (3, 1, 32, 32)
    assert out["global_hr"].shape == (2, 1, 128, 128) and out["global_label"].shape == (2, 64, 64)
    assert 0 <= out["global"].min() and out["global"].max() <= 1


def test_line_weight_jitter_thickens_or_thins():
    sh = _lines_sheet(ink_box=(0, 0, 1200, 1200))
    darker = []
    for seed in range(8):
        v = random_crop(sh, np.random.default_rng(seed), 128, min_ink=0, line_weight=1.0)
        base = random_crop(sh, np.random.default_rng(seed), 128, min_ink=0)
        assert torch.equal(v["box"], base["box"])
        darker.append(float(base["image"].mean() - v["image"].mean()))
    assert max(darker) > 0.02 and min(darker) < -0.02  # some crops thickened, some thinned


def test_ink_aware_sampling_rejects_blank_tiles():
    sh = _lines_sheet(ink_box=(0, 0, 500, 500))  # ink only in the top-left corner
    rng = np.random.default_rng(0)
    fr = []
    for _ in range(20):
        x0, y0, side = cut_region(sh, rng, 224, min_ink=0.02, max_tries=40)
        fr.append(sh["ink"][max(y0, 0):y0 + side, max(x0, 0):x0 + side].sum() / side ** 2)
    assert min(fr) >= 0.02
    blind = [cut_region(sh, rng, 224, min_ink=0) for _ in range(20)]
    assert sum(sh["ink"][y:y + s, x:x + s].mean() < 0.02 for x, y, s in blind) >= 10


def test_small_image_is_padded_with_white():
    a = np.full((40, 60), 255, np.uint8)
    a[10:20, 10:50] = 0
    sh = dict(image=a, label=None, ink=a < 128, sheet_type=-1, name="small")
    v = random_crop(sh, np.random.default_rng(0), 224)
    im = v["image"][0]
    assert im.shape == (224, 224) and (im == 0).sum() == 400 and (im == 1).sum() == 224 * 224 - 400


# ------------------------------------------------------------------------------------ real files
def _good_png(path, size=(400, 300)):
    im = Image.new("L", size, 255)
    ImageDraw.Draw(im).rectangle((50, 50, 200, 150), outline=0, width=3)
    im.save(path)
    return path


def test_bad_files_skipped_with_one_warning_each(tmp_path):
    (tmp_path / "sub").mkdir()
    _good_png(tmp_path / "sub" / "good.png")
    (tmp_path / "zero.png").write_bytes(b"")
    data = (tmp_path / "sub" / "good.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    (tmp_path / "readme.txt").write_text("ignored: not a sheet extension")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        src = FolderSheets(tmp_path, seed=0)
        names = {src.get_sheet(k)["name"] for k in range(30)}
    assert names == {str(Path("sub") / "good.png")}
    msgs = [str(x.message) for x in w]
    for bad in ("zero.png", "trunc.png", "notes.jpg"):
        assert sum(bad in m for m in msgs) == 1, (bad, msgs)
    assert not any("good.png" in m or "readme" in m for m in msgs)
    sh = src.get_sheet(0)
    assert sh["image"].shape == (300, 400) and sh["ink"].sum() > 0 and sh["label"] is None


def test_empty_folder_error_names_folder_and_extensions(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as e:
        FolderSheets(tmp_path)
    assert str(tmp_path) in str(e.value) and all(ext in str(e.value) for ext in SHEET_EXTENSIONS)


def test_pdf_pages_are_sheets(tmp_path):
    pytest.importorskip("pypdfium2")
    p1, p2 = Image.new("L", (300, 200), 255), Image.new("L", (200, 300), 255)
    ImageDraw.Draw(p1).rectangle((10, 10, 100, 100), fill=0)
    p1.save(tmp_path / "set.pdf", save_all=True, append_images=[p2], resolution=100)
    src = FolderSheets(tmp_path, dpi=200)
    assert len(src) == 2
    pages = {}
    for k in range(20):
        sh = src.get_sheet(k)
        pages[sh["name"]] = sh["image"]
    assert set(pages) == {"set.pdf#1", "set.pdf#2"}
    a = pages["set.pdf#1"]
    assert a.shape == (400, 600)  # 3 x 2 inches at 200 dpi
    assert a[40:180, 40:180].mean() < 40 and a[300:, 300:].mean() > 230


def test_pdf_without_pypdfium2_says_how_to_install(tmp_path, monkeypatch):
    Image.new("L", (50, 50), 255).save(tmp_path / "a.pdf")
    monkeypatch.setitem(sys.modules, "pypdfium2", None)
    with pytest.raises(ImportError, match="pip install pypdfium2"):
        FolderSheets(tmp_path)


def test_16bit_tiff_rgba_and_modes(tmp_path):
    a = np.full((64, 80), 65535, np.uint16)
    a[:, :20] = 0
    a[:, 20:40] = 32896
    Image.fromarray(a).save(tmp_path / "deep.tif")
    rgba = Image.new("RGBA", (80, 64), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((0, 0, 19, 63), fill=(0, 0, 0, 255))
    ImageDraw.Draw(rgba).rectangle((20, 0, 39, 63), fill=(0, 0, 0, 128))
    rgba.save(tmp_path / "alpha.png")
    src = FolderSheets(tmp_path)
    got = {src.get_sheet(k)["name"]: src.get_sheet(k)["image"] for k in range(20)}
    for name in ("deep.tif", "alpha.png"):
        g = got[name]
        assert g.dtype == np.uint8 and g.shape == (64, 80)
        assert g[:, :20].max() == 0 and g[:, 60:].min() == 255 and abs(int(g[5, 30]) - 128) <= 2, name
    base = Image.new("L", (80, 64), 255)
    ImageDraw.Draw(base).rectangle((0, 0, 19, 63), fill=0)
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"):
        im = base.convert(mode) if mode not in ("I", "F") else Image.fromarray(np.asarray(base).astype(np.int32 if mode == "I" else np.float32) * (257 if mode == "I" else 1 / 255))
        g = to_grayscale(im)
        assert g.dtype == np.uint8 and g[:, :20].max() <= 2 and g[:, 20:].min() >= 253, mode


def test_exif_orientation_honoured(tmp_path):
    im = Image.new("RGB", (120, 60), "white")
    ImageDraw.Draw(im).rectangle((0, 0, 30, 59), fill="black")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "photo.jpg", exif=exif)
    g = FolderSheets(tmp_path).get_sheet(0)["image"]
    assert g.shape == (120, 60) and g[:25].mean() < 40 and g[40:].mean() > 200


def test_multipage_tiff_gives_several_sheets(tmp_path):
    frames = [Image.new("L", (100 + 10 * k, 80), 255) for k in range(3)]
    frames[0].save(tmp_path / "multi.tiff", save_all=True, append_images=frames[1:])
    src = FolderSheets(tmp_path)
    assert len(src) == 3
    shapes = {src.get_sheet(k)["name"]: src.get_sheet(k)["image"].shape for k in range(30)}
    assert shapes == {"multi.tiff#1": (80, 100), "multi.tiff#2": (80, 110), "multi.tiff#3": (80, 120)}


def test_open_sheets_and_folder_tiles(tmp_path):
    _good_png(tmp_path / "a.png", (900, 700))
    assert isinstance(open_sheets("synthetic", seed=0), SyntheticSheets)
    ds = TileDataset(open_sheets(str(tmp_path), seed=0), partial(random_crop, size=128), seed=0)
    item = ds[3]
    assert item["image"].shape == (1, 128, 128) and "label" not in item and item["sheet_type"] == -1
    assert (item["image"] < 0.5).float().mean() >= 0.02


# ------------------------------------------------------------------------------ sampling / loader
def test_infinite_sampler_sharding_and_resume():
    B, world, steps = 4, 2, 5
    single = iter(InfiniteSampler(start=0, block=B * world))
    ranks = [iter(InfiniteSampler(start=0, rank=r, world_size=world, block=B)) for r in range(world)]
    strided = [iter(InfiniteSampler(start=0, rank=r, world_size=world)) for r in range(world)]
    for k in range(steps):
        want = {next(single) for _ in range(B * world)}
        assert want == set(range(k * B * world, (k + 1) * B * world))
        got = [[next(it) for _ in range(B)] for it in ranks]
        assert set(got[0]) | set(got[1]) == want and not set(got[0]) & set(got[1])
        assert got[0] == list(range(k * 8, k * 8 + 4))  # contiguous per-rank batches
        assert {next(it) for it in strided for _ in range(B)} == want
    first = [next(iter(InfiniteSampler(start=0, rank=1, world_size=2))) for _ in range(1)]
    assert first == [1]
    resumed = iter(InfiniteSampler(start=3 * B * world, rank=1, world_size=world, block=B))
    fresh = iter(InfiniteSampler(start=0, rank=1, world_size=world, block=B))
    tail = [next(fresh) for _ in range(6 * B)][3 * B:]
    assert [next(resumed) for _ in range(3 * B)] == tail


def test_make_loader_resumes_exactly():
    ds = TileDataset(SyntheticSheets(seed=5), partial(random_crop, size=64), seed=5, tiles_per_sheet=8)
    full = iter(make_loader(ds, 4, num_workers=0))
    batches = [next(full) for _ in range(3)]
    assert batches[0]["image"].shape == (4, 1, 64, 64) and batches[0]["label"].dtype == torch.int64
    assert batches[2]["index"].tolist() == [8, 9, 10, 11]
    resumed = next(iter(make_loader(ds, 4, start=2 * 4, num_workers=0)))
    assert torch.equal(resumed["image"], batches[2]["image"])
    r1 = next(iter(make_loader(ds, 2, start=8, rank=1, world_size=2, num_workers=0)))
    assert r1["index"].tolist() == [10, 11] and torch.equal(r1["image"], batches[2]["image"][2:])


# ------------------------------------------------------------------------------- labeled folders
def _labeled(root, names=("a", "b", "c"), size=(64, 48), mask_size=None, value=2):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nwall\ndoor\n")
    for n in names:
        _good_png(root / "images" / f"{n}.png", size)
        m = np.zeros(mask_size or size, np.uint8).T.copy()
        m[5:10, 5:10], m[0, 0] = value, 255
        Image.fromarray(m).save(root / "masks" / f"{n}.png")


def test_labeled_folder_hash_split_and_subfolders(tmp_path):
    names = [f"sheet{i:02d}" for i in range(40)]
    _labeled(tmp_path / "flat", names)
    classes, splits = load_labeled_folder(tmp_path / "flat")
    assert classes == ["background", "wall", "door"]
    tr, va = [n for n, _, _ in splits["train"]], [n for n, _, _ in splits["val"]]
    assert sorted(tr + va) == names and 4 <= len(va) <= 18
    assert [n for n, _, _ in load_labeled_folder(tmp_path / "flat")[1]["val"]] == va
    name, img, mask = splits["train"][0]
    assert img.shape == mask.shape == (48, 64) and mask.dtype == np.uint8 and mask[0, 0] == 255
    _labeled(tmp_path / "sub" / "train", ["x", "y"])
    _labeled(tmp_path / "sub" / "val", ["z"])
    (tmp_path / "sub" / "classes.txt").write_text("bg\nwall\ndoor\n")
    _, sp = load_labeled_folder(tmp_path / "sub")
    assert [n for n, _, _ in sp["train"]] == ["x", "y"] and [n for n, _, _ in sp["val"]] == ["z"]


def test_labeled_folder_errors_name_the_file(tmp_path):
    _labeled(tmp_path / "size", mask_size=(60, 48))
    with pytest.raises(ValueError, match=r"masks[/\\]a\.png"):
        load_labeled_folder(tmp_path / "size")
    _labeled(tmp_path / "missing")
    (tmp_path / "missing" / "masks" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"images[/\\]b\.png"):
        load_labeled_folder(tmp_path / "missing")
    _labeled(tmp_path / "range", value=7)
    _, sp = load_labeled_folder(tmp_path / "range")
    item = sp["train"] if len(sp["train"]) else sp["val"]
    with pytest.raises(ValueError, match=r"masks[/\\][abc]\.png.*class id 7"):
        item[0]


def test_synthetic_probe_set():
    val = synthetic_probe_set("val", 12, tile=224, seed=0)
    assert len(val) == 12
    for img, mask, t in val:
        assert img.shape == mask.shape == (224, 224) and img.dtype == mask.dtype == np.uint8
        assert (img < 192).mean() >= 0.02 and mask.max() < len(CLASSES) and 0 <= t < len(SHEET_TYPES)
    again = synthetic_probe_set("val", 12, tile=224, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(val, again))
    train = synthetic_probe_set("train", 12, tile=224, seed=0)
    assert not any(np.array_equal(a[0], b[0]) for a in val for b in train)


def test_loader_workers_match_single_process():
    ds = TileDataset(SyntheticSheets(seed=6), partial(random_crop, size=64), seed=6, tiles_per_sheet=4)
    ref = iter(make_loader(ds, 4, start=8, num_workers=0))
    par = iter(make_loader(ds, 4, start=8, num_workers=2))
    for _ in range(3):
        a, b = next(ref), next(par)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])


# ------------------------------------------------------------------------------ mixed sources

def test_mixed_sources_follow_their_weights_and_are_deterministic(tmp_path):
    from common import MixedSheets, check_data, split_mix
    _good_png(tmp_path / "real.png")
    assert split_mix("synthetic") is None and split_mix(str(tmp_path)) is None
    assert split_mix(f"synthetic@3+{tmp_path}@1") == [("synthetic", 3.0), (str(tmp_path), 1.0)]
    assert split_mix(f"synthetic+{tmp_path}") == [("synthetic", 1.0), (str(tmp_path), 1.0)]
    src = open_sheets(f"synthetic@3+{tmp_path}@1", seed=0)
    assert isinstance(src, MixedSheets)
    names = [src.get_sheet(k)["name"] for k in range(400)]
    real = sum(n == "real.png" for n in names)
    assert 70 <= real <= 130  # 1 in 4 of 400 sheets: 100 expected, binomial sd 8.7
    # the synthetic ones are the generator's own sheet k, and the stream is a function of (seed, k)
    k = next(k for k, n in enumerate(names) if n != "real.png")
    assert names[k] == f"synthetic/train/0/{k}"
    assert [open_sheets(f"synthetic@3+{tmp_path}@1", seed=0).get_sheet(j)["name"] for j in range(50)] == names[:50]
    # a weight of 0 for the generator leaves only the folder
    assert check_data(f"synthetic@0+{tmp_path}") is not None


def test_mixed_source_errors_name_the_bad_part(tmp_path):
    from common import check_data
    _good_png(tmp_path / "real.png")
    assert check_data(f"synthetic+{tmp_path}") is None
    assert "nope" in check_data(f"synthetic+{tmp_path}/nope")
    assert "positive number" in check_data(f"synthetic@x+{tmp_path}")
    assert "empty source" in check_data(f"synthetic++{tmp_path}")
    # a folder whose own name holds '+' is one source
    plus = tmp_path / "a+b"
    plus.mkdir()
    _good_png(plus / "s.png")
    assert check_data(str(plus)) is None and open_sheets(str(plus), seed=0).get_sheet(0)["name"] == "s.png"
