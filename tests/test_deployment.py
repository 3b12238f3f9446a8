"""Flower's deployment engine for real: a SuperLink (TLS, SuperNode authentication) and three SuperNodes
as processes on loopback, each with its own data file, running the fedge app with `flwr run`, and a
`fedge cloud serve` that serves what the run publishes.

One federation serves the module (starting it is the slow part); every process it started is stopped
by pid at the end. The devices run what a deployment should: fedge's SuperNode entry point (short
polls, a 10 s heartbeat so that a dead device is noticed in 20 s) and the warm SuperExec with the tiny
model and the device's data preloaded; the runs are kept to the fewest rounds that show each property.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from fedge.simulations.local_federation import FederationSpec, LocalFederation, free_port, write_app

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
    # each device's SuperExec preloads the tiny model the runs train; a 10 s heartbeat: a dead device is
    # noticed in 20 s, not Flower's 60
    fed = LocalFederation(FederationSpec(workdir=root / "fed", devices=3, device_data=_device_files(root),
                                         preload_model="tiny-random-llama", preload_client_model="target",
                                         heartbeat_interval=10))
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


def final_adapter(tmp: Path) -> dict:
    from safetensors.torch import load_file

    ckpt = tmp / "ckpt"
    return load_file(str(ckpt / (ckpt / "latest").read_text().strip() / "adapter.safetensors"))


def finished(federation: LocalFederation, run_id: int, timeout: float = 900) -> str:
    status = federation.wait_run(run_id, timeout)
    assert status == "finished:completed", federation.run_log(run_id)[-3000:]
    return status


class Cloud:
    """`fedge cloud serve` of the tiny model over mutual TLS, serving an (empty) adapter registry; it
    starts in the background (`wait()` returns once it serves) so that it boots while the federation does."""

    def __init__(self, root: Path) -> None:
        from fedge.protocol.tls import create_certificates

        self.certs = create_certificates(root / "certs", devices=["device-0"])
        self.registry, self.port = root / "registry", free_port()
        self.registry.mkdir()
        self.address = f"localhost:{self.port}"
        self.fetch_options = {"tls_dir": str(self.certs.root), "device_id": "device-0"}
        self.proc: subprocess.Popen | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, daemon=True)
        self._thread.start()

    def _start(self) -> None:
        from fedge.simulations.phones import start_cloud

        try:
            self.proc = start_cloud("tiny-random-llama", self.port, "--tls-dir", str(self.certs.root), "--adapters",
                                    str(self.registry), "--adapter-pubkey", str(self.certs.signing_public_key),
                                    "--threads", "1")
        except BaseException as exc:  # noqa: BLE001 - raised by wait()
            self._error = exc

    def wait(self) -> Cloud:
        self._thread.join(600)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        from fedge.simulations.phones import stop_cloud

        self._thread.join(600)
        if self.proc is not None:
            stop_cloud(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    started = Cloud(tmp_path_factory.mktemp("cloud"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def secure_run(cloud, federation, tmp_path_factory):
    """Two rounds under secure aggregation, published at the end into the registry that the cloud, running
    since before the run, serves; a phone then fetches it (also the uninterrupted run that the resume test
    must end the same as). The cloud stops once fetched (Ray's idle load would slow the other tests)."""
    from fedge.edge.adapter_fetch import AdapterFetchError, fetch_adapter

    tmp = tmp_path_factory.mktemp("secure")
    served = cloud.wait()
    # the ServerApp signs with the key whose public half the cloud checks
    config = run_config(tmp, **{"fedge.rounds": 2, "fedge.secagg": True,
                                "fedge.publish-registry": str(served.registry),
                                "fedge.publish-signing-key": str(served.certs.signing_key)})
    with pytest.raises(AdapterFetchError):  # nothing published yet
        fetch_adapter(served.address, "", tmp / "before", served.certs.signing_public_key, **served.fetch_options)
    finished(federation, federation.submit(config))
    running = served.proc.poll() is None  # the same process, never restarted
    fetched = fetch_adapter(served.address, "", tmp / "phone", served.certs.signing_public_key,
                            **served.fetch_options)
    cloud.stop()
    return tmp, config, {"registry": served.registry, "public_key": served.certs.signing_public_key,
                         "running": running, "fetched": fetched}


def test_three_devices_two_secure_rounds_publish_a_signed_adapter_served_without_restart(secure_run):
    from fedge.cloud.adapter_registry import AdapterRegistry

    tmp, _, served = secure_run
    history = records(tmp)
    assert [r["round"] for r in history] == [0, 1, 2]
    for r in history[1:]:
        # every device trained, under secure aggregation: the server saw only the masked sum
        assert sorted(r["accepted"]) == ["device-0", "device-1", "device-2"] and not r["rejected"]
        assert r["secagg_survivors"] == 3 and r["aggregation_error"] is None
        # federated evaluation: each device's loss on its own held-out text
        assert set(r["client_loss"]) == {"device-0", "device-1", "device-2"}
    assert history[2]["global_loss"] != history[0]["global_loss"]
    registry = served["registry"]
    assert len(AdapterRegistry(registry, public_key=served["public_key"]).versions()) == 1  # signed, at the end
    # the cloud that was running before the run served it to a device over mutual TLS (signature checked)
    version, files = served["fetched"]
    assert served["running"] and version == "v000001" and "adapter_model.safetensors" in files
    assert (tmp / "phone" / version / "adapter_model.safetensors").read_bytes() == \
        (registry / version / "adapter_model.safetensors").read_bytes()


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    before = set(federation.node_status())
    proc = federation.start_node("unregistered", data=federation.data["device-0"], max_retries=1)
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        federation.kill_node("unregistered")  # by pid, with its SuperExec
    log = (federation.workdir / "logs" / "unregistered.log").read_text()
    assert "Failed to activate SuperNode" in log or "could not establish" in log
    status = federation.node_status()
    assert set(status) == before  # the refused key got no node
    assert all(status[federation.node_ids[d]] == "online" for d in federation.device_ids())


def _wait_for(log: Path, text: str, count: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while log.read_text().count(text) < count:
        assert time.time() < deadline, f"{log.name}: fewer than {count} {text!r}"
        time.sleep(0.1)


def test_a_supernode_killed_during_a_secure_round_is_recovered_and_the_run_goes_on(federation, tmp_path):
    """Four devices (t = 3): one is SIGKILLed after sharing its key, while it trains for the masking
    stage; unmasking recovers its mask, the round completes with the other three, and round 2 runs
    without it. Once the SuperLink has let its session lapse (two missed heartbeats) it comes back."""
    if "spare" not in federation.node_ids:
        federation.register("spare")
    federation.start_node("spare", data=federation.data["device-0"])
    config = run_config(tmp_path, **{"fedge.rounds": 2, "fedge.secagg": True, "fedge.num-clients": 4,
                                     "fedge.min-nodes": 4, "fedge.clients-per-round": 4, "fedge.round-timeout": 60.0})
    log = federation.workdir / "logs" / "device-2.log"
    seen = log.read_text().count("Receiving: train")
    try:
        run_id = federation.submit(config)
        # advertise keys, share keys, then the masking stage's train message: kill while it trains
        _wait_for(log, "Receiving: train", seen + 3, 300)
        federation.kill_node("device-2")  # SIGKILL, with the ClientApp process it started
        finished(federation, run_id)
    finally:
        federation.kill_node("spare", signal.SIGTERM)  # leaves at once (a clean exit deactivates it)
        if "device-2" not in federation.nodes:  # back for the next tests, once its old session has lapsed
            federation.restart_node("device-2")
            federation.wait_node_status("device-2", "online", 120)
    assert federation.node_status()[federation.node_ids["spare"]] == "offline"
    one, two = records(tmp_path)[1:]
    assert sorted(one["accepted"]) == ["device-0", "device-1", "spare"]
    assert [r["client"] for r in one["rejected"]] == ["device-2"]
    assert one["secagg_survivors"] == 3 and one["secagg_dropped"] == 1
    assert one["global_loss"] == one["global_loss"]  # the survivors' evaluation is a number
    assert sorted(two["accepted"]) == ["device-0", "device-1", "spare"]
    assert {r["client"] for r in two["rejected"]} <= {"device-2"}


def test_superlink_killed_mid_run_resumes_to_the_same_adapter(federation, secure_run, tmp_path):
    import torch

    reference_tmp, reference, _ = secure_run
    config = reference | {"fedge.checkpoint-dir": str(tmp_path / "ckpt"), "fedge.publish-registry": ""}
    run_id = federation.submit(config)
    latest = tmp_path / "ckpt" / "latest"
    deadline, check_at = time.time() + 600, time.time() + 30
    while not (latest.exists() and latest.read_text().strip() == "round-0001"):
        assert time.time() < deadline, federation.run_log(run_id)[-3000:]
        if time.time() > check_at:  # a `flwr ls` is a process start: not every poll
            assert not federation.run_status(run_id).startswith("finished"), federation.run_log(run_id)[-3000:]
            check_at = time.time() + 30
        time.sleep(0.1)
    federation.restart_superlink()  # SIGKILL: the SuperLink and the ServerApp, in round 2
    assert latest.read_text().strip() == "round-0001"
    # the operator ends the dead run (else devices wait on its messages until the SuperLink expires it, ~1 min)
    federation.stop_run(run_id)
    finished(federation, federation.submit(config | {"fedge.resume": True}))
    assert [r["round"] for r in records(tmp_path)] == [0, 1, 2]
    resumed, uninterrupted = final_adapter(tmp_path), final_adapter(reference_tmp)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_bad_updates_are_left_out_with_their_reason(federation, tmp_path):
    """NaN, a wrong shape and a stale round's update, sent by real SuperNodes running the production
    ClientApp wrapped in the fault mod (a second app folder, the same devices)."""
    app = write_app(tmp_path / "faulty_app", clientapp="fedge.simulations.faults:app")
    assert "fedge.simulations.faults:app" in (app / "pyproject.toml").read_text()
    config = run_config(tmp_path, **{"fedge.rounds": 2, "fedge.secagg": False,
                                     "fedge.faults": "device-0:nan@1,device-1:shape@1,device-2:stale@2"})
    finished(federation, federation.submit(config, app_dir=app))
    one, two = records(tmp_path)[1:]
    assert one["accepted"] == ["device-2"] and sorted(two["accepted"]) == ["device-0", "device-1"]
    reasons = {r["client"]: r["reason"] for r in one["rejected"] + two["rejected"]}
    assert set(reasons) == {"device-0", "device-1", "device-2"}
    assert "non-finite" in reasons["device-0"]
    assert "wrong shape" in reasons["device-1"]
    assert "stale update" in reasons["device-2"]


def test_federation_up_prints_the_flwr_run_line_and_stops_on_sigterm(tmp_path):
    import os
    import sys

    data = _device_files(tmp_path)
    cmd = [sys.executable, "-m", "fedge.cli", "federation", "up", "--devices", "2", "--device-data",
           ",".join(data[:2]), "--workdir", str(tmp_path / "up"), "--preload-model", "tiny-random-llama",
           "--preload-client-model", "target"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 180
        while not any("flwr run" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)
            lines.append(proc.stdout.readline())
        for device in ("device-0", "device-1"):  # its warm SuperExec loads the model before any message
            _wait_for(tmp_path / "up" / "logs" / f"{device}.log", "tiny-random-llama', 'target') in", 1, 180)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert any("fedge-local" in line and "FLWR_HOME=" in line for line in lines)
    assert any("preloads tiny-random-llama (target)" in line for line in lines)
    import psutil

    workdir = str(tmp_path / "up")
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if workdir in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers


def test_a_reply_for_another_round_is_refused_as_stale():
    from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

    from fedge.cloud.reply_guard import checked_reply

    metadata = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), metadata=metadata)

    def reply(server_round: int) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"server-round": server_round})}), reply_to=sent)

    assert not checked_reply(reply(3), sent).has_error()
    stale = checked_reply(reply(2), sent)
    assert stale.has_error() and "stale update" in stale.error.reason
    assert stale.metadata.src_node_id == 7  # still the device's own reply: the strategy names who failed
