"""RADIO essentials against hand-computed values (Hadamard and PHI-S, losses, resolution
matching), teachers that stay frozen and differ in width and patch size, the two-rank PHI-S
statistics, and short runs of the real command line (smoke and export, exact resume, torchrun)."""
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
import radio



# ---------------------------------------------------------------------------------------
# Hadamard matrices and PHI-S
# ---------------------------------------------------------------------------------------

def test_paley_and_sylvester_hadamard_hand_values():
    # Paley I with q = 3: squares mod 3 = {1}, so Q = [[0, 1, -1], [-1, 0, 1], [1, -1, 0]]
    expected = torch.tensor([[1, 1, 1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1], [-1, 1, -1, 1]], dtype=torch.float64)
    assert torch.equal(radio.paley_hadamard(3), expected)
    assert torch.allclose(radio.hadamard(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / 2 ** 0.5)
    for n in (1, 2, 4, 8, 12, 20, 24, 192, 384, 768, 1024):  # 192 = 12 x 16: vit_tiny's width
        H = radio.hadamard(n)
        assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-10), n
        assert torch.allclose(H.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64)), n
    assert radio.hadamard(10) is None and radio.hadamard(28) is None  # -> the Givens fallback


def test_phis_hand_computed_two_dims():
    # points (+-2, 0), (0, +-1): mean 0, covariance diag(2, 0.5), alpha = 1 / sqrt(1.25)
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    stats = radio.FeatureStatistics(2)
    stats.update(x[None], x)
    phis = radio.PHIS.from_statistics(stats)
    assert float(phis.alpha) == pytest.approx(1.25 ** -0.5)
    y = phis(x).double()
    cov = y.T @ y / 4
    # each dimension: alpha^2 (0.5 + 2) / 2 = 1; the Hadamard mixes the eigenvalues into the
    # off-diagonal alpha^2 (0.5 - 2) / 2 = -0.6: an isotropic scale, not whitening
    assert cov.flatten().tolist() == pytest.approx([1.0, -0.6, -0.6, 1.0], abs=1e-6)
    assert torch.allclose(phis.inverse(phis(x)), x, atol=1e-6)


@pytest.mark.parametrize("dim", [8, 12, 10])  # Sylvester, Paley, Givens fallback
def test_phis_gives_unit_variance_on_correlated_data(dim):
    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(4000, dim, generator=g) @ torch.randn(dim, dim, generator=g)) * torch.rand(dim, generator=g) * 3
    x = x + torch.randn(dim, generator=g)
    stats = radio.FeatureStatistics(dim)
    for chunk in x.split(1000):  # streaming over batches
        stats.update(chunk.view(10, 100, dim), chunk[:10])
    phis = radio.PHIS.from_statistics(stats)
    y = phis(x).double()
    cov = (y - y.mean(0)).T @ (y - y.mean(0)) / y.shape[0]
    assert torch.allclose(cov.diagonal(), torch.ones(dim, dtype=torch.float64), atol=1e-4)
    assert y.mean(0).abs().max() < 1e-4
    # the off-diagonals are those the rotation implies: alpha^2 R L R^T with R = rotation U / alpha
    xc = x.double() - x.double().mean(0)
    L, U = torch.linalg.eigh(xc.T @ xc / x.shape[0])
    R = phis.rotation.double() @ U / phis.alpha.double()
    assert torch.allclose(R @ R.T, torch.eye(dim, dtype=torch.float64), atol=1e-5)  # orthogonal
    assert torch.allclose(cov, phis.alpha.double() ** 2 * R @ torch.diag(L) @ R.T, atol=1e-4)
    assert (cov - torch.diag(cov.diagonal())).abs().max() > 1e-2  # not whitening
    assert torch.allclose(phis.inverse(phis(x)), x, atol=1e-4)


