"""The edge's gRPC client: draft locally, verify in the cloud, survive losing the cloud.

    client = EdgeClient.from_draft_dir("127.0.0.1:50051", "drafts/int4")
    text, result = client.generate("def fibonacci(n):", max_new_tokens=64)

Each round drafts k tokens, sends their ids (and, when sampling, the sparse q they were drawn
from) and gets back how many the target keeps plus its next token. k comes from the measured
round time (network included), draft time and acceptance (`DraftLengthController`).

When the cloud is unreachable, the edge keeps drafting tokens on its own, marked unverified, and
retries with exponential backoff. When the link returns it reconciles: the unverified tail is sent
as ordinary drafts (its first chunk is exactly the round that was in flight, which the cloud
answers from its retry cache if it had processed it), so accepted tokens become verified and the
first rejected one is replaced by the target's token. If the session is still on the cloud nothing
it holds is re-sent; if the cloud lost it (restart, idle expiry), the session is reopened with the
prompt plus the verified tokens, the only state the new cloud lacks.

`NetworkProfile` emulates a phone's link in this transport: one-way latency with jitter, a
bandwidth cost per byte, and TCP-style loss (a lost segment costs a retransmission timeout).
"""

from __future__ import annotations

import argparse
import queue
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from fedge.edge.speculative import DraftLengthController, DraftSession
from fedge.models import encode_prompt
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.protocol.codecs import truncate_q
from fedge.sampling import SamplingParams, sampling_probs

TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN}
SESSION_LOST = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}


class EdgeError(RuntimeError):
    """The cloud refused a request for a reason retrying cannot fix (bad input, wrong model)."""


