"""Start a federated run on Flower's simulation engine (Ray), locally or on a Ray cluster."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from scaleot_fed.env import configure_environment

configure_environment()

from scaleot_fed.errors import ConfigError, RunError, ScaleOTError  # noqa: E402
from scaleot_fed.rundir import RowCache, check_output, clear_output, lock_run_dir, unlock_run_dir  # noqa: E402

from .config import FedConfig, check_secure_strategy  # noqa: E402
from .guard import stop_cleanly  # noqa: E402
from .resume import check_resume  # noqa: E402


def backend_config(config: FedConfig) -> dict:
    """Ray options: resources per client and how Ray starts (or which cluster it joins)."""
    run = config.run
    init_args: dict = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if run.ray_address:
        init_args["address"] = run.ray_address
        # a cluster's workers do not inherit this process's environment: the client mods go with the job
        from .client_app import CLIENT_MODS

        forwarded = {k: os.environ[k] for k in (CLIENT_MODS, "PYTHONPATH") if os.environ.get(k) and os.environ.get(CLIENT_MODS)}
        if forwarded:
            init_args["runtime_env"] = {"env_vars": forwarded}
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": run.client_num_cpus, "num_gpus": run.client_num_gpus},
        "init_args": init_args,
    }


def check_client_devices(config: FedConfig, gpus: int | None = None) -> None:
    """The clients' device against what Ray will give them (``gpus``: CUDA devices here, read
    when not given). Ray shows an actor only the GPU share it reserved (``client_num_gpus``), and
    waits forever for GPUs a machine does not have."""
    import torch

    run, device = config.run, config.finetune.device
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.startswith("cuda:"):
        raise ConfigError(f"[finetune] device = {device!r}: in a simulation Ray picks each client's GPU; "
                          "use device = \"cuda\" or \"auto\"")
    if device.startswith("cuda") and run.client_num_gpus == 0:
        raise ConfigError(f"[finetune] device = {device!r} but [run] client_num_gpus = 0: Ray gives clients no GPU; "
                          "set client_num_gpus (e.g. 0.25 for four clients per GPU) or device = \"auto\"")
    if run.client_num_gpus > 0 and run.ray_address is None and gpus == 0:
        raise ConfigError(f"[run] client_num_gpus = {run.client_num_gpus} but this machine has no CUDA GPU; "
                          "set it to 0 (clients on the CPU) or attach to a GPU cluster with ray_address")


def validate(config: FedConfig) -> None:
    """Checks that need no model: fail at start, before Ray and Flower spin up."""
    from scaleot_fed.arch import architecture_of
    from scaleot_fed.emulator import read_manifest
    from scaleot_fed.layer_replace import middle_layers
    from scaleot_fed.manifest import check_shippable
    from scaleot_fed.models import load_model_config
    from strategies import check_requirements, resolve_strategy

    from .client_app import client_mods
    from .partition import partition_indices, warn_if_position_skew
    from .privacy import make_strategy

    run = config.run
    run.evaluation_items()  # unknown task, missing file, a user file without eval_task
    make_strategy(config)
    if config.emulator.path:
        check_shippable(read_manifest(config.emulator.path), run.private_blocks)
    else:  # the model (config only, no weights): known, a supported family, deep enough for N_a
        model = load_model_config(run.model)
        architecture_of(model)
        middle_layers(int(model.num_hidden_layers), config.emulator.num_adapter_layers)
    # what the strategy declares it needs of the owners (FFA-LoRA: LoRA, A frozen, no local DP)
    strategy = resolve_strategy(config.strategy.name)
    check_requirements(config.strategy.name, strategy, config.finetune.mode, config.privacy.mode)
    if config.secure_aggregation.enabled:
        check_secure_strategy(config.strategy.name, strategy)
    check_client_devices(config)
    config.tracking.check_installed()
    client_mods()  # $SCALEOT_FED_CLIENT_MODS: a bad name is one line here, not a failure in every owner
    partition_indices(run.task, run.train_limit, config.partition, run.num_clients, run.seed)  # (refuses owners < 2 items)
    warn_if_position_skew(run.task, run.train_limit, config.partition)


def _check_rows(rows: Mapping[str, dict], config: FedConfig) -> None:
    """Refuse rows given to :func:`simulate` that were not scored on the run's evaluation items."""
    from scaleot_fed.evaluate import item_record

    items = config.run.evaluation_items()
    expected = item_record(items, [[] for _ in items])  # (the items' gold answers and choice lengths)
    for key, row in rows.items():
        scored = row.get("items", {})
        if any(scored.get(k) != expected[k] for k in ("gold", "choice_chars")):
            raise ConfigError(f"the given row {key!r} was scored on other items than this run's {len(items)} "
                              f"({config.run.eval_task or config.run.task}, eval_limit {config.run.eval_limit}, "
                              f"{config.run.eval_split}); score it on those, or leave it out")


def simulate(config: FedConfig, resume: bool = False, overwrite: bool = False,
             rows: Mapping[str, dict] | None = None) -> Path:
    """Run (or resume) a federated simulation; returns the run folder.

    Parameters
    ----------
    rows
        Rows of the final table already scored on this run's evaluation items (key -> row, e.g.
        ``full_zero_shot``: a study's, identical for every federation of a seed), kept in the run
        folder's row cache so that the final table reads them instead of scoring them again. A row
        the folder holds already is left as it is.

    Raises
    ------
    ScaleOTError
        When the server loop failed (too many failed clients, bad input, ...).
    """
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import make_server_app

    out = Path(config.run.out)
    validate(config)  # everything that needs no Ray, before Ray starts and before anything is written
    if rows:
        _check_rows(rows, config)
    if resume:
        check_resume(config, out)
    else:
        check_output(out, overwrite)  # a new run: a non-empty folder only with --overwrite
        clear_output(out)
    lock_run_dir(out)  # a second run (or resume) on this folder fails at once, naming our PID
    cache = RowCache(out)
    for key, row in (rows or {}).items():
        if cache.get(key) is None:
            cache.put(key, row)
    errors: list[BaseException] = []
    if not config.run.ray_address:
        os.environ.pop("RAY_ADDRESS", None)  # else ray.init attaches to whatever cluster it names
    try:
        with stop_cleanly(out):
            run_simulation(
                server_app=make_server_app(config, resume=resume, on_error=errors),
                client_app=client_app,
                num_supernodes=config.run.num_clients,
                backend_config=backend_config(config),
            )
    finally:
        unlock_run_dir(out)
    if errors:
        exc = errors[0]
        if isinstance(exc, ScaleOTError):
            raise exc
        raise RunError(f"the federated run failed: {type(exc).__name__}: {exc}") from exc
    return Path(config.run.out)
