"""DINOv3 / Gram anchoring essentials against hand-computed values, the two-rank Sinkhorn-Knopp,
and short runs of the real command line (official-format --init, resume across a Gram teacher
refresh, two processes)."""
import copy
import dataclasses
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from cli import read_metrics, run_recipe
import dinov3_gram



def test_gram_loss_hand_computed_per_image():
    # image 0: student patches (3, 0), (0, 2) -> normalised (1, 0), (0, 1): Gram = identity;
    # teacher (1, 0), (1, 1) -> (1, 0), (1, 1)/sqrt 2: Gram [[1, 1/sqrt 2], [1/sqrt 2, 1]].
    # Squared differences: two off-diagonal entries of 1/2 -> sum 1. Image 1 is identical in
    # both (sum 0). Mean over 2 images x 2 x 2 entries: 1 / 8.
    student = torch.tensor([[[3.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, -1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]]])
    assert dinov3_gram.gram_loss(student, teacher).item() == pytest.approx(1 / 8, rel=1e-6)
    # a Gram matrix over the whole batch (4 x 4, cross-image similarities) would give another value
    xs = torch.nn.functional.normalize(student.flatten(0, 1), dim=-1)
    xt = torch.nn.functional.normalize(teacher.flatten(0, 1), dim=-1)
    assert torch.nn.functional.mse_loss(xs @ xs.t(), xt @ xt.t()).item() != pytest.approx(1 / 8, rel=1e-3)


def test_gram_loss_zero_for_identical_and_invariant_to_a_shared_rotation():
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 8), torch.randn(3, 5, 4)  # the Gram teacher may be narrower
    assert dinov3_gram.gram_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert dinov3_gram.gram_loss(x * 7.0, x).item() == pytest.approx(0.0, abs=1e-6)  # features are L2-normalised
    q, _ = torch.linalg.qr(torch.randn(8, 8))  # orthogonal
    ref = dinov3_gram.gram_loss(x, y).item()
    assert ref > 0.05
    assert dinov3_gram.gram_loss(x @ q, y).item() == pytest.approx(ref, rel=1e-5)
    q4, _ = torch.linalg.qr(torch.randn(4, 4))
    assert dinov3_gram.gram_loss(x, y @ q4).item() == pytest.approx(ref, rel=1e-5)


def test_hires_features_resized_to_the_student_grid():
    # constant features stay constant (the bicubic weights sum to 1)
    const = torch.tensor([1.5, -2.0, 0.25]).expand(2, 64, 3)  # (n, 8*8, D)
    out = dinov3_gram.resize_patches(const, (8, 8), (4, 4))
    assert out.shape == (2, 16, 3) and torch.allclose(out, const[:, :16], atol=1e-6)
    # 2 x 2 -> 1 x 1: the output sits at source coordinate 0.5, taps -1, 0, 1, 2 with Keys weights
    # (a = -0.75) -0.09375, 0.59375, 0.59375, -0.09375; clamped at the border -> 0.5, 0.5: the mean
    four = torch.tensor([[1.0], [2.0], [4.0], [8.0]])[None]  # (1, 4, 1)
    assert dinov3_gram.resize_patches(four, (2, 2), (1, 1)).item() == pytest.approx(15 / 4, rel=1e-6)
    # a ramp f = column index on 8 x 8 -> 4 x 4: away from the border the kernel is symmetric, so
    # output column j is the value at the centre of source columns 2j, 2j+1: 2j + 0.5
    ramp = torch.arange(8.0).repeat(8)[None, :, None]  # (1, 64, 1), row-major
    out = dinov3_gram.resize_patches(ramp, (8, 8), (4, 4)).view(4, 4)
    for j in (1, 2):
        assert torch.allclose(out[:, j], torch.full((4,), 2 * j + 0.5), atol=1e-5)
    # through a real Gram teacher: crops rendered at 2x (64 px, 4 x 4 patches) -> the 2 x 2 student grid
    vit = common.ViT(embed_dim=32, depth=1, num_heads=2, n_registers=1).eval()
    feats = dinov3_gram.gram_teacher_patches(vit, torch.rand(3, 1, 64, 64), (2, 2))
    assert feats.shape == (3, 4, 32) and not feats.requires_grad
    same = torch.rand(3, 1, 32, 32)
    assert torch.equal(dinov3_gram.gram_teacher_patches(vit, same, (2, 2)),
                       vit(common.to_model_input(same))["patches"])


