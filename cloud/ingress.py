"""The gRPC ingress: decodes requests and calls the verifier deployment through one handle.

Session ids name the replica that holds them (`s<replica>-<hex>`); Serve's request router
(`fedge.cloud.session_router`) reads them and sends every round of a session to that replica,
so the ingress itself keeps no routing table and refuses ids that name no replica (NOT_FOUND).
Replicas answer with typed values (`fedge.cloud.engine`); a `Refusal` becomes the gRPC status of
the same name, a failed replica UNAVAILABLE. Nothing here computes: it is glue between protobuf
and the deployment's handle (a Ray Serve handle, or anything with the same `.remote` methods).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from fedge.cloud.adapter_registry import AdapterRegistry
from fedge.cloud.batching import clip
from fedge.cloud.engine import Limits, Refusal, ReplicaInfo, Round
from fedge.cloud.scheduler import OpenRequest
from fedge.cloud.verifier_deployment import process_cpu_s
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.protocol.tls import DeviceGate
from fedge.sampling import SamplingParams


def process_tree_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process and all its descendants (Ray's raylet, GCS and
    workers are children of the process that started Ray)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _status(refusal: Refusal) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, refusal.code.value, grpc.StatusCode.INTERNAL)


async def _device(gate: DeviceGate | None, context) -> str:
    """The caller's device id under mutual TLS (refused if revoked); "" without TLS, where the
    session id (128 random bits) is what binds a session to whoever opened it."""
    return "" if gate is None else await gate.require(context)


def session_owner(session_id: str) -> str | None:
    """The replica a session id names (`s<replica>-<hex>`), or None: then it is no session of this cloud."""
    if session_id.startswith("s") and "-" in session_id:
        owner = session_id[1:session_id.index("-")]
        return owner if owner.isalnum() and owner.isascii() else None
    return None


@dataclass(frozen=True)
class LiveReplica:
    replica_id: str  # Serve's unique id of the replica (what its session ids start with)
    node_id: str | None


_ROUTERS: dict[str, Any] = {}  # app name -> this process's `SessionAffinityRouter` for its verifier
_ROUTERS_LOCK = threading.Lock()


def register_router(app_name: str, router) -> None:
    """Called by the session router when Serve creates it in this process (the handle's)."""
    with _ROUTERS_LOCK:
        _ROUTERS[app_name] = router


def live_replicas(app_name: str) -> list[LiveReplica]:
    """The verifier replicas this process's router for `app_name` sees ([] before its first request)."""
    with _ROUTERS_LOCK:
        router = _ROUTERS.get(app_name)
    return router.live() if router is not None else []


class VerifierIngress(fedge_pb2_grpc.VerifierServicer):
    """gRPC -> the verifier deployment, whose router takes each session to its replica.

    `replicas` lists the live replicas' ids (for Health's totals, one `info` per replica); without
    it Health asks one replica."""

    def __init__(self, handle, model: str, limits: Limits, max_message_bytes: int, static: ReplicaInfo,
                 registry: AdapterRegistry, gate: DeviceGate | None = None,
                 replicas: Callable[[], list[str]] | None = None):
        self.gate = gate
        self.handle = handle
        self.model = model
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.static = static
        self.registry = registry
        self.replicas = replicas

    async def _call(self, context, coro) -> Any:
        try:
            result = await coro
        except Exception as exc:  # a bug or a dead replica: the client sees it, the server goes on
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"verifier replica failed: {type(exc).__name__}: {clip(str(exc), 200)}")
        if isinstance(result, Refusal):
            await context.abort(_status(result), result.message)
        return result

    async def _route(self, session_id: str, context) -> None:
        if session_owner(session_id) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {clip(session_id)}")

    async def replica_infos(self) -> list[ReplicaInfo]:
        """One `ReplicaInfo` per replica that answers (a dead one is left out)."""
        ids = self.replicas() if self.replicas is not None else []
        calls = [self.handle.info.remote(replica=r) for r in ids] if ids else [self.handle.info.remote()]
        infos = await asyncio.gather(*calls, return_exceptions=True)
        return [i for i in infos if isinstance(i, ReplicaInfo)]

    async def OpenSession(self, request, context):
        device_id = await _device(self.gate, context)
        if len(request.prompt_ids) > self.limits.max_session_tokens:  # before copying it anywhere
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"prompt of {len(request.prompt_ids)} tokens exceeds "
                                                              f"the session limit of {self.limits.max_session_tokens}")
        if request.adapter_version:  # the snapshot Health and Fetch see decides; the replica verifies again
            try:
                (await asyncio.to_thread(self.registry.snapshot, request.adapter_version)).get(request.adapter_version)
            except KeyError as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        sampling = request.sampling
        if not all(math.isfinite(x) for x in (sampling.temperature, sampling.top_p)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature and top_p must be finite")
        try:
            params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                                    top_p=sampling.top_p or 1.0)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, clip(str(exc), 200))
        req = OpenRequest(tokenizer_fingerprint=request.tokenizer_fingerprint,
                          model_fingerprint=request.model_fingerprint, adapter_version=request.adapter_version,
                          sampling=params, prompt_ids=list(request.prompt_ids), seed=request.seed,
                          device_id=device_id)
        opened = await self._call(context, self.handle.open_session.remote(req))
        return fedge_pb2.OpenSessionReply(**asdict(opened))

    async def Verify(self, request, context):
        device_id = await _device(self.gate, context)
        await self._route(request.session_id, context)
        if request.position < 0:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"position {request.position} is negative")
        if len(request.draft_ids) > self.limits.max_draft_len or len(request.draft_q) > self.limits.max_draft_len:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a draft holds at most "
                                                                  f"{self.limits.max_draft_len} tokens")
        rnd = Round(session_id=request.session_id, position=request.position, draft_ids=list(request.draft_ids),
                    draft_q=[(list(d.ids), list(d.probs)) for d in request.draft_q], device_id=device_id)
        reply = await self._call(context, self.handle.verify.remote(rnd))
        return fedge_pb2.VerifyReply(**asdict(reply))

    async def Generate(self, request, context):
        device_id = await _device(self.gate, context)
        await self._route(request.session_id, context)
        if request.max_new_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be > 0")
        if len(request.stop_ids) > 1024:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at most 1024 stop_ids")
        stream = self.handle.options(stream=True).generate.remote(
            request.session_id, request.max_new_tokens, list(request.stop_ids), device_id)
        try:
            async for replies in _guarded(stream, context):
                refusal = next((r for r in replies if isinstance(r, Refusal)), None)
                done = [r for r in replies if not isinstance(r, Refusal)]
                if done:
                    yield fedge_pb2.GenerateReply(token_ids=[r.next_id for r in done],
                                                  forward_s=sum(r.forward_s for r in done),
                                                  queue_s=sum(r.queue_s for r in done))
                if refusal is not None:
                    await context.abort(_status(refusal), refusal.message)
        finally:  # the caller went away (cancelled, disconnected) or the stream ended: stop computing for it
            stream.cancel()

    async def CloseSession(self, request, context):
        device_id = await _device(self.gate, context)
        await self._route(request.session_id, context)
        closed = await self._call(context, self.handle.close_session.remote(request.session_id, device_id))
        return fedge_pb2.CloseSessionReply(closed=bool(closed))

    async def Health(self, request, context):
        await _device(self.gate, context)
        infos = await self.replica_infos()
        if not infos:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no verifier replica answered")
        lim = self.limits
        ingress_cpu = process_cpu_s()
        return fedge_pb2.HealthReply(
            status="SERVING", model=self.model, model_fingerprint=self.static.model_fingerprint,
            tokenizer_fingerprint=self.static.tokenizer_fingerprint, vocab_size=self.static.vocab_size,
            sessions=sum(i.sessions for i in infos), replicas=len(infos),
            max_sessions=lim.max_sessions * len(infos), max_draft_len=lim.max_draft_len,
            max_message_bytes=self.max_message_bytes, idle_timeout_s=lim.idle_timeout_s,
            cloud_cpu_s=process_tree_cpu_s(), target_forwards=sum(i.forwards for i in infos),
            tokens_generated=sum(i.tokens_generated for i in infos), forward_s=sum(i.forward_s for i in infos),
            serving_cpu_s=ingress_cpu + sum(i.process_cpu_s for i in infos), ingress_cpu_s=ingress_cpu,
            adapter_versions=(await asyncio.to_thread(self.registry.snapshot)).versions(),
            **_costs(infos))


