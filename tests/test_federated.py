"""Federated runs on Flower's simulation engine with real Ray actors, on a tiny GPT-2."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file, save_file

from scaleot_fed.errors import ConfigError, ScaleOTError
from simulations.checkpoint import checkpointed_seconds
from simulations.config import fed_config_from_dict
from simulations.resume import load_run_config
from simulations.runner import simulate, validate

from . import faults
from .conftest import write_items


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fed")
    (root / "model").symlink_to(tiny_model_dir)
    write_items(root / "train.jsonl", 90, 0)
    write_items(root / "eval.jsonl", 8, 1)
    old = os.environ.get("SCALEOT_FED_CACHE")
    os.environ["SCALEOT_FED_CACHE"] = str(root / "cache")  # a fresh client-side emulator cache
    yield root
    if old is None:
        os.environ.pop("SCALEOT_FED_CACHE", None)
    else:
        os.environ["SCALEOT_FED_CACHE"] = old


def _config(root, out, **run):
    data = {
        "run": {"out": str(root / out), "model": str(root / "model"), "task": str(root / "train.jsonl"),
                "eval_task": str(root / "eval.jsonl"), "num_rounds": 2, "num_clients": 3, "clients_per_round": 2,
                "eval_batch_size": 8, "eval_every": 10, "final_table": False} | run,
        "partition": {"kind": "iid"},
        "strategy": {"name": "fedavg"},
        "finetune": {"mode": "lora", "steps": 2, "batch_size": 4, "lr": 5e-3},
        "emulator": {"method": "uniform-drop", "num_adapter_layers": 2, "alpha": 0.5},
    }
    return data


def _aggregate(path):
    return load_file(str(path / "aggregate.safetensors"))


def _finished(fed, out, **run):
    """The run folder ``fed/out`` of ``_config(fed, out, **run)``: made here unless a finished one
    is there already (every test that needs a reference run asks for it, none relies on an
    earlier test having made it)."""
    if not (fed / out / "DONE").exists():
        simulate(fed_config_from_dict(_config(fed, out, **run)))
    return fed / out


def _plain(fed):
    """The aggregate of the plain two-round FedAvg run ``a``."""
    return _aggregate(_finished(fed, "a"))


def _fedavg_one_round(fed):
    """One FedAvg round with all three owners (the reference for one-round strategies)."""
    return _finished(fed, "r1-fedavg", clients_per_round=3, num_rounds=1)


def _initial_state(out, fed_config) -> dict:
    """The server's state before round 1, rebuilt as the server builds it (same seed)."""
    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import make_trainable

    emulator = load_emulator(out / "emulator" / "emulator")
    torch.manual_seed(fed_config.run.seed)
    model = make_trainable(emulator.model, list(emulator.adapter_positions()), fed_config.finetune)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_simulation_delivers_the_emulator_once_and_reports(fed):
    out = simulate(fed_config_from_dict(_config(fed, "a", final_table=True, centralised_offsite=True,
                                                 centralised_full_finetune=True, attack=True, save_plugged=False)))
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["successful"] == 2 for r in rounds)
    folder = sum(p.stat().st_size for p in (out / "emulator" / "emulator").iterdir())
    # one delivery for the whole (single-machine) federation, none in later rounds
    assert folder <= rounds[0]["emulator_bytes_down"] < folder + 4096
    assert rounds[1]["emulator_bytes_down"] == 0
    # only trainable state travels per round: each train message carries it, and far less than the model
    assert rounds[1]["bytes_up"] == 2 * metrics["trainable_bytes"]
    assert metrics["trainable_bytes"] < 0.05 * metrics["full_model_bytes"]
    results = json.loads((out / "results.json").read_text())
    rows = results["emulators"]["federated-fedavg"]["rows"]
    assert set(rows) == {"full_zero_shot", "emulator_zero_shot", "full_finetune", "emulator_finetune", "plug_in",
                         "emulator_attack"}
    entry = results["emulators"]["federated-fedavg"]
    assert entry["attack_gap"] == pytest.approx(rows["plug_in"]["acc"] - rows["emulator_attack"]["acc"])
    assert "Attack gap" in (out / "results.md").read_text()
    # the same pooled data trained centrally, for as many examples as the federation saw (2 x 2 x 2 steps)
    central = results["emulators"]["centralised"]
    assert central["steps"] == 8 and central["rows"]["full_zero_shot"] == rows["full_zero_shot"]
    assert central["rows"]["plug_in"] != rows["plug_in"] or central["rows"]["emulator_finetune"] != rows["emulator_finetune"]
    for name in ("metrics.csv", "rounds.png", "partitions.png", "results.md", "DONE"):
        assert (out / name).exists(), name
    assert not (out / "plugged").exists()  # (save_plugged = false: no model copy)


