"""The command line: every command end to end on a tiny GPT-2 folder, and bad input as one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel

from scaleot_fed_cli.main import main

from .conftest import tiny_model, write_items


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """A tiny GPT-2 model folder (real GPT-2 tokenizer), a text corpus and a stage-1 artifact."""
    root = tmp_path_factory.mktemp("cli")
    (root / "model").symlink_to(tiny_model_dir)
    text = "\n\n".join(f"Passage {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(60))
    (root / "corpus.txt").write_text(text)
    rc = main(["layer-replace", "--model", str(root / "model"), "--data", str(root / "corpus.txt"), "--steps", "3",
               "--batch-size", "2", "--block-size", "16", "--harmonizer-rank", "4", "--adapters", "2",
               "--no-progress", "--out", str(root / "importance")])
    assert rc == 0
    return root


def run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_build_info_and_plug_in(workspace, capsys, tmp_path):
    rc, out, _ = run(["build-emulator", "--model", str(workspace / "model"), "--method", "scaleot", "--adapters", "2",
                      "--alpha", "0.5", "--rank-keep-ratio", "0.5", "--importance", str(workspace / "importance"),
                      "--out", str(tmp_path / "emu")], capsys)
    assert rc == 0 and "wrote emulator to" in out
    assert (tmp_path / "emu" / "tokenizer.json").exists() or (tmp_path / "emu" / "vocab.json").exists()

    rc, out, _ = run(["info", str(tmp_path / "emu"), "--json"], capsys)
    manifest = json.loads(out)
    assert rc == 0 and manifest["strategy"] == "scaleot" and manifest["adapter_layers"] == [0, 5]
    rc, out, _ = run(["info", str(tmp_path / "emu")], capsys)
    assert "harmonizers" in out and "parameters" in out

    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.plugin import save_adapter_state

    emulator = load_emulator(tmp_path / "emu")
    state = save_adapter_state(emulator.adapter_state_dict(), tmp_path / "state.safetensors", emulator.manifest)
    rc, out, _ = run(["plug-in", "--model", str(workspace / "model"), "--emulator", str(tmp_path / "emu"),
                      "--trained", str(state), "--out", str(tmp_path / "plugged")], capsys)
    assert rc == 0 and "wrote the plugged-in model" in out
    # The emulator's adapter blocks are the original ones, untouched: plugging them back in must
    # give the original model, logit for logit, loaded the way users load it.
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plugged = AutoModelForCausalLM.from_pretrained(tmp_path / "plugged").eval()(ids).logits
        original = AutoModelForCausalLM.from_pretrained(workspace / "model").eval()(ids).logits
    torch.testing.assert_close(plugged, original, rtol=0, atol=1e-6)


def test_layer_replace_config_file_and_unknown_key(workspace, capsys, tmp_path):
    (tmp_path / "bad.toml").write_text("[layer_replace]\nsteps = 2\nlearning_speed = 3\n")
    rc, _, err = run(["layer-replace", "--model", str(workspace / "model"), "--config", str(tmp_path / "bad.toml"),
                      "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "learning_speed" in err and "valid keys" in err


def _bad_cases(ws, tmp):
    model = str(ws / "model")
    build = ["build-emulator", "--model", model, "--out", str(tmp / "e")]
    return {
        "alpha": (build + ["--method", "uniform-drop", "--alpha", "1.5"], "alpha must be in [0, 1]"),
        "ratio": (build + ["--method", "uniform-drop", "--rank-keep-ratio", "-0.2"], "rank_keep_ratio must be in (0, 1]"),
        "odd": (build + ["--method", "uniform-drop", "--adapters", "3"], "even"),
        "too_many": (build + ["--method", "uniform-drop", "--adapters", "6"], "smaller than"),
        "no_importance": (build + ["--method", "scaleot"], "layer-replace"),
        "missing_model": (["build-emulator", "--model", str(tmp / "nope"), "--method", "uniform-drop", "--out",
                           str(tmp / "e")], "does not exist"),
        "not_emulator": (["info", str(tmp)], "not an emulator folder"),
        "bad_artifact": (build + ["--importance", str(tmp)], "not a layer-replace artifact"),
    }


@pytest.mark.parametrize("case", ["alpha", "ratio", "odd", "too_many", "no_importance", "missing_model",
                                  "not_emulator", "bad_artifact"])
def test_bad_input_is_one_line_and_exit_2(workspace, capsys, tmp_path, case):
    argv, expected = _bad_cases(workspace, tmp_path)[case]
    rc, _, err = run(argv, capsys)
    assert rc == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_architecture_and_foreign_artifact(workspace, capsys, tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "bert")
    rc, _, err = run(["build-emulator", "--model", str(tmp_path / "bert"), "--method", "uniform-drop", "--out",
                      str(tmp_path / "e")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "unsupported model 'bert'" in err and "tested families" in err and "llama" in err
    assert not (tmp_path / "e").exists()

    other = tiny_model("gpt2", num_layers=6, seed=9, vocab_size=AutoModelForCausalLM.from_pretrained(workspace / "model").config.vocab_size)
    other.save_pretrained(tmp_path / "other")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if (workspace / "model" / f).exists():
            (tmp_path / "other" / f).write_bytes((workspace / "model" / f).read_bytes())
    rc, _, err = run(["build-emulator", "--model", str(tmp_path / "other"), "--method", "scaleot", "--adapters", "2",
                      "--importance", str(workspace / "importance"), "--out", str(tmp_path / "e")], capsys)
    assert rc == 2 and "different model" in err


def test_tampered_emulator_via_real_process(workspace, tmp_path):
    """The command, run as users run it, refuses a tampered emulator: exit 2, one line, no traceback."""
    from scaleot_fed.emulator import EmulatorConfig, save_emulator
    from scaleot_fed.emulator.build import build_emulator

    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    out = save_emulator(build_emulator(model, EmulatorConfig("uniform-drop", 2, 0.5)), tmp_path / "emu")
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-8] + b"12345678")
    write_items(tmp_path / "items.jsonl", 4, 0)
    proc = subprocess.run([sys.executable, "-m", "scaleot_fed_cli", "evaluate", "--model", str(out), "--task",
                           str(tmp_path / "items.jsonl"), "--limit", "2"], capture_output=True, text=True,
                          env=os.environ.copy())
    assert proc.returncode == 2 and "sha256" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "scaleot_fed_cli", "build-emulator", "--method", "uniform-drop",
                           "--alpha", "7", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "alpha must be in [0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def test_every_shipped_config_loads():
    # The configs users start from must stay valid as the dataclasses change (unknown keys fail).
    from pathlib import Path

    from recipes.offsite import load_offsite_config
    from recipes.study import load_study_config
    from simulations.config import load_fed_config

    root = Path(__file__).resolve().parents[1]
    shipped = sorted((root / "configs").glob("*.toml")) + sorted((root / "simulations" / "configs").glob("*.toml"))
    assert len(shipped) >= 10
    for path in shipped:
        if path.parent.name == "configs" and path.parent.parent.name == "simulations":
            load_fed_config(path)
        elif path.name.startswith("study-"):
            load_study_config(path)
        else:
            load_offsite_config(path)


def test_evaluate_with_a_device_map_scores_as_the_placed_model(workspace, capsys, tmp_path):
    """``--device-map`` (accelerate) loads the model spread over the devices there are (here: the
    CPU) straight in --dtype; the scores equal the plain path's."""
    write_items(tmp_path / "items.jsonl", 6, 3)
    common = ["evaluate", "--model", str(workspace / "model"), "--task", str(tmp_path / "items.jsonl"), "--json"]
    rc, plain, _ = run(common, capsys)
    assert rc == 0
    rc, mapped, _ = run(common + ["--device-map", "auto"], capsys)
    assert rc == 0 and json.loads(mapped) == json.loads(plain)


