import gzip
import json

import pytest
import torch

from recipes.offsite import load_offsite_config
from scaleot_fed.errors import ConfigError
from scaleot_fed_cli.main import main

from .conftest import write_items

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    write_items(tmp_path / "train.jsonl", 48, 0)
    write_items(tmp_path / "eval.jsonl", 12, 1)
    config = f"""
[run]
out = "{tmp_path / 'run'}"
model = "{tiny_model_dir}"
task = "{tmp_path / 'train.jsonl'}"
eval_task = "{tmp_path / 'eval.jsonl'}"
dev_items = 8
eval_batch_size = 4

[finetune]
mode = "lora"
steps = 6
batch_size = 4
lr = 5e-3
eval_every = 3

[layer_replace]
steps = 2
batch_size = 2
block_size = 16
harmonizer_rank = 4

[[emulator]]
name = "scaleot"
method = "scaleot"
num_adapter_layers = 2
alpha = 0.5
rank_keep_ratio = 0.5

[[emulator]]
name = "uniform"
method = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5

[[emulator]]
name = "crash"
method = "crash"
num_adapter_layers = 2
alpha = 0.5
"""
    (tmp_path / "offsite.toml").write_text(config)
    return tmp_path


def test_offsite_pipeline_writes_five_rows_and_resumes(setup, capsys, monkeypatch):
    from scaleot_fed.rundir import RowCache
    from scaleot_fed.train_state import Checkpoint

    saved, save = set(), Checkpoint.save
    monkeypatch.setattr(Checkpoint, "save", lambda self, state: (saved.add(self.path.name), save(self, state)))
    monkeypatch.setitem(RowCache.EVERY_S, "scoring", 0.0)  # every scored batch saved
    assert main(["offsite", "--config", str(setup / "offsite.toml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "computing full_finetune" in out and "Gap" in out
    results = json.loads((setup / "run" / "results.json").read_text())
    for name in ("scaleot", "uniform", "crash"):
        e = results["emulators"][name]
        assert set(e["rows"]) == {"full_zero_shot", "emulator_zero_shot", "full_finetune", "emulator_finetune", "plug_in"}
        assert e["gap"] == pytest.approx(e["rows"]["plug_in"]["acc"] - e["rows"]["emulator_finetune"]["acc"])
        assert all(r["n"] == 12 for r in e["rows"].values())
    # every row's per-item log-likelihoods are kept: its metrics recompute from them
    from scaleot_fed.stats import correct_from_scores

    for row in results["emulators"]["scaleot"]["rows"].values():
        with gzip.open(setup / "run" / row["items_file"], "rt") as handle:
            items = json.load(handle)
        assert len(items["loglik"]) == len(items["gold"]) == 12
        assert correct_from_scores(items["loglik"], items["gold"]).mean() == pytest.approx(row["acc"])
        assert correct_from_scores(items["loglik"], items["gold"], items["choice_chars"]).mean() == pytest.approx(
            row["acc_norm"])
    assert (setup / "run" / "results.png").stat().st_size > 1000
    assert "| Plug-in |" in (setup / "run" / "results.md").read_text()
    assert (setup / "run" / "importance" / "layer_replace.json").exists()  # stage 1 ran inline
    # each training and scoring saved itself as it went and let go once its row was stored
    assert {"full_zero_shot.scoring.pt", "scaleot__plug_in.scoring.pt", "full_finetune.pt",
            "crash__emulator_finetune.pt", "crash__emulator_finetune.scoring.pt"} <= saved
    assert (setup / "run" / "training").is_dir() and not any((setup / "run" / "training").iterdir())

    # a second run reuses every row
    assert main(["offsite", "--config", str(setup / "offsite.toml"), "--no-progress"]) == 0
    assert "computing" not in capsys.readouterr().out
    assert json.loads((setup / "run" / "results.json").read_text()) == results

    # the attack on the same run folder adds only its own row
    assert main(["attack", "--config", str(setup / "offsite.toml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "computing scaleot/emulator_attack" in out and "computing full_finetune" not in out
    assert "attack gap" in out and "| **Attack gap**" in (setup / "run" / "results.md").read_text()
    attacked = json.loads((setup / "run" / "results.json").read_text())["emulators"]["scaleot"]
    # every emulator weight trained: compressed blocks and harmonizers too, not just adapter blocks
    assert attacked["rows"]["emulator_attack"]["trainable_params"] == attacked["num_params"]
    assert attacked["attack_gap"] == pytest.approx(attacked["rows"]["plug_in"]["acc"]
                                                   - attacked["rows"]["emulator_attack"]["acc"])
    assert attacked["rows"]["plug_in"] == results["emulators"]["scaleot"]["rows"]["plug_in"]


def test_offsite_config_errors(setup, tmp_path):
    text = (setup / "offsite.toml").read_text()
    (tmp_path / "a.toml").write_text(text.replace("dev_items = 8", "dev_items = 8\nwarp_speed = 9"))
    with pytest.raises(ConfigError, match="warp_speed"):
        load_offsite_config(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(text + "\n[extras]\nx = 1\n")
    with pytest.raises(ConfigError, match="extras"):
        load_offsite_config(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text(text.replace('mode = "lora"', 'mode = "magic"'))
    with pytest.raises(ConfigError, match="unknown fine-tuning mode"):
        load_offsite_config(tmp_path / "c.toml")


def test_offsite_user_file_needs_an_eval_task(setup, capsys):
    text = (setup / "offsite.toml").read_text()
    bad = "\n".join(line for line in text.splitlines() if not line.startswith("eval_task"))
    (setup / "bad.toml").write_text(bad)
    assert main(["offsite", "--config", str(setup / "bad.toml"), "--no-progress"]) == 2
    assert "eval_task" in capsys.readouterr().err


def test_finetune_command_on_an_emulator(setup, capsys, monkeypatch):
    assert main(["build-emulator", "--model", str(setup / "model"), "--method", "uniform-drop", "--adapters", "2",
                 "--out", str(setup / "emu")]) == 0
    assert main(["finetune", "--model", str(setup / "emu"), "--task", str(setup / "train.jsonl"), "--mode", "full",
                 "--steps", "3", "--batch-size", "4", "--dev-items", "8", "--no-progress", "--save-every", "0",
                 "--out", str(setup / "state.safetensors")]) == 0
    assert "dev loss" in capsys.readouterr().out
    assert not (setup / "state.safetensors.training.pt").exists()  # the finished run's state is let go
    assert main(["plug-in", "--model", str(setup / "model"), "--emulator", str(setup / "emu"),
                 "--trained", str(setup / "state.safetensors"), "--out", str(setup / "plugged")]) == 0
    assert main(["evaluate", "--model", str(setup / "plugged"), "--task", str(setup / "eval.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 12 and {"acc", "acc_norm"} <= set(result)
    # a scoring saved to a file (here: a stopped one's, all of its batches) resumes from it, then lets it go
    from scaleot_fed.evaluate import score_items
    from scaleot_fed.models import load_model_or_emulator
    from scaleot_fed.tasks import load_task
    from scaleot_fed.train_state import Checkpoint

    model, tokenizer, _ = load_model_or_emulator(str(setup / "plugged"))
    saved = Checkpoint(setup / "scores.pt", every_s=0.0)
    score_items(model, tokenizer, load_task(str(setup / "eval.jsonl"), "validation"), batch_size=8, checkpoint=saved)
    batches = len(torch.load(saved.path, weights_only=True)["batches"])
    import scaleot_fed.evaluate as ev

    def recomputed(*args):
        raise AssertionError("a saved batch was scored again")

    for name in ("_request_batch", "_packed_batch"):
        monkeypatch.setattr(ev, name, recomputed)
    assert main(["evaluate", "--model", str(setup / "plugged"), "--task", str(setup / "eval.jsonl"), "--json",
                 "--save-to", str(saved.path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1]) == result
    assert f"holds {batches} scored batches" in captured.err
    assert not saved.path.exists()
    # a path that holds something else is refused before any work, and left as it was
    monkeypatch.undo()
    for other in (setup / "state.safetensors", setup / "emu"):
        before = other.stat().st_mtime_ns
        assert main(["evaluate", "--model", str(setup / "plugged"), "--task", str(setup / "eval.jsonl"),
                     "--save-to", str(other)]) == 2
        assert "is not a saved scoring" in capsys.readouterr().err and other.stat().st_mtime_ns == before


def test_a_negative_save_interval_is_refused_before_any_work(setup, capsys):
    assert main(["finetune", "--model", str(setup / "model"), "--task", str(setup / "train.jsonl"),
                 "--save-every", "-1", "--out", str(setup / "state.safetensors")]) == 2
    assert "--save-every) must be >= 0 seconds, got -1" in capsys.readouterr().err
    assert not (setup / "state.safetensors").exists()


def test_evaluate_perplexity_on_a_text_file(setup, capsys, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"The {w} is here and there, number {i}." for i, w in enumerate(WORDS * 5)))
    assert main(["evaluate", "--model", str(setup / "model"), "--text", str(tmp_path / "corpus.txt"),
                 "--block-size", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"] > 1 and result["tokens"] > 0
    assert main(["evaluate", "--model", str(setup / "model")]) == 2


def test_offsite_and_finetune_are_tracked_and_read_back(setup, capsys):
    """``[tracking]`` in an offsite file, ``--tracking`` on finetune: the numbers their own files
    hold, read back with TensorBoard's and MLflow's readers."""
    from scaleot_fed.tracking import STATE, scalars

    from .test_tracking import mlflow_run, tensorboard_scalars

    text = (setup / "offsite.toml").read_text()
    text = text.split("[[emulator]]")[0] + '[[emulator]]\nname = "uniform"\nmethod = "uniform-drop"\n' \
        'num_adapter_layers = 2\nalpha = 0.5\n\n[tracking]\nbackend = "tensorboard"\n'
    (setup / "offsite.toml").write_text(text.replace("[run]\n", "[run]\nfull_finetune = false\n"))
    assert main(["offsite", "--config", str(setup / "offsite.toml"), "--no-progress"]) == 0
    results = json.loads((setup / "run" / "results.json").read_text())
    tracked = tensorboard_scalars(setup / "run" / "tensorboard")
    assert tracked["emulators/uniform/rows/plug_in/acc"] == [(0, pytest.approx(results["emulators"]["uniform"]["rows"]
                                                                             ["plug_in"]["acc"]))]
    assert set(scalars(results)) <= set(tracked)
    # finetune: every step's loss (and the dev loss where measured), then the summary
    assert main(["build-emulator", "--model", str(setup / "model"), "--method", "uniform-drop", "--adapters", "2",
                 "--out", str(setup / "emu")]) == 0
    assert main(["finetune", "--model", str(setup / "emu"), "--task", str(setup / "train.jsonl"), "--steps", "4",
                 "--batch-size", "4", "--dev-items", "8", "--eval-every", "2", "--no-progress", "--tracking", "mlflow",
                 "--out", str(setup / "state.safetensors")]) == 0
    client, run = mlflow_run(setup / "state.safetensors.tracking")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 2, 4]
    assert run.data.params["finetune.steps"] == "4" and "best_dev_loss" in run.data.metrics
    capsys.readouterr()
    assert json.loads((setup / "state.safetensors.tracking" / STATE).read_text())["backend"] == "mlflow"
