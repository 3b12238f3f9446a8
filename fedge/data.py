"""Federated text corpora: sources, partitions into clients, held-out documents per client.

A source is read into examples, each with the document it came from and a natural group:

- `stdlib` (embedded default): the Python standard library's own source files, grouped by
  package family (`email`, `asyncio`, `json`, ...; top-level modules in four alphabetical groups);
- `text:PATH`: plain text; play scripts in `SPEAKER:` blocks (Tiny Shakespeare) group by speaker,
  other text splits into paragraphs with no natural group;
- `jsonl:PATH`: rows with `text`, or question/answer style pairs (GSM8K) kept as prompt and
  completion, grouped by a `group`/`client` field or, for GSM8K, by the number of solution steps.

Partitions (`natural`, `iid`, `dirichlet:ALPHA`) are flwr-datasets partitioners over a
`datasets.Dataset` of the examples. Each client then holds out whole documents for evaluation, so
held-out text was never seen in training by that client.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sysconfig
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SOURCES_HELP = "stdlib | text:PATH | jsonl:PATH"
PARTITIONS_HELP = "natural | iid | dirichlet:ALPHA"


class DataSourceError(ValueError):
    """A data source or partition spec that cannot be used; the message says why."""


@dataclass(frozen=True)
class Example:
    text: str  # the training text (the completion, for prompt/completion pairs)
    group: str  # natural group: package family, speaker, derived label
    doc: str  # document id: held-out splits never cut a document in two
    prompt: str = ""  # non-empty for chat pairs: rendered with the model's chat template


@dataclass
class ClientData:
    name: str
    train: list[Example] = field(default_factory=list)
    heldout: list[Example] = field(default_factory=list)


@dataclass
class FederatedCorpus:
    source: str
    partition: str
    clients: list[ClientData]

    def pooled_train(self) -> list[Example]:
        return [ex for client in self.clients for ex in client.train]

    def pooled_heldout(self) -> list[Example]:
        return [ex for client in self.clients for ex in client.heldout]


# ---------------------------------------------------------------- sources


def read_source(source: str, chunk_chars: int = 2000) -> list[Example]:
    """Read a source spec into examples; raises DataSourceError with a usable message."""
    if source == "stdlib":
        return _read_stdlib(chunk_chars)
    kind, _, path = source.partition(":")
    if kind in ("text", "jsonl") and path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataSourceError(f"{source}: no such file {p}")
        return _read_text(p, chunk_chars) if kind == "text" else _read_jsonl(p)
    raise DataSourceError(f"unknown data source {source!r}; expected {SOURCES_HELP}")


# Top-level stdlib modules form one family too big for a client; split it by first letter.
_MODULE_GROUPS = [("a", "c"), ("d", "l"), ("m", "r"), ("s", "z")]
_STDLIB_SKIP = {"site-packages", "test", "__pycache__", "__phello__", "pydoc_data"}


def _read_stdlib(chunk_chars: int) -> list[Example]:
    root = Path(sysconfig.get_paths()["stdlib"])
    examples: list[Example] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in _STDLIB_SKIP or rel.parts[0].startswith("config-"):
            continue
        if len(rel.parts) > 1:
            group = rel.parts[0]
        else:
            first = rel.name.lstrip("_")[:1].lower() or "a"
            lo, hi = next(((a, b) for a, b in _MODULE_GROUPS if a <= first <= b), _MODULE_GROUPS[0])
            group = f"modules-{lo}{hi}"
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for chunk in _chunk_lines(text, chunk_chars):
            examples.append(Example(text=chunk, group=group, doc=str(rel)))
    if not examples:
        raise DataSourceError(f"no Python sources found under {root}")
    return examples


def _chunk_lines(text: str, chunk_chars: int) -> list[str]:
    """Cut text at line boundaries into pieces of about chunk_chars."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > chunk_chars and current:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current and "".join(current).strip():
        chunks.append("".join(current))
    return chunks


_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,40}):\s*$")


def _read_text(path: Path, chunk_chars: int) -> list[Example]:
    text = path.read_text(encoding="utf-8", errors="replace")
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()]
    speaker_blocks = [b for b in blocks if _SPEAKER.match(b.splitlines()[0])]
    examples: list[Example] = []
    if blocks and len(speaker_blocks) >= 0.8 * len(blocks):
        for i, block in enumerate(speaker_blocks):
            speaker = _SPEAKER.match(block.splitlines()[0]).group(1).strip()
            examples.append(Example(text=block + "\n", group=speaker, doc=f"{path.name}#{i}"))
    else:
        for i, block in enumerate(blocks):
            for chunk in _chunk_lines(block + "\n", chunk_chars):
                examples.append(Example(text=chunk, group="", doc=f"{path.name}#{i}"))
    if not examples:
        raise DataSourceError(f"text:{path} holds no text")
    return examples


_PAIR_KEYS = [("question", "answer"), ("prompt", "completion"), ("instruction", "output"),
              ("input", "output")]


