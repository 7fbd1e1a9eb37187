"""DINO / iBOT / DINOv2 essentials against hand-computed values, the two-rank reductions, and
short runs of the real command line (every variant, resume, two processes)."""
import math
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from cli import read_metrics, run_recipe, stop_when_logged
import ibot_dino



def test_dino_loss_hand_computed_over_pairs_of_different_views():
    # 2 global + 1 local student views, K = 2, one image; student temp 1 keeps the numbers simple
    s = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, math.log(3.0)]])]
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    # log-softmax: view 0 -> (ln 1/2, ln 1/2), view 1 -> (ln 3/4, ln 1/4), view 2 -> (ln 1/4, ln 3/4)
    # pairs (t0, s1), (t0, s2), (t1, s0), (t1, s2); (t0, s0) and (t1, s1) are the same view
    expected = (-math.log(3 / 4) - math.log(1 / 4) + math.log(2) + (-0.5 * math.log(1 / 4) - 0.5 * math.log(3 / 4))) / 4
    assert ibot_dino.dino_loss(s, t, student_temp=1.0).item() == pytest.approx(expected, rel=1e-6)
    # the temperature divides the student logits: temp 0.5 doubles them
    s2 = [x / 2 for x in s]
    assert ibot_dino.dino_loss(s2, t, student_temp=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_centered_teacher_softmax_and_center_update():
    logits = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    center = torch.tensor([[0.5, 0.5]])
    p = ibot_dino.centered_softmax(logits, center, temp=0.5)
    # row 0: softmax((0.5, -0.5) / 0.5) = softmax(1, -1); row 1: softmax(5, 3)
    e = math.exp(2.0)
    assert p[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-6)
    assert p[1].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-6)
    # batch mean (2, 1); new center = 0.9 * (0.5, 0.5) + 0.1 * (2, 1) = (0.65, 0.55)
    new = ibot_dino.update_center(center, logits, momentum=0.9)
    assert new.tolist()[0] == pytest.approx([0.65, 0.55], rel=1e-6)
    # a fresh centre starts at the first batch's mean: TeacherTargets with first_step=True
    targets = ibot_dino.TeacherTargets(2, sinkhorn=False, momentum=0.9, device="cpu")
    first = targets(logits, "dino", 0.5, first_step=True)  # centred on (2, 1): rows (-1, -1), (1, 1)
    assert first.tolist()[0] == pytest.approx([0.5, 0.5])
    assert targets.centers["dino_center"].tolist()[0] == pytest.approx([2.0, 1.0])


def test_collapse_warning_at_ln_k_and_near_zero():
    ln_k = math.log(256)
    assert "uniform" in ibot_dino.collapse_warning(ln_k, ln_k)
    assert "constant" in ibot_dino.collapse_warning(0.01, ln_k)
    assert ibot_dino.collapse_warning(0.6 * ln_k, ln_k) is None


def test_sinkhorn_knopp_hand_values_and_marginals():
    # exp(logits / temp) = [[1, 2], [3, 4]] (rows = samples). One iteration, by hand:
    # prototype columns normalised: [[1/4, 1/3], [3/4, 2/3]]; then each row normalised:
    # row 0 (1/4, 1/3) / (7/12) = (3/7, 4/7), row 1 (3/4, 2/3) / (17/12) = (9/17, 8/17)
    temp = 0.1
    logits = temp * torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    q = ibot_dino.sinkhorn_knopp(logits, temp, n_iters=1)
    assert q.tolist()[0] == pytest.approx([3 / 7, 4 / 7], rel=1e-5)
    assert q.tolist()[1] == pytest.approx([9 / 17, 8 / 17], rel=1e-5)
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    q = ibot_dino.sinkhorn_knopp(x, 1.0, n_iters=3)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-6)  # every sample is a distribution
    assert torch.allclose(q.sum(0), torch.full((5,), 12 / 5), atol=0.05)  # prototypes ~ B / K each
    q = ibot_dino.sinkhorn_knopp(x, 1.0, n_iters=200)
    assert torch.allclose(q.sum(0), torch.full((5,), 12 / 5), atol=1e-4)  # exact at convergence


