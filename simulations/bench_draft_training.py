"""`fedge bench draft-training`: what a phone gives up by training LoRA on its int4 draft, not the target.

Same data, steps, seeds and adapter init on every side; each training client runs in its own process
(`python -m fedge.simulations.bench_draft_training JOB.json`), so its peak resident memory
(`VmHWM`) is that of a phone-like client holding only the model it trains (its training text is
split here and handed over as JSON lines, so the client imports no dataset library). The table also
shows the peak above the process's footprint before the model loads (torch, transformers, peft:
what any Python client pays). Both sides train with the same memory options: the head and loss on
chunks of tokens, and gradient checkpointing unless `--no-gradient-checkpointing`. Then, in this process:

- utility: held-out loss of the fp32 target with each adapter (the cloud serves the target), as the
  share of the target-trained adapter's loss reduction the draft-trained one keeps;
- speed: median seconds per local step (forward + backward + AdamW), draft / target;
- speculative acceptance of the draft + its adapter (side path, as phones serve it) against the
  target + the same adapter, greedy, beside the acceptance without adapters.

Datasets: the stdlib natural split (pooled clients) and GSM8K train (`$FEDGE_DATA_DIR/gsm8k`), split
into train / held-out by fedge's seeded document split. Numbers on a shared CPU are noisy: the
ratios are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fedge.peft_methods.config import AdapterSpec, MethodSpec


@dataclass
class TrainJob:
    """One training client (crosses the process boundary as JSON)."""

    model: str
    variant: str  # "target" | "draft" | "draft-L<n>"
    dataset: str  # "stdlib" | "gsm8k"
    train_file: str  # the training examples (JSON lines of fedge.data.Example), split by the parent
    out: str  # the trained adapter state (torch.save)
    quant: str = "int4"
    keep_layers: int | None = None
    rank: int = 8
    targets: str = "q_proj,v_proj"
    method: str = "fedavg"
    steps: int = 30
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 3e-3
    seed: int = 0
    threads: int = 2
    gradient_checkpointing: bool = True
    loss_chunk_tokens: int = 128

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(rank=self.rank, target_modules=tuple(self.targets.split(",")), init_seed=self.seed)


@dataclass
class TrainOutcome:
    peak_rss_mb: float
    rss_before_load_mb: float
    load_s: float
    rss_after_load_mb: float = 0.0
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def split_dataset(name: str, data_dir: str, seed: int):
    """(train examples, shuffled held-out examples) of a benchmark dataset."""
    from fedge.data import load_corpus

    if name == "stdlib":
        corpus = load_corpus("stdlib", "natural", seed=seed)
    elif name == "gsm8k":
        corpus = load_corpus(f"jsonl:{Path(data_dir) / 'gsm8k' / 'train.jsonl'}", "iid", num_clients=1,
                             heldout_fraction=0.05, seed=seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected stdlib or gsm8k")
    heldout = corpus.pooled_heldout()
    random.Random(f"bench-draft-training:{seed}").shuffle(heldout)
    return corpus.pooled_train(), heldout


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not `ru_maxrss`: Linux carries it over `execve`, so a client
    started by a parent that held 1.4 GB would report at least that."""
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_job(job: TrainJob) -> TrainOutcome:
    """The body of one client process: load the model it trains, train, save the adapter."""
    from peft import get_peft_model  # noqa: F401  (imported before the baseline is read: every client pays it)
    from transformers import AutoModelForCausalLM  # noqa: F401

    from fedge.data import Example
    from fedge.edge.lora_trainer import LocalTrainConfig, train_local
    from fedge.edge.training_model import load_training_model

    torch.set_num_threads(job.threads)
    train = [Example(**json.loads(line)) for line in Path(job.train_file).read_text().splitlines()]
    before = _rss_mb()
    start = time.perf_counter()
    client_model = "target" if job.variant == "target" else "draft"
    adapted = load_training_model(job.model, job.spec, client_model, quant=job.quant, keep_layers=job.keep_layers)
    outcome = TrainOutcome(peak_rss_mb=0.0, rss_before_load_mb=before, load_s=time.perf_counter() - start,
                           rss_after_load_mb=_rss_mb())
    marks = [time.perf_counter()]

    def progress(step: int, loss: float) -> None:
        marks.append(time.perf_counter())
        outcome.losses.append(loss)

    torch.manual_seed(job.seed)
    config = LocalTrainConfig(steps=job.steps, batch_size=job.batch_size, seq_len=job.seq_len, lr=job.lr,
                              loss_chunk_tokens=job.loss_chunk_tokens,
                              gradient_checkpointing=job.gradient_checkpointing)
    train_local(adapted, train, job.rank, MethodSpec(job.method).trains, config, seed=(job.seed, job.dataset),
                progress=progress)
    outcome.step_s = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    torch.save(adapted.get_state(job.rank), job.out)
    outcome.peak_rss_mb = _peak_rss_mb()
    return outcome


