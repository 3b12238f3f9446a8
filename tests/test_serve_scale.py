"""The verifier at scale on Ray Serve: `serve run` of the application builder from a Serve config file
(two replicas, session-affine routing, grpc.health.v1), and a multi-node cluster that loses a node
mid-generation (`ray.cluster_utils.Cluster`: a head and two worker nodes on this machine)."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedge.edge.client import EdgeClient, EdgeConfig
from fedge.models import model_fingerprint, tokenizer_fingerprint
from fedge.processes import stop_processes, stop_tree, tree
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.speculative import autoregressive_generate

ROOT = Path(__file__).resolve().parents[1]
VERIFIER = fedge_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name
PROMPTS = ["def fibonacci(n):", "The capital of France is", "for i in range(10):", "SELECT name FROM"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(server: str, service: str = "") -> int | None:
    with grpc.insecure_channel(server) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=5).status
        except grpc.RpcError:
            return None


def _wait_health(server: str, status: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while _health(server) != status:
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise AssertionError(f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def noisy_draft(tiny):
    """A draft that agrees with the target often but not always (so rounds see rejections)."""
    draft = copy.deepcopy(tiny[0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.005)
    return draft


def _client(server: str, tiny, draft) -> EdgeClient:
    model, tok = tiny
    cfg = EdgeConfig(server=server, fixed_k=2, backoff_initial_s=0.2, backoff_max_s=1.0, reconcile_wait_s=120.0,
                     rpc_timeout_s=10.0)
    return EdgeClient(draft, model_fingerprint(model), tokenizer_fingerprint(tok), cfg)


def _open(stub, tiny) -> str:
    model, tok = tiny
    return stub.OpenSession(fedge_pb2.OpenSessionRequest(
        tokenizer_fingerprint=tokenizer_fingerprint(tok), model_fingerprint=model_fingerprint(model),
        prompt_ids=[1, 2, 3]), timeout=30).session_id


def test_serve_run_config_file_two_replicas_affinity_and_grpc_health(tmp_path, tiny):
    port = _free_port()
    server = f"127.0.0.1:{port}"
    config = tmp_path / "fedge-serve.yaml"  # what `serve build fedge.cloud.serve_app:build_app` starts from
    config.write_text(f"""proxy_location: Disabled
applications:
  - name: fedge-scale
    route_prefix: null
    import_path: fedge.cloud.serve_app:build_app
    args:
      model: tiny-random-llama
      port: {port}
      replicas: 2
      cpus_per_replica: 0.5
      threads: 1
      batch_wait_ms: 0
      max_draft_len: 8
""")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", str(config)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_health(server, health_pb2.HealthCheckResponse.SERVING, 240, proc)
        assert _health(server, VERIFIER) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(server) as channel:
            stub = fedge_pb2_grpc.VerifierStub(channel)
            deadline = time.monotonic() + 120  # the ingress serves once one replica is up; wait for both
            while stub.Health(fedge_pb2.HealthRequest(), timeout=30).replicas < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert stub.Health(fedge_pb2.HealthRequest(), timeout=30).replicas == 2
            sessions = [_open(stub, tiny) for _ in range(4)]
            owners = {s.split("-")[0] for s in sessions}
            assert len(owners) == 2, sessions  # new sessions spread over both replicas
            # every round reaches the replica holding the session's cache (a wrong one answers NOT_FOUND)
            for position in range(3, 9):
                for sid in sessions:
                    stub.Verify(fedge_pb2.VerifyRequest(session_id=sid, position=position), timeout=30)
            assert stub.Health(fedge_pb2.HealthRequest(), timeout=30).sessions == 4
        # no verifier replica alive: NOT_SERVING; Serve restarts them: SERVING again
        replicas = [p for p in tree(proc.pid) if "VerifierReplica" in " ".join(_cmdline(p))]
        assert len(replicas) == 2
        stop_processes(replicas, hard=True)
        _wait_health(server, health_pb2.HealthCheckResponse.NOT_SERVING, 60, proc)
        _wait_health(server, health_pb2.HealthCheckResponse.SERVING, 180, proc)
    finally:
        family = tree(proc.pid)
        stop_tree(proc.pid)
        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []
