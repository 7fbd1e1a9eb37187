"""Step-time benchmarks.

  python scripts/bench.py backbone --arch vit_small --img 224 --batch 16
      forward+backward of the shared ViT (img/s, ms/step, peak memory; FLOPs counted with
      torch's FlopCounterMode, and MFU on GPU against --peak_tflops).
  python scripts/bench.py recipe mae --preset tiny --steps 40
      runs the recipe's real command line for a few steps (data pipeline included; further
      flags such as --batch_size go to the recipe) and reads
      its metrics.jsonl: ms/step and img/s of the steady-state logging windows.
Both print a Markdown row and append a JSON record to --json (default: none).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402


def bench_backbone(a):
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = common.vit(a.arch).to(dev).train()
    opt = common.adamw(common.param_groups(model), lr=1e-4, device=dev)
    x = torch.randn(a.batch, 3, a.img, a.img, device=dev)

    def step():
        with common.autocast(dev):
            loss = model(x)["patches"].float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        with common.autocast(dev):
            loss = model(x)["patches"].float().pow(2).mean()
        loss.backward()
    flops = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)
    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    rec = dict(what="backbone", arch=a.arch, img=a.img, batch=a.batch, device=str(dev),
               threads=torch.get_num_threads(), ms_per_step=1000 * dt, img_per_s=a.batch / dt,
               gflops_per_step=flops / 1e9, peak_mem_gb=common.peak_memory_gb(dev))
    if dev.type == "cuda" and a.peak_tflops:
        rec["mfu"] = flops / dt / (a.peak_tflops * 1e12)
    return rec


def bench_recipe(a):
    script = ROOT / f"{a.name}.py"
    if not script.is_file():
        raise SystemExit(f"no recipe {script.name}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(script), "--preset", a.preset, "--steps", str(a.steps),
               "--log_every", str(a.log_every), "--ckpt_every", str(10 ** 9), "--out_dir", tmp] + a.extra
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        cfg = json.loads((Path(tmp) / "config.json").read_text())
    steady = rows[1:] or rows  # the first window holds start-up (workers, first batches)
    ms = sorted(r["ms_per_step"] for r in steady)[len(steady) // 2]
    return dict(what="recipe", recipe=a.name, preset=a.preset, arch=cfg.get("arch"), batch=cfg["batch_size"],
                steps=a.steps, ms_per_step=ms, img_per_s=cfg["batch_size"] * 1000 / ms,
                peak_mem_gb=max(r["peak_mem_gb"] for r in rows), wall_s=wall, threads=torch.get_num_threads(),
                device="cuda" if torch.cuda.is_available() else "cpu")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backbone")
    b.add_argument("--arch", default="vit_small")
    b.add_argument("--img", type=int, default=224)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--device", default="")
    b.add_argument("--peak_tflops", type=float, default=0.0, help="accelerator peak (bf16 dense) for MFU")
    r = sub.add_parser("recipe")
    r.add_argument("name")
    r.add_argument("--preset", default="tiny")
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--log_every", type=int, default=10)
    for q in (b, r):
        q.add_argument("--json", default="", help="append the record to this JSON-lines file")
    a, extra = p.parse_known_args()  # flags bench does not know go to the recipe
    if a.what == "backbone" and extra:
        p.error(f"unknown arguments {extra}")
    a.extra = extra
    rec = bench_backbone(a) if a.what == "backbone" else bench_recipe(a)
    rec.update(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, cpu_count=os.cpu_count())
    keys = [k for k in rec if k not in ("date",)]
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join(f"{rec[k]:.4g}" if isinstance(rec[k], float) else str(rec[k]) for k in keys) + " |")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
