"""I-JEPA: predicting the latent features of masked blocks from a context block.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture" (CVPR 2023), official code facebookresearch/ijepa. Each image gets 4 target
blocks and one large context block with the targets cut out. The context encoder sees only
the context patches; a narrow predictor receives its tokens plus one mask token per target
patch (positioned by RoPE at the patch's true grid coordinates) and regresses the features
that a target encoder -- an EMA of the context encoder run on the full image without
gradients -- gives those patches, after a parameter-free layer norm. No pixels are
reconstructed and no augmentation beyond cropping is used. The target encoder is the
backbone that gets evaluated; its global representation is the average of its patch tokens
(`global_features`): no loss trains the cls token as a summary.

Commands:
  CPU, tiny (1,800 steps x ~0.66 s = about 20 min on 2 cores; results/bench_tiny.md):  python ijepa.py --preset tiny
  one GPU, ViT-S:                       torchrun --standalone --nproc_per_node=1 ijepa.py --preset small --data DIR
  8 GPUs, ViT-B:                        torchrun --standalone --nproc_per_node=8 ijepa.py --preset base --data DIR
  many nodes:  torchrun --nnodes 4 --node_rank $i --master_addr $HOST --master_port 29500 \
               --nproc_per_node 8 ijepa.py --preset base --data DIR --out_dir /shared/runs/ijepa
  continue from other weights:  --init path/to/backbone.safetensors (or an official DINOv3 .pth)
  resume a stopped run:         same command + --resume
Then probe:  python eval_probe.py --ckpt runs/ijepa/backbone.safetensors

Logged beside the loss: `trivial`, the loss of predicting the batch's mean target vector at
every target position (the trivial solution: a run that learns falls clearly below it);
`pred_std` and `target_std`, the per-dimension std over tokens of predictions and targets
(collapse watch: both near 0 means collapse); `blank_share`, the share of the loss from target
patches of blank paper; the mask sizes `context_tokens` and `target_tokens` (per block).

Deviations from the paper and the official code (and why):
- Mask sampler, official quirks fixed: (1) the official sampler uses ONE uniform number for
  both a block's scale and its aspect ratio, so small blocks are always the widest; here they
  are drawn independently. (2) Its top-left corner is drawn with an exclusive upper bound and
  block sides are kept strictly smaller than the grid, so the last row and column are never
  inside any block (neither target nor context); here every row and column can be. (3) It
  truncates every image's context to the batch minimum by dropping the LAST indices (a bias
  against the bottom of the image); here a random subset of that size is kept. (4) When none
  of 20 context positions keeps more than min_keep patches once the targets are removed, the
  official code retries with fewer targets excluded (the last ones first), letting the context
  overlap them; here the whole grid minus the targets is tried first, so context and targets
  stay disjoint whenever that leaves enough, and only then the official relaxation follows
  (then the whole grid, where the official code would retry forever). sample_masks lists the order.
- Non-square grids: a block of area s*H*W gets height round(sqrt(area * aspect)) clipped to
  the grid and width round(area / height) clipped to the grid, so the scale stays right where
  one side hits the border.
- Mask sizes are drawn per rank's batch (the official sampler shares them across ranks);
  positions are per image, as in the official code.
- Shared backbone: DINOv3-style ViT (cls + 4 registers, 2D RoPE, LayerScale) instead of a
  plain ViT with sin-cos position embeddings. The predictor uses the same RoPE at the true
  grid coordinates of context and target patches, and the context encoder's cls and
  registers pass through it as unrotated prefix tokens. Targets are the patch tokens only.
  `--layerscale_init 0` drops LayerScale (the paper's plain blocks); at the tiny preset that
  collapsed faster (effective rank 8.0 instead of 16.8, probe 13.9 vs random init 14.7;
  results/probe_tiny_ijepa_nolayerscale.md), so LayerScale 1e-5 stays the default.
- Loss: smooth L1 (official code) by default, `--loss l2` for the paper's L2; the L2 is the
  mean over feature dimensions rather than the sum (a constant factor Adam ignores).
- Views: crops at native resolution with mild scale jitter and ink-aware sampling instead of
  RandomResizedCrop(0.3, 1) (sheets have a physical scale; near-blank crops teach nothing).
- lr is not scaled with the batch (as in the official code); the warmup is a fraction of the
  steps, not 40 epochs.
- Tiny preset (CPU minutes): 128 px crops with RoPE coordinate jitter; see PRESETS["tiny"].
  Tried at this preset, not adopted: `--lr 3e-4 --start_lr 1e-4 --ema_start 0.998`
  keeps the target encoder from collapsing (effective rank 70 instead of 16.8, target std 0.48
  instead of 0.29 in the bake-off's run of the preset) but it stays near its random init:
  probe 14.5 vs 14.6 for random init (results/probe_tiny_ijepa_lr3e4.md). At patch 8
  (`--patch_size 8 --img_size 64 --ema_start 0.99 --pred_depth 2 --rope_rescale 4`, 1,400 steps,
  18 min) the loss ends 25% under predict-the-mean-target, the probe level with random init
  (same patch-8 architecture) on the synthetic probe set and 71.0 vs 68.6 ± 1.2 on real plans
  (walls-fr-dev at scale 0.5) (results/probe_tiny_teach_p8.md); 4,800 steps (45 minutes) end 1.0
  below random init on the synthetic set and 3.6 above on real plans (results/probe_tiny_teach_p8_curves.md).
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
class IJEPAConfig(common.TrainConfig):
    patch_size: int = 16  # backbone patch side in pixels (16: DINOv3's; a fresh backbone only, --init keeps its own)
    img_size: int = 224  # training crop side in pixels (multiple of the patch size)
    rope_rescale: float = 0.0  # RoPE coordinate jitter of the context encoder, s in [1/r, r] (0: off)
    n_targets: int = 4  # target blocks per image
    target_scale: tuple = (0.15, 0.2)  # target block area as a fraction of the grid
    target_aspect: tuple = (0.75, 1.5)  # target block height / width
    context_scale: tuple = (0.85, 1.0)  # context block area (aspect 1) before the targets are removed
    min_keep: int = 10  # an image's context must keep more than this many patches (official)
    pred_dim: int = 384  # predictor width (narrow: the paper's 384 for every encoder size)
    pred_depth: int = 6  # predictor blocks (official default; 12 for ViT-H)
    pred_heads: int = 12  # predictor heads (official: the encoder's; head dim must be a multiple of 4)
    loss: str = "smooth_l1"  # smooth_l1 (official code) | l2 (paper)
    lr: float = 1e-3  # peak learning rate (not scaled with the batch, as in the official code)
    start_lr: float = 2e-4  # learning rate at the start of the warmup
    final_lr: float = 1e-6  # learning rate at the end of the cosine
    warmup_steps: int = 13_000  # linear warmup start_lr -> lr (paper: 40 of 300 epochs)
    weight_decay: float = 0.04  # AdamW weight decay at the start (not on biases, norms, tokens)
    final_weight_decay: float = 0.4  # weight decay at the end (cosine increase)
    ema_start: float = 0.996  # target-encoder momentum at step 0, linear to ema_end at the last step
    ema_end: float = 1.0  # target-encoder momentum at the last step
    min_ink: float = 0.02  # resample crops with less ink than this fraction (0: off)
    scale_min: float = 0.8  # crop scale jitter: a region of side img_size * f, f log-uniform in
    scale_max: float = 1.25  #   [scale_min, scale_max], is resampled to img_size
    tiles_per_sheet: int = 16  # consecutive crops cut from one rendered/decoded sheet
    layerscale_init: float = 1e-5  # LayerScale init of a fresh backbone (DINOv3's; 0: none, the paper's plain ViT)


PRESETS = {
    # 2-core CPU, <= 20 min (results/probe_tiny_ijepa.md):
    # - img_size 128 (8 x 8 patches): ~4x the steps of 224 px, and step count is what decides at this budget.
    # - rope_rescale 2 (spacings 2/16 .. 2/4): the probe's 224 px grid spaces RoPE coordinates in (-1, 1)
    #   2/14 apart, not 2/8, so the context encoder trains over that spacing too.
    # - batch_size 32: I-JEPA has no batch statistics, so a small batch costs little and buys steps.
    # - min_ink 0.15 (inkier crops): with 0.05 the loss sat at the predict-the-mean-target level with
    #   nearly constant predictions; with 0.15 it ended at 0.65 of it.
    # Outcome: the probe does NOT beat random init (13.8 vs 14.6 best-block mIoU): the target encoder
    # collapses towards low rank (results/LOG.md has the tries that did not fix it).
    "tiny": dict(arch="vit_tiny", img_size=128, rope_rescale=2.0, batch_size=32, steps=1800, warmup_steps=100,
                 pred_dim=96, pred_depth=4, pred_heads=3, min_ink=0.15, num_workers=1, log_every=20,
                 ckpt_every=300),
    # the paper's recipe scaled to ViT-S/B (batch 2048, 300 epochs of ImageNet in the paper)
    "small": dict(arch="vit_small", batch_size=2048, steps=100_000, warmup_steps=13_000, pred_heads=6,
                  num_workers=8, log_every=50, ckpt_every=2000),
    "base": dict(arch="vit_base", batch_size=2048, steps=100_000, warmup_steps=13_000, pred_heads=12,
                 num_workers=10, log_every=50, ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------
# Multi-block masks
# ---------------------------------------------------------------------------------------

def block_size(gen: torch.Generator, scale: tuple, aspect: tuple, grid: tuple[int, int]) -> tuple[int, int]:
    """(height, width) in patches of a block covering a uniform scale of the grid with a
    uniform aspect ratio (height / width); scale and aspect are independent draws."""
    H, W = grid
    u_scale, u_aspect = torch.rand(2, generator=gen).tolist()
    area = (scale[0] + u_scale * (scale[1] - scale[0])) * H * W
    ratio = aspect[0] + u_aspect * (aspect[1] - aspect[0])
    h = min(max(round(math.sqrt(area * ratio)), 1), H)
    return h, min(max(round(area / h), 1), W)


def sample_masks(batch: int, grid: tuple[int, int], gen: torch.Generator, *, n_targets: int = 4,
                 target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
                 min_keep: int = 10, tries: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-block masks for one batch on a CPU generator (no device syncs in the step).
    Block sizes are drawn once per batch, positions per image. Returns
      context_idx (B, n_ctx): row-major patch indices of the context, the same count for every
                  image (the batch minimum, a random subset of each image's context);
      target_idx  (B, n_targets, h*w): row-major indices of each target block.
    Every image's context keeps more than min_keep patches (official), relaxing as needed:
      1. the first of `tries` random context-block positions, minus all targets;
      2. else the whole grid minus all targets (context and targets still disjoint);
      3. else, as the official collator relaxes: for k = 1 .. n_targets, `tries` fresh positions
         minus only the first n_targets - k targets (the context may then overlap the others);
      4. else (the context block itself holds <= min_keep patches) the whole grid.
    Only a grid of <= min_keep patches raises. Draws for step 3 are taken only when some image
    needs them, so batches that never relax consume the generator as before."""
    H, W = grid
    N = H * W
    if N <= min_keep:
        raise ValueError(f"a {H}x{W} grid cannot keep more than min_keep={min_keep} context patches")
    th, tw = block_size(gen, target_scale, target_aspect, grid)
    ch, cw = block_size(gen, context_scale, (1.0, 1.0), grid)
    # top-left corners uniform over every position where the block fits (inclusive bound)
    top = torch.randint(0, H - th + 1, (batch, n_targets, 1, 1), generator=gen)
    left = torch.randint(0, W - tw + 1, (batch, n_targets, 1, 1), generator=gen)
    rows, cols = torch.arange(th).view(th, 1), torch.arange(tw).view(1, tw)
    target_idx = ((top + rows) * W + left + cols).flatten(2)  # (B, M, th*tw)
    each_target = torch.zeros(batch, n_targets, N, dtype=torch.bool).scatter_(2, target_idx, True)  # (B, M, N)
    in_first = each_target.cumsum(1) > 0  # (B, M, N): in_first[:, j] = in one of targets 0 .. j
    in_target = in_first[:, -1]  # (B, N)
    r, c = torch.arange(H), torch.arange(W)

    def context_blocks() -> torch.Tensor:  # (B, tries, N): `tries` random positions of the context block
        ctop = torch.randint(0, H - ch + 1, (batch, tries, 1), generator=gen)
        cleft = torch.randint(0, W - cw + 1, (batch, tries, 1), generator=gen)
        in_rows = (r >= ctop) & (r < ctop + ch)  # (B, tries, H)
        in_cols = (c >= cleft) & (c < cleft + cw)  # (B, tries, W)
        return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(2)

    # candidate contexts in order of preference; each image takes the first that keeps > min_keep
    candidates = torch.cat([context_blocks() & ~in_target[:, None], ~in_target[:, None]], 1)  # steps 1, 2
    if not (candidates.sum(-1) > min_keep).any(1).all():
        excluded = [in_first[:, n_targets - k - 1] for k in range(1, n_targets)] + [torch.zeros_like(in_target)]
        relaxed = [context_blocks() & ~out[:, None] for out in excluded]  # step 3, k = 1 .. n_targets
        candidates = torch.cat([candidates, *relaxed, torch.ones(batch, 1, N, dtype=torch.bool)], 1)  # step 4
    valid = candidates.sum(-1) > min_keep  # (B, n_candidates), the last always valid when step 4 was added
    context = candidates[torch.arange(batch), valid.int().argmax(1)]  # (B, N) first valid candidate
    n_ctx = int(context.sum(1).min())
    noise = torch.rand(batch, N, generator=gen).masked_fill(~context, 2.0)  # non-context sorts last
    context_idx = noise.argsort(1)[:, :n_ctx].sort(1).values  # (B, n_ctx)
    return context_idx, target_idx


