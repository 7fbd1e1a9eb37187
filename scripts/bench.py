"""Benchmarks: training step time, images/s, peak memory and FLOPs of the backbone, of every
recipe and of the probe, and the data pipeline's tiles/s.

  python scripts/bench.py backbone --arch vit_small --img 224 --batch 16
      forward+backward of the shared ViT alone.
  python scripts/bench.py recipe mae --preset tiny --steps 60 --log_every 20
      the recipe's real command line for a few steps (data pipeline included; flags bench
      does not know, such as --batch_size, go to the recipe); ms/step and img/s are the
      median of the steady-state logging windows, peak memory is CUDA max allocated or the
      CPU process's max RSS.
  python scripts/bench.py recipe all --preset tiny --steps 60 --log_every 20 --json bench.jsonl
      every recipe in turn, one Markdown table.
  python scripts/bench.py data          labeled 224 px synthetic tiles/s on one core
  python scripts/bench.py probe --ckpt random:vit_small      eval_probe.py's time per checkpoint

FLOPs are counted, not guessed: torch's FlopCounterMode over real steps (for a recipe, the
difference between a 3-step and a 1-step run of its command line, in-process, so one-off
work such as model init and the first diagnostics cancels out), with CPU attention added
(FlopCounterMode has no formula for the CPU flash-attention kernel: 4 B H Lq Lk D forward,
twice that backward). MFU = counted FLOPs / step time / the accelerator's dense bf16 peak
(--peak_tflops, default known for H100/H200/A100 on CUDA; none on CPU).
Every mode prints a Markdown row (or table) and appends JSON records to --json.
"""
import argparse
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import common  # noqa: E402

RECIPES = ["mae", "ijepa", "capi", "beit", "ibot_dino", "dinov3_gram", "radio"]
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}  # dense, vendor specs


def _cpu_sdpa_flops(q_shape, k_shape, *args, **kwargs) -> int:
    b, h, lq, d = q_shape
    return 4 * b * h * lq * k_shape[-2] * d  # QK^T and PV: 2 FLOPs per multiply-add each


def _cpu_sdpa_backward_flops(grad_shape, q_shape, k_shape, *args, **kwargs) -> int:
    return 2 * _cpu_sdpa_flops(q_shape, k_shape)


