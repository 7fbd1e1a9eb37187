"""CAPI essentials against hand-computed values, the two-rank reductions, and short runs of the
real command line (smoke and export, exact resume, --init, two processes)."""
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import capi
import common
from cli import read_metrics, run_recipe, stop_when_logged



# ---------------------------------------------------------------------------------------
# Position-wise Sinkhorn-Knopp
# ---------------------------------------------------------------------------------------

def test_positionwise_sinkhorn_knopp_hand_values():
    # (B=2, N=2, K=2); exp(logits / temp) at position 0 = [[1, 2], [3, 4]], at position 1 = [[1, 1], [1, 3]]
    temp = 0.06
    e = torch.tensor([[[1.0, 2.0], [1.0, 1.0]], [[3.0, 4.0], [1.0, 3.0]]])  # (B, N, K)
    q = capi.positionwise_sinkhorn_knopp(temp * e.log(), temp, n_iters=1)
    # position 0: prototypes over the batch (1/4, 3/4) and (1/3, 2/3); tokens normalised:
    # image 0 (1/4, 1/3) / (7/12) = (3/7, 4/7), image 1 (3/4, 2/3) / (17/12) = (9/17, 8/17)
    assert q[0, 0].tolist() == pytest.approx([3 / 7, 4 / 7], rel=1e-5)
    assert q[1, 0].tolist() == pytest.approx([9 / 17, 8 / 17], rel=1e-5)
    # position 1 on its own: (1/2, 1/2) and (1/4, 3/4) -> image 0 (2/3, 1/3), image 1 (2/5, 3/5)
    assert q[0, 1].tolist() == pytest.approx([2 / 3, 1 / 3], rel=1e-5)
    assert q[1, 1].tolist() == pytest.approx([2 / 5, 3 / 5], rel=1e-5)
    # the standard (all-positions) Sinkhorn-Knopp would mix the two positions: image 0 at position 0
    # would be (1/6, 2/10) / (11/30) = (5/11, 6/11) after the same iteration
    assert q[0, 0].tolist() != pytest.approx([5 / 11, 6 / 11], rel=1e-3)


def paper_pseudo_code(logits, temp, n_iters):
    """Figure 11(b) of the paper, verbatim in spirit: M (b n d), M /= M.sum(0), M /= M.sum(2)."""
    M = (logits.double() / temp).exp()
    for _ in range(n_iters):
        M = M / M.sum(dim=0, keepdim=True)
        M = M / M.sum(dim=2, keepdim=True)
    return M.float()


def test_sinkhorn_knopp_balances_each_position_and_matches_the_paper():
    torch.manual_seed(0)
    B, N, K = 12, 5, 4
    logits = torch.randn(B, N, K)
    q = capi.positionwise_sinkhorn_knopp(logits, 0.5, n_iters=3)
    assert torch.allclose(q, paper_pseudo_code(logits, 0.5, 3), atol=1e-5)
    assert torch.allclose(q.sum(-1), torch.ones(B, N), atol=1e-6)  # one unit per token
    # 3 iterations bring every prototype closer to B/K at every position than a softmax is
    softmax_gap = ((logits / 0.5).softmax(-1).sum(0) - B / K).abs().max()
    assert (q.sum(0) - B / K).abs().max() < 0.5 * softmax_gap
    q = capi.positionwise_sinkhorn_knopp(logits, 0.5, n_iters=300)
    assert torch.allclose(q.sum(0), torch.full((N, K), B / K), atol=1e-4)  # exact at convergence
    # sharp temperature on large logits: the exponent of the paper's version overflows, the log
    # domain keeps every token a distribution
    sharp = capi.positionwise_sinkhorn_knopp(logits * 40, 0.06, n_iters=3)
    assert torch.isfinite(sharp).all() and torch.allclose(sharp.sum(-1), torch.ones(B, N), atol=1e-5)
    assert not torch.isfinite(paper_pseudo_code(logits * 40, 0.06, 3)).all()


