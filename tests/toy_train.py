"""A toy recipe on the common infrastructure, for the resume and DDP tests.
Data is drawn per (step, sample index) so any world size sees the same global batch."""
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@dataclasses.dataclass
class ToyConfig(common.TrainConfig):
    lr: float = 1e-2  # learning rate
    sleep: float = 0.0  # seconds to sleep per step (lets a test signal the run mid-way)
    nan_at: int = -1  # make the loss NaN from this step on (tests the NaN guard)


PRESETS = {"tiny": dict(steps=8, batch_size=4, log_every=1, ckpt_every=100)}


def global_batch(step, n):
    g = torch.Generator().manual_seed(1234 + step)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 4, 8, generator=g)


def main(argv=None):
    cfg = common.parse_config(ToyConfig, PRESETS, "toy", argv)
    run = common.Run(cfg, "toy")
    torch.manual_seed(0)
    model = common.ViT(embed_dim=8, depth=1, num_heads=2, n_registers=1, drop_path_rate=0.5)
    ddp = common.wrap_ddp(model, run.dist)
    opt = common.adamw(common.param_groups(model), lr=cfg.lr, device=run.device)
    start = run.resume({"student": model}, {"opt": opt})
    r, lb = run.dist.rank, run.local_batch
    for step in range(start, cfg.steps):
        x, y = global_batch(step, cfg.batch_size)
        x, y = x[r * lb:(r + 1) * lb], y[r * lb:(r + 1) * lb]
        common.set_lr_wd(opt, common.cosine_schedule(step, cfg.steps, cfg.lr, warmup=2), 0.05)
        loss = ((ddp(x)["patches"] - y) ** 2).mean()
        if 0 <= cfg.nan_at <= step:
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        time.sleep(cfg.sleep)
        run.step(step, {"student": model}, {"opt": opt}, loss=loss)
        if run.stopped:
            break
    run.finish(model)


if __name__ == "__main__":
    main()