def flop_counter() -> FlopCounterMode:
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, *a, **kw: _cpu_sdpa_flops(q, k)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda g, q, k, *a, **kw: _cpu_sdpa_backward_flops(g, q, k)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def device_peak_tflops(device_name: str) -> float:
    """The dense bf16 peak of a device from its name (0 when the table does not know it)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), 0.0)


def peak_tflops(a, dev: torch.device) -> float:
    if a.peak_tflops or dev.type != "cuda":
        return a.peak_tflops
    return device_peak_tflops(torch.cuda.get_device_name(dev))


def bench_backbone(a):
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    common.set_amp(getattr(a, "amp", "auto"))
    model = common.vit(a.arch).to(dev).train()
    opt = common.adamw(common.param_groups(model), lr=1e-4, device=dev)
    x = torch.randn(a.batch, 3, a.img, a.img, device=dev)
    fwd = torch.compile(model) if getattr(a, "compile", False) else model  # FLOPs are counted on the eager model

    def step():
        with common.autocast(dev):
            loss = fwd(x)["patches"].float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with flop_counter() as fc:
        with common.autocast(dev):
            loss = model(x)["patches"].float().pow(2).mean()
        loss.backward()
    flops = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)
    compile_s = 0.0
    if getattr(a, "compile", False):  # the first step compiles: timed apart
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
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
               compile=bool(getattr(a, "compile", False)), compile_s=compile_s,
               threads=torch.get_num_threads(), ms_per_step=1000 * dt, img_per_s=a.batch / dt,
               gflops_per_step=flops / 1e9, tflops_per_s=flops / dt / 1e12, peak_mem_gb=common.peak_memory_gb(dev))
    if peak_tflops(a, dev):
        rec["mfu"] = flops / dt / (peak_tflops(a, dev) * 1e12)
    return rec


def recipe_flops(name: str, preset: str, extra: list[str]) -> float:
    """Counted FLOPs of one training step of the recipe's real command line: in-process runs of
    3 and 1 steps under FlopCounterMode, differenced (one-off work cancels out)."""
    totals = []
    for steps in (1, 3):
        with tempfile.TemporaryDirectory() as tmp:
            argv = [f"{name}.py", "--preset", preset, "--steps", str(steps), "--log_every", "1000000",
                    "--ckpt_every", "1000000", "--num_workers", "0", "--out_dir", tmp] + extra
            old, sys.argv = sys.argv, argv
            try:
                with flop_counter() as fc, contextlib.redirect_stdout(io.StringIO()):
                    runpy.run_path(str(ROOT / f"{name}.py"), run_name="__main__")
            finally:
                sys.argv = old
            totals.append(fc.get_total_flops())
    return (totals[1] - totals[0]) / 2


def bench_recipe(a, name: str):
    script = ROOT / f"{name}.py"
    if not script.is_file():
        raise SystemExit(f"no recipe {script.name}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(script), "--preset", a.preset, "--steps", str(a.steps),
               "--log_every", str(a.log_every), "--ckpt_every", str(10 ** 9), "--out_dir", tmp] + a.extra
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()
                if '"ms_per_step"' in line]
        cfg = json.loads((Path(tmp) / "config.json").read_text())
    steady = rows[1:] or rows  # the first window holds start-up (workers, first batches)
    ms = sorted(r["ms_per_step"] for r in steady)[len(steady) // 2]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rec = dict(what="recipe", recipe=name, preset=a.preset, arch=cfg.get("arch"), batch=cfg["batch_size"],
               steps=a.steps, ms_per_step=ms, img_per_s=cfg["batch_size"] * 1000 / ms,
               peak_mem_gb=max(r["peak_mem_gb"] for r in rows), wall_s=wall, threads=torch.get_num_threads(),
               device=dev.type)
    if a.flops:
        flops = recipe_flops(name, a.preset, a.extra)
        rec.update(gflops_per_step=flops / 1e9, tflops_per_s=flops / (ms / 1000) / 1e12)
        if peak_tflops(a, dev):
            rec["mfu"] = flops / (ms / 1000) / (peak_tflops(a, dev) * 1e12)
    return rec


def bench_data(a):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "data_speed.py"), "--seconds", str(a.seconds)],
                         check=True, capture_output=True, text=True).stdout
    return dict(what="data", tiles_per_s_one_core=float(out.split()[0]), detail=out.strip())


def bench_probe(a):
    import eval_probe
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        r = eval_probe.main(["--ckpt", a.ckpt, "--random_seeds", "0", "--out_dir", tmp, "--examples", "0"])
        wall = time.perf_counter() - t0
    res = r["results"][0]
    return dict(what="probe", ckpt=a.ckpt, probe_s_per_ckpt=res["time_s"], wall_s_with_data_and_raw=wall,
                n_tiles=res["protocol"]["n_train_tiles"] + res["protocol"]["n_val_tiles"],
                threads=torch.get_num_threads())


def markdown(recs: list[dict]) -> str:
    keys = [k for k in recs[0] if k not in ("date", "detail")]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"] +
                     ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in recs])


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
    b.add_argument("--compile", type=common._parse_bool, default=False, help="torch.compile the model")
    b.add_argument("--amp", default="auto", help="auto (bf16 on CUDA) | bf16 | off")
    r = sub.add_parser("recipe")
    r.add_argument("name", help=f"a recipe ({', '.join(RECIPES)}) or all")
    r.add_argument("--preset", default="tiny")
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--log_every", type=int, default=10)
    r.add_argument("--flops", type=common._parse_bool, default=True, help="count FLOPs per step (2 short extra runs)")
    d = sub.add_parser("data")
    d.add_argument("--seconds", type=float, default=15.0)
    q = sub.add_parser("probe")
    q.add_argument("--ckpt", default="random:vit_tiny")
    for x in (b, r, d, q):
        x.add_argument("--json", default="", help="append the records to this JSON-lines file")
        x.add_argument("--peak_tflops", type=float, default=0.0, help="accelerator dense bf16 peak for MFU")
    a, extra = p.parse_known_args()  # flags bench does not know go to the recipe
    if a.what != "recipe" and extra:
        p.error(f"unknown arguments {extra}")
    a.extra = extra
    if a.what == "recipe":
        names = [n for n in RECIPES if (ROOT / f"{n}.py").is_file()] if a.name == "all" else [a.name]
        recs = [bench_recipe(a, n) for n in names]
    else:
        recs = [{"backbone": bench_backbone, "data": bench_data, "probe": bench_probe}[a.what](a)]
    for rec in recs:
        rec.update(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, cpu_count=os.cpu_count())
    print(markdown(recs))
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in recs)


if __name__ == "__main__":
    main()
