"""BEiT essentials against hand-computed values (blockwise masks, the EMA codebook, dead-code
re-seeding, straight-through, the MIM loss on masked positions), the two-rank codebook update,
and short runs of the real command line (both stages, resume in either stage, vqkd, --init,
two processes)."""
import json
import math
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import beit
import common
from cli import read_metrics, run_recipe, stop_when_logged



# ---------------------------------------------------------------------------------------
# Blockwise masks
# ---------------------------------------------------------------------------------------

class ScriptedRandom:
    """random.Random stand-in that returns scripted draws."""

    def __init__(self, uniforms, randints):
        self.uniforms, self.randints = list(uniforms), list(randints)

    def uniform(self, a, b):
        return self.uniforms.pop(0)

    def randint(self, a, b):
        return self.randints.pop(0)

    def sample(self, population, k):
        return population[:k]


def test_block_mask_hand_computed():
    # area 16, log-aspect 0 -> a 4 x 4 block at (top 2, left 3) of an 8 x 8 grid: exactly 16 patches
    m = beit.block_mask(8, 8, 16, ScriptedRandom([16.0, 0.0], [2, 3]), min_block=16).view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 3:7] = True
    assert torch.equal(m, expected)
    # 18 wanted: the same block, then no block of >= 16 patches adds <= 2 new ones (10 tries of a
    # 4 x 4 block over the first one add nothing), so the first 2 free patches top it up
    rng = ScriptedRandom([16.0, 0.0] + [16.0, 0.0] * 10, [2, 3] + [2, 3] * 10)
    m = beit.block_mask(8, 8, 18, rng, min_block=16).view(8, 8)
    expected[0, 0] = expected[0, 1] = True
    assert torch.equal(m, expected)


def components(mask):
    """Sizes of the 4-connected components of a (h, w) bool mask."""
    h, w = mask.shape
    seen, sizes = set(), []
    for start in zip(*torch.nonzero(mask, as_tuple=True)):
        start = (int(start[0]), int(start[1]))
        if start in seen:
            continue
        stack, size = [start], 0
        seen.add(start)
        while stack:
            y, x = stack.pop()
            size += 1
            for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= q[0] < h and 0 <= q[1] < w and mask[q] and q not in seen:
                    seen.add(q)
                    stack.append(q)
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("grid,n_masked", [((14, 14), 75), ((8, 8), 25), ((6, 10), 24)])
def test_block_masks_hit_the_exact_count_in_blocks(grid, n_masked):
    h, w = grid
    rng = random.Random(0)
    in_blocks = 0
    for _ in range(100):
        m = beit.block_mask(h, w, n_masked, rng, min_block=16)
        assert int(m.sum()) == n_masked
        sizes = components(m.view(h, w))
        in_blocks += sum(s for s in sizes if s >= 12) / n_masked  # >= 16 up to the rounding of a block's sides
        assert max(sizes) >= 12
    assert in_blocks / 100 > 0.7  # most masked patches lie in blocks, the rest is the exact-count top-up


