"""The construction-sheet bake-off: every recipe, the same data, the same budget in images
seen, one frozen probe.

  python scripts/bakeoff.py --preset tiny                    # 2-core CPU, resumable over sittings
  python scripts/bakeoff.py --preset tiny --only mae,capi    # some entries (names: --list)
  python scripts/bakeoff.py --preset tiny --report           # only rebuild the table from results/
  python scripts/bakeoff.py --preset small --data /sheets --images 20000000 \
      --launch "torchrun --standalone --nproc_per_node=8" --dinov3 dinov3_vits16_pretrain_lvd1689m-08c60483.pth

For each entry, in dependency order (teachers before BEiT-vqkd and RADIO): train
`<recipe>.py --preset P --steps ceil(images / batch_size)` into runs/bakeoff_<P>/<entry>
(an interrupted run is continued with --resume), then probe its backbone with eval_probe.py
(the random-init baseline of the same architecture, 3 seeds, is probed once per
architecture). Each finished training and probe writes a small JSON under
results/bakeoff_<P>/ (commit those; checkpoints stay in runs/), and a rerun skips what is
finished. The table results/bakeoff_<P>.md and the per-block mIoU curves of every entry in
results/bakeoff_<P>_curves.png are assembled from those files, with the hardware, budget,
commits, dates and the total compute they took.

Budget: images seen = steps x global batch (source images; multi-crop views of one image
count once). BEiT's tokenizer stage (its preset's steps) and RADIO's teachers (the bake-off's
own MAE and continual-DINOv3 runs, as in radio.py's tiny preset) come on top of it. The tiny default, 38,400 images, is DINO's tiny preset (1,200 steps x 32): the
multi-crop recipes are the most expensive per image, so every tiny run stays near 20 min.
"""
import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import common  # noqa: E402
import eval_probe  # noqa: E402
import learning_signal  # noqa: E402

# name: (recipe file, its own flags, entries it needs first). {run:NAME} is that entry's run dir.
ENTRIES = {
    "mae": ("mae", [], []),
    "ijepa": ("ijepa", [], []),
    "capi": ("capi", [], []),
    "dino": ("ibot_dino", ["--variant", "dino"], []),
    "ibot": ("ibot_dino", ["--variant", "ibot"], []),
    "dinov2": ("ibot_dino", ["--variant", "dinov2"], []),
    "dinov3_gram": ("dinov3_gram", [], []),
    "dinov3_nogram": ("dinov3_gram", ["--gram_weight", "0"], []),
    # continual pretraining: DINOv3 from the MAE run, its Gram teacher anchored to that init
    # (the stand-in for official DINOv3 weights at tiny scale; also RADIO's second teacher)
    "dinov3_continual": ("dinov3_gram", ["--init", "{run:mae}/backbone.safetensors", "--gram_start", "100",
                                         "--gram_max_refreshes", "0"], ["mae"]),
    "beit_vqvae": ("beit", ["--tokenizer", "vqvae"], []),
    "beit_vqkd": ("beit", ["--tokenizer", "vqkd", "--teacher", "{run:mae}/backbone.safetensors"], ["mae"]),
    "radio": ("radio", ["--teacher", "{run:mae}/backbone.safetensors", "--teacher",
                        "{run:dinov3_continual}/backbone.safetensors"], ["mae", "dinov3_continual"]),
}
DEFAULT_IMAGES = {"tiny": 38_400, "small": 20_000_000, "base": 40_000_000}


def recipe_config(recipe: str, argv: list[str]):
    """The recipe's resolved config for argv (its dataclass, presets and defaults)."""
    mod = importlib.import_module(recipe)
    argv = getattr(mod, "teacher_flags", lambda x: x)(list(argv))  # radio's repeated --teacher PATH[:w]
    cls = next(v for v in vars(mod).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
               and issubclass(v, common.TrainConfig) and v.__module__ == mod.__name__)
    return common.parse_config(cls, mod.PRESETS, recipe, argv)


def run_dirs_in(flag: str, runs_dir: str) -> str:
    """`{run:NAME}` -> that entry's run dir (str.format would read `:NAME` as a format spec)."""
    for n in ENTRIES:
        flag = flag.replace("{run:" + n + "}", str(Path(runs_dir) / n))
    if "{run:" in flag:
        raise SystemExit(f"unknown entry in {flag!r}; entries: {list(ENTRIES)}")
    return flag


