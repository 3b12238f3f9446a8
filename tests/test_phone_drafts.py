"""Simulated phones' drafts: replayed proposals are the draft's own, the shared draft farm drafts
what each phone's Drafter would, and an emulated device's drafting takes k / tokens_per_s."""

from __future__ import annotations

import threading

from fedge.edge.client import PacedProposer
from fedge.edge.client_types import EdgeStats
from fedge.edge.drafter import Drafter
from fedge.sampling import SamplingParams
from fedge.simulations.phone_drafts import DraftFarm, FarmSequence, greedy_draft_table
from fedge.speculative import DraftLengthController, autoregressive_generate, speculative_generate
from fedge.verifier_session import TargetVerifierSession


def _noisy(model, scale=0.02):
    import copy

    import torch

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return draft


def test_replayed_table_holds_the_drafts_own_greedy_proposals(tiny):
    model, tok = tiny
    draft = _noisy(model)
    prompt = tok("def add(a, b):")["input_ids"]
    output = autoregressive_generate(model, prompt, 20)
    table = greedy_draft_table(draft, prompt, output, k_max=5, max_new_tokens=20)
    assert sorted(table) == [len(prompt) + j for j in range(len(output))]
    for j in (0, 3, 11, 19):
        fresh = Drafter(draft, prompt + output[:j], SamplingParams())
        assert table[len(prompt) + j] == fresh.propose(min(5, 20 - j - 1))[0]


def test_paced_replay_keeps_greedy_output_and_the_device_speed(tiny):
    model, tok = tiny
    draft = _noisy(model)
    prompt = tok("import os\n")["input_ids"]
    reference = autoregressive_generate(model, prompt, 16)
    stats = EdgeStats()
    drafter = Drafter(draft, prompt, SamplingParams())
    paced = PacedProposer(drafter, 400.0, stats, greedy_draft_table(draft, prompt, reference, 4, 16))
    verifier = TargetVerifierSession(model, prompt, SamplingParams())
    result = speculative_generate(paced, verifier, 16, DraftLengthController(fixed_k=4))
    assert result.token_ids == reference
    assert stats.draft_replayed == result.stats.rounds  # every verified prefix was in the table
    assert result.stats.draft_s >= sum(result.stats.ks) / 400.0  # k drafts take at least k / tokens_per_s
    assert stats.draft_compute_s < result.stats.draft_s


def test_farm_drafts_what_each_phones_own_drafter_does(tiny):
    model, tok = tiny
    draft = _noisy(model)
    farm = DraftFarm(draft)
    prompts = [tok(p)["input_ids"] for p in ("def f(x):", "import os\n", "class A:\n    def", "print(")]
    same: dict[int, bool] = {}

    def phone(i: int) -> None:
        shared = Drafter(draft, prompts[i], SamplingParams())
        shared.sequence = FarmSequence(farm, prompts[i])
        alone = Drafter(draft, prompts[i], SamplingParams())
        ok = True
        for r in range(4):
            ids, _ = shared.propose(3)
            ok &= ids == alone.propose(3)[0]
            verdict = ids[:r % 3] + [(ids[r % 3] + 1) % 100]  # a rejection: roll both back
            shared.accept(verdict)
            alone.accept(verdict)
        same[i] = ok and shared.tokens == alone.tokens

    threads = [threading.Thread(target=phone, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    farm.stop()
    assert same == dict.fromkeys(range(len(prompts)), True)
    assert farm.rows > farm.forwards  # phones' steps shared forwards
