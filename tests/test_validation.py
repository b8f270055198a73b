"""A run folder you can trust: config values checked by type and range when loaded, the same
emulator ranges in every command, emulator folders checked whole, and a data owner's corrupted
emulator cache replaced by a fresh copy."""

import json
import os
import shutil

import pytest
from transformers import AutoModelForCausalLM

from scaleot_fed.config import from_dict
from scaleot_fed.emulator import EmulatorConfig, load_emulator, looks_like_emulator, save_emulator, sha256_file
from scaleot_fed.errors import ConfigError, IntegrityError
from scaleot_fed_cli.main import main

from .conftest import tiny_model, write_items


def _fed(data):
    from simulations.config import fed_config_from_dict

    return fed_config_from_dict(data)


# -- 1. types, from the dataclass annotations, before __post_init__ ---------------------------------

@pytest.mark.parametrize("data,message", [
    ({"run": {"num_rounds": 2.5}}, "[run] num_rounds must be an integer, got 2.5"),
    ({"run": {"num_rounds": "three"}}, "[run] num_rounds must be an integer, got 'three'"),
    ({"run": {"num_rounds": True}}, "[run] num_rounds must be an integer, got true"),
    ({"run": {"client_val_fraction": True}}, "[run] client_val_fraction must be a number, got true"),
    ({"run": {"client_num_cpus": float("nan")}}, "[run] client_num_cpus must be a number, got nan"),
    ({"run": {"train_limit": "all"}}, "[run] train_limit must be an integer (or unset), got 'all'"),
    ({"run": {"fraction_per_round": "half"}}, "[run] fraction_per_round must be a number (or unset), got 'half'"),
    ({"run": {"client_eval": 1}}, "[run] client_eval must be true or false, got 1"),
    ({"run": {"model": 7}}, "[run] model must be a string, got 7"),
    ({"run": {"private_blocks": [1, "2"]}}, "[run] private_blocks must be a list of integers, got [1, '2']"),
    ({"run": {"private_blocks": 3}}, "[run] private_blocks must be a list of integers, got 3"),
    ({"strategy": {"params": ["proximal_mu", 0.1]}},
     "[strategy] params must be a table with strings as keys, got ['proximal_mu', 0.1]"),
    ({"debug": {"fail": {"1": "nan"}}}, "config: [debug] was removed: failures are injected by the tests' client "
     "mod (tests/faults.py, named in $SCALEOT_FED_CLIENT_MODS); remove the table"),
    ({"emulator": {"alpha": "0.5"}}, "[emulator] alpha must be a number, got '0.5'"),
    ({"attack": {"lr": True}}, "[attack] lr must be a number, got true"),  # AttackConfig(FinetuneConfig)
    ({"finetune": {"steps": 1.0}}, "[finetune] steps must be an integer, got 1.0"),
])
def test_wrong_types_are_one_line_config_errors(data, message):
    with pytest.raises(ConfigError) as info:
        _fed(data)
    assert str(info.value) == message


def test_a_table_of_strings_is_checked_value_by_value():
    from recipes.study import StudyGridConfig
    from scaleot_fed.config import from_dict

    with pytest.raises(ConfigError, match=r"^\[study\] eval_splits must be a table of strings with strings as keys, "
                                          r"got \{'piqa': 3\}$"):
        from_dict(StudyGridConfig, {"tasks": ["piqa"], "eval_splits": {"piqa": 3}}, "study")


