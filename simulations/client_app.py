"""The data owner: a Flower ClientApp that fine-tunes the emulator's adapter blocks locally.

Messages it answers:

* ``query.emulator``: "do you hold emulator <sha256>?" and, when the server attaches the files,
  the delivery itself. The emulator is written to the local cache (``$SCALEOT_FED_EMULATOR_CACHE``,
  verified against its sha256) and kept loaded once per process, never in the Flower ``Context``
  (the Ray backend pickles the Context to and fro on every message).
* ``train``: load the received trainable state, train on the local partition, send the state back.
* ``evaluate``: the emulator-side validation loss of the received state on the local split.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scaleot_fed.env import configure_environment

configure_environment()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from scaleot_fed.emulator import WEIGHTS, Emulator, check_emulator_folder, load_emulator, sha256_file  # noqa: E402
from scaleot_fed.errors import ConfigError, IntegrityError, RunError  # noqa: E402
from scaleot_fed.evaluate import evaluate_multiple_choice  # noqa: E402
from scaleot_fed.finetune import FinetuneConfig, answer_loss, finetune, make_trainable  # noqa: E402
from scaleot_fed.imports import load_object  # noqa: E402
from scaleot_fed.models import cache_dir  # noqa: E402
from strategies.requirements import FREEZE_LORA_A  # noqa: E402

from .config import FedConfig, fed_config_from_json  # noqa: E402
from .owners import owner_finetune  # noqa: E402
from .partition import client_data, local_data  # noqa: E402
from .privacy import UNIT_WEIGHT, dp_mod  # noqa: E402
from .realign_rounds import apply_realigned, received_realigned  # noqa: E402
from .secure import is_secure, legacy_config, legacy_parameters, legacy_train_reply, secure_mod  # noqa: E402

app = ClientApp()

# Per-process caches (a Ray actor runs many virtual clients in turn; these survive across them).
_EMULATORS: dict[str, Emulator] = {}
_TRAINABLE: dict[tuple, tuple[torch.nn.Module, tuple[str, ...]]] = {}
_HASHED: dict[tuple[int, int, int, int], str] = {}
"""sha256 of a file version, keyed on (device, inode, size, mtime_ns): a cached emulator is hashed
once per process (a delivery's hash survives its rename into the cache), and again only once the
file has changed on disk."""

log = logging.getLogger("scaleot_fed.client")


EMULATOR_CACHE_ENV = "SCALEOT_FED_EMULATOR_CACHE"
DELIVERABLE_SUFFIXES = (".json", ".txt", ".model", ".jinja")


def emulator_dir(sha: str) -> Path:
    """Where a data owner keeps delivered emulators (``$SCALEOT_FED_EMULATOR_CACHE``, default
    ``<cache>/emulators``)."""
    root = os.environ.get(EMULATOR_CACHE_ENV)
    return (Path(root) if root else cache_dir() / "emulators") / sha


def cached_sha256(path: Path) -> str:
    """``sha256_file(path)``, computed once per version of the file (device, inode, size, mtime_ns)."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def holds_emulator(sha: str) -> bool:
    """Loaded in this process, or whole on the local disk cache with weights whose sha256 is
    ``sha``. A cached copy that fails the check is deleted and reported as not held, so that the
    server sends a fresh one."""
    if sha in _EMULATORS:
        return True
    path = emulator_dir(sha)
    if not path.exists():
        return False
    try:
        manifest = check_emulator_folder(path, tokenizer=True, hasher=cached_sha256)
        if manifest["weights_sha256"] != sha:
            raise IntegrityError(f"{path} holds emulator {str(manifest['weights_sha256'])[:12]}, not {sha[:12]}")
        return True
    except (IntegrityError, OSError) as exc:
        log.warning("deleting the cached emulator %s (%s); asking for a fresh copy", sha[:12], exc)
        shutil.rmtree(path, ignore_errors=True)
        return False


def get_emulator(sha: str) -> Emulator:
    """The emulator with weights ``sha``, loaded once per process (sha256 checked on load)."""
    if sha not in _EMULATORS:
        path = emulator_dir(sha)
        if not (path / "manifest.json").is_file():
            raise RunError(f"emulator {sha[:12]} was never delivered to this data owner")
        emulator = load_emulator(path, hasher=cached_sha256)
        if emulator.manifest["weights_sha256"] != sha:
            raise RunError(f"cached emulator in {path} does not carry the announced sha256")
        _EMULATORS[sha] = emulator
    return _EMULATORS[sha]


def _store_delivery(sha: str, content: RecordDict) -> int:
    """Write a delivered emulator into the cache atomically; returns the bytes received."""
    weights = content.array_records["emulator"]["weights"].numpy().tobytes()
    files = content.config_records["files"]
    target = emulator_dir(sha)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=target.parent))
    try:
        (tmp / WEIGHTS).write_bytes(weights)
        if cached_sha256(tmp / WEIGHTS) != sha:  # remembered: holds_emulator does not hash it again
            raise RunError("delivered emulator weights do not match the announced sha256")
        for name, data in files.items():
            # Data files only: nothing executable or pickled (.bin/.pt/.pkl/.py) is accepted.
            if "/" in name or name.startswith(".") or not name.endswith(DELIVERABLE_SUFFIXES):
                raise RunError(f"refusing delivered file {name!r}: an emulator folder holds only "
                                   f"{', '.join(DELIVERABLE_SUFFIXES)} files besides {WEIGHTS}")
            (tmp / name).write_bytes(data)
        if target.exists():  # another process of this machine got it first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(weights) + sum(len(v) for v in files.values())


