"""Evaluation with lm-eval (EleutherAI lm-evaluation-harness), in process and fully offline.

Any causal LM that is a ``transformers.PreTrainedModel`` — full precision, or with its
``nn.Linear`` modules swapped for :class:`tasa.layers.TasaLinear` — is wrapped as it is (no reload)
in ``lm_eval.models.huggingface.HFLM`` and evaluated with ``lm_eval.simple_evaluate`` on task
configs built here in Python that read **local files** (no Hugging Face hub, no data set
download):

============== ================== ===========================================================
task           output type        metrics (names in the summary)
============== ================== ===========================================================
gsm8k          generate_until     ``exact_match_strict`` (answer after ``#### ``),
                                  ``exact_match_flexible`` (last number in the output);
                                  greedy, ``num_fewshot`` examples (default 5) drawn from
                                  GSM8K **train**, prompt ``Question: ...\\nAnswer:`` (the
                                  lm-eval ``gsm8k`` task's format)
gsm8k_nll      loglikelihood      negative log-likelihood of the gold solution (the full
                                  ``answer`` field, calculator annotations and ``#### N``
                                  included) given ``Question: ...\\nAnswer:``: ``nll`` (nats
                                  per item, mean), ``bits_per_byte`` and ``byte_perplexity``
                                  (pooled over all items); lower is better. Sensitive where
                                  exact match of a small model is ~0.
arc_challenge  multiple_choice    ``acc``, ``acc_norm`` (byte-length-normalized), ARC test,
arc_easy                          prompt ``Question: ...\\nAnswer:``, 0-shot by default
                                  (few-shot examples come from ARC *validation*)
wikitext       loglikelihood_     ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``
               rolling            over whole WikiText-2 *test* articles (the lm-eval
                                  ``wikitext`` task: documents split at top-level
                                  `` = Title = `` headings, detokenized, words/bytes counted
                                  on the original text)
============== ================== ===========================================================

Data (``data=``): ``None`` uses the slices shipped in ``tasa/data`` (first 100 GSM8K test
items, first 100 ARC-Challenge / ARC-Easy test items, the ~120 KB WikiText-2 test prefix;
quick checks, not reportable numbers); a folder laid out like the project's ``shared/data``
(``gsm8k/test.jsonl``, ``gsm8k/train.jsonl``, ``arc/ARC-*-test.jsonl``,
``arc/ARC-*-validation.jsonl``, ``wikitext2/wiki.test.raw``); or a mapping from the keys of
:data:`DATA_KEYS` to files (keys it does not name use the shipped slices). Evaluation reads
only *test* splits; few-shot examples come from train (GSM8K) / validation (ARC) — never from
the split being scored. Calibration (:mod:`tasa.corpora`) never uses the test splits.

``limit=N`` scores a **seeded random subset** of N items (documents for ``wikitext``) of each
task, drawn with ``random.Random(seed)`` from the whole file and kept in file order; the same
``seed`` gives the same subset (and the same few-shot examples) on every run and every model.

Determinism: scoring is greedy / log-likelihood only, so two runs with the same arguments give
identical results. ``simple_evaluate`` seeds Python's, NumPy's and torch's global RNGs; this
module saves and restores their states around the call.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from . import corpora as tdata
from . import generation as tgen
from .layers import quantized_modules
from .util import write_json_atomic

__all__ = ["TASKS", "DEFAULT_TASKS", "DEFAULT_FEWSHOT", "DATA_KEYS", "evaluate",
           "resolve_data", "wikitext_documents", "format_table", "check_tasks", "require_lm_eval",
           "lm_eval_task", "LmEvalTask", "LM_EVAL_TASK_DIR", "LM_EVAL_PREFIX"]

TASKS = ("gsm8k", "gsm8k_nll", "arc_challenge", "arc_easy", "wikitext")
DEFAULT_TASKS = ("gsm8k_nll", "arc_challenge", "arc_easy", "wikitext")
DEFAULT_FEWSHOT = {"gsm8k": 5, "gsm8k_nll": 0, "arc_challenge": 0, "arc_easy": 0, "wikitext": 0}

# the data keys evaluation reads (their files: tasa.corpora.DATA_FILES, the one table)
DATA_KEYS = tuple(k for k in tdata.DATA_FILES if k != "general")
# task -> (data key scored, data key for few-shot examples)
_TASK_DATA = {
    "gsm8k": ("gsm8k_test", "gsm8k_train"),
    "gsm8k_nll": ("gsm8k_test", "gsm8k_train"),
    "arc_challenge": ("arc_challenge_test", "arc_challenge_validation"),
    "arc_easy": ("arc_easy_test", "arc_easy_validation"),
    "wikitext": ("wikitext_test", None),
}
# lm-eval filter names -> suffix in the summary
_FILTER_SHORT = {"none": "", "strict-match": "strict", "flexible-extract": "flexible"}

_INSTALL_HINT = "pip install lm-eval  (with the project pins: pip install -c constraints.txt lm-eval)"


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise ImportError(f"tasa.evaluation needs lm-eval (EleutherAI lm-evaluation-harness), which is "
                          f"not installed or broken ({e}); install with: {_INSTALL_HINT}") from e
    return lm_eval


# ---- data ---------------------------------------------------------------------------------------

def resolve_data(data=None, keys: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """Maps each data key (default: all of :data:`DATA_KEYS`) to an existing file.

    ``data``: None (shipped slices), a folder laid out like ``shared/data``, or a mapping
    ``{key: path}`` (other keys: shipped slices). A missing file raises FileNotFoundError
    naming the path."""
    keys = list(DATA_KEYS) if keys is None else list(keys)
    unknown = [k for k in keys if k not in DATA_KEYS]
    if unknown:
        raise KeyError(f"tasa: unknown data keys {unknown}; known: {list(DATA_KEYS)}")
    out: dict[str, Path] = {}
    if isinstance(data, Mapping):
        bad = [k for k in data if k not in DATA_KEYS]
        if bad:
            raise KeyError(f"tasa: eval data mapping has unknown keys {bad}; known: "
                           f"{list(DATA_KEYS)}")
    elif data is not None:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"tasa: eval data folder {root} does not exist (give a folder "
                                    f"laid out like shared/data, a mapping key -> file, or None "
                                    f"for the slices shipped with tasa)")
    for k in keys:
        local = tdata.DATA_FILES[k][1]
        if data is None or (isinstance(data, Mapping) and k not in data):
            p = tdata.shipped_file(k)
        elif isinstance(data, Mapping):
            p = Path(data[k])
        else:
            found = tdata.folder_files(data, k)
            p = found[0] if found else Path(data) / local[0]
        if not p.is_file():
            raise FileNotFoundError(f"tasa: eval data file for {k!r} not found: {p} (expected "
                                    f"the layout of shared/data: {' or '.join(local)})")
        out[k] = p.resolve()
    return out


def _joined_to_lines(text: str) -> list[str]:
    """Inverse of ``"\\n\\n".join(rows)`` for WikiText rows ("" or one line ending in "\\n")."""
    lines, i, n = [], 0, len(text)
    while i < n:
        if text[i] == "\n":                     # an empty row
            lines.append("")
        else:
            j = text.find("\n", i)
            j = n - 1 if j < 0 else j
            lines.append(text[i:j + 1].rstrip("\n"))
            i = j
            if text[i] != "\n":
                break
            i += 1                              # the row's own newline
        if text.startswith("\n\n", i):
            i += 2
            if i == n:                          # a final empty row
                lines.append("")
        else:
            break
    return lines


_TITLE = re.compile(r"^ ?= [^=].* = ?$")


def wikitext_documents(path, drop_last: bool = False) -> list[str]:
    """WikiText-2 articles from ``wiki.test.raw`` (one row per line) or from the joined text
    (rows joined with ``"\\n\\n"``, e.g. the shipped slice): a new article starts at each
    top-level `` = Title = `` line, lines are joined with ``"\\n"`` (the layout of the
    ``EleutherAI/wikitext_document_level`` pages that lm-eval's ``wikitext`` task scores).
    ``drop_last``: drop the last article (for a prefix slice, whose last article is cut)."""
    path = Path(path)
    text = tdata.read_text(path)
    if path.suffix == ".raw":
        lines = text.split("\n")
        if lines and lines[-1] == "":           # the file's final newline
            lines = lines[:-1]
    else:
        lines = _joined_to_lines(text)
    docs, cur = [], []
    for ln in lines:
        if _TITLE.match(ln) and not ln.strip().startswith("= ="):
            if "".join(cur).strip():
                docs.append("\n".join(cur))
            cur = []
        cur.append(ln)
    if "".join(cur).strip():
        docs.append("\n".join(cur))
    return docs[:-1] if drop_last and len(docs) > 1 else docs


def _subset(items: list, limit: Optional[int], seed: int, salt: str) -> list:
    if limit is None or limit >= len(items):
        return list(items)
    idx = sorted(random.Random(f"{seed}:{salt}").sample(range(len(items)), limit))
    return [items[i] for i in idx]


def _load_items(task: str, path: Path) -> list[dict]:
    if task.startswith("gsm8k"):
        items = tdata.load_gsm8k(path, "test")
        bad = [i for i, x in enumerate(items) if "question" not in x or "answer" not in x]
    elif task.startswith("arc"):
        items = tdata.load_arc(path, task.split("_")[1], "test")
        bad = []
    else:
        shipped = path == tdata.shipped_file("wikitext_test").resolve()
        items = [{"page": d} for d in wikitext_documents(path, drop_last=shipped)]
        bad = []
    if bad or not items:
        raise ValueError(f"tasa: {path} has no usable {task} items (rows {bad[:5]} lack "
                         f"'question'/'answer')" if bad else f"tasa: {path} has no {task} items")
    return items


# ---- task configs ---------------------------------------------------------------------------------

def _wikitext_detokenize(s: str) -> str:
    # lm-eval's tasks/wikitext/preprocess_wikitext.py (same rules, same order)
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def _wikitext_results(doc, results):
    (ll,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes),
            "bits_per_byte": (ll, nbytes)}


def _gsm8k_nll_results(doc, results):
    ll, _greedy = results[0]
    nbytes = len((" " + doc["answer"]).encode("utf-8"))
    return {"nll": -ll, "bits_per_byte": (ll, nbytes), "byte_perplexity": (ll, nbytes)}


def _qa_text(doc):
    return tdata.qa_prompt(doc["question"])


def _task_config(task: str, scored: list, fewshot: Optional[list], k: int,
                 max_gen_toks: int) -> dict:
    import datasets

    splits = {"test": scored}
    if fewshot is not None:
        splits["train"] = fewshot

    def custom_dataset(**_ignored):
        return {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}

    cfg = {"task": task, "custom_dataset": custom_dataset, "test_split": "test",
           "num_fewshot": k, "metadata": {"version": 1.0, "source": "tasa.evaluation"}}
    if fewshot is not None:
        cfg["fewshot_split"] = "train"
    if task == "gsm8k":
        cfg.update(
            output_type="generate_until", doc_to_text=_qa_text, doc_to_target="{{answer}}",
            metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                          "ignore_case": True, "ignore_punctuation": False,
                          "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
            generation_kwargs={"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                               "temperature": 0.0, "max_gen_toks": int(max_gen_toks)},
            filter_list=[
                {"name": "strict-match", "filter": [
                    {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                    {"function": "take_first"}]},
                {"name": "flexible-extract", "filter": [
                    {"function": "regex", "group_select": -1,
                     "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"}]}])
    elif task == "gsm8k_nll":
        cfg.update(
            output_type="loglikelihood", doc_to_text=_qa_text, doc_to_target="{{answer}}",
            process_results=_gsm8k_nll_results,
            metric_list=[
                {"metric": "nll", "aggregation": "mean", "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte",
                 "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity",
                 "higher_is_better": False}])
    elif task in ("arc_challenge", "arc_easy"):
        cfg.update(
            output_type="multiple_choice", doc_to_text=_qa_text,
            doc_to_choice=lambda doc: list(doc["choices"]), doc_to_target=lambda doc: doc["gold"],
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                         {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    elif task == "wikitext":
        cfg.update(
            output_type="loglikelihood_rolling", doc_to_text="",
            doc_to_target=lambda doc: _wikitext_detokenize(doc["page"]),
            process_results=_wikitext_results,
            metric_list=[
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                 "higher_is_better": False},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity",
                 "higher_is_better": False},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte",
                 "higher_is_better": False}])
    else:  # pragma: no cover - guarded by _check_tasks
        raise AssertionError(task)
    return cfg


# ---- the same tasks for lm-eval's own command line --------------------------------------------------

LM_EVAL_PREFIX = "tasa_"
# shipped YAML files, one per task, each `task: tasa_<name>` + `class: !function tasa.evaluation.lm_eval_task`
LM_EVAL_TASK_DIR = Path(__file__).resolve().parent / "data" / "lm_eval_tasks"


def lm_eval_task(config: dict):
    """Builds one of :data:`TASKS` as an lm-eval ``ConfigurableTask`` for lm-eval's own CLI, from
    a shipped YAML file (``lm_eval run ... --include_path <LM_EVAL_TASK_DIR> --tasks
    tasa_arc_easy``): offline, on the slices shipped with tasa, or on a ``shared/data``-like
    folder given as ``--metadata '{"tasa_data": "/path/to/data"}'``. Few-shot examples come from
    GSM8K train / ARC validation as in :func:`evaluate`; ``--num_fewshot`` sets k (default
    :data:`DEFAULT_FEWSHOT`); ``--limit`` is lm-eval's (the first N items, not a seeded subset)."""
    from lm_eval.api.task import ConfigurableTask

    name = str(config.get("task", ""))
    task = name[len(LM_EVAL_PREFIX):] if name.startswith(LM_EVAL_PREFIX) else name
    check_tasks([task])
    meta = dict(config.get("metadata") or {})
    scored_key, few_key = _TASK_DATA[task]
    files = resolve_data(meta.get("tasa_data"), [k for k in (scored_key, few_key) if k])
    few = None
    if task.startswith("gsm8k"):
        few = tdata.load_gsm8k(files[few_key], "train")
    elif task.startswith("arc"):
        few = tdata.load_arc(files[few_key], task.split("_")[1], "validation")
    cfg = _task_config(task, _load_items(task, files[scored_key]), few, DEFAULT_FEWSHOT[task],
                       int(meta.get("max_gen_toks", 256)))
    cfg["task"] = name
    cfg["metadata"] = {**cfg["metadata"], **meta}
    return ConfigurableTask(config=cfg)


class LmEvalTask:
    """What the shipped YAML files name (``class: !function tasa.evaluation.LmEvalTask``): lm-eval
    builds a Python task as ``cls(config=...)`` when ``cls.__init__`` takes ``config``, so this
    class has that constructor and returns :func:`lm_eval_task`'s task (lm-eval stays an optional
    import of this module)."""

    def __new__(cls, config: dict):
        return lm_eval_task(config)

    def __init__(self, config: dict):  # pragma: no cover - __new__ returns another type
        pass


# ---- helpers ----------------------------------------------------------------------------------------

def check_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [t.strip() for t in tasks]
    if not tasks:
        raise ValueError(f"tasa: no eval tasks given; choose from {list(TASKS)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasa: unknown eval task(s) {unknown}; choose from {list(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasa: eval task listed twice: {tasks}")
    return tasks


def _fewshot_for(tasks, num_fewshot) -> dict[str, int]:
    out = {}
    for t in tasks:
        if num_fewshot is None:
            k = DEFAULT_FEWSHOT[t]
        elif isinstance(num_fewshot, Mapping):
            bad = [x for x in num_fewshot if x not in TASKS]
            if bad:
                raise ValueError(f"tasa: num_fewshot names unknown task(s) {bad}")
            k = num_fewshot.get(t, DEFAULT_FEWSHOT[t])
        else:
            k = 0 if t == "wikitext" else num_fewshot
        k = int(k)
        if k < 0:
            raise ValueError(f"tasa: num_fewshot must be >= 0, got {k} for {t}")
        if t == "wikitext" and k:
            raise ValueError("tasa: wikitext is scored as whole documents; it takes no few-shot "
                             "examples (num_fewshot must be 0)")
        out[t] = k
    return out


@contextlib.contextmanager
def _offline_and_rng_kept(quiet: bool):
    """HF hub / datasets offline for the duration; global RNG states and lm-eval's log level
    restored afterwards."""
    import numpy as np
    import torch

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                           "TRANSFORMERS_OFFLINE")}
    consts = []
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE"),
                      ("datasets.config", "HF_HUB_OFFLINE")):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, attr):
            consts.append((m, attr, getattr(m, attr)))
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    import lm_eval.api.task as task_mod

    task_tqdm = getattr(task_mod, "tqdm", None)
    if task_tqdm is None:
        task_mod = None
    try:
        for k in env:
            os.environ[k] = "1"
        for m, attr, _ in consts:
            setattr(m, attr, True)
        if quiet:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            if task_mod is not None:        # the per-task "building requests" bar
                task_mod.tqdm = functools.partial(task_tqdm, disable=True)
        yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for m, attr, v in consts:
            setattr(m, attr, v)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if task_mod is not None:
            task_mod.tqdm = task_tqdm