def test_koleo_three_points_and_tiny_batch_guard():
    # normalised: a = (1, 0), b = (0.6, 0.8), c = (0, 1); nearest neighbours a->b, b->c, c->b
    x = torch.tensor([[2.0, 0.0], [3.0, 4.0], [0.0, 0.5]], requires_grad=True)
    d_ab, d_bc = math.sqrt(0.4 ** 2 + 0.8 ** 2), math.sqrt(0.6 ** 2 + 0.2 ** 2)
    expected = -(math.log(d_ab + 1e-8) + 2 * math.log(d_bc + 1e-8)) / 3
    loss = ibot_dino.koleo_loss(x)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    one = torch.ones(1, 4, requires_grad=True)
    guarded = ibot_dino.koleo_loss(one)
    assert guarded.item() == 0.0
    guarded.backward()  # stays in the graph, so DDP still sees the parameters used


def test_koleo_duplicate_rows_put_eps_inside_the_distance():
    # a = (1, 0) twice and c = (0, 1); neighbours a0->a1, a1->a0, c->a (either copy). The official
    # distance is ||x - y + eps|| (eps added to every coordinate), then -log(d + eps):
    # duplicates: d = ||(eps, eps)|| = sqrt(2) eps; c: d = ||(-1 + eps, 1 + eps)|| = sqrt(2 + 2 eps^2)
    eps = 1e-8
    d_dup, d_c = math.sqrt(2) * eps, math.sqrt((eps - 1) ** 2 + (1 + eps) ** 2)
    expected = -(2 * math.log(d_dup + eps) + math.log(d_c + eps)) / 3  # 11.5773...
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert ibot_dino.koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)
    # ||x - y|| + eps would give -(2 ln(eps) + ln(sqrt 2)) / 3 = 12.1 instead
    assert abs(ibot_dino.koleo_loss(x).item() - (-(2 * math.log(eps) + math.log(math.sqrt(2))) / 3)) > 0.5


def test_teacher_temperature_reaches_its_final_value_like_linspace():
    # np.linspace(0.04, 0.07, 3) = (0.04, 0.055, 0.07): the final value at step warmup - 1 = 2
    cfg = ibot_dino.DINOConfig(teacher_temp_start=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=3)
    temps = [ibot_dino.teacher_temperature(s, cfg) for s in range(5)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07], abs=1e-12)
    # linspace(a, b, 1) = (a,): one warmup step at the start value; no warmup: the final value
    one = ibot_dino.DINOConfig(teacher_temp_start=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=1)
    assert [ibot_dino.teacher_temperature(s, one) for s in range(2)] == [0.04, 0.07]
    none = ibot_dino.DINOConfig(teacher_temp_start=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=0)
    assert ibot_dino.teacher_temperature(0, none) == 0.07


def test_ibot_loss_uses_masked_positions_only():
    masks = torch.tensor([[True, False, False, True], [False, False, False, False], [False, True, False, False]])
    index, weight = ibot_dino.masked_tokens(masks)
    assert index.tolist() == [0, 3, 9]  # flattened (image * 4 + position)
    assert weight.tolist() == [0.5, 0.5, 1.0]  # 1 / masked tokens of the token's image
    K = 3
    logits = torch.zeros(3, 4, K)  # student logits at every position (the head runs on masked ones)
    logits[0, 0] = torch.tensor([math.log(2.0), 0.0, 0.0])  # log-softmax ln(1/2), ln(1/4), ln(1/4)
    targets = torch.zeros(3, 4, K)
    targets[0, 0] = torch.tensor([1.0, 0.0, 0.0])
    targets[0, 3] = torch.tensor([0.0, 1.0, 0.0])
    targets[2, 1] = torch.tensor([0.0, 0.0, 1.0])

    def loss(lg):
        flat_s, flat_t = lg.flatten(0, 1)[index], targets.flatten(0, 1)[index]
        return ibot_dino.ibot_loss(flat_s, flat_t, weight, n_images=3, student_temp=1.0).item()

    # image 0: (ln 2 + ln 3) / 2 over its 2 masked tokens; image 1: none (counts 0); image 2: ln 3
    expected = ((math.log(2) + math.log(3)) / 2 + 0.0 + math.log(3)) / 3
    assert loss(logits) == pytest.approx(expected, rel=1e-6)
    other = logits.clone()
    other[~masks] = torch.randn(int((~masks).sum()), K) * 10  # unmasked positions change freely
    assert loss(other) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("h,w", [(4, 4), (14, 14), (6, 10)])
