"""The edge's gRPC client: draft here, verify in the cloud, survive losing the cloud.

    client = EdgeClient.from_draft_dir("127.0.0.1:50051", "drafts/int4")
    text, result = client.generate("def fibonacci(n):", max_new_tokens=64)

A generation is the shared loop, `fedge.speculative.speculative_generate`, with the draft model
here (`Drafter`, sending a sparse top-m q when sampling) and the cloud's session as the verifier
(`RemoteVerifier`, wrapped by `OfflineTolerantVerifier` so that an outage becomes offline drafting
and later reconciliation). k comes from the measured round time (network included), draft time and
acceptance (`DraftLengthController`). `cloud_generate_ids` is the baseline: the cloud generates
every token and streams them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import torch

from fedge.edge.client_types import EdgeConfig, EdgeError, EdgeResult, EdgeStats
from fedge.edge.cloud_link import CloudLink, NetworkProfile
from fedge.edge.drafter import Drafter
from fedge.edge.offline_drafting import OfflineDeadline, OfflineTolerantVerifier, Transcript
from fedge.edge.remote_verifier import RemoteVerifier, refused
from fedge.models import encode_prompt
from fedge.protocol import fedge_pb2
from fedge.sampling import SamplingParams
from fedge.speculative import CostCurve, DraftLengthController, GenerationStats, speculative_generate

__all__ = ["CloudLink", "EdgeClient", "EdgeConfig", "EdgeError", "EdgeResult", "EdgeStats", "NetworkProfile"]


class EdgeClient:
    """One device's draft model and its link to the cloud; each generation opens its own cloud session."""

    def __init__(self, draft: torch.nn.Module, model_fingerprint: str, tokenizer_fingerprint: str,
                 config: EdgeConfig | None = None, tokenizer=None, adapter_version: str = "",
                 drafter_factory: Callable[..., Drafter] = Drafter):
        self.draft = draft
        # (draft, prompt_ids, params, seed, q_support=) -> Drafter; a simulation may draft elsewhere
        self.drafter_factory = drafter_factory
        # simulations: {prompt: {sequence length: the draft's greedy proposal}} (see PacedProposer)
        self.replay_drafts: dict[tuple[int, ...], dict[int, list[int]]] = {}
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
        self._costs: tuple[float, CostCurve | None, float] | None = None  # (when asked, curve, load)

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

    def cloud_costs(self) -> tuple[CostCurve | None, float]:
        """The cloud's cost curve and load from its Health reply (asked again every `cost_refresh_s`);
        (None, 0) from a cloud that reports none, or when Health does not answer."""
        now = time.monotonic()
        if self._costs is None or now - self._costs[0] > self.config.cost_refresh_s:
            curve, load = None, 0.0
            try:
                health = self.health(timeout_s=self.config.rpc_timeout_s)
                if len(health.cost_positions) >= 2 and len(health.cost_positions) == len(health.cost_seconds):
                    curve = CostCurve(tuple(health.cost_positions), tuple(health.cost_seconds))
                load = health.load or float(health.active_sessions)
            except (grpc.RpcError, ValueError):
                pass  # no curve: k comes from measured round times alone
            self._costs = (now, curve, load)
        return self._costs[1], self._costs[2]

    # ---- edge-assisted generation -------------------------------------------------------------
    def _open_request(self, prompt_ids: list[int], params: SamplingParams, seed: int) -> fedge_pb2.OpenSessionRequest:
        return fedge_pb2.OpenSessionRequest(
            tokenizer_fingerprint=self.tokenizer_fingerprint, model_fingerprint=self.model_fingerprint,
            adapter_version=self.adapter_version, prompt_ids=prompt_ids, seed=seed,
            sampling=fedge_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k,
                                              top_p=params.top_p))

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
        stats = EdgeStats()
        drafter = self.drafter_factory(self.draft, prompt_ids, params, seed, q_support=cfg.q_support)
        controller = DraftLengthController(k_max=cfg.k_max, fixed_k=cfg.fixed_k, draft_budget_s=cfg.draft_budget_s)
        curve, load = self.cloud_costs() if cfg.load_aware and cfg.fixed_k is None else (None, 0.0)
        remote = RemoteVerifier(self.link, self._open_request([], params, seed), prompt_ids, cfg.k_max, stats,
                                controller, curve, load)
        transcript = Transcript(stats, on_tokens or (lambda kind, tokens: None))

        def text_complete() -> bool:
            text = drafter.tokens[len(prompt_ids):]
            return len(text) >= max_new_tokens or any(t in stop_ids for t in text)

        verifier = OfflineTolerantVerifier(remote, drafter, transcript, cfg, text_complete)
        proposer = drafter if cfg.phone_tokens_per_s is None else \
            PacedProposer(drafter, cfg.phone_tokens_per_s, stats, self.replay_drafts.get(tuple(prompt_ids)))
        rounds = GenerationStats()
        network0 = self.link.delay_s
        start = time.perf_counter()
        try:
            out = speculative_generate(proposer, verifier, max_new_tokens, controller, stop_ids,
                                       transcript.add_verified, rounds).token_ids
        except OfflineDeadline:  # the tail stays draft-only
            out = _cut(transcript.shown, max_new_tokens, stop_ids)
        if verifier.online:
            remote.close()
        stats.drafted, stats.accepted, stats.ks = rounds.drafted, rounds.accepted, rounds.ks
        stats.rejected = rounds.rejected
        stats.draft_s += rounds.draft_s
        if cfg.phone_tokens_per_s is None:
            stats.draft_compute_s = stats.draft_s
        stats.network_s = self.link.delay_s - network0
        stats.wall_s = time.perf_counter() - start
        return EdgeResult(token_ids=out, verified=[i < transcript.verified for i in range(len(out))],
                          offline_spans=transcript.spans(len(out)), stats=stats)

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
        network0 = self.link.delay_s
        start = time.perf_counter()
        try:
            session = self.link.call("OpenSession", self._open_request(prompt_ids, SamplingParams(), 0)).session_id
        except grpc.RpcError as exc:
            raise refused("to open a session", exc) from None
        out: list[int] = []
        last = start
        try:
            next_message = self.link.stream("Generate", fedge_pb2.GenerateRequest(
                session_id=session, max_new_tokens=max_new_tokens, stop_ids=sorted(stop_ids)))
            while (item := next_message()) is not None:
                msg, at = item
                out.extend(msg.token_ids)
                stats.forward_s += msg.forward_s
                stats.queue_s += msg.queue_s
                stats.token_latency_s.extend([(at - last) / len(msg.token_ids)] * len(msg.token_ids))
                last = at
        except grpc.RpcError as exc:  # the cloud ended the stream with a refusal or went away: say so, once
            raise refused("to generate", exc) from None
        finally:
            try:
                self.link.call("CloseSession", fedge_pb2.CloseSessionRequest(session_id=session), 2.0)
            except grpc.RpcError:
                pass
        stats.rounds = len(out)
        stats.network_s = self.link.delay_s - network0
        stats.wall_s = time.perf_counter() - start
        return EdgeResult(token_ids=out, verified=[True] * len(out), offline_spans=[], stats=stats)


