import json

from scaleot_fed.cli import main

from .conftest import tiny_model


def test_study_grid_with_distilled_baseline_resumes(tmp_path, gpt2_tokenizer, capsys):
    model = tiny_model("gpt2", num_layers=6, vocab_size=len(gpt2_tokenizer))
    model.save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
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

    from scaleot_fed.errors import ConfigError
    from scaleot_fed.study import load_study_config

    (tmp_path / "s.toml").write_text('[study]\nvariant_emulator = "nope"\nvariant_modes = ["full"]\n'
                                     '[[emulator]]\nname = "u"\nstrategy = "uniform-drop"\n')
    with pytest.raises(ConfigError, match="not one of"):
        load_study_config(tmp_path / "s.toml")
