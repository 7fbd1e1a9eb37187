"""MAE: masked autoencoder pretraining on construction sheets.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022), official code
facebookresearch/mae. Each image is cut into 16 px patches; a random 75% are removed, the ViT
encoder sees only the visible 25% (plus cls and registers), and a light transformer decoder
fills the grid with a shared mask token and regresses the pixels of the removed patches,
normalised per patch (norm_pix_loss). The encoder is the backbone that gets evaluated.

Commands:
  CPU, tiny (~0.85 s/step on a 2-core x86 CPU: 17 min; with the probe, the quickstart's main job,
  21 min from a fresh clone; results/probe_tiny_mae.md):
                                        python mae.py --preset tiny
  one GPU, ViT-S:                       torchrun --standalone --nproc_per_node=1 mae.py --preset small --data DIR
  8 GPUs, ViT-B:                        torchrun --standalone --nproc_per_node=8 mae.py --preset base --data DIR
  many nodes:  torchrun --nnodes 4 --node_rank $i --master_addr $HOST --master_port 29500 \
               --nproc_per_node 8 mae.py --preset base --data DIR --out_dir /shared/runs/mae
  continue from other weights:  --init path/to/backbone.safetensors (or an official DINOv3 .pth)
  resume a stopped run:         same command + --resume
Then probe:  python eval_probe.py --ckpt runs/mae/backbone.safetensors

Deviations from the paper (and why):
- Grayscale targets: sheets are monochrome, so the encoder gets the gray image replicated to
  3 channels (keeps official RGB weights usable) but the decoder predicts ONE channel per
  pixel (16*16 = 256 values), not three identical ones.
- Shared backbone: DINOv3-style ViT (4 registers, 2D RoPE instead of sin-cos absolute
  position embeddings, LayerScale). The decoder uses the same RoPE at the true grid
  coordinates of every token; registers and cls pass through the decoder as prefix tokens.
- Views: crops at native resolution with mild scale jitter and ink-aware sampling instead of
  RandomResizedCrop(0.2, 1) + horizontal flip (flip mirrors text; tiny crops of blank paper
  carry no signal).
- Patch statistics as two extra targets (`--stats_weight`; 1.0 in the tiny preset, 0 = the
  paper elsewhere): the decoder also predicts each masked patch's pixel mean and std,
  standardised over the batch's masked patches, weighted like the 256 normalised pixels.
  norm_pix throws exactly these two numbers away, so a solid black wall patch and a blank one
  are the same all-zero target; real plans draw walls as solid black bands, and with the
  paper's targets the tiny run probed below random init on real plans (walls-fr-dev 61.6 vs
  64.0), with raw pixel targets above it there but at random init on the synthetic probe set.
  Both targets together beat random init on both (results/probe_tiny_mae_walls.md).
- Optional `--loss_on ink`: the loss over masked patches that contain ink only (the obvious
  remedy to whitespace-dominated loss); off (`all`) by default, as in the paper.
- Tiny preset (2-core CPU, 1,200 steps): 128 px crops instead of 224 (the encoder then sees 16
  visible tokens: ~2.5x more steps in the budget, and step count is what decides at this
  scale), with RoPE coordinate-rescale jitter r = 2 on the encoder so the 8x8 training grid
  also sees the coordinate spacing of the 14x14 probe grid; ViT-Ti; decoder 2 x 128;
  batch 64; lr 1.5e-3 (blr 6e-3) with 60 warmup steps; crops with >= 5% ink; the patch
  statistics above (stats_weight 1). Otherwise the paper's loss (norm_pix_loss, 75% masking,
  loss on all masked patches). Measured (results/probe_tiny_mae_walls.md): over the last 200
  steps the pixel loss is 0.48 against its predict-the-patch-mean level 0.62 and the
  statistics loss 0.38 against 1; best block vs random init (3 seeds): synthetic probe 18.1
  vs 14.6 (+3.5), real plans (walls-fr-dev) 67.1 vs 64.0 (+3.1).
  The other knobs were chosen once from the small-scale notes, not ablated one by one.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

import common


@dataclasses.dataclass
class MAEConfig(common.TrainConfig):
    img_size: int = 224  # training crop side in pixels (multiple of 16)
    mask_ratio: float = 0.75  # fraction of patches removed from the encoder's input
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (paper's best setting)
    loss_on: str = "all"  # masked patches in the loss: all (paper) | ink (only patches with ink)
    stats_weight: float = 0.0  # weight of two extra targets per patch, its pixel mean and std (0: off, paper)
    blr: float = 1.5e-4  # base learning rate; lr = blr * batch_size / 256 (paper)
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, tokens)
    warmup_steps: int = 100  # linear warmup, then half-cycle cosine to 0
    decoder_dim: int = 512  # decoder width
    decoder_depth: int = 8  # decoder blocks
    decoder_heads: int = 16  # decoder heads (head dim must be a multiple of 4 for RoPE)
    min_ink: float = 0.02  # resample crops with less ink than this fraction (0: off)
    scale_min: float = 0.8  # crop scale jitter: a region of side img_size/scale is resampled
    scale_max: float = 1.25  #   to img_size, for scale in [scale_min, scale_max]
    tiles_per_sheet: int = 16  # consecutive crops cut from one rendered/decoded sheet
    rope_rescale: float = 0.0  # RoPE coordinate-rescale jitter of the encoder in [1/r, r] (0: off)


PRESETS = {
    # 2-core CPU (see the header): 128 px crops + RoPE jitter, high lr, short warmup, inky crops
    "tiny": dict(arch="vit_tiny", img_size=128, rope_rescale=2.0, batch_size=64, steps=1200, blr=6e-3,
                 warmup_steps=60, decoder_dim=128, decoder_depth=2, decoder_heads=4, min_ink=0.05,
                 stats_weight=1.0, num_workers=1, log_every=20, ckpt_every=250),
    # the paper's recipe scaled to ViT-S/B (batch 4096 over 800 epochs in the paper)
    "small": dict(arch="vit_small", batch_size=1024, steps=100_000, warmup_steps=5_000, num_workers=8,
                  log_every=50, ckpt_every=2000),
    "base": dict(arch="vit_base", batch_size=4096, steps=100_000, warmup_steps=5_000, num_workers=10,
                 log_every=50, ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------
# Model pieces
# ---------------------------------------------------------------------------------------

def random_masking(B: int, N: int, ratio: float, noise: torch.Tensor | None = None, device=None):
    """Per-sample random masking by sorting noise (official MAE): the n_keep patches with the
    smallest noise stay visible. Returns ids_keep (B, n_keep), ids_restore (B, N) that
    unshuffles [kept, removed] back to grid order, and mask (B, N) with 1 = removed."""
    n_keep = int(N * (1 - ratio))
    if noise is None:
        noise = torch.rand(B, N, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :n_keep] = 0
    mask = mask.gather(1, ids_restore)
    return ids_shuffle[:, :n_keep], ids_restore, mask


class MAEDecoder(nn.Module):
    """Linear to decoder width, mask tokens appended and unshuffled to grid order, RoPE
    blocks over the full grid (prefix tokens unrotated), LayerNorm, linear to patch pixels."""

    def __init__(self, enc_dim: int, n_prefix: int, *, dim: int, depth: int, heads: int, patch_pixels: int):
        super().__init__()
        self.n_prefix = n_prefix
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.rope = common.RoPE(dim // heads)
        self.blocks = nn.ModuleList(common.Block(dim, heads, layerscale_init=None) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.embed(tokens)  # (B, P + n_keep, Dd)
        prefix, visible = x[:, :self.n_prefix], x[:, self.n_prefix:]
        B, N = ids_restore.shape
        filled = torch.cat([visible, self.mask_token.expand(B, N - visible.shape[1], -1)], dim=1)
        filled = filled.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, Dd) grid order
        x = torch.cat([prefix, filled], dim=1)
        rope = self.rope(common.grid_coords(*grid, device=x.device))
        for blk in self.blocks:
            x = blk(x, rope, self.n_prefix)
        return self.pred(self.norm(x[:, self.n_prefix:]))  # (B, N, p*p)


class MAE(nn.Module):
    """Encoder on the visible patches, decoder on the full grid; returns predicted pixels."""

    def __init__(self, encoder: common.ViT, decoder: MAEDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, img, ids_keep, ids_restore):
        out = self.encoder(common.to_model_input(img), keep=ids_keep)  # normed: (B, P + n_keep, D)
        return self.decoder(out["normed"], ids_restore, out["grid"])  # (B, N, p*p)


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------

def patch_targets(target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """(B, N, p*p) pixels -> regression targets; norm_pix: (x - mean) / sqrt(var + 1e-6),
    unbiased variance, per patch (official)."""
    if not norm_pix:
        return target
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


@torch.no_grad()
def patch_stats_targets(pixels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, N, p*p) pixels -> (B, N, 2): each patch's pixel mean and std (sqrt(unbiased var +
    1e-6), as norm_pix), each standardised by its mean and std over the weighted patches of the
    global batch (one all-reduce of 5 sums), so the pair weighs like the 256 normalised pixels:
    predicting 0 scores 1. This is what norm_pix discards: a solid black patch and a blank one
    are both all-zero after norm_pix, but their means are 0 and 1."""
    stats = torch.stack([pixels.mean(-1), (pixels.var(-1) + 1e-6).sqrt()], dim=-1)  # (B, N, 2)
    w = weight[..., None]
    sums = torch.cat([weight.sum()[None], (stats * w).sum((0, 1)), (stats.square() * w).sum((0, 1))])
    sums = common.all_reduce_sum(sums)
    n = sums[0].clamp(min=1)
    mu = sums[1:3] / n
    var = (sums[3:5] / n - mu.square()).clamp(min=0)
    return (stats - mu) / (var + 1e-6).sqrt()


