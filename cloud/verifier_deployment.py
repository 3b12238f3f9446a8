"""The verifier replica as a Ray Serve deployment: thin glue over the engine and the scheduler.

One replica holds one target model, its sessions' KV caches (`VerifierEngine`) and a continuous-
batching scheduler (`ContinuousBatchScheduler`); this module only loads the model in the replica
process, expires idle sessions, and exposes the scheduler's methods to Ray. Only typed dataclasses
cross the Ray boundary (`OpenRequest`, `Round` in; `OpenedSession`, `RoundReply`, `Refusal`,
`ReplicaInfo` out). The class is defined lazily: importing ray is slow, and tests and the edge
never need it.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from fedge.cloud.adapter_registry import AdapterRegistry
from fedge.cloud.engine import Limits, VerifierEngine


def verifier_deployment():
    """The Ray Serve deployment class of one verifier replica (`.bind(limits, ...)` it)."""
    from ray import serve

    from fedge.cloud.scheduler import ContinuousBatchScheduler

    # access logs off: one line per Verify round would cost the cloud CPU we are measuring
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    class VerifierReplica:
        def __init__(self, model: str, limits: Limits, shard: int, threads: int, batch_wait_ms: float,
                     adapters_dir: str | None, adapter_pubkey: str | None = None, adapter_poll_s: float = 2.0):
            import torch

            from fedge.models import load_model, model_fingerprint, tokenizer_fingerprint

            # Ray pins OMP threads to the actor's num_cpus (0 here); the forward wants the cores
            torch.set_num_threads(threads or os.cpu_count() or 1)
            target, tokenizer = load_model(model)
            fingerprint = model_fingerprint(target)
            adapters = AdapterRegistry(adapters_dir, adapter_pubkey, fingerprint, poll_s=adapter_poll_s,
                                       min_rescan_s=0.0)  # only versions the ingress approved get here
            self.engine = VerifierEngine(target, fingerprint, tokenizer_fingerprint(tokenizer), limits, shard,
                                         adapters=adapters)
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

        async def info(self):
            return dataclasses.replace(self.engine.info(), process_cpu_s=process_cpu_s())

    return VerifierReplica


def process_cpu_s() -> float:
    """User + system CPU seconds of this process alone."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system