def test_right_types_pass_and_ranges_say_where():
    from simulations.config import fed_config_from_json

    config = _fed({
        "run": {"client_num_cpus": 2, "train_limit": None, "fraction_per_round": None, "private_blocks": [3]},
        "strategy": {"name": "fedprox", "params": {"proximal_mu": 0.1}},
        "emulator": {"alpha": 1, "rank_keep_ratio": 1},  # ints are fine numbers
    })
    assert config.run.client_num_cpus == 2 and config.run.private_blocks == [3] and config.emulator.alpha == 1
    assert fed_config_from_json(config.to_json()) == config  # what clients receive loads the same
    # range errors from __post_init__ carry the section too (FinetuneConfig's checks serve [attack] as well)
    with pytest.raises(ConfigError, match=r"^\[attack\] steps must be >= 1, got 0$"):
        _fed({"attack": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"^privacy\.delta must be in \(0, 1\)"):  # not "[privacy] privacy."
        _fed({"privacy": {"delta": 2.0}})


def test_subclassed_sections_check_inherited_and_own_fields():
    from recipes.offsite import OffsiteRunConfig
    from recipes.study import StudyGridConfig
    from simulations.config import RunConfig

    with pytest.raises(ConfigError, match=r"^\[run\] eval_batch_size must be an integer, got '8'$"):
        from_dict(RunConfig, {"eval_batch_size": "8"}, "run")  # a TaskRunConfig field
    with pytest.raises(ConfigError, match=r"^\[run\] dev_items must be an integer, got 2\.5$"):
        from_dict(OffsiteRunConfig, {"dev_items": 2.5}, "run")
    with pytest.raises(ConfigError, match=r"^\[study\] metrics must be a table of strings"):
        from_dict(StudyGridConfig, {"tasks": ["piqa"], "metrics": {"piqa": 1}}, "study")
    with pytest.raises(ConfigError, match=r"^\[run\] must be a table of key = value pairs, got 3$"):
        from_dict(RunConfig, 3, "run")  # `run = 3` instead of a [run] table


def test_a_toml_file_with_a_wrong_type_fails_the_command_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('[run]\nmodel = "m"\ntask = "piqa"\n\n[[emulator]]\nrank_keep_ratio = "half"\n')
    rc = main(["offsite", "--config", str(tmp_path / "bad.toml"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "[emulator 0] rank_keep_ratio must be a number, got 'half'" in err


# -- 2. emulator ranges, the same in every command ---------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"rank_keep_ratio": 0.0}, "rank_keep_ratio must be in (0, 1]"),
    ({"rank_keep_ratio": 1.5}, "rank_keep_ratio must be in (0, 1]"),
    ({"alpha": -0.1}, "alpha must be in [0, 1]"),
    ({"alpha": 1.01}, "alpha must be in [0, 1]"),
    ({"alpha": 0.0, "rank_keep_ratio": 1.0}, "would be the full model"),
])
def test_emulator_ranges(kwargs, message):
    with pytest.raises(ConfigError) as info:
        EmulatorConfig("uniform-drop", 2, **kwargs)
    assert message in str(info.value)


def test_alpha_zero_is_an_src_only_emulator():
    from scaleot_fed.emulator.build import build_emulator
    from scaleot_fed.src import rank_for_ratio

    with pytest.raises(ConfigError) as info:
        EmulatorConfig("uniform-drop", 2, alpha=0.0)
    assert "rank_keep_ratio < 1" in str(info.value) and "SRC-only" in str(info.value)
    manifest = build_emulator(tiny_model("llama"), EmulatorConfig("uniform-drop", 2, alpha=0.0,
                                                                   rank_keep_ratio=0.5)).manifest
    assert manifest["replaced_layers"] == [] and manifest["compressed_layers"] == list(range(1, 7))
    with pytest.raises(ConfigError, match=r"rank_keep_ratio must be in \(0, 1\]"):
        rank_for_ratio(48, 32, 0.0)  # the library agrees with the config
    assert rank_for_ratio(48, 32, 0.01) == 1


def test_the_full_model_emulator_is_refused_by_every_command(tmp_path, capsys, tiny_model_dir):
    rc = main(["build-emulator", "--model", str(tiny_model_dir), "--method", "uniform-drop", "--adapters", "2",
               "--alpha", "0", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "full model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()
    with pytest.raises(ConfigError, match=r"^\[emulator\] alpha = 0 with rank_keep_ratio = 1"):
        _fed({"emulator": {"alpha": 0}})
    from recipes.offsite import load_offsite_config

    (tmp_path / "o.toml").write_text('[run]\nmodel = "m"\ntask = "piqa"\n\n[[emulator]]\nalpha = 0.0\n')
    with pytest.raises(ConfigError, match=r"^\[emulator 0\] alpha = 0 .* full model"):
        load_offsite_config(tmp_path / "o.toml")


# -- 3. an emulator folder is checked whole --------------------------------------------------------

@pytest.fixture(scope="module")
def emulator_folder(tmp_path_factory, tiny_model_dir, gpt2_tokenizer):
    """A complete emulator folder (config, tokenizer, weights, manifest) of the tiny GPT-2. Read-only."""
    from scaleot_fed.emulator.build import build_emulator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("validation") / "emu"
    return save_emulator(build_emulator(model, EmulatorConfig("uniform-drop", 2, 0.5)), out, tokenizer=gpt2_tokenizer)


def _copy(emulator_folder, tmp_path):
    return shutil.copytree(emulator_folder, tmp_path / "emu")


def _drop_manifest_key(path):
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["layout"]
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flip_a_weight_byte(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "manifest.json").unlink(), "holds emulator weights but its manifest.json is missing"),
    (lambda p: (p / "model.safetensors").unlink(), "incomplete: model.safetensors is missing"),
    (lambda p: (p / "config.json").unlink(), "incomplete: config.json is missing"),
    (lambda p: [(p / f).unlink(missing_ok=True) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")],
     "incomplete: the tokenizer is missing"),
    (_drop_manifest_key, "manifest.json is incomplete: layout missing"),
    (lambda p: (p / "manifest.json").write_text("{"), "manifest.json is not valid JSON"),
    (_flip_a_weight_byte, "do not match the sha256"),
], ids=["manifest", "weights", "config", "tokenizer", "manifest-key", "manifest-json", "sha256"])
def test_every_missing_or_altered_piece_is_named(emulator_folder, tmp_path, damage, message):
    path = _copy(emulator_folder, tmp_path)
    assert load_emulator(path).tokenizer is not None  # whole, it loads with its tokenizer
    damage(path)
    with pytest.raises(IntegrityError) as info:
        load_emulator(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_tokenizer_is_only_required_when_asked_for(emulator_folder, tmp_path):
    path = _copy(emulator_folder, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
        (path / name).unlink(missing_ok=True)
    assert load_emulator(path, tokenizer=False).tokenizer is None
    with pytest.raises(IntegrityError, match="tokenizer is missing"):
        load_emulator(path, tokenizer=True)


def test_looks_like_emulator(emulator_folder, tiny_model_dir, tmp_path):
    path = _copy(emulator_folder, tmp_path)
    assert looks_like_emulator(path) and not looks_like_emulator(tiny_model_dir)
    (path / "manifest.json").unlink()
    assert looks_like_emulator(path)  # the weights still say what they are
    (path / "model.safetensors").write_bytes(b"garbage")
    assert not looks_like_emulator(path) and not looks_like_emulator(tmp_path / "nope")
    assert not looks_like_emulator("smollm2-135m")


@pytest.mark.parametrize("command", ["evaluate", "finetune"])
def test_an_emulator_without_its_manifest_is_never_read_as_a_plain_model(emulator_folder, tmp_path, capsys, command):
    path = _copy(emulator_folder, tmp_path)
    (path / "manifest.json").unlink()
    write_items(tmp_path / "items.jsonl", 8, 0)
    argv = [command, "--model", str(path), "--task", str(tmp_path / "items.jsonl")]
    argv += ["--limit", "2"] if command == "evaluate" else ["--dev-items", "2", "--steps", "1", "--batch-size", "2",
                                                           "--no-progress", "--out", str(tmp_path / "out")]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.out
    assert "manifest.json is missing" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- 4. a data owner's corrupted emulator cache -------------------------------------------------------

@pytest.fixture
def client(monkeypatch, tmp_path):
    """simulations.client_app with an empty per-process state and its own emulator cache."""
    from simulations import client_app

    monkeypatch.setenv(client_app.EMULATOR_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(client_app, "_EMULATORS", {})
    monkeypatch.setattr(client_app, "_HASHED", {})
    return client_app


def _sha(path):
    return json.loads((path / "manifest.json").read_text())["weights_sha256"]


def _touch_later(path):
    """A new mtime, whatever the filesystem's clock granularity."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))


def test_a_corrupted_cached_emulator_is_replaced_by_a_fresh_copy(client, emulator_folder):
    sha = _sha(emulator_folder)
    cached = shutil.copytree(emulator_folder, client.emulator_dir(sha))
    assert client.holds_emulator(sha)
    _flip_a_weight_byte(cached)  # same size, the disk cache rots
    _touch_later(cached / "model.safetensors")
    assert client.receive_emulator(sha, None) == (False, 0)  # the server's question: "do you hold it?"
    assert not cached.exists()  # the bad copy is gone
    has, received = client.receive_emulator(sha, client.delivery_content(emulator_folder, sha))
    assert has and received >= (emulator_folder / "model.safetensors").stat().st_size
    assert sha256_file(cached / "model.safetensors") == sha
    emulator = client.get_emulator(sha)  # and the run goes on with it
    assert emulator.manifest["weights_sha256"] == sha and emulator.tokenizer is not None


def test_the_cache_is_hashed_once_per_file_version(client, emulator_folder, monkeypatch):
    sha = _sha(emulator_folder)
    cached = shutil.copytree(emulator_folder, client.emulator_dir(sha))
    calls = []
    monkeypatch.setattr(client, "sha256_file", lambda p: calls.append(p) or sha256_file(p))
    assert all(client.holds_emulator(sha) for _ in range(3)) and len(calls) == 1
    _touch_later(cached / "model.safetensors")  # changed on disk since (here: the same bytes)
    assert client.holds_emulator(sha) and len(calls) == 2
    assert client.holds_emulator(sha) and len(calls) == 2


@pytest.mark.parametrize("damage", ["config", "other-emulator"])
def test_an_incomplete_or_foreign_cached_emulator_is_not_held(client, emulator_folder, damage):
    sha = _sha(emulator_folder)
    claimed = sha if damage == "config" else "0" * 64
    cached = shutil.copytree(emulator_folder, client.emulator_dir(claimed))
    if damage == "config":
        (cached / "config.json").unlink()
    assert not client.holds_emulator(claimed) and not cached.exists()


def test_ffa_lora_with_local_dp_is_refused_before_ray_starts():
    from simulations.runner import validate

    config = _fed({"strategy": {"name": "ffa-lora"}, "privacy": {"mode": "local", "noise_multiplier": 0.5}})
    with pytest.raises(ConfigError, match="ffa-lora cannot run with \\[privacy\\] mode = \"local\""):
        validate(config)
    validate(_fed({"strategy": {"name": "ffa-lora"}}))  # without DP it runs
    validate(_fed({"strategy": {"name": "fedavg"}, "privacy": {"mode": "local", "noise_multiplier": 0.5}}))