def test_dino_loss_local_pairs_weighted():
    # 2 global + 1 local student views, K = 2 (the ibot_dino test's numbers); pairs (t0, s1), (t1, s0)
    # are global, (t0, s2) and (t1, s2) local; student temp 1
    s = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, math.log(3.0)]])]
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    ce_01, ce_10 = -math.log(3 / 4), math.log(2)
    ce_02, ce_12 = -math.log(1 / 4), -(0.5 * math.log(1 / 4) + 0.5 * math.log(3 / 4))
    for w in (1.0, 0.5):
        expected = (ce_01 + ce_10 + w * (ce_02 + ce_12)) / 4
        assert dinov3_gram.dino_loss(s, t, student_temp=1.0, local_weight=w).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_duplicate_rows_put_eps_inside_the_distance():
    # the ibot_dino test's rows: a = (1, 0) twice and c = (0, 1); d = ||x - y + eps||, loss -log(d + eps)
    eps = 1e-8
    d_dup, d_c = math.sqrt(2) * eps, math.sqrt((eps - 1) ** 2 + (1 + eps) ** 2)
    expected = -(2 * math.log(d_dup + eps) + math.log(d_c + eps)) / 3
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert dinov3_gram.koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)


def test_teacher_temperature_reaches_its_final_value_at_warmup_like_dinov3():
    # DINOv3: np.linspace(0.04, 0.07, 3, endpoint=False) = (0.04, 0.05, 0.06), then 0.07 from step 3
    cfg = dinov3_gram.DINOConfig(teacher_temp_start=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=3)
    temps = [dinov3_gram.teacher_temperature(s, cfg) for s in range(5)]
    assert temps == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07], abs=1e-12)


def test_separate_heads_with_plain_linear_prototypes():
    bb = common.ViT(embed_dim=32, depth=1, num_heads=2, n_registers=1)
    cfg = dinov3_gram.DINOConfig(n_prototypes=16, head_hidden=24, head_bottleneck=8)
    model = dinov3_gram.build_model(bb, cfg)
    assert model.ibot_head is not model.dino_head
    for head in (model.dino_head, model.ibot_head):
        assert type(head.last_layer) is torch.nn.Linear and head.last_layer.bias is None  # no weight norm
        assert [n for n, _ in head.last_layer.named_parameters()] == ["weight"]
    out = model(torch.rand(4, 1, 32, 32), torch.rand(6, 1, 16, 16), masked_index=torch.tensor([0, 5]))
    assert out["dino"].shape == (10, 16) and out["ibot"].shape == (2, 16) and out["patches"].shape == (4, 4, 32)


def test_gram_and_local_weights_ramp_together():
    cfg = dinov3_gram.DINOConfig(gram_start=10, gram_ramp_steps=4, gram_weight=2.0, dino_local_weight=0.5)
    expected = {0: (0.0, 1.0), 10: (0.0, 1.0), 11: (0.5, 0.875), 12: (1.0, 0.75), 14: (2.0, 0.5), 1000: (2.0, 0.5)}
    for step, (gram, local) in expected.items():
        assert dinov3_gram.gram_weights(step, cfg) == pytest.approx((gram, local)), step


def test_gram_teacher_copied_and_refreshed_at_the_scheduled_steps_at_most_m_times():
    cfg = dinov3_gram.DINOConfig(gram_start=10, gram_refresh_every=5, gram_max_refreshes=3)

    def due(c, anchored=False):
        return [s for s in range(200) if dinov3_gram.gram_teacher_update(s, c, anchored)]

    assert due(cfg) == [10, 15, 20, 25]  # taken at gram_start, then 3 refreshes, then never again
    assert due(cfg, anchored=True) == [15, 20, 25]  # --gram_teacher / --init give the first one
    assert due(dataclasses.replace(cfg, gram_teacher_step=4)) == [4, 15, 20, 25]
    assert due(dataclasses.replace(cfg, gram_refresh_every=0)) == [10]
    assert due(dataclasses.replace(cfg, gram_max_refreshes=0)) == [10]


