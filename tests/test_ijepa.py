"""I-JEPA essentials against hand-computed values, plus the command line (smoke, resume, DDP)."""
import copy

import pytest
import torch

import common
from cli import read_metrics, run_recipe, stop_when_logged
import ijepa



def draws(grid, n_batches=150, batch=8, **kw):
    for i in range(n_batches):
        yield ijepa.sample_masks(batch, grid, common.step_generator(0, i), **kw)


def block_shape(idx, W):
    """(height, width) of the rectangle that a block's row-major indices cover."""
    rows, cols = idx // W, idx % W
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (10, 16)])
def test_target_blocks_are_rectangles_of_the_drawn_scale(grid):
    H, W = grid
    N = H * W
    for context_idx, target_idx in draws(grid):
        B, M, n_t = target_idx.shape
        assert M == 4
        h, w = block_shape(target_idx[0, 0], W)
        assert h * w == n_t  # a full rectangle, one size for the whole batch
        for b in range(B):
            for m in range(M):
                idx = target_idx[b, m]
                r0, c0 = int(idx.min()) // W, int(idx.min()) % W
                want = [(r0 + i) * W + c0 + j for i in range(h) for j in range(w)]
                assert idx.tolist() == want  # contiguous h x w block, row-major
        # area = round-off of s * N with s in [0.15, 0.2]: width is round(area / h), so the
        # block's area is within h / 2 of the drawn one
        assert 0.15 * N - h / 2 <= n_t <= 0.2 * N + h / 2


def test_scale_and_aspect_are_drawn_independently():
    """The official sampler used one random number for both, so the smallest blocks were
    always the widest. On a large grid (rounding negligible) small blocks come in both
    orientations, and every aspect stays in (0.75, 1.5) up to rounding."""
    H = W = 40
    shapes = [block_shape(t[0, 0], W) for _, t in draws((H, W), n_batches=300, batch=1)]
    areas = torch.tensor([h * w for h, w in shapes], dtype=torch.float)
    aspects = torch.tensor([h / w for h, w in shapes])
    assert aspects.min() >= 0.75 * 0.92 and aspects.max() <= 1.5 * 1.08
    small = areas <= areas.median()
    assert (aspects[small] < 0.9).any() and (aspects[small] > 1.3).any()
    assert (aspects[~small] < 0.9).any() and (aspects[~small] > 1.3).any()


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (10, 16)])
def test_context_excludes_targets_keeps_min_and_is_truncated_to_batch_min(grid):
    H, W = grid
    sizes = set()
    for context_idx, target_idx in draws(grid, min_keep=10):
        B, n_ctx = context_idx.shape
        sizes.add(n_ctx)
        assert n_ctx >= 10  # never empty, never below min_keep
        for b in range(B):
            ctx = context_idx[b].tolist()
            assert ctx == sorted(set(ctx))  # unique, row-major
            assert not set(ctx) & set(target_idx[b].flatten().tolist())
    assert len(sizes) > 5  # the batch minimum varies from batch to batch


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (10, 16)])
def test_every_row_and_column_can_be_masked(grid):
    """The official exclusive bound never put the last row/column inside a block."""
    H, W = grid
    in_target = torch.zeros(H * W, dtype=torch.bool)
    in_context = torch.zeros(H * W, dtype=torch.bool)
    for context_idx, target_idx in draws(grid):
        in_target[target_idx.flatten()] = True
        in_context[context_idx.flatten()] = True
    assert in_target.all() and in_context.all()


def test_context_falls_back_to_the_complement_of_the_targets():
    # a 2 x 2 context block can never keep 5 patches: the context becomes grid minus targets
    gen = common.step_generator(3, 0)
    context_idx, target_idx = ijepa.sample_masks(1, (6, 6), gen, context_scale=(0.1, 0.1), min_keep=5)
    complement = set(range(36)) - set(target_idx.flatten().tolist())
    assert set(context_idx[0].tolist()) == complement
    with pytest.raises(ValueError, match="min_keep"):  # no context of a 16-patch grid has more than 16
        ijepa.sample_masks(1, (4, 4), gen, min_keep=16)