@dataclass
class NetworkProfile:
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0  # uniform +- per one-way trip
    bandwidth_mbps: float = 0.0  # 0 = unlimited
    loss: float = 0.0  # probability that a message's segment is lost (and retransmitted)
    seed: int = 0
    _rng: random.Random = field(default=None, init=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0 or self.bandwidth_mbps < 0 or not 0 <= self.loss < 1:
            raise ValueError("rtt, jitter and bandwidth must be >= 0 and loss in [0, 1)")
        self._rng = random.Random(self.seed)

    def one_way_s(self, nbytes: int) -> float:
        delay = self.rtt_ms / 2000 + self._rng.uniform(-self.jitter_ms, self.jitter_ms) / 1000
        if self.bandwidth_mbps > 0:
            delay += nbytes * 8 / (self.bandwidth_mbps * 1e6)
        # TCP retransmission timeout per lost try (Linux's minimum RTO is 200 ms)
        rto = max(0.2, 2 * self.rtt_ms / 1000)
        while self.loss > 0 and self._rng.random() < self.loss:
            delay += rto
            rto = min(2 * rto, 60.0)
        return max(0.0, delay)


@dataclass
class EdgeConfig:
    server: str = "127.0.0.1:50051"
    k_max: int = 8
    fixed_k: int | None = None
    q_support: int = 32  # top-m of q sent per drafted token when sampling
    rpc_timeout_s: float = 30.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    draft_while_offline: bool = True
    reconcile_wait_s: float = 0.0  # at the end, how long to wait for the cloud to verify the tail
    # the per-token draft time k is chosen with; None = as measured here. A simulation whose phones
    # share a few cores sets each phone's own (uncontended) drafting speed: its drafting budget
    draft_budget_s: float | None = None
    network: NetworkProfile | None = None
    # mutual TLS: a `fedge certs create` directory and this device's id (its certificate's CN)
    tls_dir: str | None = None
    device_id: str | None = None


@dataclass
class EdgeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    offline_tokens: int = 0  # drafted while the cloud was unreachable
    offline_kept: int = 0  # of those, verified by the cloud after reconnecting
    reconnects: int = 0
    reopened: int = 0  # sessions reopened because the cloud had lost them
    reconnect_attempts: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    round_s: float = 0.0
    ks: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # sessions in the cloud forward of each round
    token_latency_s: list[float] = field(default_factory=list)  # per delivered token

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class EdgeResult:
    token_ids: list[int]
    verified: list[bool]  # per token: confirmed by the target
    offline_spans: list[tuple[int, int]]  # [start, end) of each span drafted while offline
    stats: EdgeStats

    @property
    def unverified_spans(self) -> list[tuple[int, int]]:
        spans, start = [], None
        for i, ok in enumerate([*self.verified, True]):
            if not ok and start is None:
                start = i
            elif ok and start is not None:
                spans.append((start, i))
                start = None
        return spans

    @property
    def fully_verified(self) -> bool:
        return all(self.verified)


class SparseDraftSession(DraftSession):
    """A draft session that samples from the renormalised top-m of q, so that the (ids, probs) it
    sends are exactly the distribution each token was drawn from (lossless with a sparse q)."""

    def __init__(self, draft: torch.nn.Module, prompt_ids: list[int], params: SamplingParams, seed: int,
                 support: int):
        super().__init__(draft, prompt_ids, params, seed)
        self.support = support

    def propose_sparse(self, k: int) -> tuple[list[int], list[tuple[list[int], list[float]]]]:
        start_len = len(self.session.tokens)
        ids: list[int] = []
        qs: list[tuple[list[int], list[float]]] = []
        for _ in range(k):
            logits = self.session.logits()[-1]
            if self.params.greedy:
                token = int(logits.argmax())
            else:
                support, probs = truncate_q(sampling_probs(logits, self.params)[None], self.support)
                pick = int(torch.multinomial(probs[0], 1, generator=self.generator))
                token = int(support[0, pick])
                qs.append((support[0].tolist(), probs[0].tolist()))
            ids.append(token)
            self.session.accept([token])
        self.session.truncate(start_len)
        return ids, qs

    def truncate(self, length: int) -> None:
        self.session.truncate(length)


class CloudLink:
    """A gRPC channel to the cloud with the emulated network applied to each call."""

    def __init__(self, server: str, network: NetworkProfile | None, timeout_s: float, credentials=None):
        self.server = server
        self.network = network
        self.timeout_s = timeout_s
        self.credentials = credentials  # grpc.ChannelCredentials for (m)TLS; None = plaintext
        self.channel: grpc.Channel | None = None
        self.stub: fedge_pb2_grpc.VerifierStub | None = None
        self.connect()

    def connect(self) -> None:
        # a fresh channel per reconnect: an old one may sit in its own (long) reconnect backoff
        self.close()
        options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
                   ("grpc.enable_retries", 0)]
        if self.credentials is not None:
            self.channel = grpc.secure_channel(self.server, self.credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(self.server, options=options)
        self.stub = fedge_pb2_grpc.VerifierStub(self.channel)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _delay(self, nbytes: int) -> None:
        if self.network is not None:
            d = self.network.one_way_s(nbytes)
            if d > 0:
                time.sleep(d)

    def call(self, method: str, request, timeout_s: float | None = None):
        self._delay(request.ByteSize())
        reply = getattr(self.stub, method)(request, timeout=timeout_s or self.timeout_s)
        self._delay(reply.ByteSize())
        return reply

    def stream(self, method: str, request) -> Callable[[], tuple[object, float] | None]:
        """Start a server stream; returns a function giving (message, delivery time) or None at the end.

        A reader thread stamps each message on arrival, so emulated delays do not pile up."""
        self._delay(request.ByteSize())
        call = getattr(self.stub, method)(request, timeout=self.timeout_s * 100)
        inbox: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                for msg in call:
                    extra = self.network.one_way_s(msg.ByteSize()) if self.network else 0.0
                    inbox.put((msg, time.perf_counter() + extra))
                inbox.put(None)
            except grpc.RpcError as exc:
                inbox.put(exc)

        threading.Thread(target=read, daemon=True).start()
        last = [0.0]

        def next_message():
            item = inbox.get()
            if item is None:
                return None
            if isinstance(item, grpc.RpcError):
                raise item
            msg, at = item
            at = max(at, last[0])  # a stream delivers in order
            wait = at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            last[0] = at
            return msg, at

        return next_message


class EdgeClient:
    def __init__(self, draft: torch.nn.Module, model_fingerprint: str, tokenizer_fingerprint: str,
                 config: EdgeConfig | None = None, tokenizer=None, adapter_version: str = ""):
        self.draft = draft
        self.model_fingerprint = model_fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.config = config or EdgeConfig()
        self.tokenizer = tokenizer
        self.adapter_version = adapter_version
        credentials = None
        if self.config.tls_dir:
            from fedge.protocol.tls import device_channel_credentials

            if not self.config.device_id:
                raise EdgeError("tls_dir is set but device_id is not: mutual TLS needs this device's certificate")
            credentials = device_channel_credentials(self.config.tls_dir, self.config.device_id)
        self.link = CloudLink(self.config.server, self.config.network, self.config.rpc_timeout_s, credentials)
        self.controller_template = DraftLengthController(k_max=self.config.k_max, fixed_k=self.config.fixed_k)

    @classmethod
    def from_draft_dir(cls, server: str, draft_dir: str, config: EdgeConfig | None = None) -> EdgeClient:
        from fedge.edge.draft import load_draft

        draft, tokenizer, info = load_draft(draft_dir)
        config = config or EdgeConfig(server=server)
        config.server = server
        return cls(draft, info.target_fingerprint, info.tokenizer_fingerprint, config, tokenizer)

    def health(self, timeout_s: float = 2.0):
        return self.link.call("Health", fedge_pb2.HealthRequest(), timeout_s)

    def close(self) -> None:
        self.link.close()

    # ---- edge-assisted generation -------------------------------------------------------------
    def _open(self, prompt_ids: list[int], params: SamplingParams, seed: int) -> tuple[str, int, int]:
        req = fedge_pb2.OpenSessionRequest(
            tokenizer_fingerprint=self.tokenizer_fingerprint, model_fingerprint=self.model_fingerprint,
            adapter_version=self.adapter_version, prompt_ids=prompt_ids, seed=seed,
            sampling=fedge_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k,
                                              top_p=params.top_p))
        reply = self.link.call("OpenSession", req)
        return reply.session_id, reply.position, reply.max_draft_len

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64, params: SamplingParams | None = None,
                     seed: int = 0, stop_ids: set[int] | frozenset[int] = frozenset(),
                     on_tokens: Callable[[str, list[int]], None] | None = None) -> EdgeResult:
        """Generate up to max_new_tokens.

        `on_tokens(kind, tokens)` follows the text as it is decided: kind "verified" (tokens the
        target confirmed), "unverified" (drafted while offline) or "rewrite" (tokens = the new
        verified sequence, after the cloud rejected part of an offline span).
        Greedy output equals the target's greedy output whenever every token was verified
        (result.fully_verified); otherwise result.verified marks the draft-only tokens."""
        params = params or SamplingParams()
        cfg = self.config
        drafter = SparseDraftSession(self.draft, prompt_ids, params, seed, cfg.q_support)
        controller = DraftLengthController(k_max=cfg.k_max, fixed_k=cfg.fixed_k)
        stats = EdgeStats()
        # out[:verified] are confirmed by the target; out[verified:] are draft-only, with their q
        out: list[int] = []
        verified = 0
        tail_q: list[tuple[list[int], list[float]]] = []
        offline: list[list[int]] = []  # [start, end) spans of out drafted while the cloud was away
        session: str | None = None
        max_draft = cfg.k_max
        online = True
        backoff = cfg.backoff_initial_s
        next_retry = 0.0
        inflight = 0  # size of the round lost in flight: its retry must be the identical request
        start = time.perf_counter()
        last_delivery = start
        end_deadline: float | None = None
        emit = on_tokens or (lambda kind, tokens: None)

        def deliver(n: int) -> None:
            nonlocal last_delivery
            now = time.perf_counter()
            stats.token_latency_s.extend([(now - last_delivery) / n] * n)
            last_delivery = now

        def sync_drafter() -> None:
            # the draft's sequence follows prompt + out; its cache keeps the common prefix
            want = prompt_ids + out
            have = drafter.session.tokens
            i = 0
            while i < min(len(want), len(have)) and want[i] == have[i]:
                i += 1
            if i < len(have):
                drafter.truncate(i)
            if i < len(want):
                drafter.accept(want[i:])

        while True:
            done = len(out) >= max_new_tokens or any(t in stop_ids for t in out)
            if done and verified == len(out):
                break
            if done and not online:
                end_deadline = end_deadline or time.perf_counter() + cfg.reconcile_wait_s
                if time.perf_counter() >= end_deadline:
                    break
            if online:
                tail = len(out) - verified
                try:
                    if session is None:
                        session, _, cloud_k = self._open(prompt_ids + out[:verified], params, seed)
                        max_draft = min(cloud_k, cfg.k_max)
                        if stats.rounds or stats.reconnects:
                            stats.reopened += 1
                    draft_s = 0.0
                    if tail:  # reconcile: the unverified tail is this round's draft
                        k = min(inflight or max_draft, tail, max_draft)
                        draft_ids, qs = out[verified:verified + k], tail_q[:k]
                    else:
                        k = max(0, min(controller.choose(), max_new_tokens - len(out) - 1, max_draft))
                        t0 = time.perf_counter()
                        draft_ids, qs = drafter.propose_sparse(k)
                        draft_s = time.perf_counter() - t0
                        # provisional until the reply: if the round is lost these are the offline tail
                        out.extend(draft_ids)
                        tail_q.extend(qs)
                        sync_drafter()
                        inflight = k
                    req = fedge_pb2.VerifyRequest(
                        session_id=session, position=len(prompt_ids) + verified, draft_ids=draft_ids,
                        draft_q=[fedge_pb2.SparseDist(ids=i, probs=p) for i, p in qs])
                    t1 = time.perf_counter()
                    reply = self.link.call("Verify", req)
                    round_s = time.perf_counter() - t1
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code in SESSION_LOST:
                        session = None  # the cloud lost it: reopen with the verified prefix
                        continue
                    if code not in TRANSIENT:
                        raise EdgeError(f"cloud refused the request: {code.name}: {exc.details()}") from None
                    online = False
                    next_retry = time.perf_counter() + backoff
                    if not tail and inflight:
                        offline.append([len(out) - inflight, len(out)])
                        stats.offline_tokens += inflight
                        emit("unverified", out[len(out) - inflight:])
                    continue
                inflight = 0
                n, next_id = reply.n_accepted, reply.next_id
                kept = verified + n
                chunk_end = verified + k
                stats.offline_kept += sum(1 for s0, s1 in offline for i in range(verified, kept) if s0 <= i < s1)
                if n == k and chunk_end < len(out) and out[chunk_end] == next_id:
                    # the target's token confirms the next offline token: the rest stays as drafts
                    stats.offline_kept += 1
                    tail_q = tail_q[k + 1:]
                else:
                    rewritten = len(out) > kept + 1 or (len(out) == kept + 1 and out[kept] != next_id)
                    del out[kept:]
                    out.append(next_id)
                    tail_q = []
                    offline = [[s0, min(s1, kept)] for s0, s1 in offline if s0 < kept]
                    if tail and rewritten:
                        emit("rewrite", list(out))
                verified = kept + 1
                sync_drafter()
                stats.rounds += 1
                stats.round_s += round_s
                stats.batch_sizes.append(reply.batch_size)
                if not tail:
                    controller.record(k, n, draft_s, round_s)
                    if cfg.draft_budget_s is not None:
                        controller.draft_s = cfg.draft_budget_s
                    stats.drafted += k
                    stats.accepted += n
                    stats.draft_s += draft_s
                    stats.ks.append(k)
                    deliver(n + 1)
                    emit("verified", out[kept - n:verified])
                continue
            # offline: retry the cloud when the backoff says so, draft on our own meanwhile
            if time.perf_counter() >= next_retry:
                stats.reconnect_attempts += 1
                try:
                    self.link.connect()
                    self.health(timeout_s=min(2.0, cfg.rpc_timeout_s))
                    online = True
                    stats.reconnects += 1
                    backoff = cfg.backoff_initial_s
                    continue
                except grpc.RpcError:
                    backoff = min(backoff * 2, cfg.backoff_max_s)
                    next_retry = time.perf_counter() + backoff
            if done or not cfg.draft_while_offline:
                time.sleep(max(0.0, min(next_retry - time.perf_counter(), 0.05)))
                continue
            t0 = time.perf_counter()
            ids, qs = drafter.propose_sparse(1)
            stats.draft_s += time.perf_counter() - t0
            if offline and offline[-1][1] == len(out):
                offline[-1][1] += 1
            else:
                offline.append([len(out), len(out) + 1])
            out.extend(ids)
            tail_q.extend(qs)
            sync_drafter()
            stats.offline_tokens += 1
            deliver(1)
            emit("unverified", ids)
        # a stop token ends the text
        stop_at = next((i for i, t in enumerate(out) if t in stop_ids), None)
        end = min(max_new_tokens, len(out) if stop_at is None else stop_at + 1)
        out = out[:end]
        if session is not None and online:
            try:
                self.link.call("CloseSession", fedge_pb2.CloseSessionRequest(session_id=session), 2.0)
            except grpc.RpcError:
                pass  # the cloud expires idle sessions anyway
        stats.wall_s = time.perf_counter() - start
        return EdgeResult(token_ids=out, verified=[i < verified for i in range(len(out))],
                          offline_spans=[(s0, min(s1, end)) for s0, s1 in offline if s0 < end], stats=stats)

    def generate(self, prompt: str, max_new_tokens: int = 64, params: SamplingParams | None = None,
                 seed: int = 0, chat: bool = False, on_tokens=None) -> tuple[str, EdgeResult]:
        if self.tokenizer is None:
            raise EdgeError("this client has no tokenizer; use generate_ids")
        ids = encode_prompt(self.tokenizer, prompt, chat)
        stop = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        result = self.generate_ids(ids, max_new_tokens, params, seed, stop, on_tokens)
        return self.tokenizer.decode(result.token_ids, skip_special_tokens=True), result

    # ---- cloud-only generation (the baseline) ---------------------------------------------------
    def cloud_generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64,
                           stop_ids: set[int] | frozenset[int] = frozenset()) -> EdgeResult:
        """The cloud generates every token (greedy) and streams them; nothing is drafted here."""
        stats = EdgeStats()
        start = time.perf_counter()
        session, _, _ = self._open(prompt_ids, SamplingParams(), 0)
        out: list[int] = []
        last = start
        try:
            next_message = self.link.stream("Generate", fedge_pb2.GenerateRequest(
                session_id=session, max_new_tokens=max_new_tokens, stop_ids=sorted(stop_ids)))
            while (item := next_message()) is not None:
                msg, at = item
                out.extend(msg.token_ids)
                stats.token_latency_s.extend([(at - last) / len(msg.token_ids)] * len(msg.token_ids))
                last = at
        finally:
            try:
                self.link.call("CloseSession", fedge_pb2.CloseSessionRequest(session_id=session), 2.0)
            except grpc.RpcError:
                pass
        stats.rounds = len(out)
        stats.wall_s = time.perf_counter() - start
        return EdgeResult(token_ids=out, verified=[True] * len(out), offline_spans=[], stats=stats)


