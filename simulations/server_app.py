"""The model owner: a Flower ServerApp running :class:`~simulations.federation.FederatedRun`.

``flwr run .`` uses ``app`` below, which reads the run file named by the run-config key
``config-file`` (see ``[tool.flwr.app.config]`` in pyproject.toml; any other run-config key of the
form ``section.key`` overrides that file). ``scaleot-fed simulate`` builds its ServerApp with
:func:`make_server_app` because Flower's ``run_simulation`` cannot pass a run config.
"""

from __future__ import annotations

from scaleot_fed.env import configure_environment

configure_environment()

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from .config import FedConfig, load_fed_config  # noqa: E402
from .federation import FederatedRun  # noqa: E402


def make_server_app(config: FedConfig, resume: bool = False, on_error: list | None = None) -> ServerApp:
    """A ServerApp bound to ``config``; exceptions are also appended to ``on_error`` (Flower's
    simulation runner logs a failing ServerApp but does not re-raise)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            FederatedRun(config, resume=resume).run(grid)
        except BaseException as exc:
            if on_error is not None:
                on_error.append(exc)
            raise

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    path = run_config.pop("config-file", "simulations/configs/smoke.toml")
    overrides = {k: v for k, v in run_config.items() if "." in k}
    FederatedRun(load_fed_config(path, overrides)).run(grid)
