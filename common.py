"""sheetssl common infrastructure: the shared ViT, sheet data, DDP, config, schedules,
checkpoints and logging. No recipe logic lives here: every recipe file imports this module
and nothing else from the project.

Sections, in order:
  1. Backbone: DINOv3-compatible ViT (registers, 2D axial RoPE, k-masked qkv bias, LayerScale)
  2. Loading backbones: this project's safetensors, official DINOv3 .pth, random init
  3. Distributed + devices: torchrun env, print0, reductions, autocast
  4. Config: flat dataclass -> command line, presets, saved resolved config
  5. Optimisation: schedules, parameter groups, EMA, clipping
  6. Checkpoints: atomic save, exact resume, backbone export, SIGTERM handling
  7. Logging: console line + tqdm + metrics.jsonl
  8. Sheet data: synthetic construction sheets, real corpus loader, views
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sys
import time
import tokenize
import warnings
import zlib
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

# ImageNet statistics: DINOv3 (and most released ViTs) were trained with them, so sheets are
# normalised the same way to keep official weights usable as a starting point.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------
# 1. Backbone
# ----------------------------------------------------------------------------------------

ARCHS = {  # name -> (embed_dim, depth, num_heads)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def grid_coords(h: int, w: int, device=None) -> torch.Tensor:
    """Patch-centre coordinates of an h x w grid, each axis normalised to (-1, 1)
    separately (DINOv3 "separate" normalisation), row-major (h outer). -> (h*w, 2) as (y, x)."""
    ys = (torch.arange(0.5, h, device=device, dtype=torch.float32) / h) * 2 - 1
    xs = (torch.arange(0.5, w, device=device, dtype=torch.float32) / w) * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)


class RoPE(nn.Module):
    """2D axial rotary position embedding exactly as DINOv3 computes it.

    periods[i] = base ** (2i / (head_dim/2)), i < head_dim/4. For coordinates c (in (-1, 1)):
    angles = 2 pi c / periods, laid out (y-freqs, x-freqs) and tiled twice to head_dim, then
    applied NeoX-style (dimension d pairs with d + head_dim/2). In training mode the
    coordinates of one call are optionally multiplied by one scalar s = exp(U(-ln r, ln r))
    (DINOv3's `rescale_coords`), a cheap scale augmentation; eval mode never jitters.
    """

    def __init__(self, head_dim: int, base: float = 100.0, rescale: float | None = None):
        super().__init__()
        assert head_dim % 4 == 0, "RoPE needs head_dim divisible by 4"
        self.head_dim, self.rescale = head_dim, rescale
        n = head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2)))

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (..., N, 2) -> (sin, cos), each (..., N, head_dim), float32."""
        coords = coords.float()
        if self.training and self.rescale:
            log_r = math.log(self.rescale)
            s = torch.empty((), device=coords.device).uniform_(-log_r, log_r).exp()
            coords = coords * s
        angles = 2 * math.pi * coords[..., None] / self.periods  # (..., N, 2, hd/4)
        angles = angles.flatten(-2)  # (..., N, hd/2) laid out (y-freqs, x-freqs)
        angles = torch.cat([angles, angles], dim=-1)  # (..., N, hd)
        return angles.sin(), angles.cos()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Rotate the patch tokens of x (B, heads, N, hd); the first n_prefix tokens (cls,
    registers) carry no position and are left untouched. sin/cos: (Np, hd) or (B, Np, hd)."""
    if sin.dim() == 3:  # per-sample positions (masked encoders, predictors)
        sin, cos = sin[:, None], cos[:, None]
    prefix, patches = x[:, :, :n_prefix], x[:, :, n_prefix:]
    rotated = (patches.float() * cos + rotate_half(patches.float()) * sin).to(x.dtype)
    return torch.cat([prefix, rotated], dim=2)


class LinearKMaskedBias(nn.Linear):
    """qkv projection whose k third has no bias (DINOv3): bias * bias_mask, mask 1/0/1."""

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim, bias=True)
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = LinearKMaskedBias(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, n_prefix: int = 0):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope, n_prefix), apply_rope(k, *rope, n_prefix)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block (DINOv3 layout: norm1, attn, ls1, norm2, mlp, ls2).
    Reused by recipe decoders and predictors with their own widths."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 layerscale_init: float | None = 1e-5, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, rope=None, n_prefix: int = 0):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), rope, n_prefix)), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, h*w, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """DINOv3-compatible ViT. State-dict keys and shapes match the official release, so
    `load_backbone` reads official checkpoints 1:1. Token order: [cls, registers, patches].

    forward(x, keep=None, mask=None, layers=None) where x is (B, 3, H, W), H and W multiples
    of the patch size (non-square fine):
      keep  (B, n_keep) long: run the encoder on these patches only (row-major indices);
            each token keeps its true grid coordinates for RoPE (masked encoders, MAE).
      mask  (B, h*w) bool: replace those patch embeddings by the learned mask token
            (fused-encoder MIM, iBOT). Applied before `keep`.
      layers: block indices whose outputs to return (normed by the final norm, as the
            official get_intermediate_layers does).
    Returns a dict: cls (B, D), registers (B, R, D), patches (B, n, D), normed (B, 1+R+n, D)
    (all after the final norm), tokens (B, 1+R+n, D) before the final norm,
    layers {i: (B, 1+R+n, D)}, grid (h, w).
    """

    def __init__(self, *, embed_dim=384, depth=12, num_heads=6, patch_size=16, in_chans=3,
                 n_registers=4, mlp_ratio=4.0, layerscale_init: float | None = 1e-5,
                 rope_base=100.0, rope_rescale: float | None = None, drop_path_rate=0.0):
        super().__init__()
        self.arch = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                         in_chans=in_chans, n_registers=n_registers, mlp_ratio=mlp_ratio,
                         layerscale_init=layerscale_init, rope_base=rope_base)
        self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
        self.n_registers, self.n_prefix = n_registers, 1 + n_registers
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_registers, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.rope_embed = RoPE(embed_dim // num_heads, rope_base, rope_rescale)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, layerscale_init, drop_path_rate * i / max(depth - 1, 1))
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.init_weights()

    def init_weights(self):
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_registers:
            nn.init.normal_(self.storage_tokens, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # as a linear layer on flattened patches (MAE, DINOv3)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x, keep=None, mask=None, layers: Iterable[int] | None = None):
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        coords = grid_coords(h, w, x.device)  # (h*w, 2)
        if keep is not None and mask is None:  # embed the visible patches only
            pixels = patchify(x, p)  # (B, h*w, p*p*C) as (py, px, c)
            pixels = pixels.gather(1, keep[..., None].expand(-1, -1, pixels.shape[-1]))  # (B, n_keep, p*p*C)
            weight = self.patch_embed.proj.weight.permute(0, 2, 3, 1).flatten(1)  # (D, p*p*C) same order
            tokens = F.linear(pixels, weight, self.patch_embed.proj.bias)  # (B, n_keep, D)
            coords = coords[keep]  # (B, n_keep, 2)
        else:
            tokens = self.patch_embed(x)  # (B, h*w, D)
            if mask is not None:
                tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
            if keep is not None:
                tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, n_keep, D)
                coords = coords[keep]  # (B, n_keep, 2)
        rope = self.rope_embed(coords)
        # `+ 0 * mask_token` (as DINOv3 does) keeps the mask token in the graph when unused, so
        # DDP sees every parameter receive a gradient
        prefix = torch.cat([self.cls_token + 0 * self.mask_token, self.storage_tokens], dim=1).expand(B, -1, -1)
        x = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (B, 1+R+n, D)
        wanted = set(layers or ())
        outs = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, rope, self.n_prefix)
            if i in wanted:
                outs[i] = self.norm(x)
        normed = self.norm(x)
        return dict(cls=normed[:, 0], registers=normed[:, 1:self.n_prefix], patches=normed[:, self.n_prefix:],
                    normed=normed, tokens=x, layers=outs, grid=(h, w))


def vit(name: str, **kw) -> ViT:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHS)}")
    d, depth, heads = ARCHS[name]
    return ViT(embed_dim=d, depth=depth, num_heads=heads, **kw)


def to_model_input(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) grayscale in [0, 1] (1 = paper) -> (B, 3, H, W) ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=gray.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=gray.device).view(1, 3, 1, 1)
    return (gray.float().expand(-1, 3, -1, -1) - mean) / std


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), row-major patches, pixels (py, px, c) inside."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, C: int) -> torch.Tensor:
    B = x.shape[0]
    return x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)


# ----------------------------------------------------------------------------------------
# 2. Loading backbones
# ----------------------------------------------------------------------------------------

def _arch_from_official(sd: dict) -> dict:
    """Infer the ViT arguments of an official DINOv3 state dict from its tensor shapes."""
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 20, 1536: 24, 4096: 32}.get(dim)
    if heads is None:
        heads = dim // 64
    if "rope_embed.periods" in sd:
        heads = dim // (4 * sd["rope_embed.periods"].shape[0])
    return dict(embed_dim=dim, depth=depth, num_heads=heads,
                patch_size=sd["patch_embed.proj.weight"].shape[-1], in_chans=sd["patch_embed.proj.weight"].shape[1],
                n_registers=sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None)


def load_state_strict(model: nn.Module, sd: dict, source: str):
    """load_state_dict(strict) with an error that names the file and the first bad key."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise ValueError(f"{source}: missing key {k!r} (expected shape {tuple(v.shape)})")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)}, model expects {tuple(v.shape)}")
    extra = [k for k in sd if k not in own]
    if extra:
        raise ValueError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected in all)")
    model.load_state_dict(sd, strict=True)


def read_safetensors(path: str | Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def load_backbone(path: str, *, prefix: str | None = None, seed: int = 0, **arch_overrides) -> ViT:
    """Build a ViT and load weights from:
      - `random:<arch>` or `random:<arch>:<seed>`: random init (the probe's baseline);
      - a `.safetensors` written by this project (architecture in its metadata; when it holds
        several models, `prefix` picks one, default the exported backbone or `student.`);
      - an official DINOv3 `.pth` state dict (loaded 1:1, architecture inferred from shapes).
    Raises ValueError naming the file and the first mismatching key; never loads partially."""
    if path.startswith("random:"):
        parts = path.split(":")
        torch.manual_seed(int(parts[2]) if len(parts) > 2 else seed)
        return vit(parts[1], **arch_overrides)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if p.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    if p.suffix == ".safetensors":
        sd, meta = read_safetensors(p)
        arch = json.loads(meta["arch"]) if "arch" in meta else None
        pre = prefix if prefix is not None else meta.get("backbone_prefix", "")
        if pre:
            sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            if not sd:
                raise ValueError(f"{path}: no tensors under prefix {pre!r}")
        if arch is None:
            arch = _arch_from_official(sd)
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
        for key in ("model", "teacher", "state_dict"):  # common wrappers around a state dict
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and "cls_token" not in sd:
                sd = sd[key]
        if not isinstance(sd, dict) or "cls_token" not in sd:
            raise ValueError(f"{path}: no ViT state dict found (no 'cls_token' key)")
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
        arch = _arch_from_official(sd)
    arch.update(arch_overrides)
    model = ViT(**arch)
    load_state_strict(model, {k: v.float() for k, v in sd.items()}, str(path))
    return model


def save_backbone(model: ViT, path: str | Path, **meta: Any):
    """Write a ViT as safetensors with its architecture in the metadata (atomic)."""
    from safetensors.torch import save_file
    path = Path(path)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"arch": json.dumps(model.arch), **{k: str(v) for k, v in meta.items()}})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# 3. Distributed + devices
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU.
    Plain `python recipe.py` is one process. Multi-node: `torchrun --nnodes N --node_rank i
    --master_addr HOST --master_port PORT --nproc_per_node G recipe.py ...` (the run dir must
    be on a filesystem every node sees, for checkpoints)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # share the cores between local ranks
        threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, device)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def print0(*args, **kw):
    if get_rank() == 0:
        print(*args, **kw, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, returned for chaining (identity on one process)."""
    if is_dist():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of equal shape from every rank along dim 0 (no gradient)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def barrier():
    if is_dist():
        dist.barrier()


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp16 is a known NaN source for MAE/DINO); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def seed_everything(seed: int):
    import random
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def step_generator(seed: int, step: int, rank: int = 0, device="cpu") -> torch.Generator:
    """A generator determined by (seed, step, rank): masks drawn from it are reproduced
    exactly on resume, whatever happened before the step."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    return g


def wrap_ddp(model: nn.Module, dist_info: DistInfo, **kw) -> nn.Module:
    if not is_dist():
        return model
    ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kw)


# ----------------------------------------------------------------------------------------
# 4. Config: a flat dataclass at the top of each recipe becomes its command line
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """Fields every recipe has (the one command-line contract). Recipes subclass this with
    their own flat, commented fields; the comment after each field is its --help text."""
    preset: str = "tiny"  # tiny (2-core CPU, minutes) | small (ViT-S, GPUs) | base (ViT-B, GPUs)
    data: str = "synthetic"  # "synthetic" (embedded generator) or a folder of sheets (PNG/JPEG/TIFF/BMP/WebP/PDF)
    out_dir: str = ""  # run directory (default runs/<recipe>)
    steps: int = 1000  # optimisation steps
    init: str = ""  # start the backbone from this checkpoint (this project's, official DINOv3 .pth): continual pretraining
    resume: bool = False  # continue the run in out_dir exactly where its last checkpoint left it
    seed: int = 0  # global seed (ranks derive their own)
    arch: str = "vit_tiny"  # backbone: vit_tiny | vit_small | vit_base | vit_large
    batch_size: int = 64  # global batch size, split evenly over ranks
    num_workers: int = 2  # data-loading worker processes per rank
    dpi: int = 150  # rasterisation dpi for PDF sheets in --data
    log_every: int = 10  # steps between console/metrics.jsonl lines
    ckpt_every: int = 200  # steps between checkpoints (also written on SIGTERM/SIGINT)
    compile: bool = False  # torch.compile the model (GPU runs)


