"""Edge-cloud serving end to end: a real `fedge cloud serve` (Ray + Ray Serve + gRPC) on loopback."""

from __future__ import annotations

import copy
import os
import subprocess
import threading
import time

import grpc
import pytest
import torch

from fedge.edge.adapter_fetch import fetch_adapter
from fedge.edge.client import EdgeClient, EdgeConfig, EdgeError
from fedge.models import model_fingerprint, tokenizer_fingerprint
from fedge.processes import stop_tree
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.sampling import SamplingParams
from fedge.simulations.local_federation import free_port
from fedge.speculative import autoregressive_generate

MAX_DRAFT = 8
MAX_MESSAGE = 64 * 1024


def stop_cloud(proc: subprocess.Popen, hard: bool = False) -> None:
    """Stop the cloud and every process it started (Ray's GCS, raylet, workers), by pid."""
    stop_tree(proc.pid, grace_s=15, hard=hard)


@pytest.fixture(scope="module")
def adapter_pubkey(tmp_path_factory):
    """The key pair the registry's versions are signed with; the cloud and the edge trust its public half."""
    from fedge.protocol.signing import generate_signing_key, save_signing_key

    keys = tmp_path_factory.mktemp("adapter-keys")
    save_signing_key(generate_signing_key(), keys / "signing.key", keys / "signing.pub")
    return keys / "signing.pub"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny, adapter_pubkey):
    """A registry with two signed, published peft LoRA versions (B = 0, so they leave the target's
    output unchanged); the latest also carries a file bigger than one chunk."""
    from peft import LoraConfig, get_peft_model

    from fedge.cloud.adapter_publisher import publish_version

    model, _ = tiny
    root = tmp_path_factory.mktemp("adapters")
    for version, rank in (("v0001", 4), ("v0002", 8)):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                      target_modules=["q_proj", "v_proj"]))
        staged = tmp_path_factory.mktemp("trained") / version
        peft_model.save_pretrained(staged)
        if version == "v0002":
            (staged / "training_log.bin").write_bytes(os.urandom(300_000))
        publish_version(root, staged, adapter_pubkey.with_suffix(".key"), "tiny-random-llama", version)
    return root


@pytest.fixture(scope="module")
def cloud(adapters_dir, adapter_pubkey, start_cloud):
    port = free_port()
    proc = start_cloud(port, "--max-message-bytes", str(MAX_MESSAGE), "--adapters", str(adapters_dir),
                       "--adapter-pubkey", str(adapter_pubkey))
    yield f"127.0.0.1:{port}"
    stop_cloud(proc)


@pytest.fixture(scope="module")
def noisy_draft(tiny):
    """A draft that agrees with the target often but not always (so rounds see rejections)."""
    model, _ = tiny
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.005)
    return draft


def client_for(server: str, tiny, draft, **cfg) -> EdgeClient:
    model, tok = tiny
    return EdgeClient(draft, model_fingerprint(model), tokenizer_fingerprint(tok), EdgeConfig(server=server, **cfg))


PROMPTS = ["def fibonacci(n):", "import json\n\nwith open(", "The capital of France is", "class Stack:\n    def",
           "for i in range(10):", "# parse the header\n", "SELECT name FROM", "x = [1, 2, 3]\ny ="]


def test_greedy_over_grpc_equals_local_target_greedy(cloud, tiny, noisy_draft):
    model, tok = tiny
    for draft in (noisy_draft, model):
        client = client_for(cloud, tiny, draft)
        for prompt in PROMPTS[:3]:
            ids = list(tok(prompt)["input_ids"])
            result = client.generate_ids(ids, 32)
            assert result.fully_verified
            assert result.token_ids == autoregressive_generate(model, ids, 32)
        client.close()
    # the cloud-only path (the simulation's baseline) is the same greedy output
    client = client_for(cloud, tiny, noisy_draft)
    ids = list(tok(PROMPTS[0])["input_ids"])
    assert client.cloud_generate_ids(ids, 30).token_ids == autoregressive_generate(model, ids, 30)
    client.close()


