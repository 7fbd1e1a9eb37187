"""Realism, measured: the image statistics that decide what a ViT/16 sees, side by side for the
synthetic sheet stream and folders of real sheets, as one Markdown table (one column per source)
and one picture overlaying the histograms.

    python scripts/realism.py synthetic ../shared/real_dev/walls-fr-dev/images ../shared/reference_sheets

A source is `synthetic` (the pretraining stream, sheets 0..N-1 of seed 0, all sheet types) or a
folder of sheets (every page, evenly spaced when there are more than --max_sheets). Sheets whose
longer side exceeds --max_side are box-downsampled first, so all pixel figures are at analysis
resolution (the table says how many sheets were resized). "Ink" is a pixel darker than
common.INK_THRESHOLD (192, so grey poche counts); "dark ink" is a pixel darker than DARK (128).

How each statistic is measured (all pooled over the source's sheets):
- stroke width: for every ink pixel, the length of the horizontal and of the vertical ink run
  through it; its stroke width is the shorter of the two. Exact for axis-aligned strokes and
  fills; a stroke at angle a reads w / max(|cos a|, |sin a|), i.e. up to 1.41 w at 45 degrees.
  Measured on the ink and, separately, on the dark ink (grey poche fills drop out). Percentiles
  are over ink pixels (so a wide stroke weighs in proportion to its width); the wall-thickness
  proxy is the most common width among ink pixels in strokes 4-63 px wide, i.e. where the heavy
  ink is (solid walls, poche), leaving out thin lines and fills of 64 px or more.
- line spacing: the paper gaps between consecutive ink runs on one row or column.
- ink per tile: disjoint 224 px tiles; blank means under common.MIN_INK ink.
- components: 8-connected ink components (union-find on row runs). Text-like: 6-40 px tall, at
  most 1.5x as wide as tall, at least 10 px, filling 10-85% of its box (letters and digits that
  touch no line; solid ticks and dots are excluded).
- orientation: Sobel gradient at edge pixels (magnitude >= EDGE_MIN), the line direction is
  perpendicular to it, 0 = horizontal, 45 = rising to the right, counted in 15 degree bins centred
  on 0, 15, ..., 165 and weighted by gradient magnitude.
- grey levels: the 256-bin histogram; paper is every non-ink pixel. Pooled figures hide a mix of
  clean and scanned-looking sheets, so paper tone and the 1st percentile are also given per sheet
  as median (min-max).
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import common  # noqa: E402

TILE = 224  # the ViT's input side: the unit a blank tile is counted in
DARK = 128  # black ink and its anti-aliased edge, not grey poche (110-170 on synthetic sheets)
MAX_WIDTH = 64  # stroke widths are clipped here (fills wider than this are one bin)
MAX_GAP = 512
EDGE_MIN = 128.0  # Sobel magnitude (a step of ~32 grey levels) before a pixel counts as an edge
ORIENT_BINS = 12  # 15 degrees each, centred on 0, 15, ..., 165
DEFAULT_SHEETS = {"synthetic": 24, "folder": 48}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


# ------------------------------------------------------------------------------- statistics
def ink_runs(mask):
    """Ink runs along the rows of a 2-D bool array: (row, first column, length), row-major order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)  # (h, w + 1): +1 where a run starts, -1 one past its end
    rows, first = np.nonzero(d == 1)
    _, stop = np.nonzero(d == -1)
    return rows, first, stop - first


def run_lengths(mask):
    """(H, W) int32: the length of the row run through each ink pixel, 0 on paper."""
    _, _, n = ink_runs(mask)
    out = np.zeros(mask.shape, np.int32)
    out[mask] = np.repeat(n, n)  # boolean indexing walks ink pixels in the runs' own order
    return out


def stroke_width(mask):
    """(H, W) int32: min(horizontal run, vertical run) through each ink pixel, 0 on paper."""
    return np.minimum(run_lengths(mask), run_lengths(mask.T).T)


def paper_gaps(mask):
    """Lengths of the paper runs that have ink on both ends, along rows."""
    rows, first, n = ink_runs(mask)
    same_row = rows[1:] == rows[:-1]
    return (first[1:] - (first[:-1] + n[:-1]))[same_row]


