"""Speculative verification: the vectorised torch path and the Triton kernel against the reference.

Greedy must match exactly. Sampling is checked in distribution against the exact law of
(n_accepted, next_id), which follows from the accept/reject rule, with a chi-square test; a
negative control shows the test rejects a plausible wrong rule. Triton kernels run on CPU under
TRITON_INTERPRET=1 (on a GPU machine without that variable set, they run compiled on the GPU).
"""

from __future__ import annotations

import importlib
import math
import os
import warnings

import pytest
import torch

if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    DEVICE = "cuda"
else:
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated: before importing kernels
    DEVICE = "cpu"

pytest.importorskip("triton")

from fedge.kernels.verify import verify, verify_reference  # noqa: E402
from fedge.kernels.verify_torch import verify_torch  # noqa: E402
from fedge.sampling import SamplingParams, sampling_probs

triton_verify = importlib.import_module("fedge.kernels.verify_triton")
verify_triton = triton_verify.verify_triton

# the interpreter evaluates log(0) = -inf with numpy, which warns; -inf is the intended value
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def _greedy_case(batch: int = 7, k: int = 5, vocab: int = 300, dtype=torch.float32, ties: bool = False):
    gen = torch.Generator().manual_seed(batch * 100 + vocab)
    logits = torch.randn(batch, k + 1, vocab, generator=gen) * 3
    if ties:  # coarse values make many exact ties for the maximum
        logits = logits.round().clamp(-2, 2)
    logits = logits.to(dtype)
    draft = logits.float().argmax(-1)[:, :k].clone()
    # break some drafts at chosen positions
    wrong = torch.rand(batch, k, generator=gen) < 0.25
    draft[wrong] = (draft[wrong] + 1) % vocab
    lens = torch.randint(0, k + 1, (batch,), generator=gen)
    lens[0], lens[-1] = 0, k
    return logits, draft, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_greedy_matches_reference_exactly(dtype, ties):
    logits, draft, lens = _greedy_case(dtype=dtype, ties=ties)
    params = SamplingParams()
    expected = verify_reference(logits, draft, lens, params)
    for result in (
        verify_torch(logits, draft, lens, params),
        verify(logits, draft, lens, params),
        verify_triton(logits.to(DEVICE), draft.to(DEVICE), lens.to(DEVICE), params),
        # small tiles and several programs per row exercise the cross-block and cross-split merge
        verify_triton(logits.to(DEVICE), draft.to(DEVICE), lens.to(DEVICE), params, block=32, vocab_splits=3),
    ):
        assert torch.equal(result.n_accepted.cpu(), expected.n_accepted)
        assert torch.equal(result.next_ids.cpu(), expected.next_ids)
    assert expected.n_accepted[0] == 0 and 0 < expected.n_accepted.max() <= 5


def test_greedy_full_acceptance_takes_bonus_token():
    logits, draft, lens = _greedy_case(batch=3, k=4, vocab=64)
    draft = logits.argmax(-1)[:, :4]  # every draft token is the target's choice
    lens = torch.tensor([4, 2, 0])
    result = verify_triton(logits.to(DEVICE), draft.to(DEVICE), lens.to(DEVICE), SamplingParams())
    assert result.n_accepted.cpu().tolist() == [4, 2, 0]
    assert result.next_ids.cpu().tolist() == [int(logits[0, 4].argmax()), int(logits[1, 2].argmax()),
                                              int(logits[2, 0].argmax())]


def exact_law(logits, draft, length, params, q=None):
    """P(n_accepted = j, next = v) for one session, as a (K+1, V) table."""
    p = sampling_probs(logits, params)
    k, vocab = draft.shape[0], p.shape[-1]
    q = q.float() if q is not None else torch.nn.functional.one_hot(draft, vocab).float()
    law = torch.zeros(k + 1, vocab, dtype=torch.float64)
    reach = 1.0  # probability that positions 0..i-1 were all accepted
    for i in range(length):
        x = int(draft[i])
        accept = min(1.0, float(p[i, x]) / float(q[i, x])) if float(q[i, x]) > 0 else 0.0
        residual = (p[i] - q[i]).clamp(min=0).double()
        residual = residual / residual.sum() if residual.sum() > 0 else p[i].double()
        law[i] = reach * (1 - accept) * residual
        reach *= accept
    law[length] = reach * p[length].double()
    return law


def chi_square_rejects(counts: torch.Tensor, law: torch.Tensor, z: float = 4.75) -> tuple[bool, float, float]:
    """Pearson chi-square goodness of fit at about 1e-6 false alarm (Wilson-Hilferty quantile).
    Cells expected fewer than 5 times are pooled; a count in a cell of zero probability rejects."""
    counts, law = counts.flatten().double(), law.flatten()
    n = counts.sum()
    if bool((counts[law == 0] > 0).any()):
        return True, math.inf, 0.0
    expected = law * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat > critical, stat, critical


def _sampling_case(case: str):
    gen = torch.Generator().manual_seed({"q": 1, "greedy_draft": 2, "zero_q": 3, "short": 4}[case])
    k, vocab = 3, 8
    logits = torch.randn(k + 1, vocab, generator=gen) * 1.5
    draft = torch.randint(0, vocab, (k,), generator=gen)
    q = None
    if case in ("q", "zero_q", "short"):
        q = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, -1)
        draft = torch.multinomial(q, 1, generator=gen).squeeze(1)
        if case == "zero_q":  # q(x) = 0 at position 1: that token must always be rejected
            q[1, draft[1]] = 0
            q[1] /= q[1].sum()
    if case == "greedy_draft":
        draft[0] = logits[0].argmax()  # likely accepted, so later positions matter too
    length = 1 if case == "short" else k
    return logits, draft, length, q


