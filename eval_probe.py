"""Frozen-backbone probe: what do a backbone's frozen features know about construction sheets?
One fixed protocol for every checkpoint, so that pretraining recipes can be compared.

For every --ckpt, for a random-init baseline of the same architecture (mean and spread over
seeds) and for raw pixels, on held-out labeled sheets:
  dense        a per-patch linear classifier on the frozen patch tokens of each probed block,
               logits upsampled bilinearly to the labels: mIoU, per-class IoU, pixel accuracy,
               mIoU of ink-local and of context classes, patch-level mIoU, and the ceiling that
               any patch-granular predictor can reach (the oracle).
  global       sheet-type accuracy of a linear classifier on CLS and on mean-pooled patches,
               and of kNN, where sheets carry a type (the synthetic sets).
  diagnostics  high-norm patch tokens and how many sit on blank paper, CLS-patch cosine,
               effective rank of the patch features.
  pictures     input | PCA of patch features | true | predicted labels, and the mIoU-per-layer
               curve of all checkpoints in one figure.

  python eval_probe.py --ckpt random:vit_small                      # the full default probe
  python eval_probe.py --ckpt runs/mae/backbone.safetensors --ckpt dinov3_vits16_pretrain.pth
  python eval_probe.py --ckpt X --data path/to/labeled --scale 0.5 --layers last
On a CUDA machine the same commands extract features in bf16 autocast (--device auto).

Protocol (identical for every checkpoint; probe.md's caption repeats it):
  - Sheets are cut into 224 px tiles at native resolution (or --scale), never squashed; sheets
    are padded with white paper (labels: ignore) to whole tiles, predictions are stitched back
    to the whole sheet and cropped before scoring.
  - Features are extracted once per checkpoint and standardised per dimension with probe-train
    statistics (kNN and linear probes on unstandardised MAE features are known to collapse).
  - Loss: cross-entropy, then post-hoc logit prior correction (logit adjustment, Menon et al.
    2021): predict argmax(logits - 1.0 * log class prior). Sheets are ~65-80% paper: with plain
    CE random init, MAE, DINO and raw pixels all landed within 1 mIoU. Measured here (random-init
    ViT-S block 11 / raw pixels, default set, stride 4, 60 iterations): plain CE 12.5 / 12.1, tau 0.5 13.9 / 13.5,
    tau 1 14.7 / 14.0, class-balanced CE 14.8 / 14.0, logit-adjusted loss 14.7 / 14.1. tau 1
    post-hoc is as good as the alternatives and needs only one plain CE fit.
  - Optimiser: full-batch L-BFGS (strong Wolfe) from zero, a fixed 40 iterations, L2 1e-4:
    deterministic, no learning rate to tune, the same budget for every checkpoint (30, 60 and
    150 iterations gave held-out mIoU within 0.2 of each other).
  - Training labels are sampled at every 8th pixel (the centre of each 8x8 block: 4 samples
    per 16 px patch, so the upsampled logits still learn where boundaries fall inside a patch;
    strides 4 and 16 gave held-out mIoU within 0.4, stride 4 costs twice the time).
    Evaluation is at full label resolution.
  - Block index i is the output of block i (0-based), normed by the final norm as DINOv3's
    get_intermediate_layers does. The best layer is picked on the held-out split itself
    (optimistic by that selection; compare it with the last layer).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from common import ARCHS, ViT, autocast, load_backbone, patchify, print0, run_info, to_model_input
from common import CLASSES, IGNORE_COLOUR, PALETTE, SHEET_EXTENSIONS, SHEET_TYPES, load_sheet_image

IGNORE = 255  # label id of pixels that are not scored (also the white padding of sheets)
TILE = 224  # tile side in pixels: the one image size of the protocol
DATA_SEED = 0  # seed of the synthetic probe sets (probe_train and probe_val never overlap)
PRIOR_TAU = 1.0  # predict argmax(logits - PRIOR_TAU * log class prior)
PROBE_ITERS = 40  # L-BFGS iterations of every linear probe (dense and global)
WEIGHT_DECAY = 1e-4  # L2 on probe weights: keeps full-batch L-BFGS well posed
LABEL_STRIDE = 8  # dense probe trains on every 8th label pixel (cost); evaluation uses all
KNN_K = 20  # kNN sheet-type probe: k neighbours, cosine, similarity-weighted votes
HIGH_NORM_MULT = 4.0  # a patch token is "high-norm" above 4x the median norm
BLANK_MIN_PIXEL = 200  # a patch is blank paper when no pixel is darker than this
RANK_SAMPLES = 8192  # patch tokens used for the effective rank
# Class groups for the summary mIoUs. Ink-local classes can be told from the ink inside one
# patch (wall fill, window lines, glyphs, fixture outlines, stair treads); context classes
# need the arrangement around the patch (a door is leaf + swing arc, a dimension is a strip of
# ticks and numbers, an annotation is a tag or leader pointing elsewhere). Background is in
# neither group; classes of a labeled folder not named here count in "all" only.
INK_LOCAL = ("wall", "window", "stair", "fixture", "text")
CONTEXT = ("door", "dimension", "annotation")


# ----------------------------------------------------------------------------------------
# Data: sheets -> tiles
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class TileSet:
    """Sheets cut into tile x tile pieces, row-major within a sheet, sheets in order."""
    images: torch.Tensor  # (N, T, T) uint8, 255 = paper
    masks: torch.Tensor  # (N, T, T) uint8 class ids, 255 = ignore
    sheets: list  # per sheet: name, height, width (scaled, unpadded), rows, cols, first (tile), sheet_type

    @property
    def tile(self) -> int:
        return self.images.shape[-1]


def tile_sheets(items: list[dict], num_classes: int, tile: int = TILE, scale: float = 1.0) -> TileSet:
    """items: dicts with name, image (H, W) uint8, mask (H, W) uint8, optional sheet_type."""
    images, masks, sheets = [], [], []
    for it in items:
        img, mask = np.asarray(it["image"]), np.asarray(it["mask"])
        if img.shape != mask.shape:
            raise ValueError(f"{it['name']}: mask size {mask.shape} differs from image size {img.shape}")
        bad = (mask != IGNORE) & (mask >= num_classes)
        if bad.any():
            raise ValueError(f"{it['name']}: class id {int(mask[bad].max())} out of range "
                             f"(0..{num_classes - 1}, 255 = ignore)")
        if scale != 1.0:  # area filter keeps thin lines as grey instead of dropping them
            size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.BOX))
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
        H, W = img.shape
        rows, cols = -(-H // tile), -(-W // tile)
        pad_img = np.full((rows * tile, cols * tile), 255, np.uint8)
        pad_mask = np.full((rows * tile, cols * tile), IGNORE, np.uint8)
        pad_img[:H, :W], pad_mask[:H, :W] = img, mask
        sheets.append(dict(name=it["name"], height=H, width=W, rows=rows, cols=cols,
                           first=sum(r["rows"] * r["cols"] for r in sheets), sheet_type=it.get("sheet_type")))
        images.append(cut(pad_img, tile))
        masks.append(cut(pad_mask, tile))
    return TileSet(torch.cat(images), torch.cat(masks), sheets)


def cut(a: np.ndarray, tile: int) -> torch.Tensor:
    """(rows*T, cols*T) -> (rows*cols, T, T), row-major: the inverse of stitch."""
    rows, cols = a.shape[0] // tile, a.shape[1] // tile
    return torch.from_numpy(a.reshape(rows, tile, cols, tile).transpose(0, 2, 1, 3).reshape(-1, tile, tile))


def stitch(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(S*rows*cols, ..., t, t') tiles of S sheets -> (S, ..., rows*t, cols*t')."""
    *lead, t, u = tiles.shape[1:]
    x = tiles.reshape(-1, rows, cols, *lead, t, u)
    x = x.movedim((1, 2), (-4, -2))  # (S, ..., rows, t, cols, u)
    return x.reshape(x.shape[0], *lead, rows * t, cols * u)


