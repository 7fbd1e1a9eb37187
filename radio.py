"""RADIO: multi-teacher distillation of sheet-trained backbones into one student.

Ranzinger et al., "AM-RADIO: Agglomerative Vision Foundation Model" (CVPR 2024); Ranzinger et
al., "PHI-S: Distribution Balancing for Label-Free Multi-Teacher Distillation" (2024); Heinrich
et al., "RADIOv2.5" (CVPR 2025); "C-RADIOv4" tech report (2026). NVIDIA's repository
(NVlabs/RADIO) ships models, not training code. A student ViT learns only to reproduce frozen
teachers: for each teacher, one student summary token (its CLS, then its registers) goes
through a summary adaptor to match the teacher's CLS, and the student's patch tokens, resized
(bilinear) to the teacher's token grid, go through a spatial adaptor to match the teacher's
patch features. Every teacher is distilled at a low and a high student resolution in every step
(RADIOv2.5's cure for "mode switching"). Two loss families: AM-RADIO (summary cosine distance;
spatial 0.9 cosine + 0.1 smooth L1 on raw features) and C-RADIO (spatial MSE against PHI-S
normalised teacher features; summary angle^2 divided by the angular dispersion of that teacher's
summaries). The student backbone is exported; the adaptor heads stay in the checkpoint.

Teachers: `--teacher PATH[:weight]`, repeated (or `--teachers A,B` with `--teacher_weights 1,0.5`),
takes anything `common.load_backbone` reads (this project's
backbone.safetensors, an official DINOv3 .pth, `random:vit_tiny:SEED`); each may have its own
width and patch size. `--teacher_weights 1,0.5` weighs their losses (default all 1) and
`--teacher_res 224,0` sets each teacher's input side in pixels (0: the student's resolution of
that step, so teacher and student see the same pixels). Teachers are frozen, in eval mode, run
under no_grad and bf16 autocast on GPU.

Commands:
  CPU, tiny (distils the MAE tiny run and DINOv3 continued from it; ~1.2 s/step on 2 cores, ~16 min):
      python mae.py --preset tiny
      python dinov3_gram.py --preset tiny --init runs/mae/backbone.safetensors --steps 600 --gram_start 100 \
          --gram_max_refreshes 0 --out_dir runs/dinov3_gram_init_mae
      python radio.py --preset tiny
  one GPU, ViT-S student:   torchrun --standalone --nproc_per_node=1 radio.py --preset small --data DIR \
      --teacher runs/dinov3_gram/backbone.safetensors --teacher dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth:0.5
  8 GPUs, ViT-B student:    torchrun --standalone --nproc_per_node=8 radio.py --preset base --data DIR --teacher ...
  many nodes:  torchrun --nnodes 4 --node_rank $i --master_addr $HOST --master_port 29500 \
               --nproc_per_node 8 radio.py --preset base --data DIR --out_dir /shared/runs/radio --teacher ...
  AM-RADIO losses instead of C-RADIO:  same command + --loss amradio
  shift-equivariant distillation and MESA:  same command + --shift_max 0.25 --mesa_weight 1
  continue from other weights:  --init path/to/backbone.safetensors;  resume: same command + --resume
Then probe the student and its teachers in one table:
  python eval_probe.py --ckpt runs/radio/backbone.safetensors --ckpt runs/mae/backbone.safetensors \
      --ckpt runs/dinov3_gram_init_mae/backbone.safetensors

Deviations from the papers (and why):
- PHI-S rotation for widths that are not powers of two: a Hadamard matrix of order 2^k (q + 1)
  from Paley's construction (q prime, q = 3 mod 4) doubled by Sylvester's; that covers every
  ViT width here (192 = 12 x 16, 384 = 12 x 32, 768 = 12 x 64, 1024 = 2^10). For any other
  width the rotation is built from Givens rotations that set the diagonal of the rotated
  covariance to its mean one coordinate at a time (D - 1 rotations, exact): every output
  dimension then has unit variance, which is PHI-S's property; only the off-diagonals differ from
  a Hadamard's. The statistics come from `phis_batches` batches of a separate seeded stream and
  are cached in the run dir (phis_<i>_<name>.safetensors), so resume does not recompute them.
- C-RADIO summary loss: angle^2 / D with D = 2 (1 - R), R the mean resultant length of the
  teacher's unit summaries over the PHI-S batches (the circular-statistics squared angular
  deviation, close to the mean squared angle to the mean direction for concentrated summaries).
  The report describes the normalisation, not this exact estimator; ours is one all-reducible sum.
- Multi-resolution: each step splits the batch into a low-resolution part (side drawn from
  `low_res`) and a high-resolution part (from `high_res`), every teacher distilled on both;
  C-RADIOv4 samples {128..432} and {512..1152}; the tiny preset uses {96, 128} and {160, 192}
  (with {192, 224}, the probe's tile included, the student probed worse: see PRESETS["tiny"]).
  All crops are cut at native resolution (scale jitter, ink-aware) at the largest side and
  downsampled (antialiased) for each model: no flips, blur or colour jitter on line art.
- Shifted crops (C-RADIOv4's shift-equivariant loss, `--shift_max F`, off by default): per image,
  the student and the teachers get two windows of side (1 - F) x the native crop at independent
  integer offsets; the student's tokens are sampled bilinearly (align_corners=False, the convention
  of the unshifted token resize, which it equals at zero shift) at each teacher token's centre, and
  the spatial losses (and their trivial levels) average over the teacher tokens whose centre lies
  inside the student's window. The report gives the idea, not the window sampling: ours is one.
- MESA (`--mesa_weight W`, off by default; `--mesa_momentum`, `--mesa_shift_max`): an EMA copy of
  the student (frozen, saved in the checkpoint) sees a window of side (1 - mesa_shift_max) x the
  student's native window, anywhere inside it, downsampled to the student's side (so it also sees a
  slight zoom); loss: mean squared difference of the layer-normed (no affine) student tokens,
  aligned as above, and EMA tokens. On the low-resolution part of each step only, to keep its cost
  down; the report leaves the EMA's view and this choice open.
- Not implemented: FeatSharp upsampling of low-resolution teachers.
- Optimiser: AdamW with cosine decay and gradient clipping; the papers' exact schedules are for
  hundreds of thousands of steps at batch 1024 and were not copied (small/base are our scaling).
- Tiny preset: adaptors are one Linear each instead of RADIO's 2-layer MLP (measured at the
  student's last block: +1.1 over random init with MLP adaptors, +2.6 with linear ones;
  results/probe_tiny_radio.md);
  teachers are the project's own tiny runs whose last blocks probe well. See PRESETS["tiny"].
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclasses.dataclass
class RADIOConfig(common.TrainConfig):
    # teachers
    teachers: tuple = ("runs/mae/backbone.safetensors", "runs/dinov3_gram/backbone.safetensors")  # teacher checkpoints
    teacher_weights: tuple = ()  # comma-separated loss weight per teacher (default all 1)
    teacher_res: tuple = ()  # comma-separated input side per teacher in pixels (0 or default: the student's resolution)
    # student and adaptors
    n_registers: int = 4  # student registers (4 keeps the exported backbone in DINOv3 format)
    summary_tokens: str = "separate"  # separate: teacher i reads student token i (CLS, registers) | shared: CLS
    adaptor_hidden: int = 1024  # hidden width of each adaptor MLP (Linear-LN-GELU-Linear); 0: one Linear
    rope_rescale: float = 2.0  # student RoPE coordinate jitter in [1/r, r] (0: off); teachers never jitter
    # losses
    loss: str = "cradio"  # cradio: PHI-S MSE + angle^2 / dispersion | amradio: cosine + smooth L1, summary cosine
    summary_weight: float = 1.0  # weight of every teacher's summary loss
    spatial_weight: float = 1.0  # weight of every teacher's spatial loss
    phis_batches: int = 200  # batches of teacher features for the PHI-S statistics (all ranks together)
    # resolutions and views
    low_res: tuple = (128, 192, 224, 256)  # student sides of the low-resolution part of each batch
    high_res: tuple = (384, 512)  # student sides of the high-resolution part (empty: low only)
    high_fraction: float = 0.5  # share of each rank's batch distilled at the high resolution
    # shift equivariance (C-RADIOv4) and MESA, both off by default
    shift_max: float = 0.0  # student and teachers see different windows of side (1 - this) x crop (0: same pixels)
    mesa_weight: float = 0.0  # weight of MESA: student vs its EMA on a shifted window, layer-normed tokens (0: off)
    mesa_momentum: float = 0.999  # EMA momentum of MESA's copy of the student
    mesa_shift_max: float = 0.25  # the EMA's window: side (1 - this) x the student's, anywhere inside it
    min_ink: float = 0.02  # resample crops with less ink than this fraction (0: off)
    scale_min: float = 0.8  # crop scale jitter: a region of side crop/scale is resampled to the crop,
    scale_max: float = 1.25  #   for scale in [scale_min, scale_max]
    tiles_per_sheet: int = 16  # consecutive crops cut from one rendered/decoded sheet
    # optimisation
    lr: float = 1e-3  # peak learning rate (AdamW), cosine to 0 after warmup
    warmup_steps: int = 2000  # linear lr warmup
    weight_decay: float = 0.02  # AdamW weight decay (not on biases, norms, tokens)
    clip_grad: float = 1.0  # gradient-norm clip (0: off)


PRESETS = {
    # 2-core CPU, ~16 min (~1.2 s/step with two ViT-Ti teachers; results/bench_tiny.md). The MAE lessons:
    # 128-ish px student crops, RoPE jitter 2 so small grids also see the 14 x 14 probe grid's spacing, high
    # lr with a short warmup, inky crops, ViT-Ti. Probe against random init of the student, 14.5
    # (results/probe_tiny_radio.md):
    # - teachers MAE + DINOv3 continued from MAE: both last blocks probe well (17.3, 18.4; RADIO's "teachers
    #   that work on your domain"); with MAE + CAPI, whose distilled last block probed 13.6, the student
    #   (MLP adaptors) reached 15.6 at its best block, 13.7 at its last (results/probe_tiny_radio_mae_capi.md).
    # - adaptor_hidden 0 (one Linear per adaptor): 17.1 at the last block (+2.6), against 15.6 with RADIO's
    #   MLP (hidden 384): in 800 steps the MLPs absorb the teacher mapping (spatial MSE ~0.08 of trivial)
    #   and the student's own tokens stay weak; a linear adaptor makes the student's tokens carry it.
    # - high_res (160, 192): with the probe's 224 px in the high set (192, 224; 650 steps in the same time)
    #   the student of MAE + CAPI probed 14.4 instead of 15.6 (results/probe_tiny_radio_highres_224.md).
    # The teachers come from `python mae.py --preset tiny` and `python dinov3_gram.py --preset tiny
    # --init runs/mae/backbone.safetensors --steps 600 --gram_start 100 --gram_max_refreshes 0
    # --out_dir runs/dinov3_gram_init_mae`.
    "tiny": dict(arch="vit_tiny", teachers=("runs/mae/backbone.safetensors",
                                            "runs/dinov3_gram_init_mae/backbone.safetensors"),
                 low_res=(96, 128), high_res=(160, 192), batch_size=32, steps=800, lr=2e-3, warmup_steps=30,
                 adaptor_hidden=0, phis_batches=8, min_ink=0.1, num_workers=1, log_every=20, ckpt_every=200),
    # C-RADIOv4's resolution partitions scaled to ViT-S/B budgets
    "small": dict(arch="vit_small", batch_size=1024, steps=100_000, num_workers=8, log_every=50, ckpt_every=2000),
    "base": dict(arch="vit_base", batch_size=1024, steps=100_000, high_res=(384, 512, 768), num_workers=10,
                 log_every=50, ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------
# PHI-S: a rotation that gives every teacher dimension the same variance
# ---------------------------------------------------------------------------------------

def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def paley_hadamard(q: int) -> torch.Tensor:
    """Paley I: for a prime q = 3 (mod 4), I + S with S = [[0, 1^T], [-1, Q]] and Q[i, j] the
    quadratic character of (j - i) mod q is a +-1 Hadamard matrix of order q + 1."""
    squares = {x * x % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, chi[(idx[None] - idx[:, None]) % q]
    return S + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """Normalised Hadamard matrix of order n (orthogonal, every entry +-1/sqrt(n)), float64:
    a Sylvester doubling of 1 or of a Paley matrix of order q + 1. None when n is not of the
    form 2^k or 2^k (q + 1), q prime = 3 (mod 4)."""
    for core in range(1, n + 1):
        doublings = n // core
        if n % core or doublings & (doublings - 1):  # n / core must be a power of two
            continue
        if core == 1:
            H = torch.ones(1, 1, dtype=torch.float64)
        elif core % 4 == 0 and _is_prime(core - 1):
            H = paley_hadamard(core - 1)
        else:
            continue
        while H.shape[0] < n:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
        return H / math.sqrt(n)
    return None


def equalising_rotation(eigvals: torch.Tensor) -> torch.Tensor:
    """Orthogonal R (float64, CPU) with diag(R diag(eigvals) R^T) = mean(eigvals) everywhere, for
    widths without a Hadamard matrix: each Givens rotation, in the plane of one coordinate above
    the mean and one below, brings the first exactly to the mean; D - 1 of them fix all."""
    D = eigvals.numel()
    A, R = torch.diag(eigvals.double().cpu()), torch.eye(D, dtype=torch.float64)
    target = float(eigvals.double().mean())
    free = list(range(D))
    while len(free) > 1:
        d = A.diagonal()[free] - target
        i, j = free[int(d.argmax())], free[int(d.argmin())]
        if float(A[i, i] - target) <= 1e-12 * max(abs(target), 1e-30):
            break  # every free coordinate is already at the mean
        # t = tan(angle) solves A_ii + 2 t A_ij + t^2 A_jj = target (1 + t^2); real as A_ii > target > A_jj
        a, b, c = float(A[j, j] - target), float(A[i, j]), float(A[i, i] - target)
        t = (-b - math.sqrt(b * b - a * c)) / a
        cos = 1 / math.sqrt(1 + t * t)
        sin = t * cos
        for M in (A, R):  # rows i, j of G M, with G the rotation in the (i, j) plane
            mi, mj = M[i].clone(), M[j].clone()
            M[i], M[j] = cos * mi + sin * mj, cos * mj - sin * mi
        ai, aj = A[:, i].clone(), A[:, j].clone()  # columns: (G A) G^T
        A[:, i], A[:, j] = cos * ai + sin * aj, cos * aj - sin * ai
        free.remove(i)
    return R


class FeatureStatistics:
    """Streaming float64 sums of one teacher's features: patch count, sum and sum of outer
    products (for PHI-S), and the sum of its unit summaries (for the summary dispersion). Sums
    all-reduced over ranks equal one process's sums over the concatenated batches."""

    def __init__(self, dim: int, device=None):
        z = dict(dtype=torch.float64, device=device)
        self.count, self.sum, self.outer = torch.zeros((), **z), torch.zeros(dim, **z), torch.zeros(dim, dim, **z)
        self.summary_count, self.summary_unit_sum = torch.zeros((), **z), torch.zeros(dim, **z)

    def update(self, spatial: torch.Tensor, summary: torch.Tensor):
        x = spatial.reshape(-1, spatial.shape[-1]).double()  # (n*N, D)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.summary_count += summary.shape[0]
        self.summary_unit_sum += F.normalize(summary.double(), dim=-1).sum(0)

    def all_reduce(self):
        parts = [self.count.reshape(1), self.sum, self.outer.flatten(), self.summary_count.reshape(1),
                 self.summary_unit_sum]
        flat = common.all_reduce_sum(torch.cat(parts))
        sizes = [p.numel() for p in parts]
        count, s, outer, summary_count, unit_sum = flat.split(sizes)
        self.count, self.sum, self.outer = count[0], s, outer.view_as(self.outer)
        self.summary_count, self.summary_unit_sum = summary_count[0], unit_sum