def trainable_model(sha: str, config: FinetuneConfig) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The emulator with this run's trainable parameters attached (cached per process), and the
    names of the tensors that are exchanged with the server."""
    key = (sha, config.mode, config.lora_r, config.lora_alpha, config.lora_dropout, config.adapter_size)
    if key not in _TRAINABLE:
        emulator = get_emulator(sha)
        # The first configuration (e.g. a LoRA rank) takes the loaded emulator in place; another one
        # in this process (owners of several ranks) gets a pristine copy from the verified cache
        # (a copy of the loaded one would carry the first configuration's adapters).
        base = emulator.model if not any(k[0] == sha for k in _TRAINABLE) else load_emulator(
            emulator_dir(sha), hasher=cached_sha256).model
        model = make_trainable(base, list(emulator.adapter_positions()), config)
        names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        _TRAINABLE[key] = (model, names)
    return _TRAINABLE[key]


def load_exchange_state(model: torch.nn.Module, names: tuple[str, ...], arrays: ArrayRecord) -> None:
    """Copy the server's state into the trainable tensors; keys and shapes must match exactly."""
    received = set(arrays.keys())
    if received != set(names):
        missing, extra = sorted(set(names) - received)[:3], sorted(received - set(names))[:3]
        raise RunError(f"server state does not fit this emulator: missing {missing}, unexpected {extra}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            value = torch.from_numpy(np.array(arrays[name].numpy()))
            if value.shape != params[name].shape:
                raise RunError(f"server state {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(value)


def exchange_state(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}  # off the GPU finetune may use


DATA_PATH_KEY = "data-path"


def _run_config(msg: Message) -> ConfigRecord:
    """The server's config record (a SecAgg+ train message carries it in the legacy layout)."""
    return legacy_config(msg) if is_secure(msg) else msg.content["config"]


def _setup(msg: Message, context: Context) -> tuple[FedConfig, int, str, tuple[list, list]]:
    """The run config the message carries, this owner's id, the emulator's sha256, and the
    owner's (train, validation) items: its own file (node-config ``data-path``, a deployment)
    or its partition of the shared task (``partition-id``, a simulation)."""
    torch.set_num_threads(1)  # many client processes share the cores
    cfg = _run_config(msg)
    config = fed_config_from_json(str(cfg["fed-config"]))
    pid = owner_id(context)
    if DATA_PATH_KEY in context.node_config:
        data = local_data(config, str(context.node_config[DATA_PATH_KEY]))
    elif "partition-id" in context.node_config:
        data = client_data(config, pid, int(context.node_config["num-partitions"]))
    else:
        raise RunError(f"this SuperNode has no data: start it with --node-config \"{DATA_PATH_KEY}='FILE'\" "
                           "(a .jsonl/.csv of multiple-choice items, see docs/deployment.md)")
    return config, pid, str(cfg["sha256"]), data


def owner_id(context: Context) -> int:
    """The partition id in a simulation; -1 for a deployed owner (the server numbers those)."""
    return int(context.node_config.get("partition-id", -1))


def _privacy_of(msg: Message):
    return fed_config_from_json(str(_run_config(msg)["fed-config"])).privacy


@app.query("emulator")
def query_emulator(msg: Message, context: Context) -> Message:
    """Report (and, if attached, receive) the emulator; also tells the server our partition id."""
    sha = str(msg.content["config"]["sha256"])
    has, received = receive_emulator(sha, msg.content if "emulator" in msg.content.array_records else None)
    reply = ConfigRecord({"has": has, "partition-id": owner_id(context), "received-bytes": received})
    return Message(RecordDict({"emulator": reply}), reply_to=msg)


def receive_emulator(sha: str, delivery: RecordDict | None) -> tuple[bool, int]:
    """The answer to ``query.emulator``: store ``delivery`` (if any) unless a sound copy is held;
    returns (holds the emulator now, bytes received). A corrupted cache reads as not held (and is
    deleted), so the server sends a fresh copy and the run goes on."""
    received = 0
    if delivery is not None and not holds_emulator(sha):
        received = _store_delivery(sha, delivery)
    return holds_emulator(sha), received


def _load(model: torch.nn.Module, names: tuple[str, ...], arrays: ArrayRecord, msg: Message) -> None:
    """The model owner's latest re-aligned emulator tensors (when the message carries them), then
    the exchanged state."""
    tensors = None if is_secure(msg) else received_realigned(msg)
    if tensors:
        apply_realigned(model, tensors)
    load_exchange_state(model, names, arrays)


def _personal_baseline(config: FedConfig, model: torch.nn.Module, tokenizer, val_items: list) -> dict:
    """``{"local-acc": ...}`` when ``[run] per_owner_local``: this owner's own adapters, just
    trained, on its held-out split (the personalised baseline of per-owner results)."""
    if not config.run.per_owner_local:
        return {}
    items = val_items[:config.run.per_owner_items]
    return {"local-acc": evaluate_multiple_choice(model, tokenizer, items, batch_size=config.run.eval_batch_size)["acc"]}


@dataclass
class _Job:
    """One owner's training round, decoded from the server's message."""

    config: FedConfig
    pid: int
    sha: str
    round_: int
    cfg: ConfigRecord
    train_items: list
    val_items: list
    model: torch.nn.Module
    names: tuple[str, ...]
    received: ArrayRecord
    local: FinetuneConfig


def _decode(msg: Message, context: Context) -> _Job:
    """The run's config, this owner's data, and the model with the server's state loaded."""
    config, pid, sha, (train_items, val_items) = _setup(msg, context)
    cfg = _run_config(msg)
    round_ = int(cfg["round"])
    owner_ft = owner_finetune(config, cfg)
    model, names = trainable_model(sha, owner_ft)
    if is_secure(msg):  # the legacy layout carries a list in the exchange order
        received = ArrayRecord(dict(zip(names, (Array(a) for a in legacy_parameters(msg)))))
    else:
        received = msg.content["arrays"]
    _load(model, names, received, msg)
    local = dataclasses.replace(owner_ft, seed=hash((config.run.seed, round_, pid)) % (2**31),
                                eval_items=len(val_items), eval_every=owner_ft.steps, select_best=False)
    return _Job(config, pid, sha, round_, cfg, train_items, val_items, model, names, received, local)


def _train(job: _Job):
    """Local training of the exchanged state (LoRA's A frozen where the strategy asks)."""
    frozen = []
    if bool(job.cfg.get(FREEZE_LORA_A, False)):  # the strategy asks (FFA-LoRA): only B trains, averaging B is exact
        frozen = [p for n, p in job.model.named_parameters() if "lora_A" in n and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    try:
        return finetune(job.model, get_emulator(job.sha).tokenizer, job.train_items, job.val_items, job.local,
                        progress=False, proximal_mu=float(job.cfg.get("proximal-mu", 0.0)))
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _encode(msg: Message, job: _Job, result, started: float) -> Message:
    """The reply: the trained state and what the round cost and measured (masked by SecAgg+ when
    the round is secure)."""
    state = exchange_state(job.model, job.names)
    # How far training moved the state (before any DP clipping): the scale clipping_norm must fit.
    update_norm = float(torch.sqrt(sum(((state[n] - torch.from_numpy(np.array(job.received[n].numpy()))) ** 2).sum()
                                       for n in job.names)))
    metrics = {
        "num-examples": len(job.train_items),
        UNIT_WEIGHT: 1,
        "train-loss": float(result.history[-1]["train_loss"]),
        "train-steps": job.local.steps, "realign-version": int(job.cfg.get("realign-version", 0)),  # what it trained
        "client-val-loss": float(result.best_val_loss),
        "client-val-loss-before": float(result.initial_val_loss),
        "update-norm": update_norm,
        # the round-cost breakdown: this owner's own work (setup, training, export) vs the round
        "client-seconds": time.perf_counter() - started,
        "client-train-seconds": result.seconds,
    } | _personal_baseline(job.config, job.model, get_emulator(job.sha).tokenizer, job.val_items)
    if is_secure(msg):  # secaggplus_mod masks this reply before it leaves
        return legacy_train_reply(msg, [state[n].numpy() for n in job.names], len(job.train_items), metrics)
    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=state), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


CLIENT_MODS = "SCALEOT_FED_CLIENT_MODS"
"""Environment variable: Flower mods around every owner's train handler, as comma-separated
``"package.module:function"`` (a mod is ``mod(msg, context, call_next) -> Message``): chaos drills
(the tests' failures, ``tests/faults.py``), tracing. Read where the owner runs, when a message
arrives; Ray's workers inherit it from the process that starts the simulation."""


@functools.cache
def _mods(spec: str) -> tuple:
    mods = tuple(load_object(s.strip(), f"${CLIENT_MODS} entry {s.strip()!r}") for s in spec.split(",") if s.strip())
    if not all(callable(m) for m in mods):
        raise ConfigError(f"${CLIENT_MODS} = {spec!r} names something that is not a function (msg, context, call_next)")
    return mods


def client_mods() -> tuple:
    """The mods ``$SCALEOT_FED_CLIENT_MODS`` names, imported (a bad name: one ConfigError line)."""
    return _mods(os.environ.get(CLIENT_MODS, ""))


def _named_mods(msg: Message, context: Context, call_next) -> Message:
    """Runs the handler inside :func:`client_mods`, the first outermost."""
    def inside(mods: tuple):
        return call_next if not mods else lambda m, c: mods[0](m, c, inside(mods[1:]))

    return inside(client_mods())(msg, context)


# Mods on train only (Flower's DP mods break other messages); SecAgg+ masks what DP/training made.
@app.train(mods=[secure_mod, dp_mod(_privacy_of), _named_mods])
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    job = _decode(msg, context)
    return _encode(msg, job, _train(job), started)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, pid, sha, (_, val_items) = _setup(msg, context)
    owner_ft = owner_finetune(config, msg.content["config"])
    model, names = trainable_model(sha, owner_ft)
    _load(model, names, msg.content["arrays"], msg)  # evaluate messages are never SecAgg+
    local = dataclasses.replace(owner_ft, eval_items=len(val_items))
    loss = answer_loss(model, get_emulator(sha).tokenizer, val_items, local)
    metrics = MetricRecord({"num-examples": len(val_items), UNIT_WEIGHT: 1, "client-val-loss": float(loss)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def delivery_content(emulator_path: Path, sha: str) -> RecordDict:
    """What the server sends to a data owner that lacks the emulator: the weights file bytes (so
    the sha256 is checked end to end) and the small files beside it."""
    weights = np.frombuffer((emulator_path / WEIGHTS).read_bytes(), dtype=np.uint8)
    files = {p.name: p.read_bytes() for p in sorted(emulator_path.iterdir()) if p.is_file() and p.name != WEIGHTS}
    return RecordDict({
        "config": ConfigRecord({"sha256": sha}),
        "emulator": _weights_record(weights),
        "files": ConfigRecord(files),
    })


def _weights_record(weights: np.ndarray) -> ArrayRecord:
    return ArrayRecord(array_dict={"weights": Array(weights)})