# ---------------------------------------------------------------------------------------
# Labeled folders: DIR/classes.txt, DIR/images/NAME.*, DIR/masks/NAME.png
# ---------------------------------------------------------------------------------------

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


def load_data(args) -> tuple[list[str], TileSet, TileSet, dict]:
    """-> class names, probe-train tiles, held-out tiles, a description of the split."""
    if args.data == "synthetic":
        from sheetgen import synthetic_probe_set
        train, val = ([dict(name=f"{split}/{i}", image=img, mask=mask, sheet_type=t) for i, (img, mask, t) in
                       enumerate(synthetic_probe_set(split, n, tile=args.tile, seed=DATA_SEED))]
                      for split, n in (("probe_train", args.n_train), ("probe_val", args.n_val)))
        classes = list(CLASSES)
        split = dict(source="synthetic", train=f"probe_train, {len(train)} tiles", val=f"probe_val, {len(val)} tiles")
    else:  # train/ and val/ subfolders, or a deterministic split by a hash of the file name
        classes, splits = load_labeled_folder(args.data, val_fraction=args.val_frac)
        train, val = ([dict(name=name, image=img, mask=mask) for name, img, mask in splits[k]]
                      for k in ("train", "val"))
        if not train or not val:
            raise ValueError(f"{args.data}: {len(train)} probe-train and {len(val)} held-out sheets; the probe needs "
                             "both (add files, change --val_frac, or use train/ and val/ subfolders)")
        split = dict(source=str(args.data), train=[it["name"] for it in train], val=[it["name"] for it in val])
    train, val = (tile_sheets(items, len(classes), args.tile, args.scale) for items in (train, val))
    return classes, train, val, split


# ----------------------------------------------------------------------------------------
# Frozen features
# ----------------------------------------------------------------------------------------

@torch.inference_mode()
def extract_features(model: ViT, data: TileSet, layers: list[int], device: torch.device, batch_size: int = 32) -> dict:
    """One pass of the frozen backbone over every tile. Returns
    layers {i: (N, h, w, D) fp16}, cls / pool (S, D) per sheet (mean over its tiles; last block),
    token_norm (N, h*w) last block before the final norm, cls_cos (N,) mean cos(CLS, patch)."""
    model.eval().to(device)
    out = dict(layers={i: [] for i in layers}, cls=[], pool=[], token_norm=[], cls_cos=[])
    for i in tqdm(range(0, len(data.images), batch_size), desc="features", leave=False, disable=None):
        x = to_model_input(data.images[i:i + batch_size, None].to(device).float() / 255)  # (B, 3, T, T)
        with autocast(device):
            o = model(x, layers=layers)
        h, w = o["grid"]
        for li in layers:  # fp16 storage: 768 tiles x 12 blocks of ViT-S = 1.4 GB
            patches_li = o["layers"][li][:, model.n_prefix:]  # (B, h*w, D)
            out["layers"][li].append(patches_li.reshape(-1, h, w, model.embed_dim).half().cpu())
        cls, patches = o["cls"].float(), o["patches"].float()
        out["cls"].append(cls.cpu())
        out["pool"].append(patches.mean(1).cpu())
        out["token_norm"].append(o["tokens"][:, model.n_prefix:].float().norm(dim=-1).cpu())
        out["cls_cos"].append(F.cosine_similarity(cls[:, None], patches, dim=-1).mean(1).cpu())
    out = {k: {li: torch.cat(v) for li, v in vals.items()} if k == "layers" else torch.cat(vals)
           for k, vals in out.items()}
    out["cls"], out["pool"] = per_sheet_mean(out["cls"], data), per_sheet_mean(out["pool"], data)
    return out


def pixel_features(data: TileSet, patch: int) -> dict:
    """The raw-pixel baseline: each patch's p*p grey values (1 = paper) as its feature vector."""
    g = data.tile // patch
    f = patchify(data.images[:, None].float() / 255, patch).view(-1, g, g, patch * patch)  # (N, h, w, p*p)
    return dict(layers={0: f.half()}, pool=per_sheet_mean(f.mean((1, 2)), data))


