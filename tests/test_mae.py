"""MAE essentials against hand-computed values."""
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
import mae


def test_masking_keeps_exact_count_and_restores_order():
    B, N = 3, 20
    noise = torch.rand(B, N)
    ids_keep, ids_restore, mask = mae.random_masking(B, N, 0.75, noise)
    assert ids_keep.shape == (B, 5)  # int(20 * 0.25)
    assert torch.equal(mask.sum(1), torch.full((B,), 15.0))
    # the kept ids are the 5 smallest noise values, and exactly those are unmasked
    for b in range(B):
        assert set(ids_keep[b].tolist()) == set(noise[b].argsort()[:5].tolist())
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(ids_keep[b].tolist())
    # ids_restore inverts the shuffle
    shuffled = torch.arange(N).expand(B, N).gather(1, noise.argsort(1))
    assert torch.equal(shuffled.gather(1, ids_restore), torch.arange(N).expand(B, N))
    # a ratio that does not divide evenly floors the kept count like the official code
    assert mae.random_masking(1, 10, 0.75)[0].shape == (1, 2)


def test_loss_hand_computed_on_masked_patches_only():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    assert mae.mae_loss(pred, target, mask).item() == pytest.approx(5.0)  # (1 + 9) / 2
    assert mae.mae_loss(pred, target, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(4.0)
    # unmasked patches do not move the loss whatever the prediction
    pred2 = pred.clone()
    pred2[0, 1] = 100.0
    assert mae.mae_loss(pred2, target, mask).item() == pytest.approx(5.0)


def test_norm_pix_targets_hand_values():
    t = mae.patch_targets(torch.tensor([[[1.0, 3.0], [2.0, 2.0]]]), norm_pix=True)
    # patch [1, 3]: mean 2, unbiased var 2 -> -+1/sqrt(2); a flat patch -> all zeros
    assert t[0, 0].tolist() == pytest.approx([-1 / math.sqrt(2 + 1e-6), 1 / math.sqrt(2 + 1e-6)])
    assert t[0, 1].tolist() == [0.0, 0.0]


def test_patch_stats_targets_hand_values():
    # patches: black [0, 0], blank [1, 1], grey [0, 1] (not in the loss: weight 0)
    pixels = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    t = mae.patch_stats_targets(pixels, torch.tensor([[1.0, 1.0, 0.0]]))
    # means over the weighted patches: mean 0.5, variance 0.25 -> -1, +1, and the grey one 0
    assert t[0, :, 0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-5)
    # stds 1e-3, 1e-3 (flat: sqrt(0 + 1e-6)) -> both at the weighted mean: 0; the grey patch's
    # std sqrt(0.5) lies (sqrt(0.5) - 1e-3) / sqrt(0 + 1e-6) above it
    assert t[0, :2, 1].tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    assert t[0, 2, 1].item() == pytest.approx((math.sqrt(0.5) - 1e-3) / 1e-3, rel=1e-4)
    # norm_pix makes the black and the blank patch the same target; the stats do not
    flat = mae.patch_targets(pixels[:, :2], norm_pix=True)
    assert torch.equal(flat[0, 0], flat[0, 1]) and t[0, 0, 0] != t[0, 1, 0]


def _stats_worker(rank, port, out_dir, pixels, weight, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    start = sum(counts[:rank])
    sl = slice(start, start + counts[rank])
    torch.save(mae.patch_stats_targets(pixels[sl], weight[sl]), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_patch_stats_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    pixels, weight, counts = torch.rand(5, 6, 16), (torch.rand(5, 6) < 0.7).float(), (2, 3)
    pixels[:2] *= 0.2  # ranks see different statistics: the reduction matters
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_stats_worker, args=(port, str(tmp_path), pixels, weight, counts), nprocs=2)
    two = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    ref = mae.patch_stats_targets(pixels, weight)
    assert torch.allclose(two, ref, atol=1e-5)
    alone = torch.cat([mae.patch_stats_targets(pixels[:2], weight[:2]), mae.patch_stats_targets(pixels[2:], weight[2:])])
    assert not torch.allclose(alone, ref, atol=1e-2)


def test_encoder_receives_only_visible_tokens():
    enc = common.ViT(embed_dim=32, depth=2, num_heads=2, n_registers=4)
    dec = mae.MAEDecoder(32, enc.n_prefix, dim=16, depth=1, heads=2, patch_pixels=256)
    model = mae.MAE(enc, dec)
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    img = torch.rand(2, 1, 64, 64)
    ids_keep, ids_restore, mask = mae.random_masking(2, 16, 0.75)
    pred = model(img, ids_keep, ids_restore)
    assert seen == [torch.Size([2, 1 + 4 + 4, 32])]  # cls + 4 registers + 4 visible of 16
    assert pred.shape == (2, 16, 256)
    # the prediction at a masked position does not depend on that patch's pixels
    img2 = img.clone()
    masked = int(torch.nonzero(mask[0]).flatten()[0])
    r, c = divmod(masked, 4)
    img2[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 0.0
    assert torch.allclose(model(img2, ids_keep, ids_restore)[0], pred[0], atol=1e-5)


def run_mae(args, nproc=None):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc
           else [sys.executable]) + [str(root / "mae.py"), "--preset", "tiny", "--img_size", "64", "--batch_size", "4",
                                     "--num_workers", "0", "--log_every", "1", "--decoder_dim", "32",
                                     "--decoder_heads", "2"] + args
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(run_dir):
    import json
    from pathlib import Path
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_cli_smoke_resume_and_two_processes(tmp_path):
    ref = tmp_path / "ref"
    run_mae(["--steps", "4", "--out_dir", str(ref)])
    rows = losses(ref)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["trivial"] > 0 and 0 <= r["blank_share"] <= 1 for r in rows)
    enc = common.load_backbone(str(ref / "backbone.safetensors"))
    assert enc.embed_dim == 192
    # stop after 2 steps, resume to 4: identical losses
    part = tmp_path / "part"
    run_mae(["--steps", "2", "--out_dir", str(part)])
    run_mae(["--steps", "4", "--out_dir", str(part), "--resume"])
    assert [r["loss"] for r in losses(part)] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    # continual pretraining from the exported backbone, on two gloo processes
    two = tmp_path / "two"
    # (with the patch-statistics targets, on a mix of the generator and a folder of sheets)
    from PIL import Image, ImageDraw
    folder = tmp_path / "sheets"
    folder.mkdir()
    im = Image.new("L", (300, 300), 255)
    ImageDraw.Draw(im).rectangle((40, 40, 250, 200), outline=0, width=9)
    im.save(folder / "plan.png")
    run_mae(["--steps", "2", "--out_dir", str(two), "--init", str(ref / "backbone.safetensors"),
             "--stats_weight", "1", "--data", f"synthetic+{folder}"], nproc=2)
    rows = losses(two)
    assert len(rows) == 2
    # loss = pixel part + stats part, and the trivial level counts the stats' 1
    assert all(r["loss"] == pytest.approx(r["loss_pix"] + r["loss_stats"], rel=1e-4) for r in rows)
    assert all(r["trivial_pix"] + 0.5 < r["trivial"] <= r["trivial_pix"] + 1.0 + 1e-4 for r in rows)
    assert (two / "backbone.safetensors").is_file()
