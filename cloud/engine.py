"""The verifier's state machine, without Ray or gRPC: sessions, limits and batched rounds.

A `VerifierEngine` owns the target model and every session on one replica. `verify_many` takes
the rounds that arrived together (one per session, ragged draft lengths, greedy and sampled mixed)
and runs them as one target forward (`fedge.cloud.batching`); each session then judges its slice
and advances as in-process generation does (`fedge.verifier_session.TargetVerifierSession`).
Cloud-only generation is the same round with an empty draft (shared batching and cost accounting).
A session belongs to the device that opened it; per-device quotas keep one device from holding
every session. What leaves is typed (`OpenedSession`, `RoundReply`, `ReplicaInfo`, a `Refusal`
whose code is a gRPC status name, so the ingress maps it without guessing).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from fedge.cloud.adapter_registry import AdapterRegistry
from fedge.cloud.batching import BatchedTargetSequence, FairLock, batched_forward, clip, pack_rows
from fedge.cloud.multi_lora import AdapterBank, AdapterLoadError
from fedge.kernels.verify import verify
from fedge.protocol.codecs import validate_sparse_q
from fedge.sampling import SamplingParams
from fedge.verifier_session import TargetVerifierSession


class RefusalCode(StrEnum):
    """Why a request was refused; each is the name of the gRPC status the client gets."""

    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class Refusal:
    """A refused request, as a value (crosses the Ray boundary in place of a reply)."""

    code: RefusalCode
    message: str


class VerifierError(Exception):
    """A refused request inside the engine; `refusal()` is what crosses to the ingress."""

    def __init__(self, code: RefusalCode | str, message: str):
        super().__init__(message)
        self.code = RefusalCode(code)
        self.message = message

    def refusal(self) -> Refusal:
        return Refusal(self.code, self.message)


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    position: int
    max_draft_len: int
    max_q_support: int
    prefill_s: float


@dataclass(frozen=True)
class RoundReply:
    n_accepted: int
    next_id: int
    verify_s: float
    batch_size: int
    position: int


@dataclass(frozen=True)
class ReplicaInfo:
    sessions: int
    vocab_size: int
    forwards: int
    forward_s: float
    tokens_generated: int
    model_fingerprint: str
    tokenizer_fingerprint: str
    mean_batch: float
    process_cpu_s: float = 0.0  # filled in by the replica process


@dataclass
class Limits:
    max_sessions: int = 64  # per replica
    max_draft_len: int = 16
    max_q_support: int = 64  # sparse q entries per drafted position
    max_session_tokens: int = 4096  # also capped by the model's position embeddings
    idle_timeout_s: float = 300.0
    max_batch: int = 32  # rounds in one forward
    # per authenticated device (mutual TLS), so one device cannot hold every session or all the memory
    max_sessions_per_device: int = 8
    max_tokens_per_device: int = 32768  # tokens held across the device's open sessions
    prefill_chunk: int = 256  # a long prompt is prefilled in chunks; other sessions' rounds run between them


@dataclass
class SessionEntry:
    """A replica's record of one served session: its verifier plus the serving bookkeeping."""

    id: str
    verifier: TargetVerifierSession
    sequence: BatchedTargetSequence
    adapter_row: int = -1  # this session's adapter in the replica's AdapterBank (-1: the plain target)
    owner: str = ""  # the device that opened it ("" without mutual TLS: the unguessable id is the key)
    last_used: float = field(default_factory=time.monotonic)
    # the last round, so a retried request (reply lost on the way) gets the same answer
    last_position: int = -1
    last_draft: tuple[int, ...] = ()
    last_reply: RoundReply | None = None

    @property
    def tokens(self) -> list[int]:
        return self.sequence.tokens

    @property
    def greedy(self) -> bool:
        return self.verifier.params.greedy


@dataclass
class Round:
    session_id: str
    position: int
    draft_ids: list[int]
    draft_q: list[tuple[list[int], list[float]]] = field(default_factory=list)  # empty when greedy
    device_id: str = ""  # the caller, from its certificate


@dataclass
class _Work:  # a validated round and where its reply goes
    index: int
    entry: SessionEntry
    q: torch.Tensor | None
    draft_ids: list[int]
    position: int