def test_layer_replace_over_a_device_map_trains_what_the_placed_model_trains(workspace, capsys, tmp_path):
    """Stage 1 of a model spread by accelerate (here over the CPU): each harmonizer on its block's
    device; the same seed gives the same scores and harmonizers as the plain path."""
    from scaleot_fed.artifact import load_artifact

    args = ["layer-replace", "--model", str(workspace / "model"), "--adapters", "2", "--steps", "2", "--batch-size", "2",
            "--block-size", "16", "--harmonizer-rank", "4", "--ranking-candidates", "8", "--ranking-batches", "1",
            "--eval-batches", "1", "--no-progress"]
    assert run(args + ["--out", str(tmp_path / "plain")], capsys)[0] == 0
    assert run(args + ["--out", str(tmp_path / "mapped"), "--device-map", "auto"], capsys)[0] == 0
    plain, mapped = load_artifact(tmp_path / "plain"), load_artifact(tmp_path / "mapped")
    assert mapped.scores == pytest.approx(plain.scores, abs=1e-5) and mapped.meta["data"] == "lambada"
    for i, h in plain.harmonizers.items():
        assert torch.allclose(mapped.harmonizers[i].down.weight, h.down.weight, atol=1e-5)


def test_streaming_build_and_plug_in_commands(workspace, capsys, tmp_path):
    """``build-emulator --stream`` writes the emulator the in-memory command writes, byte for byte;
    ``plug-in --stream`` a sharded model with an index that loads."""
    args = ["build-emulator", "--model", str(workspace / "model"), "--method", "uniform-drop", "--adapters", "2",
            "--alpha", "0.5", "--rank-keep-ratio", "0.5"]
    assert run(args + ["--out", str(tmp_path / "memory")], capsys)[0] == 0
    assert run(args + ["--out", str(tmp_path / "streamed"), "--stream"], capsys)[0] == 0
    for name in ("model.safetensors", "manifest.json"):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes()
    from scaleot_fed.emulator import load_emulator
    from scaleot_fed.finetune import FinetuneConfig, make_trainable
    from scaleot_fed.plugin import export_trained

    emulator = load_emulator(tmp_path / "streamed")
    trainable = make_trainable(emulator.model, list(emulator.adapter_positions()), FinetuneConfig(mode="full"))
    export_trained(trainable, emulator, tmp_path / "state.safetensors")
    rc, out, _ = run(["plug-in", "--model", str(workspace / "model"), "--emulator", str(tmp_path / "streamed"),
                      "--trained", str(tmp_path / "state.safetensors"), "--out", str(tmp_path / "plugged"),
                      "--stream"], capsys)
    assert rc == 0 and (tmp_path / "plugged" / "model.safetensors.index.json").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "plugged")
