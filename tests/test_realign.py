"""Server-side re-alignment of a ScaleOT emulator ([realign]) on the model owner's own text."""

from types import SimpleNamespace

import pytest
import torch

from scaleot_fed.emulator import EmulatorConfig
from scaleot_fed.emulator.build import build_emulator
from scaleot_fed.errors import ConfigError
from scaleot_fed.finetune import FinetuneConfig, make_trainable
from scaleot_fed.harmonizer import Harmonizer
from scaleot_fed.plugin import plug_in_trained
from scaleot_fed.realign import RealignConfig, realign, realign_parameters
from scaleot_fed.src import FusedLowRankLinear, LowRankLinear

from .conftest import tiny_model
from .test_emulator import _artifact
from .test_strategies import task_identity  # noqa: F401  (messages outside an app need an identity)


@pytest.fixture
def setting(tokens, tmp_path):
    """A ScaleOT emulator of a tiny llama (harmonizers + compressed blocks) with trained LoRA
    adapters, and the full model with the same adapters plugged in."""
    full = tiny_model("llama", num_layers=10)
    with torch.no_grad():  # a random tiny model predicts almost uniformly: sharpen it, so the KL can tell
        full.get_output_embeddings().weight.mul_(30.0)
    emulator = build_emulator(full, EmulatorConfig("scaleot", 4, alpha=0.5, rank_keep_ratio=0.5),
                              _artifact(full, tokens, tmp_path), "tiny")
    trainable = make_trainable(emulator.model, list(emulator.adapter_positions()), FinetuneConfig(mode="lora", lora_r=4))
    with torch.no_grad():  # the aggregate: adapters that change the model
        for name, p in trainable.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return full, emulator, trainable, plug_in_trained(full, trainable, emulator)


def _structure(model):
    return [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False)))
            for n, m in model.named_modules() if isinstance(m, (Harmonizer, LowRankLinear, FusedLowRankLinear))]


def test_realignment_moves_only_harmonizers_and_compressed_blocks_towards_the_full_model(setting, tokens):
    full, emulator, trainable, teacher = setting
    before = {n: p.detach().clone() for n, p in trainable.named_parameters()}
    flags = {n: p.requires_grad for n, p in trainable.named_parameters()}
    structure = _structure(trainable)
    params = realign_parameters(trainable, emulator.manifest, max_bytes=None)
    kinds = {e["kind"] for e in emulator.manifest["layout"]}
    assert {"harmonizer", "compressed"} <= kinds
    layout = emulator.manifest["layout"]
    assert {layout[int(n.split("layers.")[1].split(".")[0])]["kind"] for n in params} == {"harmonizer", "compressed"}
    stats = realign(teacher, trainable, params, tokens, RealignConfig(every=1, steps=15, lr=1e-4, batch_size=4))
    assert stats["kl_after"] < stats["kl_before"]
    now = dict(trainable.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], now[n])}
    assert changed and changed <= set(params)  # adapters, kept blocks, embeddings untouched
    assert not any("lora_" in n for n in changed)
    # no full-rank copy appears: every compressed projection keeps its factors, every harmonizer
    # its shape, and the emulator its parameter count
    assert _structure(trainable) == structure
    assert {n: tuple(p.shape) for n, p in now.items()} == {n: tuple(p.shape) for n, p in before.items()}
    assert {n: p.requires_grad for n, p in trainable.named_parameters()} == flags


def test_max_bytes_ships_harmonizers_first_and_refuses_a_budget_that_fits_nothing(setting):
    _, emulator, trainable, _ = setting
    layout = emulator.manifest["layout"]
    everything = realign_parameters(trainable, emulator.manifest, max_bytes=None)
    harmonizer_bytes = sum(p.numel() * 4 for n, p in everything.items()
                           if layout[int(n.split("layers.")[1].split(".")[0])]["kind"] == "harmonizer")
    some = realign_parameters(trainable, emulator.manifest, max_bytes=harmonizer_bytes)
    assert {layout[int(n.split("layers.")[1].split(".")[0])]["kind"] for n in some} == {"harmonizer"}
    with pytest.raises(ConfigError, match="fits no harmonizer"):
        realign_parameters(trainable, emulator.manifest, max_bytes=1)
    uniform = build_emulator(tiny_model("llama", num_layers=10), EmulatorConfig("uniform-drop", 2, alpha=0.5))
    with pytest.raises(ConfigError, match="uniform-drop"):
        realign_parameters(uniform.model, uniform.manifest, max_bytes=None)


class _ByteTokenizer:
    """Characters to ids below the tiny model's vocabulary."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 90 for c in text]}


def test_the_server_realigns_on_its_own_text_and_never_reads_owner_data(setting, tmp_path, monkeypatch):
    """The model owner's re-alignment reads its text corpus and nothing a data owner holds."""
    import scaleot_fed.tasks as tasks
    import simulations.partition as partition
    import simulations.realign_rounds as realignment
    from simulations.realign_rounds import Realigner

    _, emulator, trainable, teacher = setting

    def forbidden(*args, **kwargs):
        raise AssertionError("re-alignment touched task data")

    for module, name in [(partition, "client_data"), (partition, "train_items"), (tasks, "load_task"),
                         (partition, "load_task")]:
        monkeypatch.setattr(module, name, forbidden)
    corpus = tmp_path / "owner.txt"
    corpus.write_text("\n\n".join(f"The model owner's own text number {i} about trees and rivers." for i in range(40)))
    read = []
    monkeypatch.setattr(realignment, "load_text_corpus", lambda spec: read.append(spec) or corpus.read_text().split("\n\n"))
    fed = SimpleNamespace(tokenizer=_ByteTokenizer(), trainable=trainable, emulator=emulator,
                          plugged_model=lambda: teacher)
    realigner = Realigner(RealignConfig(every=1, steps=3, batch_size=2, block_size=8, text=str(corpus)))
    assert realigner.due(1, 3) and not realigner.due(3, 3)  # never after the last round
    trainable.to(torch.bfloat16)  # an emulator stored in bf16 (numpy has no bf16: shipped as float32)
    row = realigner.run(fed)
    assert read == [str(corpus)] and row["version"] == 1 and realigner.state
    assert all(v.dtype == torch.float32 for v in realigner.state.values())
    assert row["bytes"] == sum(v.numel() * 4 for v in realigner.state.values())
    from flwr.app import ConfigRecord, Message, RecordDict

    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    assert row["bytes"] <= realigner.attach([msg]) < 1.1 * row["bytes"]  # (plus the records' own metadata)
    assert msg.content["config"]["realign-version"] == 1
