"""BEiT: masked image modeling against the codes of a tokenizer trained on sheets (v1/DiT, v2 VQ-KD).

Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (ICLR 2022); Peng et al., "BEiT v2:
Masked Image Modeling with Vector-Quantized Visual Tokenizers" (2022); Li et al., "DiT:
Self-supervised Pre-training for Document Image Transformer" (2022); official code
microsoft/unilm (beit, beit2, dit). Two stages in one file. Stage 1 trains a discrete
tokenizer on sheets: a small ViT turns every 16 px patch into a 32-dim unit vector, which is
replaced by the nearest of K unit codes (straight-through, commitment loss); the codebook
follows its assigned vectors by EMA and codes left unused are re-seeded. A small decoder
reconstructs from the codes either the patch pixels (`--tokenizer vqvae`, v1/DiT style, no
teacher needed) or a frozen teacher's patch features (`--tokenizer vqkd`, v2, `--teacher PATH`).
Stage 2 freezes the tokenizer and pretrains the ViT: ~40% of the patches, in blocks, have their
embeddings replaced by a mask token, and a linear LM head on the masked positions predicts each
one's code (cross-entropy). The encoder is the backbone that gets evaluated.

Commands:
  CPU, tiny (tokenizer 400 steps + MIM 2,400 steps at 96 px, ~18 min on 2 cores; results/probe_tiny_beit_96px.md):
      python beit.py --preset tiny
  the v2 tokenizer, distilled from another recipe's backbone:
      python beit.py --preset tiny --tokenizer vqkd --teacher runs/mae/backbone.safetensors --out_dir runs/beit_vqkd
  one GPU, ViT-S:  torchrun --standalone --nproc_per_node=1 beit.py --preset small --data DIR
  8 GPUs, ViT-B:   torchrun --standalone --nproc_per_node=8 beit.py --preset base --data DIR
  many nodes:  torchrun --nnodes 4 --node_rank $i --master_addr $HOST --master_port 29500 \
               --nproc_per_node 8 beit.py --preset base --data DIR --out_dir /shared/runs/beit
  the stages apart:  --stage tokenizer, then --stage pretrain --tokenizer_ckpt runs/beit/tokenizer.safetensors
  continue from other weights:  --init path/to/backbone.safetensors (or an official DINOv3 .pth)
  resume a stopped run:         same command + --resume (a finished tokenizer is not retrained)
Then probe:  python eval_probe.py --ckpt runs/beit/backbone.safetensors

Run dir: tokenizer/ (the tokenizer stage's own checkpoints and metrics), tokenizer.safetensors
(its weights; its settings and code usage as JSON in the metadata), then the pretraining run's
metrics.jsonl, checkpoints and backbone.safetensors.

Logged beside the loss. Tokenizer stage: `recon` against `trivial` (the loss of predicting the
batch's mean patch / mean teacher feature everywhere), `commit`, `codes_used` and `perplexity`
of the global batch's code histogram, `reseeded` dead codes, and for blank-paper patches
`blank_codes` (how many codes they use) and `blank_top_share` (their share on the most common
one). Pretraining: `loss` (cross-entropy on masked patches) against `trivial` (the cross-entropy
of predicting the code marginal of all earlier steps' targets, add-one smoothed: the image-blind
solution) and `batch_entropy` (the entropy of the batch's own masked targets, a hindsight bound
below any image-blind prediction), `accuracy` against `majority` (the batch's most frequent
target code), `ink_accuracy` on masked patches with ink, and `blank_share`, the
share of masked patches that are blank paper.

Deviations from the papers (and why):
- v1/DiT tokenizer: BEiT v1 used the DALL-E dVAE (8192 codes, Gumbel-softmax relaxation) and
  DiT retrained one on 42M documents without releasing it or its code. Here `vqvae` is the v2
  machinery (L2-normalised codes, EMA codebook) with pixels as the reconstruction target: EMA
  vector quantisation trains stably in minutes, dead codes can be re-seeded, and both
  tokenizers share one implementation, so they differ only in what the decoder reconstructs.
  Pixel MSE on gray patches; the tokenizer sees the same 16 px patch grid as the encoder (v1
  fed the dVAE a 112 px second view).
- Codebook: k-means init on the first global batch (as v2), spherical, 10 iterations. Dead-code
  re-seeding is not in the papers (VQ-KD is known to collapse on small custom data): a code no
  image of the global batch used for `dead_code_steps` steps is replaced by the encoder outputs
  its codebook fits worst, so that spare codes go where the codebook is poorest rather than to
  more copies of blank paper.
- Shared backbone: DINOv3-style ViT (registers, RoPE instead of relative position bias,
  LayerScale init 0.1 as BEiT); the tokenizer's encoder and decoder are small ViTs of the same
  blocks without registers or LayerScale. v2 patch aggregation (`--aggregation_layer`) feeds the
  final cls token and the normed patch tokens of that block to two extra blocks and the shared
  LM head (v2 takes pre-norm tokens).
- Block masks: BEiT's generator (blocks of >= min_block patches, area U(min_block, remaining),
  aspect log-U(0.3, 1/0.3), 10 tries a block), topped up with random single patches to exactly
  the requested count, as BEiT v2 does; v1 stops when no block fits and under-masks (75 wanted of
  14 x 14: 74.5 on average, about a third of the draws short). The count is a fraction of the
  grid, floored (the official scripts take a count, --num_mask_patches 75 of 196): the default
  0.383 gives the official 75 at 224 px (0.4 would give 78); the tiny preset keeps 0.4, 14 of its
  36 patches (0.383 would give 13).
- Views: crops at native resolution with mild scale jitter and ink-aware sampling instead of
  RandomResizedCrop + horizontal flip (flip mirrors text; sheets have a physical scale); both
  stages draw the same kind of views (separate streams).
- Tokenizer optimiser: AdamW (0.9, 0.99), wd 1e-4 (official command); its lr is ours (the
  official command relies on the script's default).
- Tiny preset (2-core CPU): the tokenizer has no encoder blocks (a code per patch, from that
  patch alone, as a local dVAE code; with attention in the tokenizer MIM accuracy stayed below
  the majority code), 128 codes, MIM lr 1e-3 at batch 32; 96 px crops (6 x 6 patches, RoPE jitter
  2.33) so that 2,400 MIM steps fit the 20 min, which was what lifted the probe above the +2 bar;
  blocks of at least 9 patches (with 16, 41% of the 14 masked of 36 are scattered patches);
  measured, see PRESETS["tiny"].
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclasses.dataclass
class BEiTConfig(common.TrainConfig):
    stage: str = "all"  # all (tokenizer, then pretraining) | tokenizer | pretrain
    img_size: int = 224  # training crop side in pixels (multiple of 16), both stages
    rope_rescale: float = 0.0  # RoPE coordinate-rescale jitter of the pretrained encoder in [1/r, r] (0: off)
    # tokenizer (stage 1)
    tokenizer: str = "vqvae"  # vqvae (reconstruct patch pixels, v1/DiT style) | vqkd (a teacher's patch features, v2)
    teacher: str = ""  # vqkd teacher: any checkpoint common.load_backbone reads (this project's, DINOv3 .pth)
    tokenizer_ckpt: str = ""  # --stage pretrain: a tokenizer.safetensors (default: the one in out_dir)
    tokenizer_steps: int = 50_000  # optimisation steps of the tokenizer stage
    tokenizer_batch_size: int = 0  # global batch of the tokenizer stage (0: batch_size)
    tokenizer_lr: float = 1e-3  # tokenizer peak learning rate (warmup, then cosine)
    tokenizer_warmup_steps: int = 2_500  # tokenizer linear warmup
    tokenizer_weight_decay: float = 1e-4  # tokenizer AdamW weight decay (official)
    tokenizer_dim: int = 768  # width of the tokenizer's encoder and decoder (v2: ViT-B)
    tokenizer_depth: int = 12  # tokenizer encoder blocks (v2: 12)
    tokenizer_heads: int = 12  # tokenizer heads (head dim must be a multiple of 4 for RoPE)
    decoder_depth: int = 3  # tokenizer decoder blocks (v2: 3)
    codebook_size: int = 8192  # K, codes (v2: 8192)
    code_dim: int = 32  # code dimension (v2: 32)
    codebook_decay: float = 0.99  # EMA decay of the codebook (v2)
    commitment: float = 1.0  # weight of the commitment loss ||z - sg(code)||^2 (v2: 1)
    dead_code_steps: int = 20  # a code unused by the global batch this many steps in a row is re-seeded
    # masked image modeling (stage 2)
    mask_ratio: float = 0.383  # fraction of patches replaced by the mask token, floored: 75 of 196 (paper)
    min_block: int = 16  # smallest block area in patches (paper)
    lr: float = 1.5e-3  # peak learning rate (paper: 1.5e-3 at batch 2048)
    warmup_steps: int = 5_000  # linear warmup, then cosine to 0
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, tokens)
    clip_grad: float = 3.0  # gradient-norm clipping (paper)
    drop_path: float = 0.1  # stochastic depth of the encoder (paper)
    layerscale_init: float = 0.1  # LayerScale init of a fresh encoder (paper, ViT-B)
    aggregation_layer: int = 9  # v2 patch aggregation from this block's patches (1-based; 0: off)
    aggregation_depth: int = 2  # extra blocks of the aggregation branch (v2)
    # views
    min_ink: float = 0.02  # resample crops with less ink than this fraction (0: off)
    scale_min: float = 0.8  # crop scale jitter: a region of side img_size/scale is resampled
    scale_max: float = 1.25  #   to img_size, for scale in [scale_min, scale_max]
    tiles_per_sheet: int = 16  # consecutive crops cut from one rendered/decoded sheet


PRESETS = {
    # 2-core CPU, tokenizer + pretraining <= 20 min. Probe best-block mIoU against random init of this
    # architecture, 14.6 (results/probe_tiny_beit_tokenizer.md, results/probe_tiny_beit_96px.md):
    # - img_size 96 (6 x 6 patches): a step costs ~0.65x a 128 px one, so 2,400 MIM steps (76,800 images,
    #   not 54,400) fit; images seen is what lifted the probe: 17.1 (+2.5), against 15.9 (+1.3) at 128 px.
    # - rope_rescale 2.33: the 6 x 6 grid also sees the coordinate spacing of the probe's 14 x 14 grid.
    # - tokenizer_depth 0 (the patch embedding, its norm and the code head: a code per 16 px patch, from
    #   that patch alone): with a 4-block encoder each code depended on its neighbours, MIM accuracy stayed
    #   below the batch's majority code and the probe was +0.2; without, +0.8.
    # - codebook_size 128, lr 1e-3: each a little better than 512 codes or lr 2e-3 (+1.0, +1.1 vs +0.8).
    # - min_block 9: with the paper's 16, 41% of the 14 masked patches of 36 come from the scattered
    #   top-up; with 9, 0.7%.
    # - mask_ratio 0.4, min_ink 0.1, LayerScale 0.1 kept: mask 0.5 or 0.6 with min_ink 0.2, or LayerScale
    #   1e-5, probed no better (15.9, 15.0, 15.3 vs 15.9 at 128 px).
    # - short warmups, no aggregation branch (two more blocks per step), no drop-path: runs this short.
    # Outcome: MIM loss 0.65 x the running code marginal, ink-patch accuracy 0.25, probe 17.1 (+2.5);
    # at the bake-off's 1,200 steps +1.5 (vqvae) and +0.1 (vqkd from the MAE) (results/bakeoff_tiny.md).
    "tiny": dict(arch="vit_tiny", img_size=96, rope_rescale=2.33, batch_size=32, steps=2400, lr=1e-3,
                 warmup_steps=50, drop_path=0.0, aggregation_layer=0, mask_ratio=0.4, min_ink=0.1, min_block=9,
                 tokenizer_steps=400, tokenizer_batch_size=32, tokenizer_lr=2e-3, tokenizer_warmup_steps=30,
                 tokenizer_dim=192, tokenizer_depth=0, tokenizer_heads=3, decoder_depth=2, codebook_size=128,
                 num_workers=1, log_every=20, ckpt_every=250),
    # the papers' recipes scaled to ViT-S/B: tokenizer at batch 512 (v2), pretraining at 2048 (v1/v2)
    "small": dict(arch="vit_small", batch_size=1024, steps=100_000, lr=7.5e-4, warmup_steps=5_000,
                  tokenizer_batch_size=512, tokenizer_steps=50_000, num_workers=8, log_every=50, ckpt_every=2000),
    "base": dict(arch="vit_base", batch_size=2048, steps=100_000, lr=1.5e-3, warmup_steps=5_000,
                 tokenizer_batch_size=512, tokenizer_steps=50_000, num_workers=10, log_every=50, ckpt_every=2000),
}


# ---------------------------------------------------------------------------------------
# Tokenizer: EMA codebook of unit vectors, shared by vqvae and vqkd
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, n_iters: int, gen: torch.Generator) -> torch.Tensor:
    """(M, d) unit vectors -> (k, d) unit centres: k random points to start (repeats when M < k),
    then assign by cosine, average, re-normalise; an empty cluster keeps its centre."""
    M = x.shape[0]
    start = (torch.randperm(M, generator=gen, device=x.device)[:k] if M >= k
             else torch.randint(M, (k,), generator=gen, device=x.device))
    centres = x[start].clone()
    for _ in range(n_iters):
        idx = (x @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        counts = torch.zeros(k, device=x.device).index_add_(0, idx, torch.ones_like(idx, dtype=x.dtype))
        centres = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), centres)
    return centres


class EMACodebook(nn.Module):
    """K unit codes; nearest code by cosine. Updated by EMA, never by gradients (BEiT v2's
    normalised EMA): a code used by the global batch moves to normalise(decay * code +
    (1 - decay) * normalise(sum of its vectors)); counts and sums are all-reduced, so every rank
    holds the same codebook. `counts` is the EMA of per-step code counts (the code marginal)."""

    def __init__(self, n_codes: int, dim: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("codes", F.normalize(torch.randn(n_codes, dim), dim=-1))
        self.register_buffer("counts", torch.zeros(n_codes))
        self.register_buffer("unused_steps", torch.zeros(n_codes, dtype=torch.long))

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) unit vectors -> (...) index of the nearest code."""
        return (z @ self.codes.T).argmax(-1)

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, gen: torch.Generator):
        """v2's k-means init on the first global batch (every rank computes the same centres)."""
        self.codes.copy_(spherical_kmeans(common.all_gather_cat(z.float()), self.codes.shape[0], 10, gen))

    @torch.no_grad()
    def update(self, z: torch.Tensor, idx: torch.Tensor, dead_after: int) -> dict:
        """z (M, d) this rank's unit vectors, idx (M,) their codes. EMA step, then codes unused for
        dead_after steps take the vectors with the lowest cosine to their code (over all ranks).
        Returns the global code counts of this batch and the number of re-seeded codes."""
        z = z.float()
        K = self.codes.shape[0]
        counts = common.all_reduce_sum(torch.zeros(K, device=z.device).index_add_(0, idx, torch.ones_like(z[:, 0])))
        sums = common.all_reduce_sum(torch.zeros_like(self.codes).index_add_(0, idx, z))  # (K, d)
        used = counts > 0
        moved = F.normalize(self.decay * self.codes + (1 - self.decay) * F.normalize(sums, dim=-1), dim=-1)
        self.codes.copy_(torch.where(used[:, None], moved, self.codes))
        self.counts.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.unused_steps.copy_(torch.where(used, 0, self.unused_steps + 1))
        dead = self.unused_steps >= dead_after
        # worst-fitted vectors: this rank's n worst, gathered, then the global order (no host sync)
        fit = (z * self.codes[idx]).sum(-1)  # (M,) cosine to the (updated) assigned code
        n = min(K, z.shape[0])
        local_fit, local_pos = fit.topk(n, largest=False)
        cand_fit, cand = common.all_gather_cat(local_fit), common.all_gather_cat(z[local_pos])
        cand = cand[cand_fit.sort(stable=True).indices]  # (ranks * n, d), worst first
        rank_among_dead = (dead.long().cumsum(0) - 1).clamp(0, cand.shape[0] - 1)
        self.codes.copy_(torch.where(dead[:, None], cand[rank_among_dead], self.codes))
        self.unused_steps.masked_fill_(dead, 0)
        return {"counts": counts, "reseeded": dead.sum()}


