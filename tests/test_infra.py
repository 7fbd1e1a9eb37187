"""Training infrastructure: config, schedules, groups, EMA, checkpoints, resume, DDP."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import common

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "tests" / "toy_train.py")


@dataclasses.dataclass
class Cfg(common.TrainConfig):
    lr: float = 1e-3  # peak learning rate
    crops: tuple = (2, 4)  # global, local crops
    use_thing: bool = False  # switch the thing on


def test_config_precedence_help_and_types(tmp_path):
    presets = {"tiny": dict(lr=5e-3, steps=10), "small": dict(lr=1e-4)}
    cfg = common.parse_config(Cfg, presets, "rec", ["--out_dir", str(tmp_path)])
    assert cfg.lr == 5e-3 and cfg.steps == 10 and cfg.out_dir == str(tmp_path)
    cfg = common.parse_config(Cfg, presets, "rec", ["--preset", "small", "--lr", "0.2", "--use_thing", "--crops", "3,5"])
    assert cfg.lr == 0.2 and cfg.steps == 1000 and cfg.use_thing is True and cfg.crops == (3, 5)
    assert cfg.out_dir == "runs/rec"
    helps = common._field_help(Cfg)
    assert helps["lr"] == "peak learning rate" and helps["init"].startswith("start the backbone")
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, presets, "rec", ["--lr", "abc"])
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, presets, "rec", ["--no_such_flag", "1"])
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, presets, "rec", ["--preset", "huge"])


def test_help_survives_percent_in_a_comment(capsys):
    @dataclasses.dataclass
    class Pct(common.TrainConfig):
        ratio: float = 0.65  # masked share, 65% of the patches

    with pytest.raises(SystemExit) as exit_info:
        common.parse_config(Pct, {"tiny": {}}, "rec", ["--help"])
    assert exit_info.value.code == 0 and "65% of the patches" in capsys.readouterr().out


def test_schedules_hand_values():
    assert common.cosine_schedule(0, 110, 1.0, 0.0, warmup=10) == 0.0
    assert common.cosine_schedule(5, 110, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert common.cosine_schedule(10, 110, 1.0, 0.0, warmup=10) == pytest.approx(1.0)
    assert common.cosine_schedule(60, 110, 1.0, 0.0, warmup=10) == pytest.approx(0.5)
    assert common.cosine_schedule(110, 110, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    # truncated at 80%: the last step sits at 0.8 of the cosine
    assert common.cosine_schedule(100, 100, 1.0, 0.0, truncate=0.8) == pytest.approx(0.5 * (1 + math.cos(0.8 * math.pi)))
    assert common.warmup_constant(3, 2.0, warmup=4) == pytest.approx(1.5)
    assert common.warmup_constant(400, 2.0, warmup=4) == 2.0
    assert common.linear_ramp(5, 10, 10, 1.0, 0.5) == 1.0
    assert common.linear_ramp(15, 10, 10, 1.0, 0.5) == pytest.approx(0.75)
    assert common.linear_ramp(25, 10, 10, 1.0, 0.5) == 0.5


def test_param_groups_decay_and_layerwise_lr():
    m = common.ViT(embed_dim=16, depth=3, num_heads=2, n_registers=1)
    groups = common.param_groups(m, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    for n in ("blocks.0.attn.qkv.bias", "blocks.1.norm1.weight", "blocks.2.ls1.gamma", "cls_token", "storage_tokens",
              "mask_token", "norm.bias"):
        assert by_param[id(named[n])]["wd_mult"] == 0.0, n
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["wd_mult"] == 1.0
    assert by_param[id(named["blocks.2.mlp.fc1.weight"])]["lr_mult"] == pytest.approx(0.5)  # depth+1-3 = 1
    assert by_param[id(named["blocks.0.mlp.fc1.weight"])]["lr_mult"] == pytest.approx(0.125)
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_mult"] == pytest.approx(0.0625 * 0.2)
    assert by_param[id(named["norm.weight"])]["lr_mult"] == pytest.approx(1.0)
    opt = common.adamw(groups, lr=0.0)
    common.set_lr_wd(opt, 1.0, 0.1)
    g = by_param[id(named["blocks.0.mlp.fc1.weight"])]
    assert g["lr"] == pytest.approx(0.125) and g["weight_decay"] == pytest.approx(0.1)


def test_ema_update_hand_value():
    t, s = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([[1.0, 2.0]]))
        s.weight.copy_(torch.tensor([[3.0, -2.0]]))
    common.ema_update(t, s, 0.9)
    assert torch.allclose(t.weight, torch.tensor([[1.2, 1.6]]))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = common.ViT(embed_dim=16, depth=1, num_heads=2, n_registers=1)
    head = torch.nn.Linear(16, 3)
    opt = torch.optim.AdamW(list(m.parameters()) + list(head.parameters()), lr=0.1)
    m(torch.randn(2, 3, 32, 32))["cls"].sum().backward()
    opt.step()
    common.save_checkpoint(tmp_path, 7, {"student": m, "head": head}, {"opt": opt}, extra={"center": torch.ones(3)})
    ref = torch.rand(3)
    ckpt = common.latest_checkpoint(tmp_path)
    assert ckpt.name == "step_0000007"
    m2, head2 = common.ViT(embed_dim=16, depth=1, num_heads=2, n_registers=1), torch.nn.Linear(16, 3)
    opt2 = torch.optim.AdamW(list(m2.parameters()) + list(head2.parameters()), lr=0.1)
    state = common.load_checkpoint(ckpt, {"student": m2, "head": head2}, {"opt": opt2})
    assert state["step"] == 7 and torch.equal(state["extra"]["center"], torch.ones(3))
    assert torch.equal(torch.rand(3), ref)  # RNG restored to its state at save time
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    # the student inside the checkpoint is readable as a backbone
    b = common.load_backbone(str(ckpt / "weights.safetensors"), prefix="student.")
    assert torch.equal(b.cls_token, m.cls_token)
    # a checkpoint of another architecture is refused, naming the key
    m3 = common.ViT(embed_dim=24, depth=1, num_heads=2, n_registers=1)
    with pytest.raises(ValueError, match="weights.safetensors.*cls_token"):
        common.load_checkpoint(ckpt, {"student": m3, "head": head2}, {"opt": opt2})


def read_losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def run_toy(args, nproc=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TOY]
           if nproc else [sys.executable, TOY]) + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_resume_after_kill_continues_with_identical_losses(tmp_path):
    ref = run_toy(["--out_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    ref_losses = read_losses(tmp_path / "ref")
    assert sorted(ref_losses) == list(range(1, 9))
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, TOY, "--out_dir", str(run_dir), "--sleep", "0.4"],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    ckpt = common.latest_checkpoint(run_dir)
    stopped_at = int(ckpt.name.split("_")[1])
    assert 2 <= stopped_at < 8, "the signal should stop the run mid-way"
    # a second launch without --resume refuses to overwrite the run
    again = run_toy(["--out_dir", str(run_dir)])
    assert again.returncode != 0 and "--resume" in again.stderr
    res = run_toy(["--out_dir", str(run_dir), "--resume"])
    assert res.returncode == 0, res.stderr
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    for s in range(1, 9):
        assert losses[s] == pytest.approx(ref_losses[s], rel=1e-6, abs=1e-7), s


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    res = run_toy(["--out_dir", str(tmp_path), "--nan_at", "3", "--ckpt_every", "1"])
    assert res.returncode != 0
    assert "non-finite loss before step 4" in res.stderr
    ckpt = common.latest_checkpoint(tmp_path)
    assert ckpt.name == "step_0000003"  # the last good state, not the poisoned one
    b = common.load_backbone(str(ckpt / "weights.safetensors"), prefix="student.")
    assert all(torch.isfinite(v).all() for v in b.state_dict().values())


def test_ddp_two_processes_equal_one(tmp_path):
    one = run_toy(["--out_dir", str(tmp_path / "one"), "--steps", "3"], nproc=1)
    two = run_toy(["--out_dir", str(tmp_path / "two"), "--steps", "3"], nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a = common.load_backbone(str(tmp_path / "one" / "backbone.safetensors"))
    b = common.load_backbone(str(tmp_path / "two" / "backbone.safetensors"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    l1, l2 = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    for s in l1:  # logged loss is the mean over ranks = the loss of the global batch
        assert l1[s] == pytest.approx(l2[s], rel=1e-5)


def test_signal_to_the_whole_process_group_still_checkpoints(tmp_path):
    # Ctrl-C and cluster schedulers signal every process of the job, DataLoader workers included;
    # a worker dying first used to crash the main process before it could write its checkpoint
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "mae.py"), "--preset", "tiny",
                                 "--steps", "200", "--batch_size", "4", "--img_size", "64", "--num_workers", "1",
                                 "--log_every", "2", "--ckpt_every", "1000", "--out_dir", str(run_dir)],
                                env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    assert rc == 0, log.read_text()[-2000:]
    stopped_at = int(common.latest_checkpoint(run_dir).name.split("_")[1])
    assert 2 <= stopped_at < 200


@dataclasses.dataclass
class Ratios(common.TrainConfig):
    lr: float = 1e-3  # peak learning rate
    mask_ratio: float = 0.75  # masked share
    span_ratio: tuple = (0.1, 0.5)  # range of a masked share
    high_fraction: float = 0.5  # share at high resolution


@pytest.mark.parametrize("argv, flag", [
    (["--steps", "-5"], "--steps"), (["--steps", "0"], "--steps"), (["--batch_size", "0"], "--batch_size"),
    (["--log_every", "0"], "--log_every"), (["--ckpt_every", "-1"], "--ckpt_every"),
    (["--num_workers", "-1"], "--num_workers"), (["--lr", "-0.1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--mask_ratio", "1"], "--mask_ratio"), (["--span_ratio", "0.2,1.5"], "--span_ratio"),
    (["--high_fraction", "1.1"], "--high_fraction"), (["--arch", "vit_huge"], "--arch")])
def test_impossible_values_are_refused_in_one_line_naming_the_flag(tmp_path, argv, flag):
    with pytest.raises(SystemExit) as e:
        common.parse_config(Ratios, {"tiny": {}}, "rec", ["--out_dir", str(tmp_path / "run")] + argv)
    msg = str(e.value.code)
    assert msg.count("\n") == 0 and f"error: {flag} " in msg
    assert not (tmp_path / "run").exists()


def test_edge_values_that_work_are_accepted(tmp_path):
    cfg = common.parse_config(Ratios, {"tiny": {}}, "rec", ["--lr", "0", "--mask_ratio", "0", "--num_workers", "0",
                                                             "--high_fraction", "1", "--steps", "1"])
    assert cfg.lr == 0 and cfg.mask_ratio == 0 and cfg.high_fraction == 1


def test_unreadable_data_is_refused_before_anything_is_created(tmp_path):
    (tmp_path / "notes.txt").write_text("not a sheet")
    (tmp_path / "no_sheets").mkdir()
    (tmp_path / "no_sheets" / "readme.md").write_text("")
    for data, why in [(tmp_path / "missing", "no such file or folder"), (tmp_path / "notes.txt", "not a sheet file"),
                      (tmp_path / "no_sheets", "no sheet files")]:
        with pytest.raises(SystemExit) as e:
            common.parse_config(Ratios, {"tiny": {}}, "rec", ["--data", str(data), "--out_dir", str(tmp_path / "o")])
        assert f"--data {data}: {why}" in str(e.value.code)
    # a folder with a sheet somewhere below, or one sheet file, are fine
    (tmp_path / "sheets" / "a").mkdir(parents=True)
    sheet = tmp_path / "sheets" / "a" / "s.png"
    Image.new("L", (64, 48), 255).save(sheet)
    for data in (tmp_path / "sheets", sheet):
        assert common.parse_config(Ratios, {"tiny": {}}, "rec", ["--data", str(data)]).data == str(data)
    one = common.FolderSheets(sheet)
    assert len(one) == 1 and one.get_sheet(0)["name"] == "s.png"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, flag", [(["--steps", "-5"], "--steps"), (["--data", "/nonexistent"], "--data")])
def test_recipe_command_line_refuses_bad_flags_without_traceback_or_run_dir(tmp_path, args, flag):
    from cli import run_recipe
    out = tmp_path / "run"
    res = run_recipe("mae.py", args + ["--out_dir", str(out)], check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mae.py: error: {flag} "), res.stderr
    assert not out.exists()


def test_help_shows_each_presets_value_and_out_dir_once(capsys):
    import mae
    with pytest.raises(SystemExit) as e:
        common.parse_config(mae.MAEConfig, mae.PRESETS, "mae", ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0
    assert "(by preset: tiny 1200, small 100000, base 100000)" in out  # --steps
    assert "(by preset: tiny 128, small 224, base 224)" in out  # --img_size
    assert "run directory (default runs/mae)" in out and out.count("default runs/") == 1
    assert "fraction of patches removed from the encoder's input (default 0.75)" in out


def test_exported_files_are_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        m = common.ViT(embed_dim=16, depth=1, num_heads=2, n_registers=1)
        common.save_backbone(m, tmp_path / "backbone.safetensors")
        common.save_checkpoint(tmp_path, 1, {"student": m}, {})
    finally:
        os.umask(old)
    for f in (tmp_path / "backbone.safetensors", tmp_path / "checkpoint" / "step_0000001" / "weights.safetensors",
              tmp_path / "checkpoint" / "step_0000001" / "state.pt"):
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_log_lines_carry_an_eta_and_no_progress_bar_in_a_log_file(tmp_path):
    res = run_toy(["--out_dir", str(tmp_path), "--steps", "4"])  # stdout, stderr are pipes, not a terminal
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and all(" | eta " in line for line in lines) and lines[-1].endswith("| eta 0s")
    assert "\r" not in res.stderr + res.stdout
    assert common.duration(5.4) == "5s" and common.duration(725) == "12m05s" and common.duration(11220) == "3h07m"


def test_log_lines_reach_a_log_file_while_the_run_goes_on(tmp_path):
    """Written to a pipe or file, each log line is flushed when logged, not when the run ends."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, TOY, "--out_dir", str(tmp_path), "--steps", "3", "--sleep", "3"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while not line.startswith("step 1/3"):
            line = proc.stdout.readline()
            assert line, "the run ended without logging step 1"
        arrived = time.time()
    finally:
        proc.wait(timeout=120)
    assert time.time() - arrived > 4  # it came before steps 2 and 3 (3 s of sleep each) had run