def test_same_seed_same_result_and_no_second_delivery(fed):
    a = _plain(fed)  # (also fills the owners' emulator cache)
    out = simulate(fed_config_from_dict(_config(fed, "b")))
    b = _aggregate(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "metrics.json").read_text())["rounds"][0]["emulator_bytes_down"] == 0  # cached


def test_rows_given_to_a_simulation_must_be_on_its_items(fed):
    """A row scored elsewhere (a study's zero-shot) is taken only if it is on the run's items:
    one on other items is refused before anything is written."""
    config = fed_config_from_dict(_config(fed, "given"))
    row = {"acc": 1.0, "acc_norm": 1.0, "n": 1, "items": {"loglik": [[0.0, -1.0]], "gold": [0], "choice_chars": [[3, 3]]}}
    with pytest.raises(ConfigError, match="'full_zero_shot' was scored on other items than this run's 8"):
        simulate(config, rows={"full_zero_shot": row})
    assert not (fed / "given").exists()


def test_a_run_stopped_after_its_last_round_resumes_into_its_final_table(fed, monkeypatch):
    """No round is left to score the aggregate: the final table loads it itself. The checkpoint is
    made float64 first, as FedAdam's were before aggregates kept their dtypes: the resumed run is
    back in float32, and equal to the uninterrupted run."""
    faults.stop_after_round(monkeypatch, 2)
    with pytest.raises(faults.Killed, match="stopped after round 2"):
        simulate(fed_config_from_dict(_config(fed, "last", final_table=True, save_plugged=False)))
    monkeypatch.undo()
    ckpt = fed / "last" / "checkpoint" / "aggregate.safetensors"
    save_file({k: v.double() for k, v in load_file(str(ckpt)).items()}, str(ckpt))
    out = simulate(load_run_config(fed / "last"), resume=True)
    resumed, plain = _aggregate(out), _plain(fed)
    assert all(v.dtype == torch.float32 and torch.equal(v, plain[k]) for k, v in resumed.items())
    name = fed_config_from_dict(_config(fed, "last")).emulator.name
    scored = {k: json.loads((out / "rows" / f"{name}__{k}.json").read_text())["items"]["loglik"]
              for k in ("emulator_zero_shot", "federated__emulator_finetune")}
    assert scored["emulator_zero_shot"] != scored["federated__emulator_finetune"]  # (LoRA's B starts at zero)


def test_kill_and_resume_gives_the_uninterrupted_result(fed, monkeypatch):
    faults.stop_after_round(monkeypatch, 1)
    with pytest.raises(faults.Killed, match="stopped after round 1"):
        simulate(fed_config_from_dict(_config(fed, "c")))
    monkeypatch.undo()
    out = fed / "c"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["round"] == 1
    assert not (out / "DONE").exists()
    assert checkpointed_seconds(out) > 0  # round 1's training: counted in a study's compute on resume
    simulate(load_run_config(out), resume=True)
    a, c = _plain(fed), _aggregate(out)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]] == [1, 2]


