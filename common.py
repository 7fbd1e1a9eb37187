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
  8. Sheet data: the data contract (classes, sheet types, ink), real corpus loader, views,
     datasets and loaders. The synthetic sheet generator lives in sheetgen.py, imported only
     when `--data synthetic` asks for it; labeled probe folders are read by eval_probe.py.
"""
from __future__ import annotations

import atexit
import dataclasses
import inspect
import io
import json
import math
import multiprocessing.util  # its exit handler must be registered before _kill_workers_at_exit
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
from PIL import Image, ImageFilter, ImageOps

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
    "vit_test": (64, 2, 2),  # smoke tests and dry runs only: compiles in seconds
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
    gray = gray.float()  # per-channel constants as Python floats: no host-to-device copy (a sync) per step
    return torch.cat([(gray - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dim=1)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), row-major patches, pixels (py, px, c) inside."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


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


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """safetensors.save_file, atomic (tmp + rename), with the mode of any other new file (0644
    under the usual umask; safetensors itself writes 0600)."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_backbone(model: ViT, path: str | Path, **meta: Any):
    """Write a ViT as safetensors with its architecture in the metadata (atomic)."""
    sd = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(sd, path, metadata={"arch": json.dumps(model.arch), **{k: str(v) for k, v in meta.items()}})


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


_AMP = {"mode": "auto"}


def set_amp(mode: str):
    """auto: bf16 autocast on CUDA, fp32 on CPU; bf16: bf16 autocast on any device (CPU too, to
    test the GPU's code path); off: fp32 everywhere. Run sets it from --amp."""
    if mode not in ("auto", "bf16", "off"):
        raise SystemExit(f"--amp must be auto, bf16 or off, got {mode!r}")
    _AMP["mode"] = mode


def autocast(device: torch.device):
    """bf16 autocast (fp16 is a known NaN source for MAE/DINO) as set by set_amp; the loss
    and every softmax over prototypes are computed in fp32 by the recipes."""
    mode = _AMP["mode"]
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
    data: str = "synthetic"  # "synthetic" (the generator), a folder or file of sheets (PNG/JPEG/TIFF/BMP/WebP/PDF), or a mix: synthetic@3+DIR@1
    out_dir: str = ""  # run directory
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
    amp: str = "auto"  # mixed precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 (any device) | off
    keep_ckpts: int = 1  # newest checkpoints kept in out_dir/checkpoint


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


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "(empty)"  # as the flag takes it
    return str(v) if v != "" else "''"


def _flag_help(name: str, text: str, default, presets: dict[str, dict], recipe: str) -> str:
    """--help of one field: its comment and the value a run gets: each preset's where a preset sets it."""
    if name == "out_dir":
        return f"{text} (default runs/{recipe})"
    per = {p: vals.get(name, default) for p, vals in presets.items()}
    if any(v != default for v in per.values()):
        return f"{text} (by preset: " + ", ".join(f"{p} {_show(v)}" for p, v in per.items()) + ")"
    if default in ("", ()) and "default" in text:  # the comment says what empty means
        return text
    return f"{text} (default {_show(default)})"


_POSITIVE = ("steps", "batch_size", "log_every", "ckpt_every", "dpi", "keep_ckpts")
_NON_NEGATIVE = re.compile(r"(^|_)b?lr(_|$)|weight_decay|_steps$|_every$|^num_workers$")  # learning rates, ...
_RATIO = re.compile(r"ratio$")  # in [0, 1), both ends of a range
_SHARE = re.compile(r"_fraction$|_probability$")  # in [0, 1]


