"""Learning-signal summary of a run: the recipe's objective against its trivial solution.

  python scripts/learning_signal.py runs/ijepa runs/capi runs/ibot_dino
      for each run dir, the means of its logged metrics over the first and last windows
      (default: the first 100 and the last 200 steps), chosen per recipe:
        mae, ijepa, capi   loss vs `trivial` (predict the patch mean / the mean target /
                           the prototype marginal) and their ratio;
        ibot_dino, dinov3_gram   the DINO loss (dinov3_gram: dino_ce, its mean over view pairs
                           before the local-crop reweighting), teacher entropy and batch entropy against
                           ln K (uniform teacher), plus the KL teacher || student;
        beit               MIM cross-entropy vs the entropy of the batch's masked codes (the best
                           constant prediction), accuracy vs the majority-code rate;
        radio              per teacher (first two): spatial loss vs predicting the teacher's
                           mean feature, summary cosine vs the teacher's mean summary direction.
Prints a Markdown table (one row per run).
"""
import argparse
import json
import math
from pathlib import Path

PER_RECIPE = {
    "mae": ["loss", "trivial", "loss_pix", "trivial_pix", "loss_stats"],  # the last three with --stats_weight
    "ijepa": ["loss", "trivial", "pred_std", "target_std"],
    "capi": ["loss", "trivial", "target_entropy", "prototypes_in_use"],
    "ibot_dino": ["dino", "ibot", "teacher_entropy", "batch_entropy", "kl"],
    "dinov3_gram": ["dino_ce", "ibot", "gram", "teacher_entropy", "batch_entropy", "kl"],
    "beit": ["loss", "trivial", "accuracy", "majority", "ink_accuracy"],
    "radio": [f"{k}_{i}" for i in range(2) for k in ("spatial", "spatial_trivial", "summary_cos",
                                                       "summary_cos_trivial")],
}


def window_means(rows, lo, hi, keys):
    picked = [r for r in rows if lo < r["step"] <= hi]
    return {k: sum(r[k] for r in picked) / len(picked) for k in keys if picked and all(k in r for r in picked)}


def signal(run_dir: Path, first: int = 100, last: int = 200) -> dict:
    """The run's objective vs its trivial solution: window means of the recipe's metrics
    (first `first` steps, last `last` steps) and a one-line summary of them."""
    if not (run_dir / "metrics.jsonl").is_file():
        return dict(steps=0, summary="not a run dir (no metrics.jsonl)")
    cfg = json.loads((run_dir / "config.json").read_text())
    argv = json.loads((run_dir / "run_info.json").read_text()).get("argv", "")
    recipe = Path(argv.split()[0]).stem if argv else run_dir.name  # the script that wrote the run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    if not rows:
        return dict(recipe=recipe, steps=0, summary="no logged steps")
    if recipe == "dinov3_gram":  # the logged `dino` weighs local-crop pairs by local_weight (0.5 after the
        n = cfg["n_local"]        # Gram ramp): the mean cross-entropy over the pairs is what compares with ln K
        for r in rows:
            r["dino_ce"] = r["dino"] * (1 + n) / (1 + n * r.get("local_weight", 1.0))
    end = rows[-1]["step"]
    keys = PER_RECIPE.get(recipe, ["loss"])
    a, b = window_means(rows, 0, first, keys), window_means(rows, end - last, end, keys)
    cells = [f"{k} {a.get(k, float('nan')):.3g} -> {b[k]:.3g}" for k in keys if k in b]  # e.g. no ibot in dino
    if "trivial" in b:
        cells.append(f"loss / trivial (last {last}) {b['loss'] / b['trivial']:.2f}")
    if "trivial_pix" in b:
        cells.append(f"pixels / trivial (last {last}) {b['loss_pix'] / b['trivial_pix']:.2f}")
    if "n_prototypes" in cfg and recipe in ("ibot_dino", "dinov3_gram", "capi"):
        cells.append(f"ln K {math.log(cfg['n_prototypes']):.2f}")
    return dict(recipe=recipe, variant=cfg.get("variant"), steps=end, first=a, last=b, summary="; ".join(cells))


def summarise(run_dir: Path, first: int, last: int) -> str:
    s = signal(run_dir, first, last)
    name = run_dir.name + (f" ({s['variant']})" if s.get("variant") else "")
    return f"| {name} | {s['steps']} | {s['summary']} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs (with config.json and metrics.jsonl)")
    ap.add_argument("--first", type=int, default=100, help="first window: steps 1..first")
    ap.add_argument("--last", type=int, default=200, help="last window: the last this many steps")
    a = ap.parse_args()
    print(f"| run | steps | first {a.first} steps -> last {a.last} steps (means) |\n|---|---|---|")
    for run in a.runs:
        print(summarise(run, a.first, a.last))


if __name__ == "__main__":
    main()
