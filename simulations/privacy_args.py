"""Options of `fedge privacy ...` (light: no heavy imports, so `fedge --help` stays fast)."""

from __future__ import annotations


def add_privacy_arguments(sub) -> None:
    """`fedge privacy dp` and `fedge privacy secagg-time` (handlers in fedge.simulations.privacy)."""
    dp = sub.add_parser("dp", help="membership inference, canary exposure, utility vs epsilon (DP + secagg)")
    dp.add_argument("--model", default="tiny-random-llama")
    dp.add_argument("--epsilons", default="inf,8,4,1")
    dp.add_argument("--delta", type=float, default=1e-3, help="below 1/number of clients")
    dp.add_argument("--clip", type=float, default=0.05, help="client update L2 clip norm C")
    dp.add_argument("--clients", type=int, default=10)
    dp.add_argument("--clients-per-round", type=int, default=10)
    dp.add_argument("--rounds", type=int, default=4)
    dp.add_argument("--steps", type=int, default=8, help="local steps per round")
    dp.add_argument("--batch-size", type=int, default=4)
    dp.add_argument("--seq-len", type=int, default=96)
    dp.add_argument("--lr", type=float, default=2e-2)
    dp.add_argument("--rank", type=int, default=8)
    dp.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    dp.add_argument("--examples-per-client", type=int, default=8)
    dp.add_argument("--eval-examples", type=int, default=4, help="member and non-member windows per client")
    dp.add_argument("--canary-repeats", type=int, default=4)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--json", default="privacy-dp.json")
    t = sub.add_parser("secagg-time", help="secure-aggregation vs plain round time at 0/10/30%% dropout")
    t.add_argument("--model", default="tiny-random-llama")
    t.add_argument("--clients", type=int, default=20)
    t.add_argument("--clients-per-round", type=int, default=20)
    t.add_argument("--partition", default="iid")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--dropouts", default="0,0.1,0.3")
    t.add_argument("--steps", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--crypto-vector-length", type=int, default=184_320,
                   help="default: FFA lora_B of q,v at rank 8 on SmolLM2-135M")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", default="privacy-secagg-time.json")
