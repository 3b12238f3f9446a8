"""`fedge edge generate`: draft on the device, verify in the cloud, keep going offline."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    edge = subparsers.add_parser("edge", help="the edge device").add_subparsers(dest="action", required=True)
    _add_generate(edge)


def _add_generate(edge: argparse._SubParsersAction) -> None:
    edge_gen = edge.add_parser("generate", help="draft here, verify in the cloud (keeps going offline)")
    edge_gen.add_argument("--server", default="127.0.0.1:50051")
    edge_gen.add_argument("--draft", required=True, help="a directory made by `fedge draft build`")
    edge_gen.add_argument("--prompt", required=True)
    edge_gen.add_argument("--max-new-tokens", type=int, default=64)
    edge_gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    edge_gen.add_argument("--top-k", type=int, default=0)
    edge_gen.add_argument("--top-p", type=float, default=1.0)
    edge_gen.add_argument("--k", default="auto", help="draft length per round: auto or N")
    edge_gen.add_argument("--k-max", type=int, default=8)
    edge_gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    edge_gen.add_argument("--seed", type=int, default=0)
    edge_gen.add_argument("--reconcile-wait-s", type=float, default=10.0,
                          help="at the end, how long to wait for a lost cloud to verify the offline tail")
    edge_gen.add_argument("--tls-dir", default=None, help="a `fedge certs create` directory: mutual TLS to the cloud")
    edge_gen.add_argument("--device-id", default=None, help="this device's id (its certificate in --tls-dir)")
    edge_gen.add_argument("--rtt-ms", type=float, default=0.0, help="emulated network (testing)")
    edge_gen.add_argument("--jitter-ms", type=float, default=0.0)
    edge_gen.add_argument("--bandwidth-mbps", type=float, default=0.0)
    edge_gen.add_argument("--loss", type=float, default=0.0)
    edge_gen.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from fedge.edge.client import EdgeClient, EdgeConfig, EdgeError, NetworkProfile
    from fedge.edge.draft import DraftError
    from fedge.edge.local_generate import parse_k
    from fedge.sampling import SamplingParams

    try:
        network = NetworkProfile(args.rtt_ms, args.jitter_ms, args.bandwidth_mbps, args.loss)
        cfg = EdgeConfig(server=args.server, k_max=args.k_max, fixed_k=parse_k(args.k),
                         reconcile_wait_s=args.reconcile_wait_s, network=network, tls_dir=args.tls_dir,
                         device_id=args.device_id)
        client = EdgeClient.from_draft_dir(args.server, args.draft, cfg)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except (DraftError, EdgeError, ValueError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    print(args.prompt, end="", flush=True)
    try:
        _, result = client.generate(args.prompt, args.max_new_tokens, params, args.seed, args.chat,
                                    _printer(client.tokenizer))
    except EdgeError as exc:
        print(f"\nfedge: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print()
    s = result.stats
    spans = result.unverified_spans
    print(f"[{len(result.token_ids)} tokens in {s.wall_s:.2f} s, {s.rounds} rounds, acceptance "
          f"{s.acceptance_rate:.2f}, mean k {sum(s.ks) / max(1, len(s.ks)):.1f}; offline tokens {s.offline_tokens} "
          f"({s.offline_kept} kept by the cloud), reconnects {s.reconnects}, "
          f"{'all verified' if not spans else f'unverified spans {spans}'}]", file=sys.stderr)
    return 0


def _printer(tok):
    """Prints text as the edge decides it: unverified text dimmed (or bracketed), rewrites announced."""
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("[unverified:", "]")

    def show(kind: str, tokens: list[int]) -> None:
        text = tok.decode(tokens, skip_special_tokens=True)
        if kind == "verified":
            print(text, end="", flush=True)
        elif kind == "unverified":
            print(dim + text + reset, end="", flush=True)
        else:
            print("\n[cloud is back; verified text so far:]\n" + text, end="", flush=True)

    return show
