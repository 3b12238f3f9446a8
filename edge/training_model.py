"""The model an edge client trains LoRA on, loaded once per process: its compressed draft, or the target.

A phone already holds an int4 draft of the target for speculative decoding (95 MB for the default
model, against 538 MB for the fp32 target); training the federation's adapter on that draft, with
its packed weights frozen (QLoRA-style, `fedge.peft_methods.quantized_lora`), means a phone never
loads the full model. The adapter keeps the target's keys and shapes, so the cloud aggregates and
serves it on the target unchanged.

    from fedge.edge.training_model import load_training_model
    adapted = load_training_model("smollm2-135m-instruct", spec)            # int4 draft, every layer
    adapted = load_training_model(name, spec, client_model="target")       # the fp32 target
    adapted = load_training_model(name, spec, keep_layers=12)              # a truncated draft

The call is cached per process (a Flower ClientApp calls it on every message; Ray actors keep
their process), keyed by everything that changes the model. On a device, Flower runs each message in
a new process; fedge's warm SuperExec (`fedge.edge.warm_superexec --preload-model`) calls
`preload_base` before it forks them, so each one starts with the base model (draft or target) in
memory, shared copy-on-write, and only wraps its own adapter around it: the first
`load_training_model` of a fork takes the preloaded base (once: peft edits the base in place, in
the fork's own copy); a model that was not preloaded is loaded as before. A missing draft is
built once into the fedge cache (`fedge.edge.draft.default_draft_dir`), under a file lock and an
atomic rename, so concurrent clients on one machine neither race nor build it twice.

Evaluation stays on the target as served: `served_model` gives the fp32 target with the same
adapter layout (the same object when the client trains the target).

Memory: a training step allocates and frees many tensors of 0.1-1 MB (a layer's activations at batch
2 x 128 are 192-576 KB) and a few of ~25 MB (a chunk of logits). glibc serves blocks under its mmap
threshold from the heap, which only shrinks from the top; the threshold starts at 128 KB but rises to
the largest block freed (up to 32 MB), after which the step's tensors land in a heap that fragments:
the int4 draft's client grew its heap by ~250 MB in its first step with under 25 MB of it in use.
`release_freed_buffers` pins the threshold at glibc's initial 128 KB (process-wide) when a training
model loads, for every training client (draft or target alike): such blocks are mapped per tensor and
given back when freed.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
from pathlib import Path

import torch

from fedge.peft_methods.config import AdapterSpec
from fedge.peft_methods.lora_model import AdaptedModel

CLIENT_MODELS = ("draft", "target")

# (model, spec, client model, quant, keep layers, draft dir) -> model; at most a trained model and
# the served target live in one process
_CACHE: dict[tuple, AdaptedModel] = {}
_MAX_CACHED = 2


def load_training_model(model_name: str, spec: AdapterSpec, client_model: str = "draft", quant: str = "int4",
                        keep_layers: int | None = None, draft_dir: str | Path | None = None) -> AdaptedModel:
    """An `AdaptedModel` (peft LoRA of `spec`) over the model this client trains, cached per process.

    client_model: "draft" (the target's compressed draft: `quant` int4|int8|none, the first
    `keep_layers` layers or all of them, read from `draft_dir` or from the fedge cache, built there
    if missing) or "target" (the fp32 target; `quant`/`keep_layers`/`draft_dir` are ignored).
    """
    if client_model not in CLIENT_MODELS:
        raise ValueError(f"client_model must be one of {CLIENT_MODELS}, got {client_model!r}")
    if client_model == "target":
        key: tuple = (model_name, spec, "target")
    else:
        key = (model_name, spec, "draft", quant, keep_layers, str(draft_dir) if draft_dir else None)
    if key not in _CACHE:
        release_freed_buffers()
        if len(_CACHE) >= _MAX_CACHED:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest: a process trains one model at a time
        base = _PRELOADED.pop(base_key(model_name, client_model, quant, keep_layers, draft_dir), None)
        if base is None:
            base = load_base(model_name, client_model, quant, keep_layers, draft_dir)
        else:
            _FROM_PRELOADED.add(key)
        factory = {} if client_model == "target" else {"config_factory": _draft_lora_config()}
        _CACHE[key] = AdaptedModel(model_name, spec, base_and_tokenizer=base, **factory)
    return _CACHE[key]


# ------------------------------------------------------------- bases loaded before a fork

# base_key -> (model, tokenizer) without an adapter, loaded by `preload_base` in a process that
# then forks (each fork takes it once); keys of cached models built on a preloaded base
_PRELOADED: dict[tuple, tuple] = {}
_FROM_PRELOADED: set[tuple] = set()


def base_key(model_name: str, client_model: str = "draft", quant: str = "int4", keep_layers: int | None = None,
             draft_dir: str | Path | None = None) -> tuple:
    """What identifies a client's base model (the adapter spec aside)."""
    from fedge.models import resolve_model

    if client_model == "target":
        return (str(resolve_model(model_name)), "target")
    return (str(resolve_model(model_name)), "draft", quant, keep_layers or None, str(draft_dir) if draft_dir else None)