def test_context_relaxes_like_the_official_collator_instead_of_raising():
    # 4 x 4 grid, 2 targets of area 8 and aspect 1/2: height round(sqrt(4)) = 2, width 8 / 2 = 4,
    # full-width 2-row blocks at top row 0, 1 or 2; the context block (scale 1) is the whole grid.
    # min_keep 5 needs > 5 patches: minus both targets leaves 8 (same rows), 4 (rows overlapping
    # by one) or 0 (rows 0-1 and 2-3), and the grid minus the targets is the same set, so steps
    # 1 and 2 fail unless the targets coincide; step 3 (k = 1) excludes target 0 only: 8 patches.
    # Either way the context is the grid minus target 0. (The old sampler raised here.)
    kw = dict(n_targets=2, target_scale=(0.5, 0.5), target_aspect=(0.5, 0.5), context_scale=(1.0, 1.0),
              min_keep=5)
    relaxed = 0
    for i in range(20):
        context_idx, target_idx = ijepa.sample_masks(1, (4, 4), common.step_generator(0, i), **kw)
        t0, t1 = target_idx[0].tolist()
        assert len(t0) == 8 and t0 == list(range(t0[0], t0[0] + 8)) and t0[0] in (0, 4, 8)
        assert context_idx[0].tolist() == sorted(set(range(16)) - set(t0))
        relaxed += t0 != t1  # the context overlaps target 1
        assert not set(context_idx[0].tolist()) & set(t0)
    assert relaxed > 0
    # a batch: every image keeps the grid minus its target 0, so the batch minimum is 8 > min_keep
    context_idx, target_idx = ijepa.sample_masks(6, (4, 4), common.step_generator(0, 99), **kw)
    assert context_idx.shape == (6, 8)
    for b in range(6):
        assert context_idx[b].tolist() == sorted(set(range(16)) - set(target_idx[b, 0].tolist()))


def test_official_class_defaults_never_raise_and_keep_more_than_min_keep():
    # the official MaskCollator's defaults: 2 targets of scale (0.2, 0.8), aspect (0.3, 3),
    # context scale (0.2, 0.8), min_keep 4: targets often leave too little context, which raised before
    kw = dict(n_targets=2, target_scale=(0.2, 0.8), target_aspect=(0.3, 3.0), context_scale=(0.2, 0.8), min_keep=4)
    overlapping = 0
    for context_idx, target_idx in draws((14, 14), n_batches=100, **kw):
        assert context_idx.shape[1] > 4
        for b in range(context_idx.shape[0]):
            ctx = set(context_idx[b].tolist())
            assert len(ctx) == context_idx.shape[1]  # unique indices
            overlapping += bool(ctx & set(target_idx[b].flatten().tolist()))
    assert overlapping > 0  # the relaxed steps were taken


