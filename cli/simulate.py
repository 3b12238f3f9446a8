"""`fedge simulate federated|phones`: federated fine-tuning and phones against a real cloud."""

from __future__ import annotations

import argparse

from fedge.cli._lazy import run_lazily
from fedge.cli.outputs import default_output, run_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    simulate = subparsers.add_parser("simulate", help="simulations: federated fine-tuning, phones").add_subparsers(
        dest="action", required=True)
    _add_federated(simulate)
    _add_phones(simulate)


def _add_federated(simulate: argparse._SubParsersAction) -> None:
    fed_sim = simulate.add_parser("federated", help="federated LoRA on Flower + Ray (LoRA-aware aggregation)")
    _add_federated_run_options(fed_sim)
    _add_federated_training_options(fed_sim)
    fed_sim.add_argument("--faults", default="",
                         help="misbehaving clients PID:KIND[@ROUND],... (nan, inf, shape, crash, slow, hang)")
    _add_federated_privacy_options(fed_sim)
    fed_sim.add_argument("--ray-address", default="",
                         help="run on this existing Ray cluster (e.g. 10.0.0.5:6379 from `ray start --head`)")
    fed_sim.add_argument("--local-only-clients", type=int, default=5)
    fed_sim.add_argument("--no-baselines", action="store_true", help="skip centralised and local-only runs")
    fed_sim.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoints/METHOD")
    fed_sim.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    fed_sim.add_argument("--out", default=str(run_dir("simulate-federated")),
                         help="adapters, plot and report go here (default: runs/simulate-federated-DATE)")
    fed_sim.add_argument("--json", default=None, help="the JSON report (default: OUT/federated.json)")
    fed_sim.set_defaults(func=_federated)


def _add_federated_run_options(parser: argparse.ArgumentParser) -> None:
    from fedge.cloud.federated_config import STRATEGIES, FederatedConfig
    from fedge.data import PARTITIONS_HELP, SOURCES_HELP
    from fedge.models import DEFAULT_MODEL
    from fedge.peft_methods.config import METHODS

    d = FederatedConfig()
    parser.add_argument("--clients", type=int, default=d.num_clients, help="number of clients (natural: at most)")
    parser.add_argument("--clients-per-round", type=int, default=d.clients_per_round)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--method", default=d.method,
                        help=f"{' | '.join(METHODS)}; a comma list or 'all' runs them back to back")
    parser.add_argument("--strategy", default=d.strategy, choices=list(STRATEGIES),
                        help="Flower server strategy around the LoRA-aware aggregation")
    parser.add_argument("--data", default=d.data, help=SOURCES_HELP)
    parser.add_argument("--partition", default=d.partition, help=PARTITIONS_HELP)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--round-timeout", type=float, default=d.round_timeout)
    parser.add_argument("--min-clients", type=int, default=d.min_clients)
    parser.add_argument("--noop-rounds", type=int, default=d.noop_rounds, help="overhead measurement rounds")
    parser.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out examples per client")
    parser.add_argument("--eval-clients", type=int, default=d.eval_clients,
                        help="evaluate on a seeded sample of this many clients (0 = all)")


def _add_federated_privacy_options(parser: argparse.ArgumentParser) -> None:
    from fedge.cloud.federated_config import FederatedConfig

    d = FederatedConfig()
    parser.add_argument("--secagg", action="store_true",
                        help="train rounds under secure aggregation (the server sees only the sum)")
    parser.add_argument("--secagg-threshold", type=float, default=d.secagg_threshold,
                        help="fewest survivors, a fraction of the round's clients (raised to max(3, 2n/3))")
    parser.add_argument("--dp-epsilon", type=float, default=d.dp_epsilon,
                        help="client-level DP budget for the whole run (0 = off; inf = clip only, no noise); "
                             "the noise multiplier is calibrated to spend it over --rounds")
    parser.add_argument("--dp-clip", type=float, default=d.dp_clip, help="L2 clip of one client's round update")
    parser.add_argument("--dp-delta", type=float, default=d.dp_delta,
                        help="DP delta (0 = min(1e-3, 0.1 / clients), below 1 / clients)")
    parser.add_argument("--dp-sampling", default=d.dp_sampling, choices=["server", "uniform"],
                        help="server: the server picks clients, no amplification credit (q = 1); "
                             "uniform: credit the sampling rate (only for a trusted uniform sampler)")


