"""Faults injected as a user would meet them, with real processes: Ctrl-C, SIGTERM, kill -9,
two runs on one folder, changed configs on resume, corrupt checkpoints and caches, bad input.

Every process is started with a generous timeout and nothing asserts how long anything took;
the module checks at the end that no process it started (Ray included) is left behind. It looks
only at the process trees of the runs it started (followed while they live: Ray's GCS, raylet
and actors, the watchdog are the driver's descendants until it dies), never at other processes
on the machine: a run of another checkout beside this one is not this test's leftover.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from scaleot_fed.rundir import lock_run_dir, unlock_run_dir
from scaleot_fed_cli.main import main
from simulations.resume import check_resume, load_run_config

from . import faults
from .conftest import write_items

ROOT = Path(__file__).resolve().parents[1]
TREES: dict[int, set[tuple[int, float]]] = {}
"""Per process this module started: every descendant seen while it lived, as (pid, start time)."""


def _follow(proc: subprocess.Popen) -> subprocess.Popen:
    """Record ``proc``'s process tree every 0.2 s until it ends (its Ray processes, its watchdog)."""
    seen = TREES.setdefault(proc.pid, set())

    def sample() -> None:
        while proc.poll() is None:
            try:
                seen.update((c.pid, c.create_time()) for c in psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                pass
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    return proc


def _left(seen: set[tuple[int, float]]) -> list[str]:
    """Those of ``seen`` still alive (the same process: pid and start time), as "pid command"."""
    left = []
    for pid, started in seen:
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            continue
    return left


def _ours() -> list[str]:
    """Live processes of the trees of every run this module started."""
    return [entry for seen in TREES.values() for entry in _left(seen)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    """A tiny-model workspace; at the end, no process started here may survive (Ray included)."""
    root = tmp_path_factory.mktemp("faults")
    write_items(root / "train.jsonl", 60, 0)
    write_items(root / "eval.jsonl", 6, 1)
    old = os.environ.get("SCALEOT_FED_EMULATOR_CACHE")
    os.environ["SCALEOT_FED_EMULATOR_CACHE"] = str(root / "owners")  # the data owners' caches, ours only
    yield root
    if old is None:
        os.environ.pop("SCALEOT_FED_EMULATOR_CACHE")
    else:
        os.environ["SCALEOT_FED_EMULATOR_CACHE"] = old
    deadline = time.monotonic() + 60
    while _ours() and time.monotonic() < deadline:
        time.sleep(1)
    assert not _ours(), f"processes left behind: {_ours()}"


def _run_file(ws: Path, name: str, tiny_model_dir: Path, **run) -> Path:
    values = {"out": str(ws / name), "model": str(tiny_model_dir), "task": str(ws / "train.jsonl"),
              "eval_task": str(ws / "eval.jsonl"), "num_rounds": 200, "num_clients": 2, "clients_per_round": 2,
              "eval_every": 1000, "final_table": False, "eval_batch_size": 8} | run
    body = "[run]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    body += ('[finetune]\nmode = "lora"\nsteps = 1\nbatch_size = 2\n'
             '[emulator]\nmethod = "uniform-drop"\nnum_adapter_layers = 2\nalpha = 0.5\n')
    path = ws / f"{name}.toml"
    path.write_text(body)
    return path


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = _follow(subprocess.Popen([sys.executable, "-m", "scaleot_fed_cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ.copy()))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _main(*args: str, capsys) -> tuple[int, str]:
    """The command in this process (bad input is refused before anything heavy starts)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _start(*args: str, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 -- closed with the process (read back by the test)
    return _follow(subprocess.Popen([sys.executable, "-m", "scaleot_fed_cli", *args], stdout=handle,
                                    stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy()))


def _wait_for_round(out: Path, round_: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = out / "checkpoint" / "state.json"
        if state.is_file():
            try:
                if json.loads(state.read_text())["round"] >= round_:
                    return
            except (json.JSONDecodeError, KeyError):
                pass
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        time.sleep(0.5)
    pytest.fail(f"round {round_} not done within {timeout} s")


def _no_run_processes_of(pid: int, timeout: float = 60) -> list[str]:
    """The processes of ``pid``'s tree (as seen while it lived) still alive after ``timeout``."""
    assert TREES.get(pid), f"no process of run {pid}'s tree was seen: the check would see nothing"
    deadline = time.monotonic() + timeout
    while (left := _left(TREES.get(pid, set()))) and time.monotonic() < deadline:
        time.sleep(1)
    return left


@pytest.fixture(scope="module")
def interrupted(ws, tiny_model_dir):
    """A run stopped with Ctrl-C after its second round; on the way, a second run tried its folder."""
    run_file = _run_file(ws, "interrupted", tiny_model_dir)
    out = ws / "interrupted"
    proc = _start("simulate", "--config", str(run_file), log=ws / "interrupted.log")
    _wait_for_round(out, 2, proc)
    second = _cli("simulate", "--resume", str(out))
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    return {"out": out, "pid": proc.pid, "code": code, "second": second,
            "log": (ws / "interrupted.log").read_text()}


def test_ctrl_c_stops_keeps_the_checkpoint_and_locks_the_folder(interrupted):
    # A second run (or resume) on the folder failed at once, naming the holder.
    second = interrupted["second"]
    assert second.returncode == 2 and f"PID {interrupted['pid']}" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert interrupted["code"] == 130 and "SIGINT: stopping" in interrupted["log"]
    out = interrupted["out"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["round"] >= 2 and (out / "checkpoint" / "aggregate.safetensors").is_file()
    assert _no_run_processes_of(interrupted["pid"]) == []


def test_resume_refuses_changed_keys_and_applies_safe_ones(interrupted, capsys):
    out = interrupted["out"]
    code, err = _main("simulate", "--resume", str(out), "--set", "finetune.lr=0.5", "--set", "run.seed=3", capsys=capsys)
    assert code == 2 and "finetune.lr" in err and "run.seed" in err

    edited = json.loads((out / "config.json").read_text())
    original = dict(edited)
    edited["finetune"] = edited["finetune"] | {"steps": 7}
    (out / "config.json").write_text(json.dumps(edited))
    code, err = _main("simulate", "--resume", str(out), capsys=capsys)
    assert code == 2 and "finetune.steps" in err
    (out / "config.json").write_text(json.dumps(original))

    code, err = _main("simulate", "--resume", str(out), "--set", "run.num_rounds=1", capsys=capsys)
    assert code == 2 and "already done" in err
    # whether the plugged-in model is written changes nothing the rounds did (a study turns it off)
    check_resume(load_run_config(out, {"run.save_plugged": False}), out)


def test_a_corrupt_checkpoint_and_a_corrupt_owner_cache_are_recovered_on_resume(ws, interrupted):
    out = interrupted["out"]
    done = json.loads((out / "checkpoint" / "state.json").read_text())["round"]
    assert (out / "checkpoint.prev" / "state.json").is_file()
    weights = out / "checkpoint" / "aggregate.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])  # truncated
    held = list((ws / "owners").rglob("model.safetensors"))
    assert held
    for path in held:  # every owner's copy corrupted
        path.write_bytes(path.read_bytes()[:-16] + b"\0" * 16)
    resumed = _cli("simulate", "--resume", str(out), "--set", f"run.num_rounds={done + 1}", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stderr + resumed.stdout
    assert "previous checkpoint" in log
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    # The latest checkpoint (round `done`) was unreadable: round `done` ran again from the previous one.
    assert [r["round"] for r in rounds] == list(range(1, done + 2))
    assert rounds[done - 1]["emulator_bytes_down"] > 0  # the owners asked for a fresh copy
    assert "run.num_rounds changes" in log


def test_sigterm_exits_143(ws, tiny_model_dir):
    run_file = _run_file(ws, "terminated", tiny_model_dir)
    proc = _start("simulate", "--config", str(run_file), log=ws / "terminated.log")
    _wait_for_round(ws / "terminated", 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert _no_run_processes_of(proc.pid) == []


def test_kill_9_leaves_no_ray_process_behind(ws, tiny_model_dir):
    run_file = _run_file(ws, "killed", tiny_model_dir)
    proc = _start("simulate", "--config", str(run_file), log=ws / "killed.log")
    _wait_for_round(ws / "killed", 1, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert _no_run_processes_of(proc.pid, timeout=60) == []
    # The kernel released the lock with the process: the folder can be taken again.
    lock_run_dir(ws / "killed")
    unlock_run_dir(ws / "killed")


def test_a_failed_first_round_says_no_checkpoint_exists(ws, tiny_model_dir, capsys, monkeypatch):
    run_file = _run_file(ws, "failing", tiny_model_dir, num_rounds=1, min_successful_clients=1)
    faults.inject(monkeypatch, {0: "raise", 1: "raise"})
    code, err = _main("simulate", "--config", str(run_file), capsys=capsys)
    assert code == 2 and "no checkpoint exists yet" in err
    assert "the last good aggregate is in" not in err


@pytest.mark.parametrize("change,message", [
    ({"num_rounds": 2.5}, "[run] num_rounds must be an integer, got 2.5"),
    ({"num_rounds": True}, "[run] num_rounds must be an integer, got true"),
    ({"model": "no-such-alias"}, "could not load model 'no-such-alias'"),
    ({"model": "/no/such/model/folder"}, "model folder /no/such/model/folder does not exist"),
    ({"out": "/proc/x/run"}, "cannot write to /proc/x/run"),
])
def test_bad_input_fails_before_ray_and_writes_nothing(ws, tiny_model_dir, change, message, capsys):
    name = f"bad-{abs(hash(message)) % 10_000}"
    run_file = _run_file(ws, name, tiny_model_dir, **change)
    code, err = _main("simulate", "--config", str(run_file), capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (ws / name).exists()


def test_adapters_larger_than_the_model_fail_before_ray(ws, tiny_model_dir, capsys):
    run_file = _run_file(ws, "deep", tiny_model_dir)
    run_file.write_text(run_file.read_text().replace("num_adapter_layers = 2", "num_adapter_layers = 8"))
    code, err = _main("simulate", "--config", str(run_file), capsys=capsys)
    assert code == 2 and "smaller than the model's 6 blocks" in err
    assert not (ws / "deep").exists()


def test_outputs_are_never_replaced_silently_and_get_the_usual_permissions(ws, tiny_model_dir, tmp_path, capsys):
    emulator = tmp_path / "emu"
    build = ["build-emulator", "--model", str(tiny_model_dir), "--method", "uniform-drop", "--adapters", "2",
             "--out", str(emulator)]
    assert _main(*build, capsys=capsys)[0] == 0
    code, err = _main(*build, capsys=capsys)
    assert code == 2 and "--overwrite" in err
    (emulator / "model.safetensors").unlink()  # what --overwrite must not leave behind: a broken folder
    assert _main(*build, "--overwrite", capsys=capsys)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (emulator / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    run_file = _run_file(ws, "occupied", tiny_model_dir, num_rounds=1)
    (ws / "occupied").mkdir()
    (ws / "occupied" / "notes.txt").write_text("mine")
    code, err = _main("simulate", "--config", str(run_file), capsys=capsys)
    assert code == 2 and "not empty" in err
    assert (ws / "occupied" / "notes.txt").read_text() == "mine"


def test_a_missing_task_file_is_reported_as_missing(tiny_model_dir, tmp_path, capsys):
    code, err = _main("evaluate", "--model", str(tiny_model_dir), "--task", str(tmp_path / "nope.jsonl"), capsys=capsys)
    assert code == 2 and f"task file {tmp_path / 'nope.jsonl'} does not exist" in err


def test_a_lock_released_while_a_forked_child_still_holds_it_is_waited_for(tmp_path):
    """flock belongs to the open file, which a forked child shares until it execs or exits: our own
    released lock, still held that way, is taken once the child is gone (another PID's is refused)."""
    out = lock_run_dir(tmp_path / "run")
    child = os.fork()
    if child == 0:  # the child: holds the lock's open file for a moment, then exits
        time.sleep(1.0)
        os._exit(0)
    unlock_run_dir(out)
    try:
        assert lock_run_dir(out) == out  # waited for the child, then locked
    finally:
        unlock_run_dir(out)
        os.waitpid(child, 0)