# ---------------------------------------------------------------------------------------
# Model pieces
# ---------------------------------------------------------------------------------------

class Predictor(nn.Module):
    """Narrow transformer: context tokens projected to `dim`, one shared mask token per target
    patch, RoPE at every patch's true grid coordinates (prefix tokens unrotated), LayerNorm,
    projection back to the encoder width. Each target block is predicted in its own sequence
    (context repeated per block), so blocks cannot see each other's queries (official)."""

    def __init__(self, enc_dim: int, n_prefix: int, *, dim: int, depth: int, heads: int):
        super().__init__()
        self.n_prefix = n_prefix
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.rope = common.RoPE(dim // heads)
        self.blocks = nn.ModuleList(common.Block(dim, heads, layerscale_init=None) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj = nn.Linear(dim, enc_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # official: shrink each residual branch's output by sqrt(2 * layer)
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, tokens: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """tokens (B, P + n_ctx, D) from the context encoder -> (B, M, n_t, D) predictions."""
        B, M, n_t = target_idx.shape
        x = self.embed(tokens).repeat_interleave(M, dim=0)  # (B*M, P + n_ctx, d) one sequence per block
        queries = self.mask_token.to(x.dtype).expand(B * M, n_t, -1)  # (B*M, n_t, d)
        x = torch.cat([x, queries], dim=1)
        coords = common.grid_coords(*grid, device=x.device)  # (N, 2)
        positions = torch.cat([context_idx.repeat_interleave(M, dim=0), target_idx.flatten(0, 1)], dim=1)
        rope = self.rope(coords[positions])  # (B*M, n_ctx + n_t, hd) each
        for blk in self.blocks:
            x = blk(x, rope, self.n_prefix)
        return self.proj(self.norm(x[:, -n_t:])).view(B, M, n_t, -1)


class IJEPA(nn.Module):
    """Context encoder on the context patches only, then the predictor; the trained pair
    (the target encoder lives outside: it gets no gradient and DDP must not see it)."""

    def __init__(self, encoder: common.ViT, predictor: Predictor):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, img, context_idx, target_idx):
        out = self.encoder(common.to_model_input(img), keep=context_idx)  # normed: (B, P + n_ctx, D)
        return self.predictor(out["normed"], context_idx, target_idx, out["grid"])  # (B, M, n_t, D)


@torch.no_grad()
def target_features(target_encoder: common.ViT, img: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
    """Full-image target-encoder patches, parameter-free layer norm, gathered per block."""
    patches = target_encoder(common.to_model_input(img))["patches"].float()  # (B, N, D)
    patches = F.layer_norm(patches, patches.shape[-1:])
    B, M, n_t = target_idx.shape
    picked = patches.gather(1, target_idx.flatten(1)[..., None].expand(-1, -1, patches.shape[-1]))
    return picked.view(B, M, n_t, -1)  # (B, M, n_t, D)


@torch.no_grad()
def global_features(backbone: common.ViT, img: torch.Tensor) -> torch.Tensor:
    """The paper's image representation: the exported encoder's patch tokens, averaged."""
    return backbone(common.to_model_input(img))["patches"].mean(1)  # (B, D)


def ema_momentum(step: int, total: int, start: float, end: float) -> float:
    """Target-encoder momentum: linear from `start` at step 0 to `end` at step `total`."""
    return common.linear_ramp(step, 0, total, start, end)


# ---------------------------------------------------------------------------------------
# Loss and the signals logged beside it
# ---------------------------------------------------------------------------------------

def token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token loss (feature dimensions averaged): smooth L1 (beta 1) or squared error."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
    if kind == "l2":
        return ((pred - target) ** 2).mean(-1)
    raise ValueError(f"unknown --loss {kind!r}: smooth_l1 | l2")


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    return token_loss(pred, target, kind).mean()


def mean_target_loss(target: torch.Tensor, kind: str) -> torch.Tensor:
    """The trivial solution's loss: the batch's mean target vector predicted everywhere."""
    mean = target.flatten(0, -2).mean(0)  # (D,)
    return jepa_loss(mean.expand_as(target), target, kind)


def per_dim_std(x: torch.Tensor) -> torch.Tensor:
    """Collapse watch: std over tokens of each feature dimension, averaged over dimensions."""
    return x.flatten(0, -2).float().std(0).mean()


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------

def make_view(cfg: IJEPAConfig):
    def view(sheet, rng):
        crop = common.random_crop(sheet, rng, cfg.img_size, scale=(cfg.scale_min, cfg.scale_max), min_ink=cfg.min_ink)
        return {"image": crop["image"]}  # (1, S, S) in [0, 1], 1 = paper
    return view


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(IJEPAConfig, PRESETS, "ijepa", argv, __doc__)
    run = common.Run(cfg, "ijepa")
    dev = run.device
    rope_rescale = cfg.rope_rescale or None
    encoder = (common.load_backbone(cfg.init, rope_rescale=rope_rescale) if cfg.init
               else common.vit(cfg.arch, patch_size=cfg.patch_size, rope_rescale=rope_rescale,
                               layerscale_init=cfg.layerscale_init))
    p = encoder.patch_size
    if cfg.img_size % p:
        raise SystemExit(f"--img_size {cfg.img_size} is not a multiple of the backbone's {p} px patches")
    predictor = Predictor(encoder.embed_dim, encoder.n_prefix, dim=cfg.pred_dim, depth=cfg.pred_depth,
                          heads=cfg.pred_heads)
    target_encoder = copy.deepcopy(encoder).requires_grad_(False).eval()  # eval: no RoPE jitter
    model = IJEPA(encoder, predictor).to(dev)
    target_encoder.to(dev)
    models = {"encoder": encoder, "predictor": predictor, "target_encoder": target_encoder}
    opt = common.adamw(common.param_groups(model), lr=0.0, device=dev)  # default betas (official)
    start = run.resume(models, {"opt": opt})
    fwd = common.wrap_ddp(model, run.dist)  # broadcasts rank 0's weights
    if start == 0:  # the target encoder starts as the context encoder, the same on every rank
        target_encoder.load_state_dict(encoder.state_dict())
    fwd = torch.compile(fwd) if cfg.compile else fwd

    sheets = common.open_sheets(cfg.data, seed=cfg.seed, split="train", dpi=cfg.dpi)
    dataset = common.TileDataset(sheets, make_view(cfg), seed=cfg.seed, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(dataset, run.local_batch, start=start * cfg.batch_size, rank=run.dist.rank,
                                world_size=run.dist.world_size, num_workers=cfg.num_workers, seed=cfg.seed)
    batches = iter(loader)
    grid = (cfg.img_size // p, cfg.img_size // p)

    for step in range(start, cfg.steps):
        img = next(batches)["image"].to(dev, non_blocking=True)  # (B, 1, H, W), 1 = paper
        lr = common.cosine_schedule(step, cfg.steps, cfg.lr, cfg.final_lr, warmup=cfg.warmup_steps,
                                    warmup_start=cfg.start_lr)
        wd = common.cosine_schedule(step, cfg.steps, cfg.weight_decay, cfg.final_weight_decay)
        common.set_lr_wd(opt, lr, wd)
        context_idx, target_idx = sample_masks(
            img.shape[0], grid, common.step_generator(cfg.seed, step, run.dist.rank), n_targets=cfg.n_targets,
            target_scale=cfg.target_scale, target_aspect=cfg.target_aspect, context_scale=cfg.context_scale,
            min_keep=cfg.min_keep)
        context_idx, target_idx = context_idx.to(dev, non_blocking=True), target_idx.to(dev, non_blocking=True)
        with common.autocast(dev):
            target = target_features(target_encoder, img, target_idx)  # (B, M, n_t, D)
            pred = fwd(img, context_idx, target_idx)  # (B, M, n_t, D)
        per_token = token_loss(pred.float(), target, cfg.loss)  # (B, M, n_t)
        loss = per_token.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        momentum = ema_momentum(step, cfg.steps, cfg.ema_start, cfg.ema_end)
        common.ema_update(target_encoder, encoder, momentum)
        with torch.no_grad():
            # learning signal: the loss of the trivial mean-target prediction, to be beaten
            trivial = mean_target_loss(target, cfg.loss)
            has_ink = (common.patchify(img, p) < 0.5).any(-1)  # (B, N)
            blank = ~has_ink.gather(1, target_idx.flatten(1)).view_as(per_token)
            blank_share = (per_token * blank).sum() / per_token.sum().clamp(min=1e-12)
        run.step(step, models, {"opt": opt}, loss=loss, trivial=trivial, pred_std=per_dim_std(pred.detach()),
                 target_std=per_dim_std(target), blank_share=blank_share, lr=lr, wd=wd, momentum=momentum,
                 context_tokens=context_idx.shape[1], target_tokens=target_idx.shape[2])
        if run.stopped:
            break
    run.finish(target_encoder)


if __name__ == "__main__":
    main()
