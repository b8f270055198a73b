"""A new emulator strategy is one class and one registration: a toy one, defined only here, goes
through build, estimate, fine-tuning and plug-in with the package untouched."""

import json

import pytest

from scaleot_fed.emulator import EmulatorConfig, EmulatorStrategy, PlanInputs, register_strategy
from scaleot_fed.emulator import registry as emulator_registry
from scaleot_fed.emulator.build import plan_layout
from scaleot_fed.errors import ConfigError
from scaleot_fed_cli.main import main

from .conftest import write_items


class KeepEnds(EmulatorStrategy):
    """The middle blocks nearest the centre dropped, every other one replaced by the block below it."""

    name = "keep-ends"

    def replace(self, middle, n_replace, inputs: PlanInputs):
        centre = sorted(middle, key=lambda m: (abs(m - (middle[0] + middle[-1]) / 2), m))[:n_replace]
        # the first of them runs the kept block just below the centre again; the others are dropped
        below = max(m for m in middle if m not in centre and m < min(centre))
        return {m: ({"kind": "shared", "of": below} if m == min(centre) else None) for m in centre}

    def middle_runs(self, alpha):
        return 1.0 - alpha + 0.1  # the one shared position runs a block too (roughly)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(emulator_registry, "REGISTRY", dict(emulator_registry.REGISTRY))
    return register_strategy(KeepEnds())


def test_a_strategy_defined_in_a_test_file_builds_estimates_trains_and_plugs_in(toy, tiny_model_dir, tmp_path, capsys):
    layout = plan_layout(10, EmulatorConfig("keep-ends", 2, alpha=0.5), PlanInputs(0.5))
    assert [(e["source"], e["kind"]) for e in layout] == [(0, "adapter"), (1, "block"), (2, "block"), (3, "shared"),
                                                          (7, "block"), (8, "block"), (9, "adapter")]
    assert main(["build-emulator", "--model", str(tiny_model_dir), "--method", "keep-ends", "--adapters", "2",
                 "--alpha", "0.5", "--out", str(tmp_path / "emu")]) == 0
    manifest = json.loads((tmp_path / "emu" / "manifest.json").read_text())
    assert manifest["strategy"] == "keep-ends" and manifest["shared_layers"] and manifest["dropped_layers"]
    assert main(["estimate", "--model", str(tiny_model_dir), "--method", "keep-ends", "--adapters", "2",
                 "--alpha", "0.5", "--seq-len", "16"]) == 0
    assert "emulator (keep-ends" in capsys.readouterr().out
    write_items(tmp_path / "items.jsonl", 24, seed=0)
    (tmp_path / "ft.toml").write_text("[finetune]\nmode = \"full\"\nsteps = 2\nbatch_size = 4\nmax_length = 64\n")
    assert main(["finetune", "--model", str(tmp_path / "emu"), "--task", str(tmp_path / "items.jsonl"), "--dev-items",
                 "4", "--config", str(tmp_path / "ft.toml"), "--no-progress", "--out", str(tmp_path / "trained.safetensors")]) == 0
    assert main(["plug-in", "--model", str(tiny_model_dir), "--emulator", str(tmp_path / "emu"), "--trained",
                 str(tmp_path / "trained.safetensors"), "--out", str(tmp_path / "plugged")]) == 0
    assert (tmp_path / "plugged" / "config.json").exists()


def test_a_strategy_that_plans_what_it_may_not_is_refused(toy):
    class Outside(KeepEnds):
        name = "outside"

        def replace(self, middle, n_replace, inputs):
            return {0: None}  # an adapter block

    register_strategy(Outside())
    with pytest.raises(ConfigError, match=r"planned blocks outside the middle \[0\]"):
        plan_layout(10, EmulatorConfig("outside", 2, alpha=0.5), PlanInputs(0.5))
    with pytest.raises(ConfigError, match="already registered"):
        register_strategy(type("Other", (KeepEnds,), {"name": "scaleot"})())
    with pytest.raises(ConfigError, match="unknown emulator strategy 'nope'; choose one of scaleot, "):
        EmulatorConfig("nope")


def test_the_old_key_strategy_is_read_as_method_with_one_line_and_old_snapshots_compare_equal():
    from scaleot_fed.config import as_dict, from_dict
    from scaleot_fed.rundir import config_changes

    with pytest.warns(FutureWarning, match=r"\[emulator\] strategy is now called method; write method = 'crash'"):
        config = from_dict(EmulatorConfig, {"strategy": "crash", "alpha": 0.25}, "emulator")
    assert config.method == "crash" and config.alpha == 0.25
    with pytest.raises(ConfigError, match="strategy and method are one key"):
        from_dict(EmulatorConfig, {"strategy": "crash", "method": "scaleot"}, "emulator")
    # a run folder written before the rename: its snapshot says "strategy" and is the same config
    new = {"emulators": [as_dict(config)], "strategy": {"name": "fedavg", "params": {}}}
    saved = {"emulators": [{**{k: v for k, v in as_dict(config).items() if k != "method"}, "strategy": "crash"}],
             "strategy": {"name": "fedavg", "params": {}}}
    assert config_changes(saved, new) == []
    saved["emulators"][0]["strategy"] = "scaleot"
    assert config_changes(saved, new) == ["emulators"]