def _field_help(cls) -> dict[str, str]:
    """Read the trailing `# comment` of each dataclass field from the source of cls and its bases."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                m = re.match(r"\s*(\w+)\s*:", tok.line)
                if m:
                    helps[m.group(1)] = tok.string.lstrip("# ").strip()
    return helps


def _parse_bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {v!r}")


def parse_config(cls, presets: dict[str, dict], recipe: str, argv: Sequence[str] | None = None,
                 doc: str | None = None):
    """Defaults of `cls` < preset (--preset) < saved config (--resume) < explicit flags.
    Unknown flags and wrong types are errors. Returns the resolved dataclass."""
    import argparse
    helps = _field_help(cls)
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = type(default)
        h = f"{helps.get(f.name, '')} (default {default!r})".replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, help=h)
        elif kind in (list, tuple):
            parser.add_argument(f"--{f.name}", type=str, help=h + " (comma-separated)")
        else:
            parser.add_argument(f"--{f.name}", type=kind, help=h)
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", cls.preset if hasattr(cls, "preset") else "tiny")
    if preset not in presets:
        parser.error(f"unknown --preset {preset!r}; choose from {sorted(presets)}")
    values = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    values.update(presets[preset])
    out_dir = given.get("out_dir") or values.get("out_dir") or f"runs/{recipe}"
    if given.get("resume"):
        saved = Path(out_dir) / "config.json"
        if not saved.is_file():
            parser.error(f"--resume: no {saved} (start the run without --resume first)")
        values.update(json.loads(saved.read_text()))
    for k, v in given.items():
        if isinstance(values.get(k), (list, tuple)) and isinstance(v, str):
            elem = type(values[k][0]) if values[k] else str
            v = type(values[k])(elem(x) for x in v.split(",") if x)
        values[k] = v
    values["out_dir"] = out_dir
    return cls(**values)


def save_config(cfg, out_dir: str | Path):
    d = dataclasses.asdict(cfg)
    d.pop("resume", None)
    path = Path(out_dir) / "config.json"
    tmp = path.with_name("config.json.tmp")
    tmp.write_text(json.dumps(d, indent=2))
    os.replace(tmp, path)


def run_info() -> dict:
    """What produced a run: versions, hardware, commit (logged so every number reproduces)."""
    import subprocess
    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), host=socket.gethostname(), python=platform.python_version(),
                torch=torch.__version__, cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                gpu=gpu, world_size=get_world_size(), commit=commit, argv=" ".join(sys.argv))


# ----------------------------------------------------------------------------------------
# 5. Optimisation: schedules, parameter groups, EMA, clipping
# ----------------------------------------------------------------------------------------

def cosine_schedule(step: int, total: int, base: float, final: float = 0.0, warmup: int = 0,
                    warmup_start: float = 0.0, truncate: float = 1.0) -> float:
    """Linear warmup warmup_start -> base over `warmup` steps, then half-cycle cosine base ->
    final. truncate < 1 stretches the cosine so training stops at that fraction of it (CAPI
    stops at 80%)."""
    if step < warmup:
        return warmup_start + (base - warmup_start) * step / warmup
    span = max(1, total - warmup) / truncate
    t = min(1.0, (step - warmup) / span)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def warmup_constant(step: int, base: float, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warmup then constant (DINOv3's schedule after warmup)."""
    if step < warmup:
        return warmup_start + (base - warmup_start) * step / warmup
    return base


def linear_ramp(step: int, start: int, length: int, v0: float, v1: float) -> float:
    """v0 before `start`, linearly to v1 over `length` steps, then v1."""
    if step <= start:
        return v0
    if length <= 0 or step >= start + length:
        return v1
    return v0 + (v1 - v0) * (step - start) / length


_NO_DECAY = re.compile(r"(^|\.)(cls_token|storage_tokens|mask_token|pos_embed|gamma)$|bias$|norm")
_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")


def param_groups(model: nn.Module, *, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                 depth: int | None = None) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, LayerScale gammas and tokens (wd_mult 0);
    optional layer-wise lr decay (block i gets layer_decay ** (depth - i), embeddings the most
    decayed, anything outside the blocks such as heads gets 1) and a patch-embed lr multiplier.
    Set the actual lr/wd every step with `set_lr_wd`."""
    if depth is None:
        depth = 1 + max([int(m.group(2)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))], default=-1)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd_mult = 0.0 if (p.ndim <= 1 or _NO_DECAY.search(name)) else 1.0
        m = _BLOCK.search(name)
        if m:
            layer = int(m.group(2)) + 1
        elif re.search(r"(^|\.)(patch_embed|cls_token|storage_tokens|mask_token|pos_embed)", name):
            layer = 0
        else:
            layer = depth + 1
        lr_mult = layer_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        key = (lr_mult, wd_mult)
        groups.setdefault(key, dict(params=[], lr_mult=lr_mult, wd_mult=wd_mult))["params"].append(p)
    return list(groups.values())


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = wd * g.get("wd_mult", 1.0)


def adamw(groups, *, lr: float, betas=(0.9, 0.999), device: torch.device = torch.device("cpu")):
    """AdamW, fused on CUDA. lr/wd are placeholders until `set_lr_wd`."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=0.0, **fused)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to max_norm (0: no clipping); returns the total norm as a tensor (no sync)."""
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) if params else torch.zeros(())


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------
# 6. Checkpoints
# ----------------------------------------------------------------------------------------
# Layout of a run dir:
#   config.json  run_info.json  metrics.jsonl  backbone.safetensors
#   checkpoint/step_0000400/{weights.safetensors, state.pt, rng_rank{r}.pt}
#   checkpoint/latest            (text: the directory name of the newest complete checkpoint)
# A checkpoint directory is written under a temporary name and renamed when complete, then
# `latest` is replaced atomically: a crash at any moment leaves the previous one usable.

class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checks it, writes a checkpoint and exits cleanly.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        if threading_main():
            signal.signal(signal.SIGTERM, self._handler)
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, device) -> bool:
        """True on every rank if any rank was signalled (collective: call on all ranks)."""
        flag = torch.tensor([float(self.requested)], device=device)
        return bool(all_reduce_sum(flag).item() > 0)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def save_checkpoint(out_dir: str | Path, step: int, models: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], extra: dict | None = None,
                    cfg=None, keep: int = 1):
    """Collective. Rank 0 writes weights (safetensors, config in metadata) and optimizer
    state; every rank writes its RNG state (ranks draw different random numbers)."""
    from safetensors.torch import save_file
    root = Path(out_dir) / "checkpoint"
    name = f"step_{step:07d}"
    tmp = root / f".{name}.tmp"
    rank = get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        tensors = {f"{m}.{k}": v.detach().contiguous().cpu()
                   for m, mod in models.items() for k, v in unwrap(mod).state_dict().items()}
        meta = {"step": str(step), "models": json.dumps(sorted(models))}
        if cfg is not None:
            meta["config"] = json.dumps(dataclasses.asdict(cfg))
        for m, mod in models.items():
            if isinstance(unwrap(mod), ViT):
                meta[f"arch.{m}"] = json.dumps(unwrap(mod).arch)
        save_file(tensors, str(tmp / "weights.safetensors"), metadata=meta)
        torch.save({"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    "extra": extra or {}, "world_size": get_world_size()}, tmp / "state.pt")
    barrier()
    if rank == 0:
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / "latest")
        old = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step_") and d.name != name)
        for d in old[:max(0, len(old) - (keep - 1))]:
            shutil.rmtree(d, ignore_errors=True)
    barrier()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / "checkpoint"
    if not (root / "latest").is_file():
        return None
    d = root / (root / "latest").read_text().strip()
    return d if (d / "state.pt").is_file() else None


def load_checkpoint(ckpt: Path, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore weights, optimizer state and this rank's RNG; returns state (step, extra)."""
    sd, _ = read_safetensors(ckpt / "weights.safetensors")
    for m, mod in models.items():
        part = {k[len(m) + 1:]: v for k, v in sd.items() if k.startswith(m + ".")}
        load_state_strict(unwrap(mod), part, f"{ckpt}/weights.safetensors [{m}]")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    if state.get("world_size", 1) != get_world_size():
        print0(f"note: resuming a {state.get('world_size')}-process run on {get_world_size()} processes; "
               "the data stream continues, per-rank random streams are re-derived")
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    rng_file = ckpt / f"rng_rank{get_rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


# ----------------------------------------------------------------------------------------
# 7. Logging and the run object every recipe's loop uses
# ----------------------------------------------------------------------------------------

def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class NonFiniteLoss(RuntimeError):
    pass


class Run:
    """Bookkeeping of one training run: distributed setup, run dir, resume, console/jsonl
    logging, checkpoints, signals, NaN guard. The recipe keeps its own loop:

        run = Run(cfg, "mae")
        start = run.resume(models, optimizers)     # 0 for a fresh run
        for step in range(start, cfg.steps):
            ...
            run.step(step, models, optimizers, loss=loss, other=metric)   # may stop the loop
            if run.stopped: break
        run.finish(models, optimizers, backbone)
    """

    def __init__(self, cfg, recipe: str):
        self.cfg, self.recipe = cfg, recipe
        self.dist = setup_distributed()
        self.device = self.dist.device
        seed_everything(cfg.seed + 1000 * self.dist.rank)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.dist.world_size} processes")
        self.local_batch = cfg.batch_size // self.dist.world_size
        self.out_dir = Path(cfg.out_dir)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume and latest_checkpoint(self.out_dir) is not None:
                raise SystemExit(f"{self.out_dir} already holds a run: pass --resume to continue it, "
                                 "or choose another --out_dir")
            save_config(cfg, self.out_dir)
            (self.out_dir / "run_info.json").write_text(json.dumps(run_info(), indent=2))
        barrier()
        self.stop_signal = StopSignal()
        self.stopped = False
        self._bad = torch.zeros((), device=self.device)
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._t0 = time.perf_counter()
        self._bar = None
        print0(f"[{recipe}] resolved config:\n" + json.dumps(dataclasses.asdict(cfg), indent=1))
        print0(f"[{recipe}] {self.dist.world_size} process(es) on {self.device}, "
               f"global batch {cfg.batch_size} ({self.local_batch} per rank), run dir {self.out_dir}")

    def resume(self, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> int:
        self.start_step = 0
        self.extra: dict = {}
        if self.cfg.resume:
            ckpt = latest_checkpoint(self.out_dir)
            if ckpt is None:
                raise SystemExit(f"--resume: no checkpoint in {self.out_dir}/checkpoint")
            state = load_checkpoint(ckpt, models, optimizers)
            self.start_step, self.extra = state["step"], state["extra"]
            print0(f"[{self.recipe}] resumed from {ckpt} at step {self.start_step}")
        return self.start_step

    def _progress(self):
        if self._bar is None and self.dist.is_main:
            from tqdm import tqdm
            self._bar = tqdm(total=self.cfg.steps, initial=self.start_step, desc=self.recipe,
                             dynamic_ncols=True, disable=None, leave=False)
        return self._bar

    def step(self, step: int, models, optimizers, extra: dict | None = None, **metrics):
        """Call once per finished step with tensors (no sync here except on logging steps).
        `step` is the index of the step just done; checkpoints record step + 1."""
        loss = metrics.get("loss")
        if loss is not None:
            self._bad = self._bad + (~torch.isfinite(loss.detach())).float()
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self._sums[k] = self._sums.get(k, 0) + v
        self._count += 1
        done = step + 1
        bar = self._progress()
        if bar is not None:
            bar.update(1)
        last = done == self.cfg.steps
        log_now = done % self.cfg.log_every == 0 or last
        ckpt_now = done % self.cfg.ckpt_every == 0 or last
        if not (log_now or ckpt_now):
            return
        if all_reduce_sum(self._bad.clone().reshape(1)).item() > 0:
            self.stopped = True
            raise NonFiniteLoss(f"non-finite loss before step {done}; stopping. The last good checkpoint "
                                f"is kept in {self.out_dir}/checkpoint (resume with --resume, maybe with a lower lr)")
        if log_now:
            self.log(done, {k: v / self._count for k, v in self._sums.items()})
        if self.stop_signal.agreed(self.device):
            print0(f"[{self.recipe}] stop requested: writing a checkpoint at step {done}")
            ckpt_now, self.stopped = True, True
        if ckpt_now:
            save_checkpoint(self.out_dir, done, models, optimizers, extra, self.cfg)

    def log(self, done: int, metrics: dict[str, torch.Tensor]):
        vals = {k: float(all_reduce_mean(v.to(self.device).reshape(1).clone()).item()) for k, v in metrics.items()}
        dt = time.perf_counter() - self._t0
        ms = 1000 * dt / max(self._count, 1)
        vals.update(step=done, ms_per_step=ms, img_per_s=self.cfg.batch_size * self._count / dt,
                    peak_mem_gb=peak_memory_gb(self.device), time=time.time())
        self._sums, self._count, self._t0 = {}, 0, time.perf_counter()
        if not self.dist.is_main:
            return
        line = f"step {done}/{self.cfg.steps}"
        for k, v in vals.items():
            if k not in ("step", "time"):
                line += f" | {k} {v:.4g}"
        bar = self._progress()
        (bar.write if bar is not None and not bar.disable else print)(line)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(vals) + "\n")

    def finish(self, backbone: nn.Module, **meta):
        """Export the backbone the recipe's paper evaluates and tear down."""
        if self._bar is not None:
            self._bar.close()
        if self.dist.is_main:
            save_backbone(unwrap(backbone), self.out_dir / "backbone.safetensors", recipe=self.recipe, **meta)
            print0(f"[{self.recipe}] exported {self.out_dir / 'backbone.safetensors'}")
        barrier()
        cleanup_distributed()


# ----------------------------------------------------------------------------------------
# 8. Sheet data
# ----------------------------------------------------------------------------------------
# Construction-sheet data: synthetic drawings with dense labels, a real-corpus tile loader,
# crop views for line art, deterministic resumable sampling, and labeled probe sets.
#
# Conventions
# - A sheet is a dict: image (uint8 HxW, 255 = paper, black ink), label (uint8 HxW class ids
#   or None), ink (bool HxW or None), sheet_type (index into SHEET_TYPES, -1 if unknown), name.
# - Model-side tensors are grayscale float (1, H, W) in [0, 1], 1 = paper; the model converts to
#   3 channels and ImageNet normalisation itself. Labels are int64 (H, W), 255 = ignore.
# - Item i of a TileDataset depends only on (seed, i); see InfiniteSampler for the index layout.

SHEET_TYPES = ("plan", "section", "detail", "schedule")
CLASSES = ("background", "wall", "door", "window", "stair", "fixture", "dimension", "text", "annotation")
# Labels are FOOTPRINTS, not ink, so that the majority label of a 16 px patch means something:
#   wall       cut walls and columns incl. their poche/hatch; cut slabs and roofs in sections,
#              facade outlines in elevations; cut construction layers in details.
#   door       plan: wall opening + leaf + swing area; door elevations; door frames in details.
#   window     plan: the window's stretch of wall; window elevations; frame profiles in details.
#   stair      the whole flight: treads, outline, direction arrow, handrail in section.
#   fixture    bounding box of sanitary fixtures, kitchen counters and furniture.
#   dimension  the strip of a dimension string (line, ticks, numbers), its extension lines,
#              level marks.
#   text       box of every free text: room names, areas, notes, titles, title-block and table
#              entries.
#   annotation everything else that is drawn: grid lines and bubbles, section/detail callouts,
#              leaders, north arrow, hatches outside walls (terraces, earth), overhang and
#              break lines, the border, title-block and table rules.
# Later elements overwrite earlier labels, so draw order is label priority.
BG, WALL, DOOR, WINDOW, STAIR, FIXTURE, DIM, TEXT, ANNO = range(len(CLASSES))
IGNORE = 255

# 80-120 px/m is a 150 dpi sheet drawn at 1:50-1:75. With walls of 0.15-0.45 m every wall is
# >= 12 px thick and doors/windows (>= 0.6 m wide, wall-thick) span >= 12 x 48 px, so a 16 px
# patch of a 224 tile can be mostly one element (at 7-50 px/m most elements were thinner than
# a patch and the patch-level probe ceiling collapsed).
DEFAULT_PX_PER_M = (80.0, 120.0)
SHEET_LONG_SIDE = (1500, 2100)  # ~A3 at 150 dpi: cheap to render, ~45 disjoint 224 px tiles a sheet
INK_THRESHOLD = 192  # gray poche (110-170) counts as ink, scanner paper tone (>= 230) does not
MIN_INK = 0.02
SHEET_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".pdf")
# A0 at 600 dpi is 19866 x 28087 = 558 Mpx; larger files are refused (one decoded grayscale sheet
# per cache slot per worker would exceed 600 MB). PIL's own bomb check warns above this and
# raises above twice this; our probe refuses above it first, with a warning naming the file.
MAX_SHEET_PIXELS = 600_000_000
Image.MAX_IMAGE_PIXELS = MAX_SHEET_PIXELS


