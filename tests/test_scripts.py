"""The glue scripts: FLOP counting (bench.py), the bake-off's budget and table (bakeoff.py),
the learning-signal summary and the export of intermediate checkpoints, on hand-made inputs."""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bakeoff  # noqa: E402
import bench  # noqa: E402
import export_step  # noqa: E402
import learning_signal  # noqa: E402


def test_flop_counter_counts_linear_and_cpu_attention_by_hand():
    B, H, L, D = 2, 3, 10, 8
    q = torch.randn(B, H, L, D, requires_grad=True)
    lin = torch.nn.Linear(5, 7, bias=False)
    x = torch.randn(4, 5)
    with bench.flop_counter() as fc:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
        lin(x)
    attention = 4 * B * H * L * L * D  # QK^T and PV forward; backward counted as twice that
    assert fc.get_total_flops() == 3 * attention + 2 * 4 * 5 * 7


def _args(tmp_path, **kw):
    a = dict(preset="tiny", data="synthetic", images=38_400, runs_dir=str(tmp_path / "runs"), launch="python",
             dinov3="", probe_data="synthetic")
    a.update(kw)
    return types.SimpleNamespace(**a)


def test_bakeoff_steps_equalise_images_seen(tmp_path):
    a = _args(tmp_path)
    cmd, run_dir = bakeoff.entry_command("mae", a)  # MAE tiny: batch 64
    assert cmd[cmd.index("--steps") + 1] == "600" and run_dir == tmp_path / "runs" / "mae"
    cmd, _ = bakeoff.entry_command("dino", a)  # DINO tiny: batch 32
    assert cmd[cmd.index("--steps") + 1] == "1200" and cmd[cmd.index("--variant") + 1] == "dino"
    cmd, _ = bakeoff.entry_command("capi", _args(tmp_path, images=1000))  # CAPI tiny: batch 32, rounded up
    assert cmd[cmd.index("--steps") + 1] == str(math.ceil(1000 / 32))


def test_bakeoff_teacher_entries_point_at_the_bake_offs_own_run_dirs(tmp_path):
    runs = tmp_path / "runs"
    cmd, _ = bakeoff.entry_command("radio", _args(tmp_path))
    teachers = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--teacher"]
    assert teachers == [str(runs / "mae" / "backbone.safetensors"),
                        str(runs / "dinov3_continual" / "backbone.safetensors")]
    cmd, _ = bakeoff.entry_command("dinov3_continual", _args(tmp_path))
    assert cmd[cmd.index("--init") + 1] == str(runs / "mae" / "backbone.safetensors")
    with pytest.raises(SystemExit, match="unknown entry"):
        bakeoff.run_dirs_in("{run:nope}/backbone.safetensors", str(runs))


def test_bakeoff_retrains_a_teacher_whose_run_dir_is_not_in_the_checkout(tmp_path, capsys):
    a = _args(tmp_path)
    a.dry_run = True
    res = tmp_path / "results"
    res.mkdir()
    mae_cmd, _ = bakeoff.entry_command("mae", a)
    (res / "mae.train.json").write_text(json.dumps(dict(command=" ".join(mae_cmd))))
    bakeoff.ensure_teachers("beit_vqkd", a, res)  # mae finished earlier (results), its run dir absent
    assert "training mae again" in capsys.readouterr().out
    bakeoff.ensure_teachers("capi", a, res)  # no teachers: nothing to do
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match="needs dinov3_continual first"):
        bakeoff.ensure_teachers("radio", a, res)
    stale = mae_cmd[:mae_cmd.index("--steps") + 1] + ["500"]  # recorded under another budget
    (res / "mae.train.json").write_text(json.dumps(dict(command=" ".join(stale))))
    with pytest.raises(SystemExit, match="records another command"):
        bakeoff.ensure_teachers("beit_vqkd", a, res)


def _probe(name, best, layers, rank=50.0):
    return dict(name=name, arch={"embed_dim": 192, "depth": 12, "num_heads": 3},
                dense=dict(best_miou=best, best_layer=max(layers, key=layers.get), last_miou=layers[max(layers)],
                           layers={str(k): {"miou": v} for k, v in layers.items()}),
                diagnostics=dict(effective_rank=rank, cls_patch_cos=0.5), time_s=10.0, run_info={})


