"""`fedge bench kernels`: each hot operation's torch reference against its fast path, side by side.

On CUDA the fast path is the Triton kernel, timed with triton.testing.do_bench, and the table shows
the fraction of the GPU's peak memory bandwidth. On CPU the fast path is the best CPU
implementation (vectorised torch, torch's packed int4/int8 ops, segmented matmuls, BLAS). Bytes
are the minimum traffic the operation needs (every input read once, the output written once), the
same count for both columns, so GB/s compare like for like. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# peak HBM bandwidth in GB/s by device name, when the driver does not report clock and bus width
PEAK_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935, "L40S": 864, "L4": 300,
             "A10G": 600, "RTX 4090": 1008}


@dataclass
class Row:
    op: str
    shape: str
    baseline: str
    baseline_ms: float
    fast: str
    fast_ms: float
    speedup: float
    bytes: int
    flops: int
    fast_gbps: float
    baseline_gbps: float
    fast_tflops: float
    fraction_of_peak: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Wall time of fn in milliseconds after one warm-up call (which also compiles): the median of
    do_bench's CUDA-event timings on a GPU; on CPU the best of the repetitions, the estimate least
    disturbed by other processes on a shared machine."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(int(budget_s * 1000), 50),
                                             return_mode="median"))
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def peak_bandwidth_gbps(device: torch.device) -> tuple[float | None, str]:
    """(GB/s, where it came from) for a GPU's HBM; None on CPU, where small shapes run from cache
    and a fraction of DRAM bandwidth would mislead."""
    if device.type != "cuda":
        return None, "no peak on CPU"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties (memory clock x bus width)"
    for name, gbps in PEAK_GBPS.items():
        if name.lower() in props.name.lower():
            return float(gbps), f"datasheet ({name})"
    return None, "unknown peak"


def _verify_cases(device: torch.device, quick: bool):
    from fedge.kernels.verify import verify_reference
    from fedge.kernels.verify_torch import verify_torch
    from fedge.sampling import SamplingParams

    on_gpu = device.type == "cuda"
    shapes = [(8, 4, 49152)] if quick or not on_gpu else [(8, 4, 49152), (64, 4, 49152), (32, 7, 152064)]
    if on_gpu:
        from fedge.kernels.verify_triton import verify_triton
    for batch, k, vocab in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(batch, k + 1, vocab, device=device, generator=gen)
        draft = logits.argmax(-1)[:, :k].clone()
        draft[:, k // 2] += 1  # reject midway: a realistic mix of accepted and rejected tokens
        lens = torch.full((batch,), k, device=device)
        q = torch.softmax(torch.randn(batch, k, vocab, device=device, generator=gen), -1)
        logit_bytes = logits.numel() * logits.element_size()
        for name, params, draft_probs, extra_bytes in (
            ("verify greedy", SamplingParams(), None, 0),
            # sampling reads one draft row and re-reads one target row per session
            ("verify sampling T=0.8 (draft q)", SamplingParams(temperature=0.8), q, 2 * batch * vocab * 4),
        ):
            args = (logits, draft, lens, params, draft_probs, gen)
            fast_name, fast = (("triton", lambda a=args: verify_triton(*a)) if on_gpu
                               else ("torch vectorised", lambda a=args: verify_torch(*a)))
            # the reference draws on the default CPU generator; a CUDA generator would not fit it
            ref_args = args[:-1] + ((None,) if on_gpu else (gen,))
            baselines = [("torch reference (loop)", lambda a=ref_args: verify_reference(*a))]
            if on_gpu:
                baselines.append(("torch vectorised", lambda a=args: verify_torch(*a)))
            for baseline_name, baseline in baselines:
                yield (name, f"B={batch} K={k} V={vocab}", baseline_name, baseline, fast_name, fast,
                       logit_bytes + extra_bytes, 0)
        if on_gpu:  # the streaming pass alone, without the host-side checks and the tiny scan
            from fedge.kernels.verify_triton import _launch_shape, _row_stats_kernel

            rows = batch * (k + 1)
            per_program, tile, chunk, n_splits = _launch_shape(rows, vocab, 1024, device)
            flat = logits.reshape(rows, vocab)
            row_max = torch.empty(rows, n_splits, device=device)
            row_aux = torch.empty(rows, n_splits, device=device)

            def stats_kernel(flat=flat, rows=rows, chunk=chunk, n_splits=n_splits, row_max=row_max,
                             row_aux=row_aux, tile=tile, vocab=vocab):
                _row_stats_kernel[(rows, n_splits)](flat, rows, flat.stride(0), vocab, 1.0, chunk, row_max,
                                                    row_aux, n_splits, GREEDY=True, ROWS=1, BLOCK=tile)

            yield ("verify greedy: pass-1 kernel only", f"B={batch} K={k} V={vocab}", "torch argmax",
                   lambda logits=logits: logits.argmax(-1), "triton", stats_kernel, logit_bytes, 0)


def _quant_cases(device: torch.device, quick: bool):
    from fedge.kernels.quant_matmul_ref import (
        int4_matmul_reference,
        int4_to_cpu_pack,
        int8_matmul_reference,
        quantize_int4,
        quantize_int8,
    )

    on_gpu = device.type == "cuda"
    if on_gpu:
        from fedge.kernels.quant_matmul_triton import int4_matmul_triton, int8_matmul_triton
        shapes = [(1, 1536, 576), (1, 4096, 4096), (1, 14336, 4096), (1, 28672, 8192), (16, 4096, 4096)]
    else:
        shapes = [(1, 1536, 576), (1, 4096, 4096), (16, 4096, 4096)]
    if quick:
        shapes = shapes[:2]
    gen = torch.Generator(device=device).manual_seed(0)
    for m, n, k in shapes:
        weight = torch.randn(n, k, device=device, generator=gen)
        x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
        flops = 2 * m * n * k
        act_bytes = (m * k + m * n) * 2
        q4, sz = quantize_int4(weight, 32)
        int4_bytes = q4.numel() + sz.numel() * sz.element_size() + act_bytes
        if on_gpu:
            fast4 = ("triton", lambda x=x, q4=q4, sz=sz: int4_matmul_triton(x, q4, sz, 32))
        else:
            packed = int4_to_cpu_pack(q4)
            fast4 = ("torch _weight_int4pack_mm_for_cpu",
                     lambda x=x, packed=packed, sz=sz: torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz))
        yield ("int4 matmul g32", f"M={m} N={n} K={k}", "dequantise + matmul",
               lambda x=x, q4=q4, sz=sz: int4_matmul_reference(x, q4, sz, 32), *fast4, int4_bytes, flops)
        q8, s8 = quantize_int8(weight)  # per-row scales: fedge.kernels.quant's layout and torch's packed op
        int8_bytes = q8.numel() + s8.numel() * s8.element_size() + act_bytes
        if on_gpu:
            fast8 = ("triton", lambda x=x, q8=q8, s8=s8: int8_matmul_triton(x, q8, s8))
        else:
            fast8 = ("torch _weight_int8pack_mm",
                     lambda x=x, q8=q8, s8=s8: torch._weight_int8pack_mm(x, q8, s8))
        yield ("int8 matmul per-row", f"M={m} N={n} K={k}", "dequantise + matmul",
               lambda x=x, q8=q8, s8=s8: int8_matmul_reference(x, q8, s8), *fast8, int8_bytes, flops)
        del weight


def _lora_cases(device: torch.device, quick: bool):
    from fedge.kernels.lora import lora_apply_reference, lora_apply_segmented

    on_gpu = device.type == "cuda"
    if on_gpu:
        from fedge.kernels.lora_triton import lora_apply_triton
        shapes = [(64, 8, 16, 4096, 4096), (256, 32, 16, 4096, 4096)]
    else:
        shapes = [(64, 8, 16, 576, 576), (64, 8, 16, 576, 1536)]
    if quick:
        shapes = shapes[:1]
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    for tokens, n_adapters, rank, d_in, d_out in shapes:
        x = torch.randn(tokens, d_in, device=device, generator=gen).to(dtype)
        a = (torch.randn(n_adapters, rank, d_in, device=device, generator=gen) / d_in**0.5).to(dtype)
        b = torch.randn(n_adapters, d_out, rank, device=device, generator=gen).to(dtype)
        ids = torch.randint(-1, n_adapters, (tokens,), device=device, generator=gen)
        base = torch.randn(tokens, d_out, device=device, generator=gen).to(dtype)
        used = int(ids.clamp(min=0).unique().numel())
        n_bytes = (x.numel() + 2 * base.numel() + used * rank * (d_in + d_out)) * 2
        flops = 2 * tokens * rank * (d_in + d_out)
        args = (x, a, b, ids, 2.0, base)
        fast = (("triton", lambda args=args: lora_apply_triton(*args)) if on_gpu
                else ("segmented matmuls", lambda args=args: lora_apply_segmented(*args)))
        yield ("multi-LoRA apply", f"T={tokens} adapters={n_adapters} r={rank} {d_in}->{d_out}",
               "per-token gather + bmm", lambda args=args: lora_apply_reference(*args), *fast, n_bytes, flops)


def _aggregate_cases(device: torch.device, quick: bool):
    from fedge.kernels.aggregate import aggregate_updates, aggregate_updates_reference

    on_gpu = device.type == "cuda"
    if on_gpu:
        from fedge.kernels.aggregate_triton import aggregate_updates_triton
        shapes = [(16, 4 * 2**20), (64, 4 * 2**20)]
    else:
        shapes = [(16, 2**20), (8, 4 * 2**20)]
    if quick:
        shapes = shapes[:1]
    gen = torch.Generator(device=device).manual_seed(0)
    for clients, n in shapes:
        updates = torch.randn(clients, n, device=device, generator=gen)
        weights = torch.full((clients,), 1.0 / clients, device=device)
        # two passes over the updates (norms, then the clipped sum) and the output written once
        n_bytes = 2 * updates.numel() * 4 + n * 4
        args = (updates, weights, 1000.0, 0.01)
        fast = (("triton", lambda args=args: aggregate_updates_triton(*args, generator=gen)) if on_gpu
                else ("torch (norm + BLAS gemv)", lambda args=args: aggregate_updates(*args, generator=gen)))
        yield ("aggregate clip+noise", f"K={clients} N={n}", "chunked loop",
               lambda args=args: aggregate_updates_reference(*args, generator=gen), *fast, n_bytes, 2 * clients * n)


OPS = {"verify": _verify_cases, "quant": _quant_cases, "lora": _lora_cases, "aggregate": _aggregate_cases}


def run(device: torch.device, ops: list[str], quick: bool, budget_s: float) -> tuple[list[Row], float | None, str]:
    peak, peak_source = peak_bandwidth_gbps(device)
    rows = []
    for op in ops:
        for name, shape, base_name, base_fn, fast_name, fast_fn, n_bytes, flops in OPS[op](device, quick):
            base_ms = time_ms(base_fn, device, budget_s)
            fast_ms = time_ms(fast_fn, device, budget_s)
            fast_gbps = n_bytes / (fast_ms * 1e-3) / 1e9
            rows.append(Row(
                op=name, shape=shape, baseline=base_name, baseline_ms=base_ms, fast=fast_name, fast_ms=fast_ms,
                speedup=base_ms / fast_ms, bytes=n_bytes, flops=flops, fast_gbps=fast_gbps,
                baseline_gbps=n_bytes / (base_ms * 1e-3) / 1e9,
                fast_tflops=flops / (fast_ms * 1e-3) / 1e12,
                fraction_of_peak=fast_gbps / peak if peak else None,
            ))
            _sync(device)
    return rows, peak, peak_source


def print_table(rows: list[Row], device_name: str, peak: float | None, peak_source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    peak_text = f"peak {peak:.0f} GB/s, {peak_source}" if peak else peak_source
    table = Table(title=f"fedge kernels on {device_name} ({peak_text}); GB/s and TFLOP/s of the fast path")
    for col in ("op", "shape", "baseline", "ms", "fast path", "ms", "speedup", "GB/s", "TFLOP/s", "% peak"):
        table.add_column(col, justify="left" if col in ("op", "shape", "baseline", "fast path") else "right")
    for r in rows:
        table.add_row(r.op, r.shape, r.baseline, f"{r.baseline_ms:.3f}", r.fast, f"{r.fast_ms:.3f}",
                      f"{r.speedup:.1f}x", f"{r.fast_gbps:.1f}", f"{r.fast_tflops:.3f}" if r.flops else "",
                      f"{100 * r.fraction_of_peak:.0f}%" if r.fraction_of_peak is not None else "")
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


def main(args: argparse.Namespace) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        print(f"fedge: unknown ops {unknown}; choose from {', '.join(OPS)}")
        return 2
    if getattr(args, "threads", 0):
        # on a shared machine one thread avoids OpenMP barriers waiting on a descheduled sibling
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, peak, peak_source = run(device, ops, args.quick, args.budget)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print_table(rows, device_name, peak, peak_source)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {"device": device_name, "device_type": device.type, "torch": torch.__version__,
              "triton": triton_version, "peak_gbps": peak, "peak_source": peak_source,
              "fast_path": "triton kernel" if device.type == "cuda" else "best CPU path",
              "rows": [asdict(r) for r in rows]}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")
    return 0


