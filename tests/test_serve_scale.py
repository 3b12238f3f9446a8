"""The verifier at scale on Ray Serve: `serve run` of the application builder from a Serve config file
(two replicas, session-affine routing, grpc.health.v1), and a multi-node cluster that loses a node
mid-generation (`ray.cluster_utils.Cluster`: a head and two worker nodes on this machine)."""

from __future__ import annotations

import copy
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
from fedge.simulations.local_federation import free_port
from fedge.speculative import autoregressive_generate

ROOT = Path(__file__).resolve().parents[1]
VERIFIER = fedge_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name
PROMPTS = ["def fibonacci(n):", "The capital of France is", "for i in range(10):", "SELECT name FROM"]


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


def test_scaling_becomes_serve_deployment_options_and_builder_args_are_checked():
    from fedge.cloud.serve_app import config_from_args
    from fedge.cloud.verifier_deployment import Scaling, verifier_deployment

    auto = Scaling(autoscale_min=1, autoscale_max=3, target_ongoing_requests=4, cpus_per_replica=2,
                   max_replicas_per_node=1)
    deployment = verifier_deployment().options(**auto.deployment_options())  # Serve validates the options
    assert deployment.ray_actor_options["num_cpus"] == 2
    assert deployment._replica_config.max_replicas_per_node == 1
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 4)
    assert verifier_deployment().options(**Scaling(replicas=3).deployment_options()).num_replicas == 3
    with pytest.raises(ValueError, match="both"):
        Scaling(autoscale_min=2)
    with pytest.raises(ValueError, match="min <= max"):
        Scaling(autoscale_min=3, autoscale_max=2)
    cfg = config_from_args({"model": "tiny-random-llama", "port": "0", "autoscale_min": "1", "autoscale_max": "2",
                            "max_sessions": "4", "adapters_dir": "none"})
    assert (cfg.port, cfg.scaling.autoscale_max, cfg.limits.max_sessions, cfg.adapters_dir) == (0, 2, 4, None)
    with pytest.raises(ValueError, match="unknown argument 'replica'"):
        config_from_args({"replica": "2"})
    with pytest.raises(ValueError, match="not a valid int"):
        config_from_args({"port": "http"})