# appended into tests/test_deployment.py

# A device's warm SuperExec with a preloaded model, as `python -m fedge.edge.warm_superexec` sets it up,
# forking each message's process (`fork_task`, what its executor does) and running the device's own
# train handler there on a real message. Each fork prints one JSON line.
FORKS = r"""
import json, os, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from fedge.edge import warm_superexec as w
from fedge.edge import training_model as tm

args = w.preload_parser().parse_args(["--preload-model", "tiny-random-llama", "--preload-client-model", "target",
                                      "--preload-node-config", f'data="{sys.argv[1]}" client="device-0"'])
w.warm_up()
(data, key) = w.preload(args)
assert data == ("data", sys.argv[1], "device-0"), data
from fedge.edge import federated_client as fc
corpus = id(next(iter(fc._CORPORA.values())))
base = tm._PRELOADED[key][0]
weight = base.model.layers[0].self_attn.q_proj.weight
before = (weight.data_ptr(), float(weight.double().sum()))

from fedge.cloud.federated_config import FederatedConfig
from fedge.edge import federated_client as fc
from fedge.peft_methods.lora_model import AdaptedModel

def message(model):
    config = FederatedConfig(model=model, client_model="target", rank=4, steps=2, batch_size=2, seq_len=32,
                             eval_examples=1, lr=0.05).client_config()
    config["server-round"] = 1
    config = ConfigRecord(dict(config))
    spec = fc.adapter_spec_from(config)
    # the global adapter as the server sends it for FFA-LoRA: only lora_B (A is rebuilt from the seed)
    state = {k: v.numpy() for k, v in AdaptedModel(model, spec).get_state().items() if "lora_B" in k}
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}), "config": config})
    return Message(content=content, metadata=metadata)

context = Context(run_id=1, node_id=1, node_config={"data": sys.argv[1], "client": "device-0"}, state=RecordDict(),
                  run_config={})
messages = {m: message(m) for m in ("tiny-random-llama", "tiny-random-llama-small-vocab")}

def one(model, forget_preloaded=False):
    if forget_preloaded:  # as a process without a preloaded base
        tm._PRELOADED.clear()
    reply = fc.train(messages[model], context)
    adapted = fc._training_model(messages[model].content["config"])
    child = adapted.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    update = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    print(json.dumps({"model": model, "preloaded": tm.built_on_preloaded(adapted),
                      "same_memory": child.data_ptr() == before[0],
                      "same_data": [id(c) for c in fc._CORPORA.values()] == [corpus],
                      "update": {k: v.ravel().tolist() for k, v in sorted(update.items())}}), flush=True)

for model, forget in (("tiny-random-llama", False), ("tiny-random-llama", False), ("tiny-random-llama", True),
                      ("tiny-random-llama-small-vocab", False)):
    pid = w.fork_task(lambda: one(model, forget))
    assert os.waitpid(pid, 0)[1] == 0
# the parent's base: untouched by what its forks trained (no adapter layers, same weights)
assert not any("lora" in name for name, _ in base.named_modules())
assert (weight.data_ptr(), float(weight.double().sum())) == before
print("parent ok", flush=True)
"""


