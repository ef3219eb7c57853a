"""Helpers shared by the benchmarks: timing, machine description, result files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from tasa import stats as _stats
from tasa_ext.machine import cpu_name, timeit  # noqa: F401  (timeit: re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def t975(df: int) -> float:
    return _stats.t975(df)


def ci95(d) -> tuple:
    """Mean and 95% t-interval half-width of paired differences (nan below 2 values):
    tasa.stats.mean_ci95, the one implementation."""
    return _stats.mean_ci95([float(x) for x in d])


def llc_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs; 32 MB when it cannot be read)."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def stream_bytes_default() -> int:
    """Bytes of weight copies a streamed benchmark operand rotates through: 3x the last-level
    cache, at least 96 MB. (A fixed 96 MB was 3x a 32 MB L3 on the AMD EPYC; the Intel Xeon of
    2026-12-06 reports a 300 MB L3, in which 96 MB stays resident: bench_gemm then measured the
    8-bit GEMV at 45 GB/s, 2.5x the copy bandwidth, and every width at the same compute-bound
    time, instead of DRAM streaming.)"""
    return max(96 << 20, 3 * llc_bytes())


def copy_bandwidth(device: str = "cpu", nbytes: int = None) -> float:
    """STREAM-copy convention: (bytes read + bytes written) / s of a large tensor copy
    (default on the CPU: source and destination each 2x the last-level cache, >= 256 MB)."""
    if nbytes is None:
        nbytes = max(256 << 20, 2 * llc_bytes()) if device == "cpu" else 256 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = timeit(lambda: dst.copy_(src), min_time=1.0, sync=sync)
    return 2 * nbytes / t


def git_commit(include_untracked: bool = False) -> str:
    """Short HEAD hash, "+dirty" if tracked files differ from HEAD (with ``include_untracked``:
    also if there are untracked, not ignored files, e.g. a new source file)."""
    try:
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent,
                                      text=True, stderr=subprocess.DEVNULL).strip()
        if include_untracked:
            dirty = bool(subprocess.check_output(["git", "status", "--porcelain"], cwd=RESULTS.parent,
                                                 text=True, stderr=subprocess.DEVNULL).strip())
        else:
            dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=RESULTS.parent,
                                    stderr=subprocess.DEVNULL) != 0
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine(device: str = "cpu", include_untracked: bool = False) -> dict:
    """Date, commit, command line, versions and a one-line device description."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(include_untracked),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if str(device).startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(device)
    else:
        import tasa_ext
        info["device"] = f"{cpu_name()}, {os.cpu_count()} cores, tasa ISA {tasa_ext.build_info()['cpu_isa']}"
    return info


def write_results(stem: str, meta: dict, rows: list, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    path = RESULTS / f"{stem}.md"
    path.write_text(markdown)
    return path


def interleaved_decode(model, ids, steps: int, rounds: int, configs: dict) -> tuple:
    """Tasa's lean decoder under each of ``configs`` (``{name: fn()}``, fn switching to that
    configuration before a decoder is built), in ``rounds`` interleaved rounds (plus one
    warm-up) of ``steps`` one-token steps after the prompt ``ids`` ([1, T]). Returns
    ``({name: [ms per step, one per round]}, {name: greedy tokens of the last round})``."""
    from tasa.generation import _LeanDecoder
    T = ids.shape[1]
    times = {k: [] for k in configs}
    tokens = {}
    for r in range(rounds + 1):                 # round 0: warm-up, not counted
        for k, switch in configs.items():
            switch()
            dec = _LeanDecoder(model, T + steps + 1)
            nxt = dec(ids, 0).argmax(-1)[:, None]
            got = []
            t0 = time.perf_counter()
            for i in range(steps):
                got.append(int(dec(nxt, T + i).argmax()))
            if r:
                times[k].append((time.perf_counter() - t0) / steps * 1e3)
            tokens[k] = got
    return times, tokens


# ---- KL tables of the method comparisons (mse_methods, hadamard_probe, hadamard_quality) --------

KL_HEADER = ["| row | KL general | top-1 general | KL GSM8K | top-1 GSM8K | GSM8K NLL |",
             "|---|---|---|---|---|---|"]


def kl_row(name: str, res: dict, extra: str = "") -> str:
    """One table row of ``tasa.divergence.compare`` results on the "general" and "gsm8k" texts
    (``extra``: cells inserted after the name, e.g. sizes, each ending in " | ")."""
    g, m = res["general"][name], res["gsm8k"][name]
    return (f"| {name} | {extra}{g['kl']:.4f} ± {ci95(g['kl_seq'])[1]:.4f} | {g['top1']:.4f} | "
            f"{m['kl']:.4f} ± {ci95(m['kl_seq'])[1]:.4f} | {m['top1']:.4f} | {m['nll']:.4f} |")


def paired_cells(res: dict, base: str, row: str) -> str:
    """``ΔKL general | ΔKL GSM8K | ΔGSM8K NLL`` of ``row`` minus ``base`` (95% t-intervals over
    the same sequences), as table cells."""
    def d(text, key):
        a, b = res[text][base][key], res[text][row][key]
        return "{:+.4f} ± {:.4f}".format(*ci95([y - x for x, y in zip(a, b)]))
    return f"{d('general', 'kl_seq')} | {d('gsm8k', 'kl_seq')} | {d('gsm8k', 'nll_seq')}"


def kl_summary_json(res: dict) -> dict:
    """The results without their per-sequence lists (what the .json files keep)."""
    return {t: {n: {k: v for k, v in r.items() if not k.endswith("_seq")} for n, r in rs.items()}
            for t, rs in res.items()}


def kl_scores(ref, cands: dict, tok, data, general_tokens: int, task_tokens: int) -> dict:
    """``tasa.divergence.compare`` of ``cands`` against ``ref`` on WikiText-2 test windows and on
    GSM8K test items (512-token windows): ``{"general": ..., "gsm8k": ...}``."""
    from tasa import divergence
    res = {}
    for text, n_tok in (("general", general_tokens), ("gsm8k", task_tokens)):
        seqs = divergence.kl_sequences(tok, text, data=data, max_tokens=n_tok, seqlen=512)
        res[text] = divergence.compare(ref, cands, seqs, desc=text)
    return res


def run_meta(script: str, model: str, info, t0: float, argv=None, **extra) -> dict:
    """:func:`machine` plus the model, its note, the seconds since ``t0`` and the command line
    that ran ``benchmarks/<script>``."""
    import sys
    import time
    meta = machine()
    meta.update({"model": model, "model_note": info.note(), "seconds": time.time() - t0,
                 "command": f"python benchmarks/{script} " + " ".join(
                     sys.argv[1:] if argv is None else argv), **extra})
    return meta


def write_kl_results(stem: str, lines: list, meta: dict, res: dict, **extra) -> str:
    """``RESULTS/<stem>.md`` from ``lines`` and ``RESULTS/<stem>.json`` (``meta``, ``extra``,
    :func:`kl_summary_json` of ``res``); prints and returns the markdown."""
    md = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(md)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, **extra, "results": kl_summary_json(res)}, indent=1))
    print(md)
    return md
