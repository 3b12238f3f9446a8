"""Signed adapter publishing, served without restart, fetched safely: publisher, registry, the real
Adapters/Verifier servicers on loopback (mutual TLS) and the edge's fetch against a hostile server."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import shutil
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedge.cloud.adapter_publisher import publish_version
from fedge.cloud.adapter_registry import AdapterRegistry
from fedge.cloud.engine import Limits, VerifierEngine
from fedge.cloud.ingress import AdaptersIngress, VerifierIngress
from fedge.cloud.multi_lora import AdapterBank, AdapterLoadError
from fedge.cloud.scheduler import ContinuousBatchScheduler
from fedge.edge.adapter_fetch import AdapterFetchError, FetchLimits, fetch_adapter
from fedge.models import model_dir, model_fingerprint, tokenizer_fingerprint
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.protocol.signing import (
    SIGNATURE_FILE,
    generate_signing_key,
    load_signing_key,
    save_signing_key,
    sign_adapter_dir,
)
from fedge.protocol.tls import create_certificates, device_channel_credentials, server_credentials

BASE = "tiny-random-llama"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    save_signing_key(generate_signing_key(), root / "good.key", root / "good.pub")
    save_signing_key(generate_signing_key(), root / "other.key", root / "other.pub")
    return root


@pytest.fixture(scope="module")
def fingerprints(tiny):
    model, tok = tiny
    return {"base_model_fingerprint": model_fingerprint(model), "tokenizer_fingerprint": tokenizer_fingerprint(tok)}


def peft_dir(model, path: Path, rank: int = 4, seed: int = 0, targets=("q_proj", "v_proj")) -> Path:
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                  target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)
    return path


def publish(registry, adapter, keys, fingerprints, key="good", version=None) -> Path:
    return publish_version(registry, adapter, keys / f"{key}.key", BASE, version, **fingerprints)


def test_publish_signs_a_portable_version_atomically(tiny, keys, tmp_path):
    model, _ = tiny
    registry = tmp_path / "registry"
    first = publish_version(registry, peft_dir(model, tmp_path / "a"), keys / "good.key", BASE)  # fingerprints computed
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    state = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    second = publish_version(registry, (state, lora.peft_config["default"]), keys / "good.key", BASE)
    assert (first.name, second.name) == ("v000001", "v000002")
    snapshot = AdapterRegistry(registry, keys / "good.pub", model_fingerprint(model)).snapshot()
    assert snapshot.versions() == ["v000001", "v000002"] and not snapshot.refused
    meta = snapshot.get("").metadata  # "" = the latest, by signed sequence
    assert (meta.version, meta.sequence, meta.base_model) == ("v000002", 2, BASE)
    assert meta.base_model_fingerprint == model_fingerprint(model)
    local = str(model_dir(BASE))
    for version in (first, second):
        config = json.loads((version / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == BASE
        assert all(local.encode() not in f.read_bytes() for f in version.iterdir()), "a local path was published"
    assert "README.md" not in {f.name for f in first.iterdir()}
    with pytest.raises(FileExistsError):
        publish_version(registry, tmp_path / "a", keys / "good.key", BASE, "v000001")
    with pytest.raises(ValueError, match="portable"):
        publish_version(registry, tmp_path / "a", keys / "good.key", local)
    assert sorted(p.name for p in registry.iterdir() if not p.name.startswith(".")) == ["v000001", "v000002"]


def _plant_bad_versions(registry: Path, tiny, keys, fingerprints, tmp_path: Path) -> dict[str, str]:
    """Every kind of version the cloud must refuse, next to good ones; returns name -> expected reason."""
    model, _ = tiny
    src = peft_dir(model, tmp_path / "src")
    publish(registry, src, keys, fingerprints)  # v000001
    publish(registry, src, keys, fingerprints)  # v000002
    tampered = publish(registry, src, keys, fingerprints, version="v000003")
    weights = bytearray((tampered / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 1
    (tampered / "adapter_model.safetensors").write_bytes(bytes(weights))
    shutil.copytree(src, registry / "v000004")  # unsigned
    publish(registry, src, keys, fingerprints, key="other", version="v000005")  # foreign key
    shutil.copytree(registry / "v000001", registry / "v000009")  # an old signed adapter as a newer name
    outside = publish(tmp_path / "elsewhere", src, keys, fingerprints, version="v000010")
    (registry / "v000010").symlink_to(outside, target_is_directory=True)
    linked = publish(registry, src, keys, fingerprints, version="v000011")
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes((linked / "adapter_model.safetensors").read_bytes())
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to(secret)  # same bytes, but outside the registry
    shutil.copytree(registry / "v000002", registry / "v..2")
    garbage = shutil.copytree(registry / "v000002", registry / "v000012")
    (garbage / SIGNATURE_FILE).write_text("{not json")
    publish(registry, src, keys, {**fingerprints, "base_model_fingerprint": "0" * 16}, version="v000013")
    odd = shutil.copytree(registry / "v000002", registry / "v000014")  # signed by the right key, yet not LoRA
    (odd / "adapter_config.json").write_text("[]")
    metadata = json.loads((odd / SIGNATURE_FILE).read_text())["metadata"]
    sign_adapter_dir(odd, load_signing_key(keys / "good.key"), {**metadata, "version": "v000014", "sequence": 14})
    return {"v000014": "malformed", "v000003": "modified after signing", "v000004": "unsigned", "v000005": "invalid",
            "v000009": "relabelled", "v000010": "symlink", "v000011": "symlink", "v..2": "not a plain name",
            "v000012": "malformed", "v000013": "base model"}


def test_registry_skips_each_bad_version_with_a_reason(tiny, keys, fingerprints, tmp_path, caplog):
    registry = tmp_path / "registry"
    expected = _plant_bad_versions(registry, tiny, keys, fingerprints, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedge.adapters"):
        snapshot = AdapterRegistry(registry, keys / "good.pub", fingerprints["base_model_fingerprint"]).snapshot()
    assert snapshot.versions() == ["v000001", "v000002"]
    for name, reason in expected.items():
        assert reason in snapshot.refused[name], (name, snapshot.refused[name])
        assert any(name in r.getMessage() for r in caplog.records), f"{name} was refused without a log line"
        with pytest.raises(KeyError, match="refused"):
            list(snapshot.chunks(name))
    with pytest.raises(KeyError, match="unknown"):
        snapshot.get("../v000001")
    served = {c.file_name for c in snapshot.chunks("v000002")}
    assert served == {"adapter_config.json", "adapter_model.safetensors", SIGNATURE_FILE}
    # no key configured: nothing is served, and nothing breaks
    assert AdapterRegistry(registry, None).snapshot().versions() == []
    # the bank verifies on load too: the relabelled copy is refused, the good version loads
    bank = AdapterBank(copy.deepcopy(tiny[0]))
    with pytest.raises(AdapterLoadError, match="relabelled"):
        bank.load("v000009", registry / "v000009", keys / "good.pub")
    with pytest.raises(AdapterLoadError, match="unsigned"):
        bank.load("v000004", registry / "v000004", keys / "good.pub")
    assert bank.load("v000001", registry / "v000001", keys / "good.pub") == 0


class _Local:
    """The replica's methods with Ray's `.remote` calling convention, over the real scheduler."""

    def __init__(self, engine: VerifierEngine):
        scheduler = ContinuousBatchScheduler(engine, 0.0)

        class Remote:
            def __init__(self, fn):
                self.remote = fn

        async def info():
            return engine.info()

        self.open_session = Remote(scheduler.open_session)
        self.close_session = Remote(lambda sid: asyncio.sleep(0, scheduler.close_session(sid)))
        self.info = Remote(info)


@pytest.fixture
def loopback(tiny, keys, fingerprints, tmp_path):
    """The real Verifier and Adapters servicers over one registry, mutual TLS on loopback."""
    model, _ = tiny
    certs = create_certificates(tmp_path / "certs", devices=["phone-1"])
    registry = tmp_path / "registry"
    fp = fingerprints["base_model_fingerprint"]
    engine = VerifierEngine(copy.deepcopy(model), fp, fingerprints["tokenizer_fingerprint"], Limits(), 0,
                            adapters=AdapterRegistry(registry, keys / "good.pub", fp, min_rescan_s=0.0))
    ingress_registry = AdapterRegistry(registry, keys / "good.pub", fp, poll_s=3600.0, min_rescan_s=0.0)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def run():
        server = grpc.aio.server()
        static = engine.info()
        fedge_pb2_grpc.add_VerifierServicer_to_server(
            VerifierIngress(_Local(engine), BASE, Limits(), 1 << 20, static, ingress_registry), server)
        fedge_pb2_grpc.add_AdaptersServicer_to_server(AdaptersIngress(ingress_registry, 4096), server)
        state["port"] = server.add_secure_port("127.0.0.1:0", server_credentials(certs.root))
        await server.start()
        state["stop"] = asyncio.Event()
        started.set()
        await state["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(30)
    channel = grpc.secure_channel(f"localhost:{state['port']}", device_channel_credentials(certs.root, "phone-1"))
    yield registry, certs, f"localhost:{state['port']}", channel
    channel.close()
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(30)
    assert not thread.is_alive()
    loop.close()


def _views(channel, version: str, fingerprints) -> tuple[bool, bool, bool]:
    """(listed by Health, Fetch serves it, OpenSession accepts it)."""
    verifier, adapters = fedge_pb2_grpc.VerifierStub(channel), fedge_pb2_grpc.AdaptersStub(channel)
    listed = version in verifier.Health(fedge_pb2.HealthRequest(), timeout=10).adapter_versions
    results = []
    for call in (lambda: list(adapters.Fetch(fedge_pb2.FetchAdapterRequest(version=version), timeout=10)),
                 lambda: verifier.OpenSession(fedge_pb2.OpenSessionRequest(
                     tokenizer_fingerprint=fingerprints["tokenizer_fingerprint"],
                     model_fingerprint=fingerprints["base_model_fingerprint"], prompt_ids=[1, 2, 3],
                     adapter_version=version), timeout=30)):
        try:
            call()
            results.append(True)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            results.append(False)
    return listed, results[0], results[1]


def test_version_published_while_serving_is_seen_by_health_fetch_and_open(loopback, tiny, keys, fingerprints,
                                                                          tmp_path):
    registry, certs, address, channel = loopback
    src = peft_dir(tiny[0], tmp_path / "src")
    publish(registry, src, keys, fingerprints)
    assert _views(channel, "v000001", fingerprints) == (True, True, True)
    assert _views(channel, "v000002", fingerprints) == (False, False, False)
    publish(registry, src, keys, fingerprints)  # while the server runs
    # Fetch names the new version: the one shared snapshot is refreshed, Health lists it too
    assert _views(channel, "v000002", fingerprints)[1:] == (True, True)
    assert _views(channel, "v000002", fingerprints) == (True, True, True)
    staged = publish(tmp_path / "staging", src, keys, fingerprints, version="v000003")
    (staged / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    staged.rename(registry / "v000003")  # a tampered version appears at once: refused by all three
    assert _views(channel, "v000003", fingerprints) == (False, False, False)
    # the edge fetches over mutual TLS, verifies, and refuses to go back to an older version
    out = tmp_path / "edge"
    kwargs = {"tls_dir": str(certs.root), "device_id": "phone-1"}
    assert fetch_adapter(address, "", out, keys / "good.pub", **kwargs)[0] == "v000002"
    assert (out / "v000002" / "adapter_model.safetensors").read_bytes() == \
        (registry / "v000002" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AdapterFetchError, match="older"):
        fetch_adapter(address, "v000001", out, keys / "good.pub", **kwargs)
    with pytest.raises(AdapterFetchError, match="invalid"):
        fetch_adapter(address, "v000002", tmp_path / "edge2", keys / "other.pub", **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["v000002"]


class _Hostile(fedge_pb2_grpc.AdaptersServicer):
    def __init__(self):
        self.chunks: list[dict] = []

    def Fetch(self, request, context):
        for c in self.chunks:
            yield fedge_pb2.AdapterChunk(**c)


def _chunks(version: str, files: dict[str, bytes]) -> list[dict]:
    import hashlib

    return [{"version": version, "file_name": n, "file_size": len(d), "offset": 0, "data": d,
             "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()]


def test_edge_refuses_a_hostile_server_and_writes_nothing_outside(tiny, keys, fingerprints, tmp_path):
    good = publish(tmp_path / "registry", peft_dir(tiny[0], tmp_path / "src"), keys, fingerprints)
    files = {p.name: p.read_bytes() for p in good.iterdir()}
    hostile = _Hostile()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    fedge_pb2_grpc.add_AdaptersServicer_to_server(hostile, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    root = tmp_path / "phone"
    out = root / "adapters"
    out.mkdir(parents=True)
    limit = max(map(len, files.values())) + 100
    tampered = {**files, "adapter_model.safetensors": files["adapter_model.safetensors"][:-1] + b"\1"}
    cases = {
        "not a plain name": _chunks("v000001", {**files, "../x": b"evil"}),
        "not a plain name ": _chunks("v000001", {**files, str(tmp_path / "abs"): b"evil"}),
        "served version": _chunks("../escape", files),
        "per-file limit": _chunks("v000001", {**files, "big.bin": b"\0" * (limit + 1)}),
        "modified after signing": _chunks("v000001", tampered),
        "unsigned": _chunks("v000001", {n: d for n, d in files.items() if n != SIGNATURE_FILE}),
        "relabelled": _chunks("v000007", files),
    }
    try:
        for reason, chunks in cases.items():
            hostile.chunks = chunks
            with pytest.raises(AdapterFetchError, match=reason.strip()):
                fetch_adapter(address, "", out, keys / "good.pub", limits=FetchLimits(max_file_bytes=limit))
            assert list(out.iterdir()) == [], reason
        hostile.chunks = _chunks("v000001", files)
        with pytest.raises(AdapterFetchError, match="total limit"):
            fetch_adapter(address, "", out, keys / "good.pub", limits=FetchLimits(max_total_bytes=limit))
        (out / "v000001").symlink_to(tmp_path, target_is_directory=True)  # a planted link in the edge's folder
        hostile.chunks = _chunks("v000001", files)
        with pytest.raises(AdapterFetchError, match="not a directory"):
            fetch_adapter(address, "", out, keys / "good.pub")
        (out / "v000001").unlink()
        assert fetch_adapter(address, "", out, keys / "good.pub")[0] == "v000001"
        assert {p.name for p in (out / "v000001").iterdir()} == set(files)
    finally:
        server.stop(None)
    assert sorted(p.name for p in root.iterdir()) == ["adapters"] and not (tmp_path / "x").exists()
    assert not (tmp_path / "abs").exists() and not (tmp_path / "escape").exists()