def test_masks_reproduce_from_the_step_generator():
    a = ijepa.sample_masks(4, (14, 14), common.step_generator(0, 7, rank=1))
    b = ijepa.sample_masks(4, (14, 14), common.step_generator(0, 7, rank=1))
    c = ijepa.sample_masks(4, (14, 14), common.step_generator(0, 8, rank=1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_losses_hand_computed():
    pred = torch.zeros(1, 1, 2, 2)  # (B, M, n_t, D)
    target = torch.tensor([[[[0.5, 2.0], [-1.0, 0.0]]]])
    # smooth L1 (beta 1): 0.5 * 0.5^2 = 0.125, 2 - 0.5 = 1.5, 1 - 0.5 = 0.5, 0 -> mean 0.53125
    assert ijepa.jepa_loss(pred, target, "smooth_l1").item() == pytest.approx(0.53125)
    assert ijepa.jepa_loss(pred, target, "l2").item() == pytest.approx((0.25 + 4 + 1) / 4)
    # mean target (-0.25, 1): errors (+-0.75, +-1) at both tokens
    assert ijepa.mean_target_loss(target, "l2").item() == pytest.approx((0.5625 + 1) / 2)
    assert ijepa.mean_target_loss(target, "smooth_l1").item() == pytest.approx((0.5 * 0.5625 + 0.5) / 2)
    with pytest.raises(ValueError):
        ijepa.jepa_loss(pred, target, "cosine")
    # collapse watch: per-dimension std over tokens, averaged; zero for a constant prediction
    assert ijepa.per_dim_std(target).item() == pytest.approx((1.5 / 2 ** 0.5 + 2 / 2 ** 0.5) / 2)
    assert ijepa.per_dim_std(pred).item() == 0.0


def tiny_models():
    torch.manual_seed(0)
    enc = common.ViT(embed_dim=32, depth=2, num_heads=2, n_registers=2)
    pred = ijepa.Predictor(32, enc.n_prefix, dim=16, depth=2, heads=2)
    return enc, pred


def test_targets_are_layer_normed_target_encoder_patches():
    enc, _ = tiny_models()
    img = torch.rand(2, 1, 64, 96)  # non-square 4 x 6 grid
    _, target_idx = ijepa.sample_masks(2, (4, 6), common.step_generator(0, 0), min_keep=2)
    target = ijepa.target_features(enc, img, target_idx)
    assert target.shape == (2, 4, target_idx.shape[2], 32) and not target.requires_grad
    # parameter-free layer norm: every target token has mean 0 and (biased) variance 1
    assert torch.allclose(target.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(target.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    patches = enc(common.to_model_input(img))["patches"]
    assert torch.allclose(ijepa.global_features(enc, img), patches.mean(1))  # average-pooled patches
    b, m, j = 1, 2, 0
    row = patches[b, target_idx[b, m, j]]
    assert torch.allclose(target[b, m, j], (row - row.mean()) / row.var(unbiased=False).add(1e-5).sqrt(), atol=1e-5)


def test_context_encoder_sees_context_only_and_blocks_are_separate():
    enc, pred = tiny_models()
    model = ijepa.IJEPA(enc, pred).eval()
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    img = torch.rand(2, 1, 96, 96)  # 6 x 6
    context_idx, target_idx = ijepa.sample_masks(2, (6, 6), common.step_generator(0, 1), min_keep=4)
    out = model(img, context_idx, target_idx)
    assert seen == [torch.Size([2, 1 + 2 + context_idx.shape[1], 32])]
    assert out.shape == (2, 4, target_idx.shape[2], 32)
    # pixels outside the context do not move any prediction
    outside = torch.ones(36, dtype=torch.bool)
    outside[context_idx[0]] = False
    img2 = img.clone()
    for i in torch.nonzero(outside).flatten().tolist():
        r, c = divmod(i, 6)
        img2[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = torch.rand(1, 16, 16)
    assert torch.allclose(model(img2, context_idx, target_idx)[0], out[0], atol=1e-5)
    # each block is its own sequence: moving block 1 leaves block 0's predictions unchanged
    moved = target_idx.clone()
    moved[:, 1] = target_idx[:, 2]
    again = model(img, context_idx, moved)
    assert torch.allclose(again[:, 0], out[:, 0], atol=1e-5)
    assert torch.allclose(again[:, 1], out[:, 2], atol=1e-5)
    # ...while a mask token's prediction depends on where it sits (RoPE at true coordinates)
    assert not torch.allclose(out[:, 0], out[:, 3], atol=1e-4)


def test_ema_momentum_hand_values():
    assert ijepa.ema_momentum(0, 4, 0.996, 1.0) == pytest.approx(0.996)
    assert ijepa.ema_momentum(1, 4, 0.996, 1.0) == pytest.approx(0.997)
    assert ijepa.ema_momentum(2, 4, 0.996, 1.0) == pytest.approx(0.998)
    assert ijepa.ema_momentum(4, 4, 0.996, 1.0) == pytest.approx(1.0)
    assert ijepa.ema_momentum(250, 1000, 0.996, 1.0) == pytest.approx(0.997)


def test_target_encoder_gets_no_gradient_and_follows_the_ema():
    enc, pred = tiny_models()
    target_encoder = copy.deepcopy(enc).requires_grad_(False).eval()
    model = ijepa.IJEPA(enc, pred)
    opt = common.adamw(common.param_groups(model), lr=1e-2)
    common.set_lr_wd(opt, 1e-2, 0.04)
    img = torch.rand(2, 1, 96, 96)
    context_idx, target_idx = ijepa.sample_masks(2, (6, 6), common.step_generator(0, 2), min_keep=4)
    target = ijepa.target_features(target_encoder, img, target_idx)
    loss = ijepa.jepa_loss(model(img, context_idx, target_idx), target, "smooth_l1")
    loss.backward()
    assert all(p.grad is None for p in target_encoder.parameters())
    assert all(p.grad is not None for p in model.parameters())
    before = [p.clone() for p in target_encoder.parameters()]
    opt.step()
    m = ijepa.ema_momentum(1, 4, 0.996, 1.0)  # 0.997
    common.ema_update(target_encoder, enc, m)
    for t0, t1, s in zip(before, target_encoder.parameters(), enc.parameters()):
        assert torch.allclose(t1, 0.997 * t0 + 0.003 * s.detach(), atol=1e-7)
    name, p = next((n, p) for n, p in enc.named_parameters() if n == "blocks.0.attn.qkv.weight")
    assert not torch.equal(p, dict(target_encoder.named_parameters())[name])  # a lagging copy


# ---------------------------------------------------------------------------------------
# Command line: smoke, resume, two gloo processes
# ---------------------------------------------------------------------------------------

FAST = ["--preset", "tiny", "--img_size", "96", "--batch_size", "4", "--min_keep", "4", "--num_workers", "0",
        "--log_every", "1", "--pred_depth", "1"]


def run_cli(args, nproc=None, popen=False):
    return run_recipe("ijepa.py", FAST + args, nproc, popen=popen)


metrics = read_metrics


def test_smoke_exports_the_target_encoder_and_resume_reproduces_losses(tmp_path):
    steps = ["--steps", "6", "--warmup_steps", "4"]
    run_cli(steps + ["--out_dir", str(tmp_path / "ref")])
    ref = metrics(tmp_path / "ref")
    assert [r["step"] for r in ref] == list(range(1, 7))
    for r in ref:
        assert r["trivial"] > 0 and r["pred_std"] > 0 and r["target_std"] > 0 and 0 <= r["blank_share"] <= 1
    assert ref[1]["lr"] == pytest.approx(2e-4 + (1e-3 - 2e-4) / 4)  # start_lr -> lr warmup, step 1
    assert ref[0]["wd"] == pytest.approx(0.04) and ref[3]["wd"] == pytest.approx(0.22)  # cosine 0.04 -> 0.4, mid-way
    backbone = common.load_backbone(str(tmp_path / "ref" / "backbone.safetensors"))
    ckpt, _ = common.read_safetensors(common.latest_checkpoint(tmp_path / "ref") / "weights.safetensors")
    for k, v in backbone.state_dict().items():  # the exported backbone is the target encoder
        assert torch.equal(v, ckpt["target_encoder." + k]), k

    # stop a second run mid-way with SIGTERM (it checkpoints and exits), then --resume it
    run_dir = tmp_path / "res"
    stop_when_logged(run_cli(steps + ["--out_dir", str(run_dir)], popen=True), run_dir / "metrics.jsonl", 2)
    stopped_at = int(common.latest_checkpoint(run_dir).name.split("_")[1])
    assert 2 <= stopped_at < 6, "the signal should stop the run mid-way"
    run_cli(steps + ["--out_dir", str(run_dir), "--resume"])
    res = metrics(run_dir)
    assert [r["step"] for r in res] == list(range(1, 7))
    for a, b in zip(ref, res):
        for key in ("loss", "trivial", "pred_std", "target_std", "context_tokens", "target_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_two_gloo_processes_train_and_export(tmp_path):
    res = run_cli(["--steps", "3", "--out_dir", str(tmp_path)], nproc=2)
    assert "2 process(es)" in res.stdout
    logged = metrics(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3]
    # the loop's momentum is the linear 0.996 -> 1 schedule over the run's 3 steps
    assert [r["momentum"] for r in logged] == pytest.approx([0.996, 0.996 + 0.004 / 3, 0.996 + 0.008 / 3])
    model = common.load_backbone(str(tmp_path / "backbone.safetensors"))
    assert model.embed_dim == 192


def test_patch_size_sets_the_grid_and_a_bad_crop_fails(tmp_path):
    run_cli(["--patch_size", "8", "--img_size", "48", "--steps", "2", "--out_dir", str(tmp_path / "p8")])
    logged = metrics(tmp_path / "p8")
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["context_tokens"] + r["target_tokens"] <= 36 for r in logged)  # a 6 x 6 grid
    b = common.load_backbone(str(tmp_path / "p8" / "backbone.safetensors"))
    assert b.patch_size == 8
    bad = run_recipe("ijepa.py", FAST + ["--patch_size", "8", "--img_size", "52", "--steps", "1", "--out_dir",
                                         str(tmp_path / "bad")], check=False)
    assert bad.returncode != 0 and "not a multiple of the backbone's 8 px patches" in bad.stderr