def per_sheet_mean(x: torch.Tensor, data: TileSet) -> torch.Tensor:
    return torch.stack([x[s["first"]:s["first"] + s["rows"] * s["cols"]].mean(0) for s in data.sheets])


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = IGNORE) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted; target == ignore skipped."""
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = target != ignore
    counts = torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> dict:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class neither present nor predicted
    (left out of the mean). Fractions in [0, 1]."""
    cm = cm.double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))
    return dict(iou=iou.tolist(), miou=float(iou.nanmean()), pixel_acc=float(tp.sum() / cm.sum().clamp_min(1)))


def group_miou(iou: list[float], classes: list[str], group: tuple[str, ...]) -> float | None:
    vals = [v for c, v in zip(classes, iou) if c in group and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summarise(cm: torch.Tensor, classes: list[str]) -> dict:
    r = iou_from_confusion(cm)
    return dict(miou=r["miou"], pixel_acc=r["pixel_acc"], ink_miou=group_miou(r["iou"], classes, INK_LOCAL),
                context_miou=group_miou(r["iou"], classes, CONTEXT), iou=dict(zip(classes, r["iou"])))


def patch_majority(labels: torch.Tensor, patch: int, num_classes: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, h, w) most frequent non-ignored label per patch (ties: lowest
    id), IGNORE where a patch has no labeled pixel."""
    N, H, W = labels.shape
    h, w = H // patch, W // patch
    lab = labels.long().reshape(N, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(N * h * w, patch * patch)
    lab = torch.where(lab == IGNORE, num_classes, lab)  # ignore counted in an extra bin
    counts = torch.bincount((torch.arange(N * h * w)[:, None] * (num_classes + 1) + lab).reshape(-1),
                            minlength=N * h * w * (num_classes + 1)).view(N * h * w, num_classes + 1)[:, :num_classes]
    major = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, major, IGNORE).view(N, h, w)


def oracle_ceiling(data: TileSet, patch: int, classes: list[str]) -> dict:
    """The best any patch-granular predictor can do: every pixel of a patch gets the patch's
    majority label."""
    major = patch_majority(data.masks, patch, len(classes))  # (N, h, w)
    pred = major.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return summarise(confusion_matrix(pred, data.masks, len(classes)), classes)


# ----------------------------------------------------------------------------------------
# Linear probes
# ----------------------------------------------------------------------------------------

class LinearProbe(nn.Module):
    """Standardise with probe-train statistics -> linear. predict() applies the prior correction."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, log_prior: torch.Tensor, prior_tau: float):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("log_prior", log_prior)
        self.prior_tau = prior_tau
        self.linear = nn.Linear(mean.numel(), log_prior.numel())
        nn.init.zeros_(self.linear.weight)
        self.linear.bias.data.copy_(log_prior)  # start at the prior: the first steps go to features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., C) training logits
        return self.linear((x.float() - self.mean) / self.std)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) - self.prior_tau * self.log_prior


def fit_lbfgs(probe: LinearProbe, loss_fn, iters: int, weight_decay: float):
    """Full-batch L-BFGS; loss_fn() computes the data loss and calls backward() itself (so it
    can accumulate gradients over chunks) and returns its value."""
    opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1, max_iter=iters, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        reg = 0.5 * weight_decay * probe.linear.weight.square().sum()
        reg.backward()
        return torch.tensor(loss_fn() + reg.item())

    opt.step(closure)
    return probe


def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean / std over rows of x (N, D), in float64 chunks (fp16 input)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), 65536):
        c = x[i:i + 65536].double()
        s, s2 = s + c.sum(0), s2 + c.square().sum(0)
    mean = s / len(x)
    return mean.float(), (s2 / len(x) - mean.square()).clamp_min(0).sqrt().float().clamp_min(1e-6)


def train_dense_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, prior_tau: float = PRIOR_TAU,
                      iters: int = PROBE_ITERS, weight_decay: float = WEIGHT_DECAY, label_stride: int = LABEL_STRIDE,
                      chunk: int = 128) -> LinearProbe:
    """features (N, h, w, D) frozen patch features of N tiles, labels (N, H, W) class ids (255 =
    ignore). Per-patch linear classifier whose logits are upsampled bilinearly to the labels;
    cross-entropy, mean over labeled pixels."""
    N, h, w, D = features.shape
    s = label_stride
    target = labels[:, s // 2::s, s // 2::s].long()  # (N, H/s, W/s): centre pixel of each s x s block
    valid = target != IGNORE
    counts = torch.bincount(target[valid], minlength=num_classes)[:num_classes].double()
    log_prior = ((counts + 1) / (counts.sum() + num_classes)).log().float()  # +1: absent classes stay finite
    mean, std = standardiser(features.reshape(-1, D))
    probe = LinearProbe(mean, std, log_prior, prior_tau)
    x = (features.float() - mean) / std  # standardised once, not in each of ~70 loss evaluations
    n_valid = max(int(valid.sum()), 1)

    def loss_fn():
        total = 0.0
        for i in range(0, N, chunk):
            logits = probe.linear(x[i:i + chunk]).permute(0, 3, 1, 2)  # (n, C, h, w)
            logits = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, target[i:i + chunk], ignore_index=IGNORE, reduction="sum") / n_valid
            loss.backward()
            total += loss.item()
        return total

    return fit_lbfgs(probe, loss_fn, iters, weight_decay)