def test_a_bad_update_is_rejected_and_the_round_continues(fed, caplog, monkeypatch):
    config = _config(fed, "d", num_rounds=1, clients_per_round=3, min_successful_clients=2)
    faults.inject(monkeypatch, {0: "nan"})
    with caplog.at_level(logging.WARNING, logger="scaleot_fed.federation"):
        out = simulate(fed_config_from_dict(config))
    row = json.loads((out / "metrics.json").read_text())["rounds"][0]
    assert row["successful"] == 2 and row["failed"] == [0]
    assert any("data owner 0" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)


def test_too_many_failures_stop_the_run_with_a_clear_error(fed, caplog, monkeypatch):
    config = _config(fed, "e", num_rounds=1, clients_per_round=3, min_successful_clients=2)
    faults.inject(monkeypatch, {0: "raise", 1: "wrong-keys"})
    with caplog.at_level(logging.WARNING, logger="scaleot_fed.federation"):
        with pytest.raises(ScaleOTError, match="only 1 of 3 data owners"):
            simulate(fed_config_from_dict(config))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "data owner 0" in messages and "data owner 1" in messages and "wrong keys" in messages


@pytest.mark.parametrize("change,match", [
    ({"strategy": {"name": "fedmagic"}}, "unknown strategy"),
    ({"run": {"clients_per_round": 5}}, "clients_per_round"),
    ({"run": {"fraction_per_round": 1.5}}, "fraction_per_round"),
    ({"run": {"client_val_fraction": 1.5}}, "client_val_fraction"),
    ({"run": {"min_successful_clients": 3, "clients_per_round": 2}}, "min_successful_clients"),
    ({"emulator": {"path": "/nonexistent/emulator"}}, "not an emulator folder"),
    ({"run": {"task": "squad"}}, "unknown task"),
    ({"partition": {"kind": "random"}}, "unknown partition kind"),
])
def test_bad_config_fails_at_start(fed, change, match):
    config = _config(fed, "x")
    for section, values in change.items():
        config[section] = config.get(section, {}) | values
    with pytest.raises((ConfigError, ScaleOTError), match=match):
        validate(fed_config_from_dict(config))


def _rdp_epsilon(noise: float, releases: int, delta: float) -> float:
    """The same question asked of Google's dp-accounting directly."""
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise), releases)
    return accountant.get_epsilon(delta)


def test_dp_without_noise_and_with_a_huge_clip_is_plain_fedavg(fed):
    config = _config(fed, "dp0")
    config["privacy"] = {"mode": "central", "noise_multiplier": 0.0, "clipping_norm": 1e9}
    out = simulate(fed_config_from_dict(config))
    plain, private = _plain(fed), _aggregate(out)
    # equal partitions (90 items / 3 owners): equal weights average exactly like size weights
    assert all(torch.allclose(plain[k], private[k], rtol=1e-5, atol=1e-7) for k in plain)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["privacy"]["mode"] == "central" and metrics["privacy"]["epsilon"] == float("inf")


def test_dp_epsilon_grows_with_rounds_as_the_accountant_says(fed):
    config = _config(fed, "dp1", num_rounds=3)
    config["privacy"] = {"mode": "central", "noise_multiplier": 1.0, "clipping_norm": 0.5, "delta": 1e-3}
    out = simulate(fed_config_from_dict(config))
    metrics = json.loads((out / "metrics.json").read_text())
    eps = [r["epsilon"] for r in metrics["rounds"]]
    assert eps == pytest.approx([_rdp_epsilon(1.0, k, 1e-3) for k in (1, 2, 3)], rel=1e-9)
    assert eps[0] < eps[1] < eps[2] and all(r["epsilon_round"] == pytest.approx(eps[0]) for r in metrics["rounds"])
    assert metrics["privacy"]["epsilon"] == eps[-1]
    plain = _plain(fed)
    assert not all(torch.allclose(plain[k], v) for k, v in _aggregate(out).items())  # noise was added