class PHIS(nn.Module):
    """y = alpha H U^T (x - mu), with Sigma = U L U^T and alpha = 1 / sqrt(mean(L)): every output
    dimension has unit variance (an isotropic scale, not whitening). Exact inverse:
    x = U H^T y / alpha + mu. Also carries the teacher's summary statistics."""

    def __init__(self, dim: int):
        super().__init__()
        for name, shape in (("mean", (dim,)), ("rotation", (dim, dim)), ("alpha", ()), ("summary_mean", (dim,)),
                            ("summary_dispersion", ())):
            self.register_buffer(name, torch.zeros(shape))

    @classmethod
    def from_statistics(cls, stats: FeatureStatistics) -> "PHIS":
        mean = stats.sum / stats.count
        cov = stats.outer / stats.count - torch.outer(mean, mean)  # population covariance, float64
        eigvals, U = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp(min=0)
        H = hadamard(mean.numel())
        H = H.to(U) if H is not None else equalising_rotation(eigvals).to(U)
        alpha = eigvals.mean().rsqrt()
        phis = cls(mean.numel())
        summary_mean = stats.summary_unit_sum / stats.summary_count
        for name, value in (("mean", mean), ("rotation", alpha * H @ U.T), ("alpha", alpha),
                            ("summary_mean", summary_mean), ("summary_dispersion", 2 * (1 - summary_mean.norm()))):
            getattr(phis, name).copy_(value.float())
        return phis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) @ self.rotation.T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.float() @ self.rotation / self.alpha ** 2 + self.mean  # rotation^-1 = rotation^T / alpha^2