def test_sampling_over_grpc_runs_with_sparse_q_and_is_seeded(cloud, tiny, noisy_draft):
    _, tok = tiny
    # a fixed k: adaptive k follows measured timings, which changes how randomness is consumed
    client = client_for(cloud, tiny, noisy_draft, q_support=16, fixed_k=3)
    ids = list(tok(PROMPTS[1])["input_ids"])
    params = SamplingParams(temperature=0.8, top_k=40)
    a = client.generate_ids(ids, 30, params, seed=3)
    b = client.generate_ids(ids, 30, params, seed=3)
    assert a.fully_verified and len(a.token_ids) == 30
    assert a.token_ids == b.token_ids  # the draft's and the cloud's generators are both seeded
    assert a.stats.drafted > 0
    client.close()


def test_16_concurrent_sessions_are_batched_and_each_correct(cloud, tiny, noisy_draft):
    model, tok = tiny
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def phone(i: int) -> None:
        try:
            client = client_for(cloud, tiny, noisy_draft)
            ids = list(tok(prompts[i])["input_ids"])
            barrier.wait()
            results[i] = (ids, client.generate_ids(ids, 24))
            client.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=phone, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for ids, result in results.values():
        assert result.fully_verified
        assert result.token_ids == autoregressive_generate(model, ids, 24)
    # rounds of different sessions shared target forwards
    assert max(max(r.stats.batch_sizes) for _, r in results.values()) > 1


def test_health_carries_the_cost_curve_and_load_and_the_edge_takes_k_by_them(cloud, tiny, noisy_draft):
    from fedge.edge.client_types import EdgeStats
    from fedge.edge.drafter import Drafter
    from fedge.edge.remote_verifier import RemoteVerifier
    from fedge.speculative import CostCurve, DraftLengthController, speculative_generate

    model, tok = tiny
    client = client_for(cloud, tiny, noisy_draft)
    health = client.health(timeout_s=30)
    assert health.forward_path == "lean" and health.cost_context == 64
    positions, seconds = list(health.cost_positions), list(health.cost_seconds)
    assert len(positions) >= 4 and positions == sorted(set(positions))
    assert all(b >= a > 0 for a, b in zip(seconds, seconds[1:], strict=False))
    curve, _ = client.cloud_costs()
    assert isinstance(curve, CostCurve) and curve.positions == tuple(positions)
    ids = list(tok(PROMPTS[2])["input_ids"])
    stats, controller = EdgeStats(), DraftLengthController(k_max=MAX_DRAFT)
    remote = RemoteVerifier(client.link, client._open_request([], SamplingParams(), 0), ids, MAX_DRAFT, stats,
                            controller, curve, load=3.0)
    assert controller.cost_curve is curve and controller.load == 3.0
    result = speculative_generate(Drafter(noisy_draft, ids, SamplingParams()), remote, 20, controller)
    remote.close()
    assert result.token_ids == autoregressive_generate(model, ids, 20)
    assert controller.load == remote.load >= 1.0  # every reply's batch size moved it (from 3.0, alone: toward 1)
    assert stats.forward_s > 0 and stats.queue_s >= 0 and stats.round_s > stats.forward_s
    assert client.health(timeout_s=30).load >= 1.0
    client.close()


