"""`fedge cloud serve`: Ray start-up, the verifier as Ray Serve deployments, and the gRPC ingress.

    fedge cloud serve --model smollm2-135m-instruct --port 50051 [--address RAY_ADDRESS]

Layout: this process starts (or joins) Ray and runs one Serve application per verifier shard,
each a single replica holding its sessions' KV caches in memory. Session ids name their shard
(`s<shard>-<hex>`), so the gRPC ingress (a grpc.aio server in this process) routes every round of
a session to the replica that holds its cache: strict session affinity with several replicas.
Within a replica a continuous-batching scheduler runs one target forward per step over every
Verify round that has arrived (any session, ragged drafts) plus one decoding step of every
cloud-only Generate in flight.

Limits, each refused with its own status code: sessions per replica (RESOURCE_EXHAUSTED), draft
length and malformed input (INVALID_ARGUMENT), message size (RESOURCE_EXHAUSTED, enforced by gRPC),
idle sessions expire (their next round gets NOT_FOUND), unknown sessions (NOT_FOUND), tokenizer or
base-model mismatch (FAILED_PRECONDITION), a round out of order (ABORTED).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import grpc

from fedge.cloud.adapters import CHUNK_BYTES, AdapterRegistry
from fedge.cloud.engine import Limits, Round, VerifierEngine, VerifierError
from fedge.protocol import fedge_pb2, fedge_pb2_grpc
from fedge.sampling import SamplingParams

DEFAULT_PORT = 50051


@dataclass
class _Generation:
    """A cloud-only generation in flight: where its tokens go, and when it ends."""

    queue: asyncio.Queue
    remaining: int
    stop: set[int]


@dataclass
class ServeConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    address: str | None = None  # join this Ray cluster; None starts a local one
    replicas: int = 1
    threads: int = 0  # torch threads per replica; 0 = all cores of this machine
    batch_wait_ms: float = 30.0  # at most this long a round waits for other sessions' rounds
    max_message_bytes: int = 1 << 20
    adapters_dir: str | None = None
    limits: Limits = field(default_factory=Limits)
    tls_dir: str | None = None  # a `fedge certs create` directory: mutual TLS, device certificates required


def _serve_deployment():
    """The Ray Serve deployment class (defined lazily: importing ray is slow and the edge never needs it)."""
    from ray import serve

    # access logs off: one line per Verify round would cost the cloud CPU we are measuring
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    class VerifierReplica:
        def __init__(self, config: dict, shard: int):
            import torch

            from fedge.models import load_model, model_fingerprint, tokenizer_fingerprint

            cfg = ServeConfig(**{**config, "limits": Limits(**config["limits"])})
            # Ray pins OMP threads to the actor's num_cpus (0 here); the forward wants the cores
            torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
            model, tokenizer = load_model(cfg.model)
            self.engine = VerifierEngine(model, model_fingerprint(model), tokenizer_fingerprint(tokenizer),
                                         cfg.limits, shard, tuple(AdapterRegistry(cfg.adapters_dir).versions()),
                                         adapters_root=cfg.adapters_dir)
            self.max_batch = cfg.limits.max_batch
            self.batch_wait_s = cfg.batch_wait_ms / 1000
            self.active_window_s = 2.0  # a session with a round this recent is expected back soon
            # continuous batching: rounds waiting for a forward, and cloud-only generations in flight
            self._pending: list[tuple[Round, asyncio.Future]] = []
            self._gens: dict[str, _Generation] = {}
            self._wakeup: asyncio.Event | None = None
            self._scheduler: asyncio.Task | None = None
            self._stop = threading.Event()
            threading.Thread(target=self._reap, daemon=True).start()

        def _reap(self) -> None:
            period = max(0.5, min(10.0, self.engine.limits.idle_timeout_s / 4))
            while not self._stop.wait(period):
                self.engine.expire_idle()

        def _ensure_scheduler(self) -> None:
            # created on first use, on the event loop that runs this replica's methods
            if self._scheduler is None or self._scheduler.done():
                self._wakeup = asyncio.Event()
                self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

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
                batch = self._pending[:self.max_batch]
                del self._pending[:len(batch)]
                room = self.max_batch - len(batch)
                gen_ids = list(self._gens)[:room]
                for sid in gen_ids:  # rotate, so more generations than `room` take turns
                    self._gens[sid] = self._gens.pop(sid)
                rounds = [r for r, _ in batch]
                for sid in gen_ids:
                    session = self.engine.sessions.get(sid)
                    rounds.append(Round(sid, len(session.tokens) if session else -1, []))
                try:
                    replies = await asyncio.to_thread(self.engine.verify_many, rounds)
                except Exception as exc:  # a bug: fail this step's callers, keep serving
                    replies = [VerifierError("INTERNAL", f"{type(exc).__name__}: {exc}").as_dict()] * len(rounds)
                for (_, fut), reply in zip(batch, replies, strict=False):
                    if not fut.done():
                        fut.set_result(reply)
                for sid, reply in zip(gen_ids, replies[len(batch):], strict=True):
                    gen = self._gens.get(sid)
                    if gen is None:
                        continue
                    gen.remaining -= 1
                    gen.queue.put_nowait(reply)
                    if "error" in reply or reply["next_id"] in gen.stop or gen.remaining <= 0:
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
            active = sum(1 for sess in list(self.engine.sessions.values())
                         if now_mono - sess.last_used < self.active_window_s)
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

        async def open_session(self, req: dict) -> dict:
            try:
                params = SamplingParams(**req["sampling"])
            except ValueError as exc:
                return VerifierError("INVALID_ARGUMENT", str(exc)).as_dict()
            try:
                # the prefill forward runs off the event loop so the scheduler keeps going
                return await asyncio.to_thread(
                    self.engine.open_session, req["tokenizer_fingerprint"], req["model_fingerprint"],
                    req["adapter_version"], params, req["prompt_ids"], req["seed"])
            except VerifierError as exc:
                return exc.as_dict()

        async def verify(self, rnd: dict) -> dict:
            self._ensure_scheduler()
            fut = asyncio.get_running_loop().create_future()
            self._pending.append((Round(**rnd), fut))
            self._wakeup.set()
            return await fut

        async def generate(self, session_id: str, max_new_tokens: int, stop_ids: list[int]):
            """Cloud-only serving: the scheduler adds one token per step; tokens that pile up
            while the consumer is busy are sent together."""
            self._ensure_scheduler()
            if session_id not in self.engine.sessions:
                yield [VerifierError("NOT_FOUND", f"unknown session {session_id!r}").as_dict()]
                return
            if session_id in self._gens:
                yield [VerifierError("ABORTED", "this session is already generating").as_dict()]
                return
            gen = _Generation(asyncio.Queue(), max_new_tokens, set(stop_ids))
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

        async def close_session(self, session_id: str) -> bool:
            return self.engine.close_session(session_id)

        async def info(self) -> dict:
            import psutil

            t = psutil.Process().cpu_times()
            return {**self.engine.info(), "process_cpu_s": t.user + t.system}

    return VerifierReplica


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)


def process_cpu_s() -> float:
    """User + system CPU seconds of this process alone."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


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