def test_serve_run_config_file_two_replicas_affinity_and_grpc_health(tmp_path, tiny):
    port = free_port()
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
        assert _wait_replicas(server, 2, 120) == 2  # the ingress serves once one replica is up; wait for both
        with grpc.insecure_channel(server) as channel:
            stub = fedge_pb2_grpc.VerifierStub(channel)
            sessions = [_open(stub, tiny) for _ in range(4)]
            owners = {s.split("-")[0] for s in sessions}
            assert len(owners) == 2, sessions  # new sessions spread over both replicas
            # every round reaches the replica holding the session's cache (a wrong one answers NOT_FOUND)
            for position in range(3, 9):
                for sid in sessions:
                    stub.Verify(fedge_pb2.VerifyRequest(session_id=sid, position=position), timeout=30)
            assert stub.Health(fedge_pb2.HealthRequest(), timeout=30).sessions == 4
        # no verifier replica alive: NOT_SERVING (until Serve has restarted one)
        replicas = [p for p in tree(proc.pid) if "VerifierReplica" in " ".join(_cmdline(p))]
        assert len(replicas) == 2
        stop_processes(replicas, hard=True)
        _wait_health(server, health_pb2.HealthCheckResponse.NOT_SERVING, 60, proc)
    finally:
        family = tree(proc.pid)
        stop_tree(proc.pid)
        assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait_replicas(server: str, replicas: int, timeout_s: float) -> int:
    """Until the ingress reports at least `replicas` live replicas; returns how many it reports."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(server) as channel:
        stub = fedge_pb2_grpc.VerifierStub(channel)
        while (seen := stub.Health(fedge_pb2.HealthRequest(), timeout=30).replicas) < replicas:
            assert time.monotonic() < deadline, f"the ingress never saw {replicas} replicas"
            time.sleep(0.5)
        return seen


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _start_cloud(port: int, address: str) -> subprocess.Popen:
    """`fedge cloud serve` joining the cluster: one replica per worker node."""
    from fedge.simulations.phones import start_cloud

    return start_cloud("tiny-random-llama", port, "--address", address, "--replicas", "2",
                       "--max-replicas-per-node", "1", "--cpus-per-replica", "1", "--threads", "1",
                       "--max-draft-len", "8", "--batch-wait-ms", "0", timeout_s=240)


def _placements(address: str) -> dict[str, str]:
    """replica actor id -> node id of every live verifier replica, from the cluster's actor table (GCS).

    Read from the table, not by calling the replicas: a call without a session may go to any replica,
    so a handful of calls need not reach both."""
    import ray
    from ray._private import state

    ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        return {actor_id: info["Address"]["NodeID"] for actor_id, info in state.actors().items()
                if info.get("ActorClassName", "").startswith("ServeReplica:fedge-verifier:")
                and info.get("State") == "ALIVE"}
    finally:
        ray.shutdown()


def _phones(server: str, prompts: list[list[int]], tiny, draft, on_progress) -> list:
    """One edge session per prompt, concurrently; `on_progress(verified counts)` after each verified span."""
    results: list = [None] * len(prompts)
    errors: list[BaseException] = []
    verified = [0] * len(prompts)

    def phone(i: int) -> None:
        def on_tokens(kind: str, tokens: list[int]) -> None:
            if kind == "verified":
                verified[i] += len(tokens)
                on_progress(verified)

        client = _client(server, tiny, draft)
        try:
            results[i] = client.generate_ids(prompts[i], 40, on_tokens=on_tokens)
        except BaseException as exc:  # reported below, with the others' results
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=phone, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def _ray_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "ray" in " ".join(_cmdline(p))]


def test_a_node_lost_mid_generation_every_session_finishes_exactly(tiny, noisy_draft):
    from ray.cluster_utils import Cluster

    model, tok = tiny
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head holds no replica
    proc = None
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        port = free_port()
        proc = _start_cloud(port, cluster.address)
        placed = _placements(cluster.address)
        assert len(placed) == 2 and set(placed.values()) == {w.node_id for w in workers}, placed  # one per worker
        _wait_replicas(f"127.0.0.1:{port}", 2, 120)  # the ingress's router sees both (GCS may know them first)
        removed, gone, lock = threading.Event(), threading.Event(), threading.Lock()

        def remove_node() -> None:
            cluster.remove_node(workers[0], False)
            gone.set()

        def remove_when_all_are_mid_generation(verified: list[int]) -> None:
            with lock:
                first = min(verified) >= 6 and not removed.is_set()
                if first:
                    removed.set()
            if first:
                threading.Thread(target=remove_node, daemon=True).start()
            if removed.is_set():  # every phone waits mid-generation until the node is gone
                assert gone.wait(120), "the node was not removed within 120 s"

        prompts = [list(tok(p)["input_ids"]) for p in PROMPTS]
        results = _phones(f"127.0.0.1:{port}", prompts, tiny, noisy_draft, remove_when_all_are_mid_generation)
        assert removed.is_set(), "the node was never removed"
        for ids, result in zip(prompts, results, strict=True):
            assert result.fully_verified
            assert result.token_ids == autoregressive_generate(model, ids, 40)  # identical, no token lost
        reopened = [r.stats.reopened for r in results]
        # sessions of the lost replica reopened on the survivor; the survivor's own never moved
        assert any(n >= 1 for n in reopened) and any(n == 0 for n in reopened), reopened
    finally:
        family = tree(proc.pid) if proc is not None else []
        if proc is not None:
            stop_tree(proc.pid)
        ours = _ray_processes()
        cluster.shutdown()
        stop_processes([p for p in ours if p.is_running()], grace_s=10)
        left = [p for p in family + ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [(p.pid, _cmdline(p)[:1]) for p in left]