def test_bakeoff_report_difference_to_random_by_hand(tmp_path, monkeypatch):
    res = tmp_path / "results" / "bakeoff_tiny"
    res.mkdir(parents=True)
    monkeypatch.setattr(bakeoff, "ROOT", tmp_path)
    seeds = [_probe(f"r{s}", v, {0: v, 1: v - 0.01}) for s, v in enumerate([0.14, 0.15, 0.16])]
    (res / "random_x.probe.json").write_text(json.dumps(dict(arch=seeds[0]["arch"], seeds=seeds)))
    (res / "mae.probe.json").write_text(json.dumps(_probe("mae", 0.175, {0: 0.17, 1: 0.175}) |
                                                   dict(baseline="random_x.probe.json")))
    (res / "mae.train.json").write_text(json.dumps(dict(
        steps=600, batch_size=64, images=38_400, ms_per_step_median=500.0, train_s=300,
        signal=dict(summary="loss / trivial 0.8"), run_info=dict(cpu_count=2, cpu="x86_64", torch="2.13", commit="abc",
                                                                 date="2026-11-23 10:00:00"))))
    md = bakeoff.report(_args(tmp_path), res, ["mae", "capi"])
    mae_row = next(line for line in md.splitlines() if line.startswith("| mae "))
    # best 17.5 at block 1; random mean 15.0, sample std 1.0; difference +2.5
    assert "17.5 (1)" in mae_row and "15.0 ± 1.0" in mae_row and "+2.5" in mae_row and "600 x 64 = 38,400" in mae_row
    assert "| capi | not run yet |" in md
    # compute: 300 s training + 10 s probe + 3 x 10 s baseline = 340 s
    assert f"{340 / 3600:.2f} h" in md
    assert (tmp_path / "results" / "bakeoff_tiny_curves.png").is_file()


def test_learning_signal_window_means_by_hand(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"steps": 40}))
    (run / "run_info.json").write_text(json.dumps({"argv": "mae.py --preset tiny"}))
    rows = [dict(step=s, loss=l, trivial=t) for s, l, t in [(10, 1.0, 1.0), (20, 0.8, 1.0), (30, 0.6, 1.0),
                                                             (40, 0.4, 0.8)]]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = learning_signal.signal(run, first=20, last=20)  # first: steps 10, 20; last: steps 30, 40
    assert s["first"]["loss"] == pytest.approx(0.9) and s["last"]["loss"] == pytest.approx(0.5)
    assert s["last"]["trivial"] == pytest.approx(0.9)
    assert "loss / trivial (last 20) 0.56" in s["summary"]


def test_bakeoff_a_stopped_run_is_not_finished(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint" / "step_0000420").mkdir(parents=True)
    (run / "checkpoint" / "step_0000420" / "state.pt").write_bytes(b"")
    (run / "checkpoint" / "latest").write_text("step_0000420")
    (run / "backbone.safetensors").write_bytes(b"")  # a stop exports the backbone too
    assert not bakeoff.finished(run, 1500) and bakeoff.finished(run, 420)


def _fake_run(tmp_path, same=False):
    """A run dir as the recipes leave it: checkpoints holding a student and an EMA teacher, and
    backbone.safetensors = the teacher at the last step."""
    import common
    run = tmp_path / "run"
    arch = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, n_registers=1)
    teachers = {}
    for step in (2, 4):
        torch.manual_seed(step)
        student, teacher = common.ViT(**arch), common.ViT(**arch)
        if same:
            teacher.load_state_dict(student.state_dict())
        teachers[step] = teacher
        sd = {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
        sd.update({f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()})
        d = run / "checkpoint" / f"step_{step:07d}"
        d.mkdir(parents=True)
        common.save_safetensors(sd, d / "weights.safetensors", metadata={"step": str(step)})
        torch.save({"step": step}, d / "state.pt")
    (run / "checkpoint" / "latest").write_text("step_0000004")
    common.save_backbone(teachers[4], run / "backbone.safetensors", recipe="ibot_dino")
    return run, teachers


def test_export_step_finds_the_exported_model_and_writes_its_weights_at_that_step(tmp_path):
    import common
    run, teachers = _fake_run(tmp_path)
    assert export_step.find_prefix(run) == "teacher.backbone."
    export_step.main([str(run), "--step", "2"])
    got = common.load_backbone(str(run / "s2.safetensors"))
    want = teachers[2].state_dict()
    assert set(got.state_dict()) == set(want)
    assert all(torch.equal(got.state_dict()[k], want[k]) for k in want)
    assert not torch.equal(got.state_dict()["cls_token"], teachers[4].state_dict()["cls_token"])


def test_export_step_refuses_a_missing_step_and_an_ambiguous_prefix(tmp_path):
    run, _ = _fake_run(tmp_path)
    with pytest.raises(SystemExit, match="step_0000002.*step_0000004"):
        export_step.main([str(run), "--step", "3"])
    run2, _ = _fake_run(tmp_path / "b", same=True)  # student == teacher: the prefix is not determined
    with pytest.raises(SystemExit, match="2 models"):
        export_step.find_prefix(run2)
    export_step.main([str(run2), "--step", "2", "--prefix", "student.backbone."])
    assert (run2 / "s2.safetensors").is_file()
