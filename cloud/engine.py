"""The verifier's state machine, without Ray or gRPC: sessions, limits and batched rounds.

A `VerifierEngine` owns the target model and every session on one replica. `verify_many` takes
the rounds that arrived together (one per session, ragged draft lengths, greedy and sampled mixed)
and runs them as one target forward (`fedge.cloud.batching`). Cloud-only generation is the same round
with an empty draft, so both modes share the batching and the cost accounting.

Errors carry a gRPC status code name so the ingress can map them without guessing.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedge.cloud.batching import Row, SessionKV, batched_forward
from fedge.cloud.multi_lora import AdapterBank
from fedge.kernels.verify import verify
from fedge.protocol.codecs import validate_sparse_q
from fedge.sampling import SamplingParams


class VerifierError(Exception):
    """A refused request: `code` is a grpc.StatusCode name (NOT_FOUND, INVALID_ARGUMENT, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict:
        return {"error": self.code, "message": self.message}


@dataclass
class Limits:
    max_sessions: int = 64  # per replica
    max_draft_len: int = 16
    max_q_support: int = 64  # sparse q entries per drafted position
    max_session_tokens: int = 4096  # also capped by the model's position embeddings
    idle_timeout_s: float = 300.0
    max_batch: int = 32  # rounds in one forward


@dataclass
class CloudSession:
    id: str
    tokens: list[int]
    params: SamplingParams
    generator: torch.Generator
    kv: SessionKV = field(default_factory=SessionKV)
    last_used: float = field(default_factory=time.monotonic)
    # the last round, so a retried request (reply lost on the way) gets the same answer
    last_position: int = -1
    last_draft: tuple[int, ...] = ()
    last_reply: dict | None = None
    adapter_row: int = -1  # this session's adapter in the replica's AdapterBank (-1: the plain target)


@dataclass
class Round:
    session_id: str
    position: int
    draft_ids: list[int]
    draft_q: list[tuple[list[int], list[float]]] = field(default_factory=list)  # empty when greedy


class VerifierEngine:
    def __init__(self, model: torch.nn.Module, model_fingerprint: str, tokenizer_fingerprint: str,
                 limits: Limits | None = None, shard: int = 0, adapter_versions: tuple[str, ...] = (),
                 adapters_root: str | Path | None = None):
        self.model = model.eval()
        self.model_fingerprint = model_fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.limits = limits or Limits()
        self.shard = shard
        self.adapter_versions = set(adapter_versions)
        # every published version is served over the one base model, chosen per batch row
        self.adapters = AdapterBank(self.model)
        if adapters_root is not None:
            for version in sorted(self.adapter_versions):
                self.adapters.load(version, Path(adapters_root) / version)
        self.vocab_size = int(model.config.vocab_size)
        max_pos = int(getattr(model.config, "max_position_embeddings", 0) or self.limits.max_session_tokens)
        self.max_tokens = min(self.limits.max_session_tokens, max_pos)
        self.sessions: dict[str, CloudSession] = {}
        self._lock = threading.Lock()  # the session table; rounds of one session never overlap
        self._forward_lock = threading.Lock()  # one target forward at a time (cores are shared)
        self.forwards = 0
        self.forward_s = 0.0
        self.tokens_generated = 0
        self.batch_sizes: list[int] = []

    # ---- sessions ---------------------------------------------------------------------------
    def open_session(self, tokenizer_fingerprint: str, model_fingerprint: str, adapter_version: str,
                     params: SamplingParams, prompt_ids: list[int], seed: int = 0) -> dict:
        if tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise VerifierError("FAILED_PRECONDITION",
                                f"tokenizer fingerprint {tokenizer_fingerprint!r} does not match the cloud's "
                                f"{self.tokenizer_fingerprint!r}: edge and cloud must share a tokenizer")
        if model_fingerprint and model_fingerprint != self.model_fingerprint:
            raise VerifierError("FAILED_PRECONDITION",
                                f"the draft was derived from base model {model_fingerprint!r}, the cloud serves "
                                f"{self.model_fingerprint!r}")
        if adapter_version and adapter_version not in self.adapter_versions:
            raise VerifierError("NOT_FOUND", f"adapter version {adapter_version!r} is not served here "
                                             f"(have: {sorted(self.adapter_versions) or 'none'})")
        if not prompt_ids:
            raise VerifierError("INVALID_ARGUMENT", "prompt_ids must not be empty")
        self._check_ids(prompt_ids, "prompt_ids")
        if len(prompt_ids) + 1 > self.max_tokens:
            raise VerifierError("OUT_OF_RANGE", f"prompt of {len(prompt_ids)} tokens exceeds the session limit "
                                                f"of {self.max_tokens} tokens")
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise VerifierError("RESOURCE_EXHAUSTED", f"this replica holds its limit of "
                                                          f"{self.limits.max_sessions} sessions; retry later")
            sid = f"s{self.shard}-{uuid.uuid4().hex}"
            session = CloudSession(sid, list(prompt_ids), params, torch.Generator().manual_seed(seed))
            session.adapter_row = self.adapters.index.get(adapter_version, -1)
            self.sessions[sid] = session
        start = time.perf_counter()
        # prefill all but the last prompt token now, so the first round only feeds 1 + k positions
        if len(prompt_ids) > 1:
            with self._forward_lock, self.adapters.rows([session.adapter_row]):
                batched_forward(self.model, [Row(session.kv, list(prompt_ids[:-1]), 1)])
                self.forwards += 1
        return {"session_id": sid, "position": len(session.tokens), "max_draft_len": self.limits.max_draft_len,
                "max_q_support": self.limits.max_q_support, "prefill_s": time.perf_counter() - start}

    def close_session(self, session_id: str) -> bool:
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
    def _prepare(self, rnd: Round) -> tuple[CloudSession, torch.Tensor | None] | dict:
        """Validate one round; returns (session, dense q) or a finished reply (a retried round)."""
        with self._lock:
            session = self.sessions.get(rnd.session_id)
        if session is None:
            raise VerifierError("NOT_FOUND", f"unknown session {rnd.session_id!r} (closed, expired or the cloud "
                                             "restarted): open a new session with the verified prefix")
        k = len(rnd.draft_ids)
        if k > self.limits.max_draft_len:
            raise VerifierError("INVALID_ARGUMENT", f"draft of {k} tokens exceeds max_draft_len "
                                                    f"{self.limits.max_draft_len}")
        self._check_ids(rnd.draft_ids, "draft_ids")
        if (rnd.position == session.last_position and tuple(rnd.draft_ids) == session.last_draft
                and session.last_reply is not None):
            return session.last_reply  # the edge retried a round whose reply it never received
        if rnd.position != len(session.tokens):
            raise VerifierError("ABORTED", f"edge is at position {rnd.position}, the cloud session at "
                                           f"{len(session.tokens)}: reopen the session with the verified prefix")
        if len(session.tokens) + k + 1 > self.max_tokens:
            raise VerifierError("OUT_OF_RANGE", f"session would exceed {self.max_tokens} tokens")
        q = None
        if session.params.greedy:
            if rnd.draft_q:
                raise VerifierError("INVALID_ARGUMENT", "draft_q given for a greedy session")
        else:
            if len(rnd.draft_q) != k:
                raise VerifierError("INVALID_ARGUMENT", f"sampling sessions need draft_q for each of the {k} "
                                                        "draft tokens")
            try:
                q = validate_sparse_q(rnd.draft_q, rnd.draft_ids, self.vocab_size, self.limits.max_q_support)
            except ValueError as exc:
                raise VerifierError("INVALID_ARGUMENT", str(exc)) from None
        return session, q

    def verify_many(self, rounds: list[Round]) -> list[dict]:
        """Verify every round in one target forward. Returns, per round, a reply dict or an error
        dict ({"error": CODE, "message": ...}); one bad round never fails the others."""
        start = time.perf_counter()
        replies: list[dict | None] = [None] * len(rounds)
        work: list[tuple[int, CloudSession, torch.Tensor | None, Round]] = []
        seen: set[str] = set()
        for i, rnd in enumerate(rounds):
            try:
                prepared = self._prepare(rnd)
                if isinstance(prepared, dict):
                    replies[i] = prepared
                    continue
                session, q = prepared
                if session.id in seen:
                    raise VerifierError("ABORTED", "two rounds of one session in flight at once")
                seen.add(session.id)
                work.append((i, session, q, rnd))
            except VerifierError as exc:
                replies[i] = exc.as_dict()
        for chunk_start in range(0, len(work), self.limits.max_batch):
            self._run(work[chunk_start:chunk_start + self.limits.max_batch], replies, start)
        return replies  # type: ignore[return-value]

    def _run(self, work, replies: list, start: float) -> None:
        rows = []
        for _, session, _, rnd in work:
            pending = session.tokens[session.kv.length:]
            if not pending:  # the last token must be fed to get its logits
                session.kv.truncate(session.kv.length - 1)
                pending = session.tokens[-1:]
            rows.append(Row(session.kv, pending + list(rnd.draft_ids), len(rnd.draft_ids) + 1))
        with self._forward_lock, self.adapters.rows([session.adapter_row for _, session, _, _ in work]):
            t0 = time.perf_counter()
            logits = batched_forward(self.model, rows)
            self.forward_s += time.perf_counter() - t0
            self.forwards += 1
        self.batch_sizes.append(len(rows))
        greedy = [j for j, (_, s, _, _) in enumerate(work) if s.params.greedy]
        results: dict[int, tuple[int, int]] = {}
        if greedy:
            # one batched verify call for all greedy rounds (ragged lengths padded to the longest)
            k_max = max(len(work[j][3].draft_ids) for j in greedy)
            vocab = logits[0].shape[-1]
            target = torch.zeros(len(greedy), k_max + 1, vocab)
            ids = torch.zeros(len(greedy), k_max, dtype=torch.long)
            lens = torch.zeros(len(greedy), dtype=torch.long)
            for r, j in enumerate(greedy):
                k = len(work[j][3].draft_ids)
                target[r, :k + 1] = logits[j]
                ids[r, :k] = torch.tensor(work[j][3].draft_ids, dtype=torch.long)
                lens[r] = k
            out = verify(target, ids, lens, SamplingParams())
            for r, j in enumerate(greedy):
                results[j] = (int(out.n_accepted[r]), int(out.next_ids[r]))
        for j, (_, session, q, rnd) in enumerate(work):
            if j in results:
                continue
            # sampled sessions: per-session generator, so a session's randomness is its seed alone
            k = len(rnd.draft_ids)
            out = verify(logits[j].unsqueeze(0), torch.tensor([rnd.draft_ids], dtype=torch.long).reshape(1, k),
                         torch.tensor([k]), session.params, None if q is None else q.unsqueeze(0),
                         session.generator)
            results[j] = (int(out.n_accepted[0]), int(out.next_ids[0]))
        elapsed = time.perf_counter() - start
        now = time.monotonic()
        for j, (i, session, _, rnd) in enumerate(work):
            n, next_id = results[j]
            before = len(session.tokens)
            # keys/values of accepted draft tokens stay; the rejected tail is rolled back
            session.kv.truncate(before + n)
            session.tokens.extend(list(rnd.draft_ids[:n]) + [next_id])
            reply = {"n_accepted": n, "next_id": next_id, "verify_s": elapsed, "batch_size": len(work),
                     "position": len(session.tokens)}
            session.last_position, session.last_draft, session.last_reply = rnd.position, tuple(rnd.draft_ids), reply
            session.last_used = now
            self.tokens_generated += n + 1
            replies[i] = reply

    def info(self) -> dict:
        with self._lock:
            n = len(self.sessions)
        return {"sessions": n, "vocab_size": self.vocab_size, "forwards": self.forwards, "forward_s": self.forward_s,
                "tokens_generated": self.tokens_generated, "model_fingerprint": self.model_fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "mean_batch": sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0}
