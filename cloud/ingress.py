"""The gRPC ingress: decodes requests, routes each session's rounds to the replica that holds it.

Session ids name their shard (`s<shard>-<hex>`), so every round of a session goes to the replica
holding its KV cache: strict session affinity with several replicas. New sessions go round-robin.
Replicas answer with typed values (`fedge.cloud.engine`); a `Refusal` becomes the gRPC status of
the same name, a failed replica UNAVAILABLE. Nothing here computes: it is glue between protobuf
and the replicas' handles (Ray Serve handles, or anything with the same `.remote` methods).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import grpc

from fedge.cloud.adapter_registry import AdapterRegistry
from fedge.cloud.engine import Limits, Refusal, ReplicaInfo, Round
from fedge.cloud.scheduler import OpenRequest
from fedge.cloud.verifier_deployment import process_cpu_s
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
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


class VerifierIngress(fedge_pb2_grpc.VerifierServicer):
    """gRPC -> the replica that holds the session."""

    def __init__(self, handles: list, model: str, limits: Limits, max_message_bytes: int, static: ReplicaInfo,
                 registry: AdapterRegistry):
        self.handles = handles
        self.model = model
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.static = static
        self.registry = registry
        self._next = 0

    def _shard(self, session_id: str) -> int | None:
        # ids look like s<shard>-<hex>; anything else cannot be a session of this cloud
        if session_id.startswith("s") and "-" in session_id:
            head = session_id[1:session_id.index("-")]
            if head.isdigit() and int(head) < len(self.handles):
                return int(head)
        return None

    async def _call(self, context, coro) -> Any:
        try:
            result = await coro
        except Exception as exc:  # a bug or a dead replica: the client sees it, the server goes on
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"verifier replica failed: {type(exc).__name__}: {exc}")
        if isinstance(result, Refusal):
            await context.abort(_status(result), result.message)
        return result

    async def _route(self, session_id: str, context) -> int:
        shard = self._shard(session_id)
        if shard is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {session_id!r}")
        return shard

    async def OpenSession(self, request, context):
        if request.adapter_version:  # the snapshot Health and Fetch see decides; the replica verifies again
            try:
                (await asyncio.to_thread(self.registry.snapshot, request.adapter_version)).get(request.adapter_version)
            except KeyError as exc:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        # new sessions go round-robin over the replicas; the id pins them there afterwards
        shard = self._next % len(self.handles)
        self._next += 1
        sampling = request.sampling
        try:
            params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k,
                                    top_p=sampling.top_p or 1.0)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        req = OpenRequest(tokenizer_fingerprint=request.tokenizer_fingerprint,
                          model_fingerprint=request.model_fingerprint, adapter_version=request.adapter_version,
                          sampling=params, prompt_ids=list(request.prompt_ids), seed=request.seed)
        opened = await self._call(context, self.handles[shard].open_session.remote(req))
        return fedge_pb2.OpenSessionReply(**asdict(opened))

    async def Verify(self, request, context):
        shard = await self._route(request.session_id, context)
        rnd = Round(session_id=request.session_id, position=request.position, draft_ids=list(request.draft_ids),
                    draft_q=[(list(d.ids), list(d.probs)) for d in request.draft_q])
        reply = await self._call(context, self.handles[shard].verify.remote(rnd))
        return fedge_pb2.VerifyReply(**asdict(reply))

    async def Generate(self, request, context):
        shard = await self._route(request.session_id, context)
        if request.max_new_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be > 0")
        stream = self.handles[shard].options(stream=True).generate.remote(
            request.session_id, request.max_new_tokens, list(request.stop_ids))
        async for replies in stream:
            tokens = []
            for reply in replies:
                if isinstance(reply, Refusal):
                    await context.abort(_status(reply), reply.message)
                tokens.append(reply.next_id)
            yield fedge_pb2.GenerateReply(token_ids=tokens)

    async def CloseSession(self, request, context):
        shard = await self._route(request.session_id, context)
        closed = await self._call(context, self.handles[shard].close_session.remote(request.session_id))
        return fedge_pb2.CloseSessionReply(closed=bool(closed))

    async def Health(self, request, context):
        infos: list[ReplicaInfo] = await asyncio.gather(*(h.info.remote() for h in self.handles))
        lim = self.limits
        return fedge_pb2.HealthReply(
            status="SERVING", model=self.model, model_fingerprint=self.static.model_fingerprint,
            tokenizer_fingerprint=self.static.tokenizer_fingerprint, vocab_size=self.static.vocab_size,
            sessions=sum(i.sessions for i in infos), replicas=len(self.handles),
            max_sessions=lim.max_sessions * len(self.handles), max_draft_len=lim.max_draft_len,
            max_message_bytes=self.max_message_bytes, idle_timeout_s=lim.idle_timeout_s,
            cloud_cpu_s=process_tree_cpu_s(), target_forwards=sum(i.forwards for i in infos),
            tokens_generated=sum(i.tokens_generated for i in infos), forward_s=sum(i.forward_s for i in infos),
            serving_cpu_s=process_cpu_s() + sum(i.process_cpu_s for i in infos),
            adapter_versions=(await asyncio.to_thread(self.registry.snapshot)).versions())


class AdaptersIngress(fedge_pb2_grpc.AdaptersServicer):
    """Published adapters to edges, in checksummed chunks under the message limit: the verified
    bytes of one registry snapshot (a refused version is NOT_FOUND, with its reason)."""

    def __init__(self, registry: AdapterRegistry, chunk_bytes: int):
        self.registry = registry
        self.chunk_bytes = chunk_bytes

    async def Fetch(self, request, context):
        try:
            snapshot = await asyncio.to_thread(self.registry.snapshot, request.version)
            chunks = list(snapshot.chunks(request.version, self.chunk_bytes))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        for c in chunks:
            yield fedge_pb2.AdapterChunk(**asdict(c))