def entry_command(name: str, a) -> tuple[list[str], Path]:
    recipe, flags, _ = ENTRIES[name]
    run_dir = Path(a.runs_dir) / name
    flags = [run_dirs_in(f, a.runs_dir) for f in flags]
    base = ["--preset", a.preset, "--data", a.data, "--out_dir", str(run_dir)] + flags
    batch = recipe_config(recipe, base).batch_size
    argv = base + ["--steps", str(math.ceil(a.images / batch))]
    return shlex.split(a.launch) + [f"{recipe}.py"] + argv, run_dir


def check_run_dir(name: str, cmd: list[str], run_dir: Path):
    """A run dir left by an earlier sitting (or moved in) must hold the run this entry plans:
    the same resolved config, whatever the command line that started it."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return
    recipe_file = next(c for c in cmd if c.endswith(".py"))
    planned = dataclasses.asdict(recipe_config(Path(recipe_file).stem, cmd[cmd.index(recipe_file) + 1:]))
    got = json.loads(saved.read_text())
    diff = {k: (got.get(k), v) for k, v in planned.items() if k not in ("out_dir", "resume")
            and json.dumps(got.get(k)) != json.dumps(v)}
    if diff:
        raise SystemExit(f"{run_dir} holds a different run than entry {name} plans (saved, planned): {diff}; "
                         "move it away or pass another --runs_dir")


def write_json(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # a crash never leaves half a results file


def finished(run_dir: Path, steps: int) -> bool:
    """A stopped run also exports its backbone: finished means its last checkpoint is the last step."""
    ckpt = common.latest_checkpoint(run_dir)
    return (run_dir / "backbone.safetensors").is_file() and ckpt is not None and \
        int(ckpt.name.split("_")[-1]) >= steps


def run_training(name: str, cmd: list[str], run_dir: Path, a, why: str = ""):
    """Train (or continue with --resume) one entry's run dir up to its last step."""
    check_run_dir(name, cmd, run_dir)
    if finished(run_dir, int(cmd[cmd.index("--steps") + 1])):
        return
    resume = common.latest_checkpoint(run_dir) is not None
    print(f"[bakeoff] {'resuming' if resume else 'training'} {name}{why}: {shlex.join(cmd)}", flush=True)
    if not a.dry_run:
        exe = [sys.executable] + cmd[1:] if cmd[0] == "python" else cmd
        subprocess.run(exe + (["--resume"] if resume else []), cwd=ROOT, check=True)


def recipe_argv(cmd: list[str]) -> list[str]:
    """The recipe file and its flags, without the launcher (python / torchrun ...)."""
    i = next(i for i, c in enumerate(cmd) if c.endswith(".py"))
    return cmd[i:]


def ensure_teachers(name: str, a, res: Path):
    """An entry's teachers must be on disk. Results files are committed but run dirs are not, so
    on a fresh clone a finished teacher has its results and no backbone: it is trained again
    with the command its results record (that command under today's presets: a preset changed since
    would need the teacher's results deleted and rerun; floating-point results may differ in the last
    bits with another thread count)."""
    for dep in ENTRIES[name][2]:
        rec = res / f"{dep}.train.json"
        if not rec.is_file():
            raise SystemExit(f"{name} needs {dep} first (run it, or drop {name} from --only)")
        cmd, run_dir = entry_command(dep, a)
        if finished(run_dir, int(cmd[cmd.index("--steps") + 1])):
            continue
        recorded = shlex.split(json.loads(rec.read_text())["command"])
        if recipe_argv(recorded) != recipe_argv(cmd):
            raise SystemExit(f"{name} needs {dep}'s backbone, which is not in {run_dir}, and {rec} records another "
                             f"command ({shlex.join(recorded)}) than the bake-off now plans ({shlex.join(cmd)}): "
                             f"delete {rec} and its .probe.json to rerun {dep}")
        ensure_teachers(dep, a, res)
        run_training(dep, cmd, run_dir, a, why=f" again (a teacher of {name}; its run dir is not in this checkout)")