def _costs(infos: list[ReplicaInfo]) -> dict:
    """Health's cost fields: the curve of the first replica that measured one (replicas run the same
    model on like hardware), the mean load and the total of active sessions."""
    measured = next((i for i in infos if len(i.cost_positions) >= 2), None)
    return {"cost_positions": measured.cost_positions if measured else (),
            "cost_seconds": measured.cost_seconds if measured else (),
            "cost_context": measured.cost_context if measured else 0,
            "load": sum(i.load for i in infos) / len(infos), "active_sessions": sum(i.active_sessions for i in infos),
            "forward_path": ",".join(sorted({i.forward_path for i in infos if i.forward_path}))}


async def _guarded(stream, context):
    """A replica's stream whose failure (a dead replica, a bug) becomes UNAVAILABLE, never UNKNOWN."""
    try:
        async for item in stream:
            yield item
    except Exception as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"verifier replica failed: {type(exc).__name__}: {clip(str(exc), 200)}")


class AdaptersIngress(fedge_pb2_grpc.AdaptersServicer):
    """Published adapters to edges, in checksummed chunks under the message limit: the verified
    bytes of one registry snapshot (a refused version is NOT_FOUND, with its reason)."""

    def __init__(self, registry: AdapterRegistry, chunk_bytes: int, gate: DeviceGate | None = None):
        self.gate = gate
        self.registry = registry
        self.chunk_bytes = chunk_bytes

    async def Fetch(self, request, context):
        await _device(self.gate, context)
        try:
            snapshot = await asyncio.to_thread(self.registry.snapshot, request.version)
            chunks = list(snapshot.chunks(request.version, self.chunk_bytes))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        for c in chunks:
            yield fedge_pb2.AdapterChunk(**asdict(c))