def test_local_dp_clips_every_update_before_it_leaves(fed):
    config = _config(fed, "dp2", num_rounds=1)
    config["privacy"] = {"mode": "local", "noise_multiplier": 0.0, "clipping_norm": 1e-3}
    fed_config = fed_config_from_dict(config)
    out = simulate(fed_config)
    start = _initial_state(out, fed_config)
    new = _aggregate(out)
    change = torch.sqrt(sum(((new[k] - start[k]) ** 2).sum() for k in start))
    # each owner's update was clipped to norm 1e-3, so their average moves at most that far
    assert 0 < change <= 1e-3 * (1 + 1e-4)
    assert json.loads((out / "metrics.json").read_text())["rounds"][0]["epsilon"] == float("inf")


def test_a_tampered_delivery_is_refused_and_the_others_carry_on(fed, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SCALEOT_FED_EMULATOR_CACHE", str(tmp_path / "owners"))  # nobody holds it yet
    config = _config(fed, "t", num_rounds=1, clients_per_round=3, min_successful_clients=2)
    faults.tamper_first_delivery(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="scaleot_fed.federation"):
        out = simulate(fed_config_from_dict(config))
    row = json.loads((out / "metrics.json").read_text())["rounds"][0]
    assert row["successful"] == 2 and len(row["failed"]) == 1
    refused = [r.getMessage() for r in caplog.records if "left out of this run" in r.getMessage()]
    assert len(refused) == 1 and "sha256" in refused[0] and f"data owner {row['failed'][0]} " in refused[0]


def test_private_blocks_are_never_shipped(fed):
    config = _config(fed, "p", private_blocks=[4])  # uniform-drop alpha 0.5 of 6 blocks keeps 1 and 4
    with pytest.raises(ScaleOTError, match="blocks marked private"):
        simulate(fed_config_from_dict(config))
    assert not (fed / "p" / "metrics.json").exists()


def test_secure_aggregation_equals_fedavg_and_the_server_sees_no_update(fed):
    plain = _fedavg_one_round(fed)
    config = _config(fed, "sa", clients_per_round=3, num_rounds=1, client_eval=False)
    config["secure_aggregation"] = {"enabled": True}
    out = simulate(fed_config_from_dict(config))
    a, s = _aggregate(plain), _aggregate(out)
    # quantisation: 2 x 8.0 / 2**24 ~ 1e-6 per value and owner (updates scaled by examples / largest owner)
    assert all(torch.allclose(a[k], s[k], rtol=0, atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], s[k]) for k in a)  # it really went through quantisation
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert all(r["plaintext_arrays_seen"] == 0 and r["successful"] == 3 for r in rounds)
    assert rounds[0]["client_val_loss"] is not None and rounds[0]["update_norm"] > 0  # owners' metrics still arrive
    plain_rounds = json.loads((plain / "metrics.json").read_text())["rounds"]
    assert rounds[0]["bytes_up"] > plain_rounds[0]["bytes_up"]  # masked vectors + key shares


def test_secure_aggregation_runs_the_configured_sum_based_strategy(fed):
    """FedAdam under SecAgg+: its server step on the securely summed mean, as without SecAgg+ (up
    to quantisation), and not FedAvg's plain mean."""
    def run(out, secure):
        config = _config(fed, out, clients_per_round=3, num_rounds=1, client_eval=False)
        config["strategy"] = {"name": "fedadam", "params": {"eta": 0.05}}
        if secure:
            config["secure_aggregation"] = {"enabled": True}
        return _aggregate(simulate(fed_config_from_dict(config)))

    plain, secure, fedavg = run("adam-plain", False), run("adam-sa", True), _aggregate(_fedavg_one_round(fed))
    assert all(torch.allclose(plain[k], secure[k], rtol=0, atol=1e-4) for k in plain)
    assert max(float((secure[k] - fedavg[k]).abs().max()) for k in secure) > 1e-3


