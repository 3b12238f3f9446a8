"""`fedge simulate federated --ray-address ADDR` runs on an existing Ray cluster: a real local head
(`ray start --head --block`, its own ports and temp dir, stopped by its process group), a one-round
tiny-model run attached to it, and the cluster's own job and actor tables showing the run was there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from fedge.cli import main
from fedge.simulations.local_federation import free_port


@pytest.fixture()
def ray_head():
    """A Ray head with 2 CPUs on loopback ports of its own; everything it started dies with its group."""
    import ray

    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    ports = {f"--{name}": free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port")}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
           "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats",
           *(f"{k}={v}" for k, v in ports.items())]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:  # up once a driver can connect
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                break
            except (ConnectionError, RuntimeError):
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        ray.shutdown()
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` and every process it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_run_attached_to_an_existing_ray_cluster(ray_head, tmp_path):
    import ray
    from ray._private import state

    path = tmp_path / "corpus.jsonl"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with path.open("w") as f:
        for group in ("json", "email"):
            text = (stdlib / group / "__init__.py").read_text(encoding="utf-8", errors="replace")
            for i in range(6):
                f.write(json.dumps({"text": text[i * 400:(i + 1) * 400], "group": group}) + "\n")
    out = tmp_path / "run"
    rc = main(["simulate", "federated", "--model", "tiny-random-llama", "--data", f"jsonl:{path}",
               "--clients", "2", "--clients-per-round", "2", "--rounds", "1", "--steps", "1", "--seq-len", "32",
               "--rank", "2", "--noop-rounds", "0", "--no-baselines", "--ray-address", ray_head, "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "federated.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1] and len(report["rounds"][1]["accepted"]) == 2
    assert report["config"]["ray_address"] == ray_head
    ray.init(address=ray_head, logging_level="ERROR", log_to_driver=False)
    try:
        # this process's finished drivers: the fixture's readiness check and the run
        jobs = {j["JobID"] for j in state.jobs() if j["DriverPid"] == os.getpid() and j["IsDead"]}
        actors = [a for a in state.actors().values() if a["JobID"] in jobs]
        assert len({a["JobID"] for a in actors}) == 1, (state.jobs(), actors)  # the run's job, on this cluster
        assert all(a["ActorClassName"] == "ClientAppActor" for a in actors), actors  # its Flower clients
    finally:
        ray.shutdown()