def test_masked_count_is_the_official_75_of_196_and_the_tiny_preset_keeps_14_of_36():
    # the recipe masks int(N * mask_ratio) patches; the official scripts mask 75 of 14 x 14
    for preset in ("small", "base"):
        cfg = beit.BEiTConfig(**beit.PRESETS[preset])
        assert (cfg.img_size // 16) ** 2 == 196 and int(196 * cfg.mask_ratio) == 75
    tiny = beit.BEiTConfig(**beit.PRESETS["tiny"])
    assert (tiny.img_size // 16) ** 2 == 36 and int(36 * tiny.mask_ratio) == 14


class CountingRandom(random.Random):
    """Counts the patches the exact-count top-up draws (the only rng.sample call of block_mask)."""
    topped = 0

    def sample(self, population, k):
        self.topped += k
        return super().sample(population, k)


def test_tiny_grid_needs_the_smaller_minimum_block():
    # the tiny preset: 96 px crops (6 x 6 patches), 40% masked = 14 patches, min_block 9
    cfg = beit.BEiTConfig(**beit.PRESETS["tiny"])
    h = w = cfg.img_size // 16
    n_masked = int(h * w * cfg.mask_ratio)
    shares = {}
    for min_block in (cfg.min_block, 16):
        rng = CountingRandom(0)
        for _ in range(300):
            assert int(beit.block_mask(h, w, n_masked, rng, min_block=min_block).sum()) == n_masked
        shares[min_block] = rng.topped / (300 * n_masked)
    assert shares[cfg.min_block] < 0.05  # nearly all in blocks
    assert shares[16] > 0.25  # the paper's minimum: block tries rarely fit, many scattered patches


# ---------------------------------------------------------------------------------------
# EMA codebook
# ---------------------------------------------------------------------------------------

def four_codes():
    cb = beit.EMACodebook(4, 2, decay=0.99)
    cb.codes.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-0.6, -0.8]]))
    return cb


Z = torch.tensor([[0.6, 0.8], [0.6, -0.8], [1.0, 0.0]])  # nearest codes 1, 0, 0


def unit(x, y):
    n = math.hypot(x, y)
    return [x / n, y / n]


def test_ema_codebook_update_hand_computed():
    cb = four_codes()
    idx = cb.assign(Z)
    assert idx.tolist() == [1, 0, 0]
    out = cb.update(Z, idx, dead_after=100)
    # code 0: its vectors sum to (1.6, -0.8), direction (2, -1) / sqrt 5; 0.99 * (1, 0) + 0.01 * that
    d = unit(1.6, -0.8)
    assert cb.codes[0].tolist() == pytest.approx(unit(0.99 + 0.01 * d[0], 0.01 * d[1]), abs=1e-6)
    # code 1: 0.99 * (0, 1) + 0.01 * (0.6, 0.8)
    assert cb.codes[1].tolist() == pytest.approx(unit(0.006, 0.99 + 0.008), abs=1e-6)
    assert cb.codes[2].tolist() == [-1.0, 0.0] and cb.codes[3].tolist() == pytest.approx([-0.6, -0.8])  # unused
    assert torch.allclose(cb.codes.norm(dim=-1), torch.ones(4), atol=1e-6)  # still unit vectors
    assert out["counts"].tolist() == [2, 1, 0, 0] and int(out["reseeded"]) == 0
    assert cb.counts.tolist() == pytest.approx([0.02, 0.01, 0.0, 0.0])
    assert cb.unused_steps.tolist() == [0, 0, 1, 1]


def test_dead_codes_are_reseeded_with_the_worst_fitted_vectors():
    cb = four_codes()
    out = cb.update(Z, cb.assign(Z), dead_after=1)
    # codes 2 and 3 are dead after one unused step. Cosines to the updated codes: (0.6, -0.8) ->
    # code 0 ~0.62, (0.6, 0.8) -> code 1 ~0.80, (1, 0) -> code 0 ~0.89: the two worst, in order
    assert int(out["reseeded"]) == 2
    assert cb.codes[2].tolist() == pytest.approx([0.6, -0.8]) and cb.codes[3].tolist() == pytest.approx([0.6, 0.8])
    assert cb.unused_steps.tolist() == [0, 0, 0, 0]
    cb2 = four_codes()
    cb2.update(Z, cb2.assign(Z), dead_after=2)  # one unused step is not yet dead
    assert cb2.codes[2].tolist() == [-1.0, 0.0]


def test_kmeans_init_finds_the_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.nn.functional.normalize(centres.repeat(20, 1) + 0.05 * torch.randn(60, 2, generator=g), dim=-1)
    found = beit.spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    assert (found @ centres.T).max(0).values.min() > 0.99  # every true centre has a found one next to it