def config_problems(cfg) -> list[str]:
    """Values no run can use, one line each naming the flag: the shared fields by name, a recipe's
    own by the naming rules above; non-finite numbers; an unknown --arch; unreadable --data."""
    problems = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        nums = [x for x in (v if isinstance(v, (list, tuple)) else (v,))
                if isinstance(x, (int, float)) and not isinstance(x, bool)]
        flag = f"--{f.name} {_show(v)}"
        if not nums:
            continue
        if not all(math.isfinite(x) for x in nums):
            problems.append(f"{flag}: must be a finite number")
        elif f.name in _POSITIVE and min(nums) <= 0:
            problems.append(f"{flag}: must be > 0")
        elif _NON_NEGATIVE.search(f.name) and min(nums) < 0:
            problems.append(f"{flag}: must be >= 0")
        elif _RATIO.search(f.name) and not all(0 <= x < 1 for x in nums):
            problems.append(f"{flag}: must be in [0, 1)")
        elif _SHARE.search(f.name) and not all(0 <= x <= 1 for x in nums):
            problems.append(f"{flag}: must be in [0, 1]")
    if getattr(cfg, "arch", None) is not None and cfg.arch not in ARCHS:
        problems.append(f"--arch {cfg.arch}: unknown; choose from {', '.join(ARCHS)}")
    if getattr(cfg, "data", None) is not None:
        problems += [p for p in [check_data(cfg.data)] if p]
    return problems


def check_data(data: str) -> str | None:
    """Why --data cannot be trained on, in one line naming it (None: it can): "synthetic", one sheet
    file, or a folder holding at least one (searched recursively)."""
    mix = split_mix(data)
    if mix:
        for name, w in mix:
            if not (w > 0 and math.isfinite(w)):
                return f"--data {data}: the weight of {name!r} must be a positive number (SOURCE@WEIGHT)"
            problem = check_data(name) if name else f"--data {data}: an empty source between '+' signs"
            if problem:
                return problem
        return None
    if data == "synthetic":
        return None
    p, accepted = Path(data), ", ".join(SHEET_EXTENSIONS)
    if not p.exists():
        return f"--data {data}: no such file or folder (pass a folder of sheets, or synthetic)"
    if p.is_file():
        ok = p.suffix.lower() in SHEET_EXTENSIONS
        return None if ok else f"--data {data}: not a sheet file (accepted: {accepted})"
    if not any(q.suffix.lower() in SHEET_EXTENSIONS and q.is_file() for q in p.rglob("*")):
        return f"--data {data}: no sheet files in this folder (searched recursively; accepted: {accepted})"
    return None


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
        h = _flag_help(f.name, helps.get(f.name, ""), default, presets, recipe).replace("%", "%%")  # argparse's %
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, help=h)
        elif kind in (list, tuple):
            h += "" if "comma-separated" in h else " (comma-separated)"
            parser.add_argument(f"--{f.name}", type=str, help=h)
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
    cfg = cls(**values)
    problems = config_problems(cfg)
    if problems:  # one line each, no traceback, before anything is created
        raise SystemExit("\n".join(f"{parser.prog}: error: {p}" for p in problems))
    return cfg


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
        save_safetensors(tensors, tmp / "weights.safetensors", metadata=meta)
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