_CRASH = """
import sys, torch, common
class Sheets(torch.utils.data.Dataset):
    def __len__(self): return 10 ** 6
    def __getitem__(self, i):
        if sys.argv[1] == "worker" and i >= 40:
            raise ValueError(f"bad sheet {i}")
        return torch.zeros(1)
for step, batch in enumerate(common.make_loader(Sheets(), 4, num_workers=1)):
    if sys.argv[1] == "step" and step == 3:
        raise RuntimeError("error in the step")
"""


@pytest.mark.parametrize("where,message", [("worker", "bad sheet 40"), ("step", "error in the step")])
def test_an_error_fails_the_run_instead_of_hanging_on_its_data_workers(tmp_path, where, message):
    """Workers ignore SIGTERM (so a scheduler's signal reaches the checkpointing main process
    first); an uncaught error must still end the process, with the real error as the only one."""
    script = tmp_path / "crash.py"
    script.write_text(_CRASH)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script), where], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert message in res.stderr
    assert "killed by signal" not in res.stderr


def test_resume_drops_the_metrics_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30, 40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 50, "lo')  # cut off by a crash
    common.drop_metrics_after(path, 20)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    common.drop_metrics_after(tmp_path / "absent.jsonl", 20)  # a fresh run dir: nothing to do
