"""Contact sheet of the synthetic data: a few sheets of each type beside their colourised label
maps, a legend, and a row of training tiles with their labels."""
import argparse
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from common import CLASSES, IGNORE, IGNORE_COLOUR, PALETTE, SHEET_TYPES, TileDataset, random_crop  # noqa: E402
from sheetgen import SyntheticSheets  # noqa: E402

LUT = np.zeros((256, 3), np.uint8)
LUT[:len(PALETTE)], LUT[IGNORE] = PALETTE, IGNORE_COLOUR


def colour(label):
    return Image.fromarray(LUT[label])


def thumb(im, h, resample):
    return im.resize((max(1, round(im.width * h / im.height)), h), resample)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "results" / "contact_sheet.png"))
    ap.add_argument("--per-type", type=int, default=2)
    ap.add_argument("--height", type=int, default=420, help="thumbnail height in pixels")
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    font = ImageFont.load_default(size=18)
    src = SyntheticSheets(seed=a.seed)
    rows = []
    for t in range(len(SHEET_TYPES)):
        found, i = [], 0
        while len(found) < a.per_type:  # the stream's own sheets, filtered by type
            sh = src.get_sheet(i)
            if sh["sheet_type"] == t:
                found.append(sh)
            i += 1
        cells = []
        for sh in found:
            cells.append(thumb(Image.fromarray(sh["image"]), a.height, Image.BOX))
            cells.append(thumb(colour(sh["label"]), a.height, Image.NEAREST))
        rows.append((f"{SHEET_TYPES[t]}  ({found[0]['image'].shape[1]}x{found[0]['image'].shape[0]} px, ...)", cells))
    ds = TileDataset(src, partial(random_crop, size=224, scale=(0.8, 1.6)), seed=a.seed, tiles_per_sheet=4)
    items = [ds[k * 4] for k in range(a.tiles)]
    rows.append(("training tiles (224 px, scale jitter 0.8-1.6, ink-aware)",
                 [Image.fromarray((it["image"][0].numpy() * 255).astype(np.uint8)) for it in items]))
    rows.append(("their labels", [colour(it["label"].numpy().astype(np.uint8)) for it in items]))
    gap, cap = 10, 26
    width = max(sum(c.width + gap for c in cells) for _, cells in rows) + gap
    legend_h = 40
    height = legend_h + sum(cap + max(c.height for c in cells) + gap for _, cells in rows)
    sheet = Image.new("RGB", (width, height), (235, 235, 235))
    d = ImageDraw.Draw(sheet)
    x = gap
    for k, name in enumerate(CLASSES):
        d.rectangle((x, 10, x + 22, 32), fill=PALETTE[k], outline=(0, 0, 0))
        d.text((x + 28, 12), name, fill=(0, 0, 0), font=font)
        x += 40 + int(font.getlength(name))
    y = legend_h
    for title, cells in rows:
        d.text((gap, y + 4), title, fill=(0, 0, 0), font=font)
        y += cap
        x = gap
        for c in cells:
            sheet.paste(c.convert("RGB"), (x, y))
            x += c.width + gap
        y += max(c.height for c in cells) + gap
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out} ({width}x{height})")


if __name__ == "__main__":
    main()