@pytest.mark.parametrize("case", ["q", "greedy_draft", "zero_q", "short"])
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_sampling_matches_exact_distribution(case, impl):
    logits, draft, length, q = _sampling_case(case)
    params = SamplingParams(temperature=0.8)
    n = 400 if impl == "reference" else 3000
    k, vocab = draft.shape[0], logits.shape[-1]
    batch_logits = logits.expand(n, -1, -1).contiguous()
    batch_draft = draft.expand(n, -1)
    lens = torch.full((n,), length)
    batch_q = q.expand(n, -1, -1).contiguous() if q is not None else None
    gen = torch.Generator().manual_seed(1234)
    if impl == "reference":
        result = verify_reference(batch_logits, batch_draft, lens, params, batch_q, gen)
    elif impl == "torch":
        result = verify_torch(batch_logits, batch_draft, lens, params, batch_q, gen)
    else:
        dev = DEVICE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = verify_triton(batch_logits.to(dev), batch_draft.to(dev), lens.to(dev), params,
                                   None if batch_q is None else batch_q.to(dev),
                                   torch.Generator(device=dev).manual_seed(1234))
    counts = torch.zeros(k + 1, vocab)
    counts.index_put_((result.n_accepted.cpu(), result.next_ids.cpu()), torch.ones(n), accumulate=True)
    law = exact_law(logits, draft, length, params, q)
    rejects, stat, critical = chi_square_rejects(counts, law)
    assert not rejects, f"{impl}/{case}: chi-square {stat:.1f} > {critical:.1f}"


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_sampling_is_lossless(impl):
    """With drafts drawn from q, the first two emitted tokens follow the target's own sampling."""
    gen = torch.Generator().manual_seed(7)
    k, vocab, n = 2, 6, 400 if impl == "reference" else 3000
    logits = torch.randn(k + 1, vocab, generator=gen) * 1.5
    params = SamplingParams(temperature=1.3)
    q = torch.softmax(torch.randn(k, vocab, generator=gen), -1)  # a draft independent of its prefix
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=gen) for i in range(k)], 1)
    args = (logits.expand(n, -1, -1).contiguous(), drafts, torch.full((n,), k), params,
            q.expand(n, -1, -1).contiguous(), torch.Generator().manual_seed(99))
    if impl == "reference":
        result = verify_reference(*args)
    elif impl == "torch":
        result = verify_torch(*args)
    else:
        result = verify_triton(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args[:5]),
                               torch.Generator(device=DEVICE).manual_seed(99))
    n_acc, nxt = result.n_accepted.cpu(), result.next_ids.cpu()
    first = torch.where(n_acc > 0, drafts[:, 0], nxt)
    p = sampling_probs(logits, params).double()
    assert not chi_square_rejects(torch.bincount(first, minlength=vocab).float(), p[0])[0]
    # the target's logits here do not depend on the prefix, so the second token also follows p[1]
    second_known = n_acc >= 1
    second = torch.where(n_acc >= 2, drafts[:, 1], nxt)[second_known]
    assert not chi_square_rejects(torch.bincount(second, minlength=vocab).float(), p[1])[0]


def test_chi_square_detects_a_wrong_rule():
    """Negative control: resampling from p (not the residual) after a rejection is biased and the
    test above must notice it at the same sample size."""
    logits, draft, length, q = _sampling_case("q")
    params = SamplingParams(temperature=0.8)
    law = exact_law(logits, draft, length, params, q)
    p = sampling_probs(logits, params).double()
    wrong = law.clone()
    for i in range(length):
        wrong[i] = law[i].sum() * p[i]
    gen = torch.Generator().manual_seed(0)
    samples = torch.multinomial(wrong.flatten().float(), 3000, replacement=True, generator=gen)
    counts = torch.bincount(samples, minlength=wrong.numel()).float()
    assert chi_square_rejects(counts, law)[0]


def test_top_k_top_p_through_dispatcher():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 3, 10, generator=gen)
    draft = torch.tensor([[int(logits[0, 0].argmax()), 3]])
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.9)
    n = 3000
    result = verify(logits.expand(n, -1, -1), draft.expand(n, -1), torch.full((n,), 2), params,
                    generator=gen)
    counts = torch.zeros(3, 10)
    counts.index_put_((result.n_accepted, result.next_ids), torch.ones(n), accumulate=True)
    assert not chi_square_rejects(counts, exact_law(logits[0], draft[0], 2, params))[0]
    with pytest.raises(ValueError, match="top-k"):
        verify_triton(logits, draft, torch.tensor([2]), params)


def test_bad_inputs_raise_clear_errors():
    logits, draft, lens = _greedy_case(batch=2, k=3, vocab=16)
    params = SamplingParams()
    for fn in (verify, verify_triton):
        with pytest.raises(ValueError, match="K\\+1"):
            fn(logits[:, :3], draft, lens, params)
        with pytest.raises(ValueError, match="draft_lens"):
            fn(logits, draft, torch.tensor([0, 4]), params)
        with pytest.raises(TypeError, match="draft_ids"):
            fn(logits, draft.float(), lens, params)
        with pytest.raises(ValueError, match="draft_probs"):
            fn(logits, draft, lens, SamplingParams(temperature=1.0), torch.rand(2, 3, 15))
