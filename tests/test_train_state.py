"""A stopped fine-tuning run resumes from its checkpoint and ends where an unstopped one does."""

import dataclasses

import pytest
import torch

import scaleot_fed.finetune as ft
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import FinetuneConfig, finetune, make_trainable, trainable_state
from scaleot_fed.tasks import MCItem
from scaleot_fed.train_state import Checkpoint

from .conftest import tiny_model

ITEMS = [MCItem(f"Question: say {w}\nAnswer:", ("no", w), 1) for w in ("red", "sky", "sea", "cup", "car", "tea", "map")]
# 7 items in batches of 2: epochs end with a left-over item (the stream's carry), and the LoRA
# dropout draws from torch's generator: a resume must restore both to end bitwise equal
CONFIG = FinetuneConfig(mode="lora", lora_dropout=0.1, steps=7, batch_size=2, grad_accum=2, eval_every=2,
                        eval_items=2, seed=3)


def _model(tokenizer, config=CONFIG):
    return make_trainable(tiny_model("gpt2", num_layers=4, vocab_size=len(tokenizer)), [0, 3], config)


def _stop_after(monkeypatch, steps: int) -> list[int]:
    """Make the run stop (as Ctrl-C would) when it starts step ``steps + 1``."""
    done, step = [], ft._Loop.step

    def stopping(self):
        if len(done) == steps:
            raise KeyboardInterrupt
        done.append(1)
        return step(self)

    monkeypatch.setattr(ft._Loop, "step", stopping)
    return done


@pytest.mark.parametrize("every_s", [0.0, 1e9])
def test_a_stopped_run_resumes_and_ends_bitwise_where_an_unstopped_one_does(gpt2_tokenizer, tmp_path, monkeypatch,
                                                                             every_s):
    whole = _model(gpt2_tokenizer)
    expected = finetune(whole, gpt2_tokenizer, ITEMS, ITEMS[:2], CONFIG, progress=False)

    checkpoint = Checkpoint(tmp_path / "run.pt", every_s=every_s)
    with monkeypatch.context() as patch:
        _stop_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            finetune(_model(gpt2_tokenizer), gpt2_tokenizer, ITEMS, ITEMS[:2], CONFIG, progress=False,
                     checkpoint=checkpoint)
    # every_s=0 saved after each step (the run resumes at step 5); 1e9 never saved before the end
    assert checkpoint.path.exists() == (every_s == 0)

    resumed = _model(gpt2_tokenizer)
    ran = _stop_after(monkeypatch, 99)
    result = finetune(resumed, gpt2_tokenizer, ITEMS, ITEMS[:2], CONFIG, progress=False, checkpoint=checkpoint)
    assert len(ran) == (3 if every_s == 0 else 7)
    assert (checkpoint.resumed_seconds > 0) == (every_s == 0)  # the stopped run's 4 steps, for the ledger
    end, want = trainable_state(resumed), trainable_state(whole)
    assert all(torch.equal(end[k], want[k]) for k in want)
    assert result.history == expected.history
    assert (result.best_step, result.best_val_loss, result.tokens) == (
        expected.best_step, expected.best_val_loss, expected.tokens)