@torch.no_grad()
def evaluate(probe: LinearProbe, features: torch.Tensor, data: TileSet, classes: list[str], keep_maps=()) -> dict:
    """Scores a dense probe on whole sheets: tile logits are stitched into the sheet's patch
    grid, upsampled bilinearly to full label resolution, cropped to the unpadded sheet.
    Returns summarise() of pixel and of patch level (majority label per patch) confusion, and
    the predicted label maps of the sheets listed in keep_maps."""
    C, T = len(classes), data.tile
    patch = T // features.shape[1]
    cm, cm_patch, maps = torch.zeros(C, C, dtype=torch.long), torch.zeros(C, C, dtype=torch.long), {}
    sheets = data.sheets
    i = 0

    def layout(s):
        return s["rows"], s["cols"], s["height"], s["width"]

    while i < len(sheets):  # batch consecutive sheets of one layout (all of them for tiles)
        s0 = sheets[i]
        j = i + 1
        while j < len(sheets) and j - i < 32 and layout(sheets[j]) == layout(s0):
            j += 1
        rows, cols, H, W = layout(s0)
        t0, t1 = s0["first"], sheets[j - 1]["first"] + rows * cols
        logits = probe.predict(features[t0:t1])  # (n_tiles, h, w, C)
        cm_patch += confusion_matrix(logits.argmax(-1), patch_majority(data.masks[t0:t1], patch, C), C)
        grid = stitch(logits.permute(0, 3, 1, 2), rows, cols)  # (S, C, rows*h, cols*w)
        pred = F.interpolate(grid, scale_factor=patch, mode="bilinear", align_corners=False).argmax(1)[:, :H, :W]
        cm += confusion_matrix(pred, stitch(data.masks[t0:t1], rows, cols)[:, :H, :W], C)
        for k in range(i, j):
            if k in keep_maps:
                maps[k] = pred[k - i].to(torch.uint8)
        i = j
    return dict(summarise(cm, classes), patch_miou=iou_from_confusion(cm_patch)["miou"], maps=maps)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, iters: int = PROBE_ITERS,
               weight_decay: float = WEIGHT_DECAY) -> LinearProbe:
    """Multinomial logistic regression on (n, D) standardised features (global probe; plain
    CE, no prior correction: sheet types are not dominated by one class)."""
    mean, std = standardiser(x)
    probe = LinearProbe(mean, std, torch.zeros(num_classes), 0.0)

    def loss_fn():
        loss = F.cross_entropy(probe(x), y)
        loss.backward()
        return loss.item()

    return fit_lbfgs(probe, loss_fn, iters, weight_decay)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = KNN_K, temperature: float = 0.07) -> float:
    """Cosine kNN on standardised features; votes weighted by exp(sim / 0.07) as in DINO."""
    mean, std = standardiser(train_x)
    a = F.normalize((train_x - mean) / std, dim=1)
    b = F.normalize((test_x - mean) / std, dim=1)
    sim, idx = (b @ a.T).topk(min(k, len(a)), dim=1)  # (n_test, k)
    votes = torch.zeros(len(b), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return float((votes.argmax(1) == test_y).float().mean())


def global_probe(ftrain: dict, fval: dict, train: TileSet, val: TileSet) -> dict | None:
    """Sheet-type accuracy; None when the sheets carry no type (labeled folders)."""
    ytr = [s["sheet_type"] for s in train.sheets]
    yva = [s["sheet_type"] for s in val.sheets]
    if any(t is None or t < 0 for t in ytr + yva) or len(set(ytr)) < 2:  # -1: type unknown
        return None
    ytr, yva = torch.tensor(ytr), torch.tensor(yva)
    n_types = max(len(SHEET_TYPES), int(max(ytr.max(), yva.max())) + 1)
    res = dict(k=KNN_K)
    for kind in ("cls", "pool"):
        if kind not in ftrain:
            continue
        probe = fit_linear(ftrain[kind], ytr, n_types)
        res[f"{kind}_linear"] = float((probe(fval[kind]).argmax(1) == yva).float().mean())
        res[f"{kind}_knn"] = knn_accuracy(ftrain[kind], ytr, fval[kind], yva)
    return res


# ----------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------

def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of (n, D) features (RankMe; uncentred)."""
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


def diagnostics(fval: dict, val: TileSet, last: int) -> dict:
    norms = fval["token_norm"]  # (N, h*w) last block output before the final norm
    patch = val.tile // int(math.isqrt(norms.shape[1]))
    N, T = val.images.shape[:2]
    g = T // patch
    blank = (val.images.reshape(N, g, patch, g, patch).amin((2, 4)) > BLANK_MIN_PIXEL).reshape(N, -1)
    high = norms > HIGH_NORM_MULT * norms.median()
    feats = fval["layers"][last].reshape(-1, fval["layers"][last].shape[-1])
    gen = torch.Generator().manual_seed(0)
    sample = feats[torch.randperm(len(feats), generator=gen)[:RANK_SAMPLES]]
    return dict(high_norm_frac=float(high.float().mean()),
                high_norm_blank_share=float((high & blank).sum() / high.sum()) if high.any() else None,
                blank_frac=float(blank.float().mean()), cls_patch_cos=float(fval["cls_cos"].mean()),
                effective_rank=effective_rank(sample), embed_dim=int(feats.shape[1]))


# ----------------------------------------------------------------------------------------
# Pictures (Pillow only)
# ----------------------------------------------------------------------------------------

def label_lut() -> np.ndarray:
    """(256, 3) uint8 colour of each class id: common.PALETTE, then fixed random colours for the
    classes of a labeled folder beyond it, IGNORE_COLOUR for ignore."""
    lut = np.random.default_rng(0).integers(40, 220, (256, 3)).astype(np.uint8)
    lut[:len(PALETTE)] = PALETTE
    lut[IGNORE] = IGNORE_COLOUR
    return lut


def colour_labels(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray(label_lut()[mask.numpy()])


def pca_rgb(grids: list[torch.Tensor]) -> list[Image.Image]:
    """First 3 principal components of the patch features of all grids (h, w, D) together, so
    colours are comparable across sheets; each component stretched between its 1st and 99th
    percentile."""
    x = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids]).float()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x[:20000], full_matrices=False)
    y = x @ v[:3].T  # (n, 3)
    lo, hi = y.quantile(0.01, dim=0), y.quantile(0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    out, i = [], 0
    for g in grids:
        n = g.shape[0] * g.shape[1]
        out.append(Image.fromarray((y[i:i + n].reshape(g.shape[0], g.shape[1], 3) * 255).byte().numpy()))
        i += n
    return out


def save_examples(path: Path, val: TileSet, idx: list[int], feats_last: torch.Tensor, maps: dict, classes: list[str],
                  title: str, max_side: int = 480):
    """One row per sheet: input | PCA (last block) | true labels | predicted (best block).
    Tiles are drawn at native size, whole sheets shrunk to max_side."""
    panels = []
    for k in idx:
        s = val.sheets[k]
        r = slice(s["first"], s["first"] + s["rows"] * s["cols"])
        crop = (0, 0, s["width"], s["height"])
        img = Image.fromarray(stitch(val.images[r], s["rows"], s["cols"])[0].numpy()).crop(crop)
        true = colour_labels(stitch(val.masks[r], s["rows"], s["cols"])[0]).crop(crop)
        grid = stitch(feats_last[r].permute(0, 3, 1, 2), s["rows"], s["cols"])[0].permute(1, 2, 0)
        panels.append([img.convert("RGB"), grid, true, colour_labels(maps[k])])
    pcas = pca_rgb([p[1] for p in panels])
    for p, pca in zip(panels, pcas):
        patch = val.tile // feats_last.shape[1]
        pca = pca.resize((pca.width * patch, pca.height * patch), Image.NEAREST)
        p[1] = pca.crop((0, 0, p[0].width, p[0].height))
    side = max(max(p[0].size) for p in panels)
    scale = min(max_side, side) / side
    cw, ch = max(round(p[0].width * scale) for p in panels), max(round(p[0].height * scale) for p in panels)
    head, legend = 34, 20 * ((len(classes) + 3) // 4) + 8
    canvas = Image.new("RGB", (4 * (cw + 6) + 6, head + len(panels) * (ch + 6) + legend), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 2), title, fill="black")
    for c, name in enumerate(["input", "PCA of patch features (last block)", "true", "predicted (best block)"]):
        draw.text((6 + c * (cw + 6), 18), name, fill="black")
    for r, row in enumerate(panels):
        for c, im in enumerate(row):
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BOX if c == 0 else Image.NEAREST)
            canvas.paste(im, (6 + c * (cw + 6), head + r * (ch + 6)))
    y0 = head + len(panels) * (ch + 6) + 4
    for c, name in enumerate(classes):
        x, y = 6 + (c % 4) * 150, y0 + (c // 4) * 20
        draw.rectangle([x, y, x + 14, y + 14], fill=tuple(int(v) for v in label_lut()[c]), outline="black")
        draw.text((x + 20, y + 2), name, fill="black")
    canvas.save(path)


def save_curve(path: Path, curves: dict, hlines: dict, band: tuple | None, title: str,
               width: int = 900, height: int = 520):
    """mIoU (%) per block: one polyline per checkpoint, dashed horizontal references, the
    random-init mean +- std as a shaded band. curves {label: {block: miou}}, hlines {label: miou},
    band (blocks, mean, std). The y axis spans the data (differences are a few points)."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
               (140, 86, 75), (227, 119, 194)]
    lay, mean, std = band or ([], [], [])
    blocks = sorted({b for c in curves.values() for b in c} | set(lay))
    vals = [100 * v for c in curves.values() for v in c.values()] + [100 * v for v in hlines.values()] + \
           [100 * (m + sd) for m, sd in zip(mean, std)] + [100 * (m - sd) for m, sd in zip(mean, std)]
    step = next(t for t in (0.5, 1, 2, 5, 10, 20) if (max(vals) - min(vals)) / t <= 8)
    y0, y1 = step * math.floor(min(vals) / step), step * (math.floor(max(vals) / step) + 1)
    L, R, Tm, B = 60, 260, 34, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    xs = lambda b: L + (width - L - R) * (b - blocks[0]) / max(blocks[-1] - blocks[0], 1)  # noqa: E731
    ys = lambda v: height - B - (height - B - Tm) * (100 * v - y0) / (y1 - y0)  # noqa: E731
    if band:  # under the grid
        d.polygon([(xs(b), ys(m + sd)) for b, m, sd in zip(lay, mean, std)] +
                  [(xs(b), ys(m - sd)) for b, m, sd in reversed(list(zip(lay, mean, std)))], fill=(225, 225, 225))
    for k in range(round((y1 - y0) / step) + 1):
        t = y0 + k * step
        d.line([(L, ys(t / 100)), (width - R, ys(t / 100))], fill=(230, 230, 230))
        d.text((L - 34, ys(t / 100) - 6), f"{t:g}", fill="black")
    for b in blocks:
        d.text((xs(b) - 4, height - B + 6), str(b), fill="black")
    d.text((L + (width - L - R) // 2 - 40, height - 22), "block (0-based)", fill="black")
    d.text((8, 8), f"held-out mIoU (%). {title}", fill="black")
    d.rectangle([L, Tm, width - R, height - B], outline="black")
    legend = []
    if band:
        d.line([(xs(b), ys(m)) for b, m in zip(lay, mean)], fill=(120, 120, 120), width=2)
        legend.append(("random init (mean +- std)", (120, 120, 120)))
    for k, (label, c) in enumerate(curves.items()):
        col = colours[k % len(colours)]
        pts = [(xs(b), ys(c[b])) for b in sorted(c)]
        d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        legend.append((label, col))
    for k, (label, v) in enumerate(hlines.items()):
        col = [(0, 0, 0), (170, 110, 0)][k % 2]
        for x in range(L, width - R, 12):  # dashed
            d.line([(x, ys(v)), (min(x + 6, width - R), ys(v))], fill=col, width=2)
        legend.append((f"{label} (dashed)", col))
    for k, (label, col) in enumerate(legend):
        y = Tm + 4 + 18 * k
        d.rectangle([width - R + 12, y, width - R + 26, y + 10], fill=col)
        d.text((width - R + 32, y - 1), label[:36], fill="black")
    img.save(path)


# ----------------------------------------------------------------------------------------
# Probing one feature source, one checkpoint, the whole run
# ----------------------------------------------------------------------------------------

def probe_features(ftrain: dict, fval: dict, train: TileSet, val: TileSet, classes: list[str],
                   keep_maps=()) -> tuple[dict, dict]:
    """Dense probe of every layer in ftrain['layers'] + the global probe. Returns results and
    the best layer's predicted maps of the keep_maps sheets."""
    dense, maps = {}, {}
    for li in tqdm(sorted(ftrain["layers"]), desc="dense probe", leave=False, disable=None):
        probe = train_dense_probe(ftrain["layers"][li], train.masks, len(classes))
        r = evaluate(probe, fval["layers"][li], val, classes, keep_maps)
        maps[li] = r.pop("maps")
        dense[li] = r
    best = max(dense, key=lambda li: dense[li]["miou"])
    last = max(dense)
    res = {"dense": dict(layers={str(li): r for li, r in dense.items()}, best_layer=best, best_miou=dense[best]["miou"],
                         last_layer=last, last_miou=dense[last]["miou"], patch_miou=dense[best]["patch_miou"],
                         ink_miou=dense[best]["ink_miou"], context_miou=dense[best]["context_miou"]),
           "global": global_probe(ftrain, fval, train, val)}
    return res, maps[best]


def probe_checkpoint(name: str, model: ViT, train: TileSet, val: TileSet, classes: list[str], layers: list[int],
                     device: torch.device, batch_size: int = 32, out_dir: Path | None = None,
                     n_examples: int = 4) -> dict:
    """Full probe of one frozen backbone: dense (every block in layers, plus the last), global,
    diagnostics, oracle; draws out_dir/examples.png when out_dir is given."""
    t0 = time.time()
    last = model.depth - 1
    layers = sorted(set(layers) | {last})  # the last block is always probed: PCA, diagnostics, table
    ftrain = extract_features(model, train, layers, device, batch_size)
    fval = extract_features(model, val, layers, device, batch_size)
    # sheets to draw: those showing the most classes (deterministic)
    n_cls = [len(set(val.masks[s["first"]:s["first"] + s["rows"] * s["cols"]].unique().tolist()) - {IGNORE})
             for s in val.sheets]
    examples = sorted(range(len(val.sheets)), key=lambda k: (-n_cls[k], k))[:n_examples] if out_dir else []
    res, maps = probe_features(ftrain, fval, train, val, classes, examples)
    res.update(name=name, arch=model.arch, oracle=oracle_ceiling(val, model.patch_size, classes),
               diagnostics=diagnostics(fval, val, last), time_s=round(time.time() - t0, 1))
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        if examples:  # --examples 0: no examples.png
            save_examples(out_dir / "examples.png", val, examples, fval["layers"][last], maps, classes,
                          f"{name}: best block {res['dense']['best_layer']}, "
                          f"mIoU {100 * res['dense']['best_miou']:.1f}")
    return res


def write_json(path: Path, obj):
    def clean(o):  # NaN (class absent and never predicted) -> null; tensors/keys -> plain types
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, float):
            return None if math.isnan(o) else round(o, 6)
        return o
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=1))


