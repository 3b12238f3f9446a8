"""The verifier as one Ray Serve deployment: thin glue over the engine and the scheduler.

Each replica holds one target model, its sessions' KV caches (`VerifierEngine`) and a continuous-
batching scheduler (`ContinuousBatchScheduler`); this module only loads the model in the replica
process, expires idle sessions, and exposes the scheduler's methods to Ray. The deployment has
`num_replicas` or an `autoscaling_config`, reserves `cpus_per_replica` CPUs per replica (the
engine computes on CPU), and routes with `SessionAffinityRouter`: a replica names its sessions
after its own Serve replica id, so each session's rounds reach the replica holding its cache.
Only typed dataclasses cross the Ray boundary (`OpenRequest`, `Round` in; `OpenedSession`,
`RoundReply`, `Refusal`, `ReplicaInfo` out). The class is defined lazily: importing ray is slow,
and tests and the edge never need it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass

from fedge.cloud.adapter_registry import AdapterRegistry
from fedge.cloud.engine import Limits, VerifierEngine

log = logging.getLogger(__name__)

VERIFIER_APP = "fedge-verifier"  # the Serve application `fedge cloud serve` deploys the verifier as
ROUTER = "fedge.cloud.session_router.SessionAffinityRouter"  # imported where each handle routes


@dataclass(frozen=True)
class Scaling:
    """How many verifier replicas, and what each one reserves in the Ray cluster."""

    replicas: int = 1
    autoscale_min: int | None = None  # set both min and max: Serve scales between them on ongoing requests
    autoscale_max: int | None = None
    target_ongoing_requests: float = 8.0  # per replica, what the autoscaler aims at (rounds in flight)
    cpus_per_replica: float = 1.0  # reserved in Ray; the forward's torch threads are `threads`
    max_replicas_per_node: int | None = None  # e.g. 1 spreads replicas over nodes

    def __post_init__(self) -> None:
        if (self.autoscale_min is None) != (self.autoscale_max is None):
            raise ValueError("autoscaling needs both a minimum and a maximum number of replicas")
        if self.autoscale_min is not None and not 1 <= self.autoscale_min <= self.autoscale_max:
            raise ValueError(f"autoscaling needs 1 <= min <= max (got {self.autoscale_min}, {self.autoscale_max})")
        if self.replicas < 1 or self.cpus_per_replica < 0 or self.target_ongoing_requests <= 0:
            raise ValueError("replicas >= 1, cpus_per_replica >= 0 and target_ongoing_requests > 0")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise ValueError("max_replicas_per_node must be >= 1")

    def deployment_options(self) -> dict:
        """`Deployment.options(...)` for the verifier: replica count or autoscaling, resources, spreading."""
        opts: dict = {"ray_actor_options": {"num_cpus": self.cpus_per_replica}}
        if self.autoscale_min is not None:
            opts["autoscaling_config"] = {"min_replicas": self.autoscale_min, "max_replicas": self.autoscale_max,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas
        if self.max_replicas_per_node is not None:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        return opts


def verifier_deployment():
    """The Ray Serve deployment of the verifier (`.options(**scaling.deployment_options()).bind(...)` it)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from fedge.cloud.scheduler import ContinuousBatchScheduler

    # access logs off: one line per Verify round would cost the cloud CPU we are measuring
    @serve.deployment(max_ongoing_requests=1024,
                      request_router_config=RequestRouterConfig(request_router_class=ROUTER),
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    class VerifierReplica:
        def __init__(self, model: str, limits: Limits, threads: int, batch_wait_ms: float,
                     adapters_dir: str | None, adapter_pubkey: str | None = None, adapter_poll_s: float = 2.0):
            # session ids name this replica: the router sends their rounds back here
            shard = serve.get_replica_context().replica_id.unique_id
            self.engine = load_engine(model, limits, shard, threads, adapters_dir, adapter_pubkey, adapter_poll_s)
            self.scheduler = ContinuousBatchScheduler(self.engine, batch_wait_ms / 1000)
            self._stop = threading.Event()
            threading.Thread(target=self._reap, daemon=True).start()

        def _reap(self) -> None:
            period = max(0.5, min(10.0, self.engine.limits.idle_timeout_s / 4))
            while not self._stop.wait(period):
                self.engine.expire_idle()

        async def open_session(self, req):
            return await self.scheduler.open_session(req)

        async def verify(self, rnd):
            return await self.scheduler.verify(rnd)

        async def generate(self, session_id: str, max_new_tokens: int, stop_ids: list[int], device_id: str = ""):
            # Serve cancels this generator when the caller cancels the stream: the scheduler's
            # finally then drops the generation before its next step
            async for replies in self.scheduler.generate(session_id, max_new_tokens, stop_ids, device_id):
                yield replies

        async def close_session(self, session_id: str, device_id: str = ""):
            return self.scheduler.close_session(session_id, device_id)

        async def calibrate(self) -> dict[int, float]:
            """Measure this replica's cost curve now (a few seconds of forwards)."""
            return await asyncio.to_thread(calibrate, self.engine)

        async def info(self, replica: str = ""):
            """This replica's counters; None if `replica` (which the router routes by) names another one."""
            if replica and replica != self.engine.shard:
                return None  # the replica asked for is gone and the router sent the call elsewhere
            return dataclasses.replace(self.engine.info(), process_cpu_s=process_cpu_s())

        async def placement(self, replica: str = "") -> tuple[str, str]:
            """(this replica's id, the Ray node it runs on)."""
            import ray

            return self.engine.shard, ray.get_runtime_context().get_node_id()

    return VerifierReplica


def load_engine(model: str, limits: Limits, shard: str, threads: int, adapters_dir: str | None,
                adapter_pubkey: str | None, adapter_poll_s: float) -> VerifierEngine:
    """The replica's engine: the target model loaded in this process, its adapters, its sessions."""
    import torch

    from fedge.models import load_model, model_fingerprint, tokenizer_fingerprint

    # Ray pins OMP threads to the actor's num_cpus; `threads` (0 = all cores) decides
    torch.set_num_threads(threads or os.cpu_count() or 1)
    target, tokenizer = load_model(model)
    fingerprint = model_fingerprint(target)
    adapters = AdapterRegistry(adapters_dir, adapter_pubkey, fingerprint, poll_s=adapter_poll_s,
                               min_rescan_s=0.0)  # only versions the ingress approved get here
    return VerifierEngine(target, fingerprint, tokenizer_fingerprint(tokenizer), limits, shard, adapters=adapters)


def calibrate(engine: VerifierEngine) -> dict[int, float]:
    """Time the engine's own forward path for its cost curve (phones choose k by it, via Health);
    returns {positions: ms}. The front end asks each replica once Ray and Serve are up, not in the
    replica's constructor, where Ray's own start-up competes for the cores."""
    start = time.perf_counter()
    curve = engine.measure_costs()
    points = {p: round(s * 1000, 1) for p, s in zip(curve.positions, curve.seconds, strict=True)}
    log.warning("fedge verifier %s: %s forward, cost curve %s (positions: ms) measured in %.1f s", engine.shard,
                engine.forward_path, points, time.perf_counter() - start)
    return points


def process_cpu_s() -> float:
    """User + system CPU seconds of this process alone."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system