def _two_rank_worker(rank, port, out_dir, logits, counts, predict_idx):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    start = sum(counts[:rank])
    local = logits[start:start + counts[rank]]
    targets = capi.positionwise_sinkhorn_knopp(local, 0.06, 3)
    picked = targets.gather(1, predict_idx[start:start + counts[rank], :, None].expand(-1, -1, logits.shape[-1]))
    torch.save({"targets": targets, "stats": capi.target_statistics(targets, picked)}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    B, N, K = 6, 4, 5
    logits, counts = torch.randn(B, N, K) * 0.2, (2, 4)  # unequal per-rank batches
    predict_idx = torch.randint(0, N, (B, 2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path), logits, counts, predict_idx), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    ref = capi.positionwise_sinkhorn_knopp(logits, 0.06, 3)
    assert torch.allclose(torch.cat([r0["targets"], r1["targets"]]), ref, atol=1e-6)
    # each rank on its own would balance a different batch: the reduction matters
    alone = torch.cat([capi.positionwise_sinkhorn_knopp(logits[:2], 0.06, 3),
                       capi.positionwise_sinkhorn_knopp(logits[2:], 0.06, 3)])
    assert not torch.allclose(alone, ref, atol=1e-3)
    picked = ref.gather(1, predict_idx[..., None].expand(-1, -1, K))
    stats = capi.target_statistics(ref, picked)
    for r in (r0, r1):  # global statistics: the same on every rank as on one process
        assert r["stats"]["prototypes_in_use"].item() == stats["prototypes_in_use"].item()
        assert r["stats"]["marginal_entropy"].item() == pytest.approx(stats["marginal_entropy"].item(), abs=1e-6)


# ---------------------------------------------------------------------------------------
# Losses and logged signals
# ---------------------------------------------------------------------------------------

def test_loss_hand_computed():
    # temp 0.5 doubles the logits: (ln 3, 0) -> softmax (3/4, 1/4)
    logits = torch.tensor([[0.5 * math.log(3.0), 0.0]] * 2)
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    per_token = capi.soft_cross_entropy(logits, targets, 0.5)
    assert per_token.tolist() == pytest.approx([math.log(4 / 3), 0.5 * math.log(16 / 3)], rel=1e-6)


def test_target_statistics_hand_computed():
    # one image, two positions, K = 3: token a = (1, 0, 0), token b = (1/4, 3/4, 0)
    targets = torch.tensor([[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0]]])
    stats = capi.target_statistics(targets, targets[:, :1])  # token a is the predicted one
    h_b = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert stats["target_entropy"].item() == pytest.approx(h_b / 2, rel=1e-6)
    assert stats["prototypes_in_use"].item() == 2  # a tops prototype 0, b prototype 1, none prototype 2
    # marginal (5/8, 3/8, 0): its entropy, and the loss of predicting it at token a: -ln(5/8)
    assert stats["marginal_entropy"].item() == pytest.approx(-(0.625 * math.log(0.625) + 0.375 * math.log(0.375)),
                                                             rel=1e-6)
    assert stats["trivial"].item() == pytest.approx(-math.log(0.625), rel=1e-6)


def test_heads_are_normalised():
    head = capi.PrototypeHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # L2-normalised input (3, 4) -> (0.6, 0.8); unit prototypes (1, 0), (0, 1); g = 1
    assert head(torch.tensor([[3.0, 4.0]])).tolist()[0] == pytest.approx([0.6, 0.8], rel=1e-6)
    with torch.no_grad():
        head.norm_scale.fill_(2.0)
    assert head(torch.tensor([[3.0, 4.0]])).tolist()[0] == pytest.approx([1.2, 1.6], rel=1e-6)
    clustering = capi.OnlineClustering(2, 2)
    with torch.no_grad():
        clustering.layer.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
        clustering.layer.bias.copy_(torch.tensor([0.5, 0.0]))
    # (0.6, 0.8) -> (1.4 + 0.5, 1.2)
    assert clustering(torch.tensor([[30.0, 40.0]])).tolist()[0] == pytest.approx([1.9, 1.2], rel=1e-6)


# ---------------------------------------------------------------------------------------
# Inverse block masks with roll
# ---------------------------------------------------------------------------------------

def draws(grid, ratio=0.65, n=200, roll=True, subsample=0.2):
    N = grid[0] * grid[1]
    n_masked = int(N * ratio)
    n_predict = max(1, int(n_masked * subsample))
    for i in range(n):
        yield (n_masked, n_predict, *capi.inverse_block_masks(8, grid, n_masked, n_predict,
                                                              common.step_generator(0, i), roll=roll))


@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (14, 14), (6, 10)])
def test_masks_hit_the_ratio_and_predict_masked_patches(grid):
    N = grid[0] * grid[1]
    for n_masked, n_predict, visible_idx, predict_idx, masked in draws(grid, n=50):
        assert (masked.sum(1) == n_masked).all()  # exactly int(N * 0.65) masked, every image
        assert visible_idx.shape == (8, N - n_masked) and predict_idx.shape == (8, n_predict)
        for b in range(8):
            assert visible_idx[b].tolist() == sorted(set(visible_idx[b].tolist()))
            assert not masked[b, visible_idx[b]].any()
            assert masked[b, predict_idx[b]].all() and len(set(predict_idx[b].tolist())) == n_predict