def mae_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-patch MSE averaged over the patches with weight 1 (the masked ones)."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------

def make_view(cfg: MAEConfig):
    def view(sheet, rng):
        crop = common.random_crop(sheet, rng, cfg.img_size, scale=(cfg.scale_min, cfg.scale_max), min_ink=cfg.min_ink)
        return {"image": crop["image"]}  # (1, S, S) in [0, 1], 1 = paper
    return view


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------

def main(argv=None):
    cfg = common.parse_config(MAEConfig, PRESETS, "mae", argv, __doc__)
    if cfg.loss_on not in ("all", "ink"):
        raise SystemExit(f"--loss_on must be 'all' or 'ink', got {cfg.loss_on!r}")
    if cfg.img_size % 16:
        raise SystemExit(f"--img_size must be a multiple of the patch size 16, got {cfg.img_size}")
    run = common.Run(cfg, "mae")
    dev, p = run.device, 16
    rescale = {"rope_rescale": cfg.rope_rescale or None}
    encoder = common.load_backbone(cfg.init, **rescale) if cfg.init else common.vit(cfg.arch, **rescale)
    decoder = MAEDecoder(encoder.embed_dim, encoder.n_prefix, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                         heads=cfg.decoder_heads, patch_pixels=p * p + (2 if cfg.stats_weight else 0))
    model = MAE(encoder, decoder).to(dev)
    models = {"encoder": encoder, "decoder": decoder}
    opt = common.adamw(common.param_groups(model), lr=0.0, betas=(0.9, 0.95), device=dev)
    start = run.resume(models, {"opt": opt})
    fwd = common.wrap_ddp(model, run.dist)
    fwd = torch.compile(fwd) if cfg.compile else fwd

    sheets = common.open_sheets(cfg.data, seed=cfg.seed, split="train", dpi=cfg.dpi)
    dataset = common.TileDataset(sheets, make_view(cfg), seed=cfg.seed, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(dataset, run.local_batch, start=start * cfg.batch_size, rank=run.dist.rank,
                                world_size=run.dist.world_size, num_workers=cfg.num_workers, seed=cfg.seed)
    batches = iter(loader)
    lr_peak = cfg.blr * cfg.batch_size / 256
    N = (cfg.img_size // p) ** 2

    for step in range(start, cfg.steps):
        img = next(batches)["image"].to(dev, non_blocking=True)  # (B, 1, H, W), 1 = paper
        B = img.shape[0]
        lr = common.cosine_schedule(step, cfg.steps, lr_peak, warmup=cfg.warmup_steps)
        common.set_lr_wd(opt, lr, cfg.weight_decay)
        noise = torch.rand(B, N, generator=common.step_generator(cfg.seed, step, run.dist.rank, dev), device=dev)
        ids_keep, ids_restore, mask = random_masking(B, N, cfg.mask_ratio, noise)
        pixels = common.patchify(img, p)  # (B, N, 256)
        target = patch_targets(pixels, cfg.norm_pix_loss)
        has_ink = (pixels < 0.5).any(dim=-1).float()  # (B, N)
        weight = mask * has_ink if cfg.loss_on == "ink" else mask
        with common.autocast(dev):
            pred = fwd(img, ids_keep, ids_restore)
        pred = pred.float()
        loss_pix = mae_loss(pred[..., :p * p], target, weight)
        loss = loss_pix
        if cfg.stats_weight:
            stats = patch_stats_targets(pixels, weight)
            loss_stats = mae_loss(pred[..., p * p:], stats, weight)
            loss = loss_pix + cfg.stats_weight * loss_stats
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            # learning signal: the loss of predicting each patch's mean (0 after norm_pix)
            mean_pred = torch.zeros_like(target) if cfg.norm_pix_loss else pixels.mean(-1, keepdim=True).expand_as(pixels)
            trivial = mae_loss(mean_pred, target, weight)
            per_patch = ((pred[..., :p * p] - target) ** 2).mean(-1) * mask
            blank_share = (per_patch * (1 - has_ink)).sum() / per_patch.sum().clamp(min=1e-12)
            extra = {}
            if cfg.stats_weight:  # the stats' trivial solution (predict the batch mean) scores 1
                extra = dict(loss_pix=loss_pix, trivial_pix=trivial, loss_stats=loss_stats)
                trivial = trivial + cfg.stats_weight * mae_loss(torch.zeros_like(stats), stats, weight)
        run.step(step, models, {"opt": opt}, loss=loss, trivial=trivial, blank_share=blank_share, lr=lr, **extra)
        if run.stopped:
            break
    run.finish(encoder)


if __name__ == "__main__":
    main()
