"""DINOv3: DINOv2 self-distillation plus Gram anchoring, on construction sheets; and continual
pretraining from the official DINOv3 weights.

Simeoni et al., "DINOv3" (arXiv 2508.10104, 2025, facebookresearch/dinov3). The losses are
DINOv2's (ibot_dino.py --variant dinov2): a student ViT sees 2 global and N local crops, the EMA
teacher the 2 global crops; CLS self-distillation against Sinkhorn-Knopp teacher targets, iBOT
masked patch prediction, KoLeo. DINOv3 changes the recipe (separate DINO and iBOT heads without
weight norm, constant lr / weight decay / EMA momentum after warmup, AdamW betas (0.9, 0.99),
layer-wise lr decay, patch-embed lr x 0.2) and adds Gram anchoring: the L2-normalised output
patch tokens of the student's (masked) global crops must keep the pairwise similarities
(per-image Gram matrix X X^T) of a frozen earlier model, the Gram teacher, whose features are
computed on the same crop rendered at 2x and resized to the student's grid. In the paper dense
features then stop degrading as training goes on, while the features themselves stay free to move. `diff ibot_dino.py
dinov3_gram.py` shows this delta (and drops ibot_dino's --variant switch and centring). The EMA
teacher's backbone is exported and evaluated.

Commands:
  CPU, tiny (1,000 steps, ~18 min on 2 cores; results/bench_tiny.md):  python dinov3_gram.py --preset tiny
  one GPU, ViT-S:  torchrun --standalone --nproc_per_node=1 dinov3_gram.py --preset small --data DIR
  8 GPUs, ViT-B:   torchrun --standalone --nproc_per_node=8 dinov3_gram.py --preset base --data DIR
  many nodes:  torchrun --nnodes 4 --node_rank $i --master_addr $HOST --master_port 29500 \
               --nproc_per_node 8 dinov3_gram.py --preset base --data DIR --out_dir /shared/runs/dinov3_gram
  without Gram anchoring (the ablation):  same command + --gram_weight 0 (the local-crop DINO
                                          weight still drops to 0.5: only the Gram term differs)
  resume a stopped run:                   same command + --resume
Then probe:  python eval_probe.py --ckpt runs/dinov3_gram/backbone.safetensors

Continual pretraining from the official weights (ViT-S shown; vitb16/vitl16 files work the same):
  1. frozen probe of the official backbone on your labeled sheets (images/, masks/, classes.txt):
     python eval_probe.py --ckpt dinov3_vits16_pretrain_lvd1689m-08c60483.pth --data LABELED \
         --out_dir runs/probe_dinov3
  2. continue self-supervised training on your unlabeled corpus; the heads start random and
     learn for --head_warmup_steps with the backbone frozen, and the Gram teacher is the official
     backbone itself (--gram_max_refreshes 0 keeps it so), anchoring the patch geometry:
     torchrun --standalone --nproc_per_node=1 dinov3_gram.py --preset small --data CORPUS \
         --init dinov3_vits16_pretrain_lvd1689m-08c60483.pth --steps 10000 --batch_size 256 --blr 5e-5 \
         --warmup_steps 2000 --head_warmup_steps 1000 --gram_start 1000 --gram_max_refreshes 0 \
         --out_dir runs/dinov3_continual
  3. probe again, both in one table:
     python eval_probe.py --ckpt dinov3_vits16_pretrain_lvd1689m-08c60483.pth \
         --ckpt runs/dinov3_continual/backbone.safetensors --data LABELED --out_dir runs/probe_dinov3
  (--gram_teacher PATH anchors to any other backbone with 16 px patches, e.g. a larger one;
  refreshing it from the EMA teacher then needs the same architecture.)

Deviations from the paper and the official code (and why):
- Views: every sample is one tile of a sheet (`tile_size`, the "image" of ImageNet multi-crop)
  and all its crops are cut from that tile, so views share content (independent crops of a
  whole sheet rarely overlap). Crops are at native resolution with scale jitter (side factors,
  not area fractions) and ink-aware sampling. Colour jitter (a no-op on monochrome), Gaussian
  blur (erases one-pixel lines) and solarisation are replaced by line-weight jitter
  (thicken/thin strokes), contrast jitter (faded ink, tinted paper) and mild scan noise; no
  horizontal flip (DINOv3 has none either).
- High-resolution Gram teacher: its crop is the same sheet region resized to twice the crop side
  from the native pixels (real detail where the region is larger than the crop, an upsampling
  where it is smaller), without photometric jitter, as the official code does. With
  --gram_hires false the Gram teacher sees the student's own (jittered) global crops.
- Schedules: Gram anchoring starts at 20% of the small/base runs (the 7B run added it after 1M
  iterations to repair degraded features; the paper notes that an earlier start prevents the
  degradation instead). The Gram weight and the local-crop DINO weight are ramped linearly
  (officially a half cosine) over gram_ramp_steps; refreshes count from gram_start.
  lr = blr x batch/256, DINO's ViT-S value, held constant (DINOv3 scales by sqrt(batch/1024);
  the paper's values are for ViT-7B). Teacher temperature 0.04 -> 0.07 over DINOv2's 30 epochs.
- Head warmup (continual pretraining only) is not in the official code: with random heads and an
  unfrozen backbone, pretrained features were reported to collapse (kNN 80% -> 10%, dinov2 issue
  204). The backbone's gradients are computed and dropped, which keeps DDP's bookkeeping simple.
- Shared backbone: DINOv3-style ViT (4 registers, 2D RoPE, LayerScale); the student jitters its
  RoPE coordinates (`rope_rescale`, DINOv3's augmentation) so that it sees both the grid
  spacing of its small training crops and that of the 224 px probe tiles (RoPE coordinates
  are normalised per grid); the teacher and the Gram teacher run in eval mode, without jitter.
- Head MLP: He init (std sqrt(2 / fan_in)) instead of std 0.02, which is variance-preserving
  only for 2048-wide layers. In the scaled-down tiny head (512 wide) the 0.02 init left the
  input-dependent part of the bottleneck so small that Adam's first updates of the biases made
  it input-independent: the student went uniform and stayed there (measured, see PRESETS).
- Prototypes (no weight norm) start with rows of norm ~1 (std 1/sqrt(bottleneck)), the norm
  DINOv2's weight-normed prototypes start with, instead of std 0.02 (norm 0.23 at the tiny
  bottleneck of 128, 0.32 at 256): the logits, bounded by the prototype norms, started ~4x
  smaller, and in the tiny preset the Sinkhorn-Knopp teacher stayed near uniform (entropy
  5.38-5.48 of ln 256 = 5.55 at steps 40-60, against 4.78-4.89 with unit norms, measured).
- The mask token starts at N(0, 0.02) instead of zero when it is all zero: without an absolute
  position embedding a zero mask token enters every block as an exact zero vector, whose
  LayerNorm gradient (~1/sqrt(eps)) swamped the others (backbone gradient norm ~1e5).
- Sinkhorn-Knopp shifts each prototype's exponent by its largest logit (exactly equivalent), so
  that the sharp teacher temperatures of the tiny preset cannot overflow.
- Masks: DINOv2's scheme (half of the global crops masked, ratios spread evenly over
  U(0.1, 0.5)); the block masks are topped up with random single patches to exactly the
  requested count (as BEiT v2 does) when no further block fits.
- KoLeo is computed on each rank's own batch, as in the official code, so it is the one loss
  term that depends on the number of processes.
- Tiny preset (CPU minutes): see PRESETS["tiny"]. `--patch_size 8` (fresh backbone) is measured,
  not a preset: run for an hour (Gram from step 1,125 of 1,500) it stays 1.8 mIoU below random
  init (same patch-8 architecture) on the synthetic probe set and beats it by 5.7 on real plans
  (walls-fr-dev at scale 0.5) (results/probe_tiny_teach_p8_curves.md).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclasses.dataclass
class DINOConfig(common.TrainConfig):
    # views: scales are crop-side factors relative to native pixels (2 = a region twice the side, downsampled)
    tile_size: int = 448  # side (native pixels) of the sheet tile that all crops of one sample come from
    patch_size: int = 16  # backbone patch side in pixels (16: DINOv3's; a fresh backbone only, --init keeps its own)
    global_size: int = 256  # global crop side in pixels (multiple of the patch size); teacher and student
    global_scale: tuple = (1.0, 2.0)  # side-factor range of the global crops
    n_local: int = 8  # local crops per image (student only)
    local_size: int = 112  # local crop side in pixels (multiple of the patch size)
    local_scale: tuple = (0.5, 1.5)  # side-factor range of the local crops
    min_ink: float = 0.02  # resample crops with less ink than this fraction (0: off)
    line_weight: float = 0.5  # probability of thickening or thinning a crop's strokes (replaces blur)
    contrast: float = 0.2  # faded-ink / tinted-paper range (replaces colour jitter)
    scan_noise: float = 0.02  # largest std of additive pixel noise (replaces solarisation)
    tiles_per_sheet: int = 16  # consecutive samples cut from one rendered/decoded sheet
    # heads
    n_prototypes: int = 65536  # K, prototypes of the DINO head and of the separate iBOT head
    head_hidden: int = 2048  # head MLP width
    head_bottleneck: int = 256  # L2-normalised bottleneck before the prototypes
    head_layers: int = 3  # linear layers of the head MLP
    freeze_last_layer_steps: int = 1250  # prototypes get no update for this many steps (~1 epoch)
    # losses
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp_start: float = 0.04  # teacher temperature at step 0 ...
    teacher_temp: float = 0.07  # ... linearly to this over teacher_temp_warmup_steps
    teacher_temp_warmup_steps: int = 37_500  # (30 epochs of ImageNet at batch 1024)
    ibot_weight: float = 1.0  # weight of the masked patch loss
    koleo_weight: float = 0.1  # weight of the KoLeo regulariser
    mask_probability: float = 0.5  # fraction of the global crops that are masked
    mask_ratio: tuple = (0.1, 0.5)  # range of the masked fraction of a masked crop
    # Gram anchoring
    gram_weight: float = 2.0  # weight of the Gram loss once ramped in (0: no Gram teacher, the ablation)
    gram_start: int = 25_000  # the Gram loss and the local-crop reweighting start ramping in after this step
    gram_ramp_steps: int = 1000  # ... reaching their final weights this many steps later
    dino_local_weight: float = 0.5  # weight of the local-crop DINO pairs after the ramp (1 before gram_start)
    gram_teacher: str = ""  # Gram teacher checkpoint (any ViT, 16 px patches); default: --init, else the EMA teacher
    gram_teacher_step: int = -1  # no --gram_teacher/--init: EMA teacher copied in before this step (-1: gram_start)
    gram_refresh_every: int = 10_000  # after gram_start, re-copy the EMA teacher into it this often (0: never)
    gram_max_refreshes: int = 3  # ... at most this many times
    gram_hires: bool = True  # Gram teacher sees the crops rendered at 2x, its features resized to the student grid
    head_warmup_steps: int = 1000  # with --init: the backbone stays frozen while the random heads learn
    # optimisation
    blr: float = 5e-4  # base learning rate; lr = blr * batch_size / 256
    warmup_steps: int = 12_500  # linear lr warmup (10 epochs), then constant
    weight_decay: float = 0.04  # AdamW weight decay, constant (not on biases, norms, tokens)
    layer_decay: float = 0.98  # layer-wise lr decay: block i gets layer_decay ** (depth - i), heads 1
    patch_embed_lr_mult: float = 0.2  # extra lr factor of the patch embedding
    clip_grad: float = 30.0  # gradient-norm clip per module (0: off)
    drop_path: float = 0.1  # stochastic depth of the student (the teacher runs in eval mode)
    momentum_teacher: float = 0.994  # teacher EMA momentum, constant
    rope_rescale: float = 2.0  # student RoPE coordinate jitter, s in [1/r, r] (0: off)
    layerscale_init: float = 1e-5  # LayerScale init of a fresh backbone (DINOv2/v3; 0: none, as DINO v1)
    # diagnostics
    cls_patch_every: int = 500  # steps between CLS-patch cosine measurements of the teacher on a fixed batch


PRESETS = {
    # 2-core CPU, <= 20 min. A first tiny DINO (4096 prototypes, 128/64 px crops from anywhere on
    # the sheet, momentum 0.99, teacher temperature 0.04) sat at ln K for every step; in
    # 3-minute runs (batch 32) each change below was needed to leave ln K (the runs: results/LOG.md):
    # - tile_size 96: all crops of a sample come from one tile, so the views overlap.
    # - layerscale_init 0: with 1e-5 the CLS outputs of different crops differed by 7e-6 relative, so
    #   the teacher could not tell images apart.
    # - global_size 64, local_size 32 (4 x 4 and 2 x 2 patches): ~4x the steps of 128/64 px crops.
    # - min_ink 0.15, n_prototypes 256, head_hidden 512 (with the He-initialised head, see the header).
    # - teacher_temp 0.02, constant: a sharp teacher.
    # - center_momentum 0.5 (DINO's centre): at 0.9 the lagging centre let the sharp teacher put every
    #   image on one prototype.
    # - blr 0.008 (lr 1e-3 at batch 32), warmup 20 steps, momentum_teacher 0.99.
    # - rope_rescale 4: the 4 x 4 grid's coordinate spacing then reaches the 14 x 14 probe grid's
    #   (2/14 ~ (2/4) / 3.5); it did not change the trajectory.
    # Here with DINOv3's changes (Sinkhorn-Knopp, so no centre; constant lr, wd and momentum 0.99).
    # The Gram teacher is copied at step 300 and refreshed at 500, 700 and 900; a step with it costs
    # ~1.4x one without (results/bench_tiny.md). Outcome at 1,000 steps: 14.8 best-block mIoU vs 14.7 for
    # random init, last block 14.4 vs 12.0 without Gram (results/probe_tiny_dinov3_gram_vs_nogram.md).
    "tiny": dict(arch="vit_tiny", batch_size=32, steps=1000, tile_size=96, global_size=64, global_scale=(1.0, 1.5),
                 n_local=4, local_size=32, local_scale=(1.0, 2.0), min_ink=0.15, n_prototypes=256, head_hidden=512,
                 head_bottleneck=128, freeze_last_layer_steps=20, teacher_temp_start=0.02, teacher_temp=0.02,
                 teacher_temp_warmup_steps=0, momentum_teacher=0.99, blr=0.008, warmup_steps=20, drop_path=0.0,
                 rope_rescale=4.0, layerscale_init=0.0, gram_start=300, gram_ramp_steps=30, gram_refresh_every=200,
                 head_warmup_steps=100, cls_patch_every=100, num_workers=1, log_every=20, ckpt_every=200),
    # the papers' recipes scaled to ViT-S/B (batch 1024 over 100-300 epochs in the papers)
    "small": dict(arch="vit_small", batch_size=1024, steps=125_000, num_workers=8, log_every=50, ckpt_every=2000),
    "base": dict(arch="vit_base", batch_size=1024, steps=125_000, drop_path=0.2, num_workers=10, log_every=50,
                 ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """MLP (GELU, no norm) -> L2-normalised bottleneck -> prototype scores (B, K)."""

    def __init__(self, in_dim: int, *, hidden: int, bottleneck: int, n_prototypes: int, n_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (n_layers - 1) + [bottleneck]
        layers = []
        for i in range(n_layers):
            layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.GELU()] if i < n_layers - 1 else [])
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:  # He init, see the header (official: std 0.02, ~variance-preserving only at width 2048)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=math.sqrt(2.0 / m.in_features))
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, n_prototypes, bias=False)  # DINOv3: prototypes without weight norm
        nn.init.trunc_normal_(self.last_layer.weight, std=bottleneck ** -0.5)  # unit-norm rows, see the header

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropModel(nn.Module):
    """Backbone + heads in one module, so the student runs one forward per step (as DDP
    expects). The student gets all crops and masked globals; the teacher, a copy, gets the
    unmasked global crops only. The global crops' patch outputs are returned for Gram anchoring."""

    def __init__(self, backbone: common.ViT, dino_head: DINOHead, ibot_head: DINOHead):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(self, global_crops, local_crops=None, masks=None, masked_index=None):
        g = self.backbone(common.to_model_input(global_crops), mask=masks)  # cls (2B, D), patches (2B, N, D)
        cls = g["cls"]
        if local_crops is not None:
            cls = torch.cat([cls, self.backbone(common.to_model_input(local_crops))["cls"]])  # (2B + nB, D)
        out = {"cls": g["cls"], "patches": g["patches"], "dino": self.dino_head(cls)}  # dino: (2B [+ nB], K)
        if masked_index is not None:
            tokens = g["patches"].flatten(0, 1).index_select(0, masked_index)  # (M, D)
            out["ibot"] = self.ibot_head(tokens)  # (M, K)
        return out