def test_equalising_rotation_hand_example():
    L = torch.tensor([3.0, 1.0, 0.5, 0.1, 0.4], dtype=torch.float64)  # width 5: no Hadamard; mean 1.0
    R = radio.equalising_rotation(L)
    assert torch.allclose(R @ R.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((R @ torch.diag(L) @ R.T).diagonal(), torch.ones(5, dtype=torch.float64), atol=1e-12)


def test_feature_statistics_and_dispersion_hand_values():
    stats = radio.FeatureStatistics(2)
    stats.update(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert float(stats.count) == 2 and stats.sum.tolist() == [4.0, 6.0]
    assert stats.outer.tolist() == [[10.0, 14.0], [14.0, 20.0]]
    phis = radio.PHIS.from_statistics(stats)
    # unit summaries (1, 0), (0, 1): mean resultant (1/2, 1/2), R = 1/sqrt(2), dispersion 2 (1 - R)
    assert phis.summary_mean.tolist() == pytest.approx([0.5, 0.5])
    assert float(phis.summary_dispersion) == pytest.approx(2 - 2 ** 0.5, rel=1e-6)


def _two_rank_worker(rank, port, out_dir, spatial, summary):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    stats = radio.FeatureStatistics(spatial.shape[-1])
    for b in range(rank, spatial.shape[0], 2):  # this rank's batches of a stream
        stats.update(spatial[b], summary[b])
    stats.all_reduce()
    phis = radio.PHIS.from_statistics(stats)
    torch.save({"outer": stats.outer, "sum": stats.sum, "count": stats.count, "phis": phis.state_dict()},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batches(tmp_path):
    g = torch.Generator().manual_seed(0)
    spatial = torch.randn(4, 3, 5, 8, generator=g) @ torch.randn(8, 8, generator=g) + 2  # 4 batches of (3, 5, 8)
    summary = torch.randn(4, 3, 8, generator=g) + 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path), spatial, summary), nprocs=2)
    one = radio.FeatureStatistics(8)
    one.update(spatial.flatten(0, 1), summary.flatten(0, 1))
    ref = radio.PHIS.from_statistics(one).state_dict()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert float(got["count"]) == 60
        assert torch.allclose(got["outer"], one.outer, rtol=1e-12) and torch.allclose(got["sum"], one.sum, rtol=1e-12)
        for k, v in ref.items():
            assert torch.allclose(got["phis"][k], v, atol=1e-5), k
    alone = radio.FeatureStatistics(8)
    alone.update(spatial[0], summary[0])
    assert not torch.allclose(alone.outer * 2, one.outer, rtol=1e-2)  # one rank alone sees other statistics


# ---------------------------------------------------------------------------------------
# Losses, learning signals, resolution matching
# ---------------------------------------------------------------------------------------

def test_amradio_losses_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, -2.0]])  # cosines 1/sqrt(2) and -1
    assert radio.amradio_summary_loss(pred, target).item() == pytest.approx(((1 - 2 ** -0.5) + 2) / 2)
    # one token: pred (1.5, 1) vs target (1, 1): cosine 2.5 / (sqrt(3.25) sqrt(2)); smooth L1 of
    # the differences (0.5, 0) = (0.5 * 0.25, 0), mean 0.0625
    cos = 2.5 / (3.25 ** 0.5 * 2 ** 0.5)
    got = radio.amradio_spatial_loss(torch.tensor([[[1.5, 1.0]]]), torch.tensor([[[1.0, 1.0]]])).item()
    assert got == pytest.approx(0.9 * (1 - cos) + 0.1 * 0.0625)
    # a difference of 3 is in the linear part of smooth L1: 3 - 0.5
    got = radio.amradio_spatial_loss(torch.tensor([[[4.0, 1.0]]]), torch.tensor([[[1.0, 1.0]]])).item()
    assert got == pytest.approx(0.9 * (1 - 5 / (17 ** 0.5 * 2 ** 0.5)) + 0.1 * 2.5 / 2)


def test_cradio_losses_hand_computed():
    assert radio.cradio_spatial_loss(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0, 0.0]]])).item() == 2.5
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 3.0], [2.0, 2.0]])  # angles pi/2 and 0
    got = radio.cradio_summary_loss(pred, target, torch.tensor(0.5)).item()
    assert got == pytest.approx((math.pi ** 2 / 4 + 0.0) / 2 / 0.5, rel=1e-4)
    # a teacher with constant summaries has dispersion ~0: the floor bounds its loss
    assert radio.cradio_summary_loss(pred, target, torch.tensor(1e-10)).item() == pytest.approx(
        (math.pi ** 2 / 8) / radio.MIN_DISPERSION, rel=1e-4)


