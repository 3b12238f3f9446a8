"""Speculative decoding: lossless greedy and sampling, KV rollback, drafts, adaptive k."""

import copy

import pytest
import torch

from fedge.cached_sequence import CachedSequence
from fedge.edge.draft import DraftError, DraftSpec, build_draft, load_draft
from fedge.edge.drafter import Drafter
from fedge.kernels.verify import verify_reference
from fedge.sampling import SamplingParams, sampling_probs
from fedge.speculative import (
    DraftLengthController,
    autoregressive_generate,
    expected_tokens_per_round,
    speculative_generate,
)
from fedge.verifier_session import TargetVerifierSession

GREEDY = SamplingParams()


def _prompts(tokenizer, n=20):
    stems = ["def f(x):", "import os\n", "class A:\n    ", "for i in range(", "# compute the ", "while True:"]
    return [tokenizer(f"{stems[i % len(stems)]} {i} {i * 7}")["input_ids"] for i in range(n)]


def _noisy_copy(model, scale, seed=0):
    """A 'random draft': the target's architecture with heavily perturbed weights."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale)
    return draft


def _speculative(target, draft, prompt, n, params=GREEDY, k=None, seed=0):
    verifier = TargetVerifierSession(target, prompt, params, seed=seed)
    drafter = Drafter(draft, prompt, params, seed=seed)
    return speculative_generate(drafter, verifier, n, DraftLengthController(fixed_k=k))


@pytest.mark.parametrize("draft_kind", ["self", "random", "int4-truncated"])
def test_greedy_equals_target_greedy_on_tiny(tiny, tmp_path, draft_kind):
    target, tok = tiny
    if draft_kind == "self":
        draft = target
    elif draft_kind == "random":
        draft = _noisy_copy(target, 0.5)
    else:
        build_draft(DraftSpec(target="tiny-random-llama", keep_layers=2, quant="int4"), tmp_path / "d")
        draft, _, _ = load_draft(tmp_path / "d", check_target=target)
    accepted = drafted = 0
    for prompt in _prompts(tok):
        reference = autoregressive_generate(target, prompt, 24)
        result = _speculative(target, draft, prompt, 24)
        assert result.token_ids == reference
        accepted += result.stats.accepted
        drafted += result.stats.drafted
    if draft_kind == "self":
        assert accepted == drafted  # the target always agrees with itself
    if draft_kind == "random":
        assert accepted < drafted  # rejections really happened, and were corrected


def test_target_calls_are_fewer_than_tokens_with_a_good_draft(tiny):
    target, tok = tiny
    result = _speculative(target, target, _prompts(tok, 1)[0], 30, k=4)
    assert result.stats.rounds == 6 and result.stats.tokens_per_target_call == 5.0


def test_rollback_logits_equal_fresh_recompute(tiny):
    model, tok = tiny
    prompt = tok("def rollback(x):")["input_ids"]
    session = CachedSequence(model, prompt)
    session.logits([5, 6, 7, 8])  # a draft that enters the cache
    session.accept([5, 6])  # two kept, two rolled back
    session.accept([9])
    assert session.cached_len == len(prompt) + 2  # no re-prefill: the kept prefix stays cached
    rolled = session.logits([10, 11])
    fresh = CachedSequence(model, prompt + [5, 6, 9]).logits([10, 11])
    torch.testing.assert_close(rolled, fresh, rtol=1e-4, atol=1e-4)
    session.truncate(len(prompt) + 1)
    torch.testing.assert_close(session.logits(), CachedSequence(model, prompt + [5]).logits(), rtol=1e-4, atol=1e-4)


def _total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def test_verify_sampling_matches_target_distribution_and_converges():
    """Accept/resample with a deliberately bad q reproduces p; the error shrinks with samples."""
    gen = torch.Generator().manual_seed(0)
    vocab = 12
    p_logits = torch.randn(vocab, generator=gen) * 1.5
    q = torch.softmax(torch.randn(vocab, generator=gen) * 1.5, -1)
    params = SamplingParams(temperature=1.0)
    p = sampling_probs(p_logits, params)
    distances = []
    counts = torch.zeros(vocab)
    drawn = 0
    for n in (500, 2000, 8000):
        batch = n - drawn
        drafts = torch.multinomial(q, batch, replacement=True, generator=gen).reshape(batch, 1)
        logits = p_logits.expand(batch, 2, vocab)
        result = verify_reference(logits, drafts, torch.ones(batch, dtype=torch.long), params,
                                  q.expand(batch, 1, vocab), gen)
        first = torch.where(result.n_accepted == 1, drafts[:, 0], result.next_ids)
        counts += torch.bincount(first, minlength=vocab).float()
        drawn = n
        distances.append(_total_variation(counts, p))
    assert distances[-1] < 0.03
    assert distances[-1] < distances[0]
    # the draft alone would be far off: the test can tell a wrong sampler from a right one
    assert _total_variation(q * 8000, p) > 0.1


def test_speculative_sampling_end_to_end_matches_target(tiny_small_vocab):
    """Two-token sequences from the full loop (draft + verifier sessions) follow the target."""
    target, tok = tiny_small_vocab
    draft = _noisy_copy(target, 0.8, seed=3)
    params = SamplingParams(temperature=1.5)
    prompt = tok("abc")["input_ids"]
    vocab = target.config.vocab_size
    with torch.no_grad():
        p1 = sampling_probs(target(torch.tensor([prompt])).logits[0, -1], params)
    counts = torch.zeros(vocab)
    runs = 1500
    rejected = 0
    for seed in range(runs):
        result = _speculative(target, draft, prompt, 2, params, k=2, seed=seed)
        counts[result.token_ids[0]] += 1
        rejected += result.stats.drafted - result.stats.accepted
    assert rejected > 0.2 * runs  # the draft is genuinely different
    assert _total_variation(counts, p1) < 0.06


def test_sampling_probs_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    top2 = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (top2[2:] == 0).all() and torch.isclose(top2.sum(), torch.tensor(1.0))
    nucleus = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert nucleus[0] > 0 and nucleus[1] > 0 and (nucleus[2:] == 0).all()
    assert sampling_probs(logits, GREEDY).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_greedy_verify_semantics_ragged_batch():
    vocab = 5
    logits = torch.full((2, 4, vocab), -10.0)
    # session 0 target argmaxes: 1, 2, 3, 4 ; session 1: 0, 0, ...
    for i, t in enumerate([1, 2, 3, 4]):
        logits[0, i, t] = 10
    logits[1, :, 0] = 10
    drafts = torch.tensor([[1, 2, 0], [3, 0, 0]])
    result = verify_reference(logits, drafts, torch.tensor([3, 1]), GREEDY)
    assert result.n_accepted.tolist() == [2, 0]
    assert result.next_ids.tolist() == [3, 0]
    full = verify_reference(logits, torch.tensor([[1, 2, 3], [0, 0, 0]]), torch.tensor([3, 0]), GREEDY)
    assert full.n_accepted.tolist() == [3, 0] and full.next_ids.tolist() == [4, 0]  # bonus tokens


def test_adaptive_k_follows_acceptance_and_costs():
    assert expected_tokens_per_round(0.0, 5) == 1.0
    assert expected_tokens_per_round(1.0, 5) == 6.0
    good = DraftLengthController(k_max=8)
    bad = DraftLengthController(k_max=8)
    for _ in range(20):
        good.record(k=6, n_accepted=6, draft_s=0.006, verify_s=0.05)
        bad.record(k=6, n_accepted=0, draft_s=0.006, verify_s=0.05)
    assert good.choose() == 8 and bad.choose() <= 2
    slow_draft = DraftLengthController(k_max=8)
    for _ in range(20):
        slow_draft.record(k=4, n_accepted=3, draft_s=0.4, verify_s=0.05)
    assert slow_draft.choose() < good.choose()
    assert DraftLengthController(fixed_k=3).choose() == 3


def test_draft_build_and_load(tiny, tmp_path):
    target, _ = tiny
    for quant in ("none", "int8", "int4"):
        info = build_draft(DraftSpec(target="tiny-random-llama", keep_layers=3, quant=quant), tmp_path / quant)
        model, tok, loaded = load_draft(tmp_path / quant, check_target=target)
        assert loaded == info and info.keep_layers == 3 and info.num_target_layers == 4
        assert len(model.model.layers) == 3
        assert info.bytes == (tmp_path / quant / "draft.safetensors").stat().st_size
        # same linear shapes as the target, so one LoRA adapter fits both
        assert model.model.layers[0].mlp.up_proj.out_features == target.model.layers[0].mlp.up_proj.out_features
    size = {q: (tmp_path / q / "draft.safetensors").stat().st_size for q in ("none", "int8", "int4")}
    assert size["int4"] < size["int8"] < size["none"]
    with pytest.raises(DraftError, match="keep-layers"):
        build_draft(DraftSpec(target="tiny-random-llama", keep_layers=9), tmp_path / "bad")
    with pytest.raises(DraftError, match="not a draft directory"):
        load_draft(tmp_path)
    small, _ = __import__("fedge.models", fromlist=["load_model"]).load_model("tiny-random-llama-small-vocab")
    with pytest.raises(DraftError, match="another target"):
        load_draft(tmp_path / "int8", check_target=small)


def test_distillation_reduces_kl(tmp_path):
    info = build_draft(DraftSpec(target="tiny-random-llama", keep_layers=1, quant="none", distill_steps=40,
                                 distill_seq_len=32, distill_batch=4, distill_lr=3e-3), tmp_path / "d")
    assert info.distill["final_kl"] < 0.8 * info.distill["initial_kl"]


@pytest.mark.slow
def test_real_compressed_draft_is_lossless_on_default_model(smollm2, tmp_path):
    target, tok = smollm2
    build_draft(DraftSpec(target="smollm2-135m-instruct", quant="int4"), tmp_path / "int4")
    draft, _, info = load_draft(tmp_path / "int4", check_target=target)
    assert info.bytes < 0.25 * sum(p.numel() * p.element_size() for p in target.parameters())
    stems = ["def parse_args(argv):\n", "import json\n\n\ndef load(path):\n", "class Stack:\n    def push(self, x):\n",
             "Question: what is 12 + 30?\nAnswer:", "for line in open(path):\n"]
    drafted = accepted = 0
    for i in range(20):
        prompt = tok(f"{stems[i % len(stems)]}    # step {i}\n")["input_ids"]
        reference = autoregressive_generate(target, prompt, 12)
        result = _speculative(target, draft, prompt, 12)
        assert result.token_ids == reference, f"prompt {i}"
        drafted += result.stats.drafted
        accepted += result.stats.accepted
    assert accepted / drafted > 0.5  # the compressed draft is a useful draft


def test_global_adapter_folds_into_quantised_draft(tiny, tmp_path):
    """The federation's peft adapter on an int8 draft moves it as far toward the adapted target as the
    adapter moved the target itself: the draft's own quantisation error is all that is left."""
    from peft import LoraConfig, get_peft_model

    from fedge.edge.draft import merge_adapter_into_draft

    target, tok = tiny
    adapted = get_peft_model(copy.deepcopy(target), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapted.save_pretrained(tmp_path / "adapter")
    build_draft(DraftSpec(target="tiny-random-llama", quant="int8"), tmp_path / "d")
    draft, _, _ = load_draft(tmp_path / "d")
    ids = torch.tensor([tok("def merged(x): return x")["input_ids"]])
    with torch.no_grad():
        want = adapted(ids).logits
        before = (draft(ids).logits.float() - want).abs().mean()
        base_gap = (draft(ids).logits.float() - target(ids).logits).abs().mean()
        assert merge_adapter_into_draft(draft, tmp_path / "adapter") == 2 * target.config.num_hidden_layers
        after = (draft(ids).logits.float() - want).abs().mean()
    assert after < 0.5 * before
    assert after < 2 * base_gap + 1e-3


@pytest.mark.parametrize("draft_kind", ["self", "random"])
def test_unverified_tokens_are_reconciled_by_the_shared_loop(tiny, draft_kind):
    """Tokens drafted while the verifier was away are the next proposals: the target keeps or
    replaces them, the text ends as the target's own, and what was shown is confirmed or rewritten."""
    from fedge.edge.client_types import EdgeStats
    from fedge.edge.offline_drafting import Transcript

    target, tok = tiny
    draft = target if draft_kind == "self" else _noisy_copy(target, 0.5)
    prompt = _prompts(tok, 3)[2]
    drafter = Drafter(draft, prompt, GREEDY)
    stats, events = EdgeStats(), []
    transcript = Transcript(stats, lambda kind, tokens: events.append((kind, list(tokens))))
    offline = drafter.draft_unverified(6)
    transcript.add_unverified(offline, drafted_offline=True)
    assert drafter.unverified_ids == offline and drafter.tokens == prompt + offline
    verifier = TargetVerifierSession(target, prompt, GREEDY)
    result = speculative_generate(drafter, verifier, 16, DraftLengthController(fixed_k=2),
                                  on_tokens=transcript.add_verified)
    reference = autoregressive_generate(target, prompt, 16)
    assert result.token_ids == reference and transcript.shown == reference
    assert drafter.unverified == [] and drafter.tokens == prompt + reference
    kept = next((i for i, (a, b) in enumerate(zip(offline, reference[:6], strict=True)) if a != b), 6)
    assert stats.offline_kept == kept
    if draft_kind == "self":
        assert kept == 6 and result.stats.rounds == 6  # two rounds confirm the six offline tokens
        assert [kind for kind, _ in events] == ["unverified"] + ["verified"] * 4
    else:
        rewrites = [tokens for kind, tokens in events if kind == "rewrite"]
        assert kept < 6 and len(rewrites) == 1  # the first rejected offline token rewrites the rest
        assert kept < len(rewrites[0]) and rewrites[0] == reference[: len(rewrites[0])]