def train(name: str, a, res: Path) -> dict:
    out = res / f"{name}.train.json"
    if out.is_file():
        return json.loads(out.read_text())
    cmd, run_dir = entry_command(name, a)
    ensure_teachers(name, a, res)
    t0 = time.time()
    run_training(name, cmd, run_dir, a)
    if a.dry_run:
        return {}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    cfg = json.loads((run_dir / "config.json").read_text())
    steady = sorted(r["ms_per_step"] for r in rows[1:] or rows)
    rec = dict(entry=name, command=shlex.join(cmd), steps=cfg["steps"], batch_size=cfg["batch_size"],
               images=cfg["steps"] * cfg["batch_size"], arch=cfg.get("arch"),
               ms_per_step_median=steady[len(steady) // 2], wall_s_this_sitting=round(time.time() - t0),
               train_s=round(sum(r["ms_per_step"] for r in rows) * (cfg.get("log_every", 1)) / 1000),
               signal=learning_signal.signal(run_dir), run_info=json.loads((run_dir / "run_info.json").read_text()))
    write_json(out, rec)
    return rec


def arch_key(arch: dict) -> str:
    return f"{eval_probe.arch_name(arch)}-{hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:8]}"


def probe(name: str, ckpt: str, a, res: Path) -> dict:
    out = res / f"{name}.probe.json"
    if out.is_file():
        return json.loads(out.read_text())
    if a.dry_run:
        print(f"[bakeoff] probe {name}: {ckpt}")
        return {}
    arch = common.load_backbone(ckpt).arch
    base_file = res / f"random_{arch_key(arch)}.probe.json"
    seeds = 0 if base_file.is_file() else a.random_seeds  # the baseline once per architecture
    print(f"[bakeoff] probing {name}" + (f" and random init of its architecture ({seeds} seeds)" if seeds else ""),
          flush=True)
    r = eval_probe.main(["--ckpt", ckpt, "--out_dir", str(Path(a.runs_dir) / "probe" / name),
                         "--random_seeds", str(seeds), "--data", a.probe_data])
    keep = lambda x: dict(name=x["name"], arch=x.get("arch"), dense=x["dense"], global_=x.get("global"),  # noqa: E731
                          diagnostics=x.get("diagnostics"), time_s=x.get("time_s", 0.0), run_info=x["run_info"])
    if seeds:
        write_json(base_file, dict(arch=arch, seeds=[keep(b) for b in r["baseline"]], raw=keep(r["raw"])
                                   | dict(oracle=r["raw"]["oracle"]), protocol=r["results"][0]["protocol"]))
    rec = keep(r["results"][0]) | dict(entry=name, ckpt=ckpt, baseline=base_file.name)
    write_json(out, rec)
    return rec


def miou_curve(r: dict) -> dict[int, float]:
    return {int(k): v["miou"] for k, v in r["dense"]["layers"].items()}


def report(a, res: Path, names: list[str]) -> str:
    """results/bakeoff_<preset>.md and _curves.png from the results files that exist."""
    rows, curves, infos, total_s, band, baselines = [], {}, [], 0.0, None, set()
    header = ("| entry | recipe command flags | steps x batch = images | ms/step as logged (median) | objective vs trivial "
              "(last 200 steps) | best mIoU (block) | last-block mIoU | random init, same arch (3 seeds) | "
              "best - random | eff. rank | cos(CLS, patch) |")
    for name in names + (["dinov3_official"] if a.dinov3 else []):
        t = json.loads((res / f"{name}.train.json").read_text()) if (res / f"{name}.train.json").is_file() else None
        p = json.loads((res / f"{name}.probe.json").read_text()) if (res / f"{name}.probe.json").is_file() else None
        if p is None:
            rows.append(f"| {name} | " + ("trained, not probed yet" if t else "not run yet") + " |" + " |" * 9)
            continue
        b = json.loads((res / p["baseline"]).read_text())
        rnd = [s["dense"]["best_miou"] for s in b["seeds"]]
        m, sd = 100 * sum(rnd) / len(rnd), 100 * (sum((x - sum(rnd) / len(rnd)) ** 2 for x in rnd)
                                                   / max(len(rnd) - 1, 1)) ** 0.5
        d, g = p["dense"], p["diagnostics"]
        total_s += p["time_s"] + (0 if p["baseline"] in baselines else sum(s["time_s"] for s in b["seeds"]))
        baselines.add(p["baseline"])
        flags = " ".join(ENTRIES[name][1]).replace("{run:", "{") if name in ENTRIES else "official weights"
        if t:
            total_s += t["train_s"]
            infos.append(t["run_info"])
        train_cells = (f"{t['steps']} x {t['batch_size']} = {t['images']:,} | {t['ms_per_step_median']:.0f} | "
                       f"{t['signal']['summary']}") if t else "– | – | –"
        rows.append(f"| {name} | {flags} | {train_cells} | {100 * d['best_miou']:.1f} ({d['best_layer']}) | "
                    f"{100 * d['last_miou']:.1f} | {m:.1f} ± {sd:.1f} | {100 * d['best_miou'] - m:+.1f} | "
                    f"{g['effective_rank']:.1f} | {g['cls_patch_cos']:.2f} |")
        curves[name] = miou_curve(p)
        if band is None:
            per = [miou_curve(s) for s in b["seeds"]]
            lay = sorted(per[0])
            mean = [sum(c[l] for c in per) / len(per) for l in lay]
            std = [(sum((c[l] - mu) ** 2 for c in per) / max(len(per) - 1, 1)) ** 0.5 for l, mu in zip(lay, mean)]
            band = (lay, mean, std, eval_probe.arch_name(b["arch"]))
    hw = sorted({f"{i.get('cpu_count')} x {i.get('cpu')} CPU cores, GPU: {i.get('gpu') or 'none'}, "
                 f"torch {i.get('torch')}" for i in infos})
    commits = sorted({i.get("commit", "?") for i in infos})
    dates = sorted({i.get("date", "?")[:10] for i in infos})
    md = "\n".join([
        f"# Bake-off, preset {a.preset}: {a.images:,} images seen per recipe, data `{a.data}`", "",
        "Tiny models on a CPU budget and synthetic sheets: the figures say which recipes learn anything at this "
        "scale, not how they rank at scale. Rerun at scale with the same command and `--preset small` "
        "(see the script's docstring)." if a.preset == "tiny" else "", "",
        header, "|---" * 11 + "|", *rows, "",
        f"Probe: eval_probe.py defaults (data `{a.probe_data}`), dense mIoU (%) of a linear probe per block; "
        "best block picked on the held-out split; the random-init baseline has the entry's own architecture. "
        "Objective vs trivial: the recipe's loss against its trivial solution (scripts/learning_signal.py). "
        "Step times are as the runs logged them (runs may have shared the machine); scripts/bench.py measures "
        "clean ones.",
        f"Hardware: {'; '.join(hw) or '–'}. Commits: {', '.join(commits) or '–'}. Dates: {', '.join(dates) or '–'}.",
        f"Total compute: {total_s / 3600:.2f} h of wall time (training steps as logged + probes).",
        f"Curves: [bakeoff_{a.preset}_curves.png](bakeoff_{a.preset}_curves.png).", ""])
    (ROOT / "results" / f"bakeoff_{a.preset}.md").write_text(md)
    if curves:
        lay, mean, std, an = band
        eval_probe.save_curve(ROOT / "results" / f"bakeoff_{a.preset}_curves.png", curves, {}, (lay, mean, std),
                              f"Bake-off ({a.preset}): mIoU per block; band: random init {an} (mean +- std)")
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--data", default="synthetic", help="training sheets (every recipe's --data)")
    ap.add_argument("--probe_data", default="synthetic", help="eval_probe.py --data (a labeled folder or synthetic)")
    ap.add_argument("--images", type=int, default=0, help="images seen per recipe (default: per preset)")
    ap.add_argument("--only", default="", help="comma list of entries (default: all, in dependency order)")
    ap.add_argument("--launch", default="python", help="launcher prefix (python: this interpreter), e.g. "
                    "'torchrun --standalone --nproc_per_node=8' or a multi-node torchrun line")
    ap.add_argument("--runs_dir", default="", help="run dirs (default runs/bakeoff_<preset>)")
    ap.add_argument("--dinov3", default="", help="official DINOv3 .pth to probe beside the recipes")
    ap.add_argument("--random_seeds", type=int, default=3)
    ap.add_argument("--report", action="store_true", help="only assemble the table from results/")
    ap.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--list", action="store_true", help="print the entries and exit")
    a = ap.parse_args()
    if a.list:
        for n, (r, f, d) in ENTRIES.items():
            print(f"{n:17s} {r}.py {' '.join(f)}" + (f"   (after {', '.join(d)})" if d else ""))
        return
    a.images = a.images or DEFAULT_IMAGES[a.preset]
    a.runs_dir = a.runs_dir or f"runs/bakeoff_{a.preset}"
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(ENTRIES)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        ap.error(f"unknown entries {unknown}; choose from {list(ENTRIES)}")
    missing = [ENTRIES[n][0] for n in names if not (ROOT / f"{ENTRIES[n][0]}.py").is_file()]
    if missing:
        ap.error(f"recipe files not found: {sorted(set(missing))}")
    names = [n for n in ENTRIES if n in names]  # dependency order
    res = ROOT / "results" / f"bakeoff_{a.preset}"
    if not a.report:
        for name in names:
            train(name, a, res)
            if not a.dry_run:
                probe(name, str(Path(a.runs_dir) / name / "backbone.safetensors"), a, res)
        if a.dinov3 and not a.dry_run:
            probe("dinov3_official", a.dinov3, a, res)
    if not a.dry_run:  # the table always covers every entry, whichever ones this call ran
        print(report(a, res, list(ENTRIES)))


if __name__ == "__main__":
    main()