def test_trivial_prediction_scores_exactly_the_logged_trivial_level():
    g = torch.Generator().manual_seed(1)
    spatial, summary = torch.randn(3, 4, 8, generator=g) + 1, torch.randn(3, 8, generator=g)
    stats = radio.FeatureStatistics(8)
    stats.update(spatial, summary)
    phis = radio.PHIS.from_statistics(stats)
    target = {"spatial": spatial, "summary": summary}
    c = radio.teacher_losses("cradio", summary, torch.zeros(3, 4, 8), target, phis)  # 0 = the mean in PHI-S space
    assert c["spatial"].item() == pytest.approx(c["spatial_trivial"].item(), rel=1e-6)
    assert c["spatial_trivial"].item() == pytest.approx(1.0, rel=1e-4)  # on its own statistics: exactly 1 per dim
    assert c["summary_cos"].item() == pytest.approx(1.0, rel=1e-6)
    a = radio.teacher_losses("amradio", summary, phis.mean.expand(3, 4, 8), target, phis)
    assert a["spatial"].item() == pytest.approx(a["spatial_trivial"].item(), rel=1e-6)


def test_resize_tokens_bilinear_hand_values():
    tokens = torch.tensor([[[0.0], [4.0]]])  # (1, 1*2, 1) on a 1 x 2 grid
    # output centres at -0.25, 0.25, 0.75, 1.25 input pixels (edges clamped): 0, 1, 3, 4
    assert radio.resize_tokens(tokens, (1, 2), (1, 4)).flatten().tolist() == pytest.approx([0.0, 1.0, 3.0, 4.0])
    assert radio.resize_tokens(tokens, (1, 2), (1, 2)) is tokens


def test_resolution_parts_split_and_draw():
    cfg = radio.RADIOConfig(low_res=(32, 64), high_res=(96,), high_fraction=0.25)
    crops = torch.rand(8, 1, 96, 96)
    parts = radio.resolution_parts(crops, cfg, common.step_generator(0, 5))
    assert [p.shape[0] for p, _ in parts] == [6, 2] and parts[1][1] == 96 and parts[0][1] in (32, 64)
    again = radio.resolution_parts(crops, cfg, common.step_generator(0, 5))
    assert [side for _, side in again] == [side for _, side in parts]  # one draw per (seed, step, rank)
    sides = {radio.resolution_parts(crops, cfg, common.step_generator(0, s))[0][1] for s in range(20)}
    assert sides == {32, 64}
    single = radio.resolution_parts(crops, radio.RADIOConfig(low_res=(32,), high_res=()), common.step_generator(0, 1))
    assert len(single) == 1 and single[0][0].shape[0] == 8


# ---------------------------------------------------------------------------------------
# Teachers and student together
# ---------------------------------------------------------------------------------------

def small_teacher(tmp_path) -> str:
    """A random ViT of another width and patch size, written the way the project writes backbones."""
    torch.manual_seed(3)
    path = tmp_path / "small_teacher.safetensors"
    common.save_backbone(common.ViT(embed_dim=64, depth=2, num_heads=2, patch_size=8, n_registers=0), path)
    return str(path)


