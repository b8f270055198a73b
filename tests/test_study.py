import json

from recipes.cli import main


def test_study_grid_with_distilled_baseline_resumes(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "study.toml").write_text(f"""
[study]
out = "{tmp_path / 'study'}"
model = "{tmp_path / 'model'}"
tasks = ["piqa"]
modes = ["lora"]
variant_emulator = "scaleot"
variant_modes = ["full", "adapter"]
train_limit = 24
dev_items = 4
eval_limit = 4
eval_batch_size = 4
full_finetune = false

[finetune]
steps = 2
batch_size = 4
max_length = 64

[layer_replace]
steps = 2
batch_size = 2
block_size = 16
harmonizer_rank = 4

[distill]
steps = 2
batch_size = 2
block_size = 16

[[emulator]]
name = "ot-distilled"
strategy = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5
distill = true

[[emulator]]
name = "scaleot"
strategy = "scaleot"
num_adapter_layers = 2
alpha = 0.5
rank_keep_ratio = 0.5
""")
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    # the PEFT variants run on the named emulator only
    assert {(c["emulator"], c["mode"]) for c in summary["cells"]} == {
        ("ot-distilled", "lora"), ("scaleot", "lora"), ("scaleot", "full"), ("scaleot", "adapter")}
    trainable = {c["mode"]: c["rows"]["emulator_finetune"]["trainable_params"]
                 for c in summary["cells"] if c["emulator"] == "scaleot"}
    assert trainable["lora"] < trainable["adapter"] < trainable["full"]
    assert "| scaleot | full |" in (tmp_path / "study" / "summary.md").read_text()
    costs = {c["emulator"]: c["build_cost"] for c in summary["cells"]}
    assert costs["ot-distilled"]["kind"] == "distillation" and costs["scaleot"]["kind"] == "layer-replace"
    assert costs["ot-distilled"]["tokens_forward_backward"] == 2 * 2 * 16
    assert (tmp_path / "study" / "frontier.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    assert "computing" not in capsys.readouterr().out


def test_study_variant_emulator_must_exist(tmp_path):
    import pytest

    from recipes.study import load_study_config
    from scaleot_fed.errors import ConfigError

    (tmp_path / "s.toml").write_text('[study]\nvariant_emulator = "nope"\nvariant_modes = ["full"]\n'
                                     '[[emulator]]\nname = "u"\nstrategy = "uniform-drop"\n')
    with pytest.raises(ConfigError, match="not one of"):
        load_study_config(tmp_path / "s.toml")


def _cell(task, emulator, plug_in, emulator_ft, norm_shift=0.0):
    rows = {"plug_in": {"acc": plug_in, "acc_norm": plug_in + norm_shift},
            "emulator_finetune": {"acc": emulator_ft, "acc_norm": emulator_ft, "trainable_params": 10}}
    return {"task": task, "mode": "lora", "emulator": emulator, "rows": rows}


def test_summary_averages_only_tasks_every_row_has_in_each_tasks_metric(tmp_path):
    from recipes.study import common_tasks, plot_frontier, summary_markdown

    # "b" lacks task t2: its average, and everyone else's, must be over t1 only, in t1's metric.
    summary = {"model": "m", "tasks": ["t1", "t2"], "metrics": {"t1": "acc_norm", "t2": "acc"}, "n_eval": 100,
               "cells": [_cell("t1", "a", 0.6, 0.5, norm_shift=0.1), _cell("t2", "a", 0.2, 0.1),
                         _cell("t1", "b", 0.4, 0.4)]}
    assert common_tasks(summary) == ["t1"]
    text = summary_markdown(summary)
    assert "| a | lora | 10 | 70.0 / 50.0 / +20.0 | 20.0 / 10.0 / +10.0 | 70.0 / 50.0 / +20.0 |" in text
    assert "| b | lora | 10 | 40.0 / 40.0 / +0.0 | n/a | 40.0 / 40.0 / +0.0 |" in text
    assert "t1 (acc_norm)" in text and "5.0 points" in text
    plot_frontier(summary, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_study_metrics_must_name_study_tasks_and_known_metrics(tmp_path):
    import pytest

    from recipes.study import load_study_config
    from scaleot_fed.errors import ConfigError

    for metrics in ('{ piqa = "f1" }', '{ hellaswag = "acc_norm" }'):
        (tmp_path / "s.toml").write_text(f'[study]\ntasks = ["piqa"]\nmetrics = {metrics}\n'
                                         '[[emulator]]\nname = "u"\nstrategy = "uniform-drop"\n')
        with pytest.raises(ConfigError, match="study.metrics"):
            load_study_config(tmp_path / "s.toml")