def test_gram_teacher_gets_no_gradient():
    torch.manual_seed(0)
    student = common.ViT(embed_dim=32, depth=2, num_heads=2, n_registers=1, rope_rescale=2.0)
    gram_teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student.train()
    crops = torch.rand(2, 1, 32, 32)
    hires = torch.nn.functional.interpolate(crops, scale_factor=2, mode="bilinear")
    targets = dinov3_gram.gram_teacher_patches(gram_teacher, hires, (2, 2))
    assert not targets.requires_grad
    loss = dinov3_gram.gram_loss(student(common.to_model_input(crops))["patches"], targets)
    loss.backward()
    assert all(p.grad is None for p in gram_teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def _two_rank_worker(rank, port, out_dir, logits, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    start = sum(counts[:rank])
    torch.save(dinov3_gram.sinkhorn_knopp(logits[start:start + counts[rank]], 0.04), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_sinkhorn_knopp_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    logits, counts = torch.randn(10, 6) * 0.1, (4, 6)  # unequal row counts, as masked tokens have
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path), logits, counts), nprocs=2)
    both = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    assert torch.allclose(both, dinov3_gram.sinkhorn_knopp(logits, 0.04), atol=1e-6)


# --- the real command line -------------------------------------------------------------------

def run_cli(args, nproc=None):
    small = ["--preset", "tiny", "--batch_size", "4", "--n_local", "2", "--n_prototypes", "64", "--head_hidden", "32",
             "--head_bottleneck", "16", "--num_workers", "0", "--log_every", "1", "--arch", "vit_tiny"]
    return run_recipe("dinov3_gram.py", small + args, nproc, check=False)


def metrics(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir)}


def checkpoint_part(run_dir, prefix):
    sd, _ = common.read_safetensors(common.latest_checkpoint(run_dir) / "weights.safetensors")
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def official_state_dict(dim=128, depth=2):
    """Key names and shapes of an official DINOv3 ViT .pth (dinov3_vits16_pretrain_lvd1689m has
    dim 384, depth 12), narrow and shallow for speed."""
    sd = {"cls_token": torch.randn(1, 1, dim), "storage_tokens": torch.randn(1, 4, dim),
          "mask_token": torch.randn(1, dim) * 0.02, "patch_embed.proj.weight": torch.randn(dim, 3, 16, 16) * 0.02,
          "patch_embed.proj.bias": torch.zeros(dim), "rope_embed.periods": 100 ** (2 * torch.arange(16) / 32.0),
          "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": torch.ones(dim), b + "norm1.bias": torch.zeros(dim),
                   b + "attn.qkv.weight": torch.randn(3 * dim, dim) * 0.02, b + "attn.qkv.bias": torch.zeros(3 * dim),
                   b + "attn.qkv.bias_mask": torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]),
                   b + "attn.proj.weight": torch.randn(dim, dim) * 0.02, b + "attn.proj.bias": torch.zeros(dim),
                   b + "ls1.gamma": torch.full((dim,), 0.1), b + "norm2.weight": torch.ones(dim),
                   b + "norm2.bias": torch.zeros(dim), b + "mlp.fc1.weight": torch.randn(4 * dim, dim) * 0.02,
                   b + "mlp.fc1.bias": torch.zeros(4 * dim), b + "mlp.fc2.weight": torch.randn(dim, 4 * dim) * 0.02,
                   b + "mlp.fc2.bias": torch.zeros(dim), b + "ls2.gamma": torch.full((dim,), 0.1)})
    return sd