def test_a_finished_checkpoint_trains_no_further(gpt2_tokenizer, tmp_path, monkeypatch):
    checkpoint = Checkpoint(tmp_path / "run.pt", every_s=1e9)
    first = _model(gpt2_tokenizer)
    finetune(first, gpt2_tokenizer, ITEMS, ITEMS[:2], CONFIG, progress=False, checkpoint=checkpoint)
    assert checkpoint.path.exists()  # saved at the end: a stop before the caller stores the result loses nothing

    again = _model(gpt2_tokenizer)
    ran = _stop_after(monkeypatch, 0)  # any step would raise
    finetune(again, gpt2_tokenizer, ITEMS, ITEMS[:2], CONFIG, progress=False, checkpoint=checkpoint)
    assert ran == []
    a, b = trainable_state(first), trainable_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_run_or_a_broken_one_is_refused(gpt2_tokenizer, tmp_path):
    checkpoint = Checkpoint(tmp_path / "run.pt")
    finetune(_model(gpt2_tokenizer), gpt2_tokenizer, ITEMS, ITEMS[:2], CONFIG, progress=False, checkpoint=checkpoint)
    other = dataclasses.replace(CONFIG, lr=1e-3)
    with pytest.raises(ConfigError, match="another training run.*delete it"):
        finetune(_model(gpt2_tokenizer, other), gpt2_tokenizer, ITEMS, ITEMS[:2], other, progress=False,
                 checkpoint=checkpoint)
    with pytest.raises(ConfigError, match="another training run"):  # other data
        finetune(_model(gpt2_tokenizer), gpt2_tokenizer, ITEMS[1:], ITEMS[:2], CONFIG, progress=False,
                 checkpoint=checkpoint)
    checkpoint.path.write_bytes(checkpoint.path.read_bytes()[:100])  # a save cut short by hand
    with pytest.raises(ConfigError, match="not a readable training checkpoint"):
        finetune(_model(gpt2_tokenizer), gpt2_tokenizer, ITEMS, ITEMS[:2], CONFIG, progress=False,
                 checkpoint=checkpoint)
    with pytest.raises(ConfigError, match="must be >= 0 seconds"):
        Checkpoint(tmp_path / "x.pt", every_s=-1)


def test_a_row_stored_removes_its_training_and_scoring_checkpoints(tmp_path):
    from scaleot_fed.rundir import RowCache

    rows = RowCache(tmp_path)
    saved = [rows.checkpoint("emu/emulator_finetune", kind) for kind in ("training", "scoring")]
    for checkpoint in saved:
        checkpoint.save({"step": 1})
    assert all(c.path.is_file() and c.path.parent == tmp_path / "training" for c in saved)
    assert saved[0].path != saved[1].path
    assert [(key, kind) for key, kind, _ in rows.saved()] == [("emu/emulator_finetune", "training"),
                                                             ("emu/emulator_finetune", "scoring")]
    rows.put("emu/emulator_finetune", {"acc": 0.5})
    assert not any(c.path.exists() for c in saved) and rows.get("emu/emulator_finetune") == {"acc": 0.5}
    assert rows.saved() == []
    # a resumed state's work time is taken once, for the unit that resumed it
    rows.take_resumed_seconds()
    Checkpoint(saved[1].path).save({"fingerprint": "f", "seconds": 7.5, "batches": {}})
    rows.checkpoint("emu/emulator_finetune", "scoring").load("f", torch.device("cpu"))
    assert rows.take_resumed_seconds() == 7.5 and rows.take_resumed_seconds() == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        rows.checkpoint("emu/emulator_finetune", "weights")


def test_a_plan_says_how_far_a_saved_training_and_scoring_got(tmp_path):
    from recipes.study.plan import saved_state

    Checkpoint(tmp_path / "t.pt").save({"progress": {"step": 40, "seconds": 90.0}})
    Checkpoint(tmp_path / "s.pt").save({"batches": {"packed 0": [0.5], "packed 8": [0.25]}})
    (tmp_path / "bad.pt").write_bytes(b"not a state")
    assert saved_state("training", tmp_path / "t.pt") == "training saved at step 40 (1.5 min trained)"
    assert saved_state("scoring", tmp_path / "s.pt") == "scoring, 2 batches saved"
    assert "unreadable" in saved_state("training", tmp_path / "bad.pt")


def test_a_plan_view_of_a_run_folder_never_reaches_its_saved_states(tmp_path):
    from recipes.study.plan import mirror
    from scaleot_fed.rundir import RowCache

    rows = RowCache(tmp_path / "run" / "piqa")
    rows.put("a/plug_in", {"acc": 1.0})
    state = rows.checkpoint("b/plug_in", "scoring")
    state.save({"batches": {}})
    view = mirror(tmp_path / "run", tmp_path / "view")
    assert RowCache(view / "piqa").get("a/plug_in") == {"acc": 1.0}
    RowCache(view / "piqa").put("b/plug_in", {"acc": 0.5})  # a restore into the view
    assert state.path.is_file() and RowCache(tmp_path / "run" / "piqa").get("b/plug_in") is None
