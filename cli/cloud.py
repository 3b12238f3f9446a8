"""`fedge cloud serve`: the cloud coordinator (Ray Serve verifier behind a gRPC ingress)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    cloud = subparsers.add_parser("cloud", help="the cloud coordinator").add_subparsers(dest="action", required=True)
    _add_serve(cloud)


def _add_serve(cloud: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    serve = cloud.add_parser("serve", help="Ray + Ray Serve verifier (batched) behind a gRPC ingress")
    serve.add_argument("--model", default=DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    serve.add_argument("--replicas", type=int, default=1, help="verifier replicas; sessions stick to theirs")
    serve.add_argument("--autoscale-min", type=int, default=None,
                       help="with --autoscale-max: Serve autoscales the verifier between these replica counts")
    serve.add_argument("--autoscale-max", type=int, default=None)
    serve.add_argument("--autoscale-target", type=float, default=8.0,
                       help="ongoing requests (rounds in flight) per replica the autoscaler aims at")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves in Ray")
    serve.add_argument("--max-replicas-per-node", type=int, default=None,
                       help="at most this many replicas on one Ray node (1 spreads them over nodes)")
    serve.add_argument("--threads", type=int, default=0, help="torch threads per replica (0 = all cores)")
    serve.add_argument("--max-sessions", type=int, default=64, help="per replica")
    serve.add_argument("--max-draft-len", type=int, default=16)
    serve.add_argument("--max-batch", type=int, default=32, help="rounds in one target forward")
    serve.add_argument("--batch-wait-ms", type=float, default=30.0,
                       help="at most this long a round waits for other active sessions' rounds to share a forward")
    serve.add_argument("--idle-timeout-s", type=float, default=300.0)
    serve.add_argument("--max-sessions-per-device", type=int, default=8,
                       help="per replica, for each authenticated device (mutual TLS)")
    serve.add_argument("--max-tokens-per-device", type=int, default=32768,
                       help="tokens one authenticated device may hold over its sessions, per replica")
    serve.add_argument("--prefill-chunk", type=int, default=256,
                       help="long prompts are prefilled this many tokens at a time, other rounds in between")
    serve.add_argument("--tls-dir", default=None,
                       help="a `fedge certs create` directory: mutual TLS, sessions bound to the device certificate")
    serve.add_argument("--revoked", default=None,
                       help="revoked device ids, one a line (default: <tls-dir>/revoked.txt, re-read on change)")
    serve.add_argument("--max-message-bytes", type=int, default=1 << 20)
    serve.add_argument("--adapters", default=None, help="adapter registry dir (one sub-dir per version)")
    serve.add_argument("--adapter-pubkey", default=None,
                       help="Ed25519 public key (PEM, e.g. from `fedge certs create`); only versions signed "
                            "with it are served")
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from fedge.cloud.engine import Limits
    from fedge.cloud.serve import ServeConfig, serve
    from fedge.cloud.verifier_deployment import Scaling

    limits = Limits(max_sessions=args.max_sessions, max_draft_len=args.max_draft_len,
                    idle_timeout_s=args.idle_timeout_s, max_batch=args.max_batch,
                    max_sessions_per_device=args.max_sessions_per_device,
                    max_tokens_per_device=args.max_tokens_per_device, prefill_chunk=args.prefill_chunk)
    try:
        scaling = Scaling(replicas=args.replicas, autoscale_min=args.autoscale_min, autoscale_max=args.autoscale_max,
                          target_ongoing_requests=args.autoscale_target, cpus_per_replica=args.cpus_per_replica,
                          max_replicas_per_node=args.max_replicas_per_node)
    except ValueError as exc:
        raise SystemExit(f"fedge cloud serve: {exc}") from None
    return serve(ServeConfig(model=args.model, host=args.host, port=args.port, address=args.address,
                             scaling=scaling, threads=args.threads, batch_wait_ms=args.batch_wait_ms,
                             max_message_bytes=args.max_message_bytes, adapters_dir=args.adapters,
                             adapter_pubkey=args.adapter_pubkey, limits=limits, tls_dir=args.tls_dir,
                             revoked_file=args.revoked))
