"""`fedge cloud serve` as a library: start (or join) Ray, deploy the verifier, serve gRPC.

    from fedge.cloud.serve import ServeConfig, serve
    serve(ServeConfig(model="smollm2-135m-instruct", port=50051))

Layout: this process starts (or joins) Ray and runs the verifier as one Serve deployment
(`fedge.cloud.verifier_deployment`: `num_replicas` or autoscaling, CPUs reserved per replica),
each replica holding its sessions' KV caches in memory and batching their rounds
(`fedge.cloud.scheduler`). The gRPC front end (`FrontEnd`: the `fedge.cloud.ingress` servicers and
the standard `grpc.health.v1` service, a grpc.aio server in this process) calls the deployment
through one handle whose request router takes every round of a session to the replica that holds
its cache (`fedge.cloud.session_router`). The same front end runs inside Serve when the
application comes from `fedge.cloud.serve_app:build_app` (`serve run`, a Serve config file).

Limits, each refused with its own status code: sessions per replica (RESOURCE_EXHAUSTED), draft
length and malformed input (INVALID_ARGUMENT), message size (RESOURCE_EXHAUSTED, enforced by gRPC),
idle sessions expire (their next round gets NOT_FOUND), unknown sessions (NOT_FOUND), tokenizer or
base-model mismatch (FAILED_PRECONDITION), a round out of order (ABORTED). With `tls_dir` every
call needs a device certificate from the CA (mutual TLS) whose id is not revoked; a session belongs
to the device that opened it (another device gets PERMISSION_DENIED) and each device has its own
session and token quota (RESOURCE_EXHAUSTED for that device only). Without TLS a session is bound
only to its 128-bit random id. A reaper process kills Ray's processes if this one dies uncleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from fedge.cloud.adapter_registry import CHUNK_BYTES, AdapterRegistry
from fedge.cloud.engine import Limits
from fedge.cloud.ingress import AdaptersIngress, VerifierIngress, live_replicas
from fedge.cloud.verifier_deployment import VERIFIER_APP, Scaling, verifier_deployment
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.protocol.tls import DeviceGate

DEFAULT_PORT = 50051
HEALTH_PERIOD_S = 1.0  # how often the grpc.health.v1 status is refreshed from the replicas
SERVICES = ("", fedge_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name)  # "" = the server as a whole


@dataclass
class ServeConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    address: str | None = None  # join this Ray cluster; None starts a local one
    scaling: Scaling = field(default_factory=Scaling)
    threads: int = 0  # torch threads per replica; 0 = all cores of this machine
    batch_wait_ms: float = 30.0  # at most this long a round waits for other sessions' rounds
    max_message_bytes: int = 1 << 20
    adapters_dir: str | None = None
    adapter_pubkey: str | None = None  # Ed25519 public key (PEM) every served adapter version must verify under
    adapter_poll_s: float = 2.0  # how often the registry is rescanned for new versions
    limits: Limits = field(default_factory=Limits)
    tls_dir: str | None = None  # a `fedge certs create` directory: mutual TLS, device certificates required
    revoked_file: str | None = None  # revoked device ids, one a line (default <tls_dir>/revoked.txt)


def verifier_app(cfg: ServeConfig):
    """The verifier deployment, scaled and bound to its arguments (a Serve `Application`)."""
    replica = verifier_deployment().options(**cfg.scaling.deployment_options())
    return replica.bind(cfg.model, cfg.limits, cfg.threads, cfg.batch_wait_ms, cfg.adapters_dir,
                        cfg.adapter_pubkey, cfg.adapter_poll_s)


def live_replica_ids(app_name: str) -> Callable[[], list[str]]:
    return lambda: [r.replica_id for r in live_replicas(app_name)]


class FrontEnd:
    """The gRPC server in front of the verifier deployment: Verifier, Adapters and grpc.health.v1.

    Health says SERVING while at least one replica answers, NOT_SERVING when none does (checked
    every `HEALTH_PERIOD_S`), for the whole server ("") and for the `fedge.Verifier` service."""

    def __init__(self, cfg: ServeConfig, handle, replicas: Callable[[], list[str]] | None = None):
        self.cfg = cfg
        self.handle = handle
        self.replicas = replicas
        self.server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        self.bound_port: int | None = None
        self.verifier: VerifierIngress | None = None
        self._watch: asyncio.Task | None = None

    async def start(self) -> int:
        cfg = self.cfg
        # each replica's cost curve, measured now that Ray and Serve are up (new calls round-robin)
        for _ in range(cfg.scaling.autoscale_min or cfg.scaling.replicas):
            await self.handle.calibrate.remote()
        static = await self.handle.info.remote()  # fingerprints for Health, from the weights a replica loaded
        registry = AdapterRegistry(cfg.adapters_dir, cfg.adapter_pubkey, static.model_fingerprint,
                                   poll_s=cfg.adapter_poll_s)
        await asyncio.to_thread(registry.snapshot)  # logs every skipped version at start
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                                               ("grpc.max_send_message_length", cfg.max_message_bytes),
                                               ("grpc.so_reuseport", 0)])
        gate = DeviceGate(cfg.tls_dir, cfg.revoked_file) if cfg.tls_dir else None
        self.verifier = VerifierIngress(self.handle, cfg.model, cfg.limits, cfg.max_message_bytes, static,
                                        registry, gate, self.replicas)
        fedge_pb2_grpc.add_VerifierServicer_to_server(self.verifier, self.server)
        # chunks stay under the message limit (leaving room for the chunk's other fields)
        chunk_bytes = max(1024, min(CHUNK_BYTES, cfg.max_message_bytes - 1024))
        fedge_pb2_grpc.add_AdaptersServicer_to_server(AdaptersIngress(registry, chunk_bytes, gate), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.bound_port = self._bind()
        await self._refresh_health()
        await self.server.start()
        self._watch = asyncio.ensure_future(self._watch_health())
        return self.bound_port

    async def _refresh_health(self) -> None:
        try:
            alive = bool(await asyncio.wait_for(self.verifier.replica_infos(), timeout=5 * HEALTH_PERIOD_S))
        except TimeoutError:
            alive = False
        status = health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in SERVICES:
            await self.health.set(service, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_PERIOD_S)
            await self._refresh_health()

    def _bind(self) -> int:
        address = f"{self.cfg.host}:{self.cfg.port}"
        if self.cfg.tls_dir:
            from fedge.protocol.tls import server_credentials

            port = self.server.add_secure_port(address, server_credentials(self.cfg.tls_dir, require_client_auth=True))
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"could not bind {address}")
        return port

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace=grace_s)


class CloudServer:
    """Ray + the Serve verifier deployment + the gRPC front end, in this process."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.front: FrontEnd | None = None

    def start_ray(self):
        import ray
        from ray import serve

        AdapterRegistry(self.cfg.adapters_dir, self.cfg.adapter_pubkey)  # a bad key path stops us here, clearly
        if self.cfg.address is None:  # Ray's processes are ours: none may outlive this one, even on SIGKILL
            from fedge.cloud.ray_reaper import start_reaper

            start_reaper()
        ray.init(address=self.cfg.address, include_dashboard=False, log_to_driver=True,
                 logging_level="warning", configure_logging=True)
        _check_fits(self.cfg.scaling)
        # no HTTP proxy (the gRPC ingress is ours, and two clouds on one host would fight over its port)
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
        return serve.run(verifier_app(self.cfg), name=VERIFIER_APP, route_prefix=None)

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        handle = await asyncio.to_thread(self.start_ray)
        self.front = FrontEnd(self.cfg, handle, live_replica_ids(VERIFIER_APP))
        port = await self.front.start()
        sc = self.cfg.scaling
        count = f"{sc.autoscale_min}-{sc.autoscale_max} (autoscaling)" if sc.autoscale_min else str(sc.replicas)
        print(f"fedge cloud: serving {self.cfg.model} on {self.cfg.host}:{port} "
              f"({count} replica(s), Ray {'at ' + self.cfg.address if self.cfg.address else 'local'}, "
              f"{'mutual TLS' if self.cfg.tls_dir else 'plaintext: sessions bound to their unguessable ids only'})",
              flush=True)
        if ready is not None:
            ready.set()
        await self.front.server.wait_for_termination()

    async def stop(self) -> None:
        if self.front is not None:
            await self.front.stop()


def _check_fits(scaling: Scaling) -> None:
    """Refuse, clearly, a replica count whose CPU reservations the cluster can never hold (Serve would wait)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    need = (scaling.autoscale_min or scaling.replicas) * scaling.cpus_per_replica
    if need > cpus:
        raise RuntimeError(f"{scaling.autoscale_min or scaling.replicas} replica(s) x {scaling.cpus_per_replica} CPU "
                           f"need {need:g} CPUs; the Ray cluster has {cpus:g} (lower --cpus-per-replica or --replicas)")


def serve(cfg: ServeConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit status (1 when it could not start)."""
    server = CloudServer(cfg)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        await server.serve()

    start = time.perf_counter()
    try:
        asyncio.run(run())
    except RuntimeError as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # shutting down: nothing left to report to
            pass
    print(f"fedge cloud: stopped after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
