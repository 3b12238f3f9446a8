"""Compressed drafts derived from the target: keep the first layers, quantise, optionally distil.

The draft keeps the target's embedding, final norm and tied head (LayerSkip-style), so every
linear layer keeps its shape and one LoRA adapter fits draft and target alike.

A draft directory holds `draft.safetensors`, the truncated `config.json`, the tokenizer and
`draft.json` (target fingerprint, layers kept, quantisation, size in bytes).
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedge.kernels.quant import COMPUTE_DTYPE, Int8Linear, QuantizedEmbedding, empty_quantized_linear, quantize_linear
from fedge.models import load_model, model_fingerprint, resolve_model, tokenizer_fingerprint
from fedge.peft_methods.lora_files import AdapterFileError, read_lora_adapter

DRAFT_FORMAT = "fedge-draft/1"
QUANT_CHOICES = ("none", "int8", "int4")


@dataclass
class DraftSpec:
    target: str
    keep_layers: int | None = None  # None keeps every layer
    quant: str = "int8"
    group_size: int = 32  # int4 only; int8 scales are per output row
    distill_steps: int = 0
    distill_data: str = "stdlib"
    distill_seq_len: int = 128
    distill_batch: int = 4
    distill_lr: float = 2e-4
    seed: int = 0


@dataclass
class DraftInfo:
    format: str
    target: str
    target_fingerprint: str
    tokenizer_fingerprint: str
    num_target_layers: int
    keep_layers: int
    quant: str
    group_size: int
    bytes: int
    distill: dict = field(default_factory=dict)


class DraftError(ValueError):
    pass


def build_draft(spec: DraftSpec, out: str | Path, progress: bool = True) -> DraftInfo:
    """Derive a draft from `spec.target` and write it to `out`."""
    if spec.quant not in QUANT_CHOICES:
        raise DraftError(f"quant must be one of {QUANT_CHOICES}, got {spec.quant!r}")
    target, tokenizer = load_model(spec.target)
    n_layers = target.config.num_hidden_layers
    keep = n_layers if spec.keep_layers is None else spec.keep_layers
    if not 1 <= keep <= n_layers:
        raise DraftError(f"--keep-layers must be in [1, {n_layers}] for {spec.target}, got {keep}")

    draft = truncate_layers(copy.deepcopy(target), keep)
    distill_report: dict = {}
    if spec.distill_steps > 0:
        distill_report = distill(draft, target, tokenizer, spec, progress=progress)
    draft.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(quantized_state_dict(draft, spec.quant, spec.group_size), str(out / "draft.safetensors"))
    draft.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = DraftInfo(
        format=DRAFT_FORMAT,
        target=spec.target,
        target_fingerprint=model_fingerprint(target),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        num_target_layers=n_layers,
        keep_layers=keep,
        quant=spec.quant,
        group_size=spec.group_size,
        bytes=0,
        distill=distill_report,
    )
    return _write_info(info, out)


def _write_info(info: DraftInfo, out: Path) -> DraftInfo:
    info.bytes = (out / "draft.safetensors").stat().st_size
    (out / "draft.json").write_text(json.dumps(asdict(info), indent=2))
    return info


def truncate_layers(model: nn.Module, keep: int) -> nn.Module:
    """Keep the first `keep` decoder layers; the final norm and tied head stay."""
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:keep]
    return model


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.startswith("model.layers.")]


def quantized_state_dict(model: nn.Module, quant: str, group_size: int) -> dict[str, torch.Tensor]:
    """The tensors of a draft file. The tied head is stored once, as `lm_head.*`."""
    if quant == "none":
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        return state
    state: dict[str, torch.Tensor] = {}
    linear_names = set(_linear_names(model))
    for name, mod in model.named_modules():
        if name in linear_names:
            for key, value in quantize_linear(mod.weight, quant, group_size).state_dict().items():
                state[f"{name}.{key}"] = value.contiguous()
    head = Int8Linear.from_float(model.lm_head.weight)
    for key, value in head.state_dict().items():
        state[f"lm_head.{key}"] = value.contiguous()
    for key, value in model.state_dict().items():
        module_name = key.rsplit(".", 1)[0]
        if module_name in linear_names or key.startswith(("lm_head.", "model.embed_tokens.")):
            continue
        state[key] = value.to(COMPUTE_DTYPE).contiguous()  # norms
    return state


def load_draft(path: str | Path, check_target=None, float_dtype: torch.dtype = COMPUTE_DTYPE):
    """Load (draft_model, tokenizer, info) from a draft directory in a few seconds.

    `check_target`, if given, is the target model: its fingerprint must match the draft's.
    `float_dtype`: what the unquantised parts (norms, attention, embedding rows) compute in. bf16 is
    the packed ops' fast path for inference; training passes fp32, because CPUs without bf16 units
    emulate bf16 element-wise ops slowly (the packed matmuls still take bf16 inputs either way).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta_file = path / "draft.json"
    if not meta_file.is_file():
        raise DraftError(f"{path} is not a draft directory (no draft.json); build one with `fedge draft build`")
    info = DraftInfo(**json.loads(meta_file.read_text()))
    if info.format != DRAFT_FORMAT:
        raise DraftError(f"{path}: unsupported draft format {info.format!r}")
    if check_target is not None and model_fingerprint(check_target) != info.target_fingerprint:
        raise DraftError(f"{path} was derived from another target (fingerprint {info.target_fingerprint})")
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if info.quant == "none":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(load_file(str(path / "draft.safetensors")), strict=False)
        model.tie_weights()
    else:
        model = _quantized_skeleton(config, info, float_dtype)
        # the tensors read from the file become the model's: one copy of the draft, ever (peak memory)
        state = read_safetensors(path / "draft.safetensors")
        state = {k: v.to(_skeleton_dtype(model, k, v.dtype)) for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        if missing or unexpected:
            raise DraftError(f"{path}: draft file does not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        _rebuild_rotary(model)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise DraftError(f"{path}: draft file lacks {left[:3]}")
    model.eval()
    return model, tokenizer, info


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
                       "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file read into fresh tensors with plain reads, not mmap.

    `safetensors.torch.load_file` maps the file and hands out tensors over the mapping: the file's
    pages then count in the process's resident memory, copying them into the model doubles the
    draft for a moment, and keeping them as the model's buffers is unsafe (the packed ops need
    64-byte aligned buffers, which the file's offsets do not guarantee).
    """
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        start = f.tell()
        header.pop("__metadata__", None)
        state = {}
        for name, entry in header.items():
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise DraftError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            tensor = torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            if tensor.numel() and f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise DraftError(f"{path}: tensor {name} is cut short")
            state[name] = tensor
    return state


def _quantized_skeleton(config, info: DraftInfo, float_dtype: torch.dtype) -> nn.Module:
    """The draft's modules on the meta device (no storage): packed linears, int8 head, tied embedding."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=float_dtype)
        for name in _linear_names(model):
            parent_name, child = name.rsplit(".", 1)
            old = model.get_submodule(name)
            setattr(model.get_submodule(parent_name), child,
                    empty_quantized_linear(old.in_features, old.out_features, info.quant, info.group_size))
        head = Int8Linear(config.hidden_size, config.vocab_size)
    model.lm_head = head
    model.model.embed_tokens = QuantizedEmbedding(head, float_dtype)
    return model


def _skeleton_dtype(model: nn.Module, key: str, stored: torch.dtype) -> torch.dtype:
    """The dtype the skeleton gives `key` (float parts in the caller's dtype, packed parts as stored);
    a key it lacks keeps its stored dtype (and is reported as unexpected by the load)."""
    module_name, _, leaf = key.rpartition(".")
    try:
        return getattr(model.get_submodule(module_name), leaf).dtype
    except AttributeError:
        return stored


def _rebuild_rotary(model: nn.Module) -> None:
    """Recompute the rotary embeddings' frequency buffers (not saved; left empty by the meta build)."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            parent, child = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(model.get_submodule(parent), child, type(module)(config=module.config))


# ---------------------------------------------------------------- distillation


def distill(draft: nn.Module, target: nn.Module, tokenizer, spec: DraftSpec, progress: bool = True) -> dict:
    """Train the kept layers to match the target's next-token distribution (KL), on local text."""
    from tqdm import tqdm

    from fedge.data import read_source

    texts = [ex.prompt + ex.text for ex in read_source(spec.distill_data)]
    rng = random.Random(spec.seed)
    stream: list[int] = []
    for text in rng.sample(texts, min(len(texts), 400)):
        stream.extend(tokenizer(text)["input_ids"])
    if len(stream) < spec.distill_seq_len + 1:
        raise DraftError(f"{spec.distill_data} has too little text to distil on")

    draft.train()
    for name, param in draft.named_parameters():
        # the embedding/head is shared with the target: keep it frozen so adapters and tokens agree
        param.requires_grad = not name.startswith(("model.embed_tokens", "lm_head"))
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=spec.distill_lr)
    target.eval()
    start = time.perf_counter()
    history: list[tuple[float, float]] = []
    bar = tqdm(range(spec.distill_steps), desc="distilling draft", disable=not progress)
    for _ in bar:
        starts = [rng.randrange(0, len(stream) - spec.distill_seq_len) for _ in range(spec.distill_batch)]
        batch = torch.tensor([stream[s: s + spec.distill_seq_len] for s in starts])
        with torch.no_grad():
            teacher = torch.log_softmax(target(batch).logits.float(), dim=-1)
        student = torch.log_softmax(draft(batch).logits.float(), dim=-1)
        loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") / batch.shape[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
        history.append((loss.item(), agree))
        bar.set_postfix(kl=f"{loss.item():.3f}", agree=f"{agree:.2f}")
    for param in draft.parameters():
        param.requires_grad = False
    window = max(1, len(history) // 10)
    head, tail = history[:window], history[-window:]
    return {"steps": spec.distill_steps, "data": spec.distill_data,
            "seconds": round(time.perf_counter() - start, 1),
            "initial_kl": sum(h[0] for h in head) / window, "final_kl": sum(h[0] for h in tail) / window,
            "initial_agreement": sum(h[1] for h in head) / window,
            "final_agreement": sum(h[1] for h in tail) / window}


def default_draft_dir(target: str, keep_layers: int | None, quant: str) -> Path:
    """Where benchmarks cache the drafts they build (beside the target in the fedge cache)."""
    from fedge.models import cache_dir

    base = Path(resolve_model(target)).name if "/" in target else target
    return cache_dir() / "drafts" / f"{base}-L{keep_layers or 'all'}-{quant}"


# ---------------------------------------------------------------- adapters


class LoraSideLinear(nn.Module):
    """A (quantised) draft layer plus the global adapter as an exact low-rank side path.

    Re-quantising base + B A would move weights off the grid the draft was derived on (SmolLM2's
    int4 draft reproduces the target's Q4_1 grid almost exactly); a rank-r side path costs two thin
    matmuls and keeps both the draft's accuracy and the adapter exact.
    """

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a.to(COMPUTE_DTYPE))
        self.register_buffer("lora_b", (scale * lora_b.float()).to(COMPUTE_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = (x.to(COMPUTE_DTYPE) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + side.to(x.dtype)


def merge_adapter_into_draft(draft: nn.Module, adapter_dir: str | Path) -> int:
    """Apply a peft LoRA adapter (the federation's global adapter) to the draft, exactly.

    Float layers get scale * B @ A added to their weight; quantised layers keep their weights and
    gain a low-rank side path. Layers the draft dropped are skipped. Returns the layers changed.
    """
    try:
        lora = read_lora_adapter(adapter_dir)
    except AdapterFileError as exc:
        raise DraftError(str(exc)) from exc
    changed = 0
    with torch.no_grad():
        for name, (tensor_a, tensor_b) in lora.pairs.items():
            try:
                module = draft.get_submodule(name)
            except AttributeError:
                continue  # a layer the draft does not keep
            if isinstance(module, nn.Linear):
                module.weight += (lora.scale * tensor_b.float() @ tensor_a.float()).to(module.weight.dtype)
            else:
                parent, child = name.rsplit(".", 1)
                setattr(draft.get_submodule(parent), child, LoraSideLinear(module, tensor_a, tensor_b, lora.scale))
            changed += 1
    return changed
