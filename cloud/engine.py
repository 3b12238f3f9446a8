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

import os
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch

from fedge.cloud.adapter_registry import AdapterRegistry
from fedge.cloud.batching import BatchedTargetSequence, FairLock, Row, batched_forward, clip, pack_rows
from fedge.cloud.cost_curve import LiveCostCurve, LoadMeter, measure_cost_curve
from fedge.cloud.engine_types import (
    Limits,
    OpenedSession,
    Refusal,
    RefusalCode,
    ReplicaInfo,
    Round,
    RoundReply,
    VerifierError,
)
from fedge.cloud.lean_batch import LeanBatchForward
from fedge.cloud.multi_lora import AdapterBank, AdapterLoadError
from fedge.kernels.verify import verify
from fedge.protocol.codecs import validate_sparse_q
from fedge.sampling import SamplingParams
from fedge.speculative import CostCurve
from fedge.verifier_session import TargetVerifierSession

__all__ = ["Limits", "OpenedSession", "Refusal", "RefusalCode", "ReplicaInfo", "Round", "RoundReply", "SessionEntry",
           "VerifierEngine", "VerifierError"]


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
class _Work:  # a validated round and where its reply goes
    index: int
    entry: SessionEntry
    q: torch.Tensor | None
    draft_ids: list[int]
    position: int
    arrived: float = 0.0


def forward_path(model: torch.nn.Module, choice: str | None = None) -> str:
    """"lean" (`fedge.cloud.lean_batch`) where the model allows it, else "hf" (`batched_forward`);
    `choice` (default: $FEDGE_SERVE_FORWARD, else "auto") may force either."""
    choice = (choice or os.environ.get("FEDGE_SERVE_FORWARD", "") or "auto").strip().lower()
    if choice not in ("auto", "lean", "hf"):
        raise ValueError(f"forward path must be auto, lean or hf, not {choice!r}")
    if choice == "lean" and not LeanBatchForward.available(model):
        raise ValueError(f"the lean forward does not support {type(model).__name__}")
    return "hf" if choice == "hf" or not LeanBatchForward.available(model) else "lean"


class VerifierEngine:
    def __init__(self, model: torch.nn.Module, model_fingerprint: str, tokenizer_fingerprint: str,
                 limits: Limits | None = None, shard: int | str = 0, adapters: AdapterRegistry | None = None,
                 forward: str | None = None):
        self.model = model.eval()
        self.forward_path = forward_path(self.model, forward)
        self._lean = LeanBatchForward(self.model) if self.forward_path == "lean" else None
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
        self.costs: LiveCostCurve | None = None  # set by `measure_costs` (the replica does, at start-up)
        self.load = LoadMeter()

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
        # a short prompt on the lean path is fed by its first round (packed with the others' rounds, so
        # sessions opened together share that forward); otherwise all but the last prompt token is
        # prefilled now, chunk by chunk, each its own turn of the forward lock, so waiting rounds go between
        in_round = self._lean is not None and len(prompt_ids) - 1 <= self.limits.prefill_in_round
        for row in () if in_round else sequence.prefill_rows(self.limits.prefill_chunk):
            with self._forward_lock.turn("prefill"):
                self.forward_rows([row], [entry.adapter_row])
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
                work.append(_Work(i, entry, q, list(rnd.draft_ids), rnd.position, rnd.arrived))
            except VerifierError as exc:
                replies[i] = exc.refusal()
        for chunk_start in range(0, len(work), self.limits.max_batch):
            self._run(work[chunk_start:chunk_start + self.limits.max_batch], replies, start)
        return replies  # type: ignore[return-value]

    def _run(self, work: list[_Work], replies: list, start: float) -> None:
        rows = [w.entry.sequence.row(w.draft_ids) for w in work]
        if self._lean is not None:  # packed rows: nothing is padded, so every round shares one forward
            self._run_group(work, rows, replies, start)
            return
        # padded batch: sessions of very different lengths go in separate forwards
        for group in pack_rows(rows):
            self._run_group([work[i] for i in group], [rows[i] for i in group], replies, start)

    def forward_rows(self, rows: list[Row], adapter_rows: list[int]) -> list[torch.Tensor]:
        """One target forward over `rows` (call holding the forward lock), each row with its adapter."""
        if self._lean is not None:  # each packed position is a row of its own for the adapter bank
            with self.adapters.rows([a for r, a in zip(rows, adapter_rows, strict=True) for _ in r.feed]):
                return self._lean(rows)
        with self.adapters.rows(adapter_rows):
            return batched_forward(self.model, rows)

    def _run_group(self, work: list[_Work], rows: list[Row], replies: list, start: float) -> None:
        with self._forward_lock:
            t0 = time.perf_counter()
            logits = self.forward_rows(rows, [w.entry.adapter_row for w in work])
            forward_s = time.perf_counter() - t0
            self.forward_s += forward_s
            self.forwards += 1
        self.batch_sizes.append(len(rows))
        self.load.observe(len(rows))
        if self.costs is not None:
            self.costs.observe(sum(len(r.feed) for r in rows), forward_s)
        results = self._judge_greedy(work, logits)
        for j, w in enumerate(work):
            if j not in results:  # sampled: each session judges with its own generator
                results[j] = w.entry.verifier.judge(logits[j], w.draft_ids, w.q)
        done = time.perf_counter()
        now = time.monotonic()
        for j, w in enumerate(work):
            n, next_id = results[j]
            w.entry.verifier.advance(w.draft_ids, n, next_id)
            since = w.arrived or start  # the replica's time for this round: from arrival to verdict
            reply = RoundReply(n_accepted=n, next_id=next_id, verify_s=done - since, batch_size=len(work),
                               position=len(w.entry.tokens), queue_s=max(0.0, t0 - since), forward_s=forward_s)
            w.entry.last_position, w.entry.last_draft, w.entry.last_reply = w.position, tuple(w.draft_ids), reply
            w.entry.last_used = now
            self.tokens_generated += n + 1
            replies[w.index] = reply

    def measure_costs(self, sessions: tuple[int, ...] = (1, 4, 8, 16), widths: tuple[int, ...] = (1, 3, 5, 9),
                      context: int = 64, repeats: int = 3) -> CostCurve:
        """This replica's cost curve, timed on its own forward path (a few seconds at start-up); the
        forwards it serves afterwards keep it current (`LiveCostCurve`)."""
        with self._forward_lock:
            curve = measure_cost_curve(self.model, sessions, widths, context, repeats,
                                       forward=lambda rows: self.forward_rows(rows, [-1] * len(rows)))
        self.costs = LiveCostCurve(curve, context)
        return curve

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
        curve = self.costs.curve() if self.costs is not None else None
        return ReplicaInfo(sessions=n, vocab_size=self.vocab_size, forwards=self.forwards, forward_s=self.forward_s,
                           tokens_generated=self.tokens_generated, model_fingerprint=self.model_fingerprint,
                           tokenizer_fingerprint=self.tokenizer_fingerprint,
                           mean_batch=sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0,
                           cost_positions=curve.positions if curve else (), cost_seconds=curve.seconds if curve else (),
                           cost_context=self.costs.context if self.costs else 0, load=self.load.value,
                           active_sessions=self.active_sessions(), forward_path=self.forward_path)

    def active_sessions(self, window_s: float = 2.0) -> int:
        """Sessions that ran a round in the last `window_s` seconds (expected back soon)."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for s in self.sessions.values() if now - s.last_used < window_s)