# ----------------------------------------------------------------------------- drawing kit
_FONTS = {}


def _font(size):
    size = max(6, int(size))
    if size not in _FONTS:  # load_default(size) parses the embedded TTF each call
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _nb(b):
    return (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))


class _Canvas:
    """Paper image and label image drawn with the same primitives."""

    def __init__(self, w, h):
        self.w, self.h = w, h
        self.im, self.lb = Image.new("L", (w, h), 255), Image.new("L", (w, h), BG)
        self.d, self.l = ImageDraw.Draw(self.im), ImageDraw.Draw(self.lb)

    def line(self, pts, cls, width=1, pad=2):
        self.d.line(pts, fill=0, width=width)
        self.l.line(pts, fill=cls, width=width + pad)

    def rect(self, b, cls, width=1, fill=None, solid=True):
        b = _nb(b)
        self.d.rectangle(b, fill=fill, outline=0, width=width)
        if solid:  # one pixel of slack: PIL rounds fills and outlines of float boxes differently
            self.l.rectangle((b[0] - 1, b[1] - 1, b[2] + 1, b[3] + 1), fill=cls)
        else:
            self.l.rectangle(b, outline=cls, width=width + 2)

    def circle(self, xy, r, cls, width=1, fill=255):
        b = (xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r)
        self.d.ellipse(b, fill=fill, outline=0, width=width)
        self.l.ellipse(b, fill=cls)

    def dashed(self, p, q, cls, width=1, pattern=(14, 5, 2, 5)):
        n = math.hypot(q[0] - p[0], q[1] - p[1])
        if n < 1:
            return
        ux, uy, t, k = (q[0] - p[0]) / n, (q[1] - p[1]) / n, 0.0, 0
        while t < n:
            e = min(t + pattern[k % len(pattern)], n)
            if k % 2 == 0:
                self.d.line([(p[0] + ux * t, p[1] + uy * t), (p[0] + ux * e, p[1] + uy * e)], fill=0, width=width)
            t, k = e, k + 1
        self.l.line([p, q], fill=cls, width=width + 2)  # a dashed line's footprint is continuous

    def text(self, xy, s, size, cls=TEXT, anchor="mm", bold=False, vertical=False):
        f, sw = _font(size), int(bold)
        if vertical:  # reads bottom-to-top, centred on xy
            l, t, r, b = f.getbbox(s, stroke_width=sw)
            tmp = Image.new("L", (r - l + 1, b - t + 1), 0)
            ImageDraw.Draw(tmp).text((-l, -t), s, font=f, fill=255, stroke_width=sw, stroke_fill=255)
            tmp = tmp.transpose(Image.Transpose.ROTATE_90)
            x, y = int(xy[0] - tmp.width / 2), int(xy[1] - tmp.height / 2)
            self.im.paste(0, (x, y), tmp)
            bb = (x, y, x + tmp.width, y + tmp.height)
        else:
            bb = self.d.textbbox(xy, s, font=f, anchor=anchor, stroke_width=sw)
            self.d.text(xy, s, font=f, fill=0, anchor=anchor, stroke_width=sw, stroke_fill=0)
        self.l.rectangle((bb[0] - 1, bb[1] - 1, bb[2] + 1, bb[3] + 1), fill=cls)
        return bb

    def free(self, b, allow_anno=False):
        b = [int(round(v)) for v in _nb(b)]
        if b[0] < 0 or b[1] < 0 or b[2] > self.w or b[3] > self.h:
            return False
        a = np.asarray(self.lb.crop(b))
        return bool(((a == BG) | (a == ANNO)).all() if allow_anno else not a.any())


def _arrow(c, tip, d, size, cls):
    n = math.hypot(*d) or 1.0
    dx, dy = d[0] / n, d[1] / n
    bx, by, w = tip[0] - dx * size, tip[1] - dy * size, size * 0.32
    pts = [tip, (bx - dy * w, by + dx * w), (bx + dy * w, by - dx * w)]
    c.d.polygon(pts, fill=0)
    c.l.polygon(pts, fill=cls)


def _bubble(c, xy, r, s, cls=ANNO):
    c.circle(xy, r, cls)
    c.text(xy, s, int(r * 1.05), cls=cls)


