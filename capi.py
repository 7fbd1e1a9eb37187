"""CAPI: masked image modeling with online-clustering targets, on construction sheets.

Darcet et al., "Cluster and Predict Latent Patches for Improved Masked Image Modeling"
(TMLR 2025), official code facebookresearch/capi. A teacher, the EMA of the encoder run
without gradients on the full image, gives its final patch tokens (registers dropped) to an
online clustering layer (L2-normalise, linear to K prototypes); Sinkhorn-Knopp run separately
at every position turns the clustering logits into soft assignments, so that the targets carry
no positional information. The clustering layer learns from its own loss (cross-entropy of its
logits against those assignments) and optimizer. The student encoder sees only the patches left
by an inverse block mask (a kept rectangle, rolled by a random shift) plus 16 registers; a
predictor of cross-attention-only blocks turns one mask token per predicted position into a
prediction by reading the encoder's outputs (queries never see each other), and a head
(L2-normalise, weight-normed linear to K) scores it against the teacher's assignment. No
pixels, no tokenizer, no hand-made augmentation. The teacher's encoder is exported (the paper
finds the EMA model ahead of the student throughout training).

Commands:
  CPU, tiny (2,200 steps of 96 px crops x ~0.37 s = about 13.5 min on 2 cores; results/bench_tiny.md):
      python capi.py --preset tiny
  one GPU, ViT-S:  torchrun --standalone --nproc_per_node=1 capi.py --preset small --data DIR
  8 GPUs, ViT-B:   torchrun --standalone --nproc_per_node=8 capi.py --preset base --data DIR
  many nodes:  torchrun --nnodes 4 --node_rank $i --master_addr $HOST --master_port 29500 \
               --nproc_per_node 8 capi.py --preset base --data DIR --out_dir /shared/runs/capi
  continue from other weights:  --init path/to/backbone.safetensors (or an official DINOv3 .pth)
  resume a stopped run:         same command + --resume
Then probe:  python eval_probe.py --ckpt runs/capi/backbone.safetensors

Logged beside the loss: `trivial`, the loss of a student that predicts the targets' marginal
(the mean assignment over every teacher token of the global batch) at every position: a run
that learns falls clearly below it; `marginal_entropy`, the entropy of that marginal (ln K when
the prototypes are used evenly); `target_entropy`, the mean entropy of one token's assignment
(ln K: uniform, nothing to predict; the author calls ~0.5 healthy); `prototypes_in_use`, how
many prototypes are some teacher token's top assignment in the global batch; `clustering`, the
clustering layer's own loss; `blank_share`, the share of the loss from predicted patches of
blank paper.

Deviations from the paper and the official code (and why):
- Shared backbone: the project's DINOv3-style ViT (LayerNorm with affine, a cls token beside the
  registers, qkv bias, trunc-normal init) instead of CAPI's (RMSNorm, no cls, no biases, xavier
  init). Its RoPE is the project's shared DINOv3 variant (fixed periods, coordinates in (-1, 1),
  optional coordinate-rescale jitter), not CAPI's own (a frequency parameter, log-spaced over
  7e-4..7 cycles per image side on coordinates in [0, 1], frozen by its lr multiplier 0).
  Registers and cls carry no position (CAPI places its registers on the border of the visible
  region). LayerScale is off by default (CAPI has none). Drop-path grows linearly with depth in
  the encoder (the shared ViT's rule; CAPI uses one rate for every block) and is constant in the
  predictor (as CAPI).
- Predictor: same width and heads as the encoder, depth half the encoder's (paper), LayerNorm,
  no LayerScale; queries get RoPE at their true grid coordinates and keys at theirs, the
  encoder's cls and registers are unrotated keys.
- Sinkhorn-Knopp is computed in the log domain (logsumexp over the batch of every rank, then
  over the prototypes): algebraically the official algorithm, but a token far from every
  prototype keeps a proper distribution where the official exponent underflows to an all-zero
  target.
- The norm layers' weight decay is 0 (the shared parameter groups), not 0.1 x wd.
- Views: crops at native resolution with mild scale jitter and ink-aware sampling instead of
  RandomResizedCrop(0.6, 1) + horizontal flip (flip mirrors text; sheets have a physical scale).
- Presets: the paper trains at batch 16384 for 500k steps; small/base keep its lr, momentum
  rule, temperatures and K at a batch of 2048/4096 for 100k steps (10% warmup, as the paper).
  The tiny runs suggest keeping K near the batch (each position's Sinkhorn-Knopp then balances
  about one token per prototype, as in the paper); this was not tested at GPU scale.
- Tiny preset (CPU minutes): 96 px crops (6 x 6 patches) for 2,200 steps, 4 registers,
  K = batch = 32, every masked patch predicted, clustering lr 2x the backbone's, momentum
  1 - 2 lr, inky crops; each choice measured, see PRESETS["tiny"]. With it the exported teacher
  probes +2.5 mIoU over random init at its last block (results/probe_tiny_capi.md).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclasses.dataclass
class CAPIConfig(common.TrainConfig):
    img_size: int = 224  # training crop side in pixels (multiple of 16)
    rope_rescale: float = 0.0  # RoPE coordinate jitter of the student encoder, s in [1/r, r] (0: off)
    n_registers: int = 16  # registers of a fresh backbone (paper: 16, +3.2 ADE over none); --init keeps its own
    layerscale_init: float = 0.0  # LayerScale init of a fresh backbone (0: none, as CAPI)
    drop_path: float = 0.2  # stochastic depth of the student encoder and predictor (the teacher runs in eval mode)
    pred_depth: int = 0  # predictor blocks (0: half the encoder's depth, as the paper)
    # masking
    mask_ratio: float = 0.65  # fraction of the patches hidden from the student encoder
    min_aspect: float = 0.5  # kept block's height / width is log-uniform in [min_aspect, 1 / min_aspect]
    roll: bool = True  # roll each mask by a random shift, so every position is masked equally often (paper)
    pred_subsample: float = 0.05  # fraction of the masked patches that are predicted (paper 0.05)
    # clustering targets and loss
    n_prototypes: int = 16384  # K, prototypes of the clustering layer and of the student head
    teacher_temp: float = 0.06  # Sinkhorn-Knopp temperature of the clustering logits
    student_temp: float = 0.12  # softmax temperature of the student head and of the clustering loss
    sk_iters: int = 3  # Sinkhorn-Knopp iterations
    # optimisation
    lr: float = 1e-3  # peak learning rate (not scaled with the batch, as the paper)
    warmup_steps: int = 10_000  # linear warmup from 0 (paper: a tenth of the steps), then cosine to 0 ...
    cosine_truncate: float = 0.8  # ... cut off at this fraction of the cosine (paper: drop its last fifth)
    momentum_lr_mult: float = 1.0  # teacher EMA momentum = 1 - this * lr (paper: 1; its 100k-step ablations: 2)
    weight_decay: float = 0.1  # AdamW weight decay (not on biases, norms, tokens)
    patch_embed_lr_mult: float = 0.2  # lr multiplier of the patch embedding (official)
    clustering_lr_mult: float = 0.5  # clustering layer lr / backbone lr (paper: half)
    clustering_weight_decay: float = 0.01  # clustering layer's AdamW weight decay (official: torch's default)
    # views
    min_ink: float = 0.02  # resample crops with less ink than this fraction (0: off)
    scale_min: float = 0.8  # crop scale jitter: a region of side img_size * f, f log-uniform in
    scale_max: float = 1.25  #   [scale_min, scale_max], is resampled to img_size
    tiles_per_sheet: int = 16  # consecutive crops cut from one rendered/decoded sheet


PRESETS = {
    # 2-core CPU, <= 20 min. Each choice was measured against the paper's value in 3-minute runs at
    # 64 px (reading the loss against `trivial`), the crop size in full runs probed against random init,
    # 14.7 (results/probe_tiny_capi.md, results/probe_tiny_dino_ibot_dinov2_capi.md):
    # - 96 px crops (6 x 6 patches), 2,200 steps: 17.2 best-block mIoU at the last block (+2.5), against
    #   16.3 at block 1 (+1.6; last block 13.6) for 64 px crops and 4,000 steps; 128 px crops cost ~6x a
    #   64 px step and their short runs never left `trivial`.
    # - rope_rescale 2.33: the 6 x 6 grid's coordinate spacing then reaches the probe's 14 x 14.
    # - 4 registers instead of 16: 16 outnumber the visible patches of a small crop (1.6x per step at 64 px).
    # - K = 32 = batch: the paper has as many prototypes as images per step (16384), so that each
    #   position's Sinkhorn-Knopp balances about one token per prototype; with K = 256 the targets
    #   drifted towards uniform (entropy 3.4 -> 4.8 of ln 256 = 5.5 by step 400), the loss stayed at
    #   `trivial`.
    # - pred_subsample 1.0 (every masked patch): with 0.2 (2 per image at 64 px) the loss stayed at
    #   `trivial` for 450 steps and the target entropy drifted to 2.9 of ln 32 = 3.5; with 1.0 it was
    #   2% below `trivial` at step 400 and falling, for ~15% more time per step.
    # - clustering lr 2x the backbone's instead of 0.5x: the clustering loss settles in ~150 steps
    #   instead of ~300; with 0.5x the loss got at most 0.5% below `trivial`, then jumped above it
    #   at step 400 with a spike of the clustering loss.
    # - kept from the paper: predictor depth 6 (half the encoder's): depth 2 left `trivial` no
    #   faster (-0.069 vs -0.065 at step 400), for ~15% less time per step.
    # - lr 2e-3 with momentum 1 - 2 lr (0.996 at the peak: the paper's 100k-step ablations), warmup
    #   100 steps (4.5%, not 10%), no drop-path.
    "tiny": dict(arch="vit_tiny", img_size=96, rope_rescale=2.33, n_registers=4, batch_size=32, steps=2200,
                 warmup_steps=100, n_prototypes=32, pred_subsample=1.0, clustering_lr_mult=2.0, lr=2e-3,
                 momentum_lr_mult=2.0, drop_path=0.0, min_ink=0.05, num_workers=1, log_every=50, ckpt_every=500),
    # the paper's recipe at ViT-S/B scale (ViT-S: lr 2e-3, momentum 0.998; ViT-B: lr 1e-3, 0.999)
    "small": dict(arch="vit_small", batch_size=2048, steps=100_000, warmup_steps=10_000, lr=2e-3, num_workers=8,
                  log_every=50, ckpt_every=2000),
    "base": dict(arch="vit_base", batch_size=4096, steps=100_000, warmup_steps=10_000, lr=1e-3, num_workers=10,
                 log_every=50, ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------
# Inverse block masks with roll
# ---------------------------------------------------------------------------------------

def inverse_block_masks(batch: int, grid: tuple[int, int], n_masked: int, n_predict: int, gen: torch.Generator,
                        *, min_aspect: float = 0.5, roll: bool = True):
    """CAPI's masks on a CPU generator (no device syncs in the step). Per image: a kept
    rectangle of n_keep = N - n_masked patches (aspect log-uniform, clipped so that it fits; its
    row-major excess at the lower right cut off), rolled circularly by a random shift, and
    everything else masked; then n_predict masked patches drawn at random. Returns
      visible_idx (B, n_keep) row-major indices of the kept patches, sorted;
      predict_idx (B, n_predict) indices of the predicted patches;
      masked      (B, N) bool."""
    H, W = grid
    n_keep = H * W - n_masked
    lo = max(math.log(min_aspect), math.log(n_keep / W ** 2))
    hi = min(-math.log(min_aspect), math.log(H ** 2 / n_keep))
    u = torch.rand(batch, 5, generator=gen).unbind(1)  # aspect, top, left, row shift, column shift
    aspect = torch.exp(lo + u[0] * (hi - lo))  # height / width
    h = torch.sqrt(n_keep * aspect).ceil().clamp(max=H).long()  # ceil: h * w >= n_keep
    w = torch.sqrt(n_keep / aspect).ceil().clamp(max=W).long()
    top, left = (u[1] * (H - h + 1)).long(), (u[2] * (W - w + 1)).long()  # the block lies inside the grid
    shift_r, shift_c = ((u[3] * H).long(), (u[4] * W).long()) if roll else (0 * h, 0 * w)
    h, w, top, left, shift_r, shift_c = (t.view(-1, 1, 1) for t in (h, w, top, left, shift_r, shift_c))
    # after the roll, cell (r, c) shows cell (r - shift_r, c - shift_c) of the unrolled mask
    r = (torch.arange(H).view(1, H, 1) - shift_r) % H - top  # (B, H, 1) row inside the block
    c = (torch.arange(W).view(1, 1, W) - shift_c) % W - left  # (B, 1, W) column inside the block
    kept = (r >= 0) & (r < h) & (c >= 0) & (c < w) & (r * w + c < n_keep)  # (B, H, W)
    masked = ~kept.flatten(1)  # (B, N)
    visible_idx = kept.flatten(1).nonzero()[:, 1].view(batch, n_keep)
    noise = torch.rand(masked.shape, generator=gen).masked_fill(~masked, 2.0)  # kept patches sort last
    predict_idx = noise.argsort(1)[:, :n_predict]
    return visible_idx, predict_idx, masked


# ---------------------------------------------------------------------------------------
# Model pieces
# ---------------------------------------------------------------------------------------

class CrossAttention(nn.Module):
    """Queries attend to the context only (no self-attention): each query's output depends on
    its own input and the context, never on the other queries. RoPE rotates the queries at
    their coordinates and the context's patch tokens at theirs; the context's first n_prefix
    tokens (cls, registers) are not rotated. No biases (CAPI)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, context, q_rope, k_rope, n_prefix: int):
        B, n, D = x.shape
        hd = D // self.num_heads
        q = self.q(x).view(B, n, self.num_heads, hd).transpose(1, 2)  # (B, heads, n, hd)
        k, v = self.kv(context).view(B, -1, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)  # (B, heads, m, hd) each
        q, k = common.apply_rope(q, *q_rope, 0), common.apply_rope(k, *k_rope, n_prefix)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, n, hd)
        return self.proj(x.transpose(1, 2).reshape(B, n, D))