def test_forks_of_a_preloading_superexec_share_its_model_and_keep_no_adapter_state(tmp_path):
    """Each message's process starts from the device's preloaded base and data (the same memory, not a reload) and
    from nothing else: two forks given the same message reply the same update, equal to a fork that
    loads the model itself; a run asking for another model loads it in its fork; the parent is untouched."""
    import os
    import sys

    import numpy as np

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", FORKS, _device_files(tmp_path)[0]], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "parent ok"
    first, again, loaded, other = (json.loads(line) for line in lines if line.startswith("{"))
    assert first["preloaded"] and first["same_memory"] and again["preloaded"] and again["same_memory"]
    assert all(fork["same_data"] for fork in (first, again, loaded, other))  # the device's data: read once
    assert not loaded["preloaded"] and not loaded["same_memory"]
    assert other["model"] == "tiny-random-llama-small-vocab" and not other["preloaded"]
    assert any(np.abs(v).max() > 0 for v in first["update"].values())  # it trained
    assert first["update"] == again["update"] == loaded["update"]  # bit for bit: nothing carried over


# fedge.edge.supernode and fedge.flower_waits set Flower's waits in the process they run in: checked in a
# fresh interpreter (this one's Flower modules stay as they are)
WAITS = r"""
import json
import flwr.supercore.heartbeat as heartbeat
import flwr.supernode.fleet_http_connection as connection
import flwr.supernode.start_client_internal as loop
from flwr.supercore.inflatable import inflatable_utils
from fedge import flower_waits
from fedge.edge import supernode

before = {"loop_sleeps": sorted(set(supernode.flower_loop_sleeps())), "pulls": flower_waits.object_pull_backoff(),
          "heartbeat": [connection.HEARTBEAT_DEFAULT_INTERVAL, heartbeat.HEARTBEAT_DEFAULT_INTERVAL]}
supernode.set_intervals(0.25, 10)
after = {"pulls": flower_waits.object_pull_backoff(),
         "heartbeat": [connection.HEARTBEAT_DEFAULT_INTERVAL, heartbeat.HEARTBEAT_DEFAULT_INTERVAL]}
slept = []
clock = supernode.LoopClock(0.25, sleep=slept.append)
for seconds in (3, 0.5, 0.1):
    clock.sleep(seconds)
# a pull that finds the object missing twice still gets it, retrying on the shortened back-off
tries = []
def pull(object_id):
    tries.append(object_id)
    if len(tries) < 3:
        raise inflatable_utils.ObjectUnavailableError(object_id)
    return b"content"
got = inflatable_utils.pull_objects(["a"], pull)
refused = ""
inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] = 5  # a Flower that backs off differently
try:
    flower_waits.shorten_object_pulls()
except RuntimeError as exc:
    refused = str(exc)
print(json.dumps({"before": before, "slept": slept, "loop_time_is_clock": isinstance(loop.time, supernode.LoopClock),
                  "after": after,
                  "got": got["a"].decode(), "tries": len(tries), "refused": refused}))
"""