@pytest.mark.parametrize("change,match", [
    ({"strategy": {"name": "krum"}}, "strategy .krum. needs each one \\(it is not sum-based\\)"),
    ({"privacy": {"mode": "local"}}, "cannot be combined"),
])
def test_secure_aggregation_config_errors(fed, change, match):
    config = _config(fed, "x") | change
    config["secure_aggregation"] = {"enabled": True}
    with pytest.raises(ConfigError, match=match):
        fed_config_from_dict(config)


def test_dp_budget_ends_the_run_cleanly_before_it_is_exceeded(fed):
    one_round = _rdp_epsilon(1.0, 1, 1e-3)
    config = _config(fed, "dp3", num_rounds=3)
    config["privacy"] = {"mode": "central", "noise_multiplier": 1.0, "clipping_norm": 0.5, "delta": 1e-3,
                         "max_epsilon": (one_round + _rdp_epsilon(1.0, 2, 1e-3)) / 2}  # room for one round only
    out = simulate(fed_config_from_dict(config))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1] and "privacy budget" in metrics["stopped_early"]
    assert metrics["privacy"]["epsilon"] <= config["privacy"]["max_epsilon"]
    assert (out / "aggregate.safetensors").exists() and (out / "DONE").exists()


@pytest.mark.parametrize("name,params", [
    ("fedadam", {}),
    ("fedyogi", {}),
    ("fedtrimmedavg", {"beta": 0.34}),  # 3 owners: one trimmed off each end = the coordinate-wise median
])
def test_server_optimisers_and_robust_aggregation_run_a_real_round(fed, name, params):
    config = _config(fed, f"s-{name}", num_rounds=1, clients_per_round=3, client_eval=False)
    config["strategy"] = {"name": name, "params": params}
    fed_config = fed_config_from_dict(config)
    out = simulate(fed_config)
    assert json.loads((out / "metrics.json").read_text())["rounds"][0]["successful"] == 3
    # the aggregate stays in the dtype it was sent in (FedOpt's float64 step made it float64: twice the bytes)
    assert {v.dtype for v in _aggregate(out).values()} == {torch.float32}
    new = {k: v.double() for k, v in _aggregate(out).items()}
    start = {k: v.double() for k, v in _initial_state(out, fed_config).items()}
    assert new.keys() == start.keys()
    assert all(torch.isfinite(v).all() for v in new.values())
    assert any(not torch.equal(new[k], start[k]) for k in start)  # the round moved the state
    # the same owners trained from the same state with the same seeds under FedAvg: the very same
    # updates, so the difference is the aggregation alone
    mean = {k: v.double() for k, v in _aggregate(_fedavg_one_round(fed)).items()}
    assert any(not torch.allclose(new[k], mean[k], rtol=1e-4, atol=1e-6) for k in mean)
    if name in ("fedadam", "fedyogi"):
        # round 1 from zero moments (Yogi's first v equals Adam's): x0 + eta_t * m / (sqrt(v) + tau)
        # with m = (1 - beta_1) delta, v = (1 - beta_2) delta^2, delta = FedAvg mean - x0;
        # FedAdam bias-corrects the step (Flower counts round 1 as t = 2), FedYogi does not
        from strategies import build_strategy

        s = build_strategy(name, params)
        eta_t = s.eta * (1 - s.beta_2**2) ** 0.5 / (1 - s.beta_1**2) if name == "fedadam" else s.eta
        for k in start:
            delta = mean[k] - start[k]
            expected = start[k] + eta_t * (1 - s.beta_1) * delta / (((1 - s.beta_2) * delta**2).sqrt() + s.tau)
            torch.testing.assert_close(new[k], expected, rtol=1e-4, atol=1e-6)


