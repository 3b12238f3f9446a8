"""`fedge cloud serve` as a library: start (or join) Ray, deploy the verifier replicas, serve gRPC.

    from fedge.cloud.serve import ServeConfig, serve
    serve(ServeConfig(model="smollm2-135m-instruct", port=50051))

Layout: this process starts (or joins) Ray and runs one Serve application per verifier shard
(`fedge.cloud.verifier_deployment`), each a single replica holding its sessions' KV caches in
memory and batching their rounds (`fedge.cloud.scheduler`). The gRPC ingress
(`fedge.cloud.ingress`, a grpc.aio server in this process) routes every round of a session to the
replica that holds its cache.

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
import signal
import sys
import time
from dataclasses import dataclass, field

import grpc

from fedge.cloud.adapter_registry import CHUNK_BYTES, AdapterRegistry
from fedge.cloud.engine import Limits
from fedge.cloud.ingress import AdaptersIngress, VerifierIngress
from fedge.cloud.verifier_deployment import verifier_deployment
from fedge.protocol import fedge_pb2_grpc
from fedge.protocol.tls import DeviceGate

DEFAULT_PORT = 50051


@dataclass
class ServeConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    address: str | None = None  # join this Ray cluster; None starts a local one
    replicas: int = 1
    threads: int = 0  # torch threads per replica; 0 = all cores of this machine
    batch_wait_ms: float = 30.0  # at most this long a round waits for other sessions' rounds
    max_message_bytes: int = 1 << 20
    adapters_dir: str | None = None
    adapter_pubkey: str | None = None  # Ed25519 public key (PEM) every served adapter version must verify under
    adapter_poll_s: float = 2.0  # how often the registry is rescanned for new versions
    limits: Limits = field(default_factory=Limits)
    tls_dir: str | None = None  # a `fedge certs create` directory: mutual TLS, device certificates required
    revoked_file: str | None = None  # revoked device ids, one a line (default <tls_dir>/revoked.txt)


class CloudServer:
    """Ray + Serve deployments + the gRPC server, in this process."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.server: grpc.aio.Server | None = None
        self.bound_port: int | None = None

    def start_ray(self) -> list:
        import ray
        from ray import serve

        AdapterRegistry(self.cfg.adapters_dir, self.cfg.adapter_pubkey)  # a bad key path stops us here, clearly
        if self.cfg.address is None:  # Ray's processes are ours: none may outlive this one, even on SIGKILL
            from fedge.cloud.ray_reaper import start_reaper

            start_reaper()
        ray.init(address=self.cfg.address, include_dashboard=False, log_to_driver=True,
                 logging_level="warning", configure_logging=True)
        # no HTTP proxy (the gRPC ingress is ours, and two clouds on one host would fight over its port)
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
        replica = verifier_deployment()
        cfg = self.cfg
        return [serve.run(replica.bind(cfg.model, cfg.limits, shard, cfg.threads, cfg.batch_wait_ms,
                                       cfg.adapters_dir, cfg.adapter_pubkey, cfg.adapter_poll_s),
                          name=f"fedge-verifier-{shard}", route_prefix=None)
                for shard in range(cfg.replicas)]

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        handles = await asyncio.to_thread(self.start_ray)
        # fingerprints for Health, from the weights the replicas actually loaded
        static = await handles[0].info.remote()
        registry = AdapterRegistry(self.cfg.adapters_dir, self.cfg.adapter_pubkey, static.model_fingerprint,
                                   poll_s=self.cfg.adapter_poll_s)
        await asyncio.to_thread(registry.snapshot)  # logs every skipped version at start
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.cfg.max_message_bytes),
                                               ("grpc.max_send_message_length", self.cfg.max_message_bytes),
                                               ("grpc.so_reuseport", 0)])
        gate = DeviceGate(self.cfg.tls_dir, self.cfg.revoked_file) if self.cfg.tls_dir else None
        verifier = VerifierIngress(handles, self.cfg.model, self.cfg.limits, self.cfg.max_message_bytes, static,
                                   registry, gate)
        fedge_pb2_grpc.add_VerifierServicer_to_server(verifier, self.server)
        # chunks stay under the message limit (leaving room for the chunk's other fields)
        chunk_bytes = max(1024, min(CHUNK_BYTES, self.cfg.max_message_bytes - 1024))
        fedge_pb2_grpc.add_AdaptersServicer_to_server(AdaptersIngress(registry, chunk_bytes, gate), self.server)
        self.bound_port = self._bind()
        await self.server.start()
        print(f"fedge cloud: serving {self.cfg.model} on {self.cfg.host}:{self.bound_port} "
              f"({self.cfg.replicas} replica(s), Ray {'at ' + self.cfg.address if self.cfg.address else 'local'}, "
              f"{'mutual TLS' if gate else 'plaintext: sessions bound to their unguessable ids only'})",
              flush=True)
        if ready is not None:
            ready.set()
        await self.server.wait_for_termination()

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

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)


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
