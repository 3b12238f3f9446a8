"""`fedge draft build` and `fedge generate`: compressed drafts and in-process speculative generation."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    draft = subparsers.add_parser("draft", help="compressed drafts").add_subparsers(dest="action", required=True)
    _add_build(draft)
    _add_generate(subparsers)


def _add_build(draft: argparse._SubParsersAction) -> None:
    from fedge.data import SOURCES_HELP
    from fedge.models import DEFAULT_MODEL

    build = draft.add_parser("build", help="derive a draft from a target: keep layers, quantise, distil")
    build.add_argument("--target", default=DEFAULT_MODEL)
    build.add_argument("--keep-layers", type=int, default=None, help="first N decoder layers (default: all)")
    build.add_argument("--quant", choices=["none", "int8", "int4"], default="int4")
    build.add_argument("--group-size", type=int, default=32, help="int4 group size along the input dim")
    build.add_argument("--distill-steps", type=int, default=0)
    build.add_argument("--data", default="stdlib", help=f"distillation text: {SOURCES_HELP}")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", required=True)
    build.set_defaults(func=_build)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    gen = subparsers.add_parser("generate", help="speculative generation, draft and target in this process")
    gen.add_argument("--target", default=DEFAULT_MODEL)
    gen.add_argument("--draft", required=True, help="a directory made by `fedge draft build`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--k", default="auto", help="draft length per round: auto or N")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)


def _build(args: argparse.Namespace) -> int:
    from fedge.edge.draft import DraftError, DraftSpec, build_draft

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


def _generate(args: argparse.Namespace) -> int:
    from fedge.edge.draft import DraftError
    from fedge.edge.local_generate import SpeculativeGenerator, parse_k
    from fedge.sampling import SamplingParams

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