def arch_name(arch: dict) -> str:
    for name, (d, depth, heads) in ARCHS.items():
        if (arch["embed_dim"], arch["depth"], arch["num_heads"]) == (d, depth, heads):
            return name
    return f"vit_d{arch['embed_dim']}x{arch['depth']}"


def ckpt_name(ckpt: str, taken: set) -> str:
    """A table row's name: random-<arch>[-seed]; a run's export (RUN_DIR/backbone.safetensors) is named
    after its run dir (runs/mae/backbone.safetensors: mae); any other file by its stem."""
    path = Path(ckpt)
    if ckpt.startswith("random:"):
        name = "-".join(ckpt.split(":"))
    else:
        if path.name == "backbone.safetensors":
            path = path.resolve().parent
        name = path.stem
    if name in taken:  # the same name from another folder: prefix that folder
        name = f"{path.resolve().parent.name}-{name}"
    while name in taken:
        name += "+"
    taken.add(name)
    return name


def parse_layers(spec: str, depth: int) -> list[int]:
    """all | last | comma list of 0-based block indices, negative ones counted from the end."""
    if spec in ("all", "last"):
        return list(range(depth)) if spec == "all" else [depth - 1]
    layers = [int(s) for s in spec.split(",")]
    if any(not -depth <= i < depth for i in layers):
        raise ValueError(f"--layers {spec}: the backbone has blocks 0..{depth - 1}")
    return sorted({i % depth for i in layers})