def test_a_task_skewed_federation_of_unequal_owners_reports_every_owner(fed):
    """Three owners, one task each; LoRA ranks 2/4/8 under FFA-LoRA with their own steps and batch
    sizes; the plug-in scored on every owner's held-out split, beside the owner's local adapters;
    a ScaleOT emulator re-aligned by the server after round 1 (owners train on the new one)."""
    words = [["red", "blue", "green"], ["cat", "dog", "cow"], ["sun", "moon", "star"]]
    corpus = fed / "owner-text.txt"
    corpus.write_text("\n\n".join(f"The model owner's own text, passage {i}: rivers, trees and the sun." for i in range(60)))
    path = fed / "mixture.jsonl"
    with open(path, "w") as handle:
        for i in range(90):
            task = i % 3
            a, b = words[task][i % 3], words[task][(i + 1) % 3]
            handle.write(json.dumps({"context": f"Question: say {a}\nAnswer:", "choices": [b, a], "gold": 1,
                                     "task": f"t{task}"}) + "\n")
    config = _config(fed, "hetero", task=str(path), num_clients=3, clients_per_round=3, eval_every=1,
                     per_owner_eval=True, per_owner_items=5, per_owner_local=True, final_table=True,
                     emulator_eval=True)
    config["partition"] = {"kind": "task", "tasks": [["t0"], ["t1"], ["t2"]]}
    config["emulator"] = {"method": "scaleot", "num_adapter_layers": 2, "alpha": 0.5, "rank_keep_ratio": 0.5}
    config["layer_replace"] = {"steps": 2, "batch_size": 2, "block_size": 16, "harmonizer_rank": 8}
    config["realign"] = {"every": 1, "steps": 2, "batch_size": 2, "block_size": 16, "text": str(corpus)}
    config["strategy"] = {"name": "ffa-lora"}
    config["finetune"] |= {"lora_r": 8}
    config["owners"] = {"lora_r": [2, 4, 8], "steps": [1, 2, 3], "batch_size": [2, 4, 4]}
    fed_config = fed_config_from_dict(config)
    out = simulate(fed_config)
    assert (out / "plugged" / "config.json").is_file()  # the plugged-in model (save_plugged's default)

    parts = json.loads((out / "partitions.json").read_text())
    assert parts["field"] == "task" and parts["values"] == ["t0", "t1", "t2"]
    assert parts["counts"] == [[30, 0, 0], [0, 30, 0], [0, 0, 30]]  # each owner holds its own task
    metrics = json.loads((out / "metrics.json").read_text())
    table = metrics["per_owner"]
    assert set(table) == {"0", "1", "2"}
    for owner, rounds in table.items():
        assert set(rounds) == {"1", "2"}
        for m in rounds.values():
            assert m["n"] == 3 and 0 <= m["plug_in_acc"] <= 1 and 0 <= m["local_acc"] <= 1  # 3 held-out items
            assert m["steps"] == [1, 2, 3][int(owner)] and np.isfinite(m["emulator_val_loss"])
    last = metrics["rounds"][-1]
    accs = {o: r["2"]["plug_in_acc"] for o, r in table.items()}
    assert last["per_owner_acc_worst"] == min(accs.values()) and last["per_owner_acc_mean"] == pytest.approx(
        np.mean(list(accs.values())))
    assert accs[str(last["per_owner_worst_owner"])] == min(accs.values())
    results = json.loads((out / "results.json").read_text())
    assert results["per_owner"] == table and "| worst owner |" in (out / "results.md").read_text()
    # owners of rank 2 and 4 send less than the full rank-8 state; the aggregate keeps rank 8
    assert metrics["trainable_bytes"] < last["bytes_up"] < 3 * metrics["trainable_bytes"]
    aggregate, initial = _aggregate(out), _initial_state(out, fed_config)
    assert {k: tuple(v.shape) for k, v in aggregate.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    for name in (k for k in aggregate if "lora_A" in k):  # FFA-LoRA: A is never trained
        torch.testing.assert_close(aggregate[name], initial[name])
    assert any(not torch.equal(aggregate[k], initial[k]) for k in aggregate if "lora_B" in k)
    # re-aligned once, after round 1 (never after the last); round 2's owners got it and trained on it
    first, second = metrics["rounds"]
    assert first["realign"]["version"] == 1 and "realign" not in second
    # round 1's evaluate messages (after the re-alignment) carry it; round 2's train and evaluate ones
    assert first["realign_bytes_down"] > 0 and second["realign_bytes_down"] == 2 * first["realign_bytes_down"]
    assert second["successful"] == 3  # every owner trained on version 1 (a stale reply is rejected)
    assert 0 <= second["emulator_acc"] <= 1


def test_a_users_own_strategy_from_a_file_runs_a_real_round(fed):
    """docs/strategies.md's example, named by its path: owners' updates clipped to a tiny norm
    leave LoRA's B (zero at the start) near zero, where plain FedAvg moves it."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "clipped_fedavg.py"
    config = _config(fed, "user-strategy", num_rounds=1)
    config["strategy"] = {"name": f"{example}:ClippedFedAvg", "params": {"max_norm": 1e-6}}
    clipped = _aggregate(simulate(fed_config_from_dict(config)))
    plain = _aggregate(_finished(fed, "user-strategy-ref", num_rounds=1))
    b = [k for k in clipped if "lora_B" in k]
    assert b and max(float(clipped[k].abs().max()) for k in b) < 1e-6
    assert max(float(plain[k].abs().max()) for k in b) > 1e-4


def test_per_item_files_of_a_strategy_named_by_path_stay_in_the_items_folder(tmp_path):
    """A federated entry is named after its strategy (``federated-configs/x.py:Mine``): its rows'
    per-item files get one safe file name each, inside ``items/``."""
    import gzip
    import json

    from scaleot_fed.report import write_results

    row = {"acc": 0.5, "acc_norm": 0.5, "n": 2, "items": {"loglik": [[0.0, -1.0]] * 2, "gold": [0, 1]}}
    results = {"model": "m", "task": "piqa", "n_train": 4, "n_eval": 2, "finetune": {"mode": "lora", "steps": 1},
               "emulators": {"federated-configs/x.py:Mine": {"rows": {"plug_in": dict(row)}, "gap": 0.0,
                                                             "gap_acc_norm": 0.0, "num_params": 1, "source_num_params": 2}}}
    write_results(tmp_path, results)
    saved = json.loads((tmp_path / "results.json").read_text())
    path = saved["emulators"]["federated-configs/x.py:Mine"]["rows"]["plug_in"]["items_file"]
    assert path == "items/federated-configs_x.py_Mine__plug_in.loglik.json.gz"
    with gzip.open(tmp_path / path, "rt") as handle:
        assert json.load(handle)["gold"] == [0, 1]
    # two names that make the same file name keep a file each
    twin = results["emulators"]["federated-configs/x.py:Mine"]
    results["emulators"] = {"drop 0.5": twin | {"rows": {"plug_in": dict(row)}},
                            "drop_0.5": twin | {"rows": {"plug_in": dict(row, n=3)}}}
    write_results(tmp_path, results)
    files = [e["rows"]["plug_in"]["items_file"] for e in json.loads((tmp_path / "results.json").read_text())["emulators"].values()]
    assert len(set(files)) == 2 and all((tmp_path / f).is_file() for f in files)


@pytest.mark.parametrize("name,match", [
    ("no_such_strategy", "unknown strategy 'no_such_strategy'; name a built-in"),
    ("docs/examples/missing.py:X", "no file"),
    ("docs/examples/clipped_fedavg.py:Nope", "has no 'Nope'"),
    ("numpy:ndarray", "not a subclass of flwr.serverapp.strategy.Strategy"),
    ("no.such.module:Thing", "cannot import no.such.module"),
])
def test_a_bad_strategy_name_is_one_line_before_anything_starts(fed, name, match):
    config = _config(fed, "bad-strategy")
    config["strategy"] = {"name": name}
    with pytest.raises(ConfigError, match=match):
        validate(fed_config_from_dict(config))  # (only the name's form is checked where the config is read)
    assert not (fed / "bad-strategy").exists()


class HalfStepFedAvg(FedAvg):
    """A strategy defined only here, named "tests.test_federated:HalfStepFedAvg": the server moves
    half way from the state it sent to the owners' mean."""

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = {name: a.numpy() for name, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        mean, metrics = super().aggregate_train(server_round, replies)
        return ArrayRecord({n: Array((self.sent[n] + 0.5 * (a.numpy() - self.sent[n])).astype(a.numpy().dtype))
                            for n, a in mean.items()}), metrics


def test_a_strategy_defined_in_a_test_module_runs_by_module_and_class(fed):
    config = _config(fed, "half-step", clients_per_round=3, num_rounds=1)
    config["strategy"] = {"name": "tests.test_federated:HalfStepFedAvg"}
    half = _aggregate(simulate(fed_config_from_dict(config)))
    mean = _aggregate(_fedavg_one_round(fed))
    b = [k for k in half if "lora_B" in k]  # zero before round 1: half of the mean's step
    assert b and all(torch.allclose(half[k], 0.5 * mean[k], atol=1e-6) for k in b)
    assert max(float(mean[k].abs().max()) for k in b) > 1e-4


def test_a_bad_client_mod_is_one_line_before_anything_starts(fed, monkeypatch):
    from simulations.client_app import CLIENT_MODS

    monkeypatch.setenv(CLIENT_MODS, "tests.faults:no_such_mod")
    with pytest.raises(ConfigError, match=r"^\$SCALEOT_FED_CLIENT_MODS entry 'tests.faults:no_such_mod': "
                                          r"tests.faults has no 'no_such_mod'$"):
        validate(fed_config_from_dict(_config(fed, "mods")))
    monkeypatch.setenv(CLIENT_MODS, "tests.faults:KINDS")
    with pytest.raises(ConfigError, match="names something that is not a function"):
        validate(fed_config_from_dict(_config(fed, "mods")))
    assert not (fed / "mods").exists()


def _tracked_matches(tracked: dict[str, list[tuple[int, float]]], out) -> None:
    """Every number of every round in ``metrics.json`` is the tracked scalar at that round."""
    from scaleot_fed.tracking import scalars
    from simulations.federation import tracked_row

    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    expected = {}
    for row in rounds:
        for key, value in scalars(tracked_row(row)).items():
            expected.setdefault(key, []).append((row["round"], value))
    assert expected.keys() <= tracked.keys() and "bytes_up" in expected and "plug_in_acc" in expected
    for key, values in expected.items():
        got = dict(tracked[key])
        assert [s for s, _ in values] == sorted(got), key
        assert all(got[s] == pytest.approx(v, rel=1e-6) for s, v in values), key


def test_tensorboard_and_mlflow_track_what_metrics_json_holds_and_a_resume_continues(fed, monkeypatch):
    from .test_tracking import mlflow_run, tensorboard_scalars

    config = _config(fed, "tracked-tb") | {"tracking": {"backend": "tensorboard"}}
    out = simulate(fed_config_from_dict(config))
    _tracked_matches(tensorboard_scalars(out / "tensorboard"), out)
    # MLflow, stopped after round 1 and resumed: one tracked run holding both rounds and the files
    faults.stop_after_round(monkeypatch, 1)
    with pytest.raises(faults.Killed):
        simulate(fed_config_from_dict(_config(fed, "tracked-ml") | {"tracking": {"backend": "mlflow"}}))
    monkeypatch.undo()
    out = simulate(load_run_config(fed / "tracked-ml"), resume=True)
    client, run = mlflow_run(out)
    assert len(client.search_runs([run.info.experiment_id])) == 1
    tracked = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    _tracked_matches(tracked, out)
    assert run.data.params["strategy.name"] == "fedavg" and run.data.params["run.num_rounds"] == "2"
    assert {"metrics.json", "rounds.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
