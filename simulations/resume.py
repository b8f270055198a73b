"""``--resume``: which config a resumed run uses, and what it may change.

A resumed run takes the config saved in its folder (or the ``--config`` file given again), with
``--set`` overrides on top. It is compared with the config recorded in the checkpoint (so an
edited ``config.json`` is caught as well): keys in :data:`SAFE_ON_RESUME` may change (extend a
run, evaluate more or less often) and are logged; any other change is refused, listing the keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from scaleot_fed.config import as_dict
from scaleot_fed.emulator.config import upgrade_saved
from scaleot_fed.errors import ConfigError
from scaleot_fed.rundir import changed_keys
from scaleot_fed.tracking import TrackingConfig

from .checkpoint import read_state
from .config import FedConfig, apply_overrides, fed_config_from_dict, load_fed_config

log = logging.getLogger("scaleot_fed.federation")

SAFE_ON_RESUME = ("run.num_rounds", "run.eval_every", "run.eval_batch_size", "run.final_table", "run.save_plugged",
                  *(f"tracking.{f.name}" for f in dataclasses.fields(TrackingConfig)))
"""Keys a resumed run may change: they do not alter what the completed rounds did (a resume with
another tracking backend starts a new tracked run with every round so far)."""
IGNORED_ON_RESUME = ("run.out",)
"""Keys that are not part of what a run is: where it lives."""


def load_run_config(run_dir: str | Path, overrides: dict[str, Any] | None = None,
                    config_file: str | Path | None = None) -> FedConfig:
    """The config a resumed run uses: ``config_file`` (default: the run folder's ``config.json``)
    plus ``overrides`` (``section.key`` -> value), living in ``run_dir``, running to the end."""
    run_dir = Path(run_dir)
    if config_file is not None:
        config = load_fed_config(config_file, overrides)
        data = as_dict(config)
    else:
        path = run_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no config.json)")
        data = apply_overrides(in_todays_keys(json.loads(path.read_text())), overrides or {})
    data["run"]["out"] = str(run_dir)
    return fed_config_from_dict(data, str(config_file or run_dir / "config.json"))


def in_todays_keys(snapshot: dict) -> dict:
    """A saved run config in today's keys: renamed emulator keys (:func:`upgrade_saved`), and
    without the ``[debug]`` table of runs made before fault injection became a test-only mod."""
    data = upgrade_saved(snapshot)
    data.pop("debug", None)
    return data


def saved_in_todays_keys(snapshot: dict) -> dict:
    """A whole saved config (a checkpoint's, a study ledger's record) as today's code would save
    it: :func:`in_todays_keys`, plus the keys added since, at their defaults. A key is added with
    the default that keeps the old behaviour, so a run saved before it existed did not differ in
    it (a config file, which may leave keys out, is read by :func:`in_todays_keys` alone)."""
    data = in_todays_keys(snapshot)
    for section, defaults in json.loads(json.dumps(as_dict(FedConfig()))).items():
        if section not in data:
            data[section] = defaults
        elif isinstance(data[section], dict) and isinstance(defaults, dict):
            data[section] = defaults | data[section]
    return data


def _value(config: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        config = config.get(key, {}) if isinstance(config, dict) else None
    return config


def check_resume(config: FedConfig, out: Path) -> None:
    """Refuse to resume ``out`` with a config that changes what its completed rounds did."""
    _, state = read_state(out)  # no usable checkpoint: one line, before Ray starts
    recorded = state.get("config")
    if recorded is None:
        log.warning("the checkpoint in %s predates config checks on resume: changes are not verified", out)
        return
    new = json.loads(json.dumps(as_dict(config)))
    recorded = saved_in_todays_keys(recorded)  # (a checkpoint written before a key was renamed, removed or added)
    changed = [k for k in changed_keys(recorded, new) if k not in IGNORED_ON_RESUME]
    unsafe = [k for k in changed if k not in SAFE_ON_RESUME]
    if unsafe:
        raise ConfigError(f"--resume {out}: the config differs from the one its rounds ran with in "
                          f"{', '.join(unsafe)}; only {', '.join(SAFE_ON_RESUME)} may change on resume "
                          "(start a new run with another --out for the rest)")
    if config.run.num_rounds < state["round"]:
        raise ConfigError(f"--resume {out}: run.num_rounds = {config.run.num_rounds} but {state['round']} rounds "
                          "are already done")
    for key in changed:
        log.info("resume: %s changes from %r to %r", key, _value(recorded, key), _value(new, key))