def test_teachers_of_different_widths_and_patches_stay_frozen(tmp_path):
    teachers = [radio.Teacher("0", common.load_backbone("random:vit_tiny:1").requires_grad_(False).eval(), 1.0, 0),
                radio.Teacher("1", common.load_backbone(small_teacher(tmp_path)).requires_grad_(False).eval(), 0.5, 0)]
    assert [t.model.embed_dim for t in teachers] == [192, 64] and [t.model.patch_size for t in teachers] == [16, 8]
    student = common.ViT(embed_dim=32, depth=2, num_heads=2, n_registers=1)
    model = radio.Distiller(student, [192, 64], hidden=16, shared_summary=False)
    crops = torch.rand(4, 1, 48, 48)
    parts = [(crops[:2], 32), (crops[2:], 48)]
    for t in teachers:
        stats = radio.FeatureStatistics(t.model.embed_dim)
        for part, side in parts:
            out = t(part, side)
            stats.update(out["spatial"], out["summary"])
        t.phis = radio.PHIS.from_statistics(stats)
    targets = [[t(part, side) for t in teachers] for part, side in parts]
    assert [[tg["grid"] for tg in p] for p in targets] == [[(2, 2), (4, 4)], [(3, 3), (6, 6)]]
    assert all(not tg["spatial"].requires_grad for p in targets for tg in p)
    preds, _ = model([radio.resize_images(p, s) for p, s in parts], [[tg["grid"] for tg in p] for p in targets])
    assert preds[1][1][1].shape == (2, 36, 64) and preds[0][0][0].shape == (2, 192)  # student 2x2 grid -> 4x4
    assert preds[0][0][2] is None  # no shifted crops: every token counts
    loss = sum(t.weight * sum(radio.teacher_losses("cradio", s, sp, tg, t.phis)[k] for k in ("summary", "spatial"))
               for p, tgs in zip(preds, targets) for t, (s, sp, _), tg in zip(teachers, p, tgs))
    loss.backward()
    assert all(p.grad is None for t in teachers for p in t.model.parameters())
    assert all(p.grad is not None for p in model.parameters())
    # teacher i reads student token i (CLS, then register 0); shared: every teacher reads CLS
    model.summary_heads = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    img = torch.rand(1, 1, 32, 32)
    normed = student(common.to_model_input(img))["normed"]
    out = model([img], [[(2, 2), (4, 4)]])[0][0]
    assert torch.allclose(out[0][0], normed[:, 0]) and torch.allclose(out[1][0], normed[:, 1])
    with pytest.raises(SystemExit):
        radio.Distiller(student, [8, 8, 8], hidden=4, shared_summary=False)  # 3 teachers, 2 summary tokens


# ---------------------------------------------------------------------------------------
# Command line: smoke and export, exact resume, torchrun with two gloo processes
# ---------------------------------------------------------------------------------------

FAST = ["--preset", "tiny", "--batch_size", "4", "--low_res", "32", "--high_res", "48", "--adaptor_hidden", "16",
        "--phis_batches", "2", "--num_workers", "0", "--log_every", "1", "--warmup_steps", "2"]


def run_cli(args, nproc=None):
    return run_recipe("radio.py", FAST + args, nproc)


metrics = read_metrics


def test_smoke_export_resume_and_two_processes(tmp_path):
    teachers = ["--teachers", f"random:vit_tiny:1,{small_teacher(tmp_path)}", "--teacher_weights", "1,0.5"]
    run_cli(teachers + ["--steps", "4", "--out_dir", str(tmp_path / "ref")])
    ref = metrics(tmp_path / "ref")
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    for r in ref:
        assert math.isfinite(r["loss"]) and r["spatial_trivial_0"] > 0 and r["spatial_trivial_1"] > 0
        assert -1 <= r["summary_cos_1"] <= 1
    student = common.load_backbone(str(tmp_path / "ref" / "backbone.safetensors"))
    assert student.embed_dim == 192 and student.n_registers == 4  # DINOv3 format
    ckpt, _ = common.read_safetensors(common.latest_checkpoint(tmp_path / "ref") / "weights.safetensors")
    assert "spatial_heads.1.3.weight" in ckpt and ckpt["spatial_heads.1.3.weight"].shape == (64, 16)
    cached = sorted(p.name for p in (tmp_path / "ref").glob("phis_*.safetensors"))
    # named after the teacher's folder and file (runs/mae/backbone.safetensors -> 0_mae_backbone)
    assert cached == ["phis_0_random_vit_tiny_1.safetensors", f"phis_1_{tmp_path.name}_small_teacher.safetensors"]

    # 2 steps, then --resume to 4: the cached PHI-S is reused and the losses are identical
    part = tmp_path / "part"
    run_cli(teachers + ["--steps", "2", "--out_dir", str(part)])
    res = run_cli(teachers + ["--steps", "4", "--out_dir", str(part), "--resume"])
    assert "PHI-S statistics read from" in res.stdout
    got = metrics(part)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in ("loss", "spatial_0", "spatial_1", "summary_0", "summary_1", "spatial_trivial_1"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)

    # shifted crops + MESA: 2 steps, then --resume to 4, equal to 4 straight (the EMA is in the checkpoint)
    flags = teachers + ["--shift_max", "0.25", "--mesa_weight", "1", "--mesa_momentum", "0.9"]
    run_cli(flags + ["--steps", "4", "--out_dir", str(tmp_path / "mesa")])
    straight = metrics(tmp_path / "mesa")
    assert all(math.isfinite(r["mesa"]) and r["mesa"] >= 0 for r in straight)
    run_cli(flags + ["--steps", "2", "--out_dir", str(tmp_path / "mesa2")])
    run_cli(flags + ["--steps", "4", "--out_dir", str(tmp_path / "mesa2"), "--resume"])
    for a, b in zip(straight, metrics(tmp_path / "mesa2")):
        for key in ("loss", "mesa", "spatial_0", "spatial_trivial_1"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)

    # two gloo processes, AM-RADIO losses, continuing from the exported student
    two = tmp_path / "two"
    init = str(tmp_path / "ref" / "backbone.safetensors")
    res = run_cli(teachers + ["--steps", "2", "--loss", "amradio", "--init", init, "--out_dir", str(two)], nproc=2)
    assert "2 process(es)" in res.stdout and [r["step"] for r in metrics(two)] == [1, 2]
    assert common.load_backbone(str(two / "backbone.safetensors")).embed_dim == 192


