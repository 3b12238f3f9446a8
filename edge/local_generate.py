"""In-process speculative generation: a machine holding both models runs draft and target itself.

    from fedge.edge.local_generate import SpeculativeGenerator
    gen = SpeculativeGenerator.load("smollm2-135m-instruct", "drafts/int4")
    text, stats = gen.generate("def fibonacci(n):", max_new_tokens=64)

The same loop as the edge client (`fedge.speculative.speculative_generate`), with the target's
`TargetVerifierSession` in this process instead of the cloud's behind gRPC, and dense q. Both
prompts are prefilled before the first round (so the first k is chosen from a round's costs), and a
draft derived from the target takes the target's prompt keys/values instead of computing its own:
one process holds both caches, and the int4 draft's prefill would cost more than the fp32 target's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedge.edge.draft import load_draft
from fedge.edge.drafter import Drafter
from fedge.models import encode_prompt, load_model
from fedge.sampling import SamplingParams
from fedge.speculative import DraftLengthController, GenerationStats, speculative_generate
from fedge.static_decoder import StaticSequence
from fedge.verifier_session import TargetVerifierSession

SHARED_KV_DEFAULT = "prefill"


@dataclass
class _TargetFedDrafter:
    """The drafter, whose cache takes the target's keys/values for each round's accepted tokens."""

    drafter: Drafter
    target_sequence: StaticSequence

    def propose(self, k: int):
        return self.drafter.propose(k)

    def accept(self, tokens: list[int]) -> None:
        self.drafter.accept(tokens)
        self.drafter.sequence.adopt_prefix(self.target_sequence)


def parse_k(value: str | int | None) -> int | None:
    """`auto` (None) or a fixed draft length."""
    if value in (None, "auto"):
        return None
    k = int(value)
    if k < 0:
        raise ValueError("k must be >= 0 or 'auto'")
    return k


@dataclass
class SpeculativeGenerator:
    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: object
    k_max: int = 8
    # the draft was derived from this target (`load_draft(check_target=...)` passed): it may take the
    # target's keys/values instead of computing its own (`StaticSequence.adopt_prefix`): "prefill" for
    # the prompt, "accepted" also for every accepted token after a round, "none"
    draft_shares_target_kv: str = "none"

    @classmethod
    def load(cls, target_name: str, draft_dir: str) -> SpeculativeGenerator:
        """The target from the model registry and a draft built from it (`fedge draft build`)."""
        target, tokenizer = load_model(target_name)
        draft, _, _ = load_draft(draft_dir, check_target=target)  # raises unless derived from this target
        return cls(target=target, draft=draft, tokenizer=tokenizer, draft_shares_target_kv=SHARED_KV_DEFAULT)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64,
                     params: SamplingParams | None = None, k: int | None = None, seed: int = 0,
                     on_tokens: Callable[[list[int]], None] | None = None,
                     stop_at_eos: bool = True) -> tuple[list[int], GenerationStats]:
        params = params or SamplingParams()
        verifier = TargetVerifierSession(self.target, prompt_ids, params, seed=seed)
        drafter = Drafter(self.draft, prompt_ids, params, seed=seed)
        verifier.sequence.prefill()  # both prompts now: k is then chosen from rounds, not from prefills
        proposer = drafter
        lean = isinstance(drafter.sequence, StaticSequence) and isinstance(verifier.sequence, StaticSequence)
        if not (lean and self.draft_shares_target_kv != "none" and drafter.sequence.adopt_prefix(verifier.sequence)):
            drafter.sequence.prefill()
        elif self.draft_shares_target_kv == "accepted":
            proposer = _TargetFedDrafter(drafter, verifier.sequence)
        controller = DraftLengthController(k_max=self.k_max, fixed_k=k)
        eos = self.tokenizer.eos_token_id
        stop = {eos} if stop_at_eos and eos is not None else set()
        result = speculative_generate(proposer, verifier, max_new_tokens, controller, stop, on_tokens)
        return result.token_ids, result.stats

    def generate(self, prompt: str, max_new_tokens: int = 64, params: SamplingParams | None = None,
                 k: int | None = None, seed: int = 0, chat: bool = False,
                 on_text: Callable[[str], None] | None = None) -> tuple[str, GenerationStats]:
        ids = encode_prompt(self.tokenizer, prompt, chat)
        on_tokens = None
        if on_text is not None:
            def on_tokens(new: list[int]) -> None:
                on_text(self.tokenizer.decode(new, skip_special_tokens=True))
        out, stats = self.generate_ids(ids, max_new_tokens, params, k, seed, on_tokens)
        return self.tokenizer.decode(out, skip_special_tokens=True), stats