def test_simulate_phones_end_to_end_with_emulated_phone_timing(cloud, tmp_path):
    import argparse
    import json

    from fedge.simulations import phones

    args = argparse.Namespace(
        phones=3, rtt_ms=10.0, jitter_ms=2.0, bandwidth_mbps=20.0, loss=0.0, model="tiny-random-llama", draft=None,
        max_new_tokens=12, k_max=4, port=0, server=cloud, no_reference=False, json=str(tmp_path / "phones.json"),
        cloud_batch_wait_ms=0.0, phone_tokens_per_s=300.0, phone_nice=0, phone_drafts="replay")
    assert phones.main(args) == 0
    rep = json.loads((tmp_path / "phones.json").read_text())
    assert rep["greedy_identical"] and rep["greedy_checked_against"] == "cloud-only and local target greedy"
    assert rep["tokens_cloud_only"] == rep["tokens_edge_assisted"] == 36
    assert rep["phone_tokens_per_s"] == 300.0 and rep["forward_path"] == "lean"
    assert rep["rounds_with_replayed_drafts"] == rep["rounds_edge_assisted"] > 0  # no phone drafted live
    split = rep["latency_split_ms_per_token_edge_assisted"]
    assert set(split) == {"drafting", "network", "queueing", "cloud_forward", "rpc_and_serving"}
    # drafting as the phone sees it: k tokens take k / 300 s, however little the replay cost here
    assert split["drafting"] * rep["tokens_edge_assisted"] >= 1000 * rep["mean_k"] * rep["rounds_edge_assisted"] / 300
    assert split["network"] > 0 and split["cloud_forward"] > 0
    assert rep["predicted_capacity_ratio"] > 0 and rep["capacity_ratio"] > 0
    assert 0 < rep["acceptance_rate"] <= rep["acceptance_a_hat"] <= 1


def _stub(server: str):
    channel = grpc.insecure_channel(server)
    return channel, fedge_pb2_grpc.VerifierStub(channel)


def _open(stub, tok_fp, model_fp, temperature=0.0, prompt=(1, 2, 3)):
    return stub.OpenSession(fedge_pb2.OpenSessionRequest(
        tokenizer_fingerprint=tok_fp, model_fingerprint=model_fp, prompt_ids=list(prompt),
        sampling=fedge_pb2.SamplingParams(temperature=temperature)), timeout=30)