def test_help_lists_the_recipe_flags(capsys):
    with pytest.raises(SystemExit) as e:
        radio.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--teachers", "--teacher_weights", "--teacher_res", "--phis_batches", "--low_res", "--loss"):
        assert flag in out


def test_repeated_teacher_flags_become_teachers_and_weights(tmp_path):
    ckpt = tmp_path / "t.safetensors"
    ckpt.write_bytes(b"")  # only its existence matters to the parser
    argv = radio.teacher_flags(["--teacher", "random:vit_tiny:0", "--teacher", f"{ckpt}:0.5",
                                "--teacher=random:vit_tiny:1:2", "--steps", "3"])
    assert argv[:2] == ["--steps", "3"]
    assert argv[argv.index("--teachers") + 1] == f"random:vit_tiny:0,{ckpt},random:vit_tiny:1"
    assert argv[argv.index("--teacher_weights") + 1] == "1,0.5,2"
    assert radio.teacher_flags(["--steps", "3"]) == ["--steps", "3"]
    with pytest.raises(SystemExit):
        radio.teacher_flags(["--teacher", "a", "--teachers", "b"])


def test_adaptor_is_radios_mlp_or_one_linear_when_hidden_is_0():
    mlp, lin = radio.adaptor(8, 16, 4), radio.adaptor(8, 0, 4)
    assert [type(m).__name__ for m in mlp] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert mlp[0].weight.shape == (16, 8) and mlp[3].weight.shape == (4, 16)
    assert len(lin) == 1 and lin[0].weight.shape == (4, 8)
    x = torch.randn(3, 8)
    assert torch.allclose(lin(x), x @ lin[0].weight.T + lin[0].bias)


@pytest.mark.parametrize("grid,size", [((6, 6), (8, 8)), ((12, 12), (7, 7)), ((2, 3), (4, 6))])
def test_aligned_tokens_without_a_shift_are_resize_tokens(grid, size):
    torch.manual_seed(0)
    patches = torch.randn(2, grid[0] * grid[1], 5)
    aligned, weight = radio.align_tokens(patches, grid, size, torch.zeros(2, 2), 1.0)
    assert torch.allclose(aligned, radio.resize_tokens(patches, grid, size), atol=1e-5)
    assert torch.equal(weight, torch.ones(2, size[0] * size[1]))