def tile_ink(mask, tile=TILE):
    """Ink fraction of every whole disjoint tile x tile tile (edge strips that do not fill a tile are dropped)."""
    h, w = mask.shape[0] // tile, mask.shape[1] // tile
    if h == 0 or w == 0:
        return np.zeros(0)
    t = mask[:h * tile, :w * tile].reshape(h, tile, w, tile)
    return t.mean(axis=(1, 3)).ravel()


def components(mask):
    """8-connected ink components: (pixels, height, width) per component, via union-find on row runs."""
    rows, first, n = ink_runs(mask)
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    last = first + n - 1
    stride = mask.shape[1] + 2  # keys of different rows never collide, even at column -1 or W
    start_key, end_key = rows * stride + first, rows * stride + last
    # run j of the next row touches run i (8-connectivity) iff first_j <= last_i + 1 and last_j >= first_i - 1;
    # runs of a row are disjoint and sorted, so those j form one slice [lo, hi)
    lo = np.searchsorted(end_key, (rows + 1) * stride + first - 1, "left")
    hi = np.searchsorted(start_key, (rows + 1) * stride + last + 1, "right")
    cnt = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(rows)), cnt)
    b = np.repeat(lo, cnt) + np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    parent = np.arange(len(rows))
    while True:
        while True:  # pointer jumping until every run points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[a], parent[b]
        merge = ra != rb
        if not merge.any():
            break
        a, b = a[merge], b[merge]
        np.minimum.at(parent, np.maximum(ra[merge], rb[merge]), np.minimum(ra[merge], rb[merge]))  # hook roots downwards
    label = np.unique(parent, return_inverse=True)[1]
    order = np.argsort(label, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(label[order]) != 0])
    pixels = np.add.reduceat(n[order], starts)
    height = np.maximum.reduceat(rows[order], starts) - np.minimum.reduceat(rows[order], starts) + 1
    width = np.maximum.reduceat(last[order], starts) - np.minimum.reduceat(first[order], starts) + 1
    return pixels, height, width


def text_like(pixels, height, width):
    """Components shaped like a letter or digit (see the module docstring)."""
    fill = pixels / (height * width)
    return (height >= 6) & (height <= 40) & (width <= 1.5 * height) & (pixels >= 10) & (fill >= 0.1) & (fill <= 0.85)


def orientation_hist(img):
    """Gradient-magnitude-weighted histogram of line directions in ORIENT_BINS bins over 0-180 degrees."""
    f = img.astype(np.float32)
    gx = (f[:-2, 2:] + 2 * f[1:-1, 2:] + f[2:, 2:]) - (f[:-2, :-2] + 2 * f[1:-1, :-2] + f[2:, :-2])
    gy = (f[2:, :-2] + 2 * f[2:, 1:-1] + f[2:, 2:]) - (f[:-2, :-2] + 2 * f[:-2, 1:-1] + f[:-2, 2:])
    mag = np.hypot(gx, gy)
    edge = mag >= EDGE_MIN
    # image rows grow downwards: -gy makes angles counter-clockwise; a line runs perpendicular to its gradient
    theta = (np.degrees(np.arctan2(-gy[edge], gx[edge])) + 90.0) % 180.0
    width = 180.0 / ORIENT_BINS
    bins = np.floor((theta + width / 2) / width).astype(np.int64) % ORIENT_BINS
    return np.bincount(bins, weights=mag[edge], minlength=ORIENT_BINS)


def grey_hist(img):
    return np.bincount(img.ravel(), minlength=256).astype(np.int64)


def hist_quantile(counts, q):
    """Smallest bin value at which the cumulative count reaches q of the total."""
    c = np.cumsum(counts)
    return int(np.searchsorted(c, q * c[-1])) if c[-1] > 0 else float("nan")


