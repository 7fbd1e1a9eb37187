"""The GPU's code paths, met on the CPU first: bf16 autocast, torch.compile (inductor CPU), the
data-wait meter, kept checkpoints, and scripts/gpu_check.py's plan (--dry_run)."""
import json
import subprocess
import sys
import time

import pytest
import torch

import common
from cli import ROOT, read_metrics, run_recipe


def test_amp_modes_choose_the_autocast_dtype():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    cpu = torch.device("cpu")
    try:
        common.set_amp("bf16")
        with common.autocast(cpu):
            assert (x @ w).dtype == torch.bfloat16  # the GPU's path, on the CPU
        common.set_amp("auto")
        with common.autocast(cpu):
            assert (x @ w).dtype == torch.float32  # auto: bf16 on CUDA only
        common.set_amp("off")
        with common.autocast(cpu):
            assert (x @ w).dtype == torch.float32
        with pytest.raises(SystemExit, match="--amp"):
            common.set_amp("fp16")
    finally:
        common.set_amp("auto")


class SlowItems(torch.utils.data.Dataset):
    def __len__(self):
        return 10 ** 6

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.zeros(1)


def test_data_wait_counts_the_time_spent_waiting_for_batches():
    common.DataWait.take()
    batches = iter(common.make_loader(SlowItems(), 4, num_workers=0))
    for _ in range(3):
        next(batches)
    waited = common.DataWait.take()
    assert 3 * 4 * 0.02 <= waited < 3 * 4 * 0.02 + 2.0  # 12 items of 20 ms each
    assert common.DataWait.take() == 0.0  # take() resets


def test_keep_ckpts_keeps_the_newest_checkpoints(tmp_path):
    run_recipe("tests/toy_train.py", ["--steps", "6", "--ckpt_every", "2", "--keep_ckpts", "2",
                                      "--out_dir", str(tmp_path)])
    kept = sorted(d.name for d in (tmp_path / "checkpoint").iterdir() if d.is_dir())
    assert kept == ["step_0000004", "step_0000006"]
    assert (tmp_path / "checkpoint" / "latest").read_text() == "step_0000006"


def test_mae_compiled_in_bf16_matches_eager_bf16(tmp_path):
    """torch.compile changes no number that matters: same first losses as the eager bf16 run."""
    args = ["--preset", "tiny", "--arch", "vit_test", "--batch_size", "2", "--steps", "2", "--num_workers", "0",
            "--log_every", "1", "--decoder_depth", "1", "--decoder_dim", "64", "--decoder_heads", "2", "--amp", "bf16"]
    run_recipe("mae.py", args + ["--out_dir", str(tmp_path / "eager")])
    run_recipe("mae.py", args + ["--out_dir", str(tmp_path / "compiled"), "--compile", "true"])
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=2e-2)
    run_recipe("mae.py", args[:-1] + ["off", "--out_dir", str(tmp_path / "fp32")])
    fp32 = read_metrics(tmp_path / "fp32")
    assert fp32[0]["loss"] != eager[0]["loss"]  # bf16 autocast was really on


def test_gpu_check_dry_run_every_recipe_compiled_in_bf16(tmp_path):
    """The GPU script's whole plan on the CPU at toy size, every recipe compiled (inductor) in bf16
    autocast: finite losses, exact resume from the kept checkpoint, counted FLOPs, the tables."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry_run", "--compile",
                          "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "gpu_cpu_dry_run.jsonl").read_text().splitlines()]
    errors = [r for r in recs if r["what"] == "error"]
    assert not errors, errors[0]["error"][-2000:]
    recipes = {r["recipe"]: r for r in recs if r["what"] == "recipe"}
    assert sorted(recipes) == sorted(["mae", "ijepa", "capi", "beit", "ibot_dino", "dinov3_gram", "radio"])
    for name, r in recipes.items():
        assert r["finite"] and "resume_error" not in r, (name, r.get("resume_error", "")[-2000:])
        assert r["resume_rel_diff"] < 1e-5, (name, r["resume_loss"], r["ref_loss"])  # the CPU is deterministic
        assert r["gflops_per_step"] > 0 and 0 <= r["data_ms_per_step"] <= r["ms_per_step"], name
    backbones = [r for r in recs if r["what"] == "backbone"]
    assert sorted(r["compile"] for r in backbones) == [False, True]
    table = (tmp_path / "gpu_cpu_dry_run.md").read_text()
    assert all(f"| {name} |" in table for name in recipes)
