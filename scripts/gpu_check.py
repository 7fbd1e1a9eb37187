"""GPU check: every recipe's `small` preset for a few dozen steps on the visible CUDA devices, in
bf16 autocast through its real command line; then the backbone alone. One prepared script, sized
to fit in about 8 minutes on one H100-class GPU.

  python scripts/gpu_check.py                       # on a CUDA machine
  python scripts/gpu_check.py --budget_s 300        # fewer steps per recipe
  python scripts/gpu_check.py --dry_run             # the same plan on the CPU at toy size (the suite runs it)

For each recipe (ViT-S/16, 224 px, `--preset small` with the batch set by --batch_size):
  - a run of --steps steps, checkpoints at step 20 (kept), logged every 10 steps: ms/step and
    img/s (median of the windows after the first), data_ms/step (time the loop waited for the
    data workers: near ms/step means the workers starve the GPU), peak memory, finite losses;
    on CUDA the loop body (from the third step on, without Run.step's logging and checkpoints)
    runs under torch.cuda.set_sync_debug_mode: every code line that made the host wait for the
    device is reported with its syncs per step;
  - a resume from the step-20 checkpoint, compared with the uninterrupted run over the next
    logging window (relative difference of the mean loss of steps 21-30);
  - FLOPs per step counted by scripts/bench.py's counter (torch FlopCounterMode, the difference of
    a 3-step and a 1-step in-process run) at --flops_batch images and scaled to the batch (every
    op of these models is per image, bar a few O(B^2 D) batch statistics); MFU = FLOPs / step time
    / the device's dense bf16 peak (PEAK_BF16_TFLOPS in bench.py, keyed by device name); `mfu`
    counts the whole step, `mfu_compute` the step without the data wait.
With 2+ GPUs, each recipe again under `torchrun --nproc_per_node=2` (NCCL).
Then the backbone alone: ViT-S/B/L forward+backward img/s, eager and torch.compile.
Writes one JSON line per measurement to results/gpu_<device>.jsonl and a Markdown table to
results/gpu_<device>.md (--out_dir to put them elsewhere).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import bench  # noqa: E402

RECIPES = bench.RECIPES
RESUME_AT = 20  # the checkpoint step the resume starts from (dry run: 2)

# Flags each recipe needs beyond --preset small for a check of a few dozen steps.
EXTRA = {
    "beit": ["--tokenizer_steps", "3", "--tokenizer_batch_size", "64"],  # a short tokenizer stage; MIM is timed
    "radio": ["--teachers", "random:vit_base:1,random:vit_small:2", "--phis_batches", "4"],
}
# The dry run: toy sizes that run in seconds on a CPU (the recipes' own test settings).
DRY = {
    "mae": ["--decoder_depth", "1", "--decoder_dim", "64", "--decoder_heads", "2"],
    "ijepa": ["--img_size", "96", "--min_keep", "4", "--pred_depth", "1"],
    "capi": ["--n_prototypes", "8", "--pred_depth", "1"],
    "beit": ["--tokenizer_steps", "2", "--tokenizer_depth", "1", "--decoder_depth", "1", "--codebook_size", "16",
             "--warmup_steps", "2", "--tokenizer_warmup_steps", "2", "--dead_code_steps", "2"],
    "ibot_dino": ["--n_local", "2", "--n_prototypes", "64", "--head_hidden", "32", "--head_bottleneck", "16"],
    "dinov3_gram": ["--n_local", "2", "--n_prototypes", "64", "--head_hidden", "32", "--head_bottleneck", "16"],
    "radio": ["--teachers", "random:vit_test:1,random:vit_test:2", "--low_res", "32", "--high_res", "48",
              "--adaptor_hidden", "16", "--phis_batches", "2", "--warmup_steps", "2"],
}

# Runs the recipe with CUDA sync debugging on, counting the code lines that synchronise.
SYNC_WRAPPER = r"""
import collections, json, runpy, sys, traceback, warnings
from pathlib import Path
import torch
root, report, script = sys.argv[1], sys.argv[2], sys.argv[3]
counts = collections.Counter()
def record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return
    frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root) and "/scripts/" not in f.filename]
    counts[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][:3]) or "outside the project"] += 1