def drop_metrics_after(path: Path, step: int):
    """On resume, drop the metrics.jsonl lines a stopped run logged after its last checkpoint (and
    a line cut off by a crash): the resumed run logs those steps again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


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


def duration(seconds: float) -> str:
    """4s, 12m05s, 3h07m."""
    s = max(0, round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


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
        set_amp(cfg.amp)
        seed_everything(cfg.seed + 1000 * self.dist.rank)
        if cfg.batch_size % self.dist.world_size:
            raise SystemExit(f"--batch_size {cfg.batch_size} is not divisible by {self.dist.world_size} processes")
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
            if self.dist.is_main:
                drop_metrics_after(self.out_dir / "metrics.jsonl", self.start_step)
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
            save_checkpoint(self.out_dir, done, models, optimizers, extra, self.cfg, keep=self.cfg.keep_ckpts)

    def log(self, done: int, metrics: dict[str, torch.Tensor]):
        keys = list(metrics)  # one collective and one device-to-host copy for all metrics
        stacked = torch.stack([metrics[k].to(self.device).reshape(()) for k in keys]) if keys else None
        vals = dict(zip(keys, all_reduce_mean(stacked).tolist())) if keys else {}
        dt = time.perf_counter() - self._t0
        ms = 1000 * dt / max(self._count, 1)
        vals.update(step=done, ms_per_step=ms, img_per_s=self.cfg.batch_size * self._count / dt,
                    data_ms_per_step=1000 * DataWait.take() / max(self._count, 1),
                    peak_mem_gb=peak_memory_gb(self.device), time=time.time())
        self._sums, self._count, self._t0 = {}, 0, time.perf_counter()
        if not self.dist.is_main:
            return
        line = f"step {done}/{self.cfg.steps}"
        for k, v in vals.items():
            if k not in ("step", "time"):
                line += f" | {k} {v:.4g}"
        line += f" | eta {duration(ms * (self.cfg.steps - done) / 1000)}"  # at the last interval's pace
        bar = self._progress()
        if bar is not None and not bar.disable:
            bar.write(line)
        else:  # a log file: each line as it comes
            print(line, flush=True)
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
# Construction-sheet data: the contract every sheet source follows, a real-corpus tile loader,
# crop views for line art, deterministic resumable sampling, and labeled probe sets. Synthetic
# drawings with dense labels come from sheetgen.py (open_sheets("synthetic") imports it lazily).
#
# Conventions
# - A sheet is a dict: image (uint8 HxW, 255 = paper, black ink), label (uint8 HxW class ids
#   or None), ink (bool HxW or None), sheet_type (index into SHEET_TYPES, -1 if unknown), name.
# - Model-side tensors are grayscale float (1, H, W) in [0, 1], 1 = paper; the model converts to
#   3 channels and ImageNet normalisation itself. Labels are int64 (H, W), 255 = ignore.
# - Item i of a TileDataset depends only on (seed, i); see InfiniteSampler for the index layout.

SHEET_TYPES = ("plan", "section", "detail", "schedule")
CLASSES = ("background", "wall", "door", "window", "stair", "fixture", "dimension", "text", "annotation")
# Labels are footprints, not ink (what each class covers: sheetgen.py); later drawing overwrites.
BG, WALL, DOOR, WINDOW, STAIR, FIXTURE, DIM, TEXT, ANNO = range(len(CLASSES))
IGNORE = 255
# RGB of each class in every picture of labels (contact sheet, probe examples); IGNORE is light gray.
PALETTE = ((255, 255, 255), (200, 40, 40), (40, 160, 60), (40, 110, 230), (240, 150, 20),
           (150, 70, 200), (20, 180, 180), (230, 200, 0), (140, 140, 140))
IGNORE_COLOUR = (205, 205, 205)

INK_THRESHOLD = 192  # gray poche (110-170) counts as ink, scanner paper tone (>= 230) does not
MIN_INK = 0.02
SHEET_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".pdf")
# A0 at 600 dpi is 19866 x 28087 = 558 Mpx; larger files are refused (one decoded grayscale sheet
# per cache slot per worker would exceed 600 MB). PIL's own bomb check warns above this and
# raises above twice this; our probe refuses above it first, with a warning naming the file.
MAX_SHEET_PIXELS = 600_000_000
Image.MAX_IMAGE_PIXELS = MAX_SHEET_PIXELS


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
    """Sheets from a folder tree of PNG/JPEG/TIFF/BMP/WebP/PDF files (or one such file). Pages are enumerated at start
    from file headers (PDF page counts need pypdfium2), so every page of a multi-page TIFF or PDF is
    a sheet and unreadable files are skipped before training starts. get_sheet(k) picks a page
    uniformly (over pages, not files) with rng(seed, split, k); a page that fails to decode later
    is skipped with one warning and the next page is used instead. Decoded sheets and their ink
    masks are kept in a small per-process LRU cache (cache_size sheets per DataLoader worker)."""

    def __init__(self, root, *, seed=0, split="train", dpi=150, cache_size=4):
        self.root, self.seed, self.dpi, self.cache_size = Path(root), int(seed), dpi, cache_size
        self._ns, self._cache, self._bad = zlib.crc32(split.encode()), OrderedDict(), set()
        files = [self.root] if self.root.is_file() else sorted(  # one file (a multi-page PDF) or a tree
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in SHEET_EXTENSIONS)
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
            name = (f.name if f == self.root else str(f.relative_to(self.root))) + (f"#{p + 1}" if n > 1 else "")
            sheet = dict(image=img, label=None, ink=_ink_mask(img), sheet_type=-1, name=name)
            self._cache[(f, p)] = sheet
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return sheet
        raise RuntimeError(f"no readable sheet left in {self.root}")


def split_mix(data: str) -> list[tuple[str, float]] | None:
    """`--data A@w+B@w` -> [(A, w), (B, w)] (weights optional, default 1); None for one source.
    An existing path is one source even if its name holds '+'."""
    if data == "synthetic" or "+" not in data or Path(data).exists():
        return None
    out = []
    for part in data.split("+"):
        name, _, w = part.rpartition("@") if "@" in part else (part, "", "1")
        try:
            weight = float(w)
        except ValueError:
            weight = -1.0
        out.append((name, weight))
    return out


class MixedSheets:
    """Sheets drawn from several sources (`--data synthetic@3+DIR@1`): sheet k comes from source j
    with probability weight_j / sum(weights), j = rng(seed, "mix", k); that source's own sheet k
    is returned, so the stream stays a pure function of (seed, split, k)."""

    def __init__(self, sources, weights, *, seed=0):
        self.sources, self.seed = list(sources), int(seed)
        w = np.asarray(weights, float)
        self.p = w / w.sum()

    def get_sheet(self, k):
        j = int(np.random.default_rng([self.seed, zlib.crc32(b"mix"), int(k)]).choice(len(self.sources), p=self.p))
        return self.sources[j].get_sheet(k)


def open_sheets(data, *, seed, split="train", dpi=150, **kw):
    """The sheet source for a --data argument: "synthetic", a folder or file of sheets, or a mix
    of those joined by '+' with optional weights (`synthetic@3+DIR@1`: 3 synthetic sheets per real one)."""
    mix = split_mix(data)
    if mix:
        return MixedSheets([open_sheets(name, seed=seed, split=split, dpi=dpi, **kw) for name, _ in mix],
                           [w for _, w in mix], seed=seed)
    if data == "synthetic":
        import sheetgen  # lazily: training on a folder needs no generator
        return sheetgen.SyntheticSheets(seed=seed, split=split, **kw)
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


def _kill_workers_at_exit():
    """Because workers ignore SIGTERM, multiprocessing's exit handler (terminate, then join) would
    wait forever for the persistent workers of a loader that an uncaught exception keeps alive (a
    bad sheet in a worker, an error in the step): the job would hang instead of failing. Runs
    before that handler (atexit is last-in, first-out) and kills them, quietly: torch's SIGCHLD
    handler would report each killed worker as a second error after the real one."""
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        p.kill()


class DataWait:
    """Seconds the training loop waited for batches since the last `take()`: data_ms_per_step in
    the logs (near 0 when the workers keep up, near ms_per_step when they starve the GPU)."""
    seconds = 0.0

    @classmethod
    def take(cls) -> float:
        s, cls.seconds = cls.seconds, 0.0
        return s


class TimedLoader:
    """A DataLoader whose iterator adds the time spent in next() to DataWait."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __iter__(self):
        it, t0 = iter(self.loader), time.perf_counter()
        for batch in it:
            DataWait.seconds += time.perf_counter() - t0
            yield batch
            t0 = time.perf_counter()


def make_loader(dataset, batch_size, *, start=0, rank=0, world_size=1, num_workers=2, seed=0):
    """Infinite DataLoader over a TileDataset for one rank; resume with start = step * batch_size *
    world_size. Items are deterministic in (dataset seed, index), so worker count and timing do
    not change the data; `seed` only seeds torch's worker RNG for views that use torch randomness."""
    if num_workers > 0 and not getattr(_kill_workers_at_exit, "registered", False):
        atexit.register(_kill_workers_at_exit)  # after multiprocessing.util's handler, so it runs first
        _kill_workers_at_exit.registered = True
    return TimedLoader(torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers,
        sampler=InfiniteSampler(start, rank, world_size, block=batch_size),
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if num_workers > 0 else None))
