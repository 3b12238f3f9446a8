"""The edge's gRPC channel to the cloud, with an emulated phone network applied to each call.

`NetworkProfile` emulates a phone's link in this transport: one-way latency with jitter, a
bandwidth cost per byte, and TCP-style loss (a lost segment costs a retransmission timeout).
A channel is rebuilt on every reconnect, because an old one may sit in its own long backoff.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from fedge.protocol import fedge_pb2_grpc

# the cloud may come back: the edge drafts on and retries
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN}
# the cloud no longer holds the session (restart, idle expiry): reopen it with the verified prefix
SESSION_LOST = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}


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


class CloudLink:
    """A gRPC channel to the cloud with the emulated network applied to each call."""

    def __init__(self, server: str, network: NetworkProfile | None, timeout_s: float, credentials=None):
        self.server = server
        self.network = network
        self.timeout_s = timeout_s
        self.credentials = credentials  # grpc.ChannelCredentials for (m)TLS; None = plaintext
        self.channel: grpc.Channel | None = None
        self.stub: fedge_pb2_grpc.VerifierStub | None = None
        self.delay_s = 0.0  # emulated network time spent so far (calls; streams count their first message)
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
                self.delay_s += d
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
                for i, msg in enumerate(call):
                    extra = self.network.one_way_s(msg.ByteSize()) if self.network else 0.0
                    if i == 0:  # later messages' delays overlap the stream's own pace
                        self.delay_s += extra
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
