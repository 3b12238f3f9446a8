"""The lean runner: same logits as CachedSequence, same rollback, same greedy output, any draft kind."""

import pytest
import torch

from fedge.cached_sequence import CachedSequence
from fedge.edge.draft import DraftSpec, build_draft, load_draft
from fedge.edge.drafter import Drafter
from fedge.sampling import SamplingParams
from fedge.speculative import DraftLengthController, autoregressive_generate, speculative_generate
from fedge.static_decoder import LeanDecoder, StaticSequence, make_sequence, supports
from fedge.verifier_session import TargetVerifierSession


def _greedy(sequence, n):
    out = []
    for _ in range(n):
        token = int(sequence.logits()[-1].argmax())
        out.append(token)
        sequence.accept([token])
    return out


def test_logits_and_rollback_match_cached_sequence(tiny):
    model, tokenizer = tiny
    decoder = LeanDecoder(model, compile=False)
    prompt = tokenizer("def f(x):\n    return")["input_ids"]
    ref, lean = CachedSequence(model, prompt), StaticSequence(model, prompt, decoder=decoder)
    torch.testing.assert_close(lean.logits([5, 6, 7]), ref.logits([5, 6, 7]), rtol=1e-4, atol=1e-4)
    assert lean.cached_len == ref.cached_len == len(prompt) + 3
    # reject the draft tail and part of the prompt: only the pointer moves
    for seq in (ref, lean):
        seq.accept([5, 9])
        seq.truncate(len(prompt) - 1)
        seq.accept([11, 12])
    assert lean.fed == ref.fed and lean.tokens == ref.tokens
    torch.testing.assert_close(lean.logits([3]), ref.logits([3]), rtol=1e-4, atol=1e-4)
    assert _greedy(lean, 12) == _greedy(ref, 12)


def test_greedy_speculative_identical_with_lean_runners(tiny, monkeypatch):
    monkeypatch.setenv("FEDGE_LEAN", "1")
    model, tokenizer = tiny
    draft = LeanDecoder(model, compile=False)  # a second runner over the same weights: a perfect draft
    prompt = tokenizer("import os\nfor i in range(")["input_ids"]
    reference = autoregressive_generate(model, prompt, 24)
    verifier = TargetVerifierSession(model, prompt, SamplingParams())
    assert isinstance(verifier.sequence, StaticSequence)
    drafter = Drafter(model, prompt, SamplingParams())
    drafter.sequence = StaticSequence(model, prompt, decoder=draft)
    result = speculative_generate(drafter, verifier, 24, DraftLengthController(fixed_k=3))
    assert result.token_ids == reference
    assert result.stats.accepted == result.stats.drafted  # the draft is the target


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_draft_runs_lean(tiny, tmp_path, quant):
    target, tokenizer = tiny
    path = tmp_path / quant
    build_draft(DraftSpec(target="tiny-random-llama", keep_layers=1, quant=quant), path, progress=False)
    draft, _, _ = load_draft(path)
    assert supports(draft)
    prompt = tokenizer("class A:\n    def")["input_ids"]
    lean = StaticSequence(draft, prompt, decoder=LeanDecoder(draft, compile=False))
    torch.testing.assert_close(lean.logits([4, 8]), CachedSequence(draft, prompt).logits([4, 8]),
                               rtol=2e-2, atol=2e-2)
    assert _greedy(lean, 8) == autoregressive_generate(draft, prompt, 8)


def test_cache_grows_past_its_bucket(tiny):
    model, _ = tiny
    seq = StaticSequence(model, [1, 2, 3], decoder=LeanDecoder(model, compile=False))
    ref = CachedSequence(model, [1, 2, 3])
    long = [4 + i % 50 for i in range(520)]
    seq.accept(long)
    ref.accept(long)
    torch.testing.assert_close(seq.logits([7]), ref.logits([7]), rtol=1e-4, atol=1e-4)
    assert seq.max_len >= 1024


def test_fallbacks(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setenv("FEDGE_COMPILE", "1")
    assert LeanDecoder(model).compile is True
    monkeypatch.setenv("FEDGE_COMPILE", "0")
    assert LeanDecoder(model).compile is False
    monkeypatch.setenv("FEDGE_LEAN", "0")
    assert type(make_sequence(model, [1, 2])) is CachedSequence
    monkeypatch.setenv("FEDGE_LEAN", "1")
    assert type(make_sequence(model, [1, 2])) is StaticSequence
    assert not supports(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one prompt token"):
        StaticSequence(model, [])


@pytest.mark.slow
def test_compiled_steps_match_eager(tiny):
    """torch.compile'd fixed-width steps (padded feeds) give the eager runner's logits and greedy output;
    slow: compiling takes minutes on a loaded 2-core CPU."""
    model, tokenizer = tiny
    compiled = LeanDecoder(model, compile=True)
    prompt = tokenizer("def f(x):\n    return")["input_ids"]
    ref, lean = CachedSequence(model, prompt), StaticSequence(model, prompt, decoder=compiled)
    lean.logits(), ref.logits()  # prefill: eager in both
    for seq in (ref, lean):
        seq.accept([5])
    torch.testing.assert_close(lean.logits([6, 7]), ref.logits([6, 7]), rtol=1e-4, atol=1e-4)  # width 4
    for seq in (ref, lean):
        seq.truncate(len(prompt) + 1)
    assert _greedy(lean, 6) == _greedy(ref, 6)  # width 1
    assert compiled.compile and compiled.warmup_s  # compiled, and its warm-up time recorded