def build_model(backbone: common.ViT, cfg: DINOConfig) -> MultiCropModel:
    def head():
        return DINOHead(backbone.embed_dim, hidden=cfg.head_hidden, bottleneck=cfg.head_bottleneck,
                        n_prototypes=cfg.n_prototypes, n_layers=cfg.head_layers)
    return MultiCropModel(backbone, head(), head())


# ---------------------------------------------------------------------------------------
# Losses and teacher targets
# ---------------------------------------------------------------------------------------

def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float,
              local_weight: float = 1.0):
    """Cross-entropy H(teacher view i, student view j) averaged over all pairs with i != j.
    student_logits: (B, K) per student view, its first views being the global crops in the
    teacher's order; teacher_probs: (B, K) targets per teacher view. Pairs with a local student
    view count local_weight times (DINOv3 halves them while Gram anchoring ramps in)."""
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, n_pairs = 0.0, 0
    for i, t in enumerate(teacher_probs):
        for j, lp in enumerate(log_probs):
            if i != j:
                weight = local_weight if j >= len(teacher_probs) else 1.0
                total = total - weight * (t * lp).sum(-1).mean()
                n_pairs += 1
    return total / n_pairs


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, token_weight: torch.Tensor,
              n_images: int, student_temp: float):
    """Masked-token cross-entropy: (M, K) logits and targets of the masked tokens only, averaged
    over each image's masked tokens (token_weight = 1 / its count) and then over all n_images
    global crops, unmasked crops counting 0 (as the official code)."""
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)  # (M,)
    return (ce * token_weight).sum() / n_images