def fetch_adapter(server: str, version: str, out_dir: str, timeout_s: float = 60.0) -> tuple[str, list[str]]:
    """Download a published adapter version ("" = latest) into out_dir/<version>/, checking each
    file's SHA-256 against the cloud's; returns (version, file names). Raises EdgeError on a
    mismatch or a missing version."""
    import hashlib
    from pathlib import Path

    channel = grpc.insecure_channel(server)
    try:
        stub = fedge_pb2_grpc.AdaptersStub(channel)
        files: dict[str, bytearray] = {}
        digests: dict[str, str] = {}
        got = ""
        try:
            for chunk in stub.Fetch(fedge_pb2.FetchAdapterRequest(version=version), timeout=timeout_s):
                got = chunk.version
                buf = files.setdefault(chunk.file_name, bytearray())
                if chunk.offset != len(buf):
                    raise EdgeError(f"{chunk.file_name}: chunk at offset {chunk.offset}, expected {len(buf)}")
                buf.extend(chunk.data)
                if chunk.sha256:
                    digests[chunk.file_name] = chunk.sha256
        except grpc.RpcError as exc:
            raise EdgeError(f"adapter fetch failed: {exc.code().name}: {exc.details()}") from None
        for name, data in files.items():
            if hashlib.sha256(data).hexdigest() != digests.get(name):
                raise EdgeError(f"{name}: checksum mismatch (or missing), refusing the adapter")
        target = Path(out_dir) / got
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / Path(name).name).write_bytes(bytes(data))
        return got, sorted(files)
    finally:
        channel.close()