def _add_federated_training_options(parser: argparse.ArgumentParser) -> None:
    from fedge.cloud.federated_config import FederatedConfig

    d = FederatedConfig()
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--peft", default=d.peft, choices=["lora", "dora"])
    parser.add_argument("--targets", default=d.targets, help="comma list of module names to adapt")
    parser.add_argument("--hetlora-ranks", default=d.hetlora_ranks, help="e.g. 8,4,2 (cycled over clients)")
    parser.add_argument("--steps", type=int, default=d.steps, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--proximal-mu", type=float, default=d.proximal_mu)
    parser.add_argument("--server-lr", type=float, default=d.server_lr, help="FedAdam eta")
    parser.add_argument("--client-model", default=d.client_model, choices=["draft", "target"],
                        help="clients train LoRA on their compressed draft (frozen packed weights) or the fp32 "
                             "target; evaluation runs on the target either way")
    parser.add_argument("--draft-quant", default=d.draft_quant, choices=["int4", "int8", "none"])
    parser.add_argument("--draft-layers", type=int, default=d.draft_layers,
                        help="train on a truncated draft of this many layers (0 = every layer)")


def _federated_config(args: argparse.Namespace, method: str, num_clients: int):
    from pathlib import Path

    from fedge.cloud.federated_config import FederatedConfig

    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.out) / "checkpoints"
    return FederatedConfig(
        model=args.model, data=args.data, partition=args.partition, num_clients=num_clients,
        clients_per_round=args.clients_per_round, rounds=args.rounds, method=method, strategy=args.strategy,
        rank=args.rank, peft=args.peft, targets=args.targets, hetlora_ranks=args.hetlora_ranks, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, proximal_mu=args.proximal_mu,
        server_lr=args.server_lr, eval_examples=args.eval_examples, eval_clients=args.eval_clients, seed=args.seed,
        round_timeout=args.round_timeout, min_clients=args.min_clients, noop_rounds=args.noop_rounds,
        faults=args.faults, checkpoint_dir=str(checkpoints / method), resume=args.resume,
        client_model=args.client_model, draft_quant=args.draft_quant, draft_layers=args.draft_layers,
        secagg=args.secagg, secagg_threshold=args.secagg_threshold, dp_epsilon=args.dp_epsilon, dp_clip=args.dp_clip,
        dp_delta=args.dp_delta, dp_sampling=args.dp_sampling, ray_address=args.ray_address)


def _federated(args: argparse.Namespace) -> int:
    import logging
    import sys
    from pathlib import Path

    from rich.console import Console

    from fedge.data import DataSourceError, load_corpus
    from fedge.models import ModelUnavailableError
    from fedge.peft_methods.config import METHODS
    from fedge.simulations.federated import FederatedExperiment, run_experiment

    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler already
    methods = list(METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    try:
        corpus = load_corpus(args.data, args.partition, num_clients=args.clients, seed=args.seed)
        if len(corpus.clients) != args.clients:
            console.print(f"[yellow]{args.data}/{args.partition} gives {len(corpus.clients)} clients "
                          f"(asked for {args.clients}); using {len(corpus.clients)}")
        experiment = FederatedExperiment(
            configs=[_federated_config(args, m, len(corpus.clients)) for m in methods], out_dir=Path(args.out),
            json_path=Path(args.json) if args.json else Path(args.out) / "federated.json",
            local_only_clients=args.local_only_clients, baselines=not args.no_baselines)
        run_experiment(experiment, corpus, console)
    except (DataSourceError, ModelUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_phones(simulate: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    phones = simulate.add_parser("phones", help="N phones against a real `fedge cloud serve`: cloud-only vs "
                                                "edge-assisted, cloud CPU-seconds per token")
    phones.add_argument("--phones", type=int, default=8)
    phones.add_argument("--rtt-ms", type=float, default=40.0)
    phones.add_argument("--jitter-ms", type=float, default=5.0)
    phones.add_argument("--bandwidth-mbps", type=float, default=20.0)
    phones.add_argument("--loss", type=float, default=0.0, help="per-message loss probability (TCP retransmit)")
    phones.add_argument("--model", default=DEFAULT_MODEL)
    phones.add_argument("--draft", default=None, help="draft dir (default: build a full-depth int4 draft)")
    phones.add_argument("--max-new-tokens", type=int, default=48)
    phones.add_argument("--k-max", type=int, default=16,
                        help="the longest draft a phone may send (the cloud's default --max-draft-len)")
    phones.add_argument("--fixed-k", type=int, default=None, help="every round drafts this many (default: the "
                                                                   "load-aware choice from the cloud's cost curve)")
    phones.add_argument("--no-load-aware", action="store_true",
                        help="choose k from round times alone, ignoring the cloud's cost curve and load")
    phones.add_argument("--phone-tokens-per-s", type=float, default=None,
                        help="the phones' device profile: drafting k tokens takes k / this (default: the draft's "
                             "own measured speed, alone on one thread)")
    phones.add_argument("--phone-nice", type=int, default=10,
                        help="the phones' process yields to the cloud by this much niceness (0: compete)")
    phones.add_argument("--phone-drafts", choices=("replay", "live"), default="replay",
                        help="replay: the draft's greedy proposals are computed before the timed run and looked "
                             "up (no phone compute on the cloud's cores); live: drafted during it, niced")
    phones.add_argument("--no-draft-farm", action="store_true",
                        help="live drafts: each phone drafts in its own thread, not in shared batched forwards")
    phones.add_argument("--port", type=int, default=0, help="cloud port (0 = pick a free one)")
    phones.add_argument("--server", default=None, help="use a running cloud at HOST:PORT instead of starting one "
                                                       "(its CPU is then read from its Health reply)")
    phones.add_argument("--no-reference", action="store_true", help="skip the local target greedy reference")
    phones.add_argument("--cloud-batch-wait-ms", type=float, default=200.0,
                        help="the started cloud's --batch-wait-ms (how long rounds wait for each other)")
    phones.add_argument("--adapters", default=None, help="adapter registry dir the started cloud serves")
    phones.add_argument("--adapter-version", default="", help="sessions use this served adapter version")
    phones.add_argument("--adapter-pubkey", default=None, help="the key the served adapters are signed with")
    phones.add_argument("--json", default=default_output("simulate-phones", "simulate-phones.json"))
    phones.set_defaults(func=run_lazily("fedge.simulations.phones", output_files=("json",)))
