"""PEFT configurations shared by the edge trainer and the cloud aggregator.

One `AdapterSpec` describes the adapter every participant builds; a federated method decides which
factors a client trains and sends. Scaling is held at `scale = lora_alpha / r` for every rank, so
that adapters of different ranks (HetLoRA) contribute `scale * B @ A` on one common scale and their
products can be summed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("fedavg", "ffa", "fedsvd", "hetlora")
PEFT_KINDS = ("lora", "dora")

# Which LoRA factors a client trains (and sends back) per method. Freezing A is what makes the
# exact methods exact and linear: sum_k p_k B_k A == (sum_k p_k B_k) A, a plain (maskable) sum.
TRAINED_FACTORS: dict[str, tuple[str, ...]] = {
    "fedavg": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "ffa": ("lora_B", "lora_magnitude_vector"),
    "fedsvd": ("lora_B", "lora_magnitude_vector"),
    "hetlora": ("lora_B", "lora_magnitude_vector"),
}

# Methods whose untrained factor never leaves its seeded init: clients rebuild it from the seed
# (`aggregation.seeded_lora_A`), so it travels in neither direction. FedSVD and HetLoRA re-factorise
# A every round (it must go down); FedAvg trains it.
FROZEN_FROM_SEED = ("ffa",)


@dataclass(frozen=True)
class AdapterSpec:
    """The LoRA/DoRA adapter a federation trains (global rank; clients may use lower ranks)."""

    rank: int = 8
    scale: float = 2.0  # lora_alpha / r, the same for every rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    peft: str = "lora"  # "lora" or "dora"
    init_seed: int = 0  # the shared seeded init of A (FFA-LoRA freezes A at this init)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.peft not in PEFT_KINDS:
            raise ValueError(f"unknown PEFT kind {self.peft!r}; expected one of {PEFT_KINDS}")


@dataclass(frozen=True)
class MethodSpec:
    """A federated aggregation method and the per-client ranks it uses."""

    name: str = "ffa"
    client_ranks: tuple[int, ...] = field(default_factory=tuple)  # hetlora: cycled over clients

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown federated method {self.name!r}; expected one of {METHODS}")

    def trains(self, key: str) -> bool:
        """Whether a client trains (and sends) the tensor with this peft state-dict key."""
        return any(f".{factor}" in key for factor in TRAINED_FACTORS[self.name])

    def sends_down(self, key: str) -> bool:
        """Whether the server sends this tensor to clients: all of them, except a factor frozen at its
        seeded init (FFA-LoRA's A), which every client rebuilds from the seed."""
        return self.trains(key) or self.name not in FROZEN_FROM_SEED

    def rank_for(self, client_index: int, global_rank: int) -> int:
        if self.name != "hetlora":
            return global_rank
        ranks = self.client_ranks or default_hetlora_ranks(global_rank)
        return min(global_rank, ranks[client_index % len(ranks)])


def default_hetlora_ranks(global_rank: int) -> tuple[int, ...]:
    """Devices of three capability tiers: full, half and quarter rank."""
    return tuple(sorted({global_rank, max(1, global_rank // 2), max(1, global_rank // 4)}, reverse=True))


def lora_config(spec: AdapterSpec, rank: int | None = None):
    """The peft `LoraConfig` for `spec` at `rank` (default: the global rank)."""
    from peft import LoraConfig

    r = rank or spec.rank
    return LoraConfig(
        r=r,
        lora_alpha=spec.scale * r,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        use_dora=spec.peft == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