def run_in_subprocess(job: TrainJob, workdir: Path) -> TrainOutcome:
    path = workdir / f"{job.variant}-{job.dataset}.json"
    path.write_text(json.dumps(asdict(job)))
    proc = subprocess.run([sys.executable, "-m", "fedge.simulations.bench_draft_training", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training client {job.variant}/{job.dataset} failed:\n{proc.stderr[-3000:]}")
    return TrainOutcome(**json.loads(proc.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- evaluation on the target


def heldout_losses(model: str, spec: AdapterSpec, heldout, states: dict, eval_examples: int, seq_len: int) -> dict:
    """Held-out loss of the fp32 target with no adapter and with each trained one."""
    from fedge.peft_methods.lora_model import AdaptedModel, eval_windows, mean_token_loss, pad_token_id

    adapted = AdaptedModel(model, spec)
    init = adapted.get_state()  # lora_B = 0: the target as it is
    windows = eval_windows(heldout, adapted.tokenizer, eval_examples, seq_len)
    pad = pad_token_id(adapted.tokenizer)
    out = {"base": mean_token_loss(adapted.model, windows, pad)}
    for variant, state in states.items():
        adapted.set_state(init | state)  # a truncated draft's adapter: init values for the dropped layers
        out[variant] = mean_token_loss(adapted.model, windows, pad)
    return out


def acceptance(model: str, spec: AdapterSpec, draft_dir: Path, state: dict | None, prompts: list[list[int]],
               max_new_tokens: int, workdir: Path) -> float:
    """Greedy acceptance of the draft (+ adapter as a side path) against the target (+ the adapter merged)."""
    from peft import PeftModel

    from fedge.edge.draft import load_draft, merge_adapter_into_draft
    from fedge.edge.local_generate import SpeculativeGenerator
    from fedge.models import load_model
    from fedge.peft_methods.lora_model import AdaptedModel

    target, tokenizer = load_model(model)
    draft, _, _ = load_draft(draft_dir, check_target=target)
    if state is not None:
        adapter_dir = workdir / "adapter"
        holder = AdaptedModel(model, spec)
        holder.save(adapter_dir, holder.get_state() | state)
        target = PeftModel.from_pretrained(target, str(adapter_dir)).merge_and_unload()
        merge_adapter_into_draft(draft, adapter_dir)
    generator = SpeculativeGenerator(target=target, draft=draft, tokenizer=tokenizer)
    drafted = accepted = 0
    for prompt in prompts:
        _, stats = generator.generate_ids(prompt, max_new_tokens, stop_at_eos=False)
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    return accepted / drafted if drafted else 0.0


def bench_prompts(dataset: str, heldout, tokenizer, n: int) -> list[list[int]]:
    from fedge.models import encode_prompt

    examples = heldout[-n:]  # not the evaluation windows (the first ones)
    if dataset == "gsm8k":
        return [encode_prompt(tokenizer, ex.prompt, chat=True) for ex in examples]
    return [tokenizer(ex.text, add_special_tokens=False)["input_ids"][:64] for ex in examples]


# ---------------------------------------------------------------- the benchmark


def _variants(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    out = [("target", None), ("draft", None)]
    if args.draft_layers:
        out.append((f"draft-L{args.draft_layers}", args.draft_layers))
    return out


def run(args: argparse.Namespace, console) -> dict:
    from fedge.edge.training_model import ensure_draft
    from fedge.models import load_model
    from fedge.simulations.bench_speculative import default_data_dir

    data_dir = str(args.data_dir or default_data_dir())
    variants = _variants(args)
    drafts = {name: ensure_draft(args.model, args.quant, keep) for name, keep in variants if name != "target"}
    tokenizer = load_model(args.model)[1]
    report: dict = {"model": args.model, "quant": args.quant, "settings": {k: v for k, v in vars(args).items()
                                                                          if k != "func"}, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for dataset in args.datasets.split(","):
            console.print(f"[bold]{dataset}[/]: training {', '.join(v for v, _ in variants)} in subprocesses")
            train, heldout = split_dataset(dataset, data_dir, args.seed)
            train_file = workdir / f"{dataset}-train.jsonl"
            train_file.write_text("".join(json.dumps(asdict(ex)) + "\n" for ex in train))
            outcomes, states = {}, {}
            for variant, keep in variants:
                job = TrainJob(model=args.model, variant=variant, dataset=dataset, train_file=str(train_file),
                               out=str(workdir / f"{variant}-{dataset}.pt"), quant=args.quant, keep_layers=keep,
                               rank=args.rank, targets=args.targets, method=args.method, steps=args.steps,
                               batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                               threads=args.threads, gradient_checkpointing=not args.no_gradient_checkpointing,
                               loss_chunk_tokens=args.loss_chunk_tokens)
                outcomes[variant] = run_in_subprocess(job, workdir)
                states[variant] = torch.load(job.out)
            losses = heldout_losses(args.model, job.spec, heldout, states, args.eval_examples, args.seq_len)
            prompts = bench_prompts(dataset, heldout, tokenizer, args.prompts)
            accept = {}
            for variant, path in drafts.items():
                accept[variant] = {
                    "plain": acceptance(args.model, job.spec, path, None, prompts, args.max_new_tokens, workdir),
                    "adapted": acceptance(args.model, job.spec, path, states[variant], prompts,
                                          args.max_new_tokens, workdir)}
            report["datasets"][dataset] = _summarise(outcomes, losses, accept)
    return report


def _summarise(outcomes: dict, losses: dict, accept: dict) -> dict:
    target = outcomes["target"]
    reduction_target = losses["base"] - losses["target"]
    rows = {}
    for variant, outcome in outcomes.items():
        step = statistics.median(outcome.step_s[1:] or outcome.step_s)  # the first step warms up
        target_step = statistics.median(target.step_s[1:] or target.step_s)
        reduction = losses["base"] - losses[variant]
        rows[variant] = {
            "heldout_loss": losses[variant], "loss_reduction": reduction,
            "reduction_kept": reduction / reduction_target if reduction_target > 0 else None,
            "step_s": step, "step_vs_target": step / target_step,
            "peak_rss_mb": outcome.peak_rss_mb, "rss_vs_target": outcome.peak_rss_mb / target.peak_rss_mb,
            "model_rss_mb": outcome.peak_rss_mb - outcome.rss_before_load_mb,
            "rss_before_load_mb": outcome.rss_before_load_mb, "rss_after_load_mb": outcome.rss_after_load_mb,
            "model_rss_vs_target": ((outcome.peak_rss_mb - outcome.rss_before_load_mb)
                                    / (target.peak_rss_mb - target.rss_before_load_mb)),
            "load_s": outcome.load_s, "first_loss": outcome.losses[0], "last_loss": outcome.losses[-1],
            "acceptance_plain": accept.get(variant, {}).get("plain"),
            "acceptance_adapted": accept.get(variant, {}).get("adapted"),
        }
    return {"base_loss": losses["base"], "variants": rows}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"LoRA trained on the {report['quant']} draft vs the fp32 target ({report['model']}); "
                        "losses on the fp32 target")
    for col in ("data", "client model", "held-out loss", "reduction", "kept", "s/step", "step ratio",
                "peak RSS MB", "RSS ratio", "above imports MB", "ratio", "accept (no adapter)", "accept (+adapter)"):
        table.add_column(col, justify="left" if col in ("data", "client model") else "right")
    for dataset, result in report["datasets"].items():
        table.add_row(dataset, "none (base)", f"{result['base_loss']:.4f}", *["-"] * 10)
        for variant, row in result["variants"].items():
            kept = row["reduction_kept"]
            table.add_row(dataset, variant, f"{row['heldout_loss']:.4f}", f"{row['loss_reduction']:.4f}",
                          _fmt(kept and 100 * kept, ".1f") + ("%" if kept is not None else ""),
                          f"{row['step_s']:.2f}", f"{row['step_vs_target']:.2f}", f"{row['peak_rss_mb']:.0f}",
                          f"{row['rss_vs_target']:.2f}", f"{row['model_rss_mb']:.0f}",
                          f"{row['model_rss_vs_target']:.2f}", _fmt(row["acceptance_plain"], ".3f"),
                          _fmt(row["acceptance_adapted"], ".3f"))
    console.print(table)
    console.print("goals: kept >= 90%, RSS ratio <= 0.40, acceptance (+adapter) >= 0.85; "
                  "timings on a shared CPU are noisy (ratios are side by side)")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=max(Console().width, 160))
    if args.quick:
        args.steps, args.batch_size, args.seq_len = min(args.steps, 6), 2, 64
        args.eval_examples, args.prompts, args.max_new_tokens = min(args.eval_examples, 8), 2, 24
    report = run(args, console)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report, console)
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # one training client process (see run_in_subprocess)
    job = TrainJob(**json.loads(Path(sys.argv[1]).read_text()))
    print(json.dumps(asdict(train_job(job))))