class VerifierIngress(fedge_pb2_grpc.VerifierServicer):
    """gRPC -> the replica that holds the session."""

    def __init__(self, handles: list, cfg: ServeConfig, static_info: dict, registry: AdapterRegistry):
        self.handles = handles
        self.cfg = cfg
        self.static = static_info
        self.registry = registry
        self._next = 0

    def _shard(self, session_id: str) -> int | None:
        # ids look like s<shard>-<hex>; anything else cannot be a session of this cloud
        if session_id.startswith("s") and "-" in session_id:
            head = session_id[1:session_id.index("-")]
            if head.isdigit() and int(head) < len(self.handles):
                return int(head)
        return None

    async def _call(self, context, coro) -> dict:
        try:
            result = await coro
        except Exception as exc:  # a bug or a dead replica: the client sees it, the server goes on
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"verifier replica failed: {type(exc).__name__}: {exc}")
        if isinstance(result, dict) and "error" in result:
            await context.abort(_status(result["error"]), result["message"])
        return result

    async def OpenSession(self, request, context):
        # new sessions go round-robin over the replicas; the id pins them there afterwards
        shard = self._next % len(self.handles)
        self._next += 1
        sampling = request.sampling
        req = {"tokenizer_fingerprint": request.tokenizer_fingerprint,
               "model_fingerprint": request.model_fingerprint, "adapter_version": request.adapter_version,
               "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k,
                            "top_p": sampling.top_p or 1.0},
               "prompt_ids": list(request.prompt_ids), "seed": request.seed}
        out = await self._call(context, self.handles[shard].open_session.remote(req))
        return fedge_pb2.OpenSessionReply(**out)

    async def _route(self, session_id: str, context) -> int:
        shard = self._shard(session_id)
        if shard is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {session_id!r}")
        return shard

    async def Verify(self, request, context):
        shard = await self._route(request.session_id, context)
        rnd = {"session_id": request.session_id, "position": request.position,
               "draft_ids": list(request.draft_ids),
               "draft_q": [(list(d.ids), list(d.probs)) for d in request.draft_q]}
        out = await self._call(context, self.handles[shard].verify.remote(rnd))
        return fedge_pb2.VerifyReply(**out)

    async def Generate(self, request, context):
        shard = await self._route(request.session_id, context)
        if request.max_new_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens must be > 0")
        stream = self.handles[shard].options(stream=True).generate.remote(
            request.session_id, request.max_new_tokens, list(request.stop_ids))
        async for replies in stream:
            tokens = []
            for reply in replies:
                if "error" in reply:
                    await context.abort(_status(reply["error"]), reply["message"])
                tokens.append(reply["next_id"])
            yield fedge_pb2.GenerateReply(token_ids=tokens)

    async def CloseSession(self, request, context):
        shard = await self._route(request.session_id, context)
        closed = await self._call(context, self.handles[shard].close_session.remote(request.session_id))
        return fedge_pb2.CloseSessionReply(closed=bool(closed))

    async def Health(self, request, context):
        infos = await asyncio.gather(*(h.info.remote() for h in self.handles))
        lim = self.cfg.limits
        return fedge_pb2.HealthReply(
            status="SERVING", model=self.cfg.model, model_fingerprint=self.static["model_fingerprint"],
            tokenizer_fingerprint=self.static["tokenizer_fingerprint"], vocab_size=self.static["vocab_size"],
            sessions=sum(i["sessions"] for i in infos), replicas=len(self.handles),
            max_sessions=lim.max_sessions * len(self.handles), max_draft_len=lim.max_draft_len,
            max_message_bytes=self.cfg.max_message_bytes, idle_timeout_s=lim.idle_timeout_s,
            cloud_cpu_s=process_tree_cpu_s(), target_forwards=sum(i["forwards"] for i in infos),
            tokens_generated=sum(i["tokens_generated"] for i in infos), forward_s=sum(i["forward_s"] for i in infos),
            serving_cpu_s=process_cpu_s() + sum(i["process_cpu_s"] for i in infos),
            adapter_versions=self.registry.versions())