def _two_rank_worker(rank, port, out_dir, codes, z, idx):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cb = beit.EMACodebook(*codes.shape, decay=0.9)
    cb.codes.copy_(codes)
    half = z.shape[0] // 2
    for _ in range(3):  # three steps on the same local halves: EMA, dead codes, re-seeding
        out = cb.update(z[rank * half:(rank + 1) * half], idx[rank * half:(rank + 1) * half], dead_after=2)
    torch.save({"codes": cb.codes, "counts": cb.counts, "batch_counts": out["counts"]}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    K, d, M = 12, 4, 16
    codes = torch.nn.functional.normalize(torch.randn(K, d), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(M, d), dim=-1)
    idx = (z @ codes.T).argmax(-1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path), codes, z, idx), nprocs=2)
    ref = beit.EMACodebook(K, d, decay=0.9)
    ref.codes.copy_(codes)
    reseeded = 0
    for _ in range(3):
        out = ref.update(z, idx, dead_after=2)
        reseeded += int(out["reseeded"])
    assert reseeded == K - idx.unique().numel() > 0  # the unused codes were re-seeded at the second step
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.allclose(got["codes"], ref.codes, atol=1e-6)
        assert torch.allclose(got["counts"], ref.counts, atol=1e-6)
        assert torch.equal(got["batch_counts"], out["counts"])


# ---------------------------------------------------------------------------------------
# Tokenizer and MIM model
# ---------------------------------------------------------------------------------------

def small_tokenizer(target_dim=256):
    torch.manual_seed(0)
    return beit.Tokenizer(dim=16, depth=1, heads=2, decoder_depth=1, n_codes=8, code_dim=4, decay=0.99,
                          target_dim=target_dim)


def test_straight_through_decodes_codes_and_trains_the_encoder():
    tok = small_tokenizer()
    img = torch.rand(2, 1, 32, 32)
    out = tok(img)
    # the decoder's input is the chosen code, not the encoder output
    x = tok.from_code(tok.codebook.codes[out["idx"]])
    rope = tok.rope(common.grid_coords(2, 2))
    for blk in tok.decoder:
        x = blk(x, rope, 0)
    assert torch.allclose(tok.to_target(tok.decoder_norm(x)), out["pred"], atol=1e-6)
    loss = beit.reconstruction_loss(out["pred"], common.patchify(img, 16), "vqvae")
    loss.backward()
    # gradients cross the argmax to the encoder (straight-through) even without the commitment loss
    assert tok.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert tok.to_code[0].weight.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in tok.codebook.buffers())  # codes move by EMA only


def test_reconstruction_losses_hand_computed():
    pred, target = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 2.0]]])
    assert beit.reconstruction_loss(pred, target, "vqvae").item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert beit.reconstruction_loss(pred, target, "vqkd").item() == pytest.approx(1.0)  # orthogonal: 1 - 0
    assert beit.reconstruction_loss(target, 3 * target, "vqkd").item() == pytest.approx(0.0, abs=1e-6)