def test_block_masks_hit_the_requested_ratio(h, w):
    rng = random.Random(0)
    n = h * w
    for ratio in (0.1, 0.25, 0.5):
        want = max(1, int(n * ratio))
        for _ in range(20):
            assert int(ibot_dino.block_mask(h, w, want, rng, max_block=n // 2).sum()) == want
    # a 14 x 14 mask of 30% is made of blocks: most masked patches have a masked 4-neighbour
    m = ibot_dino.block_mask(14, 14, 58, random.Random(1), max_block=98).view(14, 14)
    nb = torch.zeros_like(m)
    nb[1:] |= m[:-1]
    nb[:-1] |= m[1:]
    nb[:, 1:] |= m[:, :-1]
    nb[:, :-1] |= m[:, 1:]
    assert (m & nb).sum() >= 0.8 * m.sum()
    # DINOv2 scheme: int(16 * 0.5) = 8 of 16 crops masked, ratios stratified over (0.1, 0.5)
    masks = ibot_dino.draw_masks(16, 14, 14, 0.5, (0.1, 0.5), random.Random(2))
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == 8
    ratios = sorted(c / 196 for c in counts.tolist() if c)
    edges = [0.1 + 0.05 * i for i in range(9)]
    for r, lo, hi in zip(ratios, edges, edges[1:]):
        assert lo - 1 / 196 <= r <= hi


def _two_rank_worker(rank, port, out_dir, teacher, center, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    start = sum(counts[:rank])
    local = teacher[start:start + counts[rank]]  # unequal row counts, as masked tokens have
    res = {"softmax": ibot_dino.centered_softmax(local, center, 0.04),
           "center": ibot_dino.update_center(center, local, 0.9),
           "sk": ibot_dino.sinkhorn_knopp(local, 0.04)}
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    teacher, center, counts = torch.randn(10, 6) * 0.1, torch.randn(1, 6) * 0.05, (4, 6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path), teacher, center, counts), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    ref_center = ibot_dino.update_center(center, teacher, 0.9)
    ref_sk = ibot_dino.sinkhorn_knopp(teacher, 0.04)
    assert torch.allclose(r0["center"], ref_center, atol=1e-6) and torch.allclose(r1["center"], ref_center, atol=1e-6)
    assert torch.allclose(torch.cat([r0["softmax"], r1["softmax"]]), ibot_dino.centered_softmax(teacher, center, 0.04))
    assert torch.allclose(torch.cat([r0["sk"], r1["sk"]]), ref_sk, atol=1e-6)
    # and a per-rank Sinkhorn-Knopp would differ: the reduction matters
    assert not torch.allclose(torch.cat([ibot_dino.sinkhorn_knopp(teacher[:4], 0.04),
                                         ibot_dino.sinkhorn_knopp(teacher[4:], 0.04)]), ref_sk, atol=1e-3)


def test_head_shapes_weight_norm_and_variants():
    bb = common.ViT(embed_dim=32, depth=1, num_heads=2, n_registers=1)
    cfg = ibot_dino.DINOConfig(variant="dino", n_prototypes=16, head_hidden=24, head_bottleneck=8)
    model = ibot_dino.build_model(bb, cfg)
    assert model.ibot_head is None and not model.dino_head.last_layer.norm_scale.requires_grad
    # prototypes have norm g = 1 and the bottleneck is unit-norm, so every logit is a cosine
    out = model(torch.rand(4, 1, 32, 32), torch.rand(6, 1, 16, 16))
    assert out["dino"].shape == (10, 16) and out["dino"].abs().max() <= 1 + 1e-5
    cfg2 = ibot_dino.DINOConfig(variant="dinov2", n_prototypes=16, head_hidden=24, head_bottleneck=8)
    model2 = ibot_dino.build_model(bb, cfg2)
    assert model2.ibot_head is not None and model2.dino_head.last_layer.norm_scale.requires_grad


def run_cli(args, nproc=None, popen=False):
    small = ["--preset", "tiny", "--batch_size", "4", "--n_local", "2", "--n_prototypes", "64", "--head_hidden", "32",
             "--head_bottleneck", "16", "--num_workers", "0", "--log_every", "1", "--arch", "vit_tiny"]
    return run_recipe("ibot_dino.py", small + args, nproc, popen=popen, check=False)


def metrics(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir)}


@pytest.mark.parametrize("variant", ["dino", "ibot", "dinov2"])
def test_smoke_each_variant_exports_the_teacher(tmp_path, variant):
    res = run_cli(["--variant", variant, "--steps", "3", "--out_dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path)
    assert sorted(m) == [1, 2, 3]
    for r in m.values():
        assert math.isfinite(r["loss"]) and 0 <= r["teacher_entropy"] <= math.log(64) + 1e-4
        assert ("ibot" in r) == (variant != "dino") and ("koleo" in r) == (variant == "dinov2")
    b = common.load_backbone(str(tmp_path / "backbone.safetensors"))
    ckpt = common.latest_checkpoint(tmp_path)
    teacher = common.load_backbone(str(ckpt / "weights.safetensors"), prefix="teacher.backbone.")
    for (k, v), t in zip(b.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(v, t), k


def test_resume_reproduces_losses_and_centers(tmp_path):
    steps = ["--variant", "ibot", "--steps", "10"]
    ref = run_cli(steps + ["--out_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    # stop a second run mid-way with SIGTERM (it checkpoints and exits), then --resume it
    run_dir = tmp_path / "res"
    stop_when_logged(run_cli(steps + ["--out_dir", str(run_dir)], popen=True), run_dir / "metrics.jsonl", 2)
    stopped_at = int(common.latest_checkpoint(run_dir).name.split("_")[1])
    assert 2 <= stopped_at < 10, "the signal should stop the run mid-way"
    again = run_cli(steps + ["--out_dir", str(run_dir), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = metrics(tmp_path / "ref"), metrics(run_dir)
    assert sorted(b) == list(range(1, 11))
    for s in range(1, 11):
        for k in ("loss", "dino", "ibot", "teacher_entropy", "cls_patch_cos"):  # the cosine: measured at step 0 only
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-5, abs=1e-6), (s, k)
    sa = torch.load(common.latest_checkpoint(tmp_path / "ref") / "state.pt", weights_only=True)["extra"]
    sb = torch.load(common.latest_checkpoint(run_dir) / "state.pt", weights_only=True)["extra"]
    assert set(sa) == {"dino_center", "ibot_center", "cls_patch_cos"}
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k


def test_two_process_smoke(tmp_path):
    res = run_cli(["--variant", "dinov2", "--steps", "2", "--out_dir", str(tmp_path)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(metrics(tmp_path)) == [1, 2]
    common.load_backbone(str(tmp_path / "backbone.safetensors"))


def test_patch_size_sets_the_grid_of_backbone_and_masks_and_bad_crops_fail(tmp_path):
    res = run_cli(["--variant", "ibot", "--patch_size", "8", "--global_size", "32", "--local_size", "16", "--steps", "2",
                   "--out_dir", str(tmp_path / "p8")])
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path / "p8")
    assert sorted(m) == [1, 2] and all(math.isfinite(r["ibot"]) for r in m.values())
    b = common.load_backbone(str(tmp_path / "p8" / "backbone.safetensors"))
    assert b.patch_size == 8 and b(torch.zeros(1, 3, 32, 32))["grid"] == (4, 4)
    bad = run_cli(["--patch_size", "8", "--global_size", "36", "--steps", "1", "--out_dir", str(tmp_path / "bad")])
    assert bad.returncode != 0 and "multiples of the backbone's 8 px patches" in bad.stderr


def test_tiny_preset_resolution_and_explicit_flags_win():
    cfg = common.parse_config(ibot_dino.DINOConfig, ibot_dino.PRESETS, "ibot_dino", ["--preset", "tiny"])
    tiny = ibot_dino.PRESETS["tiny"]
    assert cfg.patch_size == tiny.get("patch_size", 16) and cfg.global_size % cfg.patch_size == 0
    assert cfg.local_size % cfg.patch_size == 0 and cfg.n_prototypes == tiny["n_prototypes"]
    cfg = common.parse_config(ibot_dino.DINOConfig, ibot_dino.PRESETS, "ibot_dino",
                              ["--preset", "tiny", "--patch_size", "16", "--global_size", "96"])
    assert (cfg.patch_size, cfg.global_size) == (16, 96)
    assert common.parse_config(ibot_dino.DINOConfig, ibot_dino.PRESETS, "ibot_dino", ["--preset", "small"]).patch_size == 16
