"""Corpora and calibration batches.

Loaders take ``source=None`` (the small slice shipped in ``tasa/data``, enough for the embedded
default), a local path (file or folder laid out like the project's ``shared/data``), or a
Hugging Face data set name (only if the ``datasets`` package is installed; never needed
offline).

Roles (keep calibration and evaluation disjoint): general text, GSM8K *train* and ARC
*validation* are calibration pools; WikiText-2 *test*, GSM8K *test* and ARC *test* are for
evaluation. :func:`calibration_batch` refuses a pool that is marked as evaluation data.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "PACKAGE_DATA", "DATA_FILES", "shipped_file", "folder_files", "Pool", "CalibBatch", "load_general", "load_wikitext2", "load_gsm8k",
    "load_arc", "QA_PROMPT", "qa_prompt", "format_gsm8k", "format_arc", "calibration_pools", "calibration_batch",
    "read_text",
]

PACKAGE_DATA = Path(__file__).resolve().parent / "data"

# The one table of tasa's data files: key -> (slice shipped in tasa/data, files in a folder laid
# out like shared/data). Of the folder files, "general" reads every one that exists, the other
# keys the first that exists. WikiText-2: wiki.test.raw first (lm-eval's documents are cut from
# its rows; the joined text loses the rows' trailing spaces), else the joined text (the same
# load_wikitext2 text, checked on shared/data).
DATA_FILES = {
    "general": ("general_c4_slice.txt", ("general/c4_sample.txt", "general/wiki_sample.txt")),
    "wikitext_test": ("wikitext2_test_slice.txt",
                      ("wikitext2/wiki.test.raw", "wikitext2/wikitext2_test.joined.txt")),
    "gsm8k_train": ("gsm8k_train_slice.jsonl", ("gsm8k/train.jsonl",)),
    "gsm8k_test": ("gsm8k_test_slice.jsonl", ("gsm8k/test.jsonl",)),
    "arc_challenge_validation": ("arc_challenge_validation_slice.jsonl",
                                 ("arc/ARC-Challenge-validation.jsonl",)),
    "arc_easy_validation": ("arc_easy_validation_slice.jsonl", ("arc/ARC-Easy-validation.jsonl",)),
    "arc_challenge_test": ("arc_challenge_test_slice.jsonl", ("arc/ARC-Challenge-test.jsonl",)),
    "arc_easy_test": ("arc_easy_test_slice.jsonl", ("arc/ARC-Easy-test.jsonl",)),
}


def shipped_file(key: str) -> Path:
    """The slice of ``key`` shipped inside the package (tasa/data)."""
    return PACKAGE_DATA / DATA_FILES[key][0]


def folder_files(root, key: str) -> list[Path]:
    """The files of ``key`` that exist in a data folder ``root`` laid out like shared/data, in
    the table's order (empty if none)."""
    return [Path(root) / f for f in DATA_FILES[key][1] if (Path(root) / f).is_file()]