def koleo_loss(x: torch.Tensor, eps: float = 1e-8):
    """Kozachenko-Leonenko entropy estimate (DINOv2): -mean_i log(d_i + eps) on L2-normalised
    rows, d_i = ||x_i - x_n(i) + eps|| to the nearest other row n(i) (eps inside the norm, as
    torch's pairwise distance and the official code have it, so a duplicate row gives
    -log((sqrt(D) + 1) eps) rather than -log(2 eps)). Fewer than 2 rows: 0 (not inf)."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = dots.argmax(dim=1)  # largest cosine = smallest distance on the sphere
    return -torch.log(F.pairwise_distance(x, x[nearest], p=2.0, eps=eps) + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """DINOv2/SwAV teacher targets: alternately give every prototype equal mass over the rows
    of all ranks and make every row a distribution. (n, K) -> (n, K), rows summing to 1.
    Equal to the official version, whose extra global rescalings cancel out; the exponent is
    shifted per prototype by its largest logit over all ranks (the first normalisation cancels
    any per-prototype factor), so that sharp temperatures cannot overflow."""
    logits = teacher_logits.float()
    top = common.all_gather_cat(logits.max(dim=0, keepdim=True).values).max(dim=0, keepdim=True).values  # (1, K)
    q = torch.exp((logits - top) / temp).t()  # (K, n), each prototype's largest entry is 1
    for _ in range(n_iters):
        q = q / common.all_reduce_sum(q.sum(dim=1, keepdim=True))  # prototypes: equal mass
        q = q / q.sum(dim=0, keepdim=True).clamp(min=1e-30)  # rows (samples): sum to 1
    return q.t()


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the distributions in the rows of p."""
    return -(p * torch.log(p.clamp(min=1e-12))).sum(-1).mean()


