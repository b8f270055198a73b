"""Tracking: each backend written for real and read back with its own reader; a failing tracker
only warns; a resume continues the same tracked run."""

import json
import logging

import pytest

from scaleot_fed.errors import ConfigError
from scaleot_fed.tracking import (
    BACKENDS,
    STATE,
    Tracker,
    Tracking,
    TrackingConfig,
    WandbTracker,
    close_open,
    flatten,
    scalars,
)


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(p.parent for p in folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(set(values)) for tag, values in found.items()}


def mlflow_run(out):
    from mlflow.tracking import MlflowClient

    state = json.loads((out / STATE).read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    return client, client.get_run(state["run_id"])


def test_numbers_are_flattened_and_the_rest_left_out():
    row = {"acc": 0.5, "n": 3, "ok": True, "name": "x", "nan": float("nan"), "per_owner": {"3": {"acc": 0.25}}, "ids": [1]}
    assert scalars(row) == {"acc": 0.5, "n": 3.0, "per_owner/3/acc": 0.25}
    assert flatten({"run": {"seed": 0, "tags": []}, "x": {}}) == {"run.seed": 0, "run.tags": [], "x": {}}


def test_tensorboard_scalars_text_and_images_read_back(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1]), plt.savefig(tmp_path / "curve.png"), plt.close()
    (tmp_path / "table.md").write_text("| a |\n|---|\n| 1 |\n")
    tracking = Tracking(TrackingConfig(backend="tensorboard"), tmp_path)
    tracking.params({"run": {"seed": 3}})
    tracking.metrics({"acc": 0.5, "per_owner": {"0": {"acc": 0.25}}}, 1)
    tracking.metrics({"acc": 0.75}, 2)
    tracking.artifacts([tmp_path / "curve.png", tmp_path / "table.md", tmp_path / "missing.png"])
    tracking.close()
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"acc": [(1, 0.5), (2, 0.75)], "per_owner/0/acc": [(1, 0.25)]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["images"] == ["curve"] and "table.md/text_summary" in acc.Tags()["tensors"]
    assert json.loads((tmp_path / STATE).read_text())["last_step"] == 2


def test_mlflow_local_store_reads_back_and_a_resume_continues_the_same_run(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    tracking = Tracking(TrackingConfig(backend="mlflow"), tmp_path)
    tracking.params({"run": {"seed": 3, "task": "piqa"}})
    tracking.metrics({"acc": 0.5, "bytes_up": 1000}, 1)
    tracking.close()
    client, run = mlflow_run(tmp_path)
    assert run.data.params == {"run.seed": "3", "run.task": "piqa"} and run.info.status == "FINISHED"
    assert tracking.missed([1, 2, 3]) == [2, 3]
    again = Tracking(TrackingConfig(backend="mlflow"), tmp_path, resume=True)
    assert again.missed([1, 2, 3]) == [2, 3] and again.tracker.run_id == run.info.run_id
    again.params({"run": {"seed": 3, "task": "piqa"}})  # (params are write-once: not sent twice)
    again.metrics({"acc": 0.75}, 2)
    again.artifacts([tmp_path / "results.json"])
    again.close()
    client, run = mlflow_run(tmp_path)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "acc")] == [(1, 0.5), (2, 0.75)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["results.json"]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # a new run in the same folder (no resume) is a new tracked run
    Tracking(TrackingConfig(backend="mlflow"), tmp_path).close()
    assert len(client.search_runs([run.info.experiment_id])) == 2


def test_a_run_that_raised_ends_failed_or_killed_in_the_store(tmp_path):
    for error, status in ((RuntimeError("out of memory"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        out = tmp_path / status
        with pytest.raises(type(error)), Tracking(TrackingConfig(backend="mlflow"), out) as tracking:
            tracking.metrics({"acc": 0.5}, 1)
            raise error
        assert mlflow_run(out)[1].info.status == status
    with pytest.raises(SystemExit), Tracking(TrackingConfig(backend="mlflow"), tmp_path / "ok"):
        raise SystemExit(0)  # a clean exit
    assert mlflow_run(tmp_path / "ok")[1].info.status == "FINISHED"
    # a process about to end without unwinding (a simulation's signal handler) ends its open runs first
    with Tracking(TrackingConfig(backend="mlflow"), tmp_path / "signalled"):
        close_open("killed")
        assert mlflow_run(tmp_path / "signalled")[1].info.status == "KILLED"
    assert mlflow_run(tmp_path / "signalled")[1].info.status == "KILLED"  # (not ended twice)
    with pytest.raises(ValueError, match="ends as one of"):
        Tracking(TrackingConfig(backend="none"), tmp_path).close("crashed")


def test_wandb_marks_a_run_that_did_not_finish_as_failed():
    finished = []

    class Run:  # (W&B itself is an optional extra, not installed here: its run object stands in)
        def finish(self, exit_code=None):
            finished.append(exit_code)

    tracker = object.__new__(WandbTracker)
    tracker.run = Run()
    for status in ("finished", "failed", "killed"):
        tracker.close(status)
    assert finished == [0, 1, 1]  # W&B: 0 is finished, anything else failed


def test_a_failing_tracker_warns_once_and_never_stops_the_run(tmp_path, monkeypatch, caplog):
    class Broken(Tracker):
        def log_metrics(self, metrics, step):
            raise OSError("disk full")

    monkeypatch.setitem(BACKENDS, "tensorboard", Broken)
    tracking = Tracking(TrackingConfig(backend="tensorboard"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="scaleot_fed.tracking"):
        for step in range(3):
            tracking.metrics({"acc": 0.5}, step)
        tracking.close()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "metrics failed, the run goes on" in warned[0] and "disk full" in warned[0]

    class CannotOpen(Tracker):
        def __init__(self, *args):
            raise RuntimeError("no server")

    monkeypatch.setitem(BACKENDS, "mlflow", CannotOpen)
    with caplog.at_level(logging.WARNING, logger="scaleot_fed.tracking"):
        tracking = Tracking(TrackingConfig(backend="mlflow"), tmp_path)
        tracking.metrics({"acc": 0.5}, 1)
    assert not tracking.active and "open failed" in caplog.records[-1].getMessage()


def test_a_backend_or_its_package_missing_is_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"^tracking.backend must be one of none, tensorboard, mlflow, wandb; got 'tb'$"):
        TrackingConfig(backend="tb")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install 'scaleot-fed\[wandb\]'"):
        TrackingConfig(backend="wandb").check_installed()
    TrackingConfig(backend="mlflow").check_installed()


def test_a_resume_into_another_store_or_experiment_is_a_new_tracked_run(tmp_path):
    first = Tracking(TrackingConfig(backend="mlflow"), tmp_path)
    first.metrics({"acc": 0.5}, 1)
    first.close()
    moved = Tracking(TrackingConfig(backend="mlflow", experiment="other"), tmp_path, resume=True)
    assert moved.tracker.run_id != first.tracker.run_id and moved.missed([1, 2]) == [1, 2]  # every step again
    moved.close()


def test_client_mods_travel_to_an_existing_ray_cluster(monkeypatch):
    from simulations.client_app import CLIENT_MODS
    from simulations.config import fed_config_from_dict
    from simulations.runner import backend_config

    config = fed_config_from_dict({"run": {"ray_address": "10.0.0.1:6379"}})
    assert "runtime_env" not in backend_config(config)["init_args"]
    monkeypatch.setenv(CLIENT_MODS, "tests.faults:client_fault")
    assert backend_config(config)["init_args"]["runtime_env"]["env_vars"][CLIENT_MODS] == "tests.faults:client_fault"