def _read_jsonl(path: Path) -> list[Example]:
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"jsonl:{path}:{lineno}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataSourceError(f"jsonl:{path}:{lineno}: expected an object per line")
            group = str(row.get("group", row.get("client", "")))
            doc = f"{path.name}#{lineno}"
            if isinstance(row.get("text"), str):
                examples.append(Example(text=row["text"], group=group, doc=doc))
                continue
            pair = next(((q, a) for q, a in _PAIR_KEYS if isinstance(row.get(q), str)
                         and isinstance(row.get(a), str)), None)
            if pair is None:
                raise DataSourceError(
                    f"jsonl:{path}:{lineno}: needs a 'text' field or one of "
                    + ", ".join(f"{q}/{a}" for q, a in _PAIR_KEYS)
                )
            prompt, completion = row[pair[0]], row[pair[1]]
            if not group and "####" in completion:  # GSM8K: group by number of solution steps
                steps = len([s for s in completion.split("####")[0].splitlines() if s.strip()])
                group = f"steps-{min(steps, 8)}"
            examples.append(Example(text=completion, group=group, doc=doc, prompt=prompt))
    if not examples:
        raise DataSourceError(f"jsonl:{path} holds no rows")
    return examples


# ---------------------------------------------------------------- partitions


def partition(
    examples: list[Example],
    partition: str = "natural",
    num_clients: int | None = None,
    heldout_fraction: float = 0.1,
    min_examples: int = 4,
    seed: int = 0,
    source: str = "",
) -> FederatedCorpus:
    """Split examples into clients with flwr-datasets partitioners, then hold out documents.

    `natural` makes one client per group (groups smaller than `min_examples` are merged into
    `_small`); with `num_clients` set it keeps the largest groups and merges the rest.
    """
    import datasets
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    datasets.disable_progress_bars()
    table = Dataset.from_dict({"row": list(range(len(examples))),
                               "group": [ex.group for ex in examples]})
    kind, _, arg = partition.partition(":")
    if kind == "natural":
        groups = _natural_groups(examples, num_clients, min_examples)
        if groups is None:
            raise DataSourceError("this source has no natural groups; use iid or dirichlet:ALPHA")
        table = table.map(lambda r: {"client": groups[r["group"]]})
        partitioner = NaturalIdPartitioner(partition_by="client")
    elif kind == "iid":
        table = table.shuffle(seed=seed)  # IidPartitioner cuts contiguous shards
        partitioner = IidPartitioner(num_partitions=num_clients or 10)
    elif kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError as exc:
            raise DataSourceError(f"dirichlet needs an alpha, e.g. dirichlet:0.5, not {partition!r}") from exc
        if len({ex.group for ex in examples}) < 2:
            raise DataSourceError("dirichlet partitions by group; this source has one group only")
        partitioner = DirichletPartitioner(
            num_partitions=num_clients or 10, partition_by="group", alpha=alpha,
            min_partition_size=0, seed=seed,
        )
    else:
        raise DataSourceError(f"unknown partition {partition!r}; expected {PARTITIONS_HELP}")
    partitioner.dataset = table

    clients: list[ClientData] = []
    for pid in range(partitioner.num_partitions):
        part = partitioner.load_partition(pid)
        rows = part["row"]
        if not rows:
            continue
        if kind == "natural":
            name = str(part[0]["client"])
        else:
            name = f"client-{pid:03d}"
        train, heldout = _split_heldout([examples[i] for i in rows], heldout_fraction, seed, name)
        clients.append(ClientData(name=name, train=train, heldout=heldout))
    clients.sort(key=lambda c: c.name)
    return FederatedCorpus(source=source, partition=partition, clients=clients)


def _natural_groups(examples: list[Example], num_clients: int | None, min_examples: int):
    counts: dict[str, int] = defaultdict(int)
    for ex in examples:
        counts[ex.group] += 1
    if len(counts) < 2:
        return None
    ranked = sorted(counts, key=lambda g: (-counts[g], g))
    keep = [g for g in ranked if counts[g] >= min_examples]
    if num_clients is not None:
        keep = keep[: max(1, num_clients - 1)] if len(keep) >= num_clients else keep
    mapping = {g: (g if g in keep else "_small") for g in counts}
    return mapping


def _split_heldout(examples: list[Example], fraction: float, seed: int, name: str):
    """Hold out whole documents, about `fraction` of the client's text, never over half of it."""
    size: dict[str, int] = defaultdict(int)
    for ex in examples:
        size[ex.doc] += len(ex.prompt) + len(ex.text)
    if len(size) < 2 or fraction <= 0:
        return examples, []
    total = sum(size.values())
    docs = sorted(size)
    random.Random(int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)).shuffle(docs)
    held: set[str] = set()
    held_chars = 0
    for doc in docs:
        if held_chars >= fraction * total:
            break
        if held_chars + size[doc] <= total / 2:
            held.add(doc)
            held_chars += size[doc]
    if not held:  # every document is over half the text: hold out the smallest
        held.add(min(docs, key=lambda d: size[d]))
    return ([ex for ex in examples if ex.doc not in held], [ex for ex in examples if ex.doc in held])


def load_corpus(source: str = "stdlib", partition_spec: str = "natural", num_clients: int | None = None,
                heldout_fraction: float = 0.1, seed: int = 0) -> FederatedCorpus:
    examples = read_source(source)
    return partition(examples, partition_spec, num_clients=num_clients,
                     heldout_fraction=heldout_fraction, seed=seed, source=source)


def corpus_stats(corpus: FederatedCorpus, tokenizer=None) -> list[dict]:
    """Per-client rows: examples and tokens (train and held-out)."""
    rows = []
    for client in corpus.clients:
        row = {"client": client.name, "train_examples": len(client.train),
               "heldout_examples": len(client.heldout),
               "train_docs": len({e.doc for e in client.train}),
               "heldout_docs": len({e.doc for e in client.heldout})}
        if tokenizer is not None:
            for split in ("train", "heldout"):
                texts = [e.prompt + e.text for e in getattr(client, split)]
                ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
                row[f"{split}_tokens"] = sum(len(x) for x in ids)
        rows.append(row)
    return rows