def main(args: argparse.Namespace) -> int:
    """`fedge edge generate --server HOST:PORT --draft DIR --prompt TEXT`."""
    from fedge.edge.draft import DraftError

    network = NetworkProfile(args.rtt_ms, args.jitter_ms, args.bandwidth_mbps, args.loss)
    cfg = EdgeConfig(server=args.server, k_max=args.k_max, fixed_k=None if args.k == "auto" else int(args.k),
                     reconcile_wait_s=args.reconcile_wait_s, network=network)
    try:
        client = EdgeClient.from_draft_dir(args.server, args.draft, cfg)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except (DraftError, ValueError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    tok = client.tokenizer
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("[unverified:", "]")

    def show(kind: str, tokens: list[int]) -> None:
        if kind == "verified":
            print(tok.decode(tokens, skip_special_tokens=True), end="", flush=True)
        elif kind == "unverified":
            print(dim + tok.decode(tokens, skip_special_tokens=True) + reset, end="", flush=True)
        else:
            print("\n[cloud is back; verified text so far:]\n" + tok.decode(tokens, skip_special_tokens=True),
                  end="", flush=True)

    print(args.prompt, end="", flush=True)
    try:
        text, result = client.generate(args.prompt, args.max_new_tokens, params, args.seed, args.chat, show)
    except EdgeError as exc:
        print(f"\nfedge: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print()
    s = result.stats
    spans = result.unverified_spans
    print(f"[{len(result.token_ids)} tokens in {s.wall_s:.2f} s, {s.rounds} rounds, acceptance "
          f"{s.acceptance_rate:.2f}, mean k {sum(s.ks) / max(1, len(s.ks)):.1f}; offline tokens {s.offline_tokens} "
          f"({s.offline_kept} kept by the cloud), reconnects {s.reconnects}, "
          f"{'all verified' if not spans else f'unverified spans {spans}'}]", file=sys.stderr)
    return 0