class CrossBlock(nn.Module):
    """Pre-norm block: cross-attention to the (already normed) encoder output, then an MLP."""

    def __init__(self, dim: int, num_heads: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = common.Mlp(dim, 4 * dim)
        self.drop_path = drop_path

    def forward(self, x, context, q_rope, k_rope, n_prefix: int):
        x = x + common.drop_path(self.attn(self.norm1(x), context, q_rope, k_rope, n_prefix), self.drop_path,
                                 self.training)
        return x + common.drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class Predictor(nn.Module):
    """One shared mask token per predicted position, cross-attention-only blocks over the
    encoder's output (cls, registers and visible patches), final LayerNorm."""

    def __init__(self, dim: int, num_heads: int, n_prefix: int, *, depth: int, drop_path: float):
        super().__init__()
        self.n_prefix = n_prefix
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.rope = common.RoPE(dim // num_heads)
        self.blocks = nn.ModuleList(CrossBlock(dim, num_heads, drop_path) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # CAPI initialises every linear layer xavier-uniform
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, context: torch.Tensor, visible_idx: torch.Tensor, predict_idx: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """context (B, P + n_keep, D) normed encoder output -> (B, n_predict, D)."""
        coords = common.grid_coords(*grid, device=context.device)  # (N, 2)
        q_rope, k_rope = self.rope(coords[predict_idx]), self.rope(coords[visible_idx])  # (B, n, hd) each
        x = self.mask_token.to(context.dtype).expand(*predict_idx.shape, -1)  # (B, n_predict, D)
        for blk in self.blocks:
            x = blk(x, context, q_rope, k_rope, self.n_prefix)
        return self.norm(x)


class PrototypeHead(nn.Module):
    """L2-normalise, then a weight-normed Linear(d, K, bias=False): logit k is g_k times the
    cosine between the input and prototype k (g starts at 1 and is trained, as CAPI)."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.norm_scale = nn.Parameter(torch.ones(n_prototypes, 1))

    def forward(self, x):
        return F.linear(F.normalize(x, dim=-1), self.norm_scale * F.normalize(self.weight, dim=-1))


class OnlineClustering(nn.Module):
    """The teacher's projection: L2-normalise, then Linear(d, K) with bias, weights N(0, 1)
    (official). Trained only by the clustering loss, with its own optimizer."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.layer = nn.Linear(dim, n_prototypes)
        nn.init.normal_(self.layer.weight, std=1.0)
        nn.init.zeros_(self.layer.bias)

    def forward(self, x):
        return self.layer(F.normalize(x, dim=-1, eps=1e-7))


class Student(nn.Module):
    """Encoder on the visible patches, predictor, head: the trained trio in one module (one
    forward per step, as DDP expects). The teacher and the clustering layer live outside."""

    def __init__(self, encoder: common.ViT, predictor: Predictor, head: PrototypeHead):
        super().__init__()
        self.encoder, self.predictor, self.head = encoder, predictor, head

    def forward(self, img, visible_idx, predict_idx):
        out = self.encoder(common.to_model_input(img), keep=visible_idx)  # normed: (B, P + n_keep, D)
        return self.head(self.predictor(out["normed"], visible_idx, predict_idx, out["grid"]))  # (B, n_predict, K)


# ---------------------------------------------------------------------------------------
# Targets, losses and the signals logged beside them
# ---------------------------------------------------------------------------------------

def batch_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0 (the batch) of every rank's x: (B, ...) -> (1, ...)."""
    local = x.logsumexp(dim=0, keepdim=True)
    return common.all_gather_cat(local).logsumexp(dim=0, keepdim=True)  # one row per rank, combined


@torch.no_grad()
def positionwise_sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """CAPI's targets: at every position separately, alternately give each prototype equal mass
    over the batch of all ranks and make each token a distribution over the prototypes, so that
    the assignments say nothing about the position. (B, N, K) logits -> (B, N, K) targets whose
    last dimension sums to 1. In the log domain: no overflow or underflow at sharp temperatures."""
    log_q = logits.float() / temp  # (B, N, K), updated in place: at K = 16384 it is the largest tensor of the step
    for _ in range(n_iters):
        log_q -= batch_logsumexp(log_q)  # per (position, prototype): mass 1 over the batch
        log_q -= log_q.logsumexp(dim=-1, keepdim=True)  # per token: mass 1 over the prototypes
    return log_q.exp_()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-token cross-entropy between target distributions and softmax(logits / temp)."""
    return -(targets * F.log_softmax(logits.float() / temp, dim=-1)).sum(-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each distribution in the last dimension."""
    return -torch.xlogy(p, p).sum(-1)


@torch.no_grad()
def target_statistics(targets: torch.Tensor, predicted: torch.Tensor) -> dict[str, torch.Tensor]:
    """targets (B, N, K) of every teacher token, predicted (B, n, K) the predicted ones. Returns
    target_entropy (mean per token), prototypes_in_use (prototypes that are some token's top
    assignment in the global batch), marginal_entropy (entropy of the mean assignment of the
    global batch) and trivial (the loss of predicting that marginal at the predicted tokens)."""
    K = targets.shape[-1]
    flat = targets.flatten(0, 1)  # (B*N, K)
    tops = flat.argmax(-1)  # (B*N,) each token's top prototype
    top_counts = torch.zeros(K, device=flat.device).index_add_(0, tops, torch.ones_like(tops, dtype=torch.float))
    stats = common.all_reduce_sum(torch.cat([top_counts, flat.sum(0), flat.new_full((1,), flat.shape[0])]))
    top_counts, mass, n_tokens = stats[:K], stats[K:2 * K], stats[-1]
    marginal = mass / n_tokens  # (K,)
    return dict(target_entropy=entropy(flat).mean(), prototypes_in_use=(top_counts > 0).sum().float(),
                marginal_entropy=entropy(marginal),
                trivial=-(predicted * marginal.clamp(min=1e-12).log()).sum(-1).mean())


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------

def make_view(cfg: CAPIConfig):
    def view(sheet, rng):
        crop = common.random_crop(sheet, rng, cfg.img_size, scale=(cfg.scale_min, cfg.scale_max), min_ink=cfg.min_ink)
        return {"image": crop["image"]}  # (1, S, S) in [0, 1], 1 = paper
    return view


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(CAPIConfig, PRESETS, "capi", argv, __doc__)
    if cfg.img_size % 16:
        raise SystemExit(f"--img_size must be a multiple of the patch size 16, got {cfg.img_size}")
    grid = (cfg.img_size // 16, cfg.img_size // 16)
    N = grid[0] * grid[1]
    n_masked = int(N * cfg.mask_ratio)
    n_predict = max(1, int(n_masked * cfg.pred_subsample))
    if not 0 < n_masked < N:
        raise SystemExit(f"--mask_ratio {cfg.mask_ratio} leaves no masked or no visible patch on a {grid} grid")
    run = common.Run(cfg, "capi")
    dev = run.device
    arch_kw = dict(drop_path_rate=cfg.drop_path, rope_rescale=cfg.rope_rescale or None)
    fresh_kw = dict(n_registers=cfg.n_registers, layerscale_init=cfg.layerscale_init or None)
    encoder = common.load_backbone(cfg.init, **arch_kw) if cfg.init else common.vit(cfg.arch, **fresh_kw, **arch_kw)
    heads = encoder.arch["num_heads"]
    predictor = Predictor(encoder.embed_dim, heads, encoder.n_prefix, depth=cfg.pred_depth or encoder.depth // 2,
                          drop_path=cfg.drop_path)
    student = Student(encoder, predictor, PrototypeHead(encoder.embed_dim, cfg.n_prototypes)).to(dev)
    clustering = OnlineClustering(encoder.embed_dim, cfg.n_prototypes).to(dev)
    teacher = copy.deepcopy(encoder).requires_grad_(False).eval()  # eval: no drop-path, no RoPE jitter
    models = {"student": student, "clustering": clustering, "teacher": teacher}
    opt = common.adamw(common.param_groups(student, patch_embed_lr_mult=cfg.patch_embed_lr_mult), lr=0.0,
                       betas=(0.9, 0.95), device=dev)
    cluster_opt = common.adamw(common.param_groups(clustering), lr=0.0, betas=(0.9, 0.95), device=dev)
    optimizers = {"opt": opt, "clustering": cluster_opt}
    start = run.resume(models, optimizers)
    fwd = common.wrap_ddp(student, run.dist)  # broadcasts rank 0's weights
    cluster_fwd = common.wrap_ddp(clustering, run.dist)  # its gradients are averaged over ranks too
    if start == 0:  # the teacher starts as the encoder, the same on every rank
        teacher.load_state_dict(encoder.state_dict())
    fwd = torch.compile(fwd) if cfg.compile else fwd

    sheets = common.open_sheets(cfg.data, seed=cfg.seed, split="train", dpi=cfg.dpi)
    dataset = common.TileDataset(sheets, make_view(cfg), seed=cfg.seed, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(dataset, run.local_batch, start=start * cfg.batch_size, rank=run.dist.rank,
                                world_size=run.dist.world_size, num_workers=cfg.num_workers, seed=cfg.seed)
    batches = iter(loader)

    for step in range(start, cfg.steps):
        img = next(batches)["image"].to(dev, non_blocking=True)  # (B, 1, H, W), 1 = paper
        lr = common.cosine_schedule(step, cfg.steps, cfg.lr, warmup=cfg.warmup_steps, truncate=cfg.cosine_truncate)
        common.set_lr_wd(opt, lr, cfg.weight_decay)
        common.set_lr_wd(cluster_opt, lr * cfg.clustering_lr_mult, cfg.clustering_weight_decay)
        momentum = 1.0 - cfg.momentum_lr_mult * lr
        visible_idx, predict_idx, _ = inverse_block_masks(
            img.shape[0], grid, n_masked, n_predict, common.step_generator(cfg.seed, step, run.dist.rank),
            min_aspect=cfg.min_aspect, roll=cfg.roll)
        visible_idx, predict_idx = visible_idx.to(dev, non_blocking=True), predict_idx.to(dev, non_blocking=True)

        with torch.no_grad(), common.autocast(dev):
            teacher_patches = teacher(common.to_model_input(img))["patches"]  # (B, N, D), registers dropped
        with common.autocast(dev):
            cluster_logits = cluster_fwd(teacher_patches)  # (B, N, K); gradients reach the clustering layer only
            pred = fwd(img, visible_idx, predict_idx)  # (B, n_predict, K)
        targets = positionwise_sinkhorn_knopp(cluster_logits.detach(), cfg.teacher_temp, cfg.sk_iters)  # (B, N, K)
        clustering_loss = soft_cross_entropy(cluster_logits, targets, cfg.student_temp).mean()
        picked = targets.gather(1, predict_idx[..., None].expand(-1, -1, targets.shape[-1]))  # (B, n_predict, K)
        per_token = soft_cross_entropy(pred, picked, cfg.student_temp)  # (B, n_predict)
        loss = per_token.mean()

        opt.zero_grad(set_to_none=True)
        cluster_opt.zero_grad(set_to_none=True)
        (loss + clustering_loss).backward()  # disjoint graphs: each loss trains its own parameters
        opt.step()
        cluster_opt.step()
        common.ema_update(teacher, encoder, momentum)

        with torch.no_grad():
            stats = target_statistics(targets, picked)
            blank = ~(common.patchify(img, 16) < 0.5).any(-1).gather(1, predict_idx)  # (B, n_predict)
            blank_share = (per_token.detach() * blank).sum() / per_token.detach().sum().clamp(min=1e-12)
        run.step(step, models, optimizers, loss=loss, clustering=clustering_loss, **stats, blank_share=blank_share,
                 lr=lr, momentum=momentum)
        if run.stopped:
            break
    run.finish(teacher)


if __name__ == "__main__":
    main()