GENERATION = ("fast", "hf")


def _stop_on_strings(tokenizer, stop: Sequence[str]):
    """``stop(new token ids)``: true once a stop string appears in the decoded tail, as
    lm-eval's own criterion checks (it decodes the last len(stop tokens) + 2 new tokens; the
    tail here is longer, and lm-eval cuts the text at the first stop string anyway)."""
    stop = [x for x in stop if x]
    look = max([len(tokenizer.encode(x, add_special_tokens=False)) for x in stop] + [1]) + 8

    def check(tokens) -> bool:
        tail = tokenizer.decode(tokens[-look:], skip_special_tokens=False)
        return any(x in tail for x in stop)
    return check


def _fast_generate(lm, context, max_length: int, stop, generation_kwargs: dict):
    """HFLM._model_generate for greedy requests through tasa's decode loop, one row at a time
    (left padding stripped by the attention mask): the same output layout (context + new
    tokens, padded with the pad token). None where the request samples (lm-eval's own path)."""
    import torch

    temp = generation_kwargs.get("temperature", 0.0)
    if generation_kwargs.get("do_sample") or (temp is not None and temp > 0):
        return None
    mask = generation_kwargs.get("attention_mask")
    n_new = max_length - context.shape[1]
    stop_fn = _stop_on_strings(lm.tokenizer, stop)
    rows = []
    for r in range(context.shape[0]):
        ids = context[r] if mask is None else context[r][mask[r].bool()]
        out = tgen.generate(lm.model, lm.tokenizer, ids[None], n_new, fast=True, stop=stop_fn)
        rows.append(torch.cat([context[r], torch.tensor(out.tokens, dtype=context.dtype,
                                                        device=context.device)]))
    width = max(len(x) for x in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eot_token_id
    return torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=pad) for x in rows])


