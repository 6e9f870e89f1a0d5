"""SPMD under torchrun (2 processes, gloo, CPU) against one process on the same tokens.

- the algorithms (`dist_check.py`): calibration sums equal within 1e-6 relative, the same
  sensitivity allocation, held-out ppl / bits per byte / MCQ equal, 5 recovery steps with the
  same global batch give the same losses within 1e-5 under DDP, FSDP2, and FSDP2 KD with a
  sharded teacher;
- the pipeline: a kill -9 of rank 1 in the middle of recovery, then a resume, ends with the
  very weights of an uninterrupted 2-process run (FSDP2: torch.distributed.checkpoint shards;
  DDP: whole checkpoints).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
import torch

import dist_check
import ft_case

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| over max |b|: the error relative to the tensor's scale."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(one process, rank 0 of two) results of dist_check.measure."""
    from engine.distributed import Dist

    out = tmp_path_factory.mktemp("dist") / "two.pt"
    p = subprocess.run([*TORCHRUN, str(ft_case.ROOT / "tests" / "dist_check.py"), str(out)], cwd=ft_case.ROOT,
                       env=ft_case.env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    two = torch.load(out, weights_only=False)
    one = dist_check.measure(Dist(solo=True))
    return one, two


@pytest.mark.process
def test_calibration_sums_over_two_ranks_equal_one_process(both):
    one, two = both
    assert two["n_tokens"] == one["n_tokens"] == 160
    assert torch.equal(two["token_counts"], one["token_counts"])
    assert set(two["stats"]) == set(one["stats"])
    assert any(k.endswith(".gram") for k in one["stats"])
    for k, v in one["stats"].items():
        assert _rel(two["stats"][k], v) <= 1e-6, k


@pytest.mark.process
def test_sensitivity_allocation_is_identical(both):
    one, two = both
    assert two["sensitivity"] == pytest.approx(one["sensitivity"], rel=1e-6)  # from fp32 Gram sums
    assert two["allocation"] == one["allocation"]
    assert len(set(one["allocation"])) > 1  # the allocation is not uniform: it measured something


@pytest.mark.process
def test_evaluation_split_and_gathered_equals_one_process(both):
    one, two = both
    for key in ("ppl", "ppl_stride", "bpb"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key
    assert len(one["mcq"]["lls"]) >= 2
    assert two["mcq"]["acc"] == one["mcq"]["acc"]
    for a, b in zip(two["mcq"]["lls"], one["mcq"]["lls"], strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.process
@pytest.mark.parametrize("run", ["ddp", "fsdp", "fsdp_kd"])
def test_five_recovery_steps_with_the_same_global_batch_match_one_process(both, run):
    one, two = both
    assert len(one[run]["loss"]) == dist_check.STEPS
    assert two[run]["loss"] == pytest.approx(one[run]["loss"], rel=1e-5)
    assert two[run]["grad_norm"] == pytest.approx(one[run]["grad_norm"], rel=1e-5)
    assert one[run]["loss"][-1] < one[run]["loss"][0]  # it trained
    if run == "fsdp_kd":
        assert two[run]["kl"] == pytest.approx(one[run]["kl"], rel=1e-5)
    for k, w in one[run]["weights"].items():  # gathered back from the shards, unsharded, whole
        assert two[run]["weights"][k].shape == w.shape, k
        assert _rel(two[run]["weights"][k], w) <= 1e-5, k


# ---- the pipeline: kill -9 of rank 1 mid-recovery, resume ------------------------------------------
def _torchrun(sess, tmp):
    env = ft_case.env()
    env["MINIGPT_CALIBRATION_CACHE"] = str(tmp / "calibration-cache")  # a module fixture: set by hand
    log = open(sess.path / "torchrun.log", "ab")
    return subprocess.Popen([*TORCHRUN, "-m", "engine.run.runner", str(sess.path)], cwd=ft_case.ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _rank(proc: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "engine.run.runner" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _weights(sess) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(sess.model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module", params=["fsdp", "ddp"])
def killed_and_whole(request, tmp_path_factory):
    strategy = request.param
    tmp = tmp_path_factory.mktemp(f"kill-{strategy}")
    cfg = ft_case.config(tmp, "llama", distributed={"strategy": strategy},
                         finetune={"max_steps": 40, "eval_every": 20, "checkpoint_every": 3},
                         evaluate={"bpb": False, "evaluate_base": False})
    # the uninterrupted run goes the way `minigpt run --nproc 2` starts one: detached, under torchrun
    from engine.run import launch

    whole = ft_case.session(tmp, "whole", cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_CALIBRATION_CACHE", str(tmp / "calibration-cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        pid = launch.launch_detached(whole.path, nproc=2)
    ok, why = launch.wait_started(whole, pid, timeout=300)
    assert ok, why
    ft_case.wait_for(lambda: launch.exit_status(pid) is not None, timeout=600, what="the detached 2-process run")
    assert launch.exit_status(pid) == 0 and whole.status() == "done", (whole.path / "runner.log").read_text()[-3000:]
    assert launch.runner_pid(whole) != pid  # rank 0, torchrun's child, held the lock

    killed = ft_case.session(tmp, "killed", cfg)
    p = _torchrun(killed, tmp)
    tail = ft_case.Tail(killed)
    ft_case.wait_for(lambda: any(e["type"] == "train" and e["step"] >= 5 for e in tail()), p,
                     what="step 5 of recovery (a checkpoint at step 3 behind it)")
    victim = _rank(p, 1)
    assert victim is not None
    victim.kill()  # SIGKILL
    code = p.wait(timeout=300)
    steps_before = max(e["step"] for e in tail() if e["type"] == "train")
    p = _torchrun(killed, tmp)
    resumed = p.wait(timeout=600)
    return strategy, whole, killed, code, steps_before, resumed


@pytest.mark.process
def test_a_kill_of_rank_1_mid_recovery_resumes_to_the_same_weights(killed_and_whole):
    from engine.train import checkpoint

    strategy, whole, killed, code, steps_before, resumed = killed_and_whole
    assert code != 0 and steps_before < 40  # the first run died in recovery
    died = [e for e in ft_case.events(killed) if e["type"] == "error"]
    assert died and died[0]["message"].startswith("another of the 2 torchrun processes died")  # one line
    assert resumed == 0, (killed.path / "torchrun.log").read_text()[-3000:]
    res = json.loads((killed.path / "results.json").read_text())
    ref = json.loads((whole.path / "results.json").read_text())
    assert killed.status() == "done" and res["finetune"]["steps"] == 40
    assert 3 <= res["finetune"]["resumed_from_step"] < steps_before + 3
    assert res["finetune"]["final_loss"] == ref["finetune"]["final_loss"]
    a, b = _weights(killed), _weights(whole)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact within a world size
    last = checkpoint.latest(killed.checkpoints_dir)
    assert (checkpoint.sharded_dir(last) is not None) == (strategy == "fsdp")
    state, _ = checkpoint.load(last)
    assert len(state["rng"]) == 2
    trains = [e["step"] for e in ft_case.events(whole) if e["type"] == "train"]
    assert trains == list(range(1, 41))  # rank 0 alone writes events


# ---- launch, config, the device script ---------------------------------------------------------
def test_the_runner_command_is_torchrun_for_more_than_one_process(tmp_path):
    from engine.errors import MinigptError
    from engine.run import launch

    one = launch.runner_command(tmp_path, 1)
    assert one[1:3] == ["-m", "engine.run.runner"] and one[-1] == "--keep-stop"
    four = launch.runner_command(tmp_path, 4)
    assert four[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert four[5:8] == ["-m", "engine.run.runner", str(tmp_path.resolve())]
    with pytest.raises(MinigptError, match="--nproc 0"):
        launch.runner_command(tmp_path, 0)


@pytest.mark.parametrize("section, problem", [
    ({"strategy": "zero3"}, "distributed.strategy = 'zero3' is not valid"),
    ({"shard_teacher": True}, "shard_teacher = true needs distributed.strategy"),
])
def test_bad_distributed_settings_are_one_line_errors(section, problem):
    from engine import config
    from engine.errors import MinigptError

    with pytest.raises(MinigptError, match=problem) as e:
        config.from_dict({"distributed": section})
    assert "\n" not in e.value.line() and " — " in e.value.line()
    with pytest.raises(MinigptError, match="fsdp.*LoRA"):
        config.from_dict({"distributed": {"strategy": "fsdp"}, "finetune": {"lora_rank": 4}})


@pytest.mark.process
def test_cli_refuses_a_bad_process_count_in_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nsource = "embedded:smollm2"\n')
    e = ft_case.env()
    p = subprocess.run([sys.executable, "-m", "minigpt_tui.cli", "run", str(cfg), "--nproc", "0",
                        "--root", str(tmp_path / "s")], cwd=ft_case.ROOT, env=e, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert "--nproc 0 is not a number of processes" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())  # no session was made


@pytest.mark.process
def test_gpu_scale_dry_run_reports_ce_and_kd_throughput_and_memory(tmp_path):
    out = tmp_path / "rows.json"
    e = dict(ft_case.env(), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ft_case.ROOT / "benchmarks" / "gpu_scale.sh"), "--dry-run", "--json", str(out)],
                       cwd=ft_case.ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tiny single CE" in p.stdout and "tiny single KD" in p.stdout and "peak" in p.stdout
    rows = json.loads(out.read_text())
    assert [(r["loss"], r["strategy"]) for r in rows] == [("ce", "single"), ("kd", "single")]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["mfu"] is None for r in rows)
    bad = subprocess.run(["bash", str(ft_case.ROOT / "benchmarks" / "gpu_scale.sh"), "--nproc", "x"],
                         cwd=ft_case.ROOT, env=e, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--nproc x" in bad.stderr


def test_every_ranks_gpu_sample_reaches_the_monitor_through_rank_0(monkeypatch):
    """Under torchrun rank 0 writes one `gpu` event per rank (a gather); the monitor keeps each rank's."""
    from engine.run import gpu, reporter
    from minigpt_tui.runview import RunView

    class TwoRanks:  # what Dist.gather returns on rank 0 of two
        on = True

        def gather(self, obj):
            return [obj, {**obj, "rank": 1, "device": 1, "mem_used_mb": 7.0}]

    monkeypatch.setattr(gpu, "sample", lambda: {"device": 0, "rank": 0, "mem_used_mb": 5.0, "mem_peak_mb": 4.0,
                                                "mem_total_mb": 80.0, "util_pct": None})
    seen: list = []
    reporter.Reporter(None, display=seen.append, dist=TwoRanks()).gpu_all()
    view = RunView()
    view.apply(seen)
    assert [(s["rank"], s["mem_used_mb"]) for s in view.gpu_samples()] == [(0, 5.0), (1, 7.0)]
