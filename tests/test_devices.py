"""Devices and precision: spelled devices are checked, bf16 runs on CPU close to float32."""

import contextlib
import warnings

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


@pytest.mark.parametrize("capabilities,dtype,native", [
    ({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": False}, torch.bfloat16, False),
    ({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False}, torch.bfloat16, True),
    ({"architecture": "x86_64", "amx_fp16": True}, torch.float16, True),
    ({"architecture": "aarch64"}, torch.bfloat16, None),  # cannot tell: no warning
    ({"architecture": "x86_64"}, torch.float32, True),
])
def test_half_precision_on_a_cpu_without_its_instructions_warns_once(monkeypatch, capabilities, dtype, native):
    import scaleot_fed.devices as devices

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    devices._warn_emulated.cache_clear()
    assert devices.cpu_multiplies_natively(dtype) is native
    placement = devices.Placement(device="cpu", dtype=next(k for k, v in devices.DTYPES.items() if v == dtype))
    with pytest.warns(RuntimeWarning, match="emulated, about 12x slower") if native is False else _no_warning():
        placement.apply(torch.nn.Linear(2, 2))
    if native is False:  # once per process and dtype
        with _no_warning():
            placement.apply(torch.nn.Linear(2, 2))
    with _no_warning():  # only stored in the dtype (an emulator saved, shipped): no matmul, no warning
        place(torch.nn.Linear(2, 2), torch.device("cpu"), dtype)
    devices._warn_emulated.cache_clear()


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


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


def test_stage1_in_bf16_tracks_float32_and_returns_float32_harmonizers_on_the_cpu(tokens):
    from scaleot_fed.layer_replace import LayerReplaceConfig, run_layer_replace

    def stage1(dtype: str):
        config = LayerReplaceConfig(num_adapter_layers=2, steps=4, batch_size=4, block_size=16, eval_batches=1,
                                    device="cpu", dtype=dtype)
        model = tiny_model("llama")
        return model, run_layer_replace(model, tokens, config, progress=False)

    model, bf16 = stage1("bfloat16")
    _, fp32 = stage1("float32")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the frozen model in the run's dtype
    assert {p.dtype for h in bf16.harmonizers.values() for p in h.parameters()} == {torch.float32}
    assert {p.device.type for h in bf16.harmonizers.values() for p in h.parameters()} == {"cpu"}
    for key in ("heldout_loss_full", "heldout_loss_harmonized"):
        assert abs(bf16.evaluation[key] - fp32.evaluation[key]) < 0.02 * fp32.evaluation[key]


def test_an_emulator_stored_in_bf16_is_half_the_bytes_and_loads_in_bf16(tmp_path, gpt2_tokenizer):
    from scaleot_fed.emulator import EmulatorConfig, load_emulator, save_emulator
    from scaleot_fed.emulator.build import build_emulator

    full = tiny_model("gpt2", num_layers=6, vocab_size=len(gpt2_tokenizer))
    paths = {}
    for dtype in ("auto", "bfloat16"):
        emulator = build_emulator(full, EmulatorConfig("uniform-drop", 2, 0.5, dtype=dtype))
        paths[dtype] = save_emulator(emulator, tmp_path / dtype, tokenizer=gpt2_tokenizer)
    size = {k: (p / "model.safetensors").stat().st_size for k, p in paths.items()}
    assert size["bfloat16"] < 0.52 * size["auto"]
    half, whole = load_emulator(paths["bfloat16"]), load_emulator(paths["auto"])
    assert half.manifest["dtype"] == "bfloat16" and whole.manifest["dtype"] == "float32"
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_emulator(paths["bfloat16"], dtype=torch.float32).model.parameters()} == {torch.float32}
    for (name, a), b in zip(whole.model.named_parameters(), half.model.parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name  # the same weights, rounded once


@pytest.mark.parametrize("change,message", [
    ({"run": {"client_num_gpus": 0.5}}, "has no CUDA GPU"),
    ({"finetune": {"device": "cuda"}}, "Ray gives clients no GPU"),
    ({"finetune": {"device": "cuda:1"}, "run": {"client_num_gpus": 1.0}}, "Ray picks each client's GPU"),
])
def test_client_devices_are_checked_against_what_ray_gives_them(change, message):
    from simulations.config import fed_config_from_dict
    from simulations.runner import check_client_devices

    config = fed_config_from_dict(change)
    with pytest.raises(ConfigError, match=message):
        check_client_devices(config, gpus=0)
    if "client_num_gpus" in change.get("run", {}) and "device" not in change.get("finetune", {}):
        check_client_devices(config, gpus=1)  # the same config is fine where a GPU exists


def test_a_bf16_checkpoint_loads_in_bf16_unless_asked_otherwise(tmp_path, gpt2_tokenizer):
    from scaleot_fed.models import load_model

    tiny_model("llama", num_layers=2, vocab_size=len(gpt2_tokenizer)).to(torch.bfloat16).save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    assert {p.dtype for p in load_model(str(tmp_path)).model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(str(tmp_path), dtype=torch.float32).model.parameters()} == {torch.float32}