def test_aligned_tokens_follow_a_shift_by_hand():
    # student window: 4 x 4 tokens of 16 px over 64 px; each token's feature is its own centre (x, y)
    # in pixels. The teachers' window (same size) sits 16 px right and 32 px down: teacher token (r, c)
    # has its centre at (16 c + 8 + 16, 16 r + 8 + 32); it lies in the student window for c <= 2, r <= 1.
    centres = torch.tensor([[16 * c + 8.0, 16 * r + 8.0] for r in range(4) for c in range(4)])
    aligned, weight = radio.align_tokens(centres[None], (4, 4), (4, 4), torch.tensor([[16 / 64, 32 / 64]]), 1.0)
    expected = centres + torch.tensor([16.0, 32.0])
    valid = torch.tensor([float(r <= 1 and c <= 2) for r in range(4) for c in range(4)])
    assert torch.equal(weight[0], valid) and int(valid.sum()) == 6
    inside = valid.bool()
    assert torch.allclose(aligned[0][inside], expected[inside], atol=1e-5)
    # a window of half the side at the origin: centres 8 px apart from (4, 4)
    half, w = radio.align_tokens(centres[None], (4, 4), (4, 4), torch.zeros(1, 2), 0.5)
    inner = torch.tensor([[8 * c + 4.0, 8 * r + 4.0] for r in range(4) for c in range(4)])
    assert w.all()
    corner = torch.tensor([i for i in range(16) if 8 <= inner[i, 0] <= 56 and 8 <= inner[i, 1] <= 56])
    assert torch.allclose(half[0][corner], inner[corner], atol=1e-5)  # bilinear is exact between centres


def test_weighted_spatial_and_mesa_losses_by_hand():
    phis = radio.PHIS(2)  # identity rotation, zero mean, alpha 1: PHI-S leaves the target as it is
    phis.rotation.copy_(torch.eye(2))
    phis.alpha.fill_(1.0)
    pred = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])
    target = dict(spatial=torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), summary=torch.ones(1, 2))
    weight = torch.tensor([[1.0, 0.0]])  # the second token lies outside the student's window
    terms = radio.teacher_losses("cradio", torch.ones(1, 2), pred, target, phis, weight)
    assert float(terms["spatial"]) == pytest.approx(0.5)  # ((1 - 0)^2 + 0^2) / 2, first token only
    # MESA: layer norm (no affine) of (1, 3) is (-1, 1); of (2, 2) is (0, 0): squared difference mean 1
    s = torch.tensor([[[1.0, 3.0], [0.0, 9.0]]])
    e = torch.tensor([[[2.0, 2.0], [9.0, 0.0]]])
    assert float(radio.mesa_loss(s, e, weight)) == pytest.approx(1.0, abs=1e-4)
    assert float(radio.mesa_loss(s, s, torch.ones(1, 2))) == pytest.approx(0.0, abs=1e-6)


def test_random_windows_cut_the_crop_at_their_offsets():
    crops = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    wins, off, side = radio.random_windows(crops, 0.25, torch.Generator().manual_seed(0))
    assert side == 6 and wins.shape == (2, 1, 6, 6) and ((off >= 0) & (off <= 2)).all()
    for i, (x, y) in enumerate(off.tolist()):
        assert torch.equal(wins[i, 0], crops[i, 0, y:y + 6, x:x + 6])


def test_mesa_ema_update_is_the_hand_formula_and_gets_no_grad():
    torch.manual_seed(0)
    student = common.ViT(embed_dim=32, depth=2, num_heads=2, n_registers=1)
    ema = radio.mesa_ema(student)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    native = torch.rand(2, 1, 48, 48)
    # the same weights on the same pixels (no shift, both in eval mode): the loss is 0
    out = student.eval()(common.to_model_input(radio.resize_images(native, 32)))
    same = radio.mesa_term(ema, native, 32, out["patches"], out["grid"], 0.0, torch.Generator().manual_seed(0))
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    # a shifted window: a positive loss whose gradient reaches the student only
    out = student.train()(common.to_model_input(radio.resize_images(native, 32)))
    loss = radio.mesa_term(ema, native, 32, out["patches"], out["grid"], 0.25, torch.Generator().manual_seed(0))
    assert float(loss.detach()) > 1e-4
    loss.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    old = [p.detach().clone() for p in ema.parameters()]
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    common.ema_update(ema, student, 0.9)
    moved = 0
    for e, o, s in zip(ema.parameters(), old, student.parameters()):
        assert torch.allclose(e, 0.9 * o + 0.1 * s.detach(), rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(s, o))
    assert moved > 0 and all(p.grad is None for p in ema.parameters())