def read_text(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_jsonl(path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"tasa: {path}, line {i}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"tasa: {path}, line {i}: expected a JSON object per line")
            out.append(row)
    return out


def _hf(name: str, config: Optional[str], split: str):
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(
            f"tasa: {name!r} is not a local path, and loading a Hugging Face data set needs the "
            f"`datasets` package (pip install datasets) and network access") from e
    return datasets.load_dataset(name, config, split=split)


def _local(source, key: str) -> list[Path]:
    p = Path(source)
    if p.is_file():
        return [p]
    if p.is_dir():
        if key not in DATA_FILES:
            raise FileNotFoundError(f"tasa: no {key} data is read from a folder (known: "
                                    f"{list(DATA_FILES)})")
        found = folder_files(p, key)
        if not found:
            raise FileNotFoundError(f"tasa: no {key} file in {p} (looked for "
                                    f"{list(DATA_FILES[key][1])})")
        return found if key == "general" else found[:1]
    return []


def load_general(source=None, max_chars: Optional[int] = None) -> list[str]:
    """General-domain documents (one per line in the text files). ``source``: None (shipped
    ~100 KB C4-style slice), a text file, a data folder (``general/*.txt``), or an HF name
    (column ``text``, split ``train``)."""
    if source is None:
        docs = read_text(shipped_file("general")).splitlines()
    else:
        files = _local(source, "general")
        if files:
            docs = [line for f in files for line in read_text(f).splitlines()]
        else:
            docs = list(_hf(str(source), None, "train")["text"])
    docs = [d for d in docs if d.strip()]
    if max_chars is not None:
        out, n = [], 0
        for d in docs:
            if n >= max_chars:
                break
            out.append(d)
            n += len(d)
        docs = out
    return docs


def load_wikitext2(source=None, split: str = "test") -> str:
    """WikiText-2 raw rows joined with ``"\\n\\n"`` (the text GPTQ-style perplexity tokenizes).
    ``source``: None (shipped ~120 KB slice of *test*: quick checks only), the joined text file,
    ``wiki.test.raw`` (one row per line, rebuilt into the HF rows), a data folder, or an HF name (``wikitext``,
    config ``wikitext-2-raw-v1``)."""
    if source is None:
        if split != "test":
            raise ValueError("tasa: only a slice of the WikiText-2 test split ships with tasa")
        return read_text(shipped_file("wikitext_test"))
    files = _local(source, f"wikitext_{split}")
    if files:
        f = files[0]
        text = read_text(f)
        if f.name.endswith(".raw"):
            # wiki.test.raw: one row per line; HF rows keep their newline, blank rows are ""
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines = lines[:-1]
            text = "\n\n".join("" if not ln.strip() else ln + "\n" for ln in lines)
        return text
    name = str(source)
    ds = _hf(name, "wikitext-2-raw-v1" if name.endswith("wikitext") else None, split)
    return "\n\n".join(ds["text"])


def load_gsm8k(source=None, split: str = "train", limit: Optional[int] = None) -> list[dict]:
    """GSM8K items ``{"question", "answer"}``. None: the shipped 300 *train* items."""
    if source is None:
        if split != "train":
            raise ValueError("tasa: only a GSM8K train slice ships with tasa; pass a path for test")
        items = _read_jsonl(shipped_file("gsm8k_train"))
    else:
        files = _local(source, f"gsm8k_{split}")
        items = _read_jsonl(files[0]) if files else [dict(r) for r in _hf(str(source), "main", split)]
    return items[:limit] if limit else items


def load_arc(source=None, subset: str = "challenge", split: str = "validation",
             limit: Optional[int] = None) -> list[dict]:
    """ARC items normalized to ``{"question", "choices": [str], "gold": int}``. ``subset``:
    "challenge" or "easy". None: the shipped 150 *validation* items of the subset. Reads both
    the original layout (``question, choices{text,label}, answerKey``) and the llm-foundry test
    layout (``query, choices, gold``)."""
    subset = subset.lower()
    if subset not in ("challenge", "easy"):
        raise ValueError(f"tasa: ARC subset must be 'challenge' or 'easy', got {subset!r}")
    key = f"arc_{subset}_{split}"
    if source is None:
        if split != "validation":
            raise ValueError("tasa: only ARC validation slices ship with tasa; pass a path for test")
        rows = _read_jsonl(shipped_file(key))
    else:
        files = _local(source, key)
        rows = (_read_jsonl(files[0]) if files else
                [dict(r) for r in _hf(str(source), f"ARC-{subset.capitalize()}", split)])
    out = []
    for r in rows:
        if "query" in r:
            q = r["query"]
            q = q[len("Question: "):] if q.startswith("Question: ") else q
            out.append({"question": q, "choices": list(r["choices"]), "gold": int(r["gold"])})
        else:
            labels = list(r["choices"]["label"])
            out.append({"question": r["question"], "choices": list(r["choices"]["text"]),
                        "gold": labels.index(r["answerKey"])})
    return out[:limit] if limit else out


# the one question/answer prompt of tasa: calibration text, the sensitivity objectives and the
# lm-eval tasks all build on it (lm-eval's own GSM8K/ARC prompt)
QA_PROMPT = "Question: {question}\nAnswer:"


def qa_prompt(question: str) -> str:
    """``"Question: <question>\nAnswer:"``: what the model is shown before an answer."""
    return QA_PROMPT.format(question=question)


def format_gsm8k(item: Mapping) -> str:
    """A GSM8K item as calibration text (question + chain-of-thought answer)."""
    return f"{qa_prompt(item['question'])} {item['answer']}"


def format_arc(item: Mapping) -> str:
    """An ARC item as calibration text (question, lettered choices, answer)."""
    letters = "ABCDEFGH"
    ch = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(item["choices"]))
    return f"Question: {item['question']}\n{ch}\nAnswer: {letters[item['gold']]}. " \
           f"{item['choices'][item['gold']]}"


@dataclasses.dataclass
class Pool:
    """A named list of documents; ``role`` is "calibration" or "evaluation"."""

    name: str
    docs: list
    role: str = "calibration"


def calibration_pools(source=None) -> dict[str, Pool]:
    """The standard calibration pools: ``general``, ``gsm8k`` (train), ``arc`` (Challenge + Easy
    validation). ``source``: None (shipped slices) or a data folder like ``shared/data``."""
    arc = load_arc(source, "challenge") + load_arc(source, "easy")
    return {
        "general": Pool("general", load_general(source)),
        "gsm8k": Pool("gsm8k", [format_gsm8k(x) for x in load_gsm8k(source, "train")]),
        "arc": Pool("arc", [format_arc(x) for x in arc]),
    }


@dataclasses.dataclass
class CalibBatch:
    """``input_ids`` int64 [n, seqlen]; ``src`` int64 [n] (index into ``sources``)."""

    input_ids: torch.Tensor
    src: torch.Tensor
    sources: list

    def token_src(self) -> torch.Tensor:
        """Per-token source ids [n * seqlen] (row order of the flattened activations)."""
        return self.src.repeat_interleave(self.input_ids.shape[1])


def _split_counts(n: int, proportions: Sequence[float]) -> list[int]:
    p = torch.tensor([float(x) for x in proportions], dtype=torch.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"tasa: mixture proportions must be >= 0 with a positive sum, got {list(proportions)}")
    exact = p / p.sum() * n
    counts = exact.floor().long()
    rem = n - int(counts.sum())
    order = torch.argsort(exact - counts, descending=True, stable=True)
    counts[order[:rem]] += 1
    return counts.tolist()


def calibration_batch(tokenizer, pools: Union[Pool, Mapping[str, Pool], Sequence[str], str],
                      n: int, seqlen: int, seed: int = 0,
                      proportions: Optional[Mapping[str, float]] = None) -> CalibBatch:
    """``n`` sequences of ``seqlen`` tokens sampled with ``seed``.

    ``pools``: one :class:`Pool`, a mapping name -> Pool, or raw text(s). Documents of a pool are
    joined with ``"\\n\\n"``, tokenized once, and random ``seqlen`` windows are drawn (GPTQ
    style). With several pools, ``proportions`` (name -> weight, default equal) sets how many of
    the ``n`` sequences each pool gives (largest-remainder rounding); ``src`` records the pool.
    """
    if isinstance(pools, Pool):
        pools = {pools.name: pools}
    elif isinstance(pools, str):
        pools = {"text": Pool("text", [pools])}
    elif not isinstance(pools, Mapping):
        pools = {"text": Pool("text", list(pools))}
    if n <= 0 or seqlen <= 0:
        raise ValueError(f"tasa: need n > 0 and seqlen > 0, got n={n}, seqlen={seqlen}")
    names = list(pools)
    for k in names:
        if getattr(pools[k], "role", "calibration") != "calibration":
            raise ValueError(f"tasa: pool {k!r} is {pools[k].role} data; calibration and "
                             f"evaluation data must stay disjoint")
    if proportions is None:
        weights = [1.0] * len(names)
    else:
        unknown = set(proportions) - set(names)
        if unknown:
            raise KeyError(f"tasa: proportions name unknown pools {sorted(unknown)}; pools: {names}")
        weights = [float(proportions.get(k, 0.0)) for k in names]
    counts = _split_counts(n, weights)
    rng = random.Random(seed)
    ids, src = [], []
    for i, (name, cnt) in enumerate(zip(names, counts)):
        if cnt == 0:
            continue
        text = "\n\n".join(pools[name].docs)
        toks = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if toks.numel() <= seqlen:
            raise ValueError(f"tasa: pool {name!r} has {toks.numel()} tokens, fewer than "
                             f"seqlen={seqlen}; give more text or a shorter seqlen")
        for _ in range(cnt):
            s = rng.randrange(0, toks.numel() - seqlen)
            ids.append(toks[s:s + seqlen])
            src.append(i)
    return CalibBatch(torch.stack(ids), torch.tensor(src, dtype=torch.int64), names)
