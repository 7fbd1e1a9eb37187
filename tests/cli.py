"""Running a recipe through its real command line, for the smoke / resume / torchrun tests."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(script: str, args: list, nproc: int | None = None) -> list:
    """`python script args`, or under `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU)."""
    path = str(ROOT / script)
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path]
            if nproc else [sys.executable, path])
    return head + list(args)


def run_recipe(script: str, args: list, nproc: int | None = None, popen: bool = False, check: bool = True):
    """Run to the end (asserting exit 0 unless check=False), or start it in the background (popen)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = command(script, args, nproc)
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def read_metrics(run_dir) -> list:
    """The run's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def stop_when_logged(proc: subprocess.Popen, log: Path, lines: int, timeout: float = 240):
    """SIGTERM a background run once `log` has `lines` lines; the run must checkpoint and exit 0."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= lines):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=timeout) == 0