def kept_rows(mask_row_major, H, W):
    kept = ~mask_row_major.view(H, W)
    return [r for r in range(H) if kept[r].any()], kept


def test_unrolled_kept_region_is_a_rectangle_truncated_at_its_lower_right():
    H, W = 8, 8
    for _, _, _, _, masked in draws((H, W), roll=False, n=50):
        for b in range(8):
            rows, kept = kept_rows(masked[b], H, W)
            assert rows == list(range(rows[0], rows[-1] + 1))  # contiguous rows, never wrapped
            cols = [kept[r].nonzero().flatten().tolist() for r in rows]
            width, left = len(cols[0]), cols[0][0]
            for c in cols[:-1]:
                assert c == list(range(left, left + width))  # full rows of the block
            assert cols[-1] == list(range(left, left + len(cols[-1])))  # the cut row starts at the left


def test_roll_wraps_and_evens_out_the_masking():
    H = W = 8
    wrapped = 0
    freq_roll, freq_plain = torch.zeros(H * W), torch.zeros(H * W)
    for (_, _, _, _, m_roll), (_, _, _, _, m_plain) in zip(draws((H, W), n=300), draws((H, W), n=300, roll=False)):
        freq_roll += m_roll.float().sum(0)
        freq_plain += m_plain.float().sum(0)
        for b in range(8):
            rows, _ = kept_rows(m_roll[b], H, W)
            wrapped += 0 in rows and H - 1 in rows and len(rows) < H  # the block crosses the border
    assert wrapped > 50
    freq_roll, freq_plain = freq_roll / 2400, freq_plain / 2400
    # every position is masked ~65% of the time with the roll; without it the centre is kept far more
    assert (freq_roll - int(64 * 0.65) / 64).abs().max() < 0.06
    plain = freq_plain.view(H, W)
    center, corner = plain[3:5, 3:5].mean(), plain[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
    assert corner - center > 0.3


# ---------------------------------------------------------------------------------------
# Predictor and student
# ---------------------------------------------------------------------------------------

def tiny_student():
    torch.manual_seed(0)
    enc = common.ViT(embed_dim=32, depth=2, num_heads=2, n_registers=2, layerscale_init=None)
    pred = capi.Predictor(32, 2, enc.n_prefix, depth=2, drop_path=0.0)
    return capi.Student(enc, pred, capi.PrototypeHead(32, 8)).eval()


def test_predictor_queries_cannot_attend_to_each_other():
    student = tiny_student()
    torch.manual_seed(1)
    context = torch.randn(2, 3 + 5, 32)  # cls, 2 registers, 5 visible patches
    visible_idx = torch.tensor([[0, 1, 4, 5, 9], [2, 3, 6, 7, 8]])
    predict_idx = torch.tensor([[2, 10, 15], [0, 12, 14]])
    out = student.predictor(context, visible_idx, predict_idx, (4, 4))  # (B, 3, D)
    moved = predict_idx.clone()
    moved[:, 2] = torch.tensor([11, 5])
    again = student.predictor(context, visible_idx, moved, (4, 4))
    assert torch.allclose(again[:, :2], out[:, :2], atol=1e-6)  # the other queries do not see the change
    assert not torch.allclose(again[:, 2], out[:, 2], atol=1e-4)  # the moved query sits at its new position
    alone = student.predictor(context, visible_idx, predict_idx[:, 1:2], (4, 4))
    assert torch.allclose(alone[:, 0], out[:, 1], atol=1e-6)  # one query alone = the same query among others
    context2 = context.clone()
    context2[:, 4] += 1.0  # a visible patch does move every prediction
    assert not torch.allclose(student.predictor(context2, visible_idx, predict_idx, (4, 4)), out, atol=1e-4)


def test_student_sees_the_visible_patches_only():
    student = tiny_student()
    img = torch.rand(2, 1, 64, 64)  # 4 x 4 patches
    visible_idx, predict_idx, masked = capi.inverse_block_masks(2, (4, 4), 10, 3, common.step_generator(0, 3))
    out = student(img, visible_idx, predict_idx)
    assert out.shape == (2, 3, 8)
    img2 = img.clone()
    for i in masked[0].nonzero().flatten().tolist():
        r, c = divmod(i, 4)
        img2[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = torch.rand(1, 16, 16)
    assert torch.allclose(student(img2, visible_idx, predict_idx), out, atol=1e-5)


def test_each_loss_trains_only_its_own_parameters():
    student = tiny_student().train()
    clustering = capi.OnlineClustering(32, 8)
    teacher = tiny_student().encoder.requires_grad_(False)
    img = torch.rand(2, 1, 64, 64)
    visible_idx, predict_idx, _ = capi.inverse_block_masks(2, (4, 4), 10, 3, common.step_generator(0, 4))
    with torch.no_grad():
        patches = teacher(common.to_model_input(img))["patches"]
    logits = clustering(patches)
    targets = capi.positionwise_sinkhorn_knopp(logits.detach(), 0.06)
    picked = targets.gather(1, predict_idx[..., None].expand(-1, -1, 8))
    capi.soft_cross_entropy(student(img, visible_idx, predict_idx), picked, 0.12).mean().backward()
    assert all(p.grad is None for p in clustering.parameters())
    assert all(p.grad is not None for p in student.parameters())
    student.zero_grad(set_to_none=True)
    capi.soft_cross_entropy(logits, targets, 0.12).mean().backward()
    assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in clustering.parameters())


# ---------------------------------------------------------------------------------------
# Command line: smoke and export, resume, --init, two gloo processes
# ---------------------------------------------------------------------------------------

FAST = ["--preset", "tiny", "--batch_size", "4", "--n_prototypes", "8", "--num_workers", "0", "--log_every", "1",
        "--pred_depth", "1"]


def run_cli(args, nproc=None, popen=False):
    return run_recipe("capi.py", FAST + args, nproc, popen=popen)


metrics = read_metrics


def test_smoke_export_resume_and_init(tmp_path):
    steps = ["--steps", "6", "--warmup_steps", "4"]
    run_cli(steps + ["--out_dir", str(tmp_path / "ref")])
    ref = metrics(tmp_path / "ref")
    assert [r["step"] for r in ref] == list(range(1, 7))
    for r in ref:
        assert math.isfinite(r["loss"]) and 0 <= r["target_entropy"] <= math.log(8) + 1e-5
        assert 1 <= r["prototypes_in_use"] <= 8 and 0 <= r["blank_share"] <= 1 and r["trivial"] > 0
    assert ref[1]["lr"] == pytest.approx(2e-3 / 4) and ref[1]["momentum"] == pytest.approx(1 - 2 * 2e-3 / 4)
    backbone = common.load_backbone(str(tmp_path / "ref" / "backbone.safetensors"))
    assert backbone.n_registers == 4
    ckpt, _ = common.read_safetensors(common.latest_checkpoint(tmp_path / "ref") / "weights.safetensors")
    for k, v in backbone.state_dict().items():  # the exported backbone is the teacher
        assert torch.equal(v, ckpt["teacher." + k]), k

    # stop a second run mid-way with SIGTERM (it checkpoints and exits), then --resume it
    run_dir = tmp_path / "res"
    stop_when_logged(run_cli(steps + ["--out_dir", str(run_dir)], popen=True), run_dir / "metrics.jsonl", 2)
    stopped_at = int(common.latest_checkpoint(run_dir).name.split("_")[1])
    assert 2 <= stopped_at < 6, "the signal should stop the run mid-way"
    run_cli(steps + ["--out_dir", str(run_dir), "--resume"])
    res = metrics(run_dir)
    assert [r["step"] for r in res] == list(range(1, 7))
    for a, b in zip(ref, res):
        for key in ("loss", "clustering", "target_entropy", "prototypes_in_use", "trivial", "blank_share"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)

    # --init: the first step has lr 0 and momentum 1, so after it the exported teacher is exactly
    # the given backbone; --n_registers does not apply to a loaded backbone
    init = tmp_path / "ref" / "backbone.safetensors"
    run_cli(["--steps", "1", "--init", str(init), "--n_registers", "16", "--out_dir", str(tmp_path / "init")])
    again = common.load_backbone(str(tmp_path / "init" / "backbone.safetensors"))
    assert again.n_registers == 4
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_two_gloo_processes_train_and_export(tmp_path):
    res = run_cli(["--steps", "2", "--out_dir", str(tmp_path)], nproc=2)
    assert "2 process(es)" in res.stdout
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert common.load_backbone(str(tmp_path / "backbone.safetensors")).embed_dim == 192


def test_help_lists_the_recipe_flags(capsys):
    with pytest.raises(SystemExit) as e:
        capi.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--pred_subsample", "--n_prototypes", "--teacher_temp", "--momentum_lr_mult", "--roll"):
        assert flag in out