SUMMARY = ("best_miou", "last_miou", "patch_miou", "ink_miou", "context_miou", "cls_linear", "pool_linear",
           "cls_knn", "high_norm_frac", "high_norm_blank_share", "cls_patch_cos", "effective_rank")


def summary(r: dict) -> dict:
    """The table's figures of one result (None where they do not apply)."""
    s = {k: r["dense"][k] for k in ("best_miou", "best_layer", "last_miou", "patch_miou", "ink_miou", "context_miou")}
    s.update({k: (r["global"] or {}).get(k) for k in ("cls_linear", "pool_linear", "cls_knn")})
    s.update({k: (r.get("diagnostics") or {}).get(k) for k in SUMMARY[8:]})
    return s


def cell(summaries: list[dict], key: str) -> str:
    """Mean (+- sample std over several results) in % for fractions, plain for cosine and rank."""
    vals = [s[key] for s in summaries]
    if any(v is None for v in vals):
        return "–"
    k = 1 if key in ("cls_patch_cos", "effective_rank") else 100
    digits = 2 if key == "cls_patch_cos" else 1
    m = f"{k * float(np.mean(vals)):.{digits}f}"
    return m + (f" ± {k * float(np.std(vals, ddof=1)):.{digits}f}" if len(vals) > 1 else "")


