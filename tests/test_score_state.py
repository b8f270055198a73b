"""A stopped scoring resumes after its last saved batch and ends bitwise where an unstopped one does."""

import pytest
import torch

import scaleot_fed.evaluate as ev
from scaleot_fed.errors import ConfigError
from scaleot_fed.evaluate import choice_loglikelihoods
from scaleot_fed.score_state import weights_digest
from scaleot_fed.train_state import Checkpoint

from .conftest import tiny_model

GROUPS = [(f"Context number {i} says {'more ' * (i % 5)}words:", [" red", " a longer answer", " sky"][: 2 + i % 2])
          for i in range(11)]


def _model(vocab: int, seed: int = 0):
    return tiny_model("llama", num_layers=2, seed=seed, vocab_size=vocab)


def _count_batches(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count the batches scored on both paths; raise KeyboardInterrupt at batch ``stop_after + 1``."""
    done = []
    for name in ("_request_batch", "_packed_batch"):
        original = getattr(ev, name)

        def counted(*args, _original=original):
            if len(done) == stop_after:
                raise KeyboardInterrupt
            done.append(1)
            return _original(*args)

        monkeypatch.setattr(ev, name, counted)
    return done


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("every_s", [0.0, 1e9])
def test_a_stopped_scoring_resumes_bitwise_with_the_batches_it_had_left(gpt2_tokenizer, tmp_path, monkeypatch,
                                                                         pack, every_s):
    model = _model(len(gpt2_tokenizer))
    with monkeypatch.context() as patch:
        whole = _count_batches(patch)
        expected = choice_loglikelihoods(model, gpt2_tokenizer, GROUPS, batch_size=4, pack=pack)
    assert len(whole) > 2
    checkpoint = Checkpoint(tmp_path / "scores.pt", every_s=every_s)
    with monkeypatch.context() as patch:
        _count_batches(patch, stop_after=2)
        with pytest.raises(KeyboardInterrupt):
            choice_loglikelihoods(model, gpt2_tokenizer, GROUPS, batch_size=4, pack=pack, checkpoint=checkpoint)
    assert checkpoint.path.is_file()  # saved when interrupted, whatever every_s says

    ran = _count_batches(monkeypatch)
    resumed = choice_loglikelihoods(model, gpt2_tokenizer, GROUPS, batch_size=4, pack=pack, checkpoint=checkpoint)
    assert len(ran) == len(whole) - 2  # only the batches it had left
    assert checkpoint.resumed_seconds > 0  # the time the 2 saved batches took (a study's ledger adds it)
    assert resumed == expected  # bitwise: the same batches, the saved ones read back exactly


def test_a_saved_scoring_of_another_model_is_recomputed_not_reused(gpt2_tokenizer, tmp_path, monkeypatch):
    first, second = _model(len(gpt2_tokenizer), 0), _model(len(gpt2_tokenizer), 1)
    checkpoint = Checkpoint(tmp_path / "scores.pt", every_s=0.0)
    choice_loglikelihoods(first, gpt2_tokenizer, GROUPS, batch_size=4, checkpoint=checkpoint)
    assert checkpoint.path.is_file()
    ran = _count_batches(monkeypatch)
    scores = choice_loglikelihoods(second, gpt2_tokenizer, GROUPS, batch_size=4, checkpoint=checkpoint)
    assert len(ran) > 0
    monkeypatch.undo()
    assert scores == choice_loglikelihoods(second, gpt2_tokenizer, GROUPS, batch_size=4)
    # other settings (a batch size) make other batches: not reused either
    ran = _count_batches(monkeypatch)
    choice_loglikelihoods(second, gpt2_tokenizer, GROUPS, batch_size=3, checkpoint=checkpoint)
    assert len(ran) > 0


def test_the_weights_digest_sees_a_change_anywhere_in_a_tensor(gpt2_tokenizer):
    model = _model(len(gpt2_tokenizer))
    before = weights_digest(model)
    assert weights_digest(model) == before
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight.view(-1)[weight.numel() // 2 + 1] += 0.25  # off the strided sample: the sum sees it
    assert weights_digest(model) != before
    # exact, so the same in another process with another thread count (a float sum is not)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert weights_digest(model) != before and weights_digest(_model(len(gpt2_tokenizer))) == before
    finally:
        torch.set_num_threads(threads)
    # weights a device map offloaded (on the meta device here) cannot be read: an error, not a guess
    offloaded = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3, device="meta"))
    with pytest.raises(ConfigError, match="offloaded"):
        weights_digest(offloaded)