if torch.cuda.is_available():  # watch the loop body from the third step on, not logging or checkpoints
    import common
    warnings.showwarning = record
    warnings.simplefilter("always")
    run_step = common.Run.step
    def step(self, index, *args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return run_step(self, index, *args, **kwargs)
        finally:  # from the third step's body on; off after the last step (exports, the next stage's set-up)
            torch.cuda.set_sync_debug_mode("warn" if 1 <= index < self.cfg.steps - 1 else 0)
    common.Run.step = step
sys.argv = [script] + sys.argv[4:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    Path(report).write_text(json.dumps(counts))
"""


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run_logged(cmd: list, log: Path, timeout: float) -> float:
    """Run a command, its output to `log`; raise with the log's tail if it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"exit {res.returncode}: {' '.join(map(str, cmd))}\n" + log.read_text()[-3000:])
    return time.perf_counter() - t0


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def start_from(src: Path, dst: Path, step: int):
    """A copy of run dir `src` whose newest checkpoint is the one of `step`, without its metrics."""
    shutil.copytree(src, dst)
    (dst / "metrics.jsonl").unlink()
    name = f"step_{step:07d}"
    ckpts = dst / "checkpoint"
    if not (ckpts / name).is_dir():
        raise RuntimeError(f"no checkpoint {name} in {src}")
    for d in ckpts.iterdir():
        if d.is_dir() and d.name != name:
            shutil.rmtree(d)
    (ckpts / "latest").write_text(name)


def check_recipe(a, name: str, tmp: Path, nproc: int = 0) -> dict:
    script = str(ROOT / f"{name}.py")
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
            if nproc else [sys.executable, "-c", SYNC_WRAPPER, str(ROOT), str(tmp / f"{name}_sync.json"), script])
    extra = (["--arch", "vit_test"] + DRY.get(name, []) if a.dry_run else EXTRA.get(name, []))
    preset = "tiny" if a.dry_run else "small"
    common_args = ["--preset", preset, "--batch_size", str(a.batch_size * max(nproc, 1)), "--amp", "bf16",
                   "--num_workers", str(a.num_workers), "--compile", str(a.compile).lower()] + extra
    ref = tmp / f"{name}_ref{nproc or ''}"
    log_every = 1 if a.dry_run else 10
    cmd = head + common_args + ["--steps", str(a.steps), "--log_every", str(log_every), "--ckpt_every",
                                str(a.resume_at), "--keep_ckpts", str(a.steps // a.resume_at), "--out_dir", str(ref)]
    wall = run_logged(cmd, tmp / f"{ref.name}.log", a.timeout)
    rows = [r for r in metrics(ref) if "ms_per_step" in r]
    steady = rows[1:] or rows
    mid = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    ms = mid([r["ms_per_step"] for r in steady])
    data_ms = mid([r["data_ms_per_step"] for r in steady])
    losses = [r["loss"] for r in rows]
    rec = dict(what="recipe", recipe=name, preset=preset, nproc=max(nproc, 1), batch=a.batch_size * max(nproc, 1),
               steps=a.steps, ms_per_step=ms, img_per_s=a.batch_size * max(nproc, 1) * 1000 / ms, data_ms_per_step=data_ms,
               peak_mem_gb=max(r["peak_mem_gb"] for r in rows), finite=all(math.isfinite(v) for v in losses),
               first_loss=losses[0], last_loss=losses[-1], wall_s=wall)
    if nproc:
        return rec
    sync_file = tmp / f"{name}_sync.json"
    if sync_file.is_file():
        counts = json.loads(sync_file.read_text())
        watched = a.steps - 2  # the loop bodies of steps 3..steps
        rec["syncs_per_step"] = {k: round(v / watched, 2) for k, v in counts.items()}
        rec["syncs_total"] = sum(counts.values())
    # resume from the step-RESUME_AT checkpoint: the next window's mean loss must match
    try:
        res = tmp / f"{name}_resume"
        start_from(ref, res, a.resume_at)
        run_logged([sys.executable, script, "--out_dir", str(res), "--resume"], tmp / f"{name}_resume.log", a.timeout)
        ref_next = next(r["loss"] for r in rows if r["step"] > a.resume_at)
        res_next = metrics(res)[0]["loss"]
        rec.update(resume_loss=res_next, ref_loss=ref_next,
                   resume_rel_diff=abs(res_next - ref_next) / max(abs(ref_next), 1e-12))
    except Exception as e:  # the timing above still counts
        rec["resume_error"] = str(e)
    # counted FLOPs per step
    fb = min(a.flops_batch, a.batch_size)
    flops = bench.recipe_flops(name, preset, ["--batch_size", str(fb), "--amp", "bf16"] + extra) * a.batch_size / fb
    peak = bench.device_peak_tflops(device_name()) if torch.cuda.is_available() else 0.0
    rec.update(gflops_per_step=flops / 1e9, tflops_per_s=flops / (ms / 1000) / 1e12)
    if peak:
        rec["mfu"] = flops / (ms / 1000) / (peak * 1e12)
        rec["mfu_compute"] = flops / (max(ms - data_ms, 1e-3) / 1000) / (peak * 1e12)
    return rec


def check_backbones(a, emit, deadline: float):
    archs = ["vit_test"] if a.dry_run else a.archs.split(",")
    for arch in archs:
        for compiled in {"both": (False, True), "eager": (False,), "compiled": (True,)}[a.backbone_compile]:
            if time.perf_counter() > deadline - (100 if compiled and not a.dry_run else 20):  # compiling takes ~1 min
                emit(dict(what="skipped", recipe=f"{arch} compile={compiled}", reason="--budget_s spent"))
                continue
            ns = argparse.Namespace(arch=arch, img=32 if a.dry_run else 224, batch=2 if a.dry_run else a.backbone_batch,
                                    steps=2 if a.dry_run else 10, warmup=1 if a.dry_run else 3, device="",
                                    peak_tflops=0.0, compile=compiled, amp="bf16")
            emit(bench.bench_backbone(ns))


def markdown(recs: list, dev: str) -> str:
    f = lambda v, d=1: "" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# GPU check: {dev}", "", f"`{' '.join(['python'] + sys.argv)}`", ""]
    env = next((r for r in recs if r["what"] == "env"), {})
    lines += [f"torch {env.get('torch')}, {env.get('n_gpus')} GPU(s), dense bf16 peak {env.get('peak_tflops')} "
              "TFLOP/s (vendor figure) used for MFU.", ""]
    rows = [r for r in recs if r["what"] == "recipe"]
    if rows:
        lines += ["| recipe | GPUs | batch | ms/step | img/s | data wait ms/step | peak GB | GFLOP/step | MFU | "
                  "MFU w/o data wait | finite | resume rel. diff | syncs in the step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            syncs = "; ".join(f"{k} x{v}" for k, v in r.get("syncs_per_step", {}).items()) or \
                ("none" if "syncs_total" in r else "")
            lines.append(f"| {r['recipe']} | {r['nproc']} | {r['batch']} | {f(r['ms_per_step'])} | "
                         f"{f(r['img_per_s'], 0)} | {f(r['data_ms_per_step'])} | {f(r['peak_mem_gb'], 2)} | "
                         f"{f(r.get('gflops_per_step'), 0)} | {f(r.get('mfu'), 3)} | {f(r.get('mfu_compute'), 3)} | "
                         f"{r['finite']} | {f(r.get('resume_rel_diff'), 6)} | {syncs} |")
        lines.append("")
    rows = [r for r in recs if r["what"] == "backbone"]
    if rows:
        lines += ["| backbone | img | batch | compile | ms/step | img/s | TFLOP/s | MFU | peak GB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['arch']} | {r['img']} | {r['batch']} | {r['compile']} | {f(r['ms_per_step'])} | "
                         f"{f(r['img_per_s'], 0)} | {f(r['tflops_per_s'])} | {f(r.get('mfu'), 3)} | "
                         f"{f(r['peak_mem_gb'], 2)} |")
        lines.append("")
    lines += [f"- error in {r['recipe']}: `{r['error'].splitlines()[0]}`" for r in recs if r["what"] == "error"]
    lines += [f"- skipped {r['recipe']}: {r['reason']}" for r in recs if r["what"] == "skipped"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="the plan on the CPU at toy size (vit_test, batch 2)")
    p.add_argument("--budget_s", type=float, default=480.0, help="wall-clock target; sets the steps per recipe")
    p.add_argument("--recipes", default="all", help=f"comma-separated subset of {','.join(RECIPES)}")
    p.add_argument("--batch_size", type=int, default=0, help="per-GPU batch (default 128; dry run 2)")
    p.add_argument("--flops_batch", type=int, default=8, help="batch at which FLOPs are counted (scaled up)")
    p.add_argument("--backbone_batch", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=0, help="data workers per rank (default: cores - 2, max 14)")
    p.add_argument("--compile", action="store_true", help="also torch.compile each recipe's model")
    p.add_argument("--skip_backbones", action="store_true")
    p.add_argument("--archs", default="vit_small,vit_base,vit_large", help="backbones timed alone")
    p.add_argument("--backbone_compile", default="both", choices=("both", "eager", "compiled"))
    p.add_argument("--out_dir", default="results", help="where gpu_<device>.jsonl/.md go")
    a = p.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run on a GPU machine, or --dry_run to test the plan on the CPU")
    names = RECIPES if a.recipes == "all" else a.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {RECIPES}")
    n_gpus = torch.cuda.device_count()
    a.batch_size = a.batch_size or (2 if a.dry_run else 128)
    a.num_workers = a.num_workers or (0 if a.dry_run else max(1, min(14, (os.cpu_count() or 4) - 2)))
    a.resume_at = 2 if a.dry_run else RESUME_AT
    # ~60% of the budget for the recipes: a fixed start-up cost each, then the steps
    per_recipe = 0.6 * a.budget_s / len(names)
    a.steps = a.resume_at + 2 if a.dry_run else int(min(60, max(RESUME_AT + 10, (per_recipe - 35) / 0.5)) // 10 * 10)
    a.timeout = max(120.0, 2 * per_recipe)
    dev = device_name()
    tag = "cpu_dry_run" if a.dry_run else dev.replace("NVIDIA ", "").replace(" ", "_").lower()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / f"gpu_{tag}.jsonl", out / f"gpu_{tag}.md"
    peak = bench.device_peak_tflops(dev) if torch.cuda.is_available() else 0.0
    recs = []
    t_start = time.perf_counter()

    def emit(rec: dict):  # written as it comes: a run cut short keeps what it measured
        rec["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        recs.append(rec)
        print(json.dumps(rec), flush=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        md.write_text(markdown(recs, dev))

    emit(dict(what="env", device=dev, n_gpus=n_gpus, torch=torch.__version__, peak_tflops=peak,
              cpu_count=os.cpu_count(), steps=a.steps, batch=a.batch_size, num_workers=a.num_workers,
              date=time.strftime("%Y-%m-%d")))
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        plans = [(n, 0) for n in names] + ([(n, 2) for n in names] if n_gpus >= 2 else [])
        for name, nproc in plans:
            try:
                emit(check_recipe(a, name, tmp, nproc))
            except Exception as e:  # one recipe's failure is a finding; the others still run
                emit(dict(what="error", recipe=name, nproc=max(nproc, 1), error=str(e)))
    if not a.skip_backbones:
        check_backbones(a, emit, deadline=t_start + a.budget_s)
    emit(dict(what="total", wall_s=time.perf_counter() - t_start))
    print(md.read_text())
    print(f"wrote {jsonl} and {md}")
    return recs


if __name__ == "__main__":
    main()
