"""The configuration of a federated LoRA run (light to import: the CLI builds its options from it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from fedge.peft_methods.config import METHODS, AdapterSpec, MethodSpec

STRATEGIES = ("fedavg", "fedprox", "fedadam")
CLIENT_MODELS = ("draft", "target")  # what a client trains on (fedge.edge.training_model)


@dataclass
class FederatedConfig:
    """Everything a federated LoRA run depends on (saved with each checkpoint)."""

    model: str = "smollm2-135m-instruct"
    data: str = "stdlib"
    partition: str = "natural"
    num_clients: int = 20
    clients_per_round: int = 5
    rounds: int = 3
    method: str = "fedavg"  # best at every setting `fedge bench aggregation` measured (README)
    strategy: str = "fedavg"
    rank: int = 8
    scale: float = 2.0
    targets: str = "q_proj,v_proj"
    peft: str = "lora"
    hetlora_ranks: str = ""  # e.g. "8,4,2", cycled over partitions; default: full, half, quarter
    steps: int = 4
    batch_size: int = 2
    seq_len: int = 128
    lr: float = 3e-3
    proximal_mu: float = 0.01  # FedProx only
    server_lr: float = 1.0  # FedAdam's eta
    eval_examples: int = 2  # held-out examples per client for evaluation
    eval_clients: int = 0  # evaluate the global adapter on this many clients (seeded sample); 0 = all
    seed: int = 0
    round_timeout: float = 600.0
    min_clients: int = 1  # a round with fewer good updates leaves the global adapter unchanged
    noop_rounds: int = 3  # no-op rounds before training, to measure the simulation's overhead
    faults: str = ""  # simulations only: "PID:KIND,..." clients that misbehave (fedge.simulations.faults)
    threads_per_client: int = 1
    client_model: str = "draft"  # clients train on their compressed draft, or on the fp32 target
    draft_quant: str = "int4"  # the draft's quantisation (int4 | int8 | none)
    draft_layers: int = 0  # a truncated draft of this many layers (weaker phones); 0 keeps every layer
    pull_interval: float = 0.01  # InMemoryGrid polling (Flower's default 0.1 s)
    checkpoint_dir: str | None = None
    resume: bool = False
    # deployment (Flower's deployment engine; the simulation uses the same ServerApp)
    min_nodes: int = 0  # wait for this many connected nodes before round 1; 0 = num_clients
    wait_nodes_s: float = 300.0  # give up if they have not connected by then
    server_eval_data: str = ""  # a held-out set the server itself owns (a data source), besides federated eval
    secagg: bool = False  # train rounds under secure aggregation (fedge.cloud.secagg_server)
    secagg_threshold: float = 0.6
    # client-level DP (fedge.peft_methods.dp): off at 0; inf clips updates without noise (the clip's own cost)
    dp_epsilon: float = 0.0  # the budget for the whole run; the noise multiplier is calibrated to reach it
    dp_clip: float = 0.5  # L2 clip of one client's update (all trained tensors together) per round
    dp_delta: float = 0.0  # 0 = min(1e-3, 0.1 / num_clients), below 1 / clients
    dp_sampling: str = "server"  # "server": no credit for sampling (q = 1); "uniform": a trusted sampler
    ray_address: str = ""  # simulations: run on this existing Ray cluster (`ray start --head`) instead of a new one
    publish_registry: str = ""  # publish each accepted adapter, signed, into this registry (fedge cloud serve)
    publish_signing_key: str = ""
    publish_every: str = "end"  # "round" (after each accepted round) or "end"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(f"--clients-per-round must be in 1..{self.num_clients}, got {self.clients_per_round}")
        if self.client_model not in CLIENT_MODELS:
            raise ValueError(f"--client-model must be one of {CLIENT_MODELS}, got {self.client_model!r}")
        if self.draft_quant not in ("int4", "int8", "none") or self.draft_layers < 0:
            raise ValueError(f"--draft-quant must be int4, int8 or none and --draft-layers >= 0 "
                             f"(got {self.draft_quant!r}, {self.draft_layers})")
        if self.publish_every not in ("round", "end"):
            raise ValueError(f"publish_every must be 'round' or 'end', got {self.publish_every!r}")
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("--rounds and --steps must be >= 1")
        if self.dp_epsilon < 0 or not self.dp_clip > 0 or not 0 <= self.dp_delta < 1:
            raise ValueError(f"--dp-epsilon must be >= 0 (0 = off), --dp-clip > 0 and --dp-delta in [0, 1) "
                             f"(got {self.dp_epsilon}, {self.dp_clip}, {self.dp_delta})")
        if self.secagg and self.method == "hetlora":
            raise ValueError("--secagg needs every client to send the same shapes; hetlora's ranks differ")
        if self.dp_sampling not in ("server", "uniform"):
            raise ValueError(f"--dp-sampling must be 'server' or 'uniform', got {self.dp_sampling!r}")

    @property
    def dp_enabled(self) -> bool:
        return self.dp_epsilon > 0

    @property
    def delta(self) -> float:
        """The DP delta: as given, else min(1e-3, 0.1 / clients) (well below 1 / clients)."""
        return self.dp_delta or min(1e-3, 0.1 / self.num_clients)

    def dp_config(self, min_clients: int = 1):
        """The run's `DPConfig` (None when DP is off): sigma calibrated so that `rounds` rounds spend
        `dp_epsilon` at `delta`. Under secure aggregation the clients add the noise in shares (n_min =
        `min_clients`, the secure-aggregation threshold); without it the server adds it to the sum
        (private against whoever sees the adapter, not against the server)."""
        if not self.dp_enabled:
            return None
        from fedge.peft_methods.dp import DPConfig, calibrate_noise_multiplier

        rate = self.clients_per_round / self.num_clients if self.dp_sampling == "uniform" else 1.0
        sigma = calibrate_noise_multiplier(self.dp_epsilon, self.delta, rate, self.rounds)
        return DPConfig(clip_norm=self.dp_clip, noise_multiplier=sigma, delta=self.delta, max_epsilon=self.dp_epsilon,
                        min_clients=min_clients if self.secagg else 1,
                        noise_at="client" if self.secagg else "server", sampling=self.dp_sampling)

    @property
    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(rank=self.rank, scale=self.scale, target_modules=tuple(self.targets.split(",")),
                           peft=self.peft, init_seed=self.seed)

    @property
    def method_spec(self) -> MethodSpec:
        ranks = tuple(int(r) for r in self.hetlora_ranks.split(",") if r)
        return MethodSpec(self.method, client_ranks=ranks)

    def identity(self) -> str:
        """What must match for `--resume` to continue a checkpoint (not rounds, faults, timing)."""
        skip = {"rounds", "resume", "checkpoint_dir", "noop_rounds", "faults", "round_timeout", "pull_interval",
                "min_nodes", "wait_nodes_s", "publish_registry", "publish_signing_key", "publish_every",
                "ray_address"}
        items = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]

    def client_config(self):
        """The per-message config every client reads (a Flower ConfigRecord)."""
        from flwr.app import ConfigRecord

        return ConfigRecord({  # the run's settings only: a device's data comes from its own node config
            "model": self.model, "seed": self.seed, "method": self.method,
            "global-rank": self.rank, "scale": self.scale, "targets": self.targets, "peft": self.peft,
            "steps": self.steps, "batch-size": self.batch_size, "seq-len": self.seq_len, "lr": self.lr,
            "eval-examples": self.eval_examples, "threads": self.threads_per_client,
            "client-model": self.client_model, "draft-quant": self.draft_quant, "draft-layers": self.draft_layers,
        })


RUN_CONFIG_PREFIX = "fedge."


def to_run_config(config: FederatedConfig) -> dict[str, bool | int | float | str]:
    """The run config of a Flower app (`[tool.flwr.app.config]`, `flwr run --run-config`): one dotted
    key per option, `fedge.clients-per-round = 5`; None is written as ""."""
    return {RUN_CONFIG_PREFIX + k.replace("_", "-"): "" if v is None else v for k, v in asdict(config).items()}


def from_run_config(run_config: dict) -> FederatedConfig:
    """The FederatedConfig of a Flower run (`context.run_config`); unknown `fedge.` keys are an error,
    missing ones keep their defaults."""
    fields = FederatedConfig.__dataclass_fields__
    values = {}
    for key, value in run_config.items():
        if not key.startswith(RUN_CONFIG_PREFIX):
            continue
        name = key[len(RUN_CONFIG_PREFIX):].replace("-", "_")
        if name not in fields:
            raise ValueError(f"unknown run config key {key!r}")
        default = fields[name].default
        if name == "checkpoint_dir":
            values[name] = str(value) or None
        elif isinstance(default, bool):
            values[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        else:
            values[name] = type(default)(value)
    return FederatedConfig(**values)