class PacedProposer:
    """A `Proposer` for an emulated device: k drafts take exactly k / tokens_per_s as the phone sees
    it. A computation that finished early is waited out; one that ran late (this machine was busy) is
    counted in `stats.draft_overrun_s`.

    `replay` (simulations, greedy only): the draft's own greedy proposals after each verified length,
    computed beforehand with the same draft model ({sequence length: draft ids}); a round whose
    proposal is there takes it instead of computing it again now, so N simulated phones need not
    share this machine's cores with the cloud they measure. Anything else is drafted live."""

    def __init__(self, drafter: Drafter, tokens_per_s: float, stats: EdgeStats,
                 replay: dict[int, list[int]] | None = None):
        if not tokens_per_s > 0:
            raise EdgeError(f"phone_tokens_per_s must be > 0, not {tokens_per_s}")
        self.drafter, self.tokens_per_s, self.stats = drafter, tokens_per_s, stats
        self.replay = replay if drafter.params.greedy else None

    def propose(self, k: int):
        start = time.perf_counter()
        proposal = self._replayed(k) or self.drafter.propose(k)
        real = time.perf_counter() - start
        budget = k / self.tokens_per_s
        self.stats.draft_compute_s += real
        if real < budget:
            time.sleep(budget - real)
        else:
            self.stats.draft_overrun_s += real - budget
        return proposal

    def _replayed(self, k: int):
        drafts = None if self.replay is None or self.drafter.unverified else self.replay.get(len(self.drafter.tokens))
        if drafts is None or len(drafts) < k:
            return None
        self.stats.draft_replayed += 1
        return list(drafts[:k]), ([] if self.drafter.q_support is not None else None)

    def accept(self, tokens: list[int]) -> None:
        self.drafter.accept(tokens)


def _cut(tokens: list[int], max_new_tokens: int, stop_ids: set[int] | frozenset[int]) -> list[int]:
    """A stop token ends the text; so does the length limit."""
    stop_at = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    return tokens[:min(max_new_tokens, len(tokens) if stop_at is None else stop_at + 1)]