class AdaptersIngress(fedge_pb2_grpc.AdaptersServicer):
    def __init__(self, registry: AdapterRegistry, chunk_bytes: int):
        self.registry = registry
        self.chunk_bytes = chunk_bytes

    async def Fetch(self, request, context):
        try:
            chunks = list(self.registry.chunks(request.version, self.chunk_bytes))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        for c in chunks:
            yield fedge_pb2.AdapterChunk(**asdict(c))


class CloudServer:
    """Ray + Serve deployments + the gRPC server, in this process."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.server: grpc.aio.Server | None = None
        self.bound_port: int | None = None

    def start_ray(self) -> list:
        import ray
        from ray import serve

        ray.init(address=self.cfg.address, include_dashboard=False, log_to_driver=True,
                 logging_level="warning", configure_logging=True)
        # no HTTP proxy (the gRPC ingress is ours, and two clouds on one host would fight over its port)
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
        replica = _serve_deployment()
        config = {**asdict(self.cfg), "limits": asdict(self.cfg.limits)}
        handles = []
        for shard in range(self.cfg.replicas):
            handles.append(serve.run(replica.bind(config, shard), name=f"fedge-verifier-{shard}",
                                     route_prefix=None))
        return handles

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        handles = await asyncio.to_thread(self.start_ray)
        # fingerprints for Health, from the weights the replicas actually loaded
        static = await handles[0].info.remote()
        registry = AdapterRegistry(self.cfg.adapters_dir)
        opts = [("grpc.max_receive_message_length", self.cfg.max_message_bytes),
                ("grpc.max_send_message_length", self.cfg.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=opts)
        fedge_pb2_grpc.add_VerifierServicer_to_server(VerifierIngress(handles, self.cfg, static, registry),
                                                      self.server)
        # chunks stay under the message limit (leaving room for the chunk's other fields)
        chunk_bytes = max(1024, min(CHUNK_BYTES, self.cfg.max_message_bytes - 1024))
        fedge_pb2_grpc.add_AdaptersServicer_to_server(AdaptersIngress(registry, chunk_bytes), self.server)
        if self.cfg.tls_dir:
            from fedge.protocol.tls import server_credentials

            credentials = server_credentials(self.cfg.tls_dir, require_client_auth=True)
            self.bound_port = self.server.add_secure_port(f"{self.cfg.host}:{self.cfg.port}", credentials)
        else:
            self.bound_port = self.server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.bound_port == 0:
            raise RuntimeError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        print(f"fedge cloud: serving {self.cfg.model} on {self.cfg.host}:{self.bound_port} "
              f"({self.cfg.replicas} replica(s), Ray {'at ' + self.cfg.address if self.cfg.address else 'local'})",
              flush=True)
        if ready is not None:
            ready.set()
        await self.server.wait_for_termination()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)


def main(args: argparse.Namespace) -> int:
    limits = Limits(max_sessions=args.max_sessions, max_draft_len=args.max_draft_len,
                    idle_timeout_s=args.idle_timeout_s, max_batch=args.max_batch)
    cfg = ServeConfig(model=args.model, host=args.host, port=args.port, address=args.address,
                      replicas=args.replicas, threads=args.threads, batch_wait_ms=args.batch_wait_ms,
                      max_message_bytes=args.max_message_bytes, adapters_dir=args.adapters, limits=limits)
    server = CloudServer(cfg)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        await server.serve()

    start = time.perf_counter()
    try:
        asyncio.run(run())
    except RuntimeError as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # shutting down: nothing left to report to
            pass
    print(f"fedge cloud: stopped after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