def test_fedge_supernode_sets_only_flowers_poll_heartbeat_and_pull_back_off():
    """The SuperNode entry point's premise (Flower 1.41's loop sleeps a fixed 3 s idle and 0.5 s for a
    reply; object pulls back off 1 s to 10 s; heartbeats every 30 s) holds for the installed Flower, and
    it replaces exactly those; bad values and an unknown Flower are refused before anything starts."""
    import sys

    done = subprocess.run([sys.executable, "-c", WAITS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["before"] == {"loop_sleeps": [["sleep", 0.5], ["sleep", 3]], "pulls": [[1, 10], [1, 10]],
                             "heartbeat": [30, 30]}
    assert out["slept"] == [0.25, 0.25, 0.1] and out["loop_time_is_clock"]
    assert out["after"] == {"pulls": [[0.02, 0.5], [0.02, 0.5]], "heartbeat": [10, 10]}
    assert out["got"] == "content" and out["tries"] == 3
    assert "not as Flower 1.41 did" in out["refused"]
    for bad, why in ((["--poll-interval", "0"], "--poll-interval must be between"),
                     (["--heartbeat-interval", "5"], "--heartbeat-interval must be between 10")):
        refused = subprocess.run([sys.executable, "-m", "fedge.edge.supernode", *bad, "--superlink", "127.0.0.1:1",
                                  "--insecure"], capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and why in refused.stderr, refused.stderr[-2000:]