def test_bad_requests_get_clear_status_codes_and_the_server_keeps_serving(cloud, tiny):
    model, tok = tiny
    tok_fp, model_fp = tokenizer_fingerprint(tok), model_fingerprint(model)
    vocab = model.config.vocab_size
    channel, stub = _stub(cloud)
    good = _open(stub, tok_fp, model_fp)
    sampled = _open(stub, tok_fp, model_fp, temperature=1.0)

    def status(call, request) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        assert info.value.details()  # every refusal says why
        return info.value.code()

    def verify(session, position, draft, q=()):
        return fedge_pb2.VerifyRequest(session_id=session.session_id if hasattr(session, "session_id") else session,
                                       position=position, draft_ids=draft,
                                       draft_q=[fedge_pb2.SparseDist(ids=i, probs=p) for i, p in q])

    assert status(stub.Verify, verify("s0-0123", 3, [1])) == grpc.StatusCode.NOT_FOUND
    assert status(stub.Verify, verify("garbage", 3, [1])) == grpc.StatusCode.NOT_FOUND
    assert status(stub.OpenSession, fedge_pb2.OpenSessionRequest(
        tokenizer_fingerprint="not-this-tokenizer", model_fingerprint=model_fp, prompt_ids=[1])
    ) == grpc.StatusCode.FAILED_PRECONDITION
    assert status(stub.Verify, verify(good, 3, [1] * (MAX_DRAFT + 1))) == grpc.StatusCode.INVALID_ARGUMENT
    assert status(stub.Verify, verify(good, 3, [vocab + 5])) == grpc.StatusCode.INVALID_ARGUMENT
    assert status(stub.Verify, verify(sampled, 3, [5], [([5, 6], [float("nan"), 1.0])])
                  ) == grpc.StatusCode.INVALID_ARGUMENT
    assert status(stub.Verify, verify(sampled, 3, [5], [([5, 6], [1.5, -0.5])])) == grpc.StatusCode.INVALID_ARGUMENT
    big = [(list(range(vocab)), [1.0 / vocab] * vocab)] * 100  # ~150 KB > the 64 KB limit
    assert status(stub.Verify, verify(sampled, 3, [5] * 100, big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the good sessions still work, and the cloud still answers
    reply = stub.Verify(verify(good, 3, [4, 5]), timeout=30)
    assert reply.position == 3 + reply.n_accepted + 1
    assert stub.Health(fedge_pb2.HealthRequest(), timeout=30).status == "SERVING"
    stub.CloseSession(fedge_pb2.CloseSessionRequest(session_id=good.session_id), timeout=30)
    assert status(stub.Verify, verify(good, reply.position, [])) == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_cloud_killed_and_restarted_mid_generation(tiny, noisy_draft, start_cloud):
    """The edge finishes its text offline (marked unverified), reconnects with backoff when the
    cloud is back, reopens the lost session with its verified prefix and reconciles the tail."""
    model, tok = tiny
    port = free_port()
    server = f"127.0.0.1:{port}"
    proc = start_cloud(port, "--max-message-bytes", str(MAX_MESSAGE))
    client = client_for(server, tiny, noisy_draft, fixed_k=2, backoff_initial_s=0.2, backoff_max_s=1.0,
                        reconcile_wait_s=120.0, rpc_timeout_s=10.0)
    ids = list(tok(PROMPTS[4])["input_ids"])
    events: list[tuple[str, int]] = []
    restarted: list[subprocess.Popen] = []

    def on_tokens(kind: str, tokens: list[int]) -> None:
        events.append((kind, len(tokens)))
        if kind == "verified" and sum(n for k, n in events if k == "verified") >= 8 and not restarted:
            stop_cloud(proc, hard=True)  # the cloud dies mid-generation
            restarted.append(None)  # type: ignore[arg-type]

            def restart() -> None:
                time.sleep(1.0)
                restarted[0] = start_cloud(port, "--max-message-bytes", str(MAX_MESSAGE))

            threading.Thread(target=restart, daemon=True).start()

    try:
        result = client.generate_ids(ids, 48, on_tokens=on_tokens)
    finally:
        client.close()
        if restarted and restarted[0] is not None:
            stop_cloud(restarted[0])
        stop_cloud(proc, hard=True)
    kinds = [k for k, _ in events]
    assert "unverified" in kinds, "the edge should have drafted on its own while the cloud was down"
    # the offline tail was reconciled: its tokens were kept by the cloud, or rewritten from the first rejection
    assert result.stats.offline_kept > 0 or "rewrite" in kinds
    assert result.offline_spans and result.stats.offline_tokens > 0
    assert result.stats.reconnects >= 1 and result.stats.reopened >= 1
    # once reconciled, the text is exactly the target's greedy text
    assert result.fully_verified
    assert result.token_ids == autoregressive_generate(model, ids, 48)


def test_adapters_stream_in_checksummed_chunks(cloud, adapters_dir, adapter_pubkey, tiny, tmp_path):
    version, names = fetch_adapter(cloud, "", str(tmp_path), adapter_pubkey)  # "" = the latest
    assert version == "v0002"
    assert {"adapter_config.json", "adapter_model.safetensors", "training_log.bin"} <= set(names)
    for name in names:
        assert (tmp_path / version / name).read_bytes() == (adapters_dir / version / name).read_bytes()
    assert fetch_adapter(cloud, "v0001", str(tmp_path / "older"), adapter_pubkey)[0] == "v0001"
    with pytest.raises(EdgeError, match="NOT_FOUND"):
        fetch_adapter(cloud, "v9999", str(tmp_path), adapter_pubkey)
    # sessions name the adapter they were drafted with; the cloud serves only published ones
    model, tok = tiny
    channel, stub = _stub(cloud)
    request = fedge_pb2.OpenSessionRequest(tokenizer_fingerprint=tokenizer_fingerprint(tok),
                                           model_fingerprint=model_fingerprint(model), prompt_ids=[1, 2],
                                           adapter_version="v0001")
    assert stub.OpenSession(request, timeout=30).session_id
    request.adapter_version = "v9999"
    with pytest.raises(grpc.RpcError) as info:
        stub.OpenSession(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()