def collapse_warning(dino: float, ln_k: float) -> str | None:
    if dino > 0.97 * ln_k:
        return (f"DINO loss {dino:.3f} sits at ln K = {ln_k:.3f}: uniform collapse (the student predicts ~uniform; "
                "teacher_entropy near ln K means the teacher does too)")
    if dino < 0.03 * ln_k:
        return f"DINO loss {dino:.4f} is near 0: constant collapse (every image on the same prototype)"
    return None


@torch.no_grad()
def cls_patch_cosine(backbone: common.ViT, images: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between each image's CLS output and its patch outputs. DINOv3's
    sign of dense-feature degradation: it rises as the patches drift towards the global feature."""
    out = backbone(common.to_model_input(images))
    return F.cosine_similarity(out["cls"].float()[:, None], out["patches"].float(), dim=-1).mean()


def teacher_temperature(step: int, cfg: DINOConfig) -> float:
    """teacher_temp_start to teacher_temp in teacher_temp_warmup_steps evenly spaced values with
    the final one left out (DINOv3's schedules build np.linspace(start, peak, warmup,
    endpoint=False); DINOv2 includes it), so the final value arrives at step warmup; constant
    from there."""
    return common.linear_ramp(step, 0, cfg.teacher_temp_warmup_steps, cfg.teacher_temp_start, cfg.teacher_temp)


# ---------------------------------------------------------------------------------------
# Gram anchoring (DINOv3)
# ---------------------------------------------------------------------------------------

def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the per-image Gram matrices X X^T of L2-normalised patch
    features, student (n, P, D) vs Gram teacher (n, P, D_t): a mean over n * P * P entries (the
    official code's mean, which the weight 2.0 is tuned for; the paper writes a Frobenius norm).
    Only the similarities between patches are constrained, not the features themselves, so the
    widths may differ and any rotation shared by an image's patches leaves the loss unchanged."""
    xs = F.normalize(student_patches.float(), dim=-1)
    xt = F.normalize(teacher_patches.float(), dim=-1)
    return F.mse_loss(xs @ xs.transpose(1, 2), xt @ xt.transpose(1, 2))  # Gram matrices (n, P, P)


