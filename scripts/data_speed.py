"""Labeled synthetic tiles per second on one process and one core (sheet rendering included,
amortised over the tiles cut from each sheet)."""
import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import TileDataset, random_crop  # noqa: E402
from sheetgen import SyntheticSheets  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--tiles-per-sheet", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    src = SyntheticSheets(seed=a.seed)
    ds = TileDataset(src, partial(random_crop, size=a.tile), seed=a.seed, tiles_per_sheet=a.tiles_per_sheet)
    ds[0]  # warm-up: fonts, allocator
    n, ink, t0 = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        item = ds[a.tiles_per_sheet + n]
        ink += float((item["image"] < 0.75).float().mean())
        n += 1
    dt = time.perf_counter() - t0
    sheets = (n + a.tiles_per_sheet - 1) // a.tiles_per_sheet
    t1 = time.perf_counter()
    for k in range(1000, 1010):
        src.get_sheet(k)
    render_ms = (time.perf_counter() - t1) * 100
    print(f"{n / dt:.0f} labeled {a.tile}x{a.tile} tiles/s on one core "
          f"({n} tiles from {sheets} sheets in {dt:.1f} s; tiles_per_sheet={a.tiles_per_sheet}; "
          f"sheet render {render_ms:.0f} ms mean; mean tile ink {ink / max(n, 1):.3f}; numpy {np.__version__})")


if __name__ == "__main__":
    main()