def table(rows: list[tuple[str, list[dict]]], oracle: dict) -> str:
    """rows: (label, [summary, ...]); several summaries (seeds) print as mean +- std."""
    lines = ["| checkpoint | best mIoU (block) | last mIoU | patch mIoU | ink / context mIoU | sheet type: CLS linear "
             "| mean-pool linear | CLS kNN | high-norm % (share on blank %) | cos(CLS, patch) | eff. rank |",
             "|---" * 11 + "|"]
    for label, ss in rows:
        c = {k: cell(ss, k) for k in SUMMARY}
        blocks = ",".join(str(b) for b in sorted({s["best_layer"] for s in ss if s["best_layer"] is not None})) or "–"
        lines.append(f"| {label} | {c['best_miou']} ({blocks}) | {c['last_miou']} | {c['patch_miou']} | "
                     f"{c['ink_miou']} / {c['context_miou']} | {c['cls_linear']} | {c['pool_linear']} | "
                     f"{c['cls_knn']} | "
                     f"{c['high_norm_frac']} ({c['high_norm_blank_share']}) | {c['cls_patch_cos']} | "
                     f"{c['effective_rank']} |")
    o = {k: cell([oracle], k) for k in ("miou", "ink_miou", "context_miou")}
    lines.append(f"| oracle: every pixel gets its patch's majority label | {o['miou']} | | 100.0 | {o['ink_miou']} / "
                 f"{o['context_miou']} | | | | | | |")
    return "\n".join(lines)


def column_notes() -> str:
    """One line per diagnostic column, under the table."""
    return "\n".join([
        f"- high-norm %: share of last-block patch tokens with a norm above {HIGH_NORM_MULT:g}x the median (before the "
        "final norm): tokens that hold global information instead of their patch's (the artefacts registers absorb); "
        "in brackets the share of those on blank paper (high: blank patches are repurposed).",
        "- cos(CLS, patch): mean cosine between the CLS token and the patch tokens of a tile, last block; near 1 the "
        "patch features are mostly one shared component with little local information.",
        "- eff. rank: effective rank of last-block patch tokens (exp of the entropy of the normalised singular "
        "values), at most the feature width; a handful means the features collapsed onto a few directions."])


