"""DINO / iBOT / DINOv2: self-distillation without labels, on construction sheets.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021, DINO,
facebookresearch/dino); Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer"
(ICLR 2022, bytedance/ibot); Oquab et al., "DINOv2: Learning Robust Visual Features without
Supervision" (TMLR 2024, facebookresearch/dinov2). A student ViT sees 2 global and N local
crops of a sheet; a teacher, the EMA of the student run without gradients, sees the 2 global
crops. A head maps each [CLS] token to scores over K prototypes, and the student learns to
predict the teacher's sharpened, centred distribution of every OTHER view (cross-entropy over
all teacher/student view pairs except identical views). `--variant` picks the losses:
  dino    CLS self-distillation; the teacher is centred by an EMA of its mean output.
  ibot    + masked image modelling: the student's global crops are block-masked and its masked
          patch tokens predict, through the same head, the teacher's tokens of the same
          unmasked view (patch targets have their own centre).
  dinov2  + KoLeo on the student's CLS, Sinkhorn-Knopp teacher targets instead of centring,
          separate DINO and iBOT heads, trainable prototype norms.
The teacher's backbone is exported and evaluated.

Commands (--variant dino | ibot | dinov2 on any of them):
  CPU, tiny (1,200 steps x ~0.87 s = about 17 min on 2 cores; results/bench_tiny.md):
      python ibot_dino.py --preset tiny --variant dino
  one GPU, ViT-S:  torchrun --standalone --nproc_per_node=1 ibot_dino.py --preset small --data DIR
  8 GPUs, ViT-B:   torchrun --standalone --nproc_per_node=8 ibot_dino.py --preset base --data DIR
  many nodes:  torchrun --nnodes 4 --node_rank $i --master_addr $HOST --master_port 29500 \
               --nproc_per_node 8 ibot_dino.py --preset base --data DIR --out_dir /shared/runs/ibot_dino
  continue from other weights:  --init path/to/backbone.safetensors (or an official DINOv3 .pth)
  resume a stopped run:         same command + --resume
Then probe:  python eval_probe.py --ckpt runs/ibot_dino/backbone.safetensors

Deviations from the papers and the official code (and why):
- Views: every sample is one tile of a sheet (`tile_size`, the "image" of ImageNet multi-crop)
  and all its crops are cut from that tile, so views share content (independent crops of a
  whole sheet rarely overlap). Crops are at native resolution with scale jitter (side factors,
  not area fractions) and ink-aware sampling. Colour jitter (a no-op on monochrome), Gaussian
  blur (erases one-pixel lines), solarisation and horizontal flip (mirrors text, title blocks,
  dimension direction) are replaced by line-weight jitter (thicken/thin strokes), contrast
  jitter (faded ink, tinted paper) and mild scan noise.
- Shared backbone: DINOv3-style ViT (4 registers, 2D RoPE, LayerScale); the student jitters its
  RoPE coordinates (`rope_rescale`, DINOv3's augmentation) so that it sees both the grid
  spacing of its small training crops and that of the 224 px probe tiles (RoPE coordinates
  are normalised per grid); the teacher runs in eval mode and is exported without jitter.
- Head MLP: He init (std sqrt(2 / fan_in)) instead of std 0.02, which is variance-preserving
  only for 2048-wide layers. In the scaled-down tiny head (512 wide) the 0.02 init left the
  input-dependent part of the bottleneck so small that Adam's first updates of the biases made
  it input-independent: the student went uniform and stayed there (measured, see PRESETS).
- The mask token starts at N(0, 0.02) instead of zero when it is all zero: without an absolute
  position embedding a zero mask token enters every block as an exact zero vector, whose
  LayerNorm gradient (~1/sqrt(eps)) swamped the others (backbone gradient norm ~1e5).
- EMA centres start at the first batch's mean instead of zero, and Sinkhorn-Knopp shifts each
  prototype's exponent by its largest logit (exactly equivalent): both matter only at the
  sharp teacher temperatures of the tiny preset (constant collapse at step ~10; overflow).
- Masks: DINOv2's scheme for ibot and dinov2 alike (half of the global crops masked, ratios
  spread evenly over U(0.1, 0.5)); the block masks are topped up with random single patches
  to exactly the requested count (as BEiT v2 does) when no further block fits.
- The ibot variant shares the whole head between CLS and patch tokens (iBOT's --shared_head;
  its default shares the MLP only); patch centres are EMAs over the masked tokens (DINOv2)
  rather than all tokens, since the teacher's head runs on the masked tokens only.
- One set of hyper-parameters for the three variants: DINO's ViT-S values (lr 5e-4 x batch/256,
  momentum 0.996, drop-path 0.1) with DINOv2's crops and masks; gradients are clipped per
  module (backbone, each head) as in DINOv2; "epochs" become steps.
- KoLeo is computed on each rank's own batch, as in the official code, so it is the one loss
  term that depends on the number of processes.
- Tiny preset (CPU minutes): see PRESETS["tiny"] for what it needed to leave the uniform
  teacher (ln K) within its budget.
- `--patch_size 8` (fresh backbone; small-data ViT papers use patch 8 at 64 px) is measured, not a
  preset: at the tiny crops it costs 2.5x more per image, and run for an hour DINO, iBOT and
  DINOv2 stay 1.2-1.9 mIoU below random init (same patch-8 architecture) on the synthetic probe
  set while beating it by 2.7-4.4 on real plans (walls-fr-dev at scale 0.5)
  (results/probe_tiny_teach_p8_curves.md, results/probe_tiny_dino_patch8_curve.md).
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

VARIANTS = ("dino", "ibot", "dinov2")


@dataclasses.dataclass
class DINOConfig(common.TrainConfig):
    variant: str = "dinov2"  # dino | ibot | dinov2: which losses (see the header)
    # views: scales are crop-side factors relative to native pixels (2 = a region twice the side, downsampled)
    tile_size: int = 448  # side (native pixels) of the sheet tile that all crops of one sample come from
    patch_size: int = 16  # backbone patch side in pixels (16: DINOv3's; a fresh backbone only, --init keeps its own)
    global_size: int = 224  # global crop side in pixels (multiple of the patch size); teacher and student
    global_scale: tuple = (1.0, 2.0)  # side-factor range of the global crops
    n_local: int = 8  # local crops per image (student only)
    local_size: int = 96  # local crop side in pixels (multiple of the patch size)
    local_scale: tuple = (0.5, 1.5)  # side-factor range of the local crops
    min_ink: float = 0.02  # resample crops with less ink than this fraction (0: off)
    line_weight: float = 0.5  # probability of thickening or thinning a crop's strokes (replaces blur)
    contrast: float = 0.2  # faded-ink / tinted-paper range (replaces colour jitter)
    scan_noise: float = 0.02  # largest std of additive pixel noise (replaces solarisation)
    tiles_per_sheet: int = 16  # consecutive samples cut from one rendered/decoded sheet
    # heads
    n_prototypes: int = 65536  # K, prototypes of the DINO head (and of the iBOT head)
    head_hidden: int = 2048  # head MLP width
    head_bottleneck: int = 256  # L2-normalised bottleneck before the prototypes
    head_layers: int = 3  # linear layers of the head MLP
    freeze_last_layer_steps: int = 1250  # prototypes get no update for this many steps (~1 epoch)
    # losses
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp_start: float = 0.04  # teacher temperature at step 0 ...
    teacher_temp: float = 0.07  # ... linearly to this over teacher_temp_warmup_steps
    teacher_temp_warmup_steps: int = 37_500  # (30 epochs of ImageNet at batch 1024)
    center_momentum: float = 0.9  # EMA momentum of the teacher centres (dino, ibot)
    ibot_weight: float = 1.0  # weight of the masked patch loss (ibot, dinov2)
    koleo_weight: float = 0.1  # weight of the KoLeo regulariser (dinov2)
    mask_probability: float = 0.5  # fraction of the global crops that are masked (ibot, dinov2)
    mask_ratio: tuple = (0.1, 0.5)  # range of the masked fraction of a masked crop
    # optimisation
    blr: float = 5e-4  # base learning rate; lr = blr * batch_size / 256
    min_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_steps: int = 12_500  # linear lr warmup (10 epochs), then cosine
    weight_decay: float = 0.04  # AdamW weight decay at step 0 (not on biases, norms, tokens) ...
    weight_decay_end: float = 0.4  # ... cosine to this at the last step
    clip_grad: float = 3.0  # gradient-norm clip per module (0: off)
    drop_path: float = 0.1  # stochastic depth of the student (the teacher runs in eval mode)
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0, cosine to 1 at the last step
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
    # Outcome at 1,200 steps: no collapse (teacher entropy 4.36 / 4.37 / 4.52 for dino / ibot / dinov2,
    # ln K 5.55), but the probe is not above random init: 14.1 / 13.5 / 13.0 vs 14.7
    # (results/probe_tiny_dino_ibot_dinov2_capi.md).
    "tiny": dict(arch="vit_tiny", batch_size=32, steps=1200, tile_size=96, global_size=64, global_scale=(1.0, 1.5),
                 n_local=4, local_size=32, local_scale=(1.0, 2.0), min_ink=0.15, n_prototypes=256, head_hidden=512,
                 head_bottleneck=128, freeze_last_layer_steps=20, teacher_temp_start=0.02, teacher_temp=0.02,
                 teacher_temp_warmup_steps=0, center_momentum=0.5, momentum_teacher=0.99, blr=0.008,
                 warmup_steps=20, drop_path=0.0, rope_rescale=4.0, layerscale_init=0.0, cls_patch_every=100,
                 num_workers=1, log_every=20, ckpt_every=200),
    # the papers' recipes scaled to ViT-S/B (batch 1024 over 100-300 epochs in the papers)
    "small": dict(arch="vit_small", batch_size=1024, steps=125_000, num_workers=8, log_every=50, ckpt_every=2000),
    "base": dict(arch="vit_base", batch_size=1024, steps=125_000, drop_path=0.2, num_workers=10, log_every=50,
                 ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------

class PrototypeLayer(nn.Module):
    """Weight-normed Linear(bottleneck, K, bias=False): prototype k is g_k * v_k / ||v_k||.
    DINO fixes g = 1 (train_norm False); DINOv2 starts it at 1 and trains it."""

    def __init__(self, dim: int, n_prototypes: int, train_norm: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.norm_scale = nn.Parameter(torch.ones(n_prototypes, 1), requires_grad=train_norm)

    def forward(self, x):
        return F.linear(x, self.norm_scale * F.normalize(self.weight, dim=-1))


class DINOHead(nn.Module):
    """MLP (GELU, no norm) -> L2-normalised bottleneck -> prototype scores (B, K)."""

    def __init__(self, in_dim: int, *, hidden: int, bottleneck: int, n_prototypes: int, n_layers: int,
                 train_norm: bool):
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
        self.last_layer = PrototypeLayer(bottleneck, n_prototypes, train_norm)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropModel(nn.Module):
    """Backbone + heads in one module, so the student runs one forward per step (as DDP
    expects). The student gets all crops and masked globals; the teacher, a copy, gets the
    unmasked global crops only. ibot_head None: patch tokens go through the DINO head."""

    def __init__(self, backbone: common.ViT, dino_head: DINOHead, ibot_head: DINOHead | None = None):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(self, global_crops, local_crops=None, masks=None, masked_index=None):
        g = self.backbone(common.to_model_input(global_crops), mask=masks)  # cls (2B, D), patches (2B, N, D)
        cls = g["cls"]
        if local_crops is not None:
            cls = torch.cat([cls, self.backbone(common.to_model_input(local_crops))["cls"]])  # (2B + nB, D)
        out = {"cls": g["cls"], "dino": self.dino_head(cls)}  # dino: (2B [+ nB], K)
        if masked_index is not None:
            tokens = g["patches"].flatten(0, 1).index_select(0, masked_index)  # (M, D)
            out["ibot"] = (self.ibot_head if self.ibot_head is not None else self.dino_head)(tokens)  # (M, K)
        return out


def build_model(backbone: common.ViT, cfg: DINOConfig) -> MultiCropModel:
    def head():
        return DINOHead(backbone.embed_dim, hidden=cfg.head_hidden, bottleneck=cfg.head_bottleneck,
                        n_prototypes=cfg.n_prototypes, n_layers=cfg.head_layers, train_norm=cfg.variant == "dinov2")
    return MultiCropModel(backbone, head(), head() if cfg.variant == "dinov2" else None)


# ---------------------------------------------------------------------------------------
# Losses and teacher targets
# ---------------------------------------------------------------------------------------

def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float):
    """Cross-entropy H(teacher view i, student view j) averaged over all pairs with i != j.
    student_logits: (B, K) per student view, its first views being the global crops in the
    teacher's order; teacher_probs: (B, K) targets per teacher view."""
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, n_pairs = 0.0, 0
    for i, t in enumerate(teacher_probs):
        for j, lp in enumerate(log_probs):
            if i != j:
                total = total - (t * lp).sum(-1).mean()
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


def centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the teacher's mean logit over the rows of every rank (ranks may hold different
    row counts: the masked tokens)."""
    stats = torch.cat([teacher_logits.float().sum(0), teacher_logits.new_full((1,), teacher_logits.shape[0]).float()])
    stats = common.all_reduce_sum(stats)  # (K + 1,) sums and row count of the global batch
    return center * momentum + stats[:-1] / stats[-1] * (1 - momentum)


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


class TeacherTargets:
    """Teacher logits -> targets: Sinkhorn-Knopp (dinov2), or a softmax around an EMA centre
    (dino, ibot) with one centre per output ("dino" for CLS, "ibot" for patches), kept in
    `centers` for exact resume. A fresh centre starts at the first batch's mean instead of
    zero: at sharp temperatures a zero centre hands every sample to one prototype."""

    def __init__(self, n_prototypes: int, sinkhorn: bool, momentum: float, device):
        self.sinkhorn, self.momentum = sinkhorn, momentum
        self.centers = {} if sinkhorn else {f"{name}_center": torch.zeros(1, n_prototypes, device=device)
                                            for name in ("dino", "ibot")}

    def __call__(self, logits: torch.Tensor, name: str, temp: float, first_step: bool) -> torch.Tensor:
        if self.sinkhorn:
            return sinkhorn_knopp(logits, temp)
        key = f"{name}_center"
        if first_step:
            self.centers[key] = update_center(self.centers[key], logits, 0.0)
        probs = centered_softmax(logits, self.centers[key], temp)
        self.centers[key] = update_center(self.centers[key], logits, self.momentum)
        return probs


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
    both ends included (DINO, iBOT and DINOv2 build np.linspace(start, final, warmup)), so step
    warmup - 1 already has the final value; constant from there."""
    n, t0, t1 = cfg.teacher_temp_warmup_steps, cfg.teacher_temp_start, cfg.teacher_temp
    if step >= n:
        return t1
    return t0 if n == 1 else t0 + (t1 - t0) * step / (n - 1)


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

    def view(sheet, rng):
        x0, y0, side = common.cut_region(sheet, rng, cfg.tile_size, min_ink=cfg.min_ink)
        rows, cols = slice(max(y0, 0), y0 + side), slice(max(x0, 0), x0 + side)
        ink = sheet.get("ink")
        tile = {"image": sheet["image"][rows, cols], "ink": None if ink is None else ink[rows, cols]}
        crops = common.multi_crop(tile, rng, n_global=2, global_size=cfg.global_size, global_scale=cfg.global_scale,
                                  n_local=cfg.n_local, local_size=cfg.local_size, local_scale=cfg.local_scale, **jitter)
        return {"global": crops["global"], "local": crops["local"]}  # (2, 1, G, G), (n, 1, L, L); 1 = paper
    return view


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(DINOConfig, PRESETS, "ibot_dino", argv, __doc__)
    if cfg.variant not in VARIANTS:
        raise SystemExit(f"unknown --variant {cfg.variant!r}; choose from {VARIANTS}")
    run = common.Run(cfg, "ibot_dino")
    dev = run.device
    use_ibot, use_sk = cfg.variant in ("ibot", "dinov2"), cfg.variant == "dinov2"
    arch_kw = dict(drop_path_rate=cfg.drop_path, rope_rescale=cfg.rope_rescale or None)
    backbone = (common.load_backbone(cfg.init, **arch_kw) if cfg.init
                else common.vit(cfg.arch, patch_size=cfg.patch_size, layerscale_init=cfg.layerscale_init or None,
                                **arch_kw))
    patch = backbone.patch_size
    if cfg.n_local < 1 or cfg.global_size % patch or cfg.local_size % patch:
        raise SystemExit(f"need n_local >= 1 and crop sizes that are multiples of the backbone's {patch} px patches"
                         f" (--global_size {cfg.global_size}, --local_size {cfg.local_size})")
    if use_ibot and not backbone.mask_token.any():
        # RoPE adds no position to the input, so a zero mask token (the official init) enters every
        # block as an exact zero vector, whose LayerNorm gradient (~1/sqrt(eps)) swamps all others
        nn.init.normal_(backbone.mask_token, std=0.02)
    student = build_model(backbone, cfg).to(dev)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()  # eval: no drop-path, no RoPE jitter
    models = {"student": student, "teacher": teacher}
    opt = common.adamw(common.param_groups(student), lr=0.0, device=dev)
    start = run.resume(models, {"opt": opt})
    fwd = common.wrap_ddp(student, run.dist)  # broadcasts rank 0's weights
    if start == 0:  # the teacher starts as the student, the same on every rank
        teacher.load_state_dict(student.state_dict())
    fwd = torch.compile(fwd) if cfg.compile else fwd
    targets = TeacherTargets(cfg.n_prototypes, use_sk, cfg.center_momentum, dev)
    targets.centers.update({k: v.to(dev) for k, v in run.extra.items() if k in targets.centers})
    last_layers = [p for n, p in student.named_parameters() if ".last_layer." in n]
    modules = [m for m in (student.backbone, student.dino_head, student.ibot_head) if m is not None]

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
        lr = common.cosine_schedule(step, cfg.steps, lr_peak, cfg.min_lr, warmup=cfg.warmup_steps)
        wd = common.cosine_schedule(step, cfg.steps, cfg.weight_decay, cfg.weight_decay_end)
        common.set_lr_wd(opt, lr, wd)
        momentum = common.cosine_schedule(step, cfg.steps, cfg.momentum_teacher, 1.0)
        teacher_temp = teacher_temperature(step, cfg)
        if cls_patch_cos is None or step % cfg.cls_patch_every == 0:
            with common.autocast(dev):
                cls_patch_cos = cls_patch_cosine(teacher.backbone, fixed_tiles)
        masks = masked_index = token_weight = None
        if use_ibot:
            rng = random.Random(int(torch.randint(2 ** 62, (1,), generator=common.step_generator(
                cfg.seed, step, run.dist.rank))))
            masks = draw_masks(2 * B, grid, grid, cfg.mask_probability, cfg.mask_ratio, rng)  # (2B, N)
            masked_index, token_weight = (t.to(dev, non_blocking=True) for t in masked_tokens(masks))
            masks = masks.to(dev, non_blocking=True)

        with torch.no_grad(), common.autocast(dev):
            t_out = teacher(global_crops, masked_index=masked_index)
        t_cls_probs = targets(t_out["dino"].float(), "dino", teacher_temp, step == 0)  # (2B, K)

        with common.autocast(dev):
            s_out = fwd(global_crops, local_crops, masks, masked_index)
        losses = {"dino": dino_loss(s_out["dino"].chunk(2 + cfg.n_local), t_cls_probs.chunk(2), cfg.student_temp)}
        if use_ibot:
            t_patch_probs = targets(t_out["ibot"].float(), "ibot", teacher_temp, step == 0)  # (M, K)
            losses["ibot"] = cfg.ibot_weight * ibot_loss(s_out["ibot"], t_patch_probs, token_weight, 2 * B,
                                                         cfg.student_temp)
        if use_sk:
            losses["koleo"] = cfg.koleo_weight * sum(koleo_loss(c) for c in s_out["cls"].chunk(2))
        loss = sum(losses.values())

        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < cfg.freeze_last_layer_steps:  # DINO: prototypes frozen while the head MLP settles
            for p in last_layers:
                p.grad = None
        grad_norms = [common.clip_gradients(m.parameters(), cfg.clip_grad) for m in modules]  # backbone first
        opt.step()
        common.ema_update(teacher, student, momentum)

        with torch.no_grad():
            # collapse watch: a uniform teacher has entropy ln K, a constant one a batch-mean entropy ~0
            teacher_entropy = entropy(t_cls_probs)
            batch_entropy = entropy(t_cls_probs.mean(0, keepdim=True))
            # the DINO loss as a mean over its pairs (2 global, 2n local ones): ln K when uniform
            dino_ce = losses["dino"].detach()
            kl = dino_ce - teacher_entropy  # mean KL(teacher || student) over the pairs
        run.step(step, models, {"opt": opt}, extra={**targets.centers, "cls_patch_cos": cls_patch_cos}, loss=loss,
                 **losses, teacher_entropy=teacher_entropy, batch_entropy=batch_entropy, kl=kl, grad_norm=grad_norms[0],
                 lr=lr, momentum=momentum, teacher_temp=teacher_temp, cls_patch_cos=cls_patch_cos)
        if run.dist.is_main and (step + 1) % cfg.log_every == 0 and step >= cfg.warmup_steps:
            warning = collapse_warning(float(dino_ce), ln_k)
            if warning:
                common.print0(f"warning at step {step + 1}: {warning}")
        if run.stopped:
            break
    run.finish(teacher.backbone)


if __name__ == "__main__":
    main()