def usage(counts: torch.Tensor) -> dict:
    """Code usage of a histogram: codes used, and perplexity exp(entropy) of the marginal."""
    p = counts / counts.sum().clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    return {"codes_used": (counts > 0).sum(), "perplexity": entropy.exp()}


def final_usage(counts: torch.Tensor) -> dict:
    """Usage of the EMA code histogram at the end of the tokenizer stage. Every code once used
    keeps a positive EMA count, so "used" is the fewest codes covering 90% of the patches."""
    p = (counts / counts.sum()).sort(descending=True).values
    covering = int((p.cumsum(0) < 0.9).sum()) + 1
    return {"codes_for_90pct": covering, "perplexity": float(usage(counts)["perplexity"])}


class Tokenizer(nn.Module):
    """ViT encoder (no registers, no LayerScale) -> Linear-Tanh-Linear -> unit code vector z ->
    nearest code (straight-through) -> decoder blocks over the patch grid -> Linear-Tanh-Linear
    to the target: 256 pixels per patch (vqvae) or the teacher's feature width (vqkd)."""

    def __init__(self, *, dim: int, depth: int, heads: int, decoder_depth: int, n_codes: int, code_dim: int,
                 decay: float, target_dim: int):
        super().__init__()
        self.config = dict(dim=dim, depth=depth, heads=heads, decoder_depth=decoder_depth, n_codes=n_codes,
                           code_dim=code_dim, decay=decay, target_dim=target_dim)
        self.encoder = common.ViT(embed_dim=dim, depth=depth, num_heads=heads, n_registers=0, layerscale_init=None)
        self.to_code = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, code_dim))
        self.codebook = EMACodebook(n_codes, code_dim, decay)
        self.from_code = nn.Linear(code_dim, dim)
        self.rope = common.RoPE(dim // heads)
        self.decoder = nn.ModuleList(common.Block(dim, heads, layerscale_init=None) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.to_target = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, target_dim))

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 1, H, W) gray -> unit vectors (B, N, code_dim), grid."""
        out = self.encoder(common.to_model_input(img))
        return F.normalize(self.to_code(out["patches"]).float(), dim=-1), out["grid"]

    @torch.no_grad()
    def tokens(self, img: torch.Tensor) -> torch.Tensor:
        """The MIM targets: (B, 1, H, W) -> (B, N) codes."""
        return self.codebook.assign(self.encode(img)[0])

    def forward(self, img: torch.Tensor) -> dict:
        z, grid = self.encode(img)  # (B, N, c)
        idx = self.codebook.assign(z.detach())  # (B, N)
        quantized = self.codebook.codes[idx]  # (B, N, c)
        commit = F.mse_loss(z, quantized)  # the codebook moves by EMA; this pulls z towards its code
        x = self.from_code(z + (quantized - z).detach())  # straight-through: gradients skip the argmax
        rope = self.rope(common.grid_coords(*grid, device=x.device))
        for blk in self.decoder:
            x = blk(x, rope, 0)
        return {"pred": self.to_target(self.decoder_norm(x)), "z": z, "idx": idx, "commit": commit}


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, dict]:
    """A tokenizer.safetensors -> (frozen Tokenizer in eval mode, its metadata)."""
    sd, meta = common.read_safetensors(path)
    tokenizer = Tokenizer(**json.loads(meta["config"]))
    common.load_state_strict(tokenizer, sd, str(path))
    return tokenizer.eval().requires_grad_(False), meta


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """vqvae: pixel MSE; vqkd: 1 - cosine to the teacher feature (v2); mean over patches."""
    if kind == "vqvae":
        return F.mse_loss(pred, target)
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


@torch.no_grad()
def teacher_targets(teacher: common.ViT, img: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's normed patch tokens on the tokenizer's grid (bilinear when its grid differs)."""
    with common.autocast(img.device):
        out = teacher(common.to_model_input(img))
    feats = out["patches"].float()  # (B, n_t, Dt)
    if tuple(out["grid"]) != tuple(grid):
        B, _, D = feats.shape
        feats = feats.transpose(1, 2).reshape(B, D, *out["grid"])
        feats = F.interpolate(feats, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    return feats  # (B, N, Dt)


# ---------------------------------------------------------------------------------------
# Masked image modeling: blockwise masks, LM head on masked positions
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


class BEiT(nn.Module):
    """Fused encoder (every patch goes in, masked ones as the mask token), LM head on the masked
    positions; optionally v2's aggregation branch sharing the head."""

    def __init__(self, encoder: common.ViT, n_codes: int, aggregation_layer: int, aggregation_depth: int):
        super().__init__()
        self.encoder, self.aggregation_layer = encoder, aggregation_layer
        D, heads = encoder.embed_dim, encoder.arch["num_heads"]
        self.lm_head = nn.Linear(D, n_codes)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        if aggregation_layer:
            self.aggregation = nn.ModuleList(common.Block(D, heads, layerscale_init=0.1)
                                             for _ in range(aggregation_depth))
            self.aggregation_norm = nn.LayerNorm(D, eps=1e-5)

    def forward(self, img: torch.Tensor, mask: torch.Tensor, masked_index: torch.Tensor):
        """img (B, 1, H, W), mask (B, N) bool, masked_index (M,) flat indices of the masked patches
        -> logits (M, K) and, with aggregation, the branch's logits (M, K)."""
        layers = [self.aggregation_layer - 1] if self.aggregation_layer else None
        out = self.encoder(common.to_model_input(img), mask=mask, layers=layers)
        logits = self.lm_head(out["patches"].flatten(0, 1)[masked_index])  # (M, K)
        if not self.aggregation_layer:
            return logits, None
        x = torch.cat([out["cls"][:, None], out["layers"][layers[0]][:, self.encoder.n_prefix:]], dim=1)  # (B, 1+N, D)
        rope = self.encoder.rope_embed(common.grid_coords(*out["grid"], device=x.device))
        for blk in self.aggregation:
            x = blk(x, rope, 1)
        return logits, self.lm_head(self.aggregation_norm(x)[:, 1:].flatten(0, 1)[masked_index])


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------

def make_view(cfg: BEiTConfig):
    def view(sheet, rng):
        crop = common.random_crop(sheet, rng, cfg.img_size, scale=(cfg.scale_min, cfg.scale_max), min_ink=cfg.min_ink)
        return {"image": crop["image"]}  # (1, S, S) in [0, 1], 1 = paper
    return view


def patch_has_ink(img: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, N) bool: the 16 px patch holds a dark pixel."""
    return (common.patchify(img, 16) < 0.5).any(-1)


# ---------------------------------------------------------------------------------------
# Stage 1: the tokenizer
# ---------------------------------------------------------------------------------------

def train_tokenizer(cfg: BEiTConfig, path: Path) -> bool:
    """Train the tokenizer in out_dir/tokenizer (its own run: checkpoints, metrics, resume) and
    write it to `path`. Returns False when a signal stopped it before the end."""
    tok_dir = Path(cfg.out_dir) / "tokenizer"
    tok_cfg = dataclasses.replace(cfg, out_dir=str(tok_dir), steps=cfg.tokenizer_steps,
                                  batch_size=cfg.tokenizer_batch_size or cfg.batch_size,
                                  resume=cfg.resume and common.latest_checkpoint(tok_dir) is not None)
    run = common.Run(tok_cfg, "beit")
    if run.dist.is_main:  # so that --resume finds the run's config even if it stops in this stage
        common.save_config(cfg, cfg.out_dir)
    dev = run.device
    teacher = None
    if cfg.tokenizer == "vqkd":
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # random: reseeds torch
            teacher = common.load_backbone(cfg.teacher).to(dev).eval().requires_grad_(False)
    target_dim = teacher.embed_dim if teacher is not None else 16 * 16
    tokenizer = Tokenizer(dim=cfg.tokenizer_dim, depth=cfg.tokenizer_depth, heads=cfg.tokenizer_heads,
                          decoder_depth=cfg.decoder_depth, n_codes=cfg.codebook_size, code_dim=cfg.code_dim,
                          decay=cfg.codebook_decay, target_dim=target_dim).to(dev)
    opt = common.adamw(common.param_groups(tokenizer), lr=0.0, betas=(0.9, 0.99), device=dev)
    start = run.resume({"tokenizer": tokenizer}, {"opt": opt})
    fwd = common.wrap_ddp(tokenizer, run.dist, broadcast_buffers=False)  # the codebook is kept equal by all-reduce
    fwd = torch.compile(fwd) if cfg.compile else fwd

    sheets = common.open_sheets(cfg.data, seed=cfg.seed, split="train", dpi=cfg.dpi)
    dataset = common.TileDataset(sheets, make_view(cfg), seed=cfg.seed + 1, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(dataset, run.local_batch, start=start * tok_cfg.batch_size, rank=run.dist.rank,
                                world_size=run.dist.world_size, num_workers=cfg.num_workers, seed=cfg.seed + 1)
    batches = iter(loader)

    for step in range(start, tok_cfg.steps):
        img = next(batches)["image"].to(dev, non_blocking=True)  # (B, 1, H, W), 1 = paper
        lr = common.cosine_schedule(step, tok_cfg.steps, cfg.tokenizer_lr, warmup=cfg.tokenizer_warmup_steps)
        common.set_lr_wd(opt, lr, cfg.tokenizer_weight_decay)
        if step == 0:
            with torch.no_grad(), common.autocast(dev):
                first_z = tokenizer.encode(img)[0]
            tokenizer.codebook.kmeans_init(first_z.flatten(0, 1), common.step_generator(cfg.seed + 1, 0, 0, dev))
        target = common.patchify(img, 16) if teacher is None else None  # (B, N, 256) pixels
        with common.autocast(dev):
            out = fwd(img)
        if teacher is not None:
            target = teacher_targets(teacher, img, (img.shape[-2] // 16, img.shape[-1] // 16))  # (B, N, Dt)
        recon = reconstruction_loss(out["pred"].float(), target, cfg.tokenizer)
        loss = recon + cfg.commitment * out["commit"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        z, idx = out["z"].detach().flatten(0, 1), out["idx"].flatten()  # (B*N, c), (B*N,)
        update = tokenizer.codebook.update(z, idx, cfg.dead_code_steps)
        with torch.no_grad():
            mean_target = common.all_reduce_mean(target.mean(dim=(0, 1)))  # the global batch's mean patch / feature
            trivial = reconstruction_loss(mean_target.expand_as(target), target, cfg.tokenizer)
            blank = (~patch_has_ink(img)).flatten().float()
            blank_counts = torch.zeros(cfg.codebook_size, device=dev).index_add_(0, idx, blank)
            blank_top_share = blank_counts.max() / blank_counts.sum().clamp(min=1)
        run.step(step, {"tokenizer": tokenizer}, {"opt": opt}, loss=loss, recon=recon, trivial=trivial,
                 commit=out["commit"], **usage(update["counts"]), reseeded=update["reseeded"],
                 blank_codes=(blank_counts > 0).sum(), blank_top_share=blank_top_share, lr=lr)
        if run.stopped:
            return False

    final = final_usage(tokenizer.codebook.counts)
    common.print0(f"[beit] tokenizer code usage (EMA histogram): {final['codes_for_90pct']} of {cfg.codebook_size} "
                  f"codes cover 90% of the patches, perplexity {final['perplexity']:.1f}")
    if run.dist.is_main:
        meta = {"config": json.dumps(tokenizer.config), "kind": cfg.tokenizer, "teacher": cfg.teacher,
                "img_size": str(cfg.img_size), "usage": json.dumps(final)}
        common.save_safetensors({k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}, path,
                                metadata=meta)
    common.barrier()
    return True


# ---------------------------------------------------------------------------------------
# Stage 2: masked image modeling
# ---------------------------------------------------------------------------------------

def marginal_cross_entropy(counts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting every target with the add-one-smoothed code marginal `counts`."""
    p = (counts + 1) / (counts.sum() + counts.numel())
    return -p.log()[targets].mean()


def pretrain(cfg: BEiTConfig, tokenizer_path: Path):
    # resuming a run stopped between the stages starts pretraining afresh
    run = common.Run(dataclasses.replace(cfg, resume=cfg.resume and common.latest_checkpoint(cfg.out_dir) is not None),
                     "beit")
    dev = run.device
    local_copy = Path(cfg.out_dir) / "tokenizer.safetensors"
    if run.dist.is_main and tokenizer_path.resolve() != local_copy.resolve():
        shutil.copyfile(tokenizer_path, local_copy)  # the run dir holds the tokenizer its targets came from
    tokenizer, _ = load_tokenizer(tokenizer_path)
    tokenizer.to(dev)
    K = tokenizer.codebook.codes.shape[0]

    arch_kw = dict(drop_path_rate=cfg.drop_path, rope_rescale=cfg.rope_rescale or None)
    encoder = (common.load_backbone(cfg.init, **arch_kw) if cfg.init
               else common.vit(cfg.arch, layerscale_init=cfg.layerscale_init or None, **arch_kw))
    model = BEiT(encoder, K, cfg.aggregation_layer, cfg.aggregation_depth).to(dev)
    models = {"model": model}
    opt = common.adamw(common.param_groups(model), lr=0.0, betas=(0.9, 0.999), device=dev)
    start = run.resume(models, {"opt": opt})
    code_counts = run.extra.get("code_counts", torch.zeros(K)).to(dev)  # targets seen so far, per code
    fwd = common.wrap_ddp(model, run.dist)
    fwd = torch.compile(fwd) if cfg.compile else fwd

    sheets = common.open_sheets(cfg.data, seed=cfg.seed, split="train", dpi=cfg.dpi)
    dataset = common.TileDataset(sheets, make_view(cfg), seed=cfg.seed, tiles_per_sheet=cfg.tiles_per_sheet)
    loader = common.make_loader(dataset, run.local_batch, start=start * cfg.batch_size, rank=run.dist.rank,
                                world_size=run.dist.world_size, num_workers=cfg.num_workers, seed=cfg.seed)
    batches = iter(loader)
    h = w = cfg.img_size // 16
    n_masked = int(h * w * cfg.mask_ratio)

    for step in range(start, cfg.steps):
        img = next(batches)["image"].to(dev, non_blocking=True)  # (B, 1, H, W), 1 = paper
        B = img.shape[0]
        lr = common.cosine_schedule(step, cfg.steps, cfg.lr, warmup=cfg.warmup_steps)
        common.set_lr_wd(opt, lr, cfg.weight_decay)
        rng = random.Random(int(torch.randint(2 ** 62, (1,), generator=common.step_generator(
            cfg.seed, step, run.dist.rank))))
        mask = torch.stack([block_mask(h, w, n_masked, rng, min_block=cfg.min_block) for _ in range(B)])  # (B, N)
        masked_index = mask.flatten().nonzero().squeeze(1).to(dev, non_blocking=True)  # (M,), built on the host
        mask = mask.to(dev, non_blocking=True)
        with common.autocast(dev):
            targets = tokenizer.tokens(img).flatten()[masked_index]  # (M,) frozen tokenizer, no_grad
            logits, aggregated_logits = fwd(img, mask, masked_index)
        mim = F.cross_entropy(logits.float(), targets)
        loss = mim
        metrics = {}
        if aggregated_logits is not None:
            metrics["aggregated"] = F.cross_entropy(aggregated_logits.float(), targets)
            loss = mim + metrics["aggregated"]  # v2: loss_1 + loss_2, one shared LM head
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = common.clip_gradients(model.parameters(), cfg.clip_grad)
        opt.step()
        with torch.no_grad():
            hist = torch.zeros(K, device=dev).index_add_(0, targets, torch.ones(targets.shape, device=dev))
            # trivial: the image-blind prediction, the code marginal of all earlier steps' targets (all
            # ranks; add-one smoothed), scored on this batch; batch_entropy: this batch's own histogram,
            # a hindsight bound below any image-blind prediction
            trivial = marginal_cross_entropy(code_counts, targets)
            code_counts += common.all_reduce_sum(hist.clone())
            marginal = hist / hist.sum()
            correct = (logits.argmax(-1) == targets).float()
            ink = patch_has_ink(img).flatten()[masked_index].float()  # (M,)
            metrics.update(trivial=trivial, batch_entropy=-(marginal * marginal.clamp(min=1e-12).log()).sum(),
                           accuracy=correct.mean(), majority=marginal.max(),
                           ink_accuracy=(correct * ink).sum() / ink.sum().clamp(min=1), blank_share=1 - ink.mean())
        run.step(step, models, {"opt": opt}, extra={"code_counts": code_counts}, loss=loss, mim=mim, **metrics,
                 grad_norm=grad_norm, lr=lr)
        if run.stopped:
            break
    run.finish(encoder)


def main(argv=None):
    cfg = common.parse_config(BEiTConfig, PRESETS, "beit", argv, __doc__)
    if cfg.stage not in ("all", "tokenizer", "pretrain") or cfg.tokenizer not in ("vqvae", "vqkd"):
        raise SystemExit("--stage must be all|tokenizer|pretrain and --tokenizer vqvae|vqkd")
    if cfg.img_size % 16:
        raise SystemExit(f"--img_size must be a multiple of the patch size 16, got {cfg.img_size}")
    n = (cfg.img_size // 16) ** 2
    if not 0 < int(n * cfg.mask_ratio) < n:
        raise SystemExit(f"--mask_ratio {cfg.mask_ratio} leaves no masked or no visible patch of {n}")
    if cfg.tokenizer == "vqkd" and cfg.stage != "pretrain" and not cfg.teacher:
        raise SystemExit("--tokenizer vqkd needs --teacher PATH (any backbone common.load_backbone reads)")
    tokenizer_path = Path(cfg.out_dir) / "tokenizer.safetensors"
    if cfg.stage == "pretrain":
        tokenizer_path = Path(cfg.tokenizer_ckpt) if cfg.tokenizer_ckpt else tokenizer_path
        if not tokenizer_path.is_file():
            raise SystemExit(f"--stage pretrain: no tokenizer at {tokenizer_path} (pass --tokenizer_ckpt PATH)")
    elif not (cfg.resume and tokenizer_path.is_file()):  # a resumed run never retrains a finished tokenizer
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if not train_tokenizer(cfg, tokenizer_path) or cfg.stage == "tokenizer":
            common.cleanup_distributed()
            return
    if cfg.stage == "tokenizer":
        common.print0(f"[beit] {tokenizer_path} is already trained")
        return
    pretrain(cfg, tokenizer_path)


if __name__ == "__main__":
    main()