def test_mim_logits_come_from_masked_positions_only():
    torch.manual_seed(0)
    encoder = common.ViT(embed_dim=16, depth=2, num_heads=2, layerscale_init=0.1)
    model = beit.BEiT(encoder, n_codes=5, aggregation_layer=1, aggregation_depth=1).eval()
    img = torch.rand(2, 1, 32, 48)  # 2 x 3 patches
    mask = torch.tensor([[True, False, False, True, False, False], [False, True, False, False, False, True]])
    masked_index = mask.flatten().nonzero().squeeze(1)
    logits, aggregated = model(img, mask, masked_index)
    assert logits.shape == aggregated.shape == (4, 5)
    out = encoder(common.to_model_input(img), mask=mask)
    assert torch.allclose(logits, model.lm_head(out["patches"][mask]), atol=1e-6)
    # the pixels of masked patches never reach the encoder: change them, nothing changes
    changed = img.clone()
    changed[0, :, 0:16, 0:16] = 0.0  # patch 0 of image 0 (masked)
    assert torch.allclose(model(changed, mask, masked_index)[0], logits, atol=1e-6)
    changed[0, :, 0:16, 16:32] = 0.0  # patch 1 of image 0 (visible)
    assert not torch.allclose(model(changed, mask, masked_index)[0], logits, atol=1e-4)
    # the loss: cross-entropy of these masked logits only; the trivial one for a uniform marginal is ln K
    targets = torch.tensor([0, 1, 2, 3])
    expected = -torch.log_softmax(logits, -1)[torch.arange(4), targets].mean()
    assert torch.nn.functional.cross_entropy(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_final_usage_counts_codes_covering_90_percent():
    u = beit.final_usage(torch.tensor([50.0, 30.0, 15.0, 5.0, 0.0]))
    assert u["codes_for_90pct"] == 3  # 50 + 30 + 15 = 95% >= 90%, 80% is not
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert u["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)


# ---------------------------------------------------------------------------------------
# Command line: both stages, resume in either stage, vqkd + --init, two gloo processes
# ---------------------------------------------------------------------------------------

FAST = ["--preset", "tiny", "--batch_size", "4", "--tokenizer_batch_size", "4", "--num_workers", "0",
        "--log_every", "1", "--tokenizer_depth", "1", "--decoder_depth", "1", "--codebook_size", "16",
        "--warmup_steps", "2", "--tokenizer_warmup_steps", "2", "--dead_code_steps", "2"]


def run_cli(args, nproc=None, popen=False):
    return run_recipe("beit.py", FAST + args, nproc, popen=popen)


metrics = read_metrics



TOKENIZER_KEYS = ("loss", "recon", "trivial", "commit", "codes_used", "perplexity", "reseeded", "blank_codes")
PRETRAIN_KEYS = ("loss", "trivial", "accuracy", "majority", "ink_accuracy", "blank_share")


def test_both_stages_export_and_resume_exactly_in_either_stage(tmp_path):
    steps = ["--tokenizer_steps", "6", "--steps", "6"]
    ref_dir = tmp_path / "ref"
    run_cli(steps + ["--out_dir", str(ref_dir)])
    tok_ref, ref = metrics(ref_dir / "tokenizer"), metrics(ref_dir)
    assert [r["step"] for r in tok_ref] == [r["step"] for r in ref] == list(range(1, 7))
    for r in tok_ref:
        assert 1 <= r["codes_used"] <= 16 and 1 <= r["perplexity"] <= 16 and r["trivial"] >= 0
    for r in ref:
        assert math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and 0 <= r["majority"] <= 1 and r["trivial"] > 0
    assert common.load_backbone(str(ref_dir / "backbone.safetensors")).embed_dim == 192
    tokenizer, meta = beit.load_tokenizer(ref_dir / "tokenizer.safetensors")
    assert meta["kind"] == "vqvae" and json.loads(meta["usage"])["codes_for_90pct"] >= 1
    assert tokenizer.tokens(torch.ones(1, 1, 128, 128)).shape == (1, 64)

    # stop in the tokenizer stage, resume; stop in pretraining, resume: the same numbers
    run_dir = tmp_path / "res"
    stop_when_logged(run_cli(steps + ["--out_dir", str(run_dir)], popen=True), run_dir / "tokenizer" / "metrics.jsonl", 2)
    stopped_at = int(common.latest_checkpoint(run_dir / "tokenizer").name.split("_")[1])
    assert 2 <= stopped_at < 6 and not (run_dir / "tokenizer.safetensors").exists()
    stop_when_logged(run_cli(steps + ["--out_dir", str(run_dir), "--resume"], popen=True), run_dir / "metrics.jsonl", 2)
    assert 2 <= int(common.latest_checkpoint(run_dir).name.split("_")[1]) < 6
    run_cli(steps + ["--out_dir", str(run_dir), "--resume"])
    tok_res, res = metrics(run_dir / "tokenizer"), metrics(run_dir)
    assert [r["step"] for r in tok_res] == [r["step"] for r in res] == list(range(1, 7))  # tokenizer not redone
    for rows_a, rows_b, keys in ((tok_ref, tok_res, TOKENIZER_KEYS), (ref, res, PRETRAIN_KEYS)):
        for a, b in zip(rows_a, rows_b):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_vqkd_tokenizer_then_pretrain_from_init(tmp_path):
    tok_dir, pre_dir = tmp_path / "tok", tmp_path / "pre"
    run_cli(["--stage", "tokenizer", "--tokenizer", "vqkd", "--teacher", "random:vit_tiny", "--tokenizer_steps", "2",
             "--out_dir", str(tok_dir)])
    assert not (tok_dir / "backbone.safetensors").exists()
    _, meta = beit.load_tokenizer(tok_dir / "tokenizer.safetensors")
    assert meta["kind"] == "vqkd" and json.loads(meta["config"])["target_dim"] == 192  # the teacher's width
    init = common.vit("vit_tiny", layerscale_init=0.1)
    common.save_backbone(init, tmp_path / "init.safetensors")
    run_cli(["--stage", "pretrain", "--tokenizer_ckpt", str(tok_dir / "tokenizer.safetensors"), "--steps", "1",
             "--lr", "0", "--init", str(tmp_path / "init.safetensors"), "--out_dir", str(pre_dir)])
    assert (pre_dir / "tokenizer.safetensors").is_file()  # the run dir keeps the tokenizer of its targets
    exported = common.load_backbone(str(pre_dir / "backbone.safetensors"))
    for k, v in init.state_dict().items():  # lr 0: the exported encoder is the --init backbone
        assert torch.equal(v, exported.state_dict()[k]), k


def test_two_gloo_processes_train_both_stages(tmp_path):
    res = run_cli(["--tokenizer_steps", "2", "--steps", "2", "--out_dir", str(tmp_path)], nproc=2)
    assert "2 process(es)" in res.stdout
    assert [r["step"] for r in metrics(tmp_path / "tokenizer")] == [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert common.load_backbone(str(tmp_path / "backbone.safetensors")).embed_dim == 192


def test_help_lists_the_recipe_flags(capsys):
    with pytest.raises(SystemExit) as e:
        beit.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--stage", "--tokenizer", "--teacher", "--tokenizer_ckpt", "--codebook_size", "--dead_code_steps",
                 "--mask_ratio", "--aggregation_layer"):
        assert flag in out


def test_marginal_cross_entropy_hand_computed():
    counts = torch.tensor([3.0, 1.0, 0.0])  # add-one smoothed: p = (4, 2, 1) / 7
    targets = torch.tensor([0, 1])
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert float(beit.marginal_cross_entropy(counts, targets)) == pytest.approx(expected, rel=1e-6)


def test_tokenizer_without_encoder_blocks_codes_each_patch_from_its_own_pixels():
    # the tiny preset's tokenizer (depth 0): a patch's code must not depend on its neighbours
    torch.manual_seed(0)
    tok = beit.Tokenizer(dim=32, depth=0, heads=2, decoder_depth=1, n_codes=8, code_dim=4, decay=0.99,
                         target_dim=256)
    img = torch.rand(1, 1, 32, 32)
    other = img.clone()
    other[..., 16:, :] = torch.rand(1, 1, 16, 32)  # change the bottom row of patches only
    z, _ = tok.encode(img)
    z2, _ = tok.encode(other)
    assert torch.allclose(z[:, :2], z2[:, :2], atol=1e-6)  # top patches: same vectors
    assert not torch.allclose(z[:, 2:], z2[:, 2:], atol=1e-3)
    deep = beit.Tokenizer(dim=32, depth=1, heads=2, decoder_depth=1, n_codes=8, code_dim=4, decay=0.99,
                          target_dim=256)
    assert not torch.allclose(deep.encode(img)[0][:, :2], deep.encode(other)[0][:, :2], atol=1e-6)  # attention mixes
