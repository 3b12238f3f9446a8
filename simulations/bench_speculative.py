"""`fedge bench speculative`: target-only greedy vs Hugging Face assisted generation vs fedge.

Every method runs on the same prompts in the same process, interleaved prompt by prompt so that
load from other processes falls on all of them alike; speed is reported as ratios. The target alone
runs twice, as Hugging Face's `generate` (the baseline) and on fedge's lean runner
(`fedge.static_decoder`), so a reader sees how much of fedge's speed is the runner and how much is
speculation. fedge runs twice per draft: with the draft taking the target's prompt keys/values
(possible only in one process, where the target is at hand) and with the draft's own prefill, as on
a phone. One-time costs (re-packing weights, compiling when `FEDGE_COMPILE=1`) are paid and
reported before the timed loop, apart from steady-state speed. The bench compiles by default
(`--compile on`; `off`, or `env` for `FEDGE_COMPILE`): compiled is the runner's steady state.
Prompts: stdlib code completion (a prefix of held-out standard-library files) and GSM8K questions
(chat template) when the shared data is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from fedge.data import load_corpus
from fedge.edge.draft import DraftSpec, build_draft, default_draft_dir, load_draft
from fedge.edge.local_generate import SHARED_KV_DEFAULT, SpeculativeGenerator, parse_k
from fedge.models import encode_prompt, load_model
from fedge.speculative import autoregressive_generate, expected_tokens_per_round
from fedge.static_decoder import LeanDecoder, StaticSequence, supports


def default_data_dir() -> Path:
    return Path(os.environ.get("FEDGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def code_prompts(tokenizer, n: int, seed: int = 0, prefix_tokens: int = 160) -> list[list[int]]:
    """Prefixes of held-out stdlib files, cut at a line end near `prefix_tokens` tokens."""
    corpus = load_corpus("stdlib", "natural", seed=seed)
    docs = sorted({(ex.doc, ex.text) for c in corpus.clients for ex in c.heldout if len(ex.text) > 1200})
    rng = random.Random(seed)
    prompts = []
    for _, text in rng.sample(docs, min(n, len(docs))):
        ids = tokenizer(text)["input_ids"][:prefix_tokens]
        cut = tokenizer.decode(ids)
        cut = cut[: cut.rfind("\n") + 1] or cut
        prompts.append(list(tokenizer(cut)["input_ids"]))
    return prompts


def gsm8k_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    path = default_data_dir() / "gsm8k" / "train.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    return [encode_prompt(tokenizer, row["question"], chat=True) for row in rng.sample(rows, n)]


@dataclass
class MethodTotals:
    seconds: float = 0.0
    tokens: int = 0
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    identical: list[bool] = field(default_factory=list)


def _hf_generate(model, prompt: list[int], n: int, assistant=None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, assistant_model=assistant, pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt):].tolist()


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _load_drafts(target_name: str, target: torch.nn.Module, draft_specs: list[str]) -> dict:
    """spec -> (draft model, DraftInfo); a recipe such as "int4" or "L12-int8" is built once and cached."""
    drafts = {}
    for spec in draft_specs:
        path = Path(spec)
        if not (path / "draft.json").exists():  # a recipe such as "int4" or "L12-int8"
            layers, _, quant = spec.rpartition("-")
            keep = int(layers[1:]) if layers.startswith("L") else None
            path = default_draft_dir(target_name, keep, quant)
            if not (path / "draft.json").exists():
                build_draft(DraftSpec(target=target_name, keep_layers=keep, quant=quant), path)
        model, _, info = load_draft(path, check_target=target)
        drafts[spec] = (model, info)
    return drafts


def _run_prompt(target, tokenizer, drafts: dict, prompt: list[int], max_new_tokens: int, fixed_k: int | None,
                totals: dict, dom: str) -> None:
    """Every method on one prompt, back to back: the target alone (HF, then the lean runner), then HF
    assisted and fedge per draft."""
    t0 = time.perf_counter()
    reference = _hf_generate(target, prompt, max_new_tokens)
    rec = totals[(dom, "target")]
    rec.seconds += time.perf_counter() - t0
    rec.tokens += len(reference)
    rec.target_calls += len(reference)
    t0 = time.perf_counter()
    lean = StaticSequence(target, prompt).greedy_tokens(max_new_tokens) if supports(target) else reference
    rec = totals[(dom, "target_lean")]
    rec.seconds += time.perf_counter() - t0
    rec.tokens += len(lean)
    rec.identical.append(lean == reference)
    for name, (draft, _) in drafts.items():
        t0 = time.perf_counter()
        assisted = _hf_generate(target, prompt, max_new_tokens, assistant=draft)
        rec = totals[(dom, f"hf_assisted[{name}]")]
        rec.seconds += time.perf_counter() - t0
        rec.tokens += len(assisted)
        rec.identical.append(assisted == reference)

        # the drafts were loaded with check_target=target: derived from it, they may take its prompt
        # prefill (in-process only); the "own prefill" run is what a phone, holding no target, does
        for method, shares in ((f"fedge[{name}]", SHARED_KV_DEFAULT), (f"fedge-own-prefill[{name}]", "none")):
            gen = SpeculativeGenerator(target=target, draft=draft, tokenizer=tokenizer, draft_shares_target_kv=shares)
            t0 = time.perf_counter()
            out, stats = gen.generate_ids(prompt, max_new_tokens, k=fixed_k, stop_at_eos=False)
            rec = totals[(dom, method)]
            rec.seconds += time.perf_counter() - t0
            rec.tokens += len(out)
            rec.target_calls += stats.rounds
            rec.drafted += stats.drafted
            rec.accepted += stats.accepted
            rec.rejected += stats.rejected
            rec.identical.append(out == reference)


def _summary(totals: dict, method: str, doms: list[str]) -> dict:
    recs = [totals[(d, method)] for d in doms if totals[(d, method)].tokens]
    secs = sum(r.seconds for r in recs)
    toks = sum(r.tokens for r in recs)
    return {"seconds": secs, "tokens": toks, "tokens_per_s": toks / secs if secs else 0.0,
            "target_calls": sum(r.target_calls for r in recs), "drafted": sum(r.drafted for r in recs),
            "accepted": sum(r.accepted for r in recs), "rejected": sum(r.rejected for r in recs),
            "identical": all(i for r in recs for i in r.identical)}


def _rows(totals: dict, drafts: dict, active: list[str]) -> list[dict]:
    """One row per draft and domain (and "all"): fedge against target-only and HF assisted."""
    rows = []
    for name, (_, info) in drafts.items():
        for doms, label in [([d], d) for d in active] + [(active, "all")]:
            base = _summary(totals, "target", doms)
            lean = _summary(totals, "target_lean", doms)
            hf = _summary(totals, f"hf_assisted[{name}]", doms)
            ours = _summary(totals, f"fedge[{name}]", doms)
            own = _summary(totals, f"fedge-own-prefill[{name}]", doms)
            # a for (1 - a^(k+1)) / (1 - a): accepted / (accepted + rejections), not accepted / drafted
            a = ours["accepted"] / (ours["accepted"] + ours["rejected"]) if ours["accepted"] else 0.0
            mean_k = ours["drafted"] / ours["target_calls"] if ours["target_calls"] else 0.0
            rows.append({
                "draft": name, "domain": label,
                "acceptance_rate": ours["accepted"] / ours["drafted"] if ours["drafted"] else 0.0,
                "a": a, "mean_k": mean_k,
                "predicted_tokens_per_round": expected_tokens_per_round(min(a, 0.9999), round(mean_k)),
                "tokens_per_target_call": ours["tokens"] / ours["target_calls"] if ours["target_calls"] else 0.0,
                "speedup_vs_target": ours["tokens_per_s"] / base["tokens_per_s"],
                "speedup_vs_lean_target": ours["tokens_per_s"] / lean["tokens_per_s"],
                "lean_target_vs_target": lean["tokens_per_s"] / base["tokens_per_s"],
                "speedup_vs_hf_assisted": ours["tokens_per_s"] / hf["tokens_per_s"],
                "own_prefill_tokens_per_s": own["tokens_per_s"],
                "own_prefill_speedup_vs_target": own["tokens_per_s"] / base["tokens_per_s"],
                "own_prefill_speedup_vs_hf_assisted": own["tokens_per_s"] / hf["tokens_per_s"],
                "greedy_identical": ours["identical"] and own["identical"],
                "hf_assisted_identical": hf["identical"],
                "fedge_tokens_per_s": ours["tokens_per_s"],
                "hf_assisted_tokens_per_s": hf["tokens_per_s"],
                "target_only_tokens_per_s": base["tokens_per_s"],
                "lean_target_tokens_per_s": lean["tokens_per_s"],
                "lean_target_identical": lean["identical"],
                "draft_bytes": info.bytes,
                "draft_layers": info.keep_layers,
                "draft_quant": info.quant,
            })
    return rows


def _lean_tokens_per_s(model: torch.nn.Module, prompt: list[int], n: int) -> float:
    """Greedy decode speed of the lean runner alone (prefill excluded, as a phone's draft steps)."""
    sequence = StaticSequence(model, prompt)
    sequence.logits()
    start = time.perf_counter()
    for _ in range(n):
        sequence.accept([int(sequence.logits()[-1].argmax())])
    return n / (time.perf_counter() - start)


def _warm_up(models: dict, compile: bool | None) -> dict:
    """The lean runners' one-time costs, paid before any timing: re-packing each model's weights and,
    when compiling, compiling its graphs (per graph seconds in `compile_graphs_s`; torch's inductor
    cache in fedge's cache makes later runs' warm-up shorter)."""
    out = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        decoder = LeanDecoder.for_model(model, compile=compile)
        pack_s = time.perf_counter() - t0
        compile_s = decoder.warm_up() if decoder.compile else 0.0
        out[name] = {"pack_s": pack_s, "compile_s": compile_s, "compile_graphs_s": dict(decoder.warmup_s)}
    return out


def run(target_name: str, draft_specs: list[str], n_prompts: int, max_new_tokens: int, k: str,
        json_path: str, seed: int = 0, compile: bool | None = None) -> dict:
    torch.manual_seed(seed)
    target, tokenizer = load_model(target_name)
    drafts = _load_drafts(target_name, target, draft_specs)

    models = [("target", target), *((d, m) for d, (m, _) in drafts.items())]
    warmup = _warm_up({name: m for name, m in models if supports(m)}, compile)
    domains = {"code": code_prompts(tokenizer, n_prompts, seed), "gsm8k": gsm8k_prompts(tokenizer, n_prompts, seed)}
    fixed_k = parse_k(k)
    methods = ["target", "target_lean", *(f"hf_assisted[{d}]" for d in drafts), *(f"fedge[{d}]" for d in drafts),
               *(f"fedge-own-prefill[{d}]" for d in drafts)]
    totals = {(dom, m): MethodTotals() for dom in domains for m in methods}
    work = [(dom, p) for dom, prompts in domains.items() for p in prompts]
    for dom, prompt in tqdm(work, desc="bench speculative (prompts)"):
        _run_prompt(target, tokenizer, drafts, prompt, max_new_tokens, fixed_k, totals, dom)

    # standalone decode speeds (one prompt, our own session loop), for the size/speed columns
    probe = work[0][1]
    speed = {}
    for name, model in [("target", target), *((d, m) for d, (m, _) in drafts.items())]:
        t0 = time.perf_counter()
        produced = autoregressive_generate(model, probe, 32)
        speed[name] = len(produced) / (time.perf_counter() - t0)
        if supports(model):
            speed[f"{name} (lean)"] = _lean_tokens_per_s(model, probe, 32)

    rows = _rows(totals, drafts, [d for d, prompts in domains.items() if prompts])
    primary = next(r for r in rows if r["draft"] == draft_specs[0] and r["domain"] == "all")
    report = {
        "target": target_name,
        "prompts_per_domain": {d: len(domains[d]) for d in domains},
        "max_new_tokens": max_new_tokens,
        "k": k,
        "threads": torch.get_num_threads(),
        **{key: primary[key] for key in ("acceptance_rate", "tokens_per_target_call", "speedup_vs_target",
                                         "speedup_vs_hf_assisted", "own_prefill_speedup_vs_target",
                                         "own_prefill_speedup_vs_hf_assisted", "greedy_identical", "draft_bytes")},
        "greedy_identical": all(r["greedy_identical"] and r["lean_target_identical"] for r in rows),
        "target_bytes": _model_bytes(target),
        "draft_tokens_per_s": speed[draft_specs[0]],
        "target_tokens_per_s": speed["target"],
        "standalone_tokens_per_s": speed,
        "lean_target_tokens_per_s": primary["lean_target_tokens_per_s"],
        "speedup_vs_lean_target": primary["speedup_vs_lean_target"],
        "compile": {name: LeanDecoder.for_model(m).compile for name, m in models if supports(m)},
        "warmup": warmup,
        "rows": rows,
    }
    Path(json_path).write_text(json.dumps(report, indent=2))
    _print(report, rows)
    return report


def _print(report: dict, rows: list[dict]) -> None:
    table = Table(title=f"speculative decoding on {report['target']} ({report['max_new_tokens']} new tokens, "
                        f"k={report['k']}, {report['threads']} threads)")
    cols = [("draft", "draft"), ("domain", "domain"), ("acc/drafted", "acceptance_rate"), ("a", "a"),
            ("mean k", "mean_k"), ("pred tok/call", "predicted_tokens_per_round"),
            ("tok/call", "tokens_per_target_call"), ("fedge tok/s", "fedge_tokens_per_s"),
            ("HF asst tok/s", "hf_assisted_tokens_per_s"), ("target tok/s", "target_only_tokens_per_s"),
            ("lean target tok/s", "lean_target_tokens_per_s"), ("x target", "speedup_vs_target"),
            ("x lean target", "speedup_vs_lean_target"), ("x HF asst", "speedup_vs_hf_assisted"),
            ("own prefill x target", "own_prefill_speedup_vs_target"),
            ("own prefill x HF asst", "own_prefill_speedup_vs_hf_assisted"),
            ("identical", "greedy_identical"), ("lean identical", "lean_target_identical"), ("draft MB", "draft_bytes")]
    for title, _ in cols:
        table.add_column(title, justify="right")
    for row in rows:
        cells = []
        for _, key in cols:
            value = row[key]
            if key == "draft_bytes":
                cells.append(f"{value / 1e6:.0f}")
            elif isinstance(value, float):
                cells.append(f"{value:.2f}")
            else:
                cells.append(str(value))
        table.add_row(*cells)
    console = Console(width=max(Console().width, 210))  # a report, not a terminal widget: never truncate
    console.print(table)
    console.print(f"target {report['target_bytes'] / 1e6:.0f} MB; standalone decode tok/s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in report["standalone_tokens_per_s"].items()))
    console.print("one-time warm-up (before timing): " + "; ".join(
        f"{name} re-pack {w['pack_s']:.1f} s" + (f", compile {w['compile_s']:.0f} s" if w["compile_s"] else "")
        for name, w in report["warmup"].items()) + f"; compile {report['compile']}")


def main(args: argparse.Namespace) -> int:
    drafts = [d.strip() for d in (args.draft or "int4,int8").split(",") if d.strip()]
    run(args.target, drafts, args.prompts, args.max_new_tokens, args.k, args.json,
        compile=None if args.compile == "env" else args.compile == "on")
    print(f"wrote {args.json}")
    return 0
