"""Devices and precision: spelled devices are checked, bf16 runs on CPU close to float32."""

import pytest
import torch

from scaleot_fed.devices import model_dtype, place, resolve_device
from scaleot_fed.errors import ConfigError
from scaleot_fed.evaluate import accuracy_from_scores, evaluate_multiple_choice, loglikelihoods
from scaleot_fed.finetune import FinetuneConfig, finetune, make_trainable
from scaleot_fed.tasks import MCItem

from .conftest import tiny_model

WORDS = ("red", "blue", "green", "tree", "cat", "dog", "sun", "moon")


def _items():
    return [MCItem(f"Question: say {w}\nAnswer:", (WORDS[(k + 3) % 8], w), 1) for k, w in enumerate(WORDS)]


def test_device_spellings_and_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type in (expected, "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        FinetuneConfig(dtype="float8")


def _train(gpt2_tokenizer, dtype: str):
    torch.manual_seed(0)
    model = tiny_model("gpt2", num_layers=4, vocab_size=len(gpt2_tokenizer))
    config = FinetuneConfig(mode="lora", steps=8, batch_size=4, lr=5e-3, eval_every=8, eval_items=8,
                            select_best=False, device="cpu", dtype=dtype)
    trained = make_trainable(model, [0, 3], config)
    result = finetune(trained, gpt2_tokenizer, _items(), _items(), config, progress=False)
    return trained, result


def test_bf16_training_keeps_trained_parameters_in_float32_and_tracks_float32(gpt2_tokenizer):
    trained, bf16 = _train(gpt2_tokenizer, "bfloat16")
    frozen = {p.dtype for p in trained.parameters() if not p.requires_grad and p.is_floating_point()}
    learned = {p.dtype for p in trained.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and learned == {torch.float32} and model_dtype(trained) == torch.bfloat16
    _, fp32 = _train(gpt2_tokenizer, "float32")
    assert bf16.best_val_loss < bf16.initial_val_loss  # it learns
    # bf16 weights round to ~3 significant digits: the losses agree to a few percent
    assert abs(bf16.initial_val_loss - fp32.initial_val_loss) < 0.02 * fp32.initial_val_loss
    assert abs(bf16.best_val_loss - fp32.best_val_loss) < 0.05 * fp32.initial_val_loss


def test_bf16_scoring_is_within_tolerance_of_float32(gpt2_tokenizer):
    model = tiny_model("gpt2", num_layers=4, vocab_size=len(gpt2_tokenizer))
    pairs = [(i.context, " " + c) for i in _items() for c in i.choices]
    reference = loglikelihoods(model, gpt2_tokenizer, pairs, batch_size=4)
    fp32_acc = evaluate_multiple_choice(model, gpt2_tokenizer, _items(), batch_size=4)
    place(model.requires_grad_(False), torch.device("cpu"), torch.bfloat16)
    assert model_dtype(model) == torch.bfloat16
    low = loglikelihoods(model, gpt2_tokenizer, pairs, batch_size=4)
    # per continuation (a few tokens, log-likelihoods around -10): within 1 % of float32
    assert max(abs(a - b) / abs(a) for a, b in zip(reference, low)) < 0.01
    # a random tiny model's choices are near-ties, so acc may differ from fp32's; it must be the
    # accuracy of the bf16 log-likelihoods themselves
    low_scores = [low[2 * k : 2 * k + 2] for k in range(len(_items()))]
    assert evaluate_multiple_choice(model, gpt2_tokenizer, _items(), batch_size=4) == accuracy_from_scores(
        _items(), low_scores)
    assert fp32_acc == accuracy_from_scores(_items(), [reference[2 * k : 2 * k + 2] for k in range(len(_items()))])
