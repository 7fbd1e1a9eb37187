"""Export the backbone of an intermediate training checkpoint, for probing a run at several points.

  python scripts/export_step.py runs/dinov2_p8_60 --step 500 --step 1000
      writes runs/dinov2_p8_60/s500.safetensors and s1000.safetensors, readable by
      `eval_probe.py --ckpt` like the run's own backbone.safetensors

A run's checkpoints hold every model of the recipe (student, teacher, heads, predictor); the
exported backbone is the one the recipe's `run.finish` writes (the EMA teacher for the DINO
family and CAPI, the target encoder for I-JEPA, the encoder for MAE and BEiT). Which one that is
is found, not assumed: the prefix whose tensors in the run's last checkpoint equal the finished
run's backbone.safetensors (`--prefix` overrides it). The architecture is read from that file, so
the run must have finished.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def step_weights(run: Path, step: int) -> Path:
    p = run / "checkpoint" / f"step_{step:07d}" / "weights.safetensors"
    if not p.is_file():
        kept = sorted(d.name for d in (run / "checkpoint").glob("step_*")) if (run / "checkpoint").is_dir() else []
        raise SystemExit(f"{p} not found; checkpoints kept in {run}: {kept or 'none'} "
                         f"(raise --keep_ckpts to keep more)")
    return p


def find_prefix(run: Path) -> str:
    """The prefix under which the run's last checkpoint holds the exported backbone."""
    final = run / "backbone.safetensors"
    last = common.latest_checkpoint(run)
    if not final.is_file() or last is None:
        raise SystemExit(f"{run}: no backbone.safetensors or no checkpoint to find the backbone's prefix; "
                         f"pass --prefix (e.g. teacher.backbone.)")
    bb, _ = common.read_safetensors(final)
    ck, _ = common.read_safetensors(last / "weights.safetensors")
    key = next(iter(bb))
    found = []
    for k in ck:
        if k.endswith(key):
            pre = k[: len(k) - len(key)]
            if all(pre + b in ck and torch.equal(ck[pre + b].float(), bb[b].float()) for b in bb):
                found.append(pre)
    if len(found) != 1:
        raise SystemExit(f"{run}: {len(found)} models in {last.name} equal backbone.safetensors "
                         f"({found}); pass --prefix")
    return found[0]


def export(run: Path, step: int, prefix: str, out: Path) -> Path:
    final = run / "backbone.safetensors"
    if not final.is_file():
        raise SystemExit(f"{final} not found: the architecture is read from the finished run's export")
    _, meta = common.read_safetensors(final)
    sd, _ = common.read_safetensors(step_weights(run, step))
    sd = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise SystemExit(f"{run} step {step}: no tensors under prefix {prefix!r}")
    model = common.ViT(**json.loads(meta["arch"]))
    common.load_state_strict(model, sd, f"{run} step {step} prefix {prefix}")
    common.save_backbone(model, out, recipe=meta.get("recipe", ""), step=step, source_prefix=prefix)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory (holds checkpoint/ and backbone.safetensors)")
    ap.add_argument("--step", type=int, action="append", required=True, help="checkpoint step (repeatable)")
    ap.add_argument("--prefix", default=None, help="tensor prefix of the backbone in the checkpoint")
    ap.add_argument("--out_dir", type=Path, default=None, help="where sN.safetensors go (default: the run dir)")
    args = ap.parse_args(argv)
    prefix = args.prefix if args.prefix is not None else find_prefix(args.run)
    for step in args.step:
        out = export(args.run, step, prefix, (args.out_dir or args.run) / f"s{step}.safetensors")
        print(f"exported {out} (prefix {prefix!r})")


if __name__ == "__main__":
    main()
