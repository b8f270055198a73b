import dataclasses

import pytest
import torch
from peft import PeftModel

from scaleot_fed.arch import block_index_of_key
from scaleot_fed.emulator import EmulatorConfig
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import IGNORE, FinetuneConfig, encode_example, finetune, make_trainable
from scaleot_fed.plugin import export_trained, plug_in_path
from scaleot_fed.tasks import MCItem

from .conftest import tiny_model


def _items(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    items = []
    for i in range(n):
        a, b = torch.randint(0, len(words), (2,), generator=g).tolist()
        items.append(MCItem(f"Question: item {i} {words[a]}?\nAnswer:", (words[a], words[b] + " no"), 0))
    return items


def test_loss_is_on_the_answer_tokens_only(gpt2_tokenizer):
    item = MCItem("Question: sky colour?\nAnswer:", ("blue sky", "green"), 0)
    ids, labels = encode_example(gpt2_tokenizer, item, max_length=64)
    answer = gpt2_tokenizer(" blue sky")["input_ids"]
    assert ids == gpt2_tokenizer("Question: sky colour?\nAnswer: blue sky")["input_ids"]
    assert labels[-len(answer):] == answer
    assert all(label == IGNORE for label in labels[: -len(answer)])
    short_ids, short_labels = encode_example(gpt2_tokenizer, item, max_length=4)
    assert len(short_ids) == 4 and short_labels[-len(answer):] == answer  # left truncation keeps the answer


@pytest.fixture
def emulator_and_tokenizer(gpt2_tokenizer):
    model = tiny_model("gpt2", num_layers=6, vocab_size=len(gpt2_tokenizer))
    emulator = build_emulator(model, EmulatorConfig("uniform-drop", 4, alpha=0.5, rank_keep_ratio=0.5))
    return model, emulator, gpt2_tokenizer


@pytest.mark.parametrize("mode", ["lora", "full", "bitfit", "adapter"])
def test_training_touches_only_adapter_blocks_and_lowers_val_loss(emulator_and_tokenizer, mode, tmp_path):
    model, emulator, tok = emulator_and_tokenizer
    config = FinetuneConfig(mode=mode, steps=12, batch_size=4, lr=3e-3 if mode != "full" else 1e-3, eval_every=4,
                            eval_items=8, warmup_ratio=0.0)
    before = {k: v.clone() for k, v in emulator.model.state_dict().items()}
    trained = make_trainable(emulator.model, list(emulator.adapter_positions()), config)
    train, val = _items(32), _items(8, seed=1)
    result = finetune(trained, tok, train, val, config, progress=False)
    assert result.best_val_loss < result.initial_val_loss
    assert result.trainable_params > 0 and result.tokens > 0

    if mode == "lora":
        base = trained.get_base_model().state_dict()
        for key, value in before.items():  # every base weight is bit-identical (LoRA lives beside them)
            k = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            assert torch.equal(base.get(key, base.get(k)), value)
    else:
        after = emulator.model.state_dict()
        changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
        assert changed
        assert all(int(k.split(".")[2]) in emulator.adapter_positions() for k in changed)
        if mode == "adapter":
            assert all(".bottleneck." in k for k in changed)

    # export and plug in: only the adapter blocks of the full model change
    out = export_trained(trained, emulator, tmp_path / ("lora" if mode == "lora" else "state.safetensors"))
    full_before = {k: v.clone() for k, v in model.state_dict().items()}
    plugged = plug_in_path(model, emulator.manifest, out)
    after = plugged.state_dict()
    changed = {k for k in after if k not in full_before or not torch.equal(after[k], full_before[k])}
    assert changed and {block_index_of_key(emulator.arch, k) for k in changed} <= {0, 1, 4, 5}
    assert any(block_index_of_key(emulator.arch, k) in {4, 5} for k in changed)  # top adapters renumbered
    # the plugged model saves and loads back with what was trained (adapters included)
    from scaleot_fed.models import load_model
    from scaleot_fed.plugin import save_plugged

    save_plugged(plugged, tok, tmp_path / "plugged")
    reloaded = load_model(str(tmp_path / "plugged")).model
    x = torch.tensor([tok("Question: item red?\nAnswer: red")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, plugged(x).logits, atol=1e-5)


def test_exported_lora_loads_on_the_original_model(emulator_and_tokenizer, tmp_path):
    model, emulator, tok = emulator_and_tokenizer
    config = FinetuneConfig(mode="lora", steps=3, batch_size=4, lr=1e-2, eval_every=3, eval_items=4)
    trained = make_trainable(emulator.model, list(emulator.adapter_positions()), config)
    finetune(trained, tok, _items(8), _items(4, 1), config, progress=False)
    folder = export_trained(trained, emulator, tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(model, str(folder))
    wrapped = {n.split("base_model.model.")[-1] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert wrapped and {block_index_of_key(emulator.arch, n) for n in wrapped} == {0, 1, 4, 5}
    # the emulator keeps one middle block, so its top adapter at position 3 is block 4 of the full model
    emu_state = trained.state_dict()
    full_state = peft_model.state_dict()
    a_emu = [v for k, v in emu_state.items() if ".h.3.attn.c_attn.lora_A" in k][0]
    a_full = [v for k, v in full_state.items() if ".h.4.attn.c_attn.lora_A" in k][0]
    assert torch.equal(a_emu, a_full)


@pytest.mark.parametrize("kwargs,match", [({"mode": "prefix"}, "unknown fine-tuning mode"),
                                          ({"schedule": "step"}, "unknown schedule"), ({"lr": 0}, "lr")])
def test_bad_finetune_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kwargs)


def test_an_answer_longer_than_the_window_keeps_its_start(gpt2_tokenizer):
    item = MCItem("Q:", ("word " * 50, "x"), 0)
    ids, labels = encode_example(gpt2_tokenizer, item, max_length=8)
    assert len(ids) == 8 and labels == ids  # all answer tokens, loss on every one
    assert gpt2_tokenizer.decode(ids).startswith(" word word")


@pytest.mark.parametrize("mode", ["lora", "adapter"])
def test_one_cell_run_twice_starts_and_ends_bitwise_equal(gpt2_tokenizer, mode):
    from scaleot_fed.finetune import trainable_state

    items = [MCItem(f"Question: say {w}\nAnswer:", ("no", w), 1) for w in ("red", "sky", "sea", "cup", "car", "tea")]
    config = FinetuneConfig(mode=mode, steps=3, batch_size=2, eval_every=3, eval_items=2, seed=5)

    def run(seed_before: int, seed: int = 5):
        torch.manual_seed(seed_before)  # whatever the caller did with the global generator before
        model = make_trainable(tiny_model("gpt2", num_layers=4, vocab_size=len(gpt2_tokenizer)), [0, 3],
                               dataclasses.replace(config, seed=seed))
        start = trainable_state(model)
        finetune(model, gpt2_tokenizer, items, items[:2], dataclasses.replace(config, seed=seed), progress=False)
        return start, trainable_state(model)

    (start_a, end_a), (start_b, end_b) = run(0), run(123)
    assert all(torch.equal(start_a[k], start_b[k]) for k in start_a)
    assert all(torch.equal(end_a[k], end_b[k]) for k in end_a)
    assert any(not torch.equal(start_a[k], end_a[k]) for k in start_a)  # it trained
    other, _ = run(0, seed=6)
    assert any(not torch.equal(start_a[k], other[k]) for k in start_a)  # the seed decides the start


def test_an_exported_lora_loads_with_plain_peft(tiny_model_dir, gpt2_tokenizer, tmp_path):
    """``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` finds the base model and gives the
    plug-in model's logits (task_type and base_model_name_or_path as peft users expect)."""
    import json

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from scaleot_fed.plugin import plug_in_trained

    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    emulator = build_emulator(full, EmulatorConfig("uniform-drop", 2, 0.5), source_model=str(tiny_model_dir))
    config = FinetuneConfig(mode="lora", steps=2, batch_size=2, lr=1e-2, eval_every=2, eval_items=2)
    trained = make_trainable(emulator.model, list(emulator.adapter_positions()), config)
    finetune(trained, gpt2_tokenizer, _items(6), _items(2, 1), config, progress=False)
    folder = export_trained(trained, emulator, tmp_path / "lora")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    ids = torch.tensor([[5, 17, 301, 42, 7]])
    expected = plug_in_trained(full, trained, emulator)(input_ids=ids).logits
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