def caption(p: dict, blank_frac: float) -> str:
    """The protocol in words, under the table."""
    seeds, g = p["random_seeds"], p["groups"]
    return " ".join([
        f"Frozen linear probes on {p['data']['source']} sheets: {p['n_train_tiles']} probe-train / {p['n_val_tiles']}",
        f"held-out tiles of {p['tile']} px (scale {p['scale']}), {len(p['classes'])} classes,",
        f"data seed {p['data_seed']}.",
        "Dense: per-patch linear classifier on standardised frozen features, full-batch L-BFGS,",
        f"{PROBE_ITERS} iterations, L2 {WEIGHT_DECAY}; {p['loss']}; trained on every {LABEL_STRIDE}th label pixel;",
        "mIoU (%) at full label resolution on whole sheets; best block (0-based) picked on the held-out split;",
        "patch mIoU: argmax per patch vs the patch's majority label, at the best block;",
        f"ink-local classes: {', '.join(g['ink_local']) or '–'};",
        f"context classes: {', '.join(g['context']) or '–'}.",
        "Sheet type: accuracy (%) of linear probes on CLS and on mean-pooled patches, and of CLS kNN",
        f"(k={KNN_K}, cosine), last block. High-norm: share of last-block patch tokens (before the final norm)",
        f"above {HIGH_NORM_MULT:g}x the median norm; in brackets the share of those on blank paper (blank patches:",
        f"{100 * blank_frac:.0f}% of all)."] +
        ([f"Random init: seeds {seeds[0]}..{seeds[-1]}, each a full probe of its own."] if seeds else []))


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", action="append", required=True, help="backbone to probe (repeatable): "
                    "random:vit_small[:SEED], this project's .safetensors, official DINOv3 .pth")
    ap.add_argument("--data", default="synthetic",
                    help="'synthetic' or a labeled folder (images/, masks/, classes.txt, optional train/ val/)")
    ap.add_argument("--layers", default="all", help="blocks to probe: all | last | comma list of 0-based indices "
                    "(-1 = last); the last block is always added")
    ap.add_argument("--out_dir", default="runs/probe",
                    help="writes <name>/results.json and examples.png per checkpoint, probe.md, probe_curve.png")
    ap.add_argument("--scale", type=float, default=1.0, help="resize sheets by this factor before tiling")
    ap.add_argument("--tile", type=int, default=TILE, help="tile side in pixels (keep the default to compare runs)")
    ap.add_argument("--n_train", type=int, default=512, help="synthetic probe-train tiles")
    ap.add_argument("--n_val", type=int, default=256, help="synthetic held-out tiles")
    ap.add_argument("--val_frac", type=float, default=0.25,
                    help="held-out share of a labeled folder without train/ val/ (split by a hash of the file name)")
    ap.add_argument("--random_baseline", default="auto", help="random-init baseline: auto (architecture of the "
                    "first --ckpt), none, or a name (vit_tiny, vit_small, ...)")
    ap.add_argument("--random_seeds", type=int, default=3, help="seeds 0..n-1 of the random-init baseline")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--batch_size", type=int, default=32, help="tiles per forward pass of feature extraction")
    ap.add_argument("--examples", type=int, default=4, help="held-out sheets drawn in examples.png (0: none, no file)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    for c in args.ckpt:  # fail before minutes of work, not after
        if not c.startswith("random:") and not Path(c).is_file():
            raise FileNotFoundError(f"checkpoint not found: {c}")
    out_dir = Path(args.out_dir)
    classes, train, val, split = load_data(args)
    print0(f"probe data: {len(train.sheets)} probe-train sheets ({len(train.images)} tiles), "
           f"{len(val.sheets)} held-out sheets ({len(val.images)} tiles), {len(classes)} classes, device {device}")
    protocol = dict(
        data=split, classes=classes, tile=args.tile, scale=args.scale, n_train_tiles=len(train.images),
        n_val_tiles=len(val.images), layers=args.layers, units="IoU and accuracies are fractions in [0, 1]",
        loss=f"cross-entropy; prediction argmax(logits - {PRIOR_TAU} * log class prior of the probe-train labels)",
        optimiser=f"full-batch L-BFGS (strong Wolfe), {PROBE_ITERS} iterations from zero weights, L2 {WEIGHT_DECAY}",
        labels=f"training on every {LABEL_STRIDE}th label pixel (centre of each {LABEL_STRIDE}x{LABEL_STRIDE} block); "
               "evaluation at full resolution on whole sheets, logits upsampled bilinearly",
        features="frozen block outputs normed by the final norm, standardised per dimension (probe-train statistics)",
        groups=dict(ink_local=[c for c in classes if c in INK_LOCAL], context=[c for c in classes if c in CONTEXT]),
        global_probe=f"sheet type: linear (L-BFGS, plain CE) on CLS and mean-pooled last-block patches; "
                     f"kNN k={KNN_K}, cosine on standardised features, exp(sim/0.07) weighted votes",
        diagnostics=f"high-norm: last-block patch tokens before the final norm with norm > {HIGH_NORM_MULT} x median; "
                    f"blank: no pixel darker than {BLANK_MIN_PIXEL}; effective rank: exp(entropy of normalised "
                    f"singular values) of {RANK_SAMPLES} last-block normed patch tokens (seed 0), uncentred",
        random_seeds=list(range(args.random_seeds)) if args.random_baseline != "none" else [], data_seed=DATA_SEED,
        device=str(device))
    info = run_info()
    done, taken, results, first_arch = {}, set(), [], None

    def run(label: str, model: ViT, key) -> dict:
        if key not in done:  # e.g. --ckpt random:vit_small is seed 0 of the baseline
            print0(f"probing {label}")
            r = probe_checkpoint(label, model, train, val, classes, parse_layers(args.layers, model.depth), device,
                                 args.batch_size, out_dir / label, args.examples)
            r.update(protocol=protocol, run_info=info)
            write_json(out_dir / label / "results.json", r)
            d = r["dense"]
            print0(f"  best block {d['best_layer']}: mIoU {100 * d['best_miou']:.1f}, last {100 * d['last_miou']:.1f}, "
                   f"oracle {100 * r['oracle']['miou']:.1f} ({r['time_s']:.0f} s)")
            done[key] = r
        return done[key]

    for ckpt in args.ckpt:
        model = load_backbone(ckpt)
        first_arch = first_arch or model.arch
        seed = int(ckpt.split(":")[2]) if ckpt.count(":") == 2 else 0
        key = ("random", json.dumps(model.arch, sort_keys=True), seed) if ckpt.startswith("random:") else ckpt
        results.append(dict(run(ckpt_name(ckpt, taken), model, key), ckpt=ckpt))

    baseline = []
    if args.random_baseline != "none" and args.random_seeds > 0:
        arch = first_arch if args.random_baseline == "auto" else load_backbone(f"random:{args.random_baseline}").arch
        for seed in range(args.random_seeds):
            torch.manual_seed(seed)  # the same init as load_backbone("random:<arch>:<seed>")
            key = ("random", json.dumps(arch, sort_keys=True), seed)
            label = next((r["name"] for k, r in done.items() if k == key), f"random-{arch_name(arch)}-s{seed}")
            baseline.append(run(label, ViT(**arch), key))

    patch = (first_arch or {}).get("patch_size", 16)
    raw, _ = probe_features(pixel_features(train, patch), pixel_features(val, patch), train, val, classes)
    raw.update(name="raw_pixels", patch=patch, oracle=oracle_ceiling(val, patch, classes), protocol=protocol,
               run_info=info)
    write_json(out_dir / "raw_pixels" / "results.json", raw)

    oracle = raw["oracle"]
    rows = [(r["name"], [summary(r)]) for r in results]
    if baseline:
        rows.append((f"random init {arch_name(baseline[0]['arch'])}, {len(baseline)} seeds (mean ± std)",
                     [summary(r) for r in baseline]))
    rows.append((f"raw pixels ({patch}x{patch} patch grey values)", [summary(raw)]))
    md = "\n\n".join([table(rows, oracle), column_notes(), caption(protocol, results[0]["diagnostics"]["blank_frac"])])
    md += "\n"
    (out_dir / "probe.md").write_text(md)
    print0("\n" + md)

    curves = {r["name"]: {int(l): v["miou"] for l, v in r["dense"]["layers"].items()} for r in results}
    band = None
    if baseline:
        lay = sorted(int(l) for l in baseline[0]["dense"]["layers"])
        per = np.array([[r["dense"]["layers"][str(l)]["miou"] for l in lay] for r in baseline])
        band = (lay, per.mean(0).tolist(), (per.std(0, ddof=1) if len(per) > 1 else 0 * per[0]).tolist())
    save_curve(out_dir / "probe_curve.png", curves, {"raw pixels": raw["dense"]["best_miou"]}, band,
               f"Oracle ceiling (patch-majority labels): {100 * oracle['miou']:.1f}")
    print0(f"wrote {out_dir / 'probe.md'} (the table above) and {out_dir / 'probe_curve.png'} (mIoU per block)")
    for name in dict.fromkeys(r["name"] for r in results + baseline + [raw]):  # seed 0 may be a --ckpt too
        pictures = " and examples.png" if (out_dir / name / "examples.png").is_file() else ""
        print0(f"  {name}: {out_dir / name / 'results.json'}{pictures}")
    return dict(results=results, baseline=baseline, raw=raw, table=md)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad inputs: one clear line, no traceback
        sys.exit(f"error: {e}")
