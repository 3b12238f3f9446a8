import pytest

from fedge import data


@pytest.fixture(scope="module")
def stdlib_examples():
    return data.read_source("stdlib")


def _check_disjoint_cover(corpus, examples):
    seen = []
    for client in corpus.clients:
        seen.extend(id(e) for e in client.train + client.heldout)
        train_docs = {e.doc for e in client.train}
        assert not train_docs & {e.doc for e in client.heldout}, client.name
    assert len(seen) == len(set(seen)), "an example sits in two clients"
    assert sorted(seen) == sorted(id(e) for e in examples), "the partition lost examples"


def test_stdlib_natural_split_by_package(stdlib_examples):
    corpus = data.partition(stdlib_examples, "natural")
    names = {c.name for c in corpus.clients}
    assert len(corpus.clients) >= 20
    assert {"email", "asyncio", "json", "http"} <= names
    for client in corpus.clients:
        assert {e.group for e in client.train + client.heldout} == {client.name}
        assert client.heldout, f"{client.name} has no held-out files"
    _check_disjoint_cover(corpus, stdlib_examples)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3"])
def test_stdlib_iid_and_dirichlet_cover_disjointly(stdlib_examples, spec):
    corpus = data.partition(stdlib_examples, spec, num_clients=12, seed=3)
    assert 1 < len(corpus.clients) <= 12
    _check_disjoint_cover(corpus, stdlib_examples)


def test_dirichlet_is_more_skewed_than_iid(stdlib_examples):
    def group_spread(corpus):
        return sum(len({e.group for e in c.train}) for c in corpus.clients) / len(corpus.clients)

    iid = data.partition(stdlib_examples, "iid", num_clients=10)
    skewed = data.partition(stdlib_examples, "dirichlet:0.05", num_clients=10)
    assert group_spread(skewed) < group_spread(iid)


def test_natural_with_client_cap_merges_small_groups(stdlib_examples):
    corpus = data.partition(stdlib_examples, "natural", num_clients=8)
    assert len(corpus.clients) == 8
    assert "_small" in {c.name for c in corpus.clients}
    _check_disjoint_cover(corpus, stdlib_examples)


def test_shakespeare_by_speaker(shared_data):
    examples = data.read_source(f"text:{shared_data / 'tinyshakespeare' / 'input.txt'}")
    corpus = data.partition(examples, "natural", min_examples=50)
    names = {c.name for c in corpus.clients}
    assert {"ROMEO", "JULIET", "_small"} <= names
    _check_disjoint_cover(corpus, examples)


def test_gsm8k_as_chat_pairs(shared_data):
    examples = data.read_source(f"jsonl:{shared_data / 'gsm8k' / 'train.jsonl'}")
    assert len(examples) == 7473
    assert all(e.prompt and "####" in e.text for e in examples[:50])
    corpus = data.partition(examples, "dirichlet:0.5", num_clients=6)
    _check_disjoint_cover(corpus, examples)


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(data.DataSourceError, match="unknown data source"):
        data.read_source("nope")
    with pytest.raises(data.DataSourceError, match="no such file"):
        data.read_source(f"text:{tmp_path / 'missing.txt'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(data.DataSourceError, match="bad.jsonl:2: not JSON"):
        data.read_source(f"jsonl:{bad}")
    plain = tmp_path / "plain.txt"
    plain.write_text("one paragraph\n\nanother paragraph\n")
    with pytest.raises(data.DataSourceError, match="no natural groups"):
        data.partition(data.read_source(f"text:{plain}"), "natural")
    with pytest.raises(data.DataSourceError, match="dirichlet needs an alpha"):
        data.partition(data.read_source("stdlib")[:50], "dirichlet:x")


def test_stats_count_tokens(stdlib_examples, tiny):
    corpus = data.partition(stdlib_examples, "natural")
    rows = data.corpus_stats(corpus, tiny[1])
    by_name = {r["client"]: r for r in rows}
    json_text = sum(len(e.text.encode()) for e in next(c for c in corpus.clients if c.name == "json").train)
    assert by_name["json"]["train_tokens"] == json_text  # byte-level tokenizer: one token per byte
