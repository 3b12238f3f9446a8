"""The cloud's Flower ServerApp: one module-level `app` for Flower's deployment engine and the simulation.

`flwr run simulations/flower_app <connection>` (a SuperLink and one SuperNode per device) and `fedge
simulate federated` (Flower's simulation engine) run this same app. It reads the run's options from
`context.run_config` (`fedge.<option>` keys, see `fedge.cloud.federated_config.to_run_config`), waits
for `min-nodes` devices, and drives the one round loop (`FederatedRun` -> `run_rounds`). It never
needs client data: devices evaluate the global adapter on their own held-out text. Every exchange
goes through `ReplyGuardGrid` (a deadline, prompt polling, a dead device's error attributed to it,
stale updates refused), so a device that dies mid-round is a dropped client, not a failed run; and
a reply whose arrays are still on their way is fetched again after 20 ms, not Flower's 1 s
(`fedge.flower_waits`).
A killed ServerApp or SuperLink is resumed with `fedge.resume = true` and the same
`fedge.checkpoint-dir`: the run continues after the last checkpointed round.

With `fedge.secagg = true` training rounds run under secure aggregation, and with `fedge.dp-epsilon`
under client-level DP (`privacy_grid_wrapper`, as in the simulation; the devices' app carries
`secagg_mod` and `dp_mod`). With `fedge.publish-registry` and `fedge.publish-signing-key` set,
each accepted round's adapter (or the final one) is published, signed, into the registry that
`fedge cloud serve --adapters` serves (`fedge.cloud.adapter_publisher.publish_version`).

Simulation-only extra: `fedge.simulations.federated` runs the ServerApp in its own process and wants
the records as they come and the result object; it sets `SimulationHooks` for the duration of one
`run_simulation` (Flower's Python simulation API passes no run config to the ServerApp). In deployment
no hooks are set and everything comes from the run config.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.cloud.federated_config import FederatedConfig, from_run_config
from fedge.cloud.federated_rounds import FederatedRun, ServerModel, privacy_grid_wrapper
from fedge.cloud.reply_guard import ReplyGuardGrid
from fedge.flower_waits import shorten_object_pulls
from fedge.peft_methods.aggregation import StateDict

log = logging.getLogger("fedge.federated")


@dataclass
class SimulationHooks:
    """What an in-process simulation passes to, and reads back from, the module-level ServerApp."""

    config: FederatedConfig
    on_round: Callable[[dict], None] | None = None
    grid_wrapper: Callable[[Grid], Grid] | None = None
    run: FederatedRun | None = None
    errors: list[BaseException] = field(default_factory=list)


_HOOKS: list[SimulationHooks] = []


def set_simulation_hooks(hooks: SimulationHooks | None) -> None:
    _HOOKS.clear()
    if hooks is not None:
        _HOOKS.append(hooks)


class Publisher:
    """Publishes an adapter, signed, as a new version of the serving registry."""

    def __init__(self, config: FederatedConfig) -> None:
        if not config.publish_signing_key:
            raise ValueError("fedge.publish-registry needs fedge.publish-signing-key (fedge certs create)")
        self.config = config
        self.published: list[Path] = []

    def __call__(self, server: ServerModel, state: StateDict, server_round: int) -> None:
        from fedge.cloud.adapter_publisher import publish_version

        with tempfile.TemporaryDirectory(prefix="fedge-adapter-") as tmp:
            server.adapted.save(tmp, state)
            path = publish_version(self.config.publish_registry, tmp, self.config.publish_signing_key,
                                   self.config.model)
        self.published.append(path)
        log.warning("round %d: published adapter %s", server_round, path)


def build_run(config: FederatedConfig, hooks: SimulationHooks | None = None) -> FederatedRun:
    """The run this app executes: secure aggregation, DP and publishing as the config says."""
    wrapper = hooks.grid_wrapper if hooks is not None else None
    if wrapper is None and (wrapper := privacy_grid_wrapper(config)) is not None:
        wrapper = _voiding(wrapper)
    publish = Publisher(config) if config.publish_registry else None
    return FederatedRun(config, on_round=hooks.on_round if hooks else _log_round, grid_wrapper=wrapper,
                        publish=publish)


def _voiding(wrapper: Callable[[Grid], Grid]) -> Callable[[Grid], Grid]:
    """On devices, a secure round left below its threshold (devices died) is void, not the end of the run."""

    def wrap(grid: Grid) -> Grid:
        secure = wrapper(grid)
        secure.void_aborted_rounds = True
        return secure

    return wrap


def _log_round(record: dict) -> None:
    rejected = "; ".join(f"{r['client']}: {r['reason']}" for r in record.get("rejected", []))
    log.warning("round %d: global loss %.4f, %d accepted%s", record["round"], record["global_loss"],
                len(record.get("accepted", [])), f", left out: {rejected}" if rejected else "")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    hooks = _HOOKS[0] if _HOOKS else None
    config = hooks.config if hooks is not None else from_run_config(dict(context.run_config))
    try:  # replies' arrays: retry after 20 ms, not 1 s (fedge.flower_waits)
        shorten_object_pulls()
    except RuntimeError as exc:
        log.warning("%s", exc)
    run = build_run(config, hooks)
    if hooks is not None:
        hooks.run = run
    try:  # a deadline and checks on every exchange; devices that die are dropped, not waited for
        run.execute(ReplyGuardGrid(grid, config.pull_interval))
    except BaseException as exc:  # run_simulation only logs errors; keep it for the caller
        if hooks is not None:
            hooks.errors.append(exc)
        raise