def resize_patches(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(n, h*w, D) patch features on an h x w grid -> (n, H*W, D) on `size`, bicubic without
    antialiasing (the official setting): the high-resolution Gram teacher's features, smoothed
    down to the student's grid."""
    maps = patches.float().transpose(1, 2).unflatten(2, grid)  # (n, D, h, w)
    maps = F.interpolate(maps, size=size, mode="bicubic", align_corners=False, antialias=False)
    return maps.flatten(2).transpose(1, 2)  # (n, H*W, D)


@torch.no_grad()
def gram_teacher_patches(gram_teacher: common.ViT, crops: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The frozen Gram teacher's patch outputs for (n, 1, H, W) crops (the student's, or the same
    regions rendered at 2x), on the student's grid -> (n, h*w, D_t)."""
    out = gram_teacher(common.to_model_input(crops))
    return out["patches"] if out["grid"] == grid else resize_patches(out["patches"], out["grid"], grid)


def gram_weights(step: int, cfg: DINOConfig) -> tuple[float, float]:
    """(Gram loss weight, local-crop DINO weight) at `step`: 0 and 1 up to gram_start, then both
    ramped linearly over gram_ramp_steps to gram_weight and dino_local_weight."""
    return (common.linear_ramp(step, cfg.gram_start, cfg.gram_ramp_steps, 0.0, cfg.gram_weight),
            common.linear_ramp(step, cfg.gram_start, cfg.gram_ramp_steps, 1.0, cfg.dino_local_weight))


def gram_teacher_update(step: int, cfg: DINOConfig, anchored: bool) -> bool:
    """Whether the Gram teacher becomes a copy of the EMA teacher before `step`: at
    gram_teacher_step unless a checkpoint anchors it (--gram_teacher, --init), and every
    gram_refresh_every steps after gram_start, at most gram_max_refreshes times. A function of
    the step alone, so a resumed run refreshes exactly where the original would have."""
    first = cfg.gram_start if cfg.gram_teacher_step < 0 else cfg.gram_teacher_step
    if step == first and not anchored:
        return True
    since, every = step - cfg.gram_start, cfg.gram_refresh_every
    return every > 0 and since > 0 and since % every == 0 and since // every <= cfg.gram_max_refreshes


# ---------------------------------------------------------------------------------------
# Masking (iBOT / DINOv2), on the host from the step's generator
# ---------------------------------------------------------------------------------------

def block_mask(h: int, w: int, n_masked: int, rng: random.Random, min_block: int = 4,
               max_block: int | None = None, min_aspect: float = 0.3) -> torch.Tensor:
    """BEiT/iBOT block-wise mask of exactly n_masked patches of an h x w grid -> (h*w,) bool.
    Adds rectangles (area U(min_block, remaining) capped at max_block, aspect log-U(min_aspect,
    1/min_aspect), strictly smaller than the grid, 10 tries each) that add no more than the
    remaining count; when none fits, random single patches top it up to the exact count."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    max_block = max_block or n_masked
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    count = 0
    while count < n_masked:
        budget = min(n_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if bh < h and bw < w:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = int((~mask[top:top + bh, left:left + bw]).sum())
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    free = (~mask).flatten().nonzero().squeeze(1).tolist()
    mask.view(-1)[rng.sample(free, n_masked - count)] = True
    return mask.flatten()


def draw_masks(n_images: int, h: int, w: int, probability: float, ratio: tuple, rng: random.Random) -> torch.Tensor:
    """DINOv2's scheme: int(n_images * probability) images get block masks whose ratios are
    spread evenly over `ratio` (one draw per equal sub-interval), the rest none, in random
    order. -> (n_images, h*w) bool."""
    n = h * w
    n_masked_images = int(n_images * probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked_images + 1).tolist()
    masks = torch.zeros(n_images, n, dtype=torch.bool)
    for i in range(n_masked_images):
        count = max(1, int(n * rng.uniform(edges[i], edges[i + 1])))
        masks[i] = block_mask(h, w, count, rng, max_block=max(1, n // 2))
    order = list(range(n_images))
    rng.shuffle(order)
    return masks[order]


def masked_tokens(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N) bool -> indices (M,) of the masked tokens in flattened (n*N) order and each
    token's weight 1 / (masked tokens of its image). Built on the host: no device sync."""
    index = masks.flatten().nonzero().squeeze(1)
    per_image = masks.sum(1, keepdim=True).clamp(min=1).float()  # (n, 1)
    return index, (1.0 / per_image).expand_as(masks).flatten()[index]


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------

def make_view(cfg: DINOConfig):
    """All crops of one sample come from one tile of the sheet (the "image" of ImageNet
    multi-crop), so the views share content: independent crops of a whole sheet rarely overlap,
    and predicting one from the other is then too hard to get started."""
    jitter = dict(min_ink=cfg.min_ink, line_weight=cfg.line_weight, contrast=cfg.contrast, noise=cfg.scan_noise)
    hires = cfg.gram_hires and cfg.gram_weight > 0

    def view(sheet, rng):
        x0, y0, side = common.cut_region(sheet, rng, cfg.tile_size, min_ink=cfg.min_ink)
        rows, cols = slice(max(y0, 0), y0 + side), slice(max(x0, 0), x0 + side)
        ink = sheet.get("ink")
        tile = {"image": sheet["image"][rows, cols], "ink": None if ink is None else ink[rows, cols]}
        crops = common.multi_crop(tile, rng, n_global=2, global_size=cfg.global_size, global_scale=cfg.global_scale,
                                  n_local=cfg.n_local, local_size=cfg.local_size, local_scale=cfg.local_scale,
                                  hires=hires, **jitter)
        views = {"global": crops["global"], "local": crops["local"]}  # (2, 1, G, G), (n, 1, L, L); 1 = paper
        if hires:
            views["global_hr"] = crops["global_hr"]  # (2, 1, 2G, 2G) without photometric jitter: the Gram teacher's
        return views
    return view


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(DINOConfig, PRESETS, "dinov3_gram", argv, __doc__)
    if cfg.gram_weight > 0 and not (cfg.gram_teacher or cfg.init) and cfg.gram_teacher_step > cfg.gram_start:
        raise SystemExit("--gram_teacher_step after --gram_start would anchor the first steps to the random init")
    run = common.Run(cfg, "dinov3_gram")
    dev = run.device
    arch_kw = dict(drop_path_rate=cfg.drop_path, rope_rescale=cfg.rope_rescale or None)
    backbone = (common.load_backbone(cfg.init, **arch_kw) if cfg.init
                else common.vit(cfg.arch, patch_size=cfg.patch_size, layerscale_init=cfg.layerscale_init or None,
                                **arch_kw))
    patch = backbone.patch_size
    if cfg.n_local < 1 or cfg.global_size % patch or cfg.local_size % patch:
        raise SystemExit(f"need n_local >= 1 and crop sizes that are multiples of the backbone's {patch} px patches"
                         f" (--global_size {cfg.global_size}, --local_size {cfg.local_size})")
    if not backbone.mask_token.any():
        # RoPE adds no position to the input, so a zero mask token (the official init) enters every
        # block as an exact zero vector, whose LayerNorm gradient (~1/sqrt(eps)) swamps all others
        nn.init.normal_(backbone.mask_token, std=0.02)
    student = build_model(backbone, cfg).to(dev)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()  # eval: no drop-path, no RoPE jitter
    models = {"student": student, "teacher": teacher}
    gram_teacher, anchored = None, bool(cfg.gram_teacher or cfg.init)
    if cfg.gram_weight > 0:  # frozen, eval mode, no gradients. The initial backbone is the anchor with --init;
        # without it, a placeholder until gram_teacher_step copies the EMA teacher in
        gram_teacher = common.load_backbone(cfg.gram_teacher) if cfg.gram_teacher else copy.deepcopy(backbone)
        models["gram_teacher"] = gram_teacher.to(dev).requires_grad_(False).eval()
    groups = common.param_groups(student, layer_decay=cfg.layer_decay, patch_embed_lr_mult=cfg.patch_embed_lr_mult)
    opt = common.adamw(groups, lr=0.0, betas=(0.9, 0.99), device=dev)
    start = run.resume(models, {"opt": opt})
    fwd = common.wrap_ddp(student, run.dist)  # broadcasts rank 0's weights
    if start == 0:  # the teacher starts as the student, the same on every rank
        teacher.load_state_dict(student.state_dict())
    fwd = torch.compile(fwd) if cfg.compile else fwd
    last_layers = [p for n, p in student.named_parameters() if ".last_layer." in n]
    modules = [student.backbone, student.dino_head, student.ibot_head]

    sheets = common.open_sheets(cfg.data, seed=cfg.seed, split="train", dpi=cfg.dpi)
    dataset = common.TileDataset(sheets, make_view(cfg), seed=cfg.seed, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(dataset, run.local_batch, start=start * cfg.batch_size, rank=run.dist.rank,
                                world_size=run.dist.world_size, num_workers=cfg.num_workers, seed=cfg.seed)
    batches = iter(loader)
    # a fixed batch of 224 px tiles (the probe's size) from a seed of their own, for the CLS-patch cosine
    tiles = common.TileDataset(sheets, seed=cfg.seed + 1, tiles_per_sheet=4)
    fixed_tiles = torch.stack([tiles[i]["image"] for i in range(16)]).to(dev)  # (16, 1, 224, 224)
    cls_patch_cos = run.extra["cls_patch_cos"].to(dev) if "cls_patch_cos" in run.extra else None
    lr_peak = cfg.blr * cfg.batch_size / 256
    grid = cfg.global_size // patch
    ln_k = math.log(cfg.n_prototypes)

    for step in range(start, cfg.steps):
        batch = next(batches)
        global_crops = batch["global"].to(dev, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (2B, 1, G, G)
        local_crops = batch["local"].to(dev, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (nB, 1, L, L)
        B = global_crops.shape[0] // 2  # views are crop-major: [crop 0 of every image, crop 1 ...]
        lr = common.warmup_constant(step, lr_peak, warmup=cfg.warmup_steps)
        common.set_lr_wd(opt, lr, cfg.weight_decay)
        teacher_temp = teacher_temperature(step, cfg)
        if cls_patch_cos is None or step % cfg.cls_patch_every == 0:
            with common.autocast(dev):
                cls_patch_cos = cls_patch_cosine(teacher.backbone, fixed_tiles)
        gram_weight, local_weight = gram_weights(step, cfg)
        if gram_teacher is not None and gram_teacher_update(step, cfg, anchored):
            gram_teacher.load_state_dict(teacher.backbone.state_dict())  # stays frozen and in eval mode
            common.print0(f"Gram teacher <- EMA teacher after {step} steps")
        rng = random.Random(int(torch.randint(2 ** 62, (1,), generator=common.step_generator(
            cfg.seed, step, run.dist.rank))))
        masks = draw_masks(2 * B, grid, grid, cfg.mask_probability, cfg.mask_ratio, rng)  # (2B, N)
        masked_index, token_weight = (t.to(dev, non_blocking=True) for t in masked_tokens(masks))
        masks = masks.to(dev, non_blocking=True)

        with torch.no_grad(), common.autocast(dev):
            t_out = teacher(global_crops, masked_index=masked_index)
            if gram_teacher is not None and gram_weight > 0:
                gram_crops = (batch["global_hr"].to(dev, non_blocking=True).transpose(0, 1).flatten(0, 1)
                              if cfg.gram_hires else global_crops)  # (2B, 1, 2G, 2G) or (2B, 1, G, G)
                gram_targets = gram_teacher_patches(gram_teacher, gram_crops, (grid, grid))  # (2B, N, D_t)
        t_cls_probs = sinkhorn_knopp(t_out["dino"].float(), teacher_temp)  # (2B, K)

        with common.autocast(dev):
            s_out = fwd(global_crops, local_crops, masks, masked_index)
        losses = {"dino": dino_loss(s_out["dino"].chunk(2 + cfg.n_local), t_cls_probs.chunk(2), cfg.student_temp,
                                    local_weight)}
        t_patch_probs = sinkhorn_knopp(t_out["ibot"].float(), teacher_temp)  # (M, K)
        losses["ibot"] = cfg.ibot_weight * ibot_loss(s_out["ibot"], t_patch_probs, token_weight, 2 * B,
                                                     cfg.student_temp)
        losses["koleo"] = cfg.koleo_weight * sum(koleo_loss(c) for c in s_out["cls"].chunk(2))
        if gram_teacher is not None:
            losses["gram"] = (gram_weight * gram_loss(s_out["patches"], gram_targets) if gram_weight > 0
                              else torch.zeros((), device=dev))
        loss = sum(losses.values())

        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < cfg.freeze_last_layer_steps:  # DINO: prototypes frozen while the head MLP settles
            for p in last_layers:
                p.grad = None
        if cfg.init and step < cfg.head_warmup_steps:  # continual: random heads first learn to read the backbone
            for p in student.backbone.parameters():
                p.grad = None
        grad_norms = [common.clip_gradients(m.parameters(), cfg.clip_grad) for m in modules]  # backbone first
        opt.step()
        common.ema_update(teacher, student, cfg.momentum_teacher)

        with torch.no_grad():
            # collapse watch: a uniform teacher has entropy ln K, a constant one a batch-mean entropy ~0
            teacher_entropy = entropy(t_cls_probs)
            batch_entropy = entropy(t_cls_probs.mean(0, keepdim=True))
            # the DINO loss as a mean over its pairs (2 global, 2n local ones): ln K when uniform
            dino_ce = losses["dino"].detach() * (1 + cfg.n_local) / (1 + cfg.n_local * local_weight)  # unweighted
            kl = dino_ce - teacher_entropy  # mean KL(teacher || student) over the pairs
        run.step(step, models, {"opt": opt}, extra={"cls_patch_cos": cls_patch_cos}, loss=loss, **losses,
                 teacher_entropy=teacher_entropy, batch_entropy=batch_entropy, kl=kl, grad_norm=grad_norms[0], lr=lr,
                 teacher_temp=teacher_temp, gram_weight=gram_weight, local_weight=local_weight,
                 cls_patch_cos=cls_patch_cos)
        if run.dist.is_main and (step + 1) % cfg.log_every == 0 and step >= cfg.warmup_steps:
            warning = collapse_warning(float(dino_ce), ln_k)
            if warning:
                common.print0(f"warning at step {step + 1}: {warning}")
        if run.stopped:
            break
    run.finish(teacher.backbone)


if __name__ == "__main__":
    main()