class Pool:
    """Statistics of one source, accumulated sheet by sheet."""

    def __init__(self):
        self.grey = np.zeros(256, np.int64)
        self.width = np.zeros(MAX_WIDTH + 1, np.int64)  # ink pixels by stroke width (index = px)
        self.dark_width = np.zeros(MAX_WIDTH + 1, np.int64)
        self.gap = np.zeros(MAX_GAP + 1, np.int64)
        self.orient = np.zeros(ORIENT_BINS)
        self.tiles, self.comp_pixels, self.largest_share = [], [], []
        self.sheets = self.selected = self.resized = self.runs = self.scanned = self.text = self.specks = 0
        self.pixels, self.long_sides, self.paper_medians, self.p1s = 0, [], [], []

    def add(self, img):
        ink = img < common.INK_THRESHOLD
        self.sheets += 1
        self.pixels += img.size
        self.long_sides.append(max(img.shape))
        grey = grey_hist(img)
        self.grey += grey
        paper = grey.copy()
        paper[:common.INK_THRESHOLD] = 0
        self.paper_medians.append(hist_quantile(paper, 0.5) if paper.any() else float("nan"))
        self.p1s.append(hist_quantile(grey, 0.01))
        for hist, m in ((self.width, ink), (self.dark_width, img < DARK)):
            hist += np.bincount(np.minimum(stroke_width(m)[m], MAX_WIDTH), minlength=MAX_WIDTH + 1)
        for m in (ink, ink.T):
            g = paper_gaps(m)
            self.gap += np.bincount(np.minimum(g, MAX_GAP), minlength=MAX_GAP + 1)
            self.runs += len(ink_runs(m)[0])
        self.scanned += 2 * img.size
        self.tiles.append(tile_ink(ink))
        self.orient += orientation_hist(img)
        pixels, height, width = components(ink)
        self.comp_pixels.append(pixels)
        self.text += int(text_like(pixels, height, width).sum())
        self.specks += int((pixels <= 4).sum())
        self.largest_share.append(pixels.max() / max(pixels.sum(), 1) if len(pixels) else 0.0)

    def summary(self):
        """{row name: value} in table order."""
        mp = self.pixels / 1e6
        ink_px = self.grey[:common.INK_THRESHOLD].sum()
        paper = self.grey.copy()
        paper[:common.INK_THRESHOLD] = 0
        ink_only = self.grey.copy()
        ink_only[common.INK_THRESHOLD:] = 0
        levels = np.arange(256)
        n_paper = max(paper.sum(), 1)
        paper_std = np.sqrt((paper * (levels - (paper * levels).sum() / n_paper) ** 2).sum() / n_paper)
        grey_ink = self.grey[DARK:common.INK_THRESHOLD].sum() / max(ink_px, 1)
        tiles = np.concatenate(self.tiles) if self.tiles else np.zeros(0)
        comps = np.concatenate(self.comp_pixels) if self.comp_pixels else np.zeros(0)
        o = self.orient / max(self.orient.sum(), 1e-9)
        per_bin = 180 // ORIENT_BINS
        axis = o[0] + o[90 // per_bin]
        diag = o[45 // per_bin] + o[135 // per_bin]
        pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
        spread = lambda v: f"{np.nanmedian(v):.0f} ({np.nanmin(v):.0f}-{np.nanmax(v):.0f})"  # noqa: E731
        wall = lambda h: int(np.argmax(h[4:MAX_WIDTH])) + 4 if h[4:MAX_WIDTH].sum() else "-"  # noqa: E731
        return {
            "**drawing scale**": "",
            "wall-thickness proxy: commonest stroke width 4-63 px, ink (px)": wall(self.width),
            "the same, dark ink (px)": wall(self.dark_width),
            "ink in strokes >= 4 px wide (%)": pct(self.width[4:].sum() / max(ink_px, 1)),
            "dark ink in strokes >= 4 px wide (%)": pct(self.dark_width[4:].sum() / max(self.dark_width.sum(), 1)),
            "line spacing: median paper gap between ink runs (px)": hist_quantile(self.gap, 0.5),
            "line spacing: p90 gap (px)": hist_quantile(self.gap, 0.9),
            "ink runs crossed per 224 px scan line": f"{TILE * self.runs / max(self.scanned, 1):.1f}",
            "**stroke width** (px, over ink pixels)": "",
            "median, ink": hist_quantile(self.width, 0.5),
            "p90, ink": hist_quantile(self.width, 0.9),
            f"median, dark ink (< {DARK})": hist_quantile(self.dark_width, 0.5),
            "p90, dark ink": hist_quantile(self.dark_width, 0.9),
            "**ink density**": "",
            "ink, whole sheet (%)": pct(ink_px / max(self.pixels, 1)),
            "224 px tiles": len(tiles),
            f"blank tiles (< {100 * common.MIN_INK:g}% ink) (%)": pct((tiles < common.MIN_INK).mean()) if len(tiles) else "-",
            "tile ink, median (%)": pct(np.median(tiles)) if len(tiles) else "-",
            "tile ink, p90 (%)": pct(np.percentile(tiles, 90)) if len(tiles) else "-",
            "**components** (8-connected ink)": "",
            "components per megapixel": f"{len(comps) / mp:.0f}",
            "median size (px)": f"{np.median(comps):.0f}" if len(comps) else "-",
            "p90 size (px)": f"{np.percentile(comps, 90):.0f}" if len(comps) else "-",
            "largest component, share of the sheet's ink (median, %)": pct(np.median(self.largest_share)),
            "specks (<= 4 px) per megapixel": f"{self.specks / mp:.0f}",
            "text-like components per megapixel": f"{self.text / mp:.0f}",
            "**orientation** (share of edge weight, %)": "",
            "near-axis (0 and 90 degree bins, +-7.5)": pct(axis),
            "diagonal (45 and 135 degree bins)": pct(diag),
            "other angles": pct(1 - axis - diag),
            "**grey levels**": "",
            "pixels at exactly 255 (%)": pct(self.grey[255] / self.pixels),
            "pixels at exactly 0 (%)": pct(self.grey[0] / self.pixels),
            "pixels strictly between (%)": pct(self.grey[1:255].sum() / self.pixels),
            "paper median, pooled": hist_quantile(paper, 0.5),
            "paper median per sheet: median (min-max)": spread(self.paper_medians),
            "sheets with grey paper (paper median < 250) (%)": pct(np.mean(np.array(self.paper_medians) < 250)),
            "paper std (speckle, anti-aliased edges)": f"{paper_std:.1f}",
            "ink median": hist_quantile(ink_only, 0.5) if ink_px else "-",
            f"grey ink ({DARK}-{common.INK_THRESHOLD - 1}), share of ink (%)": pct(grey_ink),
            "1st percentile of all pixels, pooled": hist_quantile(self.grey, 0.01),
            "1st percentile per sheet: median (min-max)": spread(self.p1s),
            "**sheets**": "",
            "sheets analysed (of those selected)": f"{self.sheets} of {self.selected}",
            "median longer side (px)": int(np.median(self.long_sides)),
            "downsampled to --max_side": self.resized,
        }


# ---------------------------------------------------------------------------------- sources
class SourceError(Exception):
    pass


def open_source(spec, max_sheets):
    """(column name, list of thunks that each load one sheet image)."""
    if spec == "synthetic":
        src = common.open_sheets("synthetic", seed=0)
        n = max_sheets or DEFAULT_SHEETS["synthetic"]
        return "synthetic", [lambda i=i: src.get_sheet(i)["image"] for i in range(n)]
    path = Path(spec)
    if not path.is_dir():
        raise SourceError(f"{spec}: no such folder" if not path.exists() else f"{spec}: not a folder")
    try:
        src = common.open_sheets(spec, seed=0)
    except FileNotFoundError:
        raise SourceError(f"{spec}: no readable sheet image in this folder "
                          f"(accepted: {', '.join(common.SHEET_EXTENSIONS)})") from None
    pages = src.pages  # (file, page, pages in file), every page once
    n = max_sheets or DEFAULT_SHEETS["folder"]
    if len(pages) > n:
        pages = [pages[k] for k in np.unique(np.linspace(0, len(pages) - 1, n).round().astype(int))]
    pages = [pages[k] for k in np.random.default_rng(0).permutation(len(pages))]  # a budget stop still leaves a spread
    name = "/".join(path.resolve().parts[-2:])
    return name, [lambda f=f, p=p: common.load_sheet_image(f, p) for f, p, _ in pages]


def bounded(img, max_side):
    """The sheet box-downsampled so that its longer side is at most max_side, and whether it was."""
    if max(img.shape) <= max_side:
        return img, False
    s = max_side / max(img.shape)
    size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BOX)), True