def load_base(model_name: str, client_model: str = "draft", quant: str = "int4", keep_layers: int | None = None,
              draft_dir: str | Path | None = None) -> tuple:
    """(model, tokenizer) a client trains on, before any adapter: the fp32 target or its draft."""
    if client_model not in CLIENT_MODELS:
        raise ValueError(f"client_model must be one of {CLIENT_MODELS}, got {client_model!r}")
    if client_model == "target":
        from fedge.models import load_model

        return load_model(model_name)
    return _draft_base(model_name, quant, keep_layers, draft_dir)


def preload_base(model_name: str, client_model: str = "draft", quant: str = "int4", keep_layers: int | None = None,
                 draft_dir: str | Path | None = None) -> tuple:
    """Load a base now, for the processes this one forks next (see the module docstring)."""
    key = base_key(model_name, client_model, quant, keep_layers, draft_dir)
    if key not in _PRELOADED:
        _PRELOADED[key] = load_base(model_name, client_model, quant, keep_layers, draft_dir)
    return key


def built_on_preloaded(adapted: AdaptedModel) -> bool:
    """Whether this process's `adapted` wraps a base it inherited preloaded (not one it loaded)."""
    return any(_CACHE.get(key) is adapted for key in _FROM_PRELOADED)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def release_freed_buffers(threshold_bytes: int = 128 << 10) -> bool:
    """Serve allocations above `threshold_bytes` by mmap, so freeing them returns the memory (glibc only)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): nothing to pin
        return False


def served_model(model_name: str, spec: AdapterSpec) -> AdaptedModel:
    """The fp32 target with `spec`'s adapter layout: what the cloud serves, for evaluations."""
    return load_training_model(model_name, spec, client_model="target")


def _draft_lora_config():
    from fedge.peft_methods.quantized_lora import draft_lora_config

    return draft_lora_config


def _draft_base(model_name: str, quant: str, keep_layers: int | None, draft_dir: str | Path | None) -> tuple:
    from fedge.edge.draft import load_draft
    from fedge.models import resolve_model

    path = Path(draft_dir) if draft_dir else ensure_draft(model_name, quant, keep_layers)
    # fp32 norms/attention: this code trains on CPUs without bf16 units (see load_draft)
    draft, tokenizer, info = load_draft(path, float_dtype=torch.float32)
    if resolve_model(info.target) != resolve_model(model_name):
        raise ValueError(f"{path} is a draft of {info.target}, not of {model_name}")
    draft.requires_grad_(False)
    return draft, tokenizer


def ensure_draft(model_name: str, quant: str = "int4", keep_layers: int | None = None) -> Path:
    """The cached draft directory of `model_name`, built once if it is missing.

    Clients of one machine (Ray actors, SuperNodes) may all start at once: one builds under a file
    lock while the others wait, and the directory appears by an atomic rename only when complete.
    """
    import fcntl

    from fedge.edge.draft import DraftSpec, build_draft, default_draft_dir

    path = default_draft_dir(model_name, keep_layers, quant)
    if (path / "draft.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (path / "draft.json").is_file():  # built by the process that held the lock
            return path
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            build_draft(DraftSpec(target=model_name, keep_layers=keep_layers, quant=quant), staging, progress=False)
            shutil.rmtree(path, ignore_errors=True)  # an incomplete directory left by an older version
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path
