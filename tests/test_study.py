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
modes = ["lora", "full"]
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
    assert {(c["emulator"], c["mode"]) for c in summary["cells"]} == {
        ("ot-distilled", "lora"), ("ot-distilled", "full"), ("scaleot", "lora"), ("scaleot", "full")}
    costs = {c["emulator"]: c["build_cost"] for c in summary["cells"]}
    assert costs["ot-distilled"]["kind"] == "distillation" and costs["scaleot"]["kind"] == "layer-replace"
    assert costs["ot-distilled"]["tokens_forward_backward"] == 2 * 2 * 16
    assert (tmp_path / "study" / "frontier.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["study", "--config", str(tmp_path / "study.toml"), "--no-progress"]) == 0
    assert "computing" not in capsys.readouterr().out