# ---------------------------------------------------------------------------------- outputs
def markdown(command, names, summaries, seconds):
    lines = [f"`{command}`", "",
             "Image statistics that decide what a ViT/16 sees, one column per source; how each is "
             "measured is in the docstring of scripts/realism.py. Ink = pixel < common.INK_THRESHOLD "
             f"({common.INK_THRESHOLD}).", "",
             "| statistic | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in summaries[0]:
        lines.append(f"| {row} | " + " | ".join(str(s[row]) for s in summaries) + " |")
    lines.append("| analysis time (s) | " + " | ".join(f"{t:.1f}" for t in seconds) + " |")
    return "\n".join(lines) + "\n"


def _panel(d, font, box, title, xlabel, xticks, curves, log=False):
    """One histogram panel: curves is [(colour, [y per bin])], all with the same bins."""
    x0, y0, x1, y1 = box
    L, B, T = x0 + 56, y1 - 36, y0 + 24
    R = x1 - 28  # room for the last tick label
    vals = [v for _, ys in curves for v in ys if not log or v > 0]
    if log:
        top = np.ceil(np.log10(max(vals))) if vals else 0
        bot = top - 6
        yv = lambda v: (np.log10(v) - bot) / (top - bot) if v > 0 else -1  # noqa: E731
        yticks = [(yv(10.0 ** k), f"1e{int(k)}") for k in np.arange(bot, top + 1)]
    else:
        top = max(vals) * 1.05 if vals else 1
        step = next(t for t in (0.5, 1, 2, 5, 10, 20, 25, 50) if top / t <= 6)
        yv = lambda v: v / top  # noqa: E731
        yticks = [(yv(t), f"{t:g}") for t in np.arange(0, top, step)]
    ys = lambda f: B - (B - T) * min(max(f, 0), 1)  # noqa: E731
    n = len(curves[0][1])
    xs = lambda i: L + (R - L) * i / max(n - 1, 1)  # noqa: E731
    for f, label in yticks:
        d.line([(L, ys(f)), (R, ys(f))], fill=(230, 230, 230))
        d.text((L - 6, ys(f)), label, fill="black", font=font, anchor="rm")
    for i, label in xticks:
        d.line([(xs(i), B), (xs(i), B + 4)], fill="black")
        d.text((xs(i), B + 6), label, fill="black", font=font, anchor="mt")
    d.rectangle([L, T, R, B], outline="black")
    d.text((x0 + 8, y0 + 4), title, fill="black", font=font)
    d.text(((L + R) / 2, y1 - 14), xlabel, fill="black", font=font, anchor="mt")
    for col, yv_ in curves:
        pts = [(xs(i), ys(yv(v))) for i, v in enumerate(yv_) if not log or v > 0]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for x, y in pts if n <= 24 else []:
            d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=col)


