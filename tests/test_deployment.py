"""Flower's deployment engine for real: a SuperLink (TLS, SuperNode authentication) and three SuperNodes
as processes on loopback, each with its own data file, running the fedge app with `flwr run`.

One federation serves the module (starting it is the slow part); every process it started is stopped
by pid at the end. Flower 1.41 starts a fresh ClientApp process per message, so each message costs an
interpreter start on the device; the runs are kept to the fewest rounds that show each property.
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from fedge.simulations.local_federation import FederationSpec, LocalFederation

GROUPS = ("json", "email", "http")


def _device_files(root: Path) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for group in GROUPS:
        files = sorted((stdlib / group).glob("*.py"))[:3]
        text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
        path = root / f"{group}.jsonl"
        path.write_text("".join(json.dumps({"text": text[i * 500:(i + 1) * 500]}) + "\n" for i in range(8)))
        sources.append(f"jsonl:{path}")
    return sources


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    fed = LocalFederation(FederationSpec(workdir=root / "fed", devices=3, device_data=_device_files(root)))
    try:
        yield fed.start()
    finally:
        fed.stop()


def run_config(tmp: Path, **overrides) -> dict:
    base = {"fedge.model": "tiny-random-llama", "fedge.client-model": "target", "fedge.num-clients": 3,
            "fedge.clients-per-round": 3, "fedge.rank": 4, "fedge.steps": 1, "fedge.batch-size": 2,
            "fedge.seq-len": 32, "fedge.lr": 0.01, "fedge.eval-examples": 1, "fedge.noop-rounds": 0,
            "fedge.round-timeout": 240.0, "fedge.wait-nodes-s": 120.0, "fedge.checkpoint-dir": str(tmp / "ckpt")}
    return base | overrides


def records(tmp: Path) -> list[dict]:
    ckpt = tmp / "ckpt"
    return json.loads((ckpt / (ckpt / "latest").read_text().strip() / "state.json").read_text())["records"]


def test_three_devices_two_secure_rounds_publish_a_signed_adapter(federation, tmp_path):
    from fedge.cloud.adapter_registry import AdapterRegistry

    registry = tmp_path / "registry"
    config = run_config(tmp_path, **{"fedge.rounds": 2, "fedge.secagg": True,
                                     "fedge.publish-registry": str(registry),
                                     "fedge.publish-signing-key": str(federation.certs.signing_key)})
    run_id = federation.submit(config)
    assert federation.wait_run(run_id, 900) == "finished:completed"
    history = records(tmp_path)
    assert [r["round"] for r in history] == [0, 1, 2]
    for r in history[1:]:
        # every device trained, under secure aggregation: the server saw only the masked sum
        assert sorted(r["accepted"]) == ["device-0", "device-1", "device-2"] and not r["rejected"]
        assert r["secagg_survivors"] == 3 and r["aggregation_error"] is None
        # federated evaluation: each device's loss on its own held-out text
        assert set(r["client_loss"]) == {"device-0", "device-1", "device-2"}
    assert history[2]["global_loss"] != history[0]["global_loss"]
    served = AdapterRegistry(registry, public_key=federation.certs.signing_public_key).versions()
    assert len(served) == 1  # published at the end, signed with the cloud's key


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    before = {n["node-id"] for n in federation._flwr_json(["supernode", "ls"], timeout=30)["nodes"]}
    proc = federation.start_node("unregistered", data=federation.data["device-0"], max_retries=1)
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            federation.kill_node("unregistered")
        federation.nodes.pop("unregistered", None)
    log = (federation.workdir / "logs" / "unregistered.log").read_text()
    assert "Failed to activate SuperNode" in log or "could not establish" in log
    after = federation._flwr_json(["supernode", "ls"], timeout=30)["nodes"]
    assert {n["node-id"] for n in after} == before
    assert all(n["status"] == "online" for n in after)


@pytest.mark.xfail(strict=True, reason="open: the ServerApp run ends finished:failed after a SuperNode is SIGKILLed "
                   "mid-round (cause not yet found; see the run's `flwr log`)")
def test_a_supernode_killed_during_a_round_the_round_completes_with_the_others(federation, tmp_path):
    config = run_config(tmp_path, **{"fedge.rounds": 1, "fedge.round-timeout": 90.0})
    log = federation.workdir / "logs" / "device-2.log"
    seen = log.read_text().count("Receiving: train")
    run_id = federation.submit(config)
    deadline = time.time() + 240
    while log.read_text().count("Receiving: train") == seen:  # device-2 got round 1's training message
        assert time.time() < deadline, "device-2 never got a training message"
        time.sleep(0.2)
    federation.kill_node("device-2")  # SIGKILL, with the processes it started
    try:
        assert federation.wait_run(run_id, 900) == "finished:completed"
    finally:
        federation.start_node("device-2")
    history = records(tmp_path)
    last = history[-1]
    assert last["round"] == 1
    assert sorted(last["accepted"]) == ["device-0", "device-1"]
    assert [r["client"] for r in last["rejected"]] == ["device-2"]
    assert last["global_loss"] == last["global_loss"]  # the survivors' evaluation is a number


def test_federation_up_prints_the_flwr_run_line_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import sys

    data = _device_files(tmp_path)
    cmd = [sys.executable, "-m", "fedge.cli", "federation", "up", "--devices", "2", "--device-data",
           ",".join(data[:2]), "--workdir", str(tmp_path / "up")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 180
        while not any("flwr run" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            lines.append(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert any("fedge-local" in line and "FLWR_HOME=" in line for line in lines)
    import psutil

    workdir = str(tmp_path / "up")
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if workdir in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers
