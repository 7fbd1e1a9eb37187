"""The frozen probe: metrics by hand, probes that must succeed or fail, bad inputs, the CLI."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_probe as ep
from conftest import ROOT

C = 4  # classes of the toy problems
P = 16  # patch size


def toy_tiles(n, grid=6, seed=0, sub_patch=False):
    """n tiles of (grid*P)^2 px whose labels are constant per patch (or, with sub_patch,
    carry a second class in a corner of each patch), and features that are a fixed linear
    function of each patch's majority label plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    # classes drawn per 2x2 block of patches: label maps are regions, not a checkerboard (on a
    # checkerboard bilinear upsampling alone loses the corners where 3 other-class patches meet)
    patch_labels = torch.randint(0, C, (n, grid // 2, grid // 2), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    labels = patch_labels.repeat_interleave(P, 1).repeat_interleave(P, 2).to(torch.uint8)
    if sub_patch:  # an 8x8 quarter of every patch takes another random class: the majority is unchanged
        corner = torch.zeros(P, P, dtype=torch.bool)
        corner[:8, :8] = True
        other = (patch_labels + torch.randint(1, C, patch_labels.shape, generator=g)) % C
        other = other.repeat_interleave(P, 1).repeat_interleave(P, 2).to(torch.uint8)
        labels = torch.where(corner.repeat(grid, grid), other, labels)
    mixing = torch.randn(C, 32, generator=torch.Generator().manual_seed(123))
    feats = F_onehot(patch_labels) @ mixing + 0.05 * torch.randn(n, grid, grid, 32, generator=g)
    images = torch.full_like(labels, 255)
    sheets = [dict(name=f"t{i}", height=grid * P, width=grid * P, rows=1, cols=1, first=i, sheet_type=None) for i in range(n)]
    return feats.half(), ep.TileSet(images, labels, sheets)


def F_onehot(x):
    return torch.nn.functional.one_hot(x, C).float()


def test_iou_matches_hand_computed_confusion():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    cm = ep.confusion_matrix(pred, target, 4)
    # rows = true class, columns = predicted; the 255 pixel is not counted; class 3 absent
    assert cm.tolist() == [[2, 1, 0, 0],
                           [0, 1, 1, 0],
                           [1, 0, 1, 0],
                           [0, 0, 0, 0]]
    r = ep.iou_from_confusion(cm)
    # IoU0 = 2 / (3 + 3 - 2), IoU1 = 1 / (2 + 2 - 1), IoU2 = 1 / (2 + 2 - 1); class 3 -> NaN, not averaged
    assert r["iou"][:3] == pytest.approx([0.5, 1 / 3, 1 / 3])
    assert math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 7)


def test_patch_majority_and_oracle_by_hand():
    lab = torch.zeros(1, 2, 4, dtype=torch.uint8)  # two 2x2 patches
    lab[0, :, :2] = torch.tensor([[1, 1], [1, 2]])  # majority 1
    lab[0, :, 2:] = torch.tensor([[255, 255], [255, 255]])  # nothing labeled
    assert ep.patch_majority(lab, 2, 3).tolist() == [[[1, 255]]]
    ts = ep.TileSet(torch.full((1, 2, 4), 255, dtype=torch.uint8), lab, [])
    o = ep.oracle_ceiling(ts, 2, ["a", "b", "c"])
    # 3 of 4 labeled pixels right: IoU(b) = 3/4, IoU(c) = 0, a absent -> mIoU 3/8
    assert o["miou"] == pytest.approx(0.375)


def test_linear_function_of_labels_is_solved():
    ftr, tr = toy_tiles(24, seed=0)
    fva, va = toy_tiles(12, seed=1)
    classes = list("abcd")
    probe = ep.train_dense_probe(ftr, tr.masks, C)
    r = ep.evaluate(probe, fva, va, classes)
    assert r["miou"] > 0.97 and r["patch_miou"] > 0.99
    assert ep.oracle_ceiling(va, P, classes)["miou"] == pytest.approx(1.0)


def test_labels_varying_inside_a_patch_reach_the_oracle_ceiling():
    ftr, tr = toy_tiles(24, seed=0, sub_patch=True)
    fva, va = toy_tiles(12, seed=1, sub_patch=True)
    classes = list("abcd")
    oracle = ep.oracle_ceiling(va, P, classes)["miou"]
    assert 0.5 < oracle < 0.9  # the corners cost the oracle something
    r = ep.evaluate(ep.train_dense_probe(ftr, tr.masks, C), fva, va, classes)
    assert r["miou"] == pytest.approx(oracle, abs=0.03)


def test_shuffled_labels_give_chance():
    ftr, tr = toy_tiles(24, seed=0)
    fva, va = toy_tiles(12, seed=1)
    shuffled = tr.masks[torch.randperm(len(tr.masks), generator=torch.Generator().manual_seed(0))]
    r = ep.evaluate(ep.train_dense_probe(ftr, shuffled, C), fva, va, list("abcd"))
    # 4 balanced classes: a constant guess scores 0.0625, a uniform random guess 1/7
    assert r["miou"] < 0.2


def test_ignore_index_is_honoured():
    ftr, tr = toy_tiles(24, seed=0)
    fva, va = toy_tiles(12, seed=1)
    classes = list("abcd")
    # training: half of every tile is 255 and its features are noise -> same task learned,
    # and the class prior counts only labeled pixels
    hidden = tr.masks.clone()
    hidden[:, :, :48] = 255
    noisy = ftr.clone()
    noisy[:, :, :3] = torch.randn(noisy[:, :, :3].shape).half()
    probe = ep.train_dense_probe(noisy, hidden, C)
    k = ep.LABEL_STRIDE
    seen = hidden[:, k // 2::k, k // 2::k]
    prior = torch.bincount(seen[seen != 255].long(), minlength=C).double()
    assert torch.allclose(probe.log_prior, ((prior + 1) / (prior.sum() + C)).log().float())
    assert ep.evaluate(probe, fva, va, classes)["miou"] > 0.95
    # evaluation: wrong labels hurt, the same pixels marked 255 do not
    base = ep.evaluate(probe, fva, va, classes)["miou"]
    wrong = va.masks.clone()
    wrong[:, :8] = (wrong[:, :8] + 1) % C
    assert ep.evaluate(probe, fva, ep.TileSet(va.images, wrong, va.sheets), classes)["miou"] < base - 0.05
    wrong[:, :8] = 255
    assert ep.evaluate(probe, fva, ep.TileSet(va.images, wrong, va.sheets), classes)["miou"] >= base - 0.005


def test_sheets_of_any_size_are_tiled_and_stitched_back():
    """A 100x230 sheet (not a multiple of the tile) is padded, cut into 32 px tiles, and its
    predictions stitched back and cropped: identical to cutting it into 128 px tiles, and
    near perfect for features that encode each patch's label."""
    rng = np.random.default_rng(0)
    mask = np.kron(rng.integers(0, C, (4, 8)), np.ones((2 * P, 2 * P), np.int64))[:100, :230].astype(np.uint8)
    items = [dict(name="sheet", image=np.full((100, 230), 255, np.uint8), mask=mask)]
    probe = ep.LinearProbe(torch.zeros(C), torch.ones(C), torch.zeros(C), 0.0)
    probe.linear.weight.data.copy_(torch.eye(C))
    probe.linear.bias.data.zero_()
    maps = []
    for tile, rows, cols in [(32, 4, 8), (128, 1, 2)]:
        ts = ep.tile_sheets(items, C, tile=tile)
        s = ts.sheets[0]
        assert (s["rows"], s["cols"], s["height"], s["width"], len(ts.images)) == (rows, cols, 100, 230, rows * cols)
        assert torch.equal(ep.stitch(ts.masks, rows, cols)[0, :100, :230], torch.from_numpy(mask))
        major = ep.patch_majority(ts.masks, P, C)  # padding patches -> 255 -> zero features
        feats = torch.where((major == 255)[..., None], torch.zeros(C), F_onehot(major.clamp(max=C - 1)))
        r = ep.evaluate(probe, feats, ts, list("abcd"), keep_maps={0})
        assert r["miou"] > 0.95 and r["patch_miou"] == pytest.approx(1.0) and r["maps"][0].shape == (100, 230)
        maps.append(r["maps"][0])
    assert torch.equal(maps[0], maps[1])


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_ckpt.safetensors"):
        ep.main(["--ckpt", "random:vit_tiny", "--ckpt", str(tmp_path / "no_such_ckpt.safetensors")])
    img = np.full((40, 50), 255, np.uint8)
    with pytest.raises(ValueError, match="plan_a.*size"):
        ep.tile_sheets([dict(name="plan_a", image=img, mask=np.zeros((40, 49), np.uint8))], C)
    with pytest.raises(ValueError, match="plan_b.*out of range"):
        ep.tile_sheets([dict(name="plan_b", image=img, mask=np.full((40, 50), 7, np.uint8))], C)
    # through the labeled-folder loader and the CLI: the error names the file
    for name, mask in [("bad_size", np.zeros((40, 49), np.uint8)), ("bad_id", np.full((40, 50), 9, np.uint8))]:
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        (root / "classes.txt").write_text("\n".join("abcd") + "\n")
        for k in range(2):
            Image.fromarray(img).save(root / "images" / f"s{k}.png")
            Image.fromarray(mask if k == 1 else np.zeros((40, 50), np.uint8)).save(root / "masks" / f"s{k}.png")
        with pytest.raises(ValueError, match="s1"):
            ep.main(["--ckpt", "random:vit_tiny", "--data", str(root), "--out_dir", str(tmp_path / "o")])


def test_cli_end_to_end_on_a_labeled_folder(tmp_path):
    """Non-square sheets, no train/ val/ subfolders: deterministic file split written out."""
    root = tmp_path / "labeled"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nwall\ntext\n")
    rng = np.random.default_rng(0)
    for k in range(5):
        img = np.full((90, 150), 255, np.uint8)
        mask = np.zeros((90, 150), np.uint8)
        y, x = rng.integers(0, 60, 2)
        img[y:y + 20, x:x + 60], mask[y:y + 20, x:x + 60] = 0, 1
        mask[:4] = 255
        Image.fromarray(img).save(root / "images" / f"sheet{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"sheet{k}.png")
    out = tmp_path / "out"
    ep.main(["--ckpt", "random:vit_tiny", "--data", str(root), "--layers", "last", "--out_dir", str(out),
             "--random_seeds", "0", "--tile", "64"])
    r = json.loads((out / "random-vit_tiny" / "results.json").read_text())
    split = r["protocol"]["data"]
    assert sorted(split["train"] + split["val"]) == [f"sheet{k}" for k in range(5)] and len(split["val"]) == 1
    assert r["global"] is None and 0 <= r["dense"]["best_miou"] <= 1


def test_cli_smoke_synthetic(tmp_path):
    out = tmp_path / "out"
    res = ep.main(["--ckpt", "random:vit_tiny", "--n_train", "16", "--n_val", "16", "--tile", "112", "--layers", "0,-1",
                   "--random_seeds", "2", "--out_dir", str(out), "--examples", "2"])
    r = json.loads((out / "random-vit_tiny" / "results.json").read_text())
    d = r["dense"]
    assert set(d["layers"]) == {"0", "11"} and d["best_layer"] in (0, 11) and d["last_layer"] == 11
    for v in (d["best_miou"], d["last_miou"], d["patch_miou"], r["oracle"]["miou"]):
        assert 0 < v <= 1
    assert d["best_miou"] == max(l["miou"] for l in d["layers"].values())
    assert d["best_miou"] < r["oracle"]["miou"]
    assert set(r["global"]) >= {"cls_linear", "pool_linear", "cls_knn", "k"}
    assert all(0 <= r["global"][k] <= 1 for k in ("cls_linear", "pool_linear", "cls_knn"))
    dg = r["diagnostics"]
    assert 0 <= dg["high_norm_frac"] <= 1 and -1 <= dg["cls_patch_cos"] <= 1 and 1 <= dg["effective_rank"] <= 192
    assert {"protocol", "run_info", "arch", "time_s"} <= set(r)
    assert len(res["baseline"]) == 2 and res["baseline"][0]["name"] == "random-vit_tiny"  # seed 0 reused, not re-run
    assert (out / "random-vit_tiny-s1" / "results.json").is_file() and (out / "raw_pixels" / "results.json").is_file()
    for f in ("probe.md", "probe_curve.png", "random-vit_tiny/examples.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "probe.md").read_text()
    assert "random init vit_tiny, 2 seeds" in md and "raw pixels" in md and "oracle" in md


def test_examples_zero_writes_results_and_no_examples_png(tmp_path):
    """--examples 0 (scripts/bench.py probe uses it) used to crash drawing an empty figure."""
    out = tmp_path / "out"
    ep.main(["--ckpt", "random:vit_tiny", "--n_train", "8", "--n_val", "8", "--tile", "112", "--layers", "last",
             "--random_seeds", "0", "--out_dir", str(out), "--examples", "0"])
    assert json.loads((out / "random-vit_tiny" / "results.json").read_text())["dense"]["best_miou"] > 0
    assert not (out / "random-vit_tiny" / "examples.png").exists()


def test_a_runs_backbone_is_named_after_its_run_and_outputs_are_listed(tmp_path, capsys):
    """The quickstart's probe: the row is named after the run dir, the diagnostic columns are
    explained under the table, the output paths are printed, and a log file gets no progress bars."""
    from common import ViT, save_backbone
    torch.manual_seed(0)
    (tmp_path / "my_run").mkdir()
    save_backbone(ViT(embed_dim=32, depth=2, num_heads=2, n_registers=1), tmp_path / "my_run" / "backbone.safetensors")
    assert ep.ckpt_name("runs/mae/backbone.safetensors", set()) == "mae"
    assert ep.ckpt_name("dinov3_vits16_pretrain.pth", set()) == "dinov3_vits16_pretrain"
    out = tmp_path / "out"
    ep.main(["--ckpt", str(tmp_path / "my_run" / "backbone.safetensors"), "--n_train", "8", "--n_val", "8",
             "--tile", "64", "--layers", "last", "--random_seeds", "0", "--out_dir", str(out), "--examples", "1"])
    md = (out / "probe.md").read_text()
    assert "| my_run |" in md and "backbone" not in md.split("\n")[2]
    for column in ("high-norm %", "cos(CLS, patch)", "eff. rank"):
        assert sum(line.startswith(f"- {column}: ") for line in md.splitlines()) == 1, column
    printed = capsys.readouterr()
    for f in (out / "probe.md", out / "probe_curve.png", out / "my_run" / "results.json"):
        assert f.is_file() and str(f) in printed.out, f
    assert "examples.png" in printed.out.split(str(out / "my_run" / "results.json"))[1].splitlines()[0]
    assert "\r" not in printed.err  # captured stderr is not a terminal: no tqdm bars


def test_one_palette_for_every_label_picture():
    import common
    sys.path.insert(0, str(ROOT / "scripts"))
    import contact_sheet
    assert ep.PALETTE is common.PALETTE and contact_sheet.PALETTE is common.PALETTE
    labels = np.array([[0, 1, 2], [8, 255, 1]], np.uint8)
    colour = {**dict(enumerate(common.PALETTE)), 255: common.IGNORE_COLOUR}
    want = np.array([[colour[k] for k in row] for row in labels], np.uint8)
    assert np.array_equal(np.asarray(ep.colour_labels(torch.from_numpy(labels))), want)
    assert np.array_equal(np.asarray(contact_sheet.colour(labels)), want)
