"""Continuous batching on one verifier replica: a plain asyncio class, no Ray.

Verify rounds arrive from many sessions at their own pace; cloud-only generations want one token
per step for as long as they run. The scheduler runs one target forward per step over every round
that is ready (`VerifierEngine.verify_many`): the Verify rounds that arrived, from any session, plus
one decoding step of every cloud-only generation in flight. The forward runs in a worker thread, so
the event loop keeps accepting rounds while it computes; those rounds make the next step.

The Ray Serve replica (`fedge.cloud.verifier_deployment`) is thin glue over this class, and the
tests drive it directly (tests/test_scheduler.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fedge.cloud.engine import OpenedSession, Refusal, RefusalCode, Round, RoundReply, VerifierEngine, VerifierError
from fedge.sampling import SamplingParams


@dataclass
class OpenRequest:
    """What an edge sends to open a session (the gRPC OpenSessionRequest, decoded)."""

    tokenizer_fingerprint: str
    model_fingerprint: str
    adapter_version: str
    sampling: SamplingParams
    prompt_ids: list[int]
    seed: int = 0
    device_id: str = ""  # from the caller's certificate; the session will belong to it


@dataclass
class _Generation:
    """A cloud-only generation in flight: where its tokens go, and when it ends."""

    queue: asyncio.Queue
    remaining: int
    stop: set[int]
    device_id: str = ""


class ContinuousBatchScheduler:
    """Collects rounds on the running event loop and runs them in shared target forwards."""

    def __init__(self, engine: VerifierEngine, batch_wait_s: float, active_window_s: float = 2.0):
        self.engine = engine
        self.max_batch = engine.limits.max_batch
        self.batch_wait_s = batch_wait_s  # at most this long a round waits for other sessions' rounds
        self.active_window_s = active_window_s  # a session with a round this recent is expected back soon
        self._pending: list[tuple[Round, asyncio.Future]] = []  # rounds waiting for a forward
        self._gens: dict[str, _Generation] = {}  # cloud-only generations in flight
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ---- requests ---------------------------------------------------------------------------
    async def open_session(self, req: OpenRequest) -> OpenedSession | Refusal:
        try:
            # the prefill forward runs off the event loop so the scheduler keeps going
            return await asyncio.to_thread(
                self.engine.open_session, req.tokenizer_fingerprint, req.model_fingerprint,
                req.adapter_version, req.sampling, req.prompt_ids, req.seed, req.device_id)
        except VerifierError as exc:
            return exc.refusal()
        except Exception as exc:  # a bug: INTERNAL (final), never a dead-replica status the edge would retry
            return Refusal(RefusalCode.INTERNAL, f"{type(exc).__name__}: {str(exc)[:200]}")

    async def verify(self, rnd: Round) -> RoundReply | Refusal:
        rnd.arrived = time.perf_counter()  # its reply's queue_s counts from here
        self._ensure_running()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((rnd, fut))
        self._wakeup.set()
        return await fut

    async def generate(self, session_id: str, max_new_tokens: int, stop_ids: list[int], device_id: str = ""
                       ) -> AsyncIterator[list[RoundReply | Refusal]]:
        """Cloud-only serving: one token per step; tokens that pile up while the consumer is busy
        come together. A refusal ends the stream; a consumer that goes away (cancelled, closed)
        leaves the batch before the next step."""
        self._ensure_running()
        try:
            self.engine.session_for(session_id, device_id)
        except VerifierError as exc:
            yield [exc.refusal()]
            return
        if session_id in self._gens:
            yield [Refusal(RefusalCode.ABORTED, "this session is already generating")]
            return
        gen = _Generation(asyncio.Queue(), max_new_tokens, set(stop_ids), device_id)
        self._gens[session_id] = gen
        self._wakeup.set()
        try:
            while True:
                items = [await gen.queue.get()]
                while not gen.queue.empty():
                    items.append(gen.queue.get_nowait())
                done = items[-1] is None
                items = [i for i in items if i is not None]
                if items:
                    yield items
                if done:
                    return
        finally:
            self._gens.pop(session_id, None)  # the caller went away: stop generating for it

    def close_session(self, session_id: str, device_id: str = "") -> bool | Refusal:
        try:
            closed = self.engine.close_session(session_id, device_id)
        except VerifierError as exc:
            return exc.refusal()
        gen = self._gens.pop(session_id, None)
        if gen is not None:  # a generation of a closed session ends now
            gen.queue.put_nowait(None)
        return closed

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # ---- the loop ---------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        # created on first use, on the event loop that serves the requests
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._schedule())

    async def _schedule(self) -> None:
        """One target forward per step over every round that is ready: the Verify rounds that
        arrived (from any session) and one decoding step of every cloud-only generation.

        Cloud-only sessions never leave the batch between tokens (no network round trip per
        step), which is the strongest cloud-only baseline this replica can offer."""
        assert self._wakeup is not None
        while True:
            if not self._pending and not self._gens:
                self._wakeup.clear()
                await self._wakeup.wait()
            if not self._gens and self.batch_wait_s > 0:
                await self._gather_rounds()
            await self._step()

    async def _step(self) -> None:
        batch = self._pending[:self.max_batch]
        del self._pending[:len(batch)]
        room = self.max_batch - len(batch)
        gen_ids = list(self._gens)[:room]
        for sid in gen_ids:  # rotate, so more generations than `room` take turns
            self._gens[sid] = self._gens.pop(sid)
        rounds = [r for r, _ in batch]
        for sid in gen_ids:
            entry = self.engine.sessions.get(sid)
            rounds.append(Round(sid, len(entry.tokens) if entry else -1, [], device_id=self._gens[sid].device_id,
                                arrived=time.perf_counter()))
        try:
            replies = await asyncio.to_thread(self.engine.verify_many, rounds)
        except Exception as exc:  # a bug: fail this step's callers, keep serving
            replies = [VerifierError("INTERNAL", f"{type(exc).__name__}: {exc}").refusal()] * len(rounds)
        for (_, fut), reply in zip(batch, replies, strict=False):
            if not fut.done():
                fut.set_result(reply)
        for sid, reply in zip(gen_ids, replies[len(batch):], strict=True):
            gen = self._gens.get(sid)
            if gen is None:
                continue
            gen.remaining -= 1
            gen.queue.put_nowait(reply)
            if isinstance(reply, Refusal) or reply.next_id in gen.stop or gen.remaining <= 0:
                gen.queue.put_nowait(None)
                del self._gens[sid]

    async def _gather_rounds(self) -> None:
        """Hold the forward until every recently active session has its round in (they then
        share one forward, and their next rounds tend to arrive together again), but never
        longer than batch_wait after the first round arrived. Costs a phone up to batch_wait of
        latency; buys the cloud fewer, fuller forwards (capacity)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        now_mono = time.monotonic()
        active = sum(1 for entry in list(self.engine.sessions.values())
                     if now_mono - entry.last_used < self.active_window_s)
        want = min(self.max_batch, max(active, 1))
        while len(self._pending) < want:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except TimeoutError:
                return
