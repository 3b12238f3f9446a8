"""In-process speculative generation: `fedge draft build` and `fedge generate`, and their Python API.

    from fedge.simulations.generate import SpeculativeGenerator
    gen = SpeculativeGenerator.load("smollm2-135m-instruct", "drafts/int4")
    text, stats = gen.generate("def fibonacci(n):", max_new_tokens=64)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from fedge.edge.draft import DraftError, DraftSpec, build_draft, load_draft
from fedge.edge.speculative import DraftLengthController, DraftSession, GenerationStats, speculative_generate
from fedge.models import encode_prompt, load_model
from fedge.sampling import SamplingParams
from fedge.verifier_session import TargetVerifierSession


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

    @classmethod
    def load(cls, target_name: str, draft_dir: str) -> SpeculativeGenerator:
        target, tokenizer = load_model(target_name)
        draft, _, _ = load_draft(draft_dir, check_target=target)
        return cls(target=target, draft=draft, tokenizer=tokenizer)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 64,
                     params: SamplingParams | None = None, k: int | None = None, seed: int = 0,
                     on_tokens=None, stop_at_eos: bool = True) -> tuple[list[int], GenerationStats]:
        params = params or SamplingParams()
        verifier = TargetVerifierSession(self.target, prompt_ids, params, seed=seed)
        drafter = DraftSession(self.draft, prompt_ids, params, seed=seed)
        controller = DraftLengthController(k_max=self.k_max, fixed_k=k)
        eos = self.tokenizer.eos_token_id
        stop = {eos} if stop_at_eos and eos is not None else set()
        result = speculative_generate(drafter, verifier, max_new_tokens, controller, stop, on_tokens)
        return result.token_ids, result.stats

    def generate(self, prompt: str, max_new_tokens: int = 64, params: SamplingParams | None = None,
                 k: int | None = None, seed: int = 0, chat: bool = False,
                 on_text=None) -> tuple[str, GenerationStats]:
        ids = encode_prompt(self.tokenizer, prompt, chat)
        on_tokens = None
        if on_text is not None:
            def on_tokens(new: list[int]) -> None:
                on_text(self.tokenizer.decode(new, skip_special_tokens=True))
        out, stats = self.generate_ids(ids, max_new_tokens, params, k, seed, on_tokens)
        return self.tokenizer.decode(out, skip_special_tokens=True), stats


def main_build(args: argparse.Namespace) -> int:
    spec = DraftSpec(target=args.target, keep_layers=args.keep_layers, quant=args.quant,
                     group_size=args.group_size, distill_steps=args.distill_steps, distill_data=args.data,
                     seed=args.seed)
    try:
        info = build_draft(spec, args.out)
    except DraftError as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    print(f"draft written to {args.out}: {info.keep_layers}/{info.num_target_layers} layers, {info.quant}, "
          f"{info.bytes / 1e6:.1f} MB, target fingerprint {info.target_fingerprint}")
    if info.distill:
        print(f"distillation: {info.distill}")
    return 0


def main_generate(args: argparse.Namespace) -> int:
    try:
        gen = SpeculativeGenerator.load(args.target, args.draft)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        k = parse_k(args.k)
    except (DraftError, ValueError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    print(args.prompt, end="", flush=True)
    _, stats = gen.generate(args.prompt, args.max_new_tokens, params, k, args.seed, chat=args.chat,
                            on_text=lambda s: print(s, end="", flush=True))
    print()
    print(f"[{stats.generated} tokens in {stats.wall_s:.2f} s, {stats.rounds} target calls, "
          f"{stats.tokens_per_target_call:.2f} tokens/call, acceptance {stats.acceptance_rate:.2f}]",
          file=sys.stderr)
    return 0
