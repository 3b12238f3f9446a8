"""Session affinity as a Ray Serve request router: a session's rounds go to the replica holding its KV cache.

A verifier session is state (a KV cache) in one replica's memory, so unlike stateless serving, any
replica will not do: `SessionAffinityRouter` (Serve's `RequestRouter` API, set on the deployment
with `request_router_config`) reads the session id of each request and sends it to the replica
that opened it. Session ids name their replica (`s<replica unique id>-<128 random bits hex>`, the
engine's `shard`), so the router needs no table and any number of ingress processes agree.

- a new session (OpenSession) goes to the live replica this router has opened the fewest sessions
  on (round-robin among equals), then to any with room: sessions opened at once, or while one
  replica is slow to answer Serve's queue probe, still spread over every replica;
- a session's call goes to its replica only (if its queue is full, the router waits, it never
  sends the call elsewhere);
- a session whose replica is gone (node lost, scaled down) goes to any live replica, which
  answers NOT_FOUND: the edge reopens it there with its verified prefix (`fedge.edge`);
- `replica=<unique id>` (a keyword argument) addresses one replica (Health's per-replica counts).

Serve's own multiplexing (`multiplexed_model_id`) was the alternative; it is a preference (a busy
replica's request goes to another one, which would "load" the model) and an LRU of loaded models,
neither of which fits state that exists in one place only. Routers live in the process that holds
the deployment handle (Serve ships this module to it by value); they register there with
`fedge.cloud.ingress.register_router`, so that process's `live_replicas` lists what they see.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from fedge.cloud.ingress import LiveReplica, register_router, session_owner

IDLE_POLL_S = 0.005
OPEN_METHOD = "open_session"  # the replica method a new session calls (`VerifierReplica.open_session`)


def _target(request: PendingRequest | None) -> str | None:
    """The replica this request must go to: an explicit `replica=`, else its session's owner."""
    if request is None:
        return None
    if request.kwargs.get("replica"):
        return str(request.kwargs["replica"])
    first = request.args[0] if request.args else None
    session_id = request.kwargs.get("session_id", first if isinstance(first, str) else
                                    getattr(first, "session_id", None))
    return session_owner(session_id) if isinstance(session_id, str) else None


def _is_open(request: PendingRequest | None) -> bool:
    return request is not None and request.metadata.call_method == OPEN_METHOD


class SessionAffinityRouter(RequestRouter):
    """Routes by session id (see the module docstring); new sessions to the least-used replica."""

    def initialize_state(self, **kwargs) -> None:
        self._turn = itertools.count()
        self._opened: Counter[str] = Counter()  # sessions this router has sent to each replica
        register_router(self.app_name, self)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if pending_request is None:
            # a routing task with no request in hand (Serve keeps some alive while requests are in
            # flight, and one may have given up a request it took): route the oldest waiting one
            pending_request = self._oldest_waiting()
            if pending_request is None:
                await asyncio.sleep(IDLE_POLL_S)  # nothing waits: no busy spin on the router's loop
                return [ordered]
        target = _target(pending_request)
        if target is not None:
            owner = [r for r in ordered if r.replica_id.unique_id == target]
            if owner:
                return [owner]
        # a new session, a call without a session, or one whose replica is gone (it gets NOT_FOUND there)
        first = next(self._turn) % len(ordered)
        rotated = ordered[first:] + ordered[:first]
        if _is_open(pending_request):
            rotated.sort(key=lambda r: self._opened[r.replica_id.unique_id])  # stable: rotation breaks ties
        return [rotated[:1], rotated[1:]] if len(rotated) > 1 else [rotated]

    def _oldest_waiting(self) -> PendingRequest | None:
        return next((r for r in self._pending_requests_to_fulfill if not r.future.done()), None)

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """The routed request gets its replica (Serve's default); a replica found by a routing task
        with no request in hand goes to the oldest waiting request, only if it is that request's
        replica (or the request may go anywhere). Serve's base router drops the latter, which left a
        request that a retiring routing task had taken waiting forever."""
        if request_metadata is not None:
            if request_metadata.call_method == OPEN_METHOD:
                self._opened[replica.replica_id.unique_id] += 1
            super()._fulfill_next_pending_request(replica, request_metadata)
            return
        waiting = self._oldest_waiting()
        if waiting is None:
            return
        target = _target(waiting)
        live = {r.replica_id.unique_id for r in self.curr_replicas.values()}
        if target is None or target == replica.replica_id.unique_id or target not in live:
            if _is_open(waiting):
                self._opened[replica.replica_id.unique_id] += 1
            waiting.future.set_result(replica)
            self._remove_pending_request_from_indices(waiting)

    def live(self) -> list[LiveReplica]:
        return sorted((LiveReplica(r.replica_id.unique_id, r.node_id) for r in list(self.curr_replicas.values())),
                      key=lambda r: r.replica_id)
