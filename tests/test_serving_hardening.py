"""The serving path against a hostile or greedy client and a dying server (issue 16).

In-process (engine, scheduler, a grpc.aio server): sessions bound to their device, per-device
quotas, unguessable session ids, device checks that fail closed on asyncio, memory proportional to
what a session holds, prefill interleaved with other rounds, a cancelled generation leaving the
batch. Then one real `fedge cloud serve --tls-dir` (Ray, tiny model) on loopback: the same over
mutual TLS from the CLI, malformed fields over raw gRPC, an edge refused instead of looping, a
cancelled Generate, and SIGKILL of the server leaving no Ray process behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import psutil
import pytest
import torch

from fedge.cloud.batching import BLOCK, KVBuffer, Row, pack_rows
from fedge.cloud.engine import Limits, Refusal, RefusalCode, Round, RoundReply, VerifierEngine, VerifierError
from fedge.cloud.scheduler import ContinuousBatchScheduler
from fedge.models import model_fingerprint, tokenizer_fingerprint
from fedge.processes import stop_tree, tree
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.protocol.tls import (
    DeviceGate,
    DeviceRefused,
    channel_credentials,
    create_certificates,
    device_channel_credentials,
    require_device,
    server_credentials,
)
from fedge.sampling import SamplingParams
from fedge.verifier_session import TargetVerifierSession


def _engine(tiny, **limits) -> VerifierEngine:
    model, tok = tiny
    return VerifierEngine(model, model_fingerprint(model), tokenizer_fingerprint(tok), Limits(**limits))


def _open(engine: VerifierEngine, tiny, prompt: list[int], device: str = ""):
    _, tok = tiny
    return engine.open_session(tokenizer_fingerprint(tok), "", "", SamplingParams(), prompt, device_id=device)


def _code(fn) -> RefusalCode:
    with pytest.raises(VerifierError) as info:
        fn()
    return info.value.code


# ---- binding and quotas (engine) -------------------------------------------------------------

def test_a_session_belongs_to_the_device_that_opened_it(tiny):
    engine = _engine(tiny)
    sid = _open(engine, tiny, [5, 6, 7], "phone-a").session_id
    stolen = engine.verify_many([Round(sid, 3, [8], device_id="phone-b")])[0]
    assert isinstance(stolen, Refusal) and stolen.code is RefusalCode.PERMISSION_DENIED
    assert _code(lambda: engine.close_session(sid, "phone-b")) is RefusalCode.PERMISSION_DENIED
    assert isinstance(engine.verify_many([Round(sid, 3, [8], device_id="phone-a")])[0], RoundReply)
    assert engine.close_session(sid, "phone-a")


def test_session_ids_are_unguessable(tiny):
    engine = _engine(tiny, max_sessions=64)
    ids = [_open(engine, tiny, [1]).session_id for _ in range(64)]
    secrets_ = [re.fullmatch(r"s0-([0-9a-f]{32})", sid).group(1) for sid in ids]
    assert len(set(secrets_)) == len(ids)
    # 128 random bits each: no counter, no fixed field (a uuid4 fixes 6 bits), balanced bits
    for pos in range(32):
        assert len({s[pos] for s in secrets_}) >= 4, f"hex digit {pos} barely varies"
    ones = sum(bin(int(s, 16)).count("1") for s in secrets_)
    assert 0.45 < ones / (128 * len(ids)) < 0.55


def test_one_device_cannot_hold_every_session_or_token(tiny):
    engine = _engine(tiny, max_sessions=6, max_sessions_per_device=2, max_tokens_per_device=40)
    a = [_open(engine, tiny, [1, 2, 3], "greedy") for _ in range(2)]
    assert _code(lambda: _open(engine, tiny, [1, 2, 3], "greedy")) is RefusalCode.RESOURCE_EXHAUSTED
    for _ in range(2):  # other devices are not affected
        _open(engine, tiny, [1, 2, 3], "polite")
    assert _code(lambda: _open(engine, tiny, [1] * 40, "other")) is RefusalCode.RESOURCE_EXHAUSTED
    # tokens: the greedy device's two sessions together may hold at most 40
    position = 3
    for _ in range(40):
        reply = engine.verify_many([Round(a[0].session_id, position, [1, 2, 3], device_id="greedy")])[0]
        if isinstance(reply, Refusal):
            break
        position = reply.position
    assert isinstance(reply, Refusal) and reply.code is RefusalCode.RESOURCE_EXHAUSTED
    assert position + 3 + 4 > 40  # refused only at the quota, the other session's 3 tokens counted
    engine.close_session(a[1].session_id, "greedy")
    _open(engine, tiny, [1, 2, 3], "greedy")  # a closed session frees its slot


# ---- memory and prefill ----------------------------------------------------------------------

def test_kv_buffer_never_holds_twice_what_it_needs():
    kv = KVBuffer()
    layer = [torch.zeros(2, 300, 4)]
    kv.append(layer, layer)
    assert kv.capacity <= 300 + BLOCK  # the first append allocates what it holds, not twice that
    for _ in range(200):
        kv.append([torch.zeros(2, 3, 4)], [torch.zeros(2, 3, 4)])
        assert kv.capacity <= kv.length * 5 // 4 + BLOCK
    assert kv.length == 900


def test_rows_are_padded_only_to_sessions_of_similar_length(tiny):
    def row(length: int) -> Row:
        kv = KVBuffer()
        kv.length = length
        return Row(kv, [1, 2], 2)

    rows = [row(n) for n in (10, 1000, 20, 900, 30, 950)]
    groups = pack_rows(rows)
    assert sorted(sorted(g) for g in groups) == [[0, 2, 4], [1, 3, 5]]
    for g in groups:  # padded size within 1.5x of what the group holds (+ the small free allowance)
        sizes = [rows[i].kv.length + 2 for i in g]
        assert max(sizes) * len(g) <= 1.5 * sum(sizes) + 64 * len(g)
    # the padded (HF) path runs such a batch as two forwards; the lean path pads nothing (packed rows,
    # attention over each row's own cache), so one forward carries both; each row still exact
    model, tok = tiny
    for path, forwards in (("hf", 2), ("lean", 1)):
        engine = VerifierEngine(model, model_fingerprint(model), tokenizer_fingerprint(tok), Limits(), forward=path)
        short, long_ = [3, 4, 5], [(7 * i) % 200 + 1 for i in range(600)]
        sids = [_open(engine, tiny, p).session_id for p in (short, long_)]
        before = engine.forwards
        replies = engine.verify_many([Round(sids[0], 3, [6, 7]), Round(sids[1], 600, [8])])
        assert engine.forwards - before == forwards, path
        for prompt, draft, reply in zip((short, long_), ([6, 7], [8]), replies, strict=True):
            ref = TargetVerifierSession(model, prompt, SamplingParams()).verify(draft)
            assert (reply.n_accepted, reply.next_id) == (ref.n_accepted, ref.next_id)


def test_a_long_prefill_does_not_block_other_sessions_rounds(tiny):
    engine = _engine(tiny, prefill_chunk=16)
    other = _open(engine, tiny, [1, 2, 3]).session_id
    prompt = [(5 * i) % 250 + 1 for i in range(1500)]  # ~94 chunks
    opened = threading.Event()
    t = threading.Thread(target=lambda: (_open(engine, tiny, prompt), opened.set()), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not any(len(s.tokens) == len(prompt) and s.sequence.kv.length > 0 for s in list(engine.sessions.values())):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    reply = engine.verify_many([Round(other, 3, [4])])[0]  # waits for at most the chunk in flight
    assert isinstance(reply, RoundReply)
    assert not opened.is_set(), "the other session's round waited for the whole prefill"
    t.join(60)
    assert opened.is_set()


def test_serving_load_runs_many_phones_and_reports_latency_and_memory(tmp_path):
    import argparse
    import json

    from fedge.simulations.serving_load import main

    out = tmp_path / "load.json"
    args = argparse.Namespace(model="tiny-random-llama", phones=6, rounds=2, k=3, min_prompt=4, max_prompt=300,
                              think_ms=1.0, ramp_s=0.1, prefill_chunk=64, batch_wait_ms=1.0, threads=0, seed=0,
                              json=str(out))
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["config"] for r in report["results"]] == ["chunked prefill (64)", "one-shot prefill"]
    for r in report["results"]:
        assert r["rounds"] == 12 and r["refused"] == 0
        assert 0 < r["round_p50_ms"] <= r["round_p95_ms"] <= r["round_max_ms"]
        assert 0 < r["peak_kv_held_mb"] <= r["peak_kv_allocated_mb"] < 1.5 * r["peak_kv_held_mb"] + 1


# ---- cancellation (scheduler) -----------------------------------------------------------------

def test_a_cancelled_generation_leaves_the_batch_at_once(tiny):
    engine = _engine(tiny)
    sid = _open(engine, tiny, [1, 2, 3]).session_id

    async def run() -> tuple[int, int]:
        scheduler = ContinuousBatchScheduler(engine, 0.0)
        stream = scheduler.generate(sid, 1500, [])
        first = await stream.__anext__()
        assert first and isinstance(first[0], RoundReply)
        await stream.aclose()  # what Serve does when the gRPC caller cancels
        assert sid not in scheduler._gens
        await asyncio.sleep(0.05)  # a step in flight may finish
        after = engine.tokens_generated
        await asyncio.sleep(0.3)
        await scheduler.stop()
        return after, engine.tokens_generated

    after, later = asyncio.run(run())
    assert later == after and len(engine.sessions[sid].tokens) < 1500


# ---- device checks fail closed on grpc.aio ------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return create_certificates(tmp_path_factory.mktemp("certs"), devices=["phone-a", "phone-b", "phone-c"])


def test_device_checks_fail_closed_on_an_asyncio_server(certs):
    reached: list[str] = []

    class Verifier(fedge_pb2_grpc.VerifierServicer):
        def __init__(self):
            self.gate = DeviceGate(certs.root)

        async def Health(self, request, context):
            # the sync helper on an aio context: used to return as if allowed (abort never awaited)
            try:
                device = require_device(context, allowed={"phone-a"})
            except DeviceRefused:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused")
            reached.append(device)
            return fedge_pb2.HealthReply(status=device)

        async def CloseSession(self, request, context):
            device = await self.gate.require(context)
            reached.append(device)
            return fedge_pb2.CloseSessionReply(closed=True)

    async def run() -> None:
        server = grpc.aio.server()
        fedge_pb2_grpc.add_VerifierServicer_to_server(Verifier(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(certs.root))
        await server.start()

        async def call(device: str, method: str):
            async with grpc.aio.secure_channel(f"localhost:{port}", device_channel_credentials(certs.root, device)) \
                    as channel:
                stub = fedge_pb2_grpc.VerifierStub(channel)
                if method == "Health":
                    return await stub.Health(fedge_pb2.HealthRequest(), timeout=10)
                return await stub.CloseSession(fedge_pb2.CloseSessionRequest(session_id="x"), timeout=10)

        try:
            assert (await call("phone-a", "Health")).status == "phone-a"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call("phone-b", "Health")
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await call("phone-c", "CloseSession")
            (certs.root / "revoked.txt").write_text("# revoked\nphone-c\n")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call("phone-c", "CloseSession")
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await call("phone-b", "CloseSession")
            # the cloud's own certificate (same CA) never passes for a device
            server_as_client = channel_credentials(certs.ca_cert, certs.server_cert, certs.server_key)
            async with grpc.aio.secure_channel(f"localhost:{port}", server_as_client) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await fedge_pb2_grpc.VerifierStub(channel).CloseSession(fedge_pb2.CloseSessionRequest(), timeout=10)
            assert info.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
            (certs.root / "revoked.txt").unlink()
            (certs.root / "revoked.txt").mkdir()  # unreadable revocation list: nobody gets in
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call("phone-b", "CloseSession")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            (certs.root / "revoked.txt").rmdir() if (certs.root / "revoked.txt").is_dir() else None
            await server.stop(None)

    asyncio.run(run())
    assert reached == ["phone-a", "phone-c", "phone-b"]


# ---- a real `fedge cloud serve --tls-dir` ----------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    stop_tree(proc.pid, grace_s=15)


@pytest.fixture(scope="module")
def tls_cloud(certs, start_cloud):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = start_cloud(port, "--batch-wait-ms", "0", "--tls-dir", str(certs.root), "--max-sessions-per-device", "2")
    yield proc, f"localhost:{port}"
    _stop(proc)


def _stub(certs, server: str, device: str):
    channel = grpc.secure_channel(server, device_channel_credentials(certs.root, device))
    return channel, fedge_pb2_grpc.VerifierStub(channel)


def _status(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        reply = call(request, timeout=30)
        if hasattr(reply, "__iter__") and not hasattr(reply, "ByteSize"):
            list(reply)
    details = info.value.details() or ""
    assert details and len(details) < 400, details[:500]  # says why, never echoes unbounded input
    return info.value.code()


def _open_request(tiny, prompt=(1, 2, 3), **sampling) -> fedge_pb2.OpenSessionRequest:
    _, tok = tiny
    return fedge_pb2.OpenSessionRequest(tokenizer_fingerprint=tokenizer_fingerprint(tok), prompt_ids=list(prompt),
                                        sampling=fedge_pb2.SamplingParams(**sampling))


def test_cli_mutual_tls_binds_each_session_to_its_device(tls_cloud, certs, tiny):
    _, server = tls_cloud
    with grpc.insecure_channel(server) as plain, pytest.raises(grpc.RpcError):
        fedge_pb2_grpc.VerifierStub(plain).Health(fedge_pb2.HealthRequest(), timeout=10)
    ca, a = _stub(certs, server, "phone-a")
    cb, b = _stub(certs, server, "phone-b")
    sid = a.OpenSession(_open_request(tiny), timeout=30).session_id
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert _status(b.Verify, fedge_pb2.VerifyRequest(session_id=sid, position=3, draft_ids=[4])) == denied
    assert _status(b.Generate, fedge_pb2.GenerateRequest(session_id=sid, max_new_tokens=3)) == denied
    assert _status(b.CloseSession, fedge_pb2.CloseSessionRequest(session_id=sid)) == denied
    assert a.Verify(fedge_pb2.VerifyRequest(session_id=sid, position=3, draft_ids=[4]), timeout=30).position >= 4
    assert a.CloseSession(fedge_pb2.CloseSessionRequest(session_id=sid), timeout=30).closed
    # per-device limit: phone-a holds its 2, phone-b still gets in
    held = [a.OpenSession(_open_request(tiny), timeout=30).session_id for _ in range(2)]
    assert _status(a.OpenSession, _open_request(tiny)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    other = b.OpenSession(_open_request(tiny), timeout=30).session_id
    for stub, s in [(a, held[0]), (a, held[1]), (b, other)]:
        stub.CloseSession(fedge_pb2.CloseSessionRequest(session_id=s), timeout=30)
    # a revoked device is refused on the running server, without a restart
    (certs.root / "revoked.txt").write_text("phone-b\n")
    try:
        assert _status(b.Health, fedge_pb2.HealthRequest()) == denied
        assert _status(b.OpenSession, _open_request(tiny)) == denied
        assert a.Health(fedge_pb2.HealthRequest(), timeout=30).status == "SERVING"
    finally:
        (certs.root / "revoked.txt").unlink()
    ca.close()
    cb.close()


def test_every_malformed_field_gets_a_precise_status(tls_cloud, certs, tiny):
    _, server = tls_cloud
    channel, a = _stub(certs, server, "phone-a")
    vocab = tiny[0].config.vocab_size
    greedy = a.OpenSession(_open_request(tiny), timeout=30).session_id
    sampled = a.OpenSession(_open_request(tiny, temperature=1.0), timeout=30).session_id
    code = grpc.StatusCode
    huge = "s0-" + "f" * 200_000

    def verify(sid, position=3, draft=(4,), q=()):
        return fedge_pb2.VerifyRequest(session_id=sid, position=position, draft_ids=list(draft),
                                       draft_q=[fedge_pb2.SparseDist(ids=i, probs=p) for i, p in q])

    cases = [
        (a.Verify, verify(huge), code.NOT_FOUND),
        (a.Verify, verify("s99999999999999999999-x"), code.NOT_FOUND),
        (a.Verify, verify(greedy, position=-5), code.OUT_OF_RANGE),
        (a.Verify, verify(greedy, draft=[4] * 5000), code.INVALID_ARGUMENT),
        (a.Verify, verify(greedy, draft=[-1]), code.INVALID_ARGUMENT),
        (a.Verify, verify(greedy, draft=[vocab]), code.INVALID_ARGUMENT),
        (a.Verify, verify(greedy, q=[([4], [1.0])]), code.INVALID_ARGUMENT),
        (a.Verify, verify(sampled, q=[([4, 4], [0.5, 0.5])]), code.INVALID_ARGUMENT),
        (a.Verify, verify(sampled, q=[([4], [float("inf")])]), code.INVALID_ARGUMENT),
        (a.Verify, verify(sampled, draft=[4, 5], q=[([4], [1.0])]), code.INVALID_ARGUMENT),
        (a.Verify, verify(greedy, position=10**9), code.ABORTED),
        (a.OpenSession, _open_request(tiny, prompt=[]), code.INVALID_ARGUMENT),
        (a.OpenSession, _open_request(tiny, prompt=[1] * 5000), code.OUT_OF_RANGE),
        (a.OpenSession, _open_request(tiny, prompt=[vocab + 1]), code.INVALID_ARGUMENT),
        (a.OpenSession, _open_request(tiny, temperature=float("nan")), code.INVALID_ARGUMENT),
        (a.OpenSession, _open_request(tiny, temperature=float("inf")), code.INVALID_ARGUMENT),
        (a.OpenSession, _open_request(tiny, top_k=-3), code.INVALID_ARGUMENT),
        (a.OpenSession, _open_request(tiny, top_p=7.0), code.INVALID_ARGUMENT),
        (a.OpenSession, fedge_pb2.OpenSessionRequest(tokenizer_fingerprint="x" * 100_000, prompt_ids=[1]),
         code.FAILED_PRECONDITION),
        (a.OpenSession, fedge_pb2.OpenSessionRequest(tokenizer_fingerprint=_open_request(tiny).tokenizer_fingerprint,
                                                     adapter_version="v" * 100_000, prompt_ids=[1]), code.NOT_FOUND),
        (a.Generate, fedge_pb2.GenerateRequest(session_id=greedy, max_new_tokens=0), code.INVALID_ARGUMENT),
        (a.Generate, fedge_pb2.GenerateRequest(session_id=greedy, max_new_tokens=-1), code.INVALID_ARGUMENT),
        (a.Generate, fedge_pb2.GenerateRequest(session_id=huge, max_new_tokens=2), code.NOT_FOUND),
        (a.CloseSession, fedge_pb2.CloseSessionRequest(session_id="garbage"), code.NOT_FOUND),
    ]
    for call, request, expected in cases:
        got = _status(call, request)
        assert got == expected, (str(request)[:200], got, expected)
    assert not a.CloseSession(fedge_pb2.CloseSessionRequest(session_id=huge), timeout=30).closed  # idempotent
    # still serving, and both sessions still usable
    assert a.Verify(verify(greedy), timeout=30).position >= 4
    for sid in (greedy, sampled):
        a.CloseSession(fedge_pb2.CloseSessionRequest(session_id=sid), timeout=30)
    channel.close()


def test_a_refused_edge_fails_clearly_and_never_loops(tls_cloud, certs, tiny):
    from fedge.edge.client import EdgeClient, EdgeConfig, EdgeError

    _, server = tls_cloud
    model, tok = tiny
    cfg = EdgeConfig(server=server, tls_dir=str(certs.root), device_id="phone-c", reconcile_wait_s=1.0)
    client = EdgeClient(model, model_fingerprint(model), tokenizer_fingerprint(tok), cfg, adapter_version="v-none")
    start = time.monotonic()
    with pytest.raises(EdgeError, match="NOT_FOUND"):
        client.generate_ids([1, 2, 3], 8)
    with pytest.raises(EdgeError, match="NOT_FOUND"):
        client.cloud_generate_ids([1, 2, 3], 8)
    client.adapter_version = ""
    channel, c = _stub(certs, server, "phone-c")
    held = [c.OpenSession(_open_request(tiny), timeout=30).session_id for _ in range(2)]
    with pytest.raises(EdgeError, match="RESOURCE_EXHAUSTED"):
        client.generate_ids([1, 2, 3], 8)
    assert time.monotonic() - start < 60
    for sid in held:
        c.CloseSession(fedge_pb2.CloseSessionRequest(session_id=sid), timeout=30)
    assert len(client.generate_ids([1, 2, 3], 8).token_ids) == 8  # and works once it may
    client.close()
    channel.close()


def test_a_cancelled_generate_stops_computing(tls_cloud, certs, tiny):
    _, server = tls_cloud
    channel, a = _stub(certs, server, "phone-a")
    sid = a.OpenSession(_open_request(tiny), timeout=30).session_id
    call = a.Generate(fedge_pb2.GenerateRequest(session_id=sid, max_new_tokens=2000), timeout=120)
    assert next(call).token_ids
    call.cancel()
    time.sleep(1.0)  # the step in flight finishes
    before = a.Health(fedge_pb2.HealthRequest(), timeout=30).tokens_generated
    time.sleep(2.0)
    after = a.Health(fedge_pb2.HealthRequest(), timeout=30).tokens_generated
    assert after == before, f"{after - before} tokens generated for a cancelled call"
    a.CloseSession(fedge_pb2.CloseSessionRequest(session_id=sid), timeout=30)
    channel.close()


def test_sigkill_of_the_server_leaves_no_ray_process(tls_cloud):
    """Runs last: kills the module's cloud outright (no cleanup handler runs)."""
    proc, _ = tls_cloud
    family = [p for p in tree(proc.pid) if p.pid != proc.pid]
    assert any("raylet" in " ".join(p.cmdline()) for p in family)  # Ray is ours, started by this server
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(family, timeout=45)
    assert not alive, [(p.pid, p.name()) for p in alive]