def save_histograms(path, names, pools, width=1500, height=780):
    """3x2 panels (stroke width of ink and of dark ink, grey level, orientation, ink per tile,
    component size), one curve per source."""
    font = ImageFont.load_default(size=13)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    legend_h = 30
    cols = [COLOURS[k % len(COLOURS)] for k in range(len(pools))]
    for k, (name, col) in enumerate(zip(names, cols)):
        x = 12 + 300 * k
        d.rectangle([x, 10, x + 16, 20], fill=col)
        d.text((x + 22, 8), name, fill="black", font=font)
    pw, ph = width // 3, (height - legend_h) // 2
    boxes = [(c * pw, legend_h + r * ph, (c + 1) * pw, legend_h + (r + 1) * ph) for r in range(2) for c in range(3)]
    wticks = [(i, str(i + 1)) for i in (0, 4, 9, 14, 19, 24, 29)] + [(39, ">=40")]
    for box, attr, what in ((boxes[0], "width", "ink"), (boxes[1], "dark_width", f"dark ink (< {DARK})")):
        ws = [np.r_[getattr(p, attr)[1:40], getattr(p, attr)[40:].sum()] for p in pools]  # 1..39 px, then >= 40
        _panel(d, font, box, f"stroke width: % of {what} pixels", "stroke width (px; last bin >= 40)", wticks,
               [(c, 100 * w / max(w.sum(), 1)) for c, w in zip(cols, ws)])
    _panel(d, font, boxes[2], "grey level: share of pixels (log scale)", "grey level (0 = black, 255 = white)",
           [(i, str(i)) for i in (0, 64, 128, 192, 255)],
           [(c, p.grey / max(p.grey.sum(), 1)) for c, p in zip(cols, pools)], log=True)
    per_bin = 180 // ORIENT_BINS
    _panel(d, font, boxes[3], "line orientation: % of edge weight", "degrees (0 = horizontal, 45 = rising to the right)",
           [(i, str(per_bin * i)) for i in range(0, ORIENT_BINS, 2)],
           [(c, 100 * p.orient / max(p.orient.sum(), 1e-9)) for c, p in zip(cols, pools)])
    edges = np.r_[np.arange(0, 42, 2), np.inf] / 100  # 2% bins (the first is "blank"), last >= 40%
    th = [np.histogram(np.concatenate(p.tiles) if p.tiles else np.zeros(0), edges)[0] for p in pools]
    _panel(d, font, boxes[4], "ink per 224 px tile: % of tiles (first bin: blank)", "tile ink (%; last bin >= 40)",
           [(i, str(2 * i)) for i in range(0, 20, 4)] + [(20, ">=40")],
           [(c, 100 * t / max(t.sum(), 1)) for c, t in zip(cols, th)])
    ch = [np.bincount(np.minimum(np.log2(np.concatenate(p.comp_pixels)).astype(int), 16), minlength=17) for p in pools]
    _panel(d, font, boxes[5], "component size: % of components", "pixels (log2 bins; last >= 65536)",
           [(i, str(2 ** i)) for i in range(0, 15, 3)] + [(16, ">=64k")],
           [(c, 100 * h / max(h.sum(), 1)) for c, h in zip(cols, ch)])
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*", default=["synthetic"], help="`synthetic` or a folder of sheets (default: synthetic)")
    ap.add_argument("--max_sheets", type=int, default=0,
                    help=f"sheets per source (default {DEFAULT_SHEETS['synthetic']} synthetic, all of a folder up to "
                         f"{DEFAULT_SHEETS['folder']}, evenly spaced)")
    ap.add_argument("--max_side", type=int, default=2100, help="longer sides above this are box-downsampled to it first")
    ap.add_argument("--budget_s", type=float, default=90.0,
                    help="stop reading a source's sheets after this many seconds (the table says how many were read)")
    ap.add_argument("--out", default="results/realism.md", help="the Markdown table")
    ap.add_argument("--png", default="results/realism.png", help="the histogram picture")
    a = ap.parse_args(argv)
    try:
        sources = [open_source(s, a.max_sheets) for s in a.sources]
    except SourceError as e:
        print(f"realism: {e}", file=sys.stderr)
        return 2
    names, pools, seconds = [], [], []
    for name, thunks in sources:
        pool, t0 = Pool(), time.perf_counter()
        pool.selected = len(thunks)
        for load in thunks:
            if pool.sheets and time.perf_counter() - t0 > a.budget_s:
                print(f"realism: {name}: --budget_s {a.budget_s:g} reached after {pool.sheets} sheets", file=sys.stderr)
                break
            try:
                img = load()
            except Exception as e:  # noqa: BLE001 - one unreadable page is skipped, not fatal
                print(f"realism: skipping an unreadable sheet of {name}: {e}", file=sys.stderr)
                continue
            img, resized = bounded(img, a.max_side)
            pool.resized += resized
            pool.add(img)
        if pool.sheets == 0:
            print(f"realism: {name}: no sheet could be read", file=sys.stderr)
            return 2
        seconds.append(time.perf_counter() - t0)
        print(f"{name}: {pool.sheets} sheets in {seconds[-1]:.1f} s", file=sys.stderr)
        names.append(name)
        pools.append(pool)
    command = "python scripts/realism.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = markdown(command.strip(), names, [p.summary() for p in pools], seconds)
    print(table)
    for p in (a.out, a.png):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(table)
    save_histograms(a.png, names, pools)
    print(f"wrote {a.out} and {a.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