def _make_lm(model, tokenizer, batch_size: int, max_length: Optional[int], progress: bool,
             fast_generation: bool = False):
    from lm_eval.models.huggingface import HFLM

    base = HFLM
    if fast_generation:
        class _FastGenHFLM(HFLM):
            def _model_generate(self, context, max_length, stop, **generation_kwargs):
                out = _fast_generate(self, context, max_length, stop, generation_kwargs)
                if out is None:
                    return super()._model_generate(context, max_length, stop, **generation_kwargs)
                return out
        base = _FastGenHFLM
    if progress:
        cls = base
    else:
        class _QuietHFLM(base):
            def loglikelihood(self, requests, disable_tqdm: bool = False):
                return super().loglikelihood(requests, disable_tqdm=True)

            def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                return super().loglikelihood_rolling(requests, disable_tqdm=True)

            def generate_until(self, requests, disable_tqdm: bool = False):
                return super().generate_until(requests, disable_tqdm=True)

            def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
                # HFLM.loglikelihood_rolling passes disable_tqdm=False per batch of windows
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kw)
        cls = _QuietHFLM
    # HFLM sets a pad token on the tokenizer it is given: give it a copy
    return cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=int(batch_size),
               max_length=max_length)


def _jsonable(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(v):
    if isinstance(v, str):
        return None if v == "N/A" else v
    return float(v) if isinstance(v, (int, float)) else v


def _summarize_task(res: dict) -> tuple[dict, dict]:
    metrics, stderr = {}, {}
    for key, v in res.items():
        if "," not in key:
            continue
        name, filt = key.split(",", 1)
        suffix = _FILTER_SHORT.get(filt, filt)
        is_se = name.endswith("_stderr")
        if is_se:
            name = name[: -len("_stderr")]
        full = f"{name}_{suffix}" if suffix else name
        (stderr if is_se else metrics)[full] = _clean(v)
    return metrics, stderr


def _model_info(model) -> dict:

    q = quantized_modules(model)
    info = {"class": type(model).__name__, "tasa_linear_modules": len(q)}
    src = getattr(model, "tasa_info", None)
    if src is not None:
        info["source"] = getattr(src, "source", str(src))
        if getattr(src, "prequantized", None):
            info["note"] = src.note()
    cfg = getattr(model, "tasa_config", None)      # legacy folders: top level; else meta
    if isinstance(cfg, dict):
        base = cfg.get("base_model") or (cfg.get("meta") or {}).get("base_model")
        if base:
            info["base_model"] = base
    if q:
        n = sum(m.in_features * m.out_features for m in q.values())
        info["quantized_avg_bits"] = sum(
            m.average_bits() * m.in_features * m.out_features for m in q.values()) / n
    return info


# ---- API ------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, tasks: Union[str, Sequence[str]] = DEFAULT_TASKS, data=None,
             limit: Optional[int] = None, seed: int = 0,
             num_fewshot: Union[None, int, Mapping[str, int]] = None, batch_size: int = 8,
             max_gen_toks: int = 256, max_length: Optional[int] = None,
             out_path=None, progress: bool = True, generation: str = "fast") -> dict:
    """Evaluates ``model`` (a ``transformers.PreTrainedModel``, quantized or not) with lm-eval.

    Args:
        model, tokenizer: the model as built in memory (used as is: not reloaded, not moved;
            HFLM calls ``model.eval()`` and ``model.tie_weights()``) and its HF tokenizer (a
            copy is handed to lm-eval, which may set a pad token on it).
        tasks: names from :data:`TASKS` (list or comma-separated string); default
            :data:`DEFAULT_TASKS` (``gsm8k`` generates, so it is opt-in: slow on CPU).
        data: None (slices shipped with tasa), a ``shared/data``-like folder, or a mapping
            ``{key: file}`` with keys from :data:`DATA_KEYS`.
        limit: score a seeded random subset of this many items per task (None: all items).
        seed: the subset, few-shot sampling and lm-eval's RNG seeds.
        num_fewshot: None (:data:`DEFAULT_FEWSHOT`: gsm8k 5, others 0), an int for every task
            but ``wikitext``, or ``{task: k}``.
        batch_size: HFLM batch size. max_gen_toks: generation cap (gsm8k).
        max_length: context length in tokens for HFLM (None: the model config's
            ``max_position_embeddings``); longer inputs are left-truncated, wikitext documents
            are scored in rolling windows of this length.
        out_path: if given, writes ``{"summary", "samples", "lm_eval"}`` as JSON there
            atomically; ``samples[task]`` are lm-eval's per-item logs (``log_samples``).
        progress: lm-eval's progress bars and info logging.
        generation: how generating tasks (gsm8k) decode greedily: ``"fast"`` (default) with
            tasa's decode loop (:func:`tasa.generation.generate`), one request at a time
            without padding; ``"hf"`` with transformers' ``generate`` on lm-eval's padded
            batches (what tasa used before; batched left padding can change a greedy token
            where two logits nearly tie, so a comparison keeps one path). Sampling requests
            always use ``"hf"``.

    Returns:
        ``{"results": {task: {metric: value, ..., "stderr": {metric: se or None}, "n": items,
        "num_fewshot": k}}, "config": {...}}``. ``stderr`` is lm-eval's (closed form for
        means; None for the pooled perplexity / bits-per-byte metrics).
    """
    lm_eval = require_lm_eval()
    import torch
    import transformers

    tasks = check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit <= 0):
        raise ValueError(f"tasa: limit must be a positive integer or None, got {limit!r}")
    if generation not in GENERATION:
        raise ValueError(f"tasa: generation must be one of {GENERATION}, got {generation!r}")
    if max_gen_toks <= 0 or batch_size <= 0:
        raise ValueError(f"tasa: need max_gen_toks > 0 and batch_size > 0, got {max_gen_toks}, "
                         f"{batch_size}")
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"tasa: evaluate needs a transformers PreTrainedModel (optionally with "
                        f"TasaLinear modules), got {type(model).__name__}")
    if not isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        raise TypeError(f"tasa: evaluate needs a Hugging Face tokenizer, got "
                        f"{type(tokenizer).__name__}")
    shots = _fewshot_for(tasks, num_fewshot)
    keys = []
    for t in tasks:
        scored, few = _TASK_DATA[t]
        keys.append(scored)
        if few is not None and shots[t] > 0:
            keys.append(few)
    files = resolve_data(data, sorted(set(keys)))

    configs, n_available, used = [], {}, {}
    for t in tasks:
        scored_key, few_key = _TASK_DATA[t]
        items = _load_items(t, files[scored_key])
        n_available[t] = len(items)
        items = _subset(items, limit, seed, scored_key)   # gsm8k and gsm8k_nll: same items
        few = None
        used[t] = {"scored": str(files[scored_key])}
        if shots[t] > 0:
            if t.startswith("gsm8k"):
                few = tdata.load_gsm8k(files[few_key], "train")
            else:
                few = tdata.load_arc(files[few_key], t.split("_")[1], "validation")
            if len(few) < shots[t]:
                raise ValueError(f"tasa: {t}: {shots[t]}-shot needs {shots[t]} examples, "
                                 f"{files[few_key]} has {len(few)}")
            used[t]["fewshot"] = str(files[few_key])
        configs.append(_task_config(t, items, few, shots[t], max_gen_toks))

    t0 = time.perf_counter()
    with _offline_and_rng_kept(quiet=not progress):
        from lm_eval.tasks import TaskManager

        lm = _make_lm(model, tokenizer, batch_size, max_length, progress,
                      fast_generation=generation == "fast" and "gsm8k" in tasks)
        with torch.no_grad():
            res = lm_eval.simple_evaluate(
                model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False),
                num_fewshot=None, batch_size=batch_size, log_samples=True,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, bootstrap_iters=1000)
        eff_max_length = int(lm.max_length)
    seconds = time.perf_counter() - t0

    results = {}
    for t in tasks:
        metrics, stderr = _summarize_task(res["results"][t])
        n = int(res["n-samples"][t]["effective"])
        results[t] = {**metrics, "stderr": stderr, "n": n, "num_fewshot": shots[t]}
    summary = {
        "results": results,
        "config": {
            "tasks": tasks, "limit": limit,
            "subset": "seeded random subset (random.Random(f'{seed}:{data key}')), file order"
                      if limit is not None else "all items",
            "seed": seed, "num_fewshot": shots, "batch_size": int(batch_size),
            "max_gen_toks": int(max_gen_toks), "max_length": eff_max_length,
            "generation": generation if "gsm8k" in tasks else None,
            "data": used, "n_available": n_available, "model": _model_info(model),
            "seconds": round(seconds, 3),
            "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"),
                         "torch": torch.__version__, "transformers": transformers.__version__},
        },
    }
    if out_path is not None:

        write_json_atomic(out_path, {
            "summary": summary,
            "samples": {t: res["samples"][t] for t in tasks},
            "lm_eval": {k: res.get(k) for k in ("results", "n-samples", "higher_is_better",
                                                 "versions", "n-shot")},
        }, default=_jsonable)
    return summary


# ---- CLI ----------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def format_table(summary: dict) -> str:
    """A plain-text table of a summary returned by :func:`evaluate`."""
    rows = [("task", "metric", "value", "stderr", "n", "shots")]
    for t, r in summary["results"].items():
        for m, v in r.items():
            if m in ("stderr", "n", "num_fewshot"):
                continue
            rows.append((t, m, _fmt(v), _fmt(r["stderr"].get(m)), str(r["n"]),
                         str(r["num_fewshot"])))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row))
             for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)