# ---------------------------------------------------------------------------------------
# Teachers, adaptors, student
# ---------------------------------------------------------------------------------------

def resize_images(img: torch.Tensor, side: int) -> torch.Tensor:
    """(n, 1, S, S) -> (n, 1, side, side), bilinear with antialiasing (thin lines survive)."""
    if img.shape[-1] == side:
        return img
    return F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def resize_tokens(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(n, h*w, D) tokens on grid -> (n, H*W, D) on size, bilinear (RADIO's resolution matching)."""
    if tuple(grid) == tuple(size):
        return patches
    maps = patches.transpose(1, 2).unflatten(2, grid)  # (n, D, h, w)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)  # (n, H*W, D)


def random_windows(crops: torch.Tensor, frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A square window of side round(S (1 - frac)) at a random integer offset in each (n, 1, S, S)
    crop -> (windows (n, 1, s, s), offsets (n, 2) as (x, y) in pixels, s)."""
    S = crops.shape[-1]
    side = max(1, round(S * (1 - frac)))
    off = torch.randint(S - side + 1, (crops.shape[0], 2), generator=gen)
    wins = torch.stack([c[:, y:y + side, x:x + side] for c, (x, y) in zip(crops, off.tolist())])
    return wins, off.to(crops.device), side


def align_tokens(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], origin: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student tokens (n, h*w, D) covering the unit square of its window -> the same features sampled
    (bilinear, align_corners=False, the convention of resize_tokens) at the token centres of another
    window of grid `size` whose corner sits at `origin` (n, 2) (x, y) and whose side is `scale`, both in
    units of the student window's side. Returns (n, H*W, D) and a (n, H*W) weight: 1 where that centre
    lies inside the student window, else 0. origin 0, scale 1 gives resize_tokens."""
    H, W = size
    ys = (torch.arange(H, device=patches.device, dtype=torch.float32) + 0.5) / H
    xs = (torch.arange(W, device=patches.device, dtype=torch.float32) + 0.5) / W
    x = origin[:, 0, None, None].float() + scale * xs[None, None, :]  # (n, 1, W)
    y = origin[:, 1, None, None].float() + scale * ys[None, :, None]  # (n, H, 1)
    x, y = x.expand(-1, H, W), y.expand(-1, H, W)
    where = torch.stack([2 * x - 1, 2 * y - 1], dim=-1)  # grid_sample's (-1, 1) coordinates
    maps = patches.transpose(1, 2).unflatten(2, grid)  # (n, D, h, w)
    out = F.grid_sample(maps, where.to(maps.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    valid = ((x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)).flatten(1).float()
    return out.flatten(2).transpose(1, 2), valid


def weighted_mean(per_token: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of (n, N) values over the tokens of weight 1."""
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


def mesa_loss(student_tokens: torch.Tensor, ema_tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of layer-normed (no affine) student and EMA tokens, valid tokens only."""
    d = student_tokens.shape[-1]
    diff = F.layer_norm(student_tokens.float(), (d,)) - F.layer_norm(ema_tokens.float(), (d,))
    return weighted_mean(diff.pow(2).mean(-1), weight)


def mesa_ema(student: common.ViT) -> common.ViT:
    """MESA's EMA of the student: a copy, frozen and in eval mode (updated by common.ema_update)."""
    return copy.deepcopy(student).requires_grad_(False).eval()


def mesa_term(ema: common.ViT, native: torch.Tensor, res: int, tokens: torch.Tensor, grid: tuple[int, int],
              frac: float, gen: torch.Generator) -> torch.Tensor:
    """MESA on one part: the EMA sees a window of side (1 - frac) x the student's native window
    (n, 1, S, S), anywhere inside it, downsampled to the student's side res; the student's patch
    tokens (n, h*w, D) on grid are sampled at the EMA's token centres and compared (mesa_loss)."""
    win, off, side = random_windows(native, frac, gen)
    with torch.no_grad(), common.autocast(native.device):
        out = ema(common.to_model_input(resize_images(win, res)))
    S = native.shape[-1]
    aligned, weight = align_tokens(tokens, grid, out["grid"], off.float() / S, side / S)
    return mesa_loss(aligned, out["patches"], weight)


@dataclasses.dataclass
class Teacher:
    name: str
    model: common.ViT  # frozen, eval mode
    weight: float
    res: int  # input side in pixels; 0: the student's resolution
    phis: PHIS | None = None

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor, student_res: int) -> dict:
        """crops (n, 1, S, S) at native resolution -> summary (n, D), spatial (n, h*w, D), grid."""
        with common.autocast(crops.device):
            out = self.model(common.to_model_input(resize_images(crops, self.res or student_res)))
        return dict(summary=out["cls"].float(), spatial=out["patches"].float(), grid=out["grid"])


def load_teachers(cfg: RADIOConfig, device) -> list[Teacher]:
    n = len(cfg.teachers)
    weights = [float(w) for w in cfg.teacher_weights] or [1.0] * n
    sides = [int(r) for r in cfg.teacher_res] or [0] * n
    if not n or len(weights) != n or len(sides) != n:
        raise SystemExit(f"need one --teacher_weights and --teacher_res entry per teacher ({n} teachers)")
    teachers = []
    for i, (spec, w, side) in enumerate(zip(cfg.teachers, weights, sides)):
        model = common.load_backbone(spec).to(device).requires_grad_(False).eval()
        p = model.patch_size
        student_sides = list(cfg.low_res) + list(cfg.high_res)
        if (side and side % p) or (not side and any(s % p for s in student_sides)):
            raise SystemExit(f"teacher {spec}: input sides must be multiples of its patch size {p}")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).parent.name + "_" + Path(spec).stem).strip("_")
        teachers.append(Teacher(f"{i}_{name}", model, w, side))  # e.g. 0_mae_backbone, 1_random_vit_tiny_1
    return teachers


def adaptor(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """RADIO's adaptor head: Linear -> LayerNorm -> GELU -> Linear; hidden 0: a single Linear."""
    if hidden == 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class Distiller(nn.Module):
    """Student ViT + per-teacher summary and spatial adaptors. One call runs every resolution
    part of the batch (one DDP forward per step)."""

    def __init__(self, student: common.ViT, teacher_dims: list[int], *, hidden: int, shared_summary: bool):
        super().__init__()
        if not shared_summary and len(teacher_dims) > student.n_prefix:
            raise SystemExit(f"{len(teacher_dims)} teachers need {len(teacher_dims)} summary tokens: give the "
                             f"student --n_registers {len(teacher_dims) - 1} or more, or --summary_tokens shared")
        self.student = student
        self.summary_index = [0] * len(teacher_dims) if shared_summary else list(range(len(teacher_dims)))
        D = student.embed_dim
        self.summary_heads = nn.ModuleList(adaptor(D, hidden, d) for d in teacher_dims)
        self.spatial_heads = nn.ModuleList(adaptor(D, hidden, d) for d in teacher_dims)

    def forward(self, parts: list[torch.Tensor], grids: list[list[tuple[int, int]]], origins=None):
        """parts: student inputs (n, 1, r, r), one per resolution; grids[k][i]: teacher i's token grid
        on part k; origins[k]: the teachers' window corner (n, 2) in units of the student's window
        (shifted crops; None: the same pixels). -> [part][teacher] (summary (n, D_i), spatial
        (n, h_i*w_i, D_i), token weight (n, h_i*w_i) or None), and per part the student's patch tokens
        and grid (for MESA)."""
        outs, tokens = [], []
        for k, (img, teacher_grids) in enumerate(zip(parts, grids)):
            out = self.student(common.to_model_input(img))
            tokens.append((out["patches"], out["grid"]))
            part = []
            for i, grid in enumerate(teacher_grids):
                if origins is None:
                    spatial, weight = resize_tokens(out["patches"], out["grid"], grid), None
                else:
                    spatial, weight = align_tokens(out["patches"], out["grid"], grid, origins[k], 1.0)
                part.append((self.summary_heads[i](out["normed"][:, self.summary_index[i]]),
                             self.spatial_heads[i](spatial), weight))
            outs.append(part)
        return outs, tokens


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------

def amradio_summary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine distance, averaged over images."""
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


def amradio_spatial_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.9 cosine distance per token + 0.1 smooth L1 (beta 1) per element, both averaged."""
    return 0.9 * (1 - F.cosine_similarity(pred, target, dim=-1)).mean() + 0.1 * F.smooth_l1_loss(pred, target)


def cradio_spatial_loss(pred: torch.Tensor, target_phis: torch.Tensor) -> torch.Tensor:
    """MSE against PHI-S-normalised teacher features: predicting the teacher's mean scores ~1."""
    return F.mse_loss(pred, target_phis)


MIN_DISPERSION = 1e-3  # squared radians (~1.8 degrees RMS)


def cradio_summary_loss(pred: torch.Tensor, target: torch.Tensor, dispersion: torch.Tensor) -> torch.Tensor:
    """Squared angle between student and teacher summaries over the teacher's angular dispersion,
    so a teacher whose summaries all point one way does not get a vanishing loss. The floor keeps
    a teacher with (nearly) constant summaries, such as a random ViT (dispersion ~1e-10), from
    scaling its loss by 1e10."""
    cos = F.cosine_similarity(pred, target, dim=-1).clamp(-1 + 1e-6, 1 - 1e-6)  # arccos' is infinite at +-1
    return (torch.arccos(cos) ** 2).mean() / dispersion.clamp(min=MIN_DISPERSION)


def teacher_losses(kind: str, pred_summary, pred_spatial, target: dict, phis: PHIS, weight=None) -> dict:
    """Losses of one teacher on one resolution part, with the learning signals beside them:
    the same spatial loss for the trivial prediction (the teacher's mean feature), and the
    summary cosine of the student and of the teacher's mean summary direction. weight (n, N):
    spatial terms over the tokens of weight 1 only (shifted crops)."""
    pred_summary, pred_spatial = pred_summary.float(), pred_spatial.float()
    with torch.no_grad():
        cos_trivial = F.cosine_similarity(phis.summary_mean[None], target["summary"], dim=-1).mean()
        cos = F.cosine_similarity(pred_summary, target["summary"], dim=-1).mean()
    if weight is not None:
        spatial_target = phis(target["spatial"]) if kind == "cradio" else target["spatial"]
        if kind == "cradio":
            per_token = (pred_spatial - spatial_target).pow(2).mean(-1)
            trivial = spatial_target.pow(2).mean(-1)
        else:
            def per(p, t):
                return 0.9 * (1 - F.cosine_similarity(p, t, dim=-1)) + 0.1 * F.smooth_l1_loss(
                    p, t, reduction="none").mean(-1)
            per_token, trivial = per(pred_spatial, spatial_target), per(phis.mean.expand_as(spatial_target),
                                                                       spatial_target)
        summary = (cradio_summary_loss(pred_summary, target["summary"], phis.summary_dispersion) if kind == "cradio"
                   else amradio_summary_loss(pred_summary, target["summary"]))
        return dict(summary=summary, spatial=weighted_mean(per_token, weight),
                    spatial_trivial=weighted_mean(trivial, weight), summary_cos=cos, summary_cos_trivial=cos_trivial)
    if kind == "cradio":
        spatial_target = phis(target["spatial"])  # (n, N, D)
        out = dict(summary=cradio_summary_loss(pred_summary, target["summary"], phis.summary_dispersion),
                   spatial=cradio_spatial_loss(pred_spatial, spatial_target),
                   spatial_trivial=spatial_target.pow(2).mean())  # the mean maps to 0 under PHI-S
    else:
        out = dict(summary=amradio_summary_loss(pred_summary, target["summary"]),
                   spatial=amradio_spatial_loss(pred_spatial, target["spatial"]),
                   spatial_trivial=amradio_spatial_loss(phis.mean.expand_as(target["spatial"]), target["spatial"]))
    return dict(out, summary_cos=cos, summary_cos_trivial=cos_trivial)


# ---------------------------------------------------------------------------------------
# Views and resolution parts
# ---------------------------------------------------------------------------------------

def make_view(cfg: RADIOConfig, side: int):
    def view(sheet, rng):
        crop = common.random_crop(sheet, rng, side, scale=(cfg.scale_min, cfg.scale_max), min_ink=cfg.min_ink)
        return {"image": crop["image"]}  # (1, side, side) in [0, 1], 1 = paper; resized per model on device
    return view


def resolution_parts(crops: torch.Tensor, cfg: RADIOConfig, gen: torch.Generator) -> list[tuple[torch.Tensor, int]]:
    """Split a rank's batch into a low- and a high-resolution part, each with a side drawn
    from its set (one draw per step from the step's generator): [(native crops, side), ...]."""
    n_high = round(crops.shape[0] * cfg.high_fraction) if cfg.high_res else 0
    low = cfg.low_res[int(torch.randint(len(cfg.low_res), (1,), generator=gen))]
    parts = [(crops[:crops.shape[0] - n_high], low)]
    if n_high:
        parts.append((crops[crops.shape[0] - n_high:], cfg.high_res[int(torch.randint(len(cfg.high_res), (1,),
                                                                                       generator=gen))]))
    return [(c, side) for c, side in parts if c.shape[0]]


@torch.no_grad()
def fit_phis(teachers: list[Teacher], batches, cfg: RADIOConfig, rank: int, device) -> list[PHIS]:
    """PHI-S per teacher from cfg.phis_batches batches (per rank; sums all-reduced), drawn over
    the same resolution parts as training."""
    stats = [FeatureStatistics(t.model.embed_dim, device) for t in teachers]
    for k in range(cfg.phis_batches):
        crops = next(batches)["image"].to(device, non_blocking=True)
        for part, side in resolution_parts(crops, cfg, common.step_generator(cfg.seed + 1, k, rank)):
            for t, s in zip(teachers, stats):
                out = t(part, side)
                s.update(out["spatial"], out["summary"])
    for s in stats:
        s.all_reduce()
    return [PHIS.from_statistics(s).to(device) for s in stats]


def load_or_fit_phis(teachers, sheets, view, cfg, run) -> None:
    """Cached per teacher in the run dir; computed once (on every rank), written by rank 0."""
    from safetensors.torch import load_file
    paths = [run.out_dir / f"phis_{t.name}.safetensors" for t in teachers]
    if all(p.is_file() for p in paths):
        for t, p in zip(teachers, paths):
            t.phis = PHIS(t.model.embed_dim).to(run.device)
            t.phis.load_state_dict(load_file(str(p)))
        common.print0(f"[radio] PHI-S statistics read from {run.out_dir}")
        return
    stream = common.TileDataset(sheets, view, seed=cfg.seed + 1, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(stream, run.local_batch, rank=run.dist.rank, world_size=run.dist.world_size,
                                num_workers=cfg.num_workers, seed=cfg.seed + 1)  # decoding in workers
    for t, phis in zip(teachers, fit_phis(teachers, iter(loader), cfg, run.dist.rank, run.device)):
        t.phis = phis
        common.print0(f"[radio] PHI-S {t.name}: alpha {float(phis.alpha):.4g}, "
                      f"summary dispersion {float(phis.summary_dispersion):.4g}")
    if run.dist.is_main:
        for t, p in zip(teachers, paths):
            common.save_safetensors({k: v.cpu().contiguous() for k, v in t.phis.state_dict().items()}, p,
                                    metadata={"teacher": t.name, "res": str(t.res)})
    common.barrier()


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------

def split_teacher_spec(spec: str) -> tuple[str, float]:
    """`--teacher PATH[:weight]` -> (PATH, weight). The suffix is a weight only if it is a number and
    what precedes it is a checkpoint on disk or a complete random:ARCH:SEED spec, so that
    `random:vit_tiny:0` stays a teacher with seed 0 (weight 1)."""
    head, _, tail = spec.rpartition(":")
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0
    if head and (Path(head).is_file() or re.fullmatch(r"random:\w+:\d+", head)):
        return head, weight
    return spec, 1.0


def teacher_flags(argv: list[str]) -> list[str]:
    """Repeated `--teacher PATH[:weight]` (the project's contract) -> `--teachers` and `--teacher_weights`."""
    specs, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--teacher" and i + 1 < len(argv):
            specs.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--teacher="):
            specs.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    if not specs:
        return rest
    if any(a.split("=")[0] in ("--teachers", "--teacher_weights") for a in rest):
        raise SystemExit("use either repeated --teacher PATH[:weight] or --teachers/--teacher_weights, not both")
    paths, weights = zip(*(split_teacher_spec(s) for s in specs))
    return rest + ["--teachers", ",".join(paths), "--teacher_weights", ",".join(f"{w:g}" for w in weights)]


def main(argv=None):
    argv = teacher_flags(list(sys.argv[1:] if argv is None else argv))
    cfg = common.parse_config(RADIOConfig, PRESETS, "radio", argv, __doc__)
    cfg.low_res, cfg.high_res = tuple(int(r) for r in cfg.low_res), tuple(int(r) for r in cfg.high_res)
    if cfg.loss not in ("cradio", "amradio") or cfg.summary_tokens not in ("separate", "shared"):
        raise SystemExit("--loss must be cradio|amradio and --summary_tokens separate|shared")
    if not cfg.low_res or any(r % 16 for r in cfg.low_res + cfg.high_res):
        raise SystemExit("--low_res (non-empty) and --high_res must be multiples of the student patch size 16")
    run = common.Run(cfg, "radio")
    dev = run.device
    rescale = {"rope_rescale": cfg.rope_rescale or None}
    student = (common.load_backbone(cfg.init, **rescale) if cfg.init
               else common.vit(cfg.arch, n_registers=cfg.n_registers, **rescale))
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # random: teachers reseed torch
        teachers = load_teachers(cfg, dev)
    model = Distiller(student, [t.model.embed_dim for t in teachers], hidden=cfg.adaptor_hidden,
                      shared_summary=cfg.summary_tokens == "shared").to(dev)
    models = {"student": student, "summary_heads": model.summary_heads, "spatial_heads": model.spatial_heads}
    ema = None
    if cfg.mesa_weight > 0:  # MESA's EMA of the student: frozen, eval mode, saved for exact resume
        ema = mesa_ema(student)
        models["mesa_ema"] = ema
    opt = common.adamw(common.param_groups(model), lr=0.0, betas=(0.9, 0.999), device=dev)

    side = max(cfg.low_res + cfg.high_res + tuple(t.res for t in teachers))  # every model's input is a downsample
    sheets = common.open_sheets(cfg.data, seed=cfg.seed, split="train", dpi=cfg.dpi)
    view = make_view(cfg, side)
    load_or_fit_phis(teachers, sheets, view, cfg, run)
    start = run.resume(models, {"opt": opt})
    fwd = common.wrap_ddp(model, run.dist)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    dataset = common.TileDataset(sheets, view, seed=cfg.seed, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(dataset, run.local_batch, start=start * cfg.batch_size, rank=run.dist.rank,
                                world_size=run.dist.world_size, num_workers=cfg.num_workers, seed=cfg.seed)
    batches = iter(loader)

    for step in range(start, cfg.steps):
        crops = next(batches)["image"].to(dev, non_blocking=True)  # (B, 1, S, S), 1 = paper
        lr = common.cosine_schedule(step, cfg.steps, cfg.lr, warmup=cfg.warmup_steps)
        common.set_lr_wd(opt, lr, cfg.weight_decay)
        parts = resolution_parts(crops, cfg, common.step_generator(cfg.seed, step, run.dist.rank))
        shift_gen = common.step_generator(cfg.seed + 2, step, run.dist.rank)  # its own draws: off = unchanged
        student_native, origins = [part for part, _ in parts], None
        if cfg.shift_max > 0:  # the student and the teachers see different windows of each crop
            teacher_native, origins = [], []
            for k, (part, _) in enumerate(parts):
                student_native[k], s_off, win_side = random_windows(part, cfg.shift_max, shift_gen)
                t_win, t_off, _ = random_windows(part, cfg.shift_max, shift_gen)
                teacher_native.append(t_win)
                origins.append((t_off - s_off).float() / win_side)  # teachers' corner in student-window units
            targets = [[t(t_win, res) for t in teachers] for t_win, (_, res) in zip(teacher_native, parts)]
        else:
            targets = [[t(part, res) for t in teachers] for part, res in parts]  # frozen, no_grad
        student_in = [resize_images(win, res) for win, (_, res) in zip(student_native, parts)]
        with common.autocast(dev):
            preds, tokens = fwd(student_in, [[tgt["grid"] for tgt in part_targets] for part_targets in targets],
                                origins)
        loss, metrics = 0.0, {}
        if ema is not None:  # MESA on the first (low-resolution) part: the EMA sees a window inside the student's
            mesa = mesa_term(ema, student_native[0], parts[0][1], *tokens[0], cfg.mesa_shift_max, shift_gen)
            loss = loss + cfg.mesa_weight * mesa
            metrics["mesa"] = mesa.detach()
        for (part, _), part_preds, part_targets in zip(parts, preds, targets):
            share = part.shape[0] / crops.shape[0]  # each image counts once, whatever its resolution
            for i, (t, (summary, spatial, weight), target) in enumerate(zip(teachers, part_preds, part_targets)):
                terms = teacher_losses(cfg.loss, summary, spatial, target, t.phis, weight)
                loss = loss + share * t.weight * (cfg.summary_weight * terms["summary"]
                                                  + cfg.spatial_weight * terms["spatial"])
                for k, v in terms.items():  # logged per teacher index: spatial_0, spatial_trivial_0, ...
                    metrics[f"{k}_{i}"] = metrics.get(f"{k}_{i}", 0.0) + share * v.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = common.clip_gradients(model.parameters(), cfg.clip_grad)
        opt.step()
        if ema is not None:
            common.ema_update(ema, student, cfg.mesa_momentum)
        run.step(step, models, {"opt": opt}, loss=loss, **metrics, grad_norm=grad_norm, lr=lr)
        if run.stopped:
            break
    run.finish(student)


if __name__ == "__main__":
    main()