def test_init_from_official_dinov3_state_dict_with_head_warmup(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(sd, path)
    out = tmp_path / "run"
    res = run_cli(["--init", str(path), "--steps", "2", "--head_warmup_steps", "2", "--gram_start", "0",
                   "--gram_ramp_steps", "1", "--out_dir", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(out)
    assert [m[s]["grad_norm"] for s in (1, 2)] == [0.0, 0.0]  # backbone frozen while the heads warm up
    assert m[2]["gram_weight"] == 2.0 and math.isfinite(m[2]["gram"])
    # student, EMA teacher and Gram teacher all hold the official weights (the backbone never moved)
    for prefix in ("student.backbone.", "teacher.backbone.", "gram_teacher."):
        part = checkpoint_part(out, prefix)
        assert set(part) == set(sd), prefix
        for k, v in sd.items():
            assert torch.equal(part[k], v), (prefix, k)
    exported = common.load_backbone(str(out / "backbone.safetensors"))
    assert exported.embed_dim == 128 and torch.equal(exported.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_resume_across_a_gram_refresh_reproduces_losses(tmp_path):
    # Gram teacher copied from the EMA teacher before step 2, refreshed before step 4 (at most once)
    gram = ["--gram_start", "2", "--gram_ramp_steps", "1", "--gram_refresh_every", "2", "--gram_max_refreshes", "1",
            "--cls_patch_every", "2"]
    ref = run_cli(gram + ["--steps", "6", "--out_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    a = metrics(tmp_path / "ref")
    assert sorted(a) == list(range(1, 7))
    assert [a[s]["gram"] for s in (1, 2, 3)] == [0.0, 0.0, 0.0] and all(a[s]["gram"] > 0 for s in (4, 5, 6))
    assert a[6]["local_weight"] == 0.5 and a[1]["local_weight"] == 1.0
    common.load_backbone(str(tmp_path / "ref" / "backbone.safetensors"))

    run_dir = tmp_path / "res"
    first = run_cli(gram + ["--steps", "4", "--out_dir", str(run_dir)])
    assert first.returncode == 0, first.stderr[-3000:]
    teacher_at_4 = checkpoint_part(run_dir, "teacher.backbone.")
    gram_at_4 = checkpoint_part(run_dir, "gram_teacher.")
    assert any(not torch.equal(teacher_at_4[k], gram_at_4[k]) for k in gram_at_4)
    again = run_cli(gram + ["--steps", "6", "--out_dir", str(run_dir), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Gram teacher <- EMA teacher after 4 steps" in again.stdout
    b = metrics(run_dir)
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        for k in ("loss", "dino", "ibot", "koleo", "gram", "teacher_entropy", "cls_patch_cos"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-5, abs=1e-6), (s, k)
    gram_at_6 = checkpoint_part(run_dir, "gram_teacher.")
    for k, v in teacher_at_4.items():  # the refresh before step 4 copied the EMA teacher of that moment
        assert torch.equal(gram_at_6[k], v), k


def test_two_process_smoke(tmp_path):
    res = run_cli(["--steps", "2", "--gram_start", "0", "--gram_ramp_steps", "1", "--out_dir", str(tmp_path)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path)
    assert sorted(m) == [1, 2] and m[2]["gram"] > 0
    common.load_backbone(str(tmp_path / "backbone.safetensors"))


def test_patch_size_8_runs_with_the_gram_teacher_and_bad_crops_fail(tmp_path):
    res = run_cli(["--patch_size", "8", "--global_size", "32", "--local_size", "16", "--steps", "3", "--gram_start", "1",
                   "--gram_ramp_steps", "1", "--out_dir", str(tmp_path / "p8")])
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path / "p8")
    assert sorted(m) == [1, 2, 3] and m[3]["gram"] >= 0 and math.isfinite(m[3]["loss"])
    assert common.load_backbone(str(tmp_path / "p8" / "backbone.safetensors")).patch_size == 8
    bad = run_cli(["--patch_size", "8", "--local_size", "20", "--steps", "1", "--out_dir", str(tmp_path / "bad")])
    assert bad.returncode != 0 and "multiples of the backbone's 8 px patches" in bad.stderr