def _hatch(c, rng, b, sp, kind):
    """Paper-only fill pattern inside box b; the caller labels the footprint."""
    x0, y0, x1, y1 = b
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    line = c.d.line
    if kind in ("/", "x", "earth"):  # lines x + y = k on a global lattice, so abutting boxes agree
        for k in np.arange(math.ceil((x0 + y0) / sp) * sp, x1 + y1, sp):
            xa, xb = max(x0, k - y1), min(x1, k - y0)
            if xb > xa:
                line([(xa, k - xa), (xb, k - xb)], fill=0, width=1)
    if kind in ("\\", "x"):
        for k in np.arange(math.ceil((x0 - y1) / sp) * sp, x1 - y0, sp):
            xa, xb = max(x0, y0 + k), min(x1, y1 + k)
            if xb > xa:
                line([(xa, xa - k), (xb, xb - k)], fill=0, width=1)
    if kind == "grid":
        for x in np.arange(x0 + sp, x1, sp):
            line([(x, y0), (x, y1)], fill=0)
        for y in np.arange(y0 + sp, y1, sp):
            line([(x0, y), (x1, y)], fill=0)
    if kind in ("dots", "concrete", "earth"):
        n = int((x1 - x0) * (y1 - y0) / (sp * sp) * 3)
        c.d.point(list(zip(rng.uniform(x0, x1, n), rng.uniform(y0, y1, n))), fill=0)
    if kind == "concrete":
        for x, y in zip(rng.uniform(x0 + 4, x1 - 4, n // 8), rng.uniform(y0 + 4, y1 - 4, n // 8)):
            a = rng.uniform(0, 2 * math.pi)
            c.d.polygon([(x + 4 * math.cos(a + k * 2.1), y + 4 * math.sin(a + k * 2.1)) for k in range(3)], outline=0)
    if kind == "zig":  # insulation batt: zigzag across the short side
        w, h = x1 - x0, y1 - y0
        if h >= w:
            pts = [(x0 if i % 2 else x1, y) for i, y in enumerate(np.arange(y0, y1, w * 0.5))]
        else:
            pts = [(x, y0 if i % 2 else y1) for i, x in enumerate(np.arange(x0, x1, h * 0.5))]
        if len(pts) > 1:
            line(pts, fill=0, width=1)
    if kind == "wood":
        line([(x0, y0), (x1, y1)], fill=0)
        line([(x0, y1), (x1, y0)], fill=0)


class _Local:
    """Symbol frame: u along a wall, v away from it into the room (pixels)."""

    def __init__(self, c, o, a, n):
        self.c, self.o, self.a, self.n = c, o, a, n

    def p(self, u, v):
        return (self.o[0] + u * self.a[0] + v * self.n[0], self.o[1] + u * self.a[1] + v * self.n[1])

    def box(self, u0, v0, u1, v1):
        return _nb(self.p(u0, v0) + self.p(u1, v1))

    def rect(self, u0, v0, u1, v1, r=0):
        b = self.box(u0, v0, u1, v1)
        if r > 0 and min(b[2] - b[0], b[3] - b[1]) > 2 * r:
            self.c.d.rounded_rectangle(b, r, fill=255, outline=0)
        else:
            self.c.d.rectangle(b, fill=255, outline=0)

    def ellipse(self, u0, v0, u1, v1):
        self.c.d.ellipse(self.box(u0, v0, u1, v1), fill=255, outline=0)

    def line(self, *pts, w=1):
        self.c.d.line([self.p(*q) for q in pts], fill=0, width=w)


_WORDS = ("PROVIDE NEW GYPSUM BOARD CONCRETE SLAB SEE DETAIL ALL DIMENSIONS TO FACE OF STUD VERIFY "
          "IN FIELD FINISH WATERPROOF MEMBRANE EXISTING WALL REMOVE STEEL BEAM ABOVE TYP. FIRE RATED "
          "ASSEMBLY INSULATION CONTINUOUS SEALANT JOINT FLOOR DRAIN SLOPE MIN. CEILING HEIGHT DOOR "
          "FRAME ANCHOR BOLTS AT CENTRES PER STRUCTURAL DRAWINGS CONTRACTOR SHALL COORDINATE WITH "
          "MECHANICAL ELECTRICAL PLUMBING RISER SHAFT ACCESS PANEL FLASHING SILL LINTEL BRICK").split()
_ROOMS = {
    "en": dict(bath="BATH", wc="WC", closet="CLOSET", kitchen="KITCHEN", living="LIVING ROOM", dining="DINING",
               bed="BEDROOM", hall="HALL", office="OFFICE", storage="STORAGE", laundry="LAUNDRY"),
    "fr": dict(bath="BAINS", wc="W.C.", closet="PLACARD", kitchen="CUISINE", living="SEJOUR", dining="REPAS",
               bed="CHAMBRE", hall="DEGT", office="BUREAU", storage="CELLIER", laundry="BUANDERIE"),
    "es": dict(bath="BANO", wc="ASEO", closet="ARMARIO", kitchen="COCINA", living="SALON", dining="COMEDOR",
               bed="DORMITORIO", hall="PASILLO", office="ESTUDIO", storage="TRASTERO", laundry="LAVADERO"),
}


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _sentence(rng, lo=3, hi=9):
    return " ".join(_pick(rng, _WORDS) for _ in range(int(rng.integers(lo, hi))))


def _style(rng):
    u = rng.uniform
    ext = _pick(rng, ("solid", "hatch", "hollow", "gray"))
    return dict(ext=ext, int=ext if u() < 0.5 else _pick(rng, ("solid", "hollow")), gray=int(u(110, 170)),
                lw=int(rng.integers(1, 4)), tick=_pick(rng, ("slash", "arrow", "dot")),
                units=_pick(rng, ("m", "mm", "cm", "ft")), lang=_pick(rng, tuple(_ROOMS)),
                dim_txt=int(u(12, 18)), room_txt=int(u(15, 27)), note_txt=int(u(11, 15)),
                win_lines=int(rng.integers(1, 4)))


def _fmt_len(m, units):
    if units == "mm":
        return str(int(round(m * 200)) * 5)
    if units == "cm":
        return str(int(round(m * 100)))
    if units == "ft":
        inch = int(round(m / 0.0254))
        return f"{inch // 12}'-{inch % 12}\""
    return f"{m:.2f}"


def _dim_chain(c, st, s, horiz, pts, lc, ec, out):
    """Chain of dimensions along x (horiz) or y at line coordinate lc; extension lines start at ec;
    out (+1/-1) points away from the object, where the numbers go."""
    P = (lambda a, b: (a, b)) if horiz else (lambda a, b: (b, a))
    pts, ts = sorted(pts), st["dim_txt"]
    if len(pts) < 2:
        return
    over = 8 if st["tick"] == "slash" else 0
    strip = P(pts[0] - over - 4, lc - out * 9) + P(pts[-1] + over + 4, lc + out * (ts * 1.3 + 8))
    c.l.rectangle(_nb(strip), fill=DIM)
    c.line([P(pts[0] - over, lc), P(pts[-1] + over, lc)], DIM)
    for p in pts:
        c.line([P(p, ec), P(p, lc + out * 7)], DIM)
        if st["tick"] == "slash":
            c.line([P(p - 5, lc + 5), P(p + 5, lc - 5)], DIM, width=2)
        elif st["tick"] == "dot":
            c.circle(P(p, lc), 2.5, DIM, fill=0)
    for a, b in zip(pts[:-1], pts[1:]):
        if st["tick"] == "arrow" and b - a > 20:
            _arrow(c, P(a, lc), P(-1, 0), 9, DIM)
            _arrow(c, P(b, lc), P(1, 0), 9, DIM)
        txt = _fmt_len((b - a) / s, st["units"])
        if _font(ts).getlength(txt) + 6 < b - a:
            c.text(P((a + b) / 2, lc + out * (ts * 0.6 + 3)), txt, ts, cls=DIM, vertical=not horiz)


def _place(c, rng, cell, U, V, draw, cls, wall=True, tries=8):
    """Put a U x V symbol against a wall (or free-standing) inside the cell interior where nothing
    but background or annotation lies yet; draw(L, U, V) draws it in its local frame."""
    x0, y0, x1, y1 = cell
    for _ in range(tries):
        side = int(rng.integers(4)) if wall else 0
        along, deep = (x1 - x0, y1 - y0) if side in (0, 2) else (y1 - y0, x1 - x0)
        if U > along or V > deep:
            continue
        p = rng.uniform(0, along - U)
        if not wall:
            o, a, n = (x0 + p, y0 + rng.uniform(0, deep - V)), (1, 0), (0, 1)
        else:
            o, a, n = [((x0 + p, y0), (1, 0), (0, 1)), ((x1, y0 + p), (0, 1), (-1, 0)),
                       ((x0 + p, y1), (1, 0), (0, -1)), ((x0, y0 + p), (0, 1), (1, 0))][side]
        L = _Local(c, o, a, n)
        b = L.box(0, 0, U, V)
        if c.free(b, allow_anno=True):
            c.l.rectangle((b[0] - 1, b[1] - 1, b[2] + 1, b[3] + 1), fill=cls)
            draw(L, U, V)
            return b
    return None


# -------------------------------------------------------------------------- symbols (local frame)
def _f_wc(L, U, V, s):
    L.rect(0, 0, U, V * 0.27)
    L.ellipse(U * 0.1, V * 0.22, U * 0.9, V)


def _f_basin(L, U, V, s):
    L.rect(0, 0, U, V)
    L.ellipse(U * 0.15, V * 0.2, U * 0.85, V * 0.85)


def _f_tub(L, U, V, s):
    L.rect(0, 0, U, V)
    L.rect(U * 0.04, V * 0.1, U * 0.96, V * 0.9, r=V * 0.25)
    L.ellipse(U * 0.84, V * 0.45, U * 0.88, V * 0.55)


def _f_shower(L, U, V, s):
    L.rect(0, 0, U, V)
    L.line((0, 0), (U, V))
    L.line((U, 0), (0, V))


def _f_counter(L, U, V, s):
    L.rect(0, 0, U, V)
    a = U * 0.15
    L.rect(a, V * 0.15, a + 0.4 * s, V * 0.85, r=3)
    L.rect(a + 0.45 * s, V * 0.15, a + 0.85 * s, V * 0.85, r=3)
    if U > 1.9 * s:
        b = U - 0.75 * s
        for du, dv in ((0.15, 0.18), (0.45, 0.18), (0.15, 0.42), (0.45, 0.42)):
            L.ellipse(b + (du - 0.1) * s, (dv - 0.1) * s, b + (du + 0.1) * s, (dv + 0.1) * s)


def _f_bed(L, U, V, s):
    L.rect(0, 0, U, V)
    n = 2 if U > 1.3 * s else 1
    for k in range(n):
        L.rect(U * k / n + 0.08 * s, 0.08 * s, U * (k + 1) / n - 0.08 * s, 0.4 * s, r=6)
    L.line((0, 0.55 * s), (U, 0.55 * s))
    L.line((U * 0.6, 0.55 * s), (U, 0.85 * s))


def _f_wardrobe(L, U, V, s):
    L.rect(0, 0, U, V)
    L.line((0, V / 2), (U, V / 2))
    for x in np.arange(0.15 * s, U - 0.1 * s, 0.25 * s):
        L.line((x - 0.08 * s, V * 0.2), (x + 0.08 * s, V * 0.8))


def _f_sofa(L, U, V, s):
    L.rect(0, 0, U, V, r=5)
    L.rect(0, 0, U, V * 0.25)
    L.rect(0, 0, U * 0.1, V)
    L.rect(U * 0.9, 0, U, V)
    L.line((U / 2, V * 0.25), (U / 2, V))


def _f_table(L, U, V, s):
    m, cw = 0.45 * s, 0.42 * s
    n = max(1, int((U - 2 * m) // (0.6 * s)))
    for k in range(n):
        uc = m + (k + 0.5) * (U - 2 * m) / n
        L.rect(uc - cw / 2, 0.03 * s, uc + cw / 2, m - 0.03 * s, r=3)
        L.rect(uc - cw / 2, V - m + 0.03 * s, uc + cw / 2, V - 0.03 * s, r=3)
    if V - 2 * m > 0.7 * s:
        L.rect(0.03 * s, V / 2 - cw / 2, m - 0.03 * s, V / 2 + cw / 2, r=3)
        L.rect(U - m + 0.03 * s, V / 2 - cw / 2, U - 0.03 * s, V / 2 + cw / 2, r=3)
    (L.ellipse if U < V * 1.3 else L.rect)(m - 0.1 * s, m - 0.1 * s, U - m + 0.1 * s, V - m + 0.1 * s)


def _f_washer(L, U, V, s):
    L.rect(0, 0, U, V)
    L.ellipse(U * 0.15, V * 0.15, U * 0.85, V * 0.85)


def _f_desk(L, U, V, s):
    L.rect(0, 0, U, V * 0.6)
    L.rect(U * 0.35, V * 0.68, U * 0.65, V, r=3)


# name: (U range m, V range m, draw, against a wall)
_SYMBOLS = {
    "wc": ((0.38, 0.45), (0.65, 0.75), _f_wc, True), "basin": ((0.5, 0.7), (0.42, 0.5), _f_basin, True),
    "tub": ((1.5, 1.8), (0.7, 0.8), _f_tub, True), "shower": ((0.8, 1.0), (0.8, 1.0), _f_shower, True),
    "counter": ((1.8, 3.6), (0.6, 0.65), _f_counter, True), "bed": ((0.9, 1.8), (1.95, 2.1), _f_bed, True),
    "wardrobe": ((1.0, 2.4), (0.55, 0.65), _f_wardrobe, True), "sofa": ((1.6, 2.4), (0.8, 0.95), _f_sofa, True),
    "table": ((1.9, 2.9), (1.7, 1.9), _f_table, False), "washer": ((0.6, 0.62), (0.6, 0.62), _f_washer, True),
    "desk": ((1.1, 1.6), (1.0, 1.1), _f_desk, True), "armchair": ((0.75, 0.9), (0.75, 0.9), _f_sofa, True),
}
_FURNISH = {"bath": ("tub", "shower", "basin", "wc"), "wc": ("wc", "basin"), "kitchen": ("counter", "table"),
            "dining": ("table",), "living": ("sofa", "armchair", "armchair"), "bed": ("bed", "wardrobe"),
            "office": ("desk", "wardrobe"), "laundry": ("washer", "washer", "counter"), "closet": ("wardrobe",)}


# -------------------------------------------------------------------------------- floor plan
def _plan(c, rng, s, box, st):
    u = rng.uniform
    bx0, by0, bx1, by1 = box
    off0, step, br = u(40, 56), u(34, 46), u(13, 19)
    nch = [int(rng.integers(1, 4)) if u() < 0.75 else 0 for _ in range(4)] if u() < 0.85 else [0] * 4
    grid = u() < 0.5
    for _ in range(2):  # drop dimensions and grid when the box is too small for them
        mg = [26 + (off0 + (k - 1) * step + st["dim_txt"] + 8 if k else 0) + (2 * br + 24 if grid else 0)
              for k in nch]
        aw, ah = (bx1 - bx0 - mg[1] - mg[3]) / s, (by1 - by0 - 80 - mg[0] - mg[2]) / s
        if min(aw, ah) >= 4.0:
            break
        nch, grid = [0] * 4, False
    if min(aw, ah) < 3.0:
        return

    def cells(avail):
        w = u(1.6, 4.5, int(rng.integers(2, 7)))
        w = w[:max(2, int(np.searchsorted(np.cumsum(w), avail, side="right")))]
        return w * min(1.0, avail / w.sum())

    cw, rh = cells(aw * u(0.8, 1.0)), cells(ah * u(0.8, 1.0))
    nr, nc = len(rh), len(cw)
    x0 = bx0 + mg[3] + u(0, aw * s - cw.sum() * s)
    y0 = by0 + mg[0] + u(0, ah * s - rh.sum() * s)
    gx, gy = x0 + np.concatenate([[0], np.cumsum(cw)]) * s, y0 + np.concatenate([[0], np.cumsum(rh)]) * s
    te, ti = u(0.25, 0.45) * s, u(0.15, 0.22) * s
    face = (gy[0] - te / 2, gx[-1] + te / 2, gy[-1] + te / 2, gx[0] - te / 2)  # top, right, bottom, left

    occ = np.ones((nr, nc), bool)
    notch = None
    if nr * nc >= 4 and u() < 0.5:
        notch = (int(rng.choice([0, nr - 1])), int(rng.choice([0, nc - 1])))
        occ[notch] = False
    rid = np.arange(nr * nc).reshape(nr, nc)
    for r in range(nr):
        for q in range(nc):
            if q + 1 < nc and occ[r, q] and occ[r, q + 1] and u() < 0.3:
                rid[rid == rid[r, q + 1]] = rid[r, q]
            if r + 1 < nr and occ[r, q] and occ[r + 1, q] and u() < 0.15:
                rid[rid == rid[r + 1, q]] = rid[r, q]

    def inside(r, q):
        return 0 <= r < nr and 0 <= q < nc and occ[r, q]

    segs = []
    for o, n_lines, n_runs in (("v", nc + 1, nr), ("h", nr + 1, nc)):
        for i in range(n_lines):
            for j in range(n_runs):
                A, B = (inside(j, i - 1), inside(j, i)) if o == "v" else (inside(i - 1, j), inside(i, j))
                ra = rid[(j, i - 1) if o == "v" else (i - 1, j)] if A else -1
                rb = rid[(j, i) if o == "v" else (i, j)] if B else -1
                if A == B and (not A or ra == rb):
                    continue
                cc, a, b = (gx[i], gy[j], gy[j + 1]) if o == "v" else (gy[i], gx[j], gx[j + 1])
                kind, out = ("int", 0) if A and B else ("ext", 1 if A else -1)
                last = segs[-1] if segs else None
                if last and (last["o"], last["c"], last["pair"], last["b"]) == (o, cc, (ra, rb), a):
                    last["b"] = b
                else:
                    segs.append(dict(o=o, c=cc, a=a, b=b, kind=kind, pair=(ra, rb), out=out,
                                     t=te if kind == "ext" else ti, ops=[]))

    def add_opening(sg, w, kind, near_end=False):
        lo, hi = sg["a"] + te / 2 + 0.12 * s, sg["b"] - te / 2 - 0.12 * s - w
        if hi <= lo:
            return False
        p = (lo if u() < 0.5 else hi) if near_end else u(lo, hi)
        if any(p < b + 0.2 * s and p + w > a - 0.2 * s for a, b, _ in sg["ops"]):
            return False
        sg["ops"].append((p, p + w, kind))
        return True

    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for k in rng.permutation(len(segs)):
        sg = segs[k]
        if sg["kind"] == "int":
            ra, rb = find(sg["pair"][0]), find(sg["pair"][1])
            if (ra != rb or u() < 0.2) and add_opening(sg, u(0.75, 0.95) * s, "door", u() < 0.6):
                parent[ra] = rb
    exts = [sg for sg in segs if sg["kind"] == "ext"]
    for sg in rng.permutation(len(exts)):
        if add_opening(exts[sg], (u(1.4, 1.8) if u() < 0.3 else u(0.9, 1.0)) * s, "door"):
            break
    for sg in exts:
        n = int((sg["b"] - sg["a"]) / s / u(2.2, 4.0))
        for _ in range(n):
            add_opening(sg, u(0.6, min(2.2, max(0.7, (sg["b"] - sg["a"]) / s * 0.45))) * s, "window")

    # --- annotation layers below the walls
    if notch is not None and u() < 0.6:
        r, q = notch
        h = te / 2
        b = (gx[q] + h * (q > 0), gy[r] + h * (r > 0), gx[q + 1] - h * (q < nc - 1), gy[r + 1] - h * (r < nr - 1))
        c.rect(b, ANNO)
        _hatch(c, rng, b, u(0.3, 0.6) * s, _pick(rng, ("x", "grid", "/")))
    if u() < 0.25:
        d = u(0.4, 0.7) * s
        corners = [(face[3] - d, face[0] - d), (face[1] + d, face[0] - d),
                   (face[1] + d, face[2] + d), (face[3] - d, face[2] + d)]
        for p, q in zip(corners, corners[1:] + corners[:1]):
            c.dashed(p, q, ANNO, pattern=(10, 6))
    # grid bubbles sit beyond the outermost dimension chain of each side
    bub = [face[k] + (-1, 1, 1, -1)[k] * ((off0 + (nch[k] - 1) * step + st["dim_txt"] + 16 if nch[k] else 30) + br)
           for k in range(4)]
    if grid:
        both = u() < 0.4
        letters = u() < 0.5
        for k, x in enumerate(gx):
            c.dashed((x, bub[0] + br), (x, bub[2] - br if both else face[2] + 20), ANNO)
            for y in (bub[0], bub[2]) if both else (bub[0],):
                _bubble(c, (x, y), br, chr(65 + k) if letters else str(k + 1))
        for k, y in enumerate(gy):
            c.dashed((bub[3] + br, y), (bub[1] - br if both else face[1] + 20, y), ANNO)
            for x in (bub[3], bub[1]) if both else (bub[3],):
                _bubble(c, (x, y), br, str(k + 1) if letters else chr(65 + k))

    # --- walls: ink everything, then fill interiors interior-walls-first so junctions merge
    pieces = []
    for sg in segs:
        cuts = sorted(sg["ops"])
        edges = [sg["a"]] + [v for a, b, _ in cuts for v in (a, b)] + [sg["b"]]
        for k in range(0, len(edges), 2):
            a = edges[k] - (sg["t"] / 2 if k == 0 else 0)
            b = edges[k + 1] + (sg["t"] / 2 if k + 2 == len(edges) else 0)
            c0, c1 = sg["c"] - sg["t"] / 2, sg["c"] + sg["t"] / 2
            r = (c0, a, c1, b) if sg["o"] == "v" else (a, c0, b, c1)
            pieces.append((sg["kind"], r))
    for _, r in pieces:
        c.d.rectangle(r, fill=0)
        c.l.rectangle(r, fill=WALL)
    lw, hs = st["lw"], u(5, 9)
    for kind in ("int", "ext"):
        style = st[kind]
        for k, r in pieces:
            if k != kind or (style == "solid" and kind == "int"):
                continue
            ir = (r[0] + lw, r[1] + lw, r[2] - lw, r[3] - lw)
            if ir[2] > ir[0] and ir[3] > ir[1]:
                c.d.rectangle(ir, fill={"solid": 0, "gray": st["gray"]}.get(style, 255))
                if style == "hatch":
                    _hatch(c, rng, ir, hs, "/")

    # --- openings
    for sg in segs:
        P = (lambda al, ac: (ac, al)) if sg["o"] == "v" else (lambda al, ac: (al, ac))
        cc, t = sg["c"], sg["t"]
        for p0, p1, kind in sg["ops"]:
            gap = _nb(P(p0, cc - t / 2) + P(p1, cc + t / 2))
            if kind == "window":
                c.d.rectangle(gap, fill=255, outline=0)
                c.l.rectangle((gap[0] - 1, gap[1] - 1, gap[2] + 1, gap[3] + 1), fill=WINDOW)
                for k in range(st["win_lines"]):
                    ac = cc - t / 2 + t * (k + 1) / (st["win_lines"] + 1)
                    c.d.line([P(p0, ac), P(p1, ac)], fill=0)
                continue
            c.l.rectangle(gap, fill=DOOR)
            side = -sg["out"] if sg["kind"] == "ext" else _pick(rng, (-1, 1))
            fc = cc + side * t / 2
            if u() < 0.12:  # sliding door: two leaves in the wall thickness
                m = (p0 + p1) / 2
                c.d.rectangle(_nb(P(p0, cc - t * 0.2) + P(m + 0.05 * s, cc - t * 0.05)), outline=0)
                c.d.rectangle(_nb(P(m - 0.05 * s, cc + t * 0.05) + P(p1, cc + t * 0.2)), outline=0)
                continue
            leaves = [(p0, p1)] if p1 - p0 < 1.3 * s else [(p0, (p0 + p1) / 2), (p1, (p0 + p1) / 2)]
            if len(leaves) == 1 and u() < 0.5:
                leaves = [(p1, p0)]
            for hinge, other in leaves:
                r = abs(other - hinge)
                H, E, O = P(hinge, fc), P(hinge, fc + side * r), P(other, fc)
                a1 = round(math.degrees(math.atan2(E[1] - H[1], E[0] - H[0])) / 90) * 90 % 360
                a2 = round(math.degrees(math.atan2(O[1] - H[1], O[0] - H[0])) / 90) * 90 % 360
                a1, a2 = (a1, a2) if (a2 - a1) % 360 == 90 else (a2, a1)
                bb = (H[0] - r, H[1] - r, H[0] + r, H[1] + r)
                c.l.pieslice(bb, a1, a2, fill=DOOR)
                c.d.arc(bb, a1, a2, fill=0, width=1)
                c.line([H, E], DOOR, width=max(2, lw))

    # --- rooms: functions by size, stairs, names, furniture
    rooms = {}
    for r in range(nr):
        for q in range(nc):
            if occ[r, q]:
                inner = (gx[q] + te / 2 + 3, gy[r] + te / 2 + 3, gx[q + 1] - te / 2 - 3, gy[r + 1] - te / 2 - 3)
                rooms.setdefault(int(rid[r, q]), []).append(inner)
    area = {k: sum((b[2] - b[0]) * (b[3] - b[1]) for b in v) for k, v in rooms.items()}
    order = sorted(rooms, key=lambda k: area[k])
    func = {}
    for i, k in enumerate(order):
        if i == len(order) - 1:
            func[k] = "living"
        elif i < max(1, len(order) // 3):
            func[k] = _pick(rng, ("bath", "wc", "closet", "storage", "laundry", "bath"))
        elif i == len(order) - 2:
            func[k] = _pick(rng, ("kitchen", "dining"))
        else:
            func[k] = _pick(rng, ("bed", "bed", "office", "hall", "kitchen"))
    if u() < 0.85:
        big = [b for k in order[len(order) // 3:] for b in rooms[k]]
        for b in rng.permutation(len(big)):
            w = u(0.9, 1.2) * s
            if _place(c, rng, big[b], min(u(2.6, 4.0) * s, big[b][2] - big[b][0], big[b][3] - big[b][1]), w,
                      lambda L, U, V, tr=u(0.25, 0.3) * s: _stair(c, L, U, V, tr), STAIR, tries=3):
                break
    names, nbed = _ROOMS[st["lang"]], 0
    for k in order:
        cell = max(rooms[k], key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        name = names[func[k]]
        if func[k] == "bed":
            nbed += 1
            name += f" {nbed}"
        cx, cy = (cell[0] + cell[2]) / 2 + u(-0.2, 0.2) * s, (cell[1] + cell[3]) / 2 + u(-0.3, 0.3) * s
        ts = st["room_txt"]
        w = _font(ts).getlength(name)
        if w < cell[2] - cell[0] - 8 and c.free((cx - w / 2, cy - ts, cx + w / 2, cy + ts * 1.6), allow_anno=True):
            c.text((cx, cy), name, ts)
            if u() < 0.6:
                m2 = area[k] / (s * s)
                m2 = f"{m2:.2f} m2" if st["units"] != "ft" else f"{m2 * 10.764:.0f} SF"
                c.text((cx, cy + ts * 1.2), m2, int(ts * 0.7))
        for sym in _FURNISH.get(func[k], ()):
            if sym in ("tub", "shower") and u() < 0.5:
                continue
            (ul, uh), (vl, vh), fn, wall = _SYMBOLS[sym]
            for cb in rng.permutation(len(rooms[k])):
                draw = lambda L, U, V, fn=fn: fn(L, U, V, s)  # noqa: E731
                if _place(c, rng, rooms[k][cb], u(ul, uh) * s, u(vl, vh) * s, draw, FIXTURE, wall):
                    break

    # --- dimensions, callouts, notes, title
    for side in range(4):
        if not nch[side]:
            continue
        horiz, out = side in (0, 2), (-1, 1, 1, -1)[side]
        o = "h" if horiz else "v"
        fs = [sg for sg in segs if sg["kind"] == "ext" and sg["o"] == o and sg["out"] == out]
        pa = sorted({v for sg in fs for v in (sg["a"], sg["b"])}
                    | {v for sg in fs for a, b, _ in sg["ops"] for v in (a, b)})
        g = list(gx if horiz else gy)
        lo, hi = (face[3], face[1]) if horiz else (face[0], face[2])
        chains = [[lo] + pa[1:-1] + [hi], [lo] + g[1:-1] + [hi], [lo, hi]]
        chains = {1: [chains[_pick(rng, (0, 2))]], 2: [chains[0], chains[2]], 3: chains}[nch[side]]
        for i, pts in enumerate(chains):
            _dim_chain(c, st, s, horiz, pts, face[side] + out * (off0 + i * step), face[side] + out * 8, out)
    if u() < 0.35:
        q = int(rng.integers(nc))
        x, lab = (gx[q] + gx[q + 1]) / 2, _pick(rng, "ABC12")
        dirn = _pick(rng, (-1, 1))
        for y, yend in ((bub[0] - br * 0.4, face[0] - 6), (bub[2] + br * 0.4, face[2] + 6)):
            c.line([(x, y), (x, y + (yend - y) * 0.6)], ANNO, width=3)
            _bubble(c, (x, y), br * 0.9, lab)
            _arrow(c, (x + dirn * br * 2.2, y), (dirn, 0), br * 1.2, ANNO)
    for _ in range(int(rng.integers(0, 4))):
        sg = _pick(rng, exts)
        al = u(sg["a"], sg["b"])
        tgt = (sg["c"] + sg["out"] * sg["t"] / 2, al) if sg["o"] == "v" else (al, sg["c"] + sg["out"] * sg["t"] / 2)
        txt = _sentence(rng, 2, 5)
        for _ in range(6):
            d, along = u(max(mg) + 10, max(mg) + 160), u(-120, 120)
            p = ((tgt[0] + sg["out"] * d, tgt[1] + along) if sg["o"] == "v"
                 else (tgt[0] + along, tgt[1] + sg["out"] * d))
            tw = _font(st["note_txt"]).getlength(txt)
            right = p[0] >= tgt[0]
            h = st["note_txt"]
            b = (p[0] if right else p[0] - tw, p[1] - h, p[0] + tw if right else p[0], p[1] + h)
            if c.free((b[0] - 6, b[1] - 4, b[2] + 6, b[3] + 4)) and bx0 < b[0] and b[2] < bx1:
                c.text((p[0] + (4 if right else -4), p[1]), txt, st["note_txt"], anchor="lm" if right else "rm")
                c.line([p, (p[0] - (14 if right else -14), p[1]), tgt], ANNO)
                c.circle(tgt, 3, ANNO, fill=0)
                break
    if u() < 0.5:
        r = u(22, 36)
        for cx, cy in ((bx1 - r - 10, by0 + r + 10), (bx0 + r + 10, by0 + r + 10), (bx1 - r - 10, by1 - r - 90)):
            if c.free((cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4)):
                c.circle((cx, cy), r, ANNO)
                _arrow(c, (cx, cy - r * 0.9), (0, -1), r * 1.6, ANNO)
                c.text((cx, cy - r - 10), "N", int(r * 0.6), cls=ANNO)
                break
    title = _pick(rng, ("GROUND FLOOR PLAN", "FIRST FLOOR PLAN", "PLAN DU REZ DE CHAUSSEE", "PLANTA BAJA",
                        "LEVEL 2 PLAN", "UNIT PLAN"))
    _drawing_title(c, rng, face[3], min(by1 - 30, face[2] + mg[2] + 18), title,
                   _pick(rng, ("1:50", "1:75", "1/4\" = 1'-0\"")))


def _stair(c, L, U, V, tread):
    L.rect(0, 0, U, V)
    n = int(U // tread)
    for k in range(1, n + 1):
        L.line((k * tread, 0), (k * tread, V))
    L.line((tread * 0.5, V / 2), (U - tread * 0.6, V / 2))
    tip, base = L.p(U - tread * 0.1, V / 2), L.p(U - tread * 0.9, V / 2)
    _arrow(c, tip, (tip[0] - base[0], tip[1] - base[1]), tread * 0.8, STAIR)


def _drawing_title(c, rng, x, y, title, scale):
    r = rng.uniform(14, 20)
    _bubble(c, (x + r, y), r, str(int(rng.integers(1, 9))))
    ts = int(rng.uniform(18, 28))
    b = c.text((x + 2 * r + 12, y - 2), title, ts, anchor="ls", bold=rng.uniform() < 0.6)
    c.line([(b[0], b[3] + 4), (b[2], b[3] + 4)], TEXT, width=2)
    c.text((b[0], b[3] + 10), "SCALE " + scale, int(ts * 0.55), anchor="la")


# ------------------------------------------------------------------------- section / elevation
def _section(c, rng, s, box, st):
    u = rng.uniform
    bx0, by0, bx1, by1 = box
    elev = u() < 0.35
    bays = u(2.5, 5.0, int(rng.integers(2, 5)))
    avail = (bx1 - bx0 - 360) / s
    bays = bays[:max(1, int(np.searchsorted(np.cumsum(bays), avail, side="right")))]
    bays *= min(1.0, avail / bays.sum())
    fh, tw, ts = u(2.7, 3.3), u(0.25, 0.4) * s, u(0.2, 0.3) * s
    avail_h = (by1 - by0 - 220) / s - 0.9
    rh = min(u(1.5, 2.8), avail_h - 2.4)
    pitched = u() < 0.5 and rh > 1.2
    rh = rh if pitched else 0.9
    n = int(max(1, min(rng.integers(1, 4), (avail_h - rh) // fh)))
    fh = min(fh, max(2.4, (avail_h - rh) / n))
    X0 = bx0 + 200 + u(0, max(0.0, avail * s - bays.sum() * s))
    gxs = X0 + np.concatenate([[0], np.cumsum(bays)]) * s
    X1, G = gxs[-1], by1 - 110 - 0.9 * s
    lv = [G - 0.15 * s - k * fh * s for k in range(n + 1)]  # finished floor levels, top = roof
    # ground, earth and grid lines lie under everything else
    eb = (X0 - 1.2 * s, G, X1 + 1.2 * s, G + 0.7 * s)
    c.rect(eb, ANNO, width=0)
    _hatch(c, rng, eb, u(10, 16), "earth")
    c.line([(eb[0] - 0.5 * s, G), (eb[2] + 0.5 * s, G)], ANNO, width=3)
    top = lv[n] - rh * s - 40
    if u() < 0.6:
        br = u(13, 18)
        for k, x in enumerate(gxs):
            c.dashed((x, top + br), (x, G + 0.5 * s), ANNO)
            _bubble(c, (x, top), br, str(k + 1))
    if elev and u() < 0.4:
        b = (X0 + 3, lv[min(n, 1)] + 3, X1 - 3, G - 3)
        _hatch(c, rng, b, u(8, 14), _pick(rng, ("/", "grid")))
        c.l.rectangle(b, fill=WALL)
    # elements seen beyond the cut (or the facade itself)
    for k in range(n):
        for q in range(len(bays)):
            a, b = gxs[q] + tw, gxs[q + 1] - tw
            fl = lv[k] if elev else lv[k] - 0.0
            if u() < (0.85 if elev else 0.45) and b - a > 0.8 * s:
                w = min(u(0.8, 2.4) * s, b - a - 0.3 * s)
                if k == 0 and u() < 0.35:
                    _elev_door(c, rng, ((a + b - w * 0.6) / 2, fl - u(2.1, 2.4) * s, (a + b + w * 0.6) / 2, fl))
                else:
                    xm = u(a, b - w)
                    _elev_window(c, rng, (xm, fl - u(2.1, 2.4) * s, xm + w, fl - u(0.8, 1.0) * s))
    if not elev and u() < 0.7:  # a flight up to the half landing on each storey
        q, nr = int(rng.integers(len(bays))), int(round(fh / 0.35))
        rise, go, a = fh * s / 2 / nr, 0.27 * s, gxs[q] + tw / 2 + 0.1 * s
        if a + nr * go + 1.1 * s < gxs[q + 1] - tw / 2:
            for k in range(n):
                pts = [(a, lv[k])]
                for _ in range(nr):
                    pts += [(pts[-1][0], pts[-1][1] - rise), (pts[-1][0] + go, pts[-1][1] - rise)]
                xe, ye = pts[-1]
                c.l.rectangle((a, ye - 0.95 * s, xe + 1.0 * s, lv[k]), fill=STAIR)
                c.d.line(pts, fill=0, width=2)
                c.d.line([(a, lv[k]), (xe, ye + 0.2 * s)], fill=0)
                c.d.rectangle((xe, ye, xe + 1.0 * s, ye + 0.2 * s), outline=0, width=2)
                c.d.line([(a, lv[k] - 0.9 * s), (xe, ye - 0.9 * s), (xe + 1.0 * s, ye - 0.9 * s)], fill=0)
    # cut structure (section) or outline (elevation)
    if elev:
        for k in range(1, n):
            c.dashed((X0, lv[k]), (X1, lv[k]), ANNO, pattern=(8, 6))
        outline = [(X0, G), (X0, lv[n]), (X1, lv[n]), (X1, G)]
        c.d.line(outline, fill=0, width=3)
        c.l.line(outline, fill=WALL, width=12)
    else:
        rects = [(X0 - tw / 2, lv[k], X1 + tw / 2, lv[k] + ts) for k in range(n + 1)]
        for x in [X0, X1] + [g for g in gxs[1:-1] if u() < 0.5]:
            ext = x in (X0, X1)
            for k in range(n):
                lo, hi = lv[k + 1] + ts, lv[k]
                if ext and u() < 0.7:
                    w0, w1 = max(lv[k] - u(2.1, 2.4) * s, lo + 0.1 * s), lv[k] - u(0.8, 1.0) * s
                    rects += [(x - tw / 2, lo, x + tw / 2, w0), (x - tw / 2, w1, x + tw / 2, hi)]
                    wb = (x - tw / 2, w0, x + tw / 2, w1)
                    c.rect(wb, WINDOW, fill=255)
                    c.d.line([(x - tw * 0.1, w0), (x - tw * 0.1, w1)], fill=0)
                    c.d.line([(x + tw * 0.1, w0), (x + tw * 0.1, w1)], fill=0)
                elif not ext and k == 0 and u() < 0.5:
                    dh = min(2.1 * s, hi - lo - 0.1 * s)
                    rects.append((x - tw / 2, lo, x + tw / 2, hi - dh))
                    c.l.rectangle((x - tw / 2, hi - dh, x + tw / 2, hi), fill=DOOR)
                else:
                    rects.append((x - tw / 2, lo, x + tw / 2, hi))
            if ext:
                rects += [(x - tw / 2, lv[0] + ts, x + tw / 2, G + 0.45 * s),  # foundation wall, footing
                          (x - 0.45 * s, G + 0.45 * s, x + 0.45 * s, G + 0.7 * s)]
        if not pitched:
            rects += [(x - tw / 2, lv[n] - 0.8 * s, x + tw / 2, lv[n]) for x in (X0, X1)]
        style = st["ext"]
        for r in rects:
            c.d.rectangle(r, fill=0)
            c.l.rectangle(r, fill=WALL)
        if style != "solid":
            for r in rects:
                ir = (r[0] + 1, r[1] + 1, r[2] - 1, r[3] - 1)
                c.d.rectangle(ir, fill=st["gray"] if style == "gray" else 255)
                if style == "hatch":
                    _hatch(c, rng, ir, 7, "/")
    if pitched:
        e, mid, hh = 0.5 * s, (X0 + X1) / 2, rh * s
        poly = [(X0 - e, lv[n] + ts), (mid, lv[n] - hh), (X1 + e, lv[n] + ts),
                (X1 + e, lv[n] + 2 * ts), (mid, lv[n] - hh + ts * 1.2), (X0 - e, lv[n] + 2 * ts)]
        c.d.polygon(poly, fill=0 if st["ext"] == "solid" and not elev else 255, outline=0, width=2)
        c.l.polygon(poly, fill=WALL)
    # levels, dimensions, names, title
    for k, y in enumerate(lv):
        x = X0 - 40 - tw
        c.l.rectangle((x - 150, y - 34, x + 4, y + 2), fill=DIM)
        c.d.line([(x - 140, y), (x, y)], fill=0)
        _arrow(c, (x - 120, y), (0, 1), 12, DIM)
        h = (lv[0] - y) / s
        mark = _pick(rng, (f"+{h:.2f}", f"LEVEL {k}", f"EL. {h * 1000:.0f}"))
        c.text((x - 104, y - 4), mark, st["dim_txt"], cls=DIM, anchor="lb")
    _dim_chain(c, st, s, False, list(lv) + [G], X1 + tw + 60, X1 + tw / 2 + 10, 1)
    for k in range(n):
        for q in range(len(bays)):
            if u() < 0.35 and not elev:
                name = _pick(rng, tuple(_ROOMS[st["lang"]].values()))
                c.text(((gxs[q] + gxs[q + 1]) / 2, lv[k] - fh * s * 0.75), name, st["room_txt"] - 2)
    title = _pick(rng, ("NORTH ELEVATION", "SOUTH ELEVATION", "EAST ELEVATION") if elev
                  else ("SECTION A-A", "BUILDING SECTION", "COUPE AA", "SECCION 1"))
    _drawing_title(c, rng, X0 - 1.2 * s, by1 - 40, title, _pick(rng, ("1:50", "1:75", "1:100")))


def _elev_window(c, rng, b):
    x0, y0, x1, y1 = b
    if x1 - x0 < 30 or y1 - y0 < 30:
        return
    c.rect(b, WINDOW, width=2, fill=255)
    c.d.rectangle((x0 + 5, y0 + 5, x1 - 5, y1 - 5), outline=0)
    n = max(1, int((x1 - x0) // 70))
    for k in range(1, n):
        x = x0 + (x1 - x0) * k / n
        c.d.line([(x, y0 + 5), (x, y1 - 5)], fill=0, width=2)
    if rng.uniform() < 0.4:
        y = y0 + (y1 - y0) * 0.3
        c.d.line([(x0 + 5, y), (x1 - 5, y)], fill=0, width=2)
    if rng.uniform() < 0.3:  # opening sash marker
        c.dashed((x0 + 5, y1 - 5), ((x0 + x1) / 2, y0 + 5), WINDOW, pattern=(6, 4))
        c.dashed(((x0 + x1) / 2, y0 + 5), (x1 - 5, y1 - 5), WINDOW, pattern=(6, 4))


def _elev_door(c, rng, b):
    x0, y0, x1, y1 = b
    if x1 - x0 < 40 or y1 - y0 < 60:
        return
    c.rect(b, DOOR, width=2, fill=255)
    c.d.rectangle((x0 + 6, y0 + 6, x1 - 6, y1), outline=0)
    if rng.uniform() < 0.4:
        c.d.rectangle((x0 + 16, y0 + 18, x1 - 16, (y0 + y1) / 2), outline=0)
    hx = x1 - 16 if rng.uniform() < 0.5 else x0 + 16
    c.d.line([(hx, (y0 + y1) / 2 + 10), (hx, (y0 + y1) / 2 + 30)], fill=0, width=3)


# ------------------------------------------------------------------------------------ details
_MATERIALS = {  # name: (hatch, thickness range m, note)
    "plaster": ("dots", (0.012, 0.02), "PLASTER FINISH"), "board": (None, (0.0125, 0.025), "GYPSUM BOARD"),
    "block": ("x", (0.1, 0.2), "CONCRETE BLOCK"), "brick": ("/", (0.1, 0.11), "BRICK VENEER"),
    "concrete": ("concrete", (0.15, 0.25), "REINFORCED CONCRETE"),
    "insulation": ("zig", (0.05, 0.15), "RIGID INSULATION"),
    "cavity": (None, (0.03, 0.05), "AIR CAVITY"), "timber": ("wood", (0.04, 0.1), "TIMBER BATTEN"),
}


def _detail(c, rng, st, box):
    u = rng.uniform
    x0, y0, x1, y1 = box
    W, H = x1 - x0, y1 - y0
    mats = [_pick(rng, ("plaster", "board"))] + [_pick(rng, ("block", "concrete")), "insulation"]
    mats += [_pick(rng, ("cavity", "timber")), _pick(rng, ("brick", "block"))] if u() < 0.6 else []
    thick = [u(*_MATERIALS[m][1]) for m in mats]
    total, wpx = sum(thick), u(0.22, 0.36) * W
    sd = wpx / total  # the detail's own scale (px per metre), typically 1:5-1:10
    wx, wy0, wy1 = x0 + u(0.3, 0.42) * W, y0 + 50, y1 - 16  # interior (slab side) to the left
    found = u() < 0.35
    gl = wy0 + u(0.45, 0.65) * (wy1 - wy0)
    if found:
        eb = (x0, gl, x1, wy1)
        c.rect(eb, ANNO, width=0)
        _hatch(c, rng, eb, u(10, 16), "earth")
        c.line([(x0, gl), (x1, gl)], ANNO, width=2)
    edges = wx + np.concatenate([[0], np.cumsum(thick)]) * sd
    for m, a, b in zip(mats, edges[:-1], edges[1:]):
        r = (a, wy0, b, wy1 - (0.25 * sd if found else 0))
        c.rect(r, WALL, width=1 + (m == "board"), fill=255)
        if _MATERIALS[m][0]:
            _hatch(c, rng, (r[0] + 1, r[1] + 1, r[2] - 1, r[3] - 1), u(6, 12), _MATERIALS[m][0])
    if found:
        fb = (wx - 0.2 * sd, wy1 - 0.25 * sd, edges[-1] + 0.2 * sd, wy1)
        c.rect(fb, WALL, width=2, fill=255)
        _hatch(c, rng, fb, 9, "concrete")
    else:
        sy, sth = wy0 + u(0.3, 0.5) * (wy1 - wy0), min(u(0.18, 0.25) * sd, 0.2 * H)
        sb = (x0 + 14, sy, edges[2], sy + sth)  # the slab bears on the structural leaf
        c.rect(sb, WALL, width=2, fill=255)
        _hatch(c, rng, sb, 9, "concrete")
        c.rect((x0 + 14, sy - 0.05 * sd, wx, sy), WALL, fill=255)
        c.l.rectangle((x0 + 2, sy - 0.05 * sd - 10, x0 + 18, sy + sth + 10), fill=ANNO)
        zig = [(10, -0.05 * sd - 10), (10, sth * 0.4), (4, sth * 0.5), (16, sth * 0.6), (10, sth + 10)]
        c.d.line([(x0 + dx, sy + dy) for dx, dy in zig], fill=0)
        if u() < 0.5:  # a window or door frame below the slab, through the wall
            cls = WINDOW if u() < 0.7 else DOOR
            fb = (edges[0], sy + sth + 4, edges[-1], min(wy1 - 4, sy + sth + u(0.12, 0.2) * sd + 60))
            c.rect(fb, cls, fill=255, width=2)
            fx0, fy0, fx1, fy1 = fb
            for k in range(3):
                cx = fx0 + (fx1 - fx0) * (k + 1) / 4
                c.d.rectangle((cx - 6, fy0 + 6, cx + 6, fy0 + 20), outline=0)
            m = (fx0 + fx1) / 2
            c.d.line([(m - 4, fy0 + 24), (m - 4, fy1)], fill=0)
            c.d.line([(m + 4, fy0 + 24), (m + 4, fy1)], fill=0, width=1 + (cls == DOOR) * 4)
    for y in (wy0,) if found else (wy0, wy1):
        c.l.rectangle((wx - 4, y - 8, edges[-1] + 4, y + 8), fill=ANNO)
        xm = (wx + edges[-1]) / 2
        c.d.line([(wx - 4, y), (xm - 6, y), (xm - 2, y - 8), (xm + 2, y + 8), (xm + 6, y), (edges[-1] + 4, y)],
                 fill=0)
    _dim_chain(c, dict(st, units="mm"), sd, True, list(edges), wy0 - 24, wy0 - 10, -1)
    nx, ts = edges[-1] + u(60, 120), st["note_txt"]
    ylo = wy0 + 20
    yhi = max(ylo + 1, sy - 12 if not found else wy1 - 0.25 * sd - 10)
    js = rng.permutation(len(mats))[:5]
    for k, (j, ty) in enumerate(zip(js, np.sort(u(ylo, yhi, len(js))))):
        tx, txt = (edges[j] + edges[j + 1]) / 2, f"{thick[j] * 1000:.0f} MM {_MATERIALS[mats[j]][2]}"
        ny = y0 + 60 + k * (ts * 2.6)
        if nx + _font(ts).getlength(txt) < x1 and c.free((nx, ny - ts, nx + _font(ts).getlength(txt), ny + ts)):
            c.text((nx + 4, ny), txt, ts, anchor="lm")
            c.line([(nx, ny), (nx - 16, ny), (tx, ty)], ANNO)
            c.circle((tx, ty), 3, ANNO, fill=0)
    title = _pick(rng, ("WALL SECTION", "TYP. SILL DETAIL", "FOUNDATION DETAIL", "DETAIL 3", "EAVE DETAIL"))
    _drawing_title(c, rng, x0, y1 + 28, title, _pick(rng, ("1:5", "1:10", "1:20")))


# ----------------------------------------------------------------------------------- schedules
_COLUMNS = {
    "DOOR": ("MARK", "WIDTH", "HEIGHT", "TYPE", "MATERIAL", "FINISH", "FIRE RATING", "HARDWARE", "REMARKS"),
    "WINDOW": ("MARK", "WIDTH", "HEIGHT", "SILL", "TYPE", "FRAME", "GLAZING", "REMARKS"),
    "ROOM FINISH": ("NO.", "ROOM", "FLOOR", "BASE", "WALLS", "CEILING", "HEIGHT", "REMARKS"),
}
_CELL = {"WIDTH": ("800", "900", "1000", "1200", "1800"), "HEIGHT": ("2100", "2400", "1200", "1500", "2.70"),
         "SILL": ("900", "1000", "600"), "TYPE": tuple("ABCDEF"), "MATERIAL": ("WOOD", "HM", "ALUM", "GLASS"),
         "FINISH": ("PAINT", "STAIN", "PREFIN."), "FIRE RATING": ("-", "30 MIN", "60 MIN", "90 MIN"),
         "HARDWARE": ("SET 1", "SET 2", "SET 3"), "FRAME": ("ALUM", "PVC", "WOOD"), "GLAZING": ("DG", "TG", "LAM"),
         "FLOOR": ("TILE", "CARPET", "VINYL", "CONC"), "BASE": ("TILE", "WOOD", "VINYL", "-"),
         "WALLS": ("PAINT", "TILE", "GWB"), "CEILING": ("GWB", "ACT", "EXP")}


def _cell(rng, st, kind, name, i):
    if name in ("MARK", "NO."):
        return f"{kind[0]}{i + 1:02d}"
    if name == "ROOM":
        return _pick(rng, tuple(_ROOMS[st["lang"]].values()))
    if name == "REMARKS":
        return _sentence(rng, 1, 4) if rng.uniform() < 0.4 else ""
    return _pick(rng, _CELL[name])


def _schedule(c, rng, st, box, s):
    u = rng.uniform
    x0, y0, x1, y1 = box
    kind = _pick(rng, tuple(_COLUMNS))
    cols = _COLUMNS[kind][: int(rng.integers(5, len(_COLUMNS[kind]) + 1))]
    ts = int(u(12, 16))
    rh = ts * u(1.7, 2.2)
    t = c.text((x0, y0), f"{kind} SCHEDULE", ts + 8, anchor="la", bold=True)
    ty = t[3] + 14
    nrows = int(min(rng.integers(8, 28), (y1 - ty) // rh - 1 - (5 if kind != "ROOM FINISH" else 0)))
    rows = [cols] + [[_cell(rng, st, kind, name, i) for name in cols] for i in range(max(nrows, 2))]
    f = _font(ts)
    widths = [max(f.getlength(r[j]) for r in rows) + 16 for j in range(len(cols))]
    while sum(widths) > x1 - x0 and len(widths) > 3:
        widths.pop()
    xs = x0 + np.concatenate([[0], np.cumsum(widths)])
    for i, row in enumerate(rows):
        for j in range(len(widths)):
            if row[j]:
                c.text((xs[j] + 8, ty + (i + 0.5) * rh), row[j], ts, anchor="lm", bold=i == 0)
    yb = ty + len(rows) * rh
    vert = u() < 0.7
    for i in range(len(rows) + 1):
        c.line([(xs[0], ty + i * rh), (xs[-1], ty + i * rh)], ANNO, width=2 if i in (0, 1, len(rows)) else 1)
    for j, x in enumerate(xs):
        if vert or j in (0, len(xs) - 1):
            c.line([(x, ty), (x, yb)], ANNO, width=2 if j in (0, len(xs) - 1) else 1)
    # type elevations under the table
    if kind != "ROOM FINISH" and u() < 0.8:
        x, base = x0 + 40, yb + 90 + 2.4 * s
        while base < y1 - 30:
            w = u(0.8, 1.0) * s if kind == "DOOR" else u(0.6, 2.4) * s
            h = u(2.0, 2.4) * s if kind == "DOOR" else u(1.0, 1.6) * s
            if x + w > x1 - 20:
                break
            (_elev_door if kind == "DOOR" else _elev_window)(c, rng, (x, base - h, x + w, base))
            _bubble(c, (x + w / 2, base - h - 34), 15, _pick(rng, _CELL["TYPE"]))
            _dim_chain(c, st, s, True, [x, x + w], base + 30, base + 8, 1)
            x += w + u(0.6, 1.2) * s
            if u() < 0.1:
                break


# ------------------------------------------------------------------------------ sheet assembly
def _notes(c, rng, st, box):
    x0, y0, x1, y1 = box
    ts, f = st["note_txt"], _font(st["note_txt"])
    heading = _pick(rng, ("GENERAL NOTES", "NOTES", "KEY NOTES", "REMARQUES"))
    y = c.text((x0, y0), heading, ts + 4, anchor="la", bold=True)[3] + ts
    for k in range(1, 14):
        words, line, lines = f"{k}. {_sentence(rng, 4, 16)}".split(), "", []
        for w in words:
            if f.getlength(line + " " + w) > x1 - x0 - 10 and line:
                lines.append(line)
                line = "   " + w
            else:
                line = (line + " " + w).strip() if not line.startswith("   ") else line + " " + w
        for ln in lines + [line]:
            if y + ts * 1.4 > y1:
                return
            c.text((x0, y), ln, ts, anchor="la")
            y += ts * 1.35
        y += ts * 0.6


def _frame(c, rng, st):
    """Border and title block; returns the drawing area."""
    u, W, H = rng.uniform, c.w, c.h
    m = int(u(0.012, 0.025) * min(W, H))
    m2 = m + int(u(8, 16))
    c.rect((m, m, W - m, H - m), ANNO, solid=False)
    c.rect((m2, m2, W - m2, H - m2), ANNO, width=int(rng.integers(2, 4)), solid=False)
    if u() < 0.4:
        for k in range(1, 6):
            x = m2 + (W - 2 * m2) * (k - 0.5) / 5
            c.text((x, (m + m2) / 2), str(k), int((m2 - m) * 0.8), cls=ANNO)
            c.line([(m2 + (W - 2 * m2) * k / 5, m), (m2 + (W - 2 * m2) * k / 5, m2)], ANNO)
    if u() < 0.65:  # block in the bottom-right corner
        tb = (W - m2 - u(0.25, 0.38) * W, H - m2 - u(0.1, 0.16) * H, W - m2, H - m2)
        area = (m2 + 20, m2 + 20, W - m2 - 20, tb[1] - 20)
    else:  # strip along the right edge
        tb = (W - m2 - u(0.11, 0.15) * W, m2, W - m2, H - m2)
        area = (m2 + 20, m2 + 20, tb[0] - 20, H - m2 - 20)
    c.rect(tb, ANNO, width=2, solid=False)
    words = ("RESIDENCE", "HOUSING", "MUNTANYA 96", "VILLA", "OFFICE BLOCK", "SCHOOL", "ANNEX", "TERRASSA")
    date = f"20{int(rng.integers(10, 26))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    fields = [("PROJECT", " ".join(_pick(rng, words) for _ in range(2))),
              ("SHEET TITLE", _pick(rng, ("PLANS", "SECTIONS", "DETAILS", "SCHEDULES", "ELEVATIONS"))),
              ("SCALE", _pick(rng, ("1:50", "1:100", "AS SHOWN"))), ("DATE", date),
              ("DRAWN", _pick(rng, ("JD", "AM", "MR", "LC"))),
              ("SHEET", f"{_pick(rng, 'ASDE')}-{int(rng.integers(1, 6))}{int(rng.integers(0, 30)):02d}")]
    x0, y0, x1, y1 = tb
    horiz = (x1 - x0) > (y1 - y0)
    n = len(fields)
    for k, (cap, val) in enumerate(fields):
        if horiz:  # cells in two rows
            cols = (n + 1) // 2
            fx, fy = (x1 - x0) / cols, (y1 - y0) / 2
            cb = (x0 + fx * (k % cols), y0 + fy * (k // cols), x0 + fx * (k % cols + 1), y0 + fy * (k // cols + 1))
        else:  # cells stacked at the bottom of the strip, a logo box above
            ch = min(90, (y1 - y0) / (n + 2))
            cb = (x0, y1 - ch * (n - k), x1, y1 - ch * (n - k - 1))
        c.line([(cb[0], cb[1]), (cb[2], cb[1])], ANNO)
        c.line([(cb[0], cb[1]), (cb[0], cb[3])], ANNO)
        c.text((cb[0] + 5, cb[1] + 4), cap, 10, anchor="la")
        size = min((cb[3] - cb[1]) * (0.42 if cap == "SHEET" else 0.28), 36)
        while size > 9 and _font(size).getlength(val) > cb[2] - cb[0] - 10:
            size -= 2
        c.text(((cb[0] + cb[2]) / 2, (cb[1] + cb[3]) / 2 + 6), val, size, bold=cap in ("SHEET", "PROJECT"))
    if not horiz:
        c.circle(((x0 + x1) / 2, y0 + 80), min(40, (x1 - x0) / 3), ANNO)
        c.text(((x0 + x1) / 2, y0 + 80), "".join(_pick(rng, "ABCDMRST") for _ in range(2)), 24, bold=True, cls=ANNO)
    return area


def render_sheet(rng, sheet_type, *, px_per_m=DEFAULT_PX_PER_M, long_side=SHEET_LONG_SIDE, scan=0.5):
    """One synthetic sheet drawn with generator `rng`: (image uint8, label uint8, ink bool).
    `scan` is the probability of scan realism (tilt, faded ink, speckle, paper tone)."""
    u = rng.uniform
    L = int(u(*long_side))
    W, H = (L, int(L / 1.414)) if u() < 0.75 else (int(L / 1.414), L)
    c, st, s = _Canvas(W, H), _style(rng), u(*px_per_m)
    x0, y0, x1, y1 = _frame(c, rng, st)
    if sheet_type == "plan":
        if u() < 0.45 and x1 - x0 > 1000:  # notes column
            nw = u(0.2, 0.28) * (x1 - x0)
            left = u() < 0.3
            _notes(c, rng, st, (x0, y0, x0 + nw, y1) if left else (x1 - nw + 20, y0, x1, y1))
            x0, x1 = (x0 + nw + 20, x1) if left else (x0, x1 - nw)
        _plan(c, rng, s, (x0, y0, x1, y1), st)
    elif sheet_type == "section":  # one drawing, or two stacked / side by side when there is room
        if y1 - y0 > 1250 or (x1 - x0 > 1500 and u() < 0.5):
            v = y1 - y0 > 1250
            m = (y0 + y1) / 2 if v else (x0 + x1) / 2
            _section(c, rng, s, (x0, y0, x1, m) if v else (x0, y0, m, y1), st)
            _section(c, rng, s, (x0, m, x1, y1) if v else (m, y0, x1, y1), st)
        else:
            _section(c, rng, s, (x0, y0, x1, y1), st)
    elif sheet_type == "detail":
        nx = int(rng.integers(1, 3 if x1 - x0 < 1300 else 4))
        ny = int(rng.integers(1, 3 if y1 - y0 > 900 else 2))
        cw, chh = (x1 - x0) / nx, (y1 - y0) / ny
        for i in range(nx):
            for j in range(ny):
                if u() < 0.85 or (i, j) == (0, 0):
                    b = (x0 + i * cw + 10, y0 + j * chh + 10, x0 + (i + 1) * cw - 10, y0 + (j + 1) * chh - 60)
                    if u() < 0.5:
                        c.rect((b[0] - 6, b[1] - 6, b[2] + 6, b[3] + 54), ANNO, solid=False)
                    _detail(c, rng, st, b)
    else:
        split = x0 + u(0.45, 0.7) * (x1 - x0) if x1 - x0 > 1100 else x1
        _schedule(c, rng, st, (x0, y0, split - 30, y1), s)
        if split < x1 and u() < 0.5:
            _schedule(c, rng, st, (split, y0, x1, y1), s)
        elif split < x1:
            _notes(c, rng, st, (split, y0, x1, y1))
    img, lab = c.im, c.lb
    ink = np.asarray(img) < INK_THRESHOLD
    if u() < scan:
        img, lab, ink = _scan(rng, img, lab, ink)
    return np.array(img), np.array(lab), np.asarray(ink)


def _scan(rng, img, lab, ink):
    u = rng.uniform
    if u() < 0.6:
        a = u(-0.6, 0.6)
        img = img.rotate(a, Image.BILINEAR, fillcolor=255)
        lab = lab.rotate(a, Image.NEAREST, fillcolor=BG)
        ink = np.asarray(Image.fromarray(ink).rotate(a, Image.NEAREST))
    if u() < 0.5:  # uneven toner: ink lightened by a smooth random field
        field = Image.fromarray((u(0.45, 1.0, (6, 8)) * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
        a = np.asarray(img, np.float32)
        img = Image.fromarray((255 - (255 - a) * np.asarray(field, np.float32) / 255).astype(np.uint8))
    if u() < 0.6:
        d = ImageDraw.Draw(img)
        k = int(rng.integers(20, 200))
        for x, y, r, g in zip(u(0, img.width, k), u(0, img.height, k), u(0.3, 1.3, k), u(40, 170, k)):
            d.ellipse((x - r, y - r, x + r, y + r), fill=int(g))
    if u() < 0.6:
        lo, hi = u(0, 50), u(225, 252)
        img = img.point([int(lo + (hi - lo) * v / 255) for v in range(256)])
    return img, lab, ink


class SyntheticSheets:
    """Infinite stream of labeled synthetic sheets; sheet i is a pure function of
    (seed, split, i). Splits are separate seed namespaces ("train", "probe_train", "probe_val")."""

    def __init__(self, seed=0, split="train", *, px_per_m=DEFAULT_PX_PER_M, long_side=SHEET_LONG_SIDE,
                 scan=0.5, types=SHEET_TYPES, weights=None, cache_size=2):
        self.seed, self.split, self.px_per_m, self.long_side, self.scan = int(seed), split, px_per_m, long_side, scan
        self.types = tuple(types)
        # plans carry most element classes, so they get twice the share of each other type
        w = np.asarray(weights if weights is not None else [2.0 if t == "plan" else 1.0 for t in self.types], float)
        self.weights = w / w.sum()
        self._ns, self._cache, self.cache_size = zlib.crc32(split.encode()), OrderedDict(), cache_size

    def __getstate__(self):  # DataLoader workers start with an empty cache of their own
        return dict(self.__dict__, _cache=OrderedDict())

    def get_sheet(self, i):
        i = int(i)
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        rng = np.random.default_rng([self.seed, self._ns, i])
        t = self.types[int(rng.choice(len(self.types), p=self.weights))]
        img, lab, ink = render_sheet(rng, t, px_per_m=self.px_per_m, long_side=self.long_side, scan=self.scan)
        sheet = dict(image=img, label=lab, ink=ink, sheet_type=SHEET_TYPES.index(t),
                     name=f"synthetic/{self.split}/{self.seed}/{i}")
        self._cache[i] = sheet
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return sheet


# ------------------------------------------------------------------------------- real sheets
_WARNED = set()


def _warn_once(path, err):
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(f"skipping unreadable sheet {path}: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=3)


def _pdfium():
    try:
        import pypdfium2
    except ImportError as e:
        raise ImportError("reading PDF sheets needs pypdfium2: pip install pypdfium2") from e
    return pypdfium2


def to_grayscale(im):
    """Any PIL image as black-on-white uint8 (H, W): alpha composited on white, 16-bit and
    float data scaled by their range, negatives (mostly dark sheets) inverted."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        hi = float(a.max(initial=0))  # paper is the brightest thing on a sheet: it tells the range
        if hi <= 1.0:
            a = a * 255
        elif hi > 65535 or a.min(initial=0) < 0:
            a = (a - a.min()) * 255 / max(np.ptp(a), 1e-9)
        elif hi > 255:
            a = a / 257
        arr = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    else:
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        if im.mode in ("RGBA", "LA", "RGBa", "La"):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        arr = np.array(im.convert("L"))
    if np.median(arr[::8, ::8]) < 128:
        arr = 255 - arr
    return arr


def _ink_mask(img):
    # Paper tone varies between scans, and downsampled thin lines are light gray: ink is whatever
    # is clearly darker than this sheet's own paper (the median, since sheets are mostly paper).
    return img < int(np.median(img[::8, ::8])) - 48


def _count_pages(path):
    if path.suffix.lower() == ".pdf":
        doc = _pdfium().PdfDocument(str(path))
        try:
            return len(doc)
        finally:
            doc.close()
    with Image.open(path) as im:
        if im.width * im.height > MAX_SHEET_PIXELS:
            raise ValueError(f"{im.width}x{im.height} px exceeds MAX_SHEET_PIXELS={MAX_SHEET_PIXELS}")
        return getattr(im, "n_frames", 1)


def load_sheet_image(path, page=0, dpi=150):
    """One page of an image or PDF file as black-on-white uint8 (H, W), EXIF orientation applied;
    PDF pages are rasterised at `dpi`."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        doc = _pdfium().PdfDocument(str(path))
        try:
            pg = doc[page]
            w, h = pg.get_size()
            if w * h * (dpi / 72) ** 2 > MAX_SHEET_PIXELS:
                raise ValueError(f"page {page} at {dpi} dpi exceeds MAX_SHEET_PIXELS")
            return to_grayscale(pg.render(scale=dpi / 72, grayscale=True).to_pil())
        finally:
            doc.close()
    with Image.open(path) as im:
        im.seek(page)
        return to_grayscale(ImageOps.exif_transpose(im))


class FolderSheets:
    """Sheets from a folder tree of PNG/JPEG/TIFF/BMP/WebP/PDF files. Pages are enumerated at start
    from file headers (PDF page counts need pypdfium2), so every page of a multi-page TIFF or PDF is
    a sheet and unreadable files are skipped before training starts. get_sheet(k) picks a page
    uniformly (over pages, not files) with rng(seed, split, k); a page that fails to decode later
    is skipped with one warning and the next page is used instead. Decoded sheets and their ink
    masks are kept in a small per-process LRU cache (cache_size sheets per DataLoader worker)."""

    def __init__(self, root, *, seed=0, split="train", dpi=150, cache_size=4):
        self.root, self.seed, self.dpi, self.cache_size = Path(root), int(seed), dpi, cache_size
        self._ns, self._cache, self._bad = zlib.crc32(split.encode()), OrderedDict(), set()
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in SHEET_EXTENSIONS)
        self.pages = []
        for f in files:
            try:
                n = _count_pages(f)
            except ImportError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
                _warn_once(f, e)
                continue
            self.pages += [(f, p, n) for p in range(n)]
        if not self.pages:
            raise FileNotFoundError(f"no readable sheet in {self.root} (searched recursively; accepted "
                                    f"extensions: {', '.join(SHEET_EXTENSIONS)})")

    def __len__(self):
        return len(self.pages)

    def __getstate__(self):
        return dict(self.__dict__, _cache=OrderedDict())

    def get_sheet(self, k):
        j = int(np.random.default_rng([self.seed, self._ns, int(k)]).integers(len(self.pages)))
        for step in range(len(self.pages)):
            f, p, n = self.pages[(j + step) % len(self.pages)]
            if (f, p) in self._bad:
                continue
            if (f, p) in self._cache:
                self._cache.move_to_end((f, p))
                return self._cache[(f, p)]
            try:
                img = load_sheet_image(f, p, self.dpi)
            except ImportError:
                raise
            except Exception as e:  # noqa: BLE001
                _warn_once(f, e)
                self._bad.add((f, p))
                continue
            name = str(f.relative_to(self.root)) + (f"#{p + 1}" if n > 1 else "")
            sheet = dict(image=img, label=None, ink=_ink_mask(img), sheet_type=-1, name=name)
            self._cache[(f, p)] = sheet
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return sheet
        raise RuntimeError(f"no readable sheet left in {self.root}")


def open_sheets(data, *, seed, split="train", dpi=150, **kw):
    """The sheet source for a --data argument: "synthetic" or a folder."""
    if data == "synthetic":
        return SyntheticSheets(seed=seed, split=split, **kw)
    return FolderSheets(data, seed=seed, split=split, dpi=dpi, **kw)


# -------------------------------------------------------------------------------------- views
# Sheets are monochrome line art with meaningful orientation: colour jitter does nothing, blur
# erases one-pixel lines, and a horizontal flip mirrors text, title blocks and dimension reading
# direction. Views therefore use crops at native resolution with mild scale jitter, optional
# line-weight jitter (thicken/thin strokes), contrast (faded ink, tinted paper) and scan noise.
def _region(a, x0, y0, side, fill):
    h, w = a.shape
    if 0 <= x0 and 0 <= y0 and x0 + side <= w and y0 + side <= h:
        return a[y0:y0 + side, x0:x0 + side]
    out = np.full((side, side), fill, a.dtype)
    xs, ys, xe, ye = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if xe > xs and ye > ys:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = a[ys:ye, xs:xe]
    return out


def _resize(a, n, resample):
    if a.shape[0] == n:
        return np.array(a)
    return np.asarray(Image.fromarray(a).resize((n, n), resample))


def cut_region(sheet, rng, size, scale=(1.0, 1.0), *, min_ink=MIN_INK, max_tries=20):
    """Choose a square region of side round(size * f), f log-uniform in `scale`, at native
    resolution; regions with ink fraction below min_ink are redrawn up to max_tries times, then
    the inkiest candidate is kept. Parts outside the sheet count as paper. Returns (x0, y0, side)."""
    img, ink = sheet["image"], sheet.get("ink")
    h, w = img.shape
    lo, hi = scale
    side = max(1, int(round(size * (lo if lo == hi else math.exp(rng.uniform(math.log(lo), math.log(hi)))))))
    best = (-1.0, 0, 0)
    for _ in range(max(1, max_tries) if min_ink > 0 else 1):
        x0 = int(rng.integers(0, w - side + 1)) if w >= side else -int(rng.integers(0, side - w + 1))
        y0 = int(rng.integers(0, h - side + 1)) if h >= side else -int(rng.integers(0, side - h + 1))
        if min_ink <= 0:
            return x0, y0, side
        r = _region(ink, x0, y0, side, False) if ink is not None else _region(img, x0, y0, side, 255) < INK_THRESHOLD
        frac = np.count_nonzero(r) / (side * side)
        if frac > best[0]:
            best = (frac, x0, y0)
        if frac >= min_ink:
            break
    return best[1], best[2], side


def _photometric(a, rng, line_weight, contrast, noise):
    if line_weight > 0 and rng.uniform() < line_weight:
        im = Image.fromarray(a)
        if rng.uniform() < 0.5:
            a = np.asarray(im.filter(ImageFilter.MinFilter(3)))  # thicker strokes
        else:  # thinner strokes: half-way to erosion, so 1 px lines fade instead of vanishing
            a = ((a.astype(np.uint16) + np.asarray(im.filter(ImageFilter.MaxFilter(3)))) // 2).astype(np.uint8)
    x = torch.from_numpy(np.array(a, np.float32) / 255.0)
    if contrast > 0:
        ink, paper = rng.uniform(0, contrast), rng.uniform(1 - contrast / 2, 1)
        x = ink + (paper - ink) * x
    if noise > 0:
        x = x + torch.from_numpy(rng.normal(0, rng.uniform(0, noise), x.shape).astype(np.float32))
    return x.clamp_(0, 1).unsqueeze(0)


def random_crop(sheet, rng, size, scale=(1.0, 1.0), *, min_ink=MIN_INK, max_tries=20, hires=False,
                line_weight=0.0, contrast=0.0, noise=0.0):
    """One view: image (1, size, size) float in [0, 1] (1 = paper), label (size, size) int64 when
    the sheet has labels (resized NEAREST, so it stays aligned with the image), box (x0, y0, side)
    of the sheet region, and with hires=True image_hr: the same region at 2 x size without
    photometric jitter (a high-resolution Gram teacher's input)."""
    x0, y0, side = cut_region(sheet, rng, size, scale, min_ink=min_ink, max_tries=max_tries)
    reg = _region(sheet["image"], x0, y0, side, 255)
    out = dict(image=_photometric(_resize(reg, size, Image.BILINEAR), rng, line_weight, contrast, noise),
               box=torch.tensor([x0, y0, side]))
    if sheet.get("label") is not None:
        lab = _resize(_region(sheet["label"], x0, y0, side, BG), size, Image.NEAREST)
        out["label"] = torch.from_numpy(lab.astype(np.int64))
    if hires:
        hr = _resize(reg, 2 * size, Image.BILINEAR)
        out["image_hr"] = torch.from_numpy(hr.astype(np.float32) / 255.0).unsqueeze(0)
    return out


def multi_crop(sheet, rng, *, n_global=2, global_size=224, global_scale=(1.0, 2.0), n_local=8, local_size=96,
               local_scale=(0.5, 1.5), hires=False, **jitter):
    """Multi-crop views (DINO family): independent ink-aware crops of one sheet. global (n_global,
    1, G, G), local (n_local, 1, L, L), global_label when labeled, global_hr (n_global, 1, 2G, 2G)
    when hires. Scales are side factors relative to native pixels, not area fractions."""
    g = [random_crop(sheet, rng, global_size, global_scale, hires=hires, **jitter) for _ in range(n_global)]
    out = {"global": torch.stack([v["image"] for v in g]),
           "local": torch.stack([random_crop(sheet, rng, local_size, local_scale, **jitter)["image"]
                                 for _ in range(n_local)])}
    if "label" in g[0]:
        out["global_label"] = torch.stack([v["label"] for v in g])
    if hires:
        out["global_hr"] = torch.stack([v["image_hr"] for v in g])
    return out


# ----------------------------------------------------------------------- datasets and loading
class TileDataset(torch.utils.data.Dataset):
    """Map-style dataset of views: item i = view(source.get_sheet(i // tiles_per_sheet),
    rng(seed, i)), plus sheet_type and index. Consecutive indices share a sheet, so a batch of
    consecutive indices renders/decodes few sheets (each worker's source caches them)."""

    def __init__(self, source, view=None, *, seed=0, tiles_per_sheet=16, length=None):
        self.source, self.seed, self.tiles_per_sheet = source, int(seed), int(tiles_per_sheet)
        self.view = view if view is not None else _default_view
        self.length = int(length) if length is not None else 2 ** 62

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        i = int(i)
        sheet = self.source.get_sheet(i // self.tiles_per_sheet)
        out = self.view(sheet, np.random.default_rng([self.seed, i]))
        out["sheet_type"], out["index"] = sheet["sheet_type"], i
        return out


def _default_view(sheet, rng):
    return random_crop(sheet, rng, 224)


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of global indices for one rank. Index layout: training step k consumes the
    global indices [start + k*G, start + (k+1)*G) with G = world_size * block (block = the
    per-rank batch in make_loader); rank r takes the block at offset r*block, so its batch is
    contiguous (few sheets per batch). block=1 interleaves ranks: start+rank, start+rank+world, ...
    Either way the ranks of a step together take exactly the indices one rank with batch G would,
    and resuming after `step` optimizer steps is start = step * G."""

    def __init__(self, start=0, rank=0, world_size=1, block=1):
        if not (0 <= rank < world_size and block >= 1):
            raise ValueError(f"need 0 <= rank < world_size and block >= 1, got {rank}, {world_size}, {block}")
        self.start, self.rank, self.world_size, self.block = int(start), rank, world_size, int(block)

    def __iter__(self):
        base = self.start + self.rank * self.block
        while True:
            yield from range(base, base + self.block)
            base += self.world_size * self.block


def _worker_init(_):
    torch.set_num_threads(1)  # workers render/decode; intra-op threads would only oversubscribe
    # Ctrl-C and schedulers signal the whole process group: a worker killed by it would crash the
    # main process before Run could write its checkpoint. Workers ignore them; the main process
    # stops cleanly and shuts them down (they also exit when the main process is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, *, start=0, rank=0, world_size=1, num_workers=2, seed=0):
    """Infinite DataLoader over a TileDataset for one rank; resume with start = step * batch_size *
    world_size. Items are deterministic in (dataset seed, index), so worker count and timing do
    not change the data; `seed` only seeds torch's worker RNG for views that use torch randomness."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers,
        sampler=InfiniteSampler(start, rank, world_size, block=batch_size),
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if num_workers > 0 else None)


# ---------------------------------------------------------------------------- labeled sheets
class LabeledSheets:
    """Lazy list of (name, image uint8 HxW, mask uint8 HxW); mask class ids checked on access."""

    def __init__(self, pairs, n_classes):
        self.pairs, self.n_classes = pairs, n_classes

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        name, ip, mp = self.pairs[k]
        image = load_sheet_image(ip)
        with Image.open(mp) as m:
            if m.mode not in ("L", "P", "1", "I", "I;16"):
                raise ValueError(f"mask {mp} has mode {m.mode}; expected single-channel class ids")
            mask = np.asarray(m)
        bad = (mask >= self.n_classes) & (mask != IGNORE)
        if bad.any():
            raise ValueError(f"mask {mp} has class id {int(mask[bad].max())} outside "
                             f"0..{self.n_classes - 1} (255 = ignore)")
        if mask.shape != image.shape:
            raise ValueError(f"mask {mp} is {mask.shape[::-1]} but image {ip} is {image.shape[::-1]} "
                             "after EXIF orientation")
        return name, image, mask.astype(np.uint8)

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def _labeled_pairs(d):
    if not (d / "images").is_dir():
        raise ValueError(f"labeled folder {d} has no images/ subfolder")
    pairs = []
    exts = tuple(e for e in SHEET_EXTENSIONS if e != ".pdf")
    for ip in sorted(p for p in (d / "images").iterdir() if p.suffix.lower() in exts):
        mp = d / "masks" / (ip.stem + ".png")
        if not mp.is_file():
            raise ValueError(f"image {ip} has no mask {mp}")
        with Image.open(ip) as a, Image.open(mp) as b:
            sa = ImageOps.exif_transpose(a).size
            if sa != b.size:
                raise ValueError(f"mask {mp} is {b.size[0]}x{b.size[1]} but image {ip} is {sa[0]}x{sa[1]}")
        pairs.append((ip.stem, ip, mp))
    return pairs


def load_labeled_folder(root, val_fraction=0.25):
    """Read DIR/classes.txt and DIR/images/NAME.* + DIR/masks/NAME.png (uint8 class id, 255 =
    ignore), or DIR/train/... and DIR/val/... with the same layout. Without those subfolders, a
    name goes to val when crc32(name) falls in the lowest val_fraction of its range (stable across
    machines and file additions). Returns (class_names, {"train": items, "val": items})."""
    root = Path(root)
    if not (root / "classes.txt").is_file():
        raise ValueError(f"labeled folder {root} has no classes.txt (one class name per line)")
    names = [s.strip() for s in (root / "classes.txt").read_text().splitlines() if s.strip()]
    if (root / "train").is_dir() or (root / "val").is_dir():
        return names, {sp: LabeledSheets(_labeled_pairs(root / sp) if (root / sp).is_dir() else [], len(names))
                       for sp in ("train", "val")}
    pairs = _labeled_pairs(root)
    is_val = [zlib.crc32(n.encode()) < val_fraction * 2 ** 32 for n, _, _ in pairs]
    return names, {"train": LabeledSheets([p for p, v in zip(pairs, is_val) if not v], len(names)),
                   "val": LabeledSheets([p for p, v in zip(pairs, is_val) if v], len(names))}


def synthetic_probe_set(split, n, tile=224, seed=0, tiles_per_sheet=8):
    """Held-out labeled tiles for the frozen probe: list of (image uint8, mask uint8, sheet_type),
    ink-bearing tiles cut at the native drawing scale from the "probe_<split>" namespace, which
    never overlaps the "train" stream."""
    src = SyntheticSheets(seed=seed, split=split if split.startswith("probe_") else f"probe_{split}", cache_size=1)
    out, k = [], 0
    while len(out) < n:
        sh = src.get_sheet(k)
        rng = np.random.default_rng([seed, k])
        for _ in range(min(tiles_per_sheet, n - len(out))):
            x0, y0, side = cut_region(sh, rng, tile)
            img, lab = _region(sh["image"], x0, y0, side, 255), _region(sh["label"], x0, y0, side, BG)
            out.append((np.array(img), np.array(lab), sh["sheet_type"]))
        k += 1
    return out