class VerifierEngine:
    def __init__(self, model: torch.nn.Module, model_fingerprint: str, tokenizer_fingerprint: str,
                 limits: Limits | None = None, shard: int | str = 0, adapters: AdapterRegistry | None = None):
        self.model = model.eval()
        self.model_fingerprint = model_fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.limits = limits or Limits()
        self.shard = shard
        # every published version is served over the one base model, chosen per batch row; the
        # registry verifies each version's signature, loaded on first use (published while running too)
        self.adapter_registry = adapters
        self.adapters = AdapterBank(self.model)
        self.vocab_size = int(model.config.vocab_size)
        max_pos = int(getattr(model.config, "max_position_embeddings", 0) or self.limits.max_session_tokens)
        self.max_tokens = min(self.limits.max_session_tokens, max_pos)
        self.sessions: dict[str, SessionEntry] = {}
        self._lock = threading.Lock()  # the session table; rounds of one session never overlap
        self._forward_lock = FairLock()  # one target forward at a time, in arrival order (cores are shared)
        self.forwards = 0
        self.forward_s = 0.0
        self.tokens_generated = 0
        self.batch_sizes: list[int] = []

    # ---- sessions ---------------------------------------------------------------------------
    def open_session(self, tokenizer_fingerprint: str, model_fingerprint: str, adapter_version: str,
                     params: SamplingParams, prompt_ids: list[int], seed: int = 0,
                     device_id: str = "") -> OpenedSession:
        self._check_open(tokenizer_fingerprint, model_fingerprint, adapter_version, prompt_ids)
        adapter_row = self._adapter_row(adapter_version)
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise VerifierError("RESOURCE_EXHAUSTED", f"this replica holds its limit of "
                                                          f"{self.limits.max_sessions} sessions; retry later")
            self._check_device_quota(device_id, len(prompt_ids) + 1, new_session=True)
            # 128 random bits: without mutual TLS the id is the only key to a session
            sid = f"s{self.shard}-{secrets.token_hex(16)}"
            sequence = BatchedTargetSequence(prompt_ids)
            entry = SessionEntry(sid, TargetVerifierSession.over(sequence, params, seed, self.vocab_size), sequence,
                                 adapter_row=adapter_row, owner=device_id)
            self.sessions[sid] = entry
        start = time.perf_counter()
        # prefill all but the last prompt token now, so the first round only feeds 1 + k positions;
        # chunk by chunk, each its own turn of the forward lock, so waiting rounds go between
        for row in sequence.prefill_rows(self.limits.prefill_chunk):
            with self._forward_lock.turn("prefill"), self.adapters.rows([entry.adapter_row]):
                batched_forward(self.model, [row])
                self.forwards += 1
        return OpenedSession(session_id=sid, position=len(entry.tokens), max_draft_len=self.limits.max_draft_len,
                             max_q_support=self.limits.max_q_support, prefill_s=time.perf_counter() - start)

    def _adapter_row(self, version: str) -> int:
        """The bank row of a served version, loading its verified bytes on first use; NOT_FOUND with
        the registry's reason for a version it does not serve (unknown, unsigned, tampered, ...)."""
        if not version:
            return -1
        try:
            if self.adapter_registry is None:
                raise KeyError(f"adapter version {version[:80]!r} is not served here (no adapter registry)")
            published = self.adapter_registry.snapshot(version).get(version)
        except KeyError as exc:
            raise VerifierError("NOT_FOUND", str(exc.args[0])) from None
        key = f"{version}@{published.digest}"  # a replaced directory is a different adapter
        with self._forward_lock:  # loading rewires the target's linears: never during a forward
            try:
                return self.adapters.load_verified(key, published.files)
            except AdapterLoadError as exc:
                raise VerifierError("FAILED_PRECONDITION", str(exc)) from None

    def _check_open(self, tokenizer_fingerprint: str, model_fingerprint: str, adapter_version: str,
                    prompt_ids: list[int]) -> None:
        if tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise VerifierError("FAILED_PRECONDITION",
                                f"tokenizer fingerprint {clip(tokenizer_fingerprint)} does not match the cloud's "
                                f"{self.tokenizer_fingerprint!r}: edge and cloud must share a tokenizer")
        if model_fingerprint and model_fingerprint != self.model_fingerprint:
            raise VerifierError("FAILED_PRECONDITION",
                                f"the draft was derived from base model {clip(model_fingerprint)}, the cloud serves "
                                f"{self.model_fingerprint!r}")
        if not prompt_ids:
            raise VerifierError("INVALID_ARGUMENT", "prompt_ids must not be empty")
        self._check_ids(prompt_ids, "prompt_ids")
        if len(prompt_ids) + 1 > self.max_tokens:
            raise VerifierError("OUT_OF_RANGE", f"prompt of {len(prompt_ids)} tokens exceeds the session limit "
                                                f"of {self.max_tokens} tokens")

    def _check_device_quota(self, device_id: str, more_tokens: int, new_session: bool = False) -> None:
        """RESOURCE_EXHAUSTED for this device only; call with the session table locked."""
        if not device_id:
            return  # unauthenticated: only the replica's own limits apply
        mine = [s for s in self.sessions.values() if s.owner == device_id]
        lim = self.limits
        if new_session and len(mine) >= lim.max_sessions_per_device:
            raise VerifierError("RESOURCE_EXHAUSTED", f"device {device_id!r} holds its limit of "
                                                      f"{lim.max_sessions_per_device} sessions: close one first")
        if sum(len(s.tokens) for s in mine) + more_tokens > lim.max_tokens_per_device:
            raise VerifierError("RESOURCE_EXHAUSTED", f"device {device_id!r} would hold more than "
                                                      f"{lim.max_tokens_per_device} tokens over its sessions")

    def session_for(self, session_id: str, device_id: str) -> SessionEntry:
        """The session, if the caller may use it: NOT_FOUND, or PERMISSION_DENIED for another device's."""
        with self._lock:
            entry = self.sessions.get(session_id)
        if entry is None:
            raise VerifierError("NOT_FOUND", f"unknown session {clip(session_id)} (closed, expired or the cloud "
                                             "restarted): open a new session with the verified prefix")
        if entry.owner != device_id:
            raise VerifierError("PERMISSION_DENIED", "this session belongs to another device")
        return entry

    def close_session(self, session_id: str, device_id: str = "") -> bool:
        try:
            self.session_for(session_id, device_id)
        except VerifierError as exc:
            if exc.code is RefusalCode.NOT_FOUND:
                return False
            raise
        with self._lock:
            return self.sessions.pop(session_id, None) is not None

    def expire_idle(self, now: float | None = None) -> int:
        """Drop sessions idle longer than the limit; their next round gets NOT_FOUND (the edge reopens)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [sid for sid, s in self.sessions.items() if now - s.last_used > self.limits.idle_timeout_s]
            for sid in stale:
                del self.sessions[sid]
        return len(stale)

    def _check_ids(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise VerifierError("INVALID_ARGUMENT", f"{what} contains token id {bad}, outside the vocabulary "
                                                    f"[0, {self.vocab_size})")

    # ---- rounds -----------------------------------------------------------------------------
    def _prepare(self, rnd: Round) -> tuple[SessionEntry, torch.Tensor | None] | RoundReply:
        """Validate one round; returns (session, dense q) or a finished reply (a retried round)."""
        entry = self.session_for(rnd.session_id, rnd.device_id)
        k = len(rnd.draft_ids)
        if k > self.limits.max_draft_len:
            raise VerifierError("INVALID_ARGUMENT", f"draft of {k} tokens exceeds max_draft_len "
                                                    f"{self.limits.max_draft_len}")
        self._check_ids(rnd.draft_ids, "draft_ids")
        if (rnd.position == entry.last_position and tuple(rnd.draft_ids) == entry.last_draft
                and entry.last_reply is not None):
            return entry.last_reply  # the edge retried a round whose reply it never received
        if rnd.position != len(entry.tokens):
            raise VerifierError("ABORTED", f"edge is at position {rnd.position}, the cloud session at "
                                           f"{len(entry.tokens)}: reopen the session with the verified prefix")
        if len(entry.tokens) + k + 1 > self.max_tokens:
            raise VerifierError("OUT_OF_RANGE", f"session would exceed {self.max_tokens} tokens")
        with self._lock:
            self._check_device_quota(rnd.device_id, k + 1)
        return entry, self._dense_q(entry, rnd)

    def _dense_q(self, entry: SessionEntry, rnd: Round) -> torch.Tensor | None:
        k = len(rnd.draft_ids)
        if entry.greedy:
            if rnd.draft_q:
                raise VerifierError("INVALID_ARGUMENT", "draft_q given for a greedy session")
            return None
        if len(rnd.draft_q) != k:
            raise VerifierError("INVALID_ARGUMENT", f"sampling sessions need draft_q for each of the {k} "
                                                    "draft tokens")
        try:
            return validate_sparse_q(rnd.draft_q, rnd.draft_ids, self.vocab_size, self.limits.max_q_support)
        except ValueError as exc:
            raise VerifierError("INVALID_ARGUMENT", str(exc)) from None

    def verify_many(self, rounds: list[Round]) -> list[RoundReply | Refusal]:
        """Verify every round in one target forward. Returns, per round, a reply or a refusal;
        one bad round never fails the others."""
        start = time.perf_counter()
        replies: list[RoundReply | Refusal | None] = [None] * len(rounds)
        work: list[_Work] = []
        seen: set[str] = set()
        for i, rnd in enumerate(rounds):
            try:
                prepared = self._prepare(rnd)
                if isinstance(prepared, RoundReply):
                    replies[i] = prepared
                    continue
                entry, q = prepared
                if entry.id in seen:
                    raise VerifierError("ABORTED", "two rounds of one session in flight at once")
                seen.add(entry.id)
                work.append(_Work(i, entry, q, list(rnd.draft_ids), rnd.position))
            except VerifierError as exc:
                replies[i] = exc.refusal()
        for chunk_start in range(0, len(work), self.limits.max_batch):
            self._run(work[chunk_start:chunk_start + self.limits.max_batch], replies, start)
        return replies  # type: ignore[return-value]

    def _run(self, work: list[_Work], replies: list, start: float) -> None:
        # sessions of very different lengths go in separate forwards: no row padded to a far longer one
        rows = [w.entry.sequence.row(w.draft_ids) for w in work]
        for group in pack_rows(rows):
            self._run_group([work[i] for i in group], [rows[i] for i in group], replies, start)

    def _run_group(self, work: list[_Work], rows: list, replies: list, start: float) -> None:
        with self._forward_lock, self.adapters.rows([w.entry.adapter_row for w in work]):
            t0 = time.perf_counter()
            logits = batched_forward(self.model, rows)
            self.forward_s += time.perf_counter() - t0
            self.forwards += 1
        self.batch_sizes.append(len(rows))
        results = self._judge_greedy(work, logits)
        for j, w in enumerate(work):
            if j not in results:  # sampled: each session judges with its own generator
                results[j] = w.entry.verifier.judge(logits[j], w.draft_ids, w.q)
        elapsed = time.perf_counter() - start
        now = time.monotonic()
        for j, w in enumerate(work):
            n, next_id = results[j]
            w.entry.verifier.advance(w.draft_ids, n, next_id)
            reply = RoundReply(n_accepted=n, next_id=next_id, verify_s=elapsed, batch_size=len(work),
                               position=len(w.entry.tokens))
            w.entry.last_position, w.entry.last_draft, w.entry.last_reply = w.position, tuple(w.draft_ids), reply
            w.entry.last_used = now
            self.tokens_generated += n + 1
            replies[w.index] = reply

    @staticmethod
    def _judge_greedy(work: list[_Work], logits: list[torch.Tensor]) -> dict[int, tuple[int, int]]:
        """One batched verify call for all greedy rounds (ragged lengths padded to the longest)."""
        greedy = [j for j, w in enumerate(work) if w.entry.greedy]
        if not greedy:
            return {}
        k_max = max(len(work[j].draft_ids) for j in greedy)
        vocab = logits[0].shape[-1]
        target = torch.zeros(len(greedy), k_max + 1, vocab)
        ids = torch.zeros(len(greedy), k_max, dtype=torch.long)
        lens = torch.zeros(len(greedy), dtype=torch.long)
        for r, j in enumerate(greedy):
            k = len(work[j].draft_ids)
            target[r, :k + 1] = logits[j]
            ids[r, :k] = torch.tensor(work[j].draft_ids, dtype=torch.long)
            lens[r] = k
        out = verify(target, ids, lens, SamplingParams())
        return {j: (int(out.n_accepted[r]), int(out.next_ids[r])) for r, j in enumerate(greedy)}

    def info(self) -> ReplicaInfo:
        with self._lock:
            n = len(self.sessions)
        return ReplicaInfo(sessions=n, vocab_size=self.vocab_size, forwards=self.forwards, forward_s=self.forward_s,
                           tokens_generated=self.tokens_generated, model_fingerprint=self.model_fingerprint,
                           tokenizer_fingerprint=self.tokenizer_fingerprint,
                           mean_batch=sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0)
