"""The reproduction table: does a 3.5-bit TASA model match or beat uniform 4-bit, and beat
uniform 3-bit by a wide margin on GSM8K?

For every model: the reference (full precision), RTN W3/W4, GPTQ W3/W4 (uniform, g128 asym,
GPTQ calibrated on general text) and TASA at the target budget with the ablations that test
the paper's two claims: perplexity-only sensitivity (beta = 1), task-only sensitivity
(beta = 0), task-only calibration (alpha = 0), general-only calibration (alpha = 1), and no
intra-layer step. All TASA rows share one measurement (measure once, allocate many times).

Every row is evaluated with lm-eval (tasa.evaluation: GSM8K gold-solution NLL, ARC-Challenge and
ARC-Easy test; GSM8K exact match with --gsm8k-em) on a seeded subset, plus WikiText-2 test
perplexity (GPTQ protocol, first --ppl-windows windows). Each row writes a raw JSON (summary +
lm-eval per-sample logs) under OUT/<model>/rows/; a row whose JSON exists is not recomputed, so
an interrupted run resumes; a model's settings are recorded in OUT/<model>/meta.json and a run
with other settings for the same model is refused. The markdown table (every model under OUT)
and the plots are rebuilt from the JSON files. The whole table, each model with its preset:

    python benchmarks/reproduce.py --models smollm2-135m,qwen2.5-coder-0.5b --data ../shared/data
"""
from __future__ import annotations

# The rows of this benchmark's committed results (and its caches) were made before format
# version 2's rotation existed: it stays off here so a re-run extends them consistently; the
# rotation is measured apart (benchmarks/hadamard_quality.py, hadamard_probe.py).
import argparse
import ast
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from common import ci95, git_commit

from tasa import defaults
from tasa.measurement import Measurement, check_settings as check_same_settings
from tasa.util import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]

RETENTION_TASKS = (("gsm8k_nll", "bits_per_byte", "lower"), ("arc_challenge", "acc_norm", "higher"),
                   ("arc_easy", "acc_norm", "higher"))


def paper_rows(bits: float, beta: float, seeds=(0, 1, 2), sweep=(), other_seeds=None,
               sweep_seeds=(0,)) -> list:
    """The issue-15 suite: TASA at ``bits`` code bits (the paper's count) and at ``bits``
    storage bits against RTN W4, GPTQ W4/W3 (general-text calibration, the paper's baseline
    setting) and a non-task-aware mixed-precision baseline at the same code budget (HIGGS's
    dynamic allocation, general calibration); the TASA and GPTQ rows once per calibration seed
    (``cal_seed``: the GPTQ calibration windows; the data split stays seed 0's); then the budget
    sweep (storage bits, seed 0; ``sweep_seeds``: the calibration seeds of the sweep rows, named
    ", seed s" beyond seed 0 -- to tell a worse step from calibration noise). ``other_seeds``:
    how many of the seeds GPTQ W3 and TASA at storage bits get (default all; the target
    comparison, TASA code bits vs GPTQ W4, always gets every seed)."""
    rows = [("reference", {"kind": "ref"}),
            ("RTN W4", {"kind": "uniform", "method": "rtn", "bits": 4})]
    n_other = len(seeds) if other_seeds is None else int(other_seeds)
    higgs = (f"HIGGS-style {bits:g} code bits (not task-aware), seed {seeds[0]}",
             {"kind": "tasa", "bits": bits, "budget": "code", "scoring": "higgs", "alpha": 1.0,
              "intra": False, "cal_seed": seeds[0]})
    for i, s in enumerate(seeds):      # the first seed's rows (and the baseline) come first
        rows += [
            (f"TASA {bits:g} code bits, seed {s}", {"kind": "tasa", "bits": bits, "beta": beta,
                                                    "budget": "code", "cal_seed": s}),
            (f"GPTQ W4, seed {s}", {"kind": "uniform", "method": "gptq", "bits": 4, "cal_seed": s})]
        if i < n_other:
            rows += [
                (f"GPTQ W3, seed {s}", {"kind": "uniform", "method": "gptq", "bits": 3, "cal_seed": s}),
                (f"TASA {bits:g} storage bits, seed {s}", {"kind": "tasa", "bits": bits,
                                                           "beta": beta, "budget": "storage",
                                                           "cal_seed": s})]
        if i == 0:     # mixed precision without task awareness: HIGGS, and TASA with beta = 1
            rows += [higgs, (f"TASA {bits:g} code bits, beta=1 (ppl-only sensitivity), seed {s}",
                             {"kind": "tasa", "bits": bits, "beta": 1.0, "budget": "code",
                              "cal_seed": s})]
    for s in sweep_seeds:
        for b in sweep:
            rows.append((f"TASA sweep {b:.3f} storage bits" + (f", seed {s}" if s else ""),
                         {"kind": "tasa", "bits": b, "beta": beta, "budget": "storage",
                          "cal_seed": s, "sweep": True}))
    return rows


def suite_rows(st: dict) -> list:
    """The rows of a model's suite from its recorded settings."""
    if st.get("suite", "ablation") == "paper":
        return paper_rows(st["bits"], st["beta"], st.get("seeds", (0, 1, 2)), st.get("sweep", ()),
                          st.get("other_seeds"), st.get("sweep_seeds") or (0,))
    return rows_for(st["bits"], st["beta"])


def rows_for(bits: float, beta: float, extra_budgets=()) -> list:
    t = f"TASA {bits:g}"
    rows = [
        ("reference", {"kind": "ref"}),
        ("RTN W4", {"kind": "uniform", "method": "rtn", "bits": 4}),
        ("RTN W3", {"kind": "uniform", "method": "rtn", "bits": 3}),
        ("GPTQ W4", {"kind": "uniform", "method": "gptq", "bits": 4}),
        ("GPTQ W3", {"kind": "uniform", "method": "gptq", "bits": 3}),
        ("GPTQ W4, alpha* calibration", {"kind": "uniform", "method": "gptq", "bits": 4, "alpha": "star"}),
        ("GPTQ W3, alpha* calibration", {"kind": "uniform", "method": "gptq", "bits": 3, "alpha": "star"}),
        (t, {"kind": "tasa", "bits": bits, "beta": beta}),
        (f"{t}, beta=1 (ppl-only sensitivity)", {"kind": "tasa", "bits": bits, "beta": 1.0}),
        (f"{t}, beta=0 (task-only sensitivity)", {"kind": "tasa", "bits": bits, "beta": 0.0}),
        (f"{t}, alpha=0 (task-only calibration)", {"kind": "tasa", "bits": bits, "beta": beta, "alpha": 0.0}),
        (f"{t}, alpha=1 (general-only calibration)", {"kind": "tasa", "bits": bits, "beta": beta, "alpha": 1.0}),
        (f"{t}, no intra-layer step", {"kind": "tasa", "bits": bits, "beta": beta, "intra": False}),
    ]
    for b in extra_budgets:
        rows.append((f"TASA {b:g}", {"kind": "tasa", "bits": b, "beta": beta}))
    return rows


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name).strip("_")


# the options that change a row's numbers: a model's rows must all share them (checked on resume)
SETTING_KEYS = ("bits", "beta", "widths", "limit", "seed", "n_calib", "seqlen", "ppl_windows",
                "n_gen", "n_task", "n_test", "sens_ppl_windows", "sens_math_items",
                "sens_arc_items", "gsm8k_em", "gsm8k_shots", "gsm8k_limit", "max_gen_toks")
# settings of the paper suite only (absent from the older ablation folders' meta.json)
PAPER_KEYS = ("suite", "seeds", "other_seeds", "sweep", "sweep_seeds", "granularity", "sens_widths",
              "sens_dtype")
# of those, the ones that say which rows exist, not what a row computes (a resume may add rows)
ROW_SET_KEYS = ("seeds", "other_seeds", "sweep", "sweep_seeds")


def settings_of(args) -> dict:
    d = {k: getattr(args, k) for k in SETTING_KEYS}
    d["widths"] = list(d["widths"])
    if args.suite == "paper":
        d.update({k: getattr(args, k) for k in PAPER_KEYS})
        for k in ("seeds", "sweep", "sweep_seeds", "sens_widths"):
            d[k] = list(d[k]) if d[k] is not None else None
    d["data"] = os.path.basename(os.path.normpath(args.data))   # the folder's name, not the path
    return d


def check_settings(mdir: Path, mname: str, settings: dict, meta: dict) -> dict:
    """meta.json records, per model, the settings its rows were computed with; refuse to mix."""
    mp = mdir / "meta.json"
    if mp.is_file():
        old = json.loads(mp.read_text())
        # Which rows exist (the seeds, how many of them the other rows get, the sweep budgets)
        # does not change any row's numbers: a rerun may add rows; the record keeps the union.
        settings = dict(settings)
        grew = False
        for k in ROW_SET_KEYS:
            if k not in old["settings"] and k not in settings:   # the ablation suite
                continue
            a, b = old["settings"].get(k), settings.get(k)
            if k == "other_seeds":
                settings[k] = None if a is None or b is None else max(a, b)
            elif a is not None or b is not None:
                settings[k] = sorted(set(a or []) | set(b or []))
            grew |= settings[k] != a
            old["settings"][k] = settings[k]
        try:    # the pipeline's settings check: every differing setting named
            check_same_settings(old["settings"], settings, f"the rows in {mp}",
                                "rerun with that model's options (its command is in meta.json) "
                                "or use another --out")
        except ValueError as e:
            raise SystemExit(f"[{mname}] {e}") from None
        if grew:     # the section's command must compute (or resume) every row it shows
            old["command"] = meta["command"]
        if {k: old.get(k) for k in ("date", "commit", "command")} != {k: meta[k] for k in ("date", "commit", "command")}:
            old.setdefault("runs", []).append({k: meta[k] for k in ("date", "commit", "machine", "command")})
            old["runs"] = old["runs"][-20:]
        mp.write_text(json.dumps(old, indent=1))
        return old
    new = {"model": mname, "settings": settings, **meta}
    mp.write_text(json.dumps(new, indent=1))
    return new


def full_command(argv: list) -> str:
    """The command line without --rows: the command that computes (or resumes) every row."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--rows":
            skip = True
        elif not a.startswith("--rows="):
            keep.append(a)
    return shlex.join(["python", "benchmarks/reproduce.py", *keep])


def evaluate_row(model, tok, args, raw_path: Path) -> dict:
    from tasa import evaluation as tev
    from tasa import corpora as tdata
    from tasa.ppl import perplexity

    res = tev.evaluate(model, tok, tasks=["gsm8k_nll", "arc_challenge", "arc_easy"], data=args.data,
                       limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                       out_path=raw_path, progress=args.progress)
    results = dict(res["results"])
    if args.gsm8k_em:   # generation is slow on a CPU: its own (smaller) limit
        em = tev.evaluate(model, tok, tasks=["gsm8k"], data=args.data,
                          limit=args.gsm8k_limit or args.limit, seed=args.seed,
                          num_fewshot={"gsm8k": args.gsm8k_shots}, batch_size=args.batch_size,
                          max_gen_toks=args.max_gen_toks,
                          out_path=raw_path.with_suffix(".gsm8k.json"), progress=args.progress,
                          # the suites' exact-match rows were generated this way (batched,
                          # left-padded): one path per suite keeps rows paired
                          generation="hf")
        results.update(em["results"])
    ppl = None
    if args.ppl_windows > 0:
        ppl = perplexity(model, tok, tdata.load_wikitext2(args.data, "test"), seqlen=2048,
                         max_windows=args.ppl_windows, progress=args.progress)
    return {"lm_eval": results, "lm_eval_config": res.get("config"),
            "wikitext2": ppl, "raw": str(raw_path.name)}


def run_row(name: str, spec: dict, model_name: str, args, mdir: Path, measurement) -> dict:
    from tasa import pipeline
    from tasa.alloc import plan_average_bits, plan_summary
    from tasa.models import load_model
    from tasa.quant import plan_to_dict, uniform_plan

    model, tok, info = load_model(model_name)
    # the calibration windows move with the row's seed; the data pools stay --seed's
    cfg = pipeline.PipelineConfig(model=model_name, data=args.data, hadamard=False,
                                  seed=spec.get("cal_seed", args.seed),
                                  n_calib=args.n_calib, seqlen=args.seqlen)
    split = pipeline.split_data(pipeline.PipelineConfig(data=args.data, seed=args.seed))
    t0 = time.perf_counter()
    row = {"name": name, "spec": spec, "model": model_name, "model_note": info.note()}
    if spec["kind"] == "ref":
        row["avg_bits"] = None
    elif spec["kind"] == "uniform":
        plan = uniform_plan(model, spec["bits"], cfg.group_size, cfg.mode, fit_group_size=True)
        shapes = {f: (model.get_submodule(f).out_features, model.get_submodule(f).in_features)
                  for f in plan}
        pj = plan_to_dict(plan)["layers"]
        row["avg_bits"] = plan_average_bits(pj, shapes)
        row["code_avg_bits"] = plan_summary(pj, shapes)["code_avg_bits"]
        cfg.method = spec["method"]
        alpha = measurement.mixture.alpha_star if spec.get("alpha") == "star" else 1.0
        _, q = pipeline.quantize_with_plan(model, tok, cfg, pj, alpha=alpha, progress=args.progress,
                                           log=lambda s: None, split=split)
        row["alpha"] = alpha
        row["quantization"] = q
    else:
        A = pipeline.allocate(measurement, spec["bits"], spec.get("beta", args.beta),
                              widths=tuple(args.widths), intra=spec.get("intra", True),
                              budget=spec.get("budget", "storage"),
                              scoring=spec.get("scoring", "tasa"))
        alpha = spec.get("alpha", measurement.mixture.alpha_star)
        _, q = pipeline.quantize_with_plan(model, tok, cfg, A["plan"], alpha, progress=args.progress,
                                           log=lambda s: None, split=split)
        row["avg_bits"] = A["summary"]["avg_bits"]
        row["code_avg_bits"] = A["summary"]["code_avg_bits"]
        row["plan"] = {f: e["bits"] for f, e in A["plan"].items()}
        row["width_fraction"] = A["summary"]["width_fraction"]
        row["item_bits"] = A["item_bits"]
        row["alpha"] = alpha
        row["quantization"] = q
    row["quant_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    row["eval"] = evaluate_row(model, tok, args, mdir / "rows" / f"{slug(name)}.raw.json")
    row["eval_seconds"] = time.perf_counter() - t1
    del model
    return row


def code_bits(row) -> float | None:
    """Average code bits of a row (the paper's count: no scales, zeros or tables): recorded, or
    from its width fractions (rows written before it was recorded), or a uniform row's width."""
    if row.get("code_avg_bits") is not None:
        return row["code_avg_bits"]
    if row.get("width_fraction"):
        return sum(int(b) * f for b, f in row["width_fraction"].items())
    return float(row["spec"]["bits"]) if row["spec"].get("kind") == "uniform" else None


def same_plan_row(mdir: Path, spec: dict, measurement, args) -> dict | None:
    """A computed TASA row of this model whose plan, calibration seed and mix are those
    ``spec`` would give (allocation takes seconds), else None."""
    from tasa import pipeline

    A = pipeline.allocate(measurement, spec["bits"], spec.get("beta", args.beta),
                          widths=tuple(args.widths), intra=spec.get("intra", True),
                          budget=spec.get("budget", "storage"), scoring=spec.get("scoring", "tasa"))
    plan = {f: e["bits"] for f, e in A["plan"].items()}
    alpha = spec.get("alpha", measurement.mixture.alpha_star)
    for r in load_rows(mdir, []):
        if (r["spec"].get("kind") == "tasa" and r.get("plan") == plan and r.get("alpha") == alpha
                and r["spec"].get("cal_seed") == spec.get("cal_seed") and "same_as" not in r):
            return r
    return None


def metric(row, task, key):
    r = row["eval"]["lm_eval"].get(task)
    return None if r is None else r.get(key)


def retention(row, ref) -> float | None:
    vals = []
    for task, key, better in RETENTION_TASKS:
        a, b = metric(row, task, key), metric(ref, task, key)
        if a is None or b is None or a <= 0 or b <= 0:
            return None
        vals.append(b / a if better == "lower" else a / b)
    return sum(vals) / len(vals)


def fmt(x, nd=3, se=None):
    if x is None:
        return "-"
    s = f"{x:.{nd}f}"
    if se:
        s += f" ± {se:.{nd}f}"
    return s


def per_item(mdir: Path, row: dict, task: str) -> dict:
    """doc id -> the row's per-item score from lm-eval's sample log: gold-solution bits per byte
    (task gsm8k_nll) or flexible-extract exact match (task gsm8k). Empty if the row lacks it."""
    raw = mdir / "rows" / row["eval"]["raw"]
    if task == "gsm8k":
        raw = raw.with_suffix(".gsm8k.json")
    if not raw.is_file():
        return {}
    out = {}
    for x in json.loads(raw.read_text())["samples"].get(task, []):
        if task == "gsm8k_nll":
            ll, nbytes = ast.literal_eval(x["bits_per_byte"]) if isinstance(x["bits_per_byte"], str) \
                else x["bits_per_byte"]
            out[x["doc_id"]] = -ll / nbytes / math.log(2)
        elif task.startswith("arc"):
            out[x["doc_id"]] = float(x["acc_norm"])
        elif x["filter"] == "flexible-extract":
            out[x["doc_id"]] = float(x["exact_match"])
    return out


def config_of(name: str) -> str:
    return name.split(", seed ")[0]


def mean_diff(a: dict, b: dict) -> float | None:
    """Mean of a[i] - b[i] over the items both per-item score maps have (None: none shared)."""
    com = sorted(set(a) & set(b))
    return sum(a[i] - b[i] for i in com) / len(com) if com else None


def paired_seeds(mdir: Path, A: list, B: list, task: str) -> dict | None:
    """Config A against config B (each a list of rows, one per calibration seed) on the same
    items: per item, each config's score averaged over its seeds, then the paired difference
    (mean, 95% CI over items, items where A is lower); and per seed present in both, the mean
    difference of that seed's two rows (mean and 95% CI over seeds: the seed noise)."""
    def per_cfg(rows):
        per = [per_item(mdir, r, task) for r in rows]
        per = [p for p in per if p]
        if not per:
            return {}
        ids = set.intersection(*(set(p) for p in per))
        return {i: sum(p[i] for p in per) / len(per) for i in ids}
    a, b = per_cfg(A), per_cfg(B)
    ids = sorted(set(a) & set(b))
    if len(ids) < 2:
        return None
    d = [a[i] - b[i] for i in ids]
    m, h = ci95(d)
    out = {"items": len(ids), "mean": m, "ci": h, "a_lower": sum(x < 0 for x in d),
           "a_higher": sum(x > 0 for x in d)}
    sa = {r["spec"].get("cal_seed"): per_item(mdir, r, task) for r in A}
    sb = {r["spec"].get("cal_seed"): per_item(mdir, r, task) for r in B}
    seed_d = [x for x in (mean_diff(sa[s_], sb[s_]) for s_ in sorted(set(sa) & set(sb), key=str))
              if x is not None]
    if seed_d:
        sm, sh = ci95(seed_d)
        out.update({"seeds": len(seed_d), "seed_mean": sm, "seed_ci": sh, "per_seed": seed_d})
    return out


def seed_noise(mdir: Path, groups: dict, task: str = "gsm8k_nll") -> dict | None:
    """How much one config moves between calibration seeds: for every config with several
    seeds and every pair of its seeds, the mean per-item difference on the same items; returns
    their root mean square (the typical seed-to-seed difference of one config, which a
    same-seed step between two plans also carries: GPTQ of every later block sees the widths
    before it), or None when no config has two seeds."""
    diffs, configs = [], 0
    for rs in groups.values():
        per = [per_item(mdir, r, task) for r in rs if r["spec"].get("cal_seed") is not None]
        per = [p for p in per if p]
        if len(per) < 2:
            continue
        configs += 1
        diffs += [x for x in itertools.starmap(mean_diff, itertools.combinations(per, 2))
                  if x is not None]
    if not diffs:
        return None
    return {"rms": math.sqrt(sum(x * x for x in diffs) / len(diffs)), "pairs": len(diffs),
            "configs": configs}


def fmt_paired(an: str, bn: str, r: dict, unit: str, lower_better: bool) -> str:
    better = "lower" if lower_better else "higher"
    s = (f"{an} vs {bn}: {r['mean']:+.4f} {unit} (95% CI ±{r['ci']:.4f} over {r['items']} items, "
         f"seed-averaged; {an} {better} on {r['a_lower'] if lower_better else r['a_higher']})")
    n_seeds = r.get("seeds", 0)
    if n_seeds > 1:
        per = ", ".join(f"{x:+.4f}" for x in r["per_seed"])
        s += (f"; per seed pair {per} (mean {r['seed_mean']:+.4f}, 95% CI ±{r['seed_ci']:.4f} "
              f"over {n_seeds} seeds)")
    sig = r["ci"] == r["ci"] and abs(r["mean"]) > r["ci"]
    seed_sig = n_seeds > 1 and abs(r["seed_mean"]) > r["seed_ci"]
    verdict = ("within item noise" if not sig else
               "beyond item and seed noise" if seed_sig else
               "beyond item noise but not seed noise" if n_seeds > 1 else
               "beyond item noise; seed noise not measured (one seed pair or none)")
    return s + f" -- **{verdict}**"


def write_paper_section(lines: list, mname: str, mdir: Path, meta: dict, out: Path, table: Path) -> None:
    """A model's paper-suite section: the measurement's noise bounds, the seed-aggregated
    table, the paired comparisons and the budget sweep."""
    st = meta["settings"]
    rows = load_rows(mdir, [n for n, _ in suite_rows(st)])
    ref = next((r for r in rows if r["spec"]["kind"] == "ref"), None)
    lines.append(f"## {mname}\n")
    lines.append(f"- command: `{meta['command']}`")
    lines.append(f"- first run: {meta['date']}, git commit {meta['commit']}; machine: {meta['machine']}"
                 + (f"; {len(meta['runs'])} later call(s), the last {meta['runs'][-1]['date']} at "
                    f"{meta['runs'][-1]['commit']}" if meta.get("runs") else ""))
    lines.append(f"- evaluation: {st['limit']} items per task (seed {st['seed']}); WikiText-2 first "
                 f"{st['ppl_windows']} windows; GPTQ calibration {st['n_calib']} x {st['seqlen']} "
                 f"tokens, calibration seeds {st['seeds']} (the windows; the data split is seed "
                 f"{st['seed']}'s); TASA widths {tuple(st['widths'])}; sensitivity per "
                 f"{st['granularity']} at {st['sens_widths']} bits ({st['sens_dtype']})\n")
    mp = mdir / "measurement.json"
    if mp.is_file():
        m = Measurement.load(mp)
        sens = m.sensitivity
        lines.append(f"- measurement: alpha* = {m.mixture.alpha_star:.3f}; mixture "
                     f"{m.mixture.seconds:.0f} s, sensitivity {sens.seconds:.0f} s; objectives "
                     + "; ".join(f"{o['name']} {o['sequences']} items / {o['scored_tokens']} tokens"
                                 for o in sens.objective_data))
        noise = (sens.noise or {}).get(str(sens.bits))
        if noise:
            rel = ", ".join(f"{k} {v['mean']:+.2f}" for k, v in noise["reliability"].items())
            taus = "; ".join(f"({r['a']}, {r['b']}) {r['tau']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"
                             + ("" if r["distinct_from_0"] else " (not distinct from 0)")
                             for r in noise["tau"])
            lines.append(f"- perplexity illusion at {sens.bits} bits: Kendall tau with 95% bootstrap "
                         f"CI {taus}; split-half reliability (tau between two halves of one "
                         f"objective's items) {rel}")
        lines.append("")
    groups: dict = {}
    for r in rows:
        if not r["spec"].get("sweep"):
            groups.setdefault(config_of(r["name"]), []).append(r)

    def agg(rs, get):
        v = [get(r) for r in rs]
        v = [x for x in v if x is not None]
        if not v:
            return "-"
        m_ = sum(v) / len(v)
        return f"{m_:.4f}" + (f" ({min(v):.4f}-{max(v):.4f})" if len(v) > 1 else "")
    em = any(metric(r, "gsm8k", "exact_match_flexible") is not None for r in rows)
    hdr = ("| config | storage bits | code bits | seeds | WikiText-2 ppl | GSM8K gold NLL (b/B) | "
           "ARC-C acc_norm | ARC-E acc_norm |" + (" GSM8K EM |" if em else "") + " retention |")
    lines.append("Mean over calibration seeds (min-max where several):\n")
    lines.append(hdr)
    lines.append("|" + "---|" * (hdr.count("|") - 1))
    for cname, rs in groups.items():
        r0 = rs[0]
        cells = [cname, fmt(r0.get("avg_bits"), 4) if r0.get("avg_bits") else "32",
                 fmt(r0.get("code_avg_bits"), 4) if r0.get("code_avg_bits") else "32", str(len(rs)),
                 agg(rs, lambda r: (r["eval"].get("wikitext2") or {}).get("ppl")),
                 agg(rs, lambda r: metric(r, "gsm8k_nll", "bits_per_byte")),
                 agg(rs, lambda r: metric(r, "arc_challenge", "acc_norm")),
                 agg(rs, lambda r: metric(r, "arc_easy", "acc_norm"))]
        if em:
            cells.append(agg(rs, lambda r: metric(r, "gsm8k", "exact_match_flexible")))
        cells.append(agg(rs, lambda r: retention(r, ref) if ref else None))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    t_code = groups.get(f"TASA {st['bits']:g} code bits")
    t_sto = groups.get(f"TASA {st['bits']:g} storage bits")
    higgs = next((v for k, v in groups.items() if k.startswith("HIGGS")), None)
    cmps = []
    for tn, T in ((f"TASA {st['bits']:g} code bits", t_code), (f"TASA {st['bits']:g} storage bits", t_sto)):
        if not T:
            continue
        beta1 = [k for k in groups if "beta=1" in k]
        for bn in ("GPTQ W4", "GPTQ W3", "RTN W4") + ((config_of(higgs[0]["name"]),) if higgs else ()) \
                + tuple(beta1 if T is t_code else ()):
            B = groups.get(bn)
            if not B:
                continue
            for task, unit, lower in (("gsm8k_nll", "bits/byte GSM8K gold NLL", True),
                                      ("arc_challenge", "ARC-C acc_norm", False),
                                      ("arc_easy", "ARC-E acc_norm", False),
                                      ("gsm8k", "GSM8K EM", False)):
                r = paired_seeds(mdir, T, B, task)
                if r:
                    cmps.append(fmt_paired(tn, bn, r, unit, lower))
    if cmps:
        lines.append("Paired on the same items (per item: the mean over a config's seeds; per seed "
                     "pair: the same calibration seed; 95% t-intervals):\n")
        lines += [f"- {c}" for c in cmps]
        lines.append("")
    sweeps: dict = {}            # calibration seed -> its sweep rows
    same_budget: dict = {}       # the sweep at several seeds: one config per budget too
    for r in rows:
        if r["spec"].get("sweep"):
            sweeps.setdefault(r["spec"].get("cal_seed", 0), []).append(r)
            if "same_as" not in r:
                same_budget.setdefault(f"sweep {r['spec']['bits']}", []).append(r)
    for v in sweeps.values():
        v.sort(key=lambda r: r["avg_bits"])
    sweep = sweeps.pop(0, [])
    if sweep:
        # TASA's own seed noise: uniform GPTQ W3 moves ten times more on Gemma and would hide
        # every step
        noise = seed_noise(mdir, {**{k: v for k, v in groups.items() if v[0]["spec"]["kind"] == "tasa"},
                                  **same_budget})
        lines.append("Budget sweep (TASA, storage bits, seed 0; each step paired against the "
                     "previous budget on the same items):\n")
        if noise:
            lines.append(f"Seed noise: one config at two calibration seeds differs by {noise['rms']:.4f} "
                         f"b/B GSM8K gold NLL (root mean square over {noise['pairs']} seed pairs of "
                         f"{noise['configs']} TASA configs); a step over 2x that is **worse beyond seed "
                         f"noise**, a step beyond only its item interval is **worse** (items).\n")
        lines.append("| target | storage bits | code bits | WikiText-2 ppl | GSM8K gold NLL | ARC-C | "
                     "ARC-E | step vs previous (GSM8K NLL, 95% CI) | units that changed width |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        prev = None
        for r in sweep:
            step, changed = "-", "-"
            if prev is not None:
                d = paired_seeds(mdir, [r], [prev], "gsm8k_nll")
                if d:
                    worse = d["mean"] > 0 and d["mean"] > d["ci"]
                    flag = ((" **worse beyond seed noise**" if noise and d["mean"] > 2 * noise["rms"]
                             else " **worse** (items)") if worse else "")
                    step = f"{d['mean']:+.4f} ±{d['ci']:.4f}" + flag
                if r.get("plan") and prev.get("plan"):
                    up = sorted({f.rsplit('.', 2)[0] for f in r["plan"]
                                 if sum(r["plan"][f]) > sum(prev["plan"][f])})
                    down = sorted({f.rsplit('.', 2)[0] for f in r["plan"]
                                   if sum(r["plan"][f]) < sum(prev["plan"][f])})
                    changed = f"{len(up)} up, {len(down)} down"
            w = r["eval"].get("wikitext2")
            lines.append(f"| {r['spec']['bits']:.3f} | {r['avg_bits']:.4f} | {r.get('code_avg_bits', 0):.4f} | "
                         f"{fmt(w['ppl'], 2) if w else '-'} | {fmt(metric(r, 'gsm8k_nll', 'bits_per_byte'), 4)} | "
                         f"{fmt(metric(r, 'arc_challenge', 'acc_norm'), 3)} | "
                         f"{fmt(metric(r, 'arc_easy', 'acc_norm'), 3)} | {step} | {changed} |")
            prev = r
        lines.append("")
    if sweep and sweeps:
        # the same steps at another calibration seed: a step that is worse at seed 0 but not at
        # the others is calibration noise (GPTQ of every later block sees the changed widths)
        lines.append("Sweep steps again at other calibration seeds (GSM8K gold NLL, paired on "
                     "the same items, 95% CI; the seed-0 step between the same budgets beside it):\n")
        at0 = {round(r["spec"]["bits"], 4): r for r in sweep}
        for s_, rs in sorted(sweeps.items()):
            for a, b in zip(rs, rs[1:]):
                d = paired_seeds(mdir, [b], [a], "gsm8k_nll")
                ka, kb = round(a["spec"]["bits"], 4), round(b["spec"]["bits"], 4)
                d0 = (paired_seeds(mdir, [at0[kb]], [at0[ka]], "gsm8k_nll")
                      if ka in at0 and kb in at0 else None)
                if d:
                    lines.append(f"- seed {s_}: {ka:.3f} -> {kb:.3f} storage bits: {d['mean']:+.4f} "
                                 f"±{d['ci']:.4f} b/B ({fmt(metric(a, 'gsm8k_nll', 'bits_per_byte'), 4)}"
                                 f" -> {fmt(metric(b, 'gsm8k_nll', 'bits_per_byte'), 4)})"
                                 + (f"; seed 0: {d0['mean']:+.4f} ±{d0['ci']:.4f}" if d0 else ""))
        lines.append("")
    # the sweep at other seeds is the steps' noise check, not more points on the curve
    plot(out, mname, [r for r in rows if not (r["spec"].get("sweep") and r["spec"].get("cal_seed"))])
    img = os.path.relpath(out / f"{slug(mname)}_quality_vs_bits.png", table.parent)
    lines.append(f"![quality vs bits]({img})\n")


def paired(mdir: Path, a: dict, b: dict) -> str | None:
    """Row a against row b on the same items: the mean per-item difference of GSM8K gold bits
    per byte with its standard error and win count, and the GSM8K exact-match discordant pairs."""
    na, nb = per_item(mdir, a, "gsm8k_nll"), per_item(mdir, b, "gsm8k_nll")
    ids = sorted(set(na) & set(nb))
    if len(ids) < 2:
        return None
    d = [na[i] - nb[i] for i in ids]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    s = (f"{a['name']} vs {b['name']}: GSM8K gold NLL {mean:+.4f} ± {se:.4f} bits/byte per item "
         f"(mean ± SE of the paired difference, {len(ids)} items; {a['name']} lower on "
         f"{sum(x < 0 for x in d)})")
    ea, eb = per_item(mdir, a, "gsm8k"), per_item(mdir, b, "gsm8k")
    ids = sorted(set(ea) & set(eb))
    if ids:
        only_a = sum(ea[i] > eb[i] for i in ids)
        only_b = sum(eb[i] > ea[i] for i in ids)
        s += (f"; GSM8K EM: right on {only_a} item(s) {b['name']} got wrong, wrong on {only_b} it "
              f"got right ({len(ids)} items)")
    return s


def model_dirs(out: Path) -> list:
    """Every model folder under OUT that has a meta.json, the known models first."""
    order = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"]
    found = {json.loads(p.read_text())["model"]: p.parent for p in out.glob("*/meta.json")}
    return sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))


def load_rows(mdir: Path, names_order: list) -> list:
    rows = [json.loads(p.read_text()) for p in (mdir / "rows").glob("*.json")
            if not p.name.endswith(".raw.json") and not p.name.endswith(".gsm8k.json")]
    rank = {n: i for i, n in enumerate(names_order)}
    return sorted(rows, key=lambda r: (rank.get(r["name"], len(rank)), r.get("avg_bits") or 0, r["name"]))


def write_table(out: Path, table: Path) -> Path:
    """The table of every model under OUT, rebuilt from the row JSONs and each model's meta.json."""
    lines = ["# Reproduction: TASA mixed precision vs uniform baselines\n"]
    lines.append("Common to every model section below:\n")
    lines.append("- evaluation: lm-eval in process (tasa.evaluation) on a seeded subset of each task (the same "
                 "items for every row of a model); GSM8K gold NLL = bits per byte of the reference "
                 "solution given the question (lower is better); ARC acc_norm (test, 0-shot); GSM8K "
                 "EM = exact match, flexible extract, n-shot generation; WikiText-2 test perplexity, "
                 "GPTQ protocol, first windows of 2048 tokens.")
    lines.append("- **average bits** = exact storage cost of the quantized linears (codes + fp16 "
                 "scales + fp16 zeros + group tables) / their weight count, from "
                 "`tasa_ext.cost_bits`; **code bits** = the code bits alone (the paper's count, "
                 "which leaves g128 scales out); lm_head and embeddings stay full precision in "
                 "every row.")
    lines.append("- **reasoning retention** = mean over {GSM8K gold NLL (ref/row), ARC-C acc_norm "
                 "(row/ref), ARC-E acc_norm (row/ref)}; 1.0 = as good as the reference.")
    lines.append("- uniform rows: g128 (where 128 does not divide K, the largest multiple of the kernel tile that does: 96 for K=576), asymmetric; "
                 "GPTQ calibrated on general text (alpha = 1), or on the TASA calibration mix where "
                 "the row says alpha*. TASA rows: same GPTQ settings, calibration mix alpha* unless "
                 "the row says otherwise.")
    lines.append("- the offline checkpoints were distributed already quantized (GGUF): the "
                 "reference is their dequantized weights.")
    lines.append("- each model's rows come from the command in its section (rerunning it recomputes "
                 "nothing that exists: rows resume); numbers trace to `reproduction/<model>/rows/"
                 "<row>.json` and lm-eval's per-sample logs `<row>.raw.json` (`.gsm8k.json` for "
                 "exact match).\n")
    for mname, mdir in model_dirs(out):
        meta = json.loads((mdir / "meta.json").read_text())
        st = meta["settings"]
        if st.get("suite") == "paper":
            write_paper_section(lines, mname, mdir, meta, out, table)
            continue
        rows = load_rows(mdir, [n for n, _ in rows_for(st["bits"], st["beta"])])
        ref = next((r for r in rows if r["spec"]["kind"] == "ref"), None)
        em = any(metric(r, "gsm8k", "exact_match_flexible") is not None for r in rows)
        lines.append(f"## {mname}\n")
        lines.append(f"- command: `{meta['command']}`")
        lines.append(f"- first run: {meta['date']}, git commit {meta['commit']}; machine: {meta['machine']}"
                     + (f"; {len(meta['runs'])} later call(s), the last {meta['runs'][-1]['date']} at "
                        f"{meta['runs'][-1]['commit']}" if meta.get("runs") else ""))
        lines.append(f"- subset: {st['limit']} items per task (seed {st['seed']}), data folder "
                     f"`{st['data']}`; WikiText-2: first {st['ppl_windows']} windows; GPTQ "
                     f"calibration {st['n_calib']} x {st['seqlen']} tokens; TASA widths "
                     f"{tuple(st['widths'])}"
                     + (f"; GSM8K EM: {st['gsm8k_shots']}-shot, {st['gsm8k_limit'] or st['limit']} "
                        f"items, at most {st['max_gen_toks']} generated tokens" if st["gsm8k_em"] else "")
                     + "\n")
        mp = mdir / "measurement.json"
        if mp.is_file():
            m = Measurement.load(mp)
            illusion = (m.sensitivity.illusion if m.sensitivity else None) or []
            taus = ", ".join(f"({x['a']}, {x['b']}) {x['kendall_tau']:+.2f}" for x in illusion)
            seconds = m.mixture.seconds + (m.sensitivity.seconds if m.sensitivity else 0.0)
            lines.append(f"- TASA measurement (`measurement.json`, shared by the TASA and alpha* rows): "
                         f"alpha* = {m.mixture.alpha_star:.3f} (share of general text in the "
                         f"calibration mix); Kendall tau between the block sensitivity rankings {taus}; "
                         f"{seconds:.0f} s\n")
        hdr = ("| row | avg bits | code bits | WikiText-2 ppl | GSM8K gold NLL (bits/byte) | ARC-C acc_norm | "
               "ARC-E acc_norm |" + (" GSM8K EM (flex) |" if em else "") +
               " reasoning retention | quant s |")
        lines.append(hdr)
        lines.append("|" + "---|" * (hdr.count("|") - 1))
        for r in rows:
            se = lambda t, k: (r["eval"]["lm_eval"].get(t, {}).get("stderr") or {}).get(k)
            w = r["eval"].get("wikitext2")
            cells = [r["name"], fmt(r["avg_bits"], 4) if r["avg_bits"] else "32 (fp32)",
                     fmt(code_bits(r), 4) if r["avg_bits"] else "32",
                     fmt(w["ppl"], 2) if w else "-",
                     fmt(metric(r, "gsm8k_nll", "bits_per_byte"), 4),
                     fmt(metric(r, "arc_challenge", "acc_norm"), 3, se("arc_challenge", "acc_norm")),
                     fmt(metric(r, "arc_easy", "acc_norm"), 3, se("arc_easy", "acc_norm"))]
            if em:
                cells.append(fmt(metric(r, "gsm8k", "exact_match_flexible"), 3,
                                 se("gsm8k", "exact_match_flexible")))
            cells += [fmt(retention(r, ref), 3) if ref else "-",
                      fmt(r.get("quant_seconds"), 0) if r["spec"]["kind"] != "ref" else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        byname = {r["name"]: r for r in rows}
        t = byname.get(f"TASA {st['bits']:g}")
        others = ["GPTQ W3", "GPTQ W3, alpha* calibration", "GPTQ W4", "RTN W4", "reference"]
        others += [r["name"] for r in rows if r["spec"]["kind"] == "tasa" and r is not t]   # ablations
        cmp = [paired(mdir, t, byname[b]) for b in others if t and b in byname]
        if any(cmp):
            lines.append("Paired on the same items (`per_item` in reproduce.py, from the sample logs):\n")
            lines += [f"- {c}" for c in cmp if c]
            lines.append("")
        plot(out, mname, rows)
        img = os.path.relpath(out / f"{slug(mname)}_quality_vs_bits.png", table.parent)
        lines.append(f"![quality vs bits]({img})\n")
    notes = out / "NOTES.md"     # hand-written analysis, kept apart so regeneration keeps it
    if notes.is_file():
        lines.append(notes.read_text())
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(lines) + "\n")
    return table


def plot(out: Path, mname: str, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (task, key, label) in zip(axes, [("gsm8k_nll", "bits_per_byte", "GSM8K gold NLL (bits/byte, lower better)"),
                                             ("wikitext2", "ppl", "WikiText-2 ppl (log scale, lower better)")]):
        for r in rows:
            x = r["avg_bits"] or 16.0
            y = (r["eval"]["wikitext2"] or {}).get("ppl") if task == "wikitext2" else metric(r, task, key)
            if y is None:
                continue
            kind = r["spec"]["kind"]
            mk = {"ref": "*", "uniform": "s", "tasa": "o"}[kind]
            ax.scatter([x], [y], marker=mk, s=40)
            ax.annotate(r["name"].replace("TASA", "T").split(" (")[0], (x, y), fontsize=6)
        if task == "wikitext2":
            ax.set_yscale("log")      # a collapsed row (RTN W3: ppl ~1000) would flatten the rest
        ax.set_xlabel("average bits (exact cost; reference drawn at 16)")
        ax.set_title(label, fontsize=9)
    fig.suptitle(mname)
    fig.tight_layout()
    fig.savefig(out / f"{slug(mname)}_quality_vs_bits.png", dpi=110)
    plt.close(fig)


# Evaluation sizes per model that fit a 2-core CPU (options given on the command line win, for
# every model); other models get DEFAULTS.
DEFAULTS = {"limit": 100, "ppl_windows": 8, "extra_budgets": "", "gsm8k_em": False, "gsm8k_shots": 8,
            "gsm8k_limit": 0, "max_gen_toks": 256}
PRESETS = {
    "smollm2-135m": {"limit": 100, "ppl_windows": 4, "extra_budgets": "3.81"},
    # the one offline model with non-zero GSM8K exact match: 5-shot EM on 30 items; 3.6x slower
    "qwen2.5-coder-0.5b": {"limit": 50, "ppl_windows": 2, "gsm8k_em": True, "gsm8k_shots": 5,
                           "gsm8k_limit": 30, "max_gen_toks": 200},
    # 262k-token vocabulary: the LM head costs more per token than SmolLM2's whole model
    "gemma3-270m": {"limit": 50, "ppl_windows": 2},
}


def model_args(args, mname: str):
    """args with the per-model preset (or default) filled in where the option was not given."""
    m = argparse.Namespace(**vars(args))
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(m, k, PRESETS.get(mname, {}).get(k, v))
    m.extra_budgets = tuple(float(x) for x in str(m.extra_budgets).split(",") if x)
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__ + "\nper-model presets (used where the option is not given): "
        + "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items())
        + "; any other model: " + ", ".join(f"{a}={b}" for a, b in DEFAULTS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reproduction"))
    ap.add_argument("--table", default=None,
                    help="markdown table path (default: reproduction.md next to --out)")
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--beta", type=float, default=defaults.BETA)
    ap.add_argument("--widths", default=",".join(map(str, defaults.WIDTHS)))
    ap.add_argument("--extra-budgets", default=None, help="more TASA budgets, e.g. 3.31,4.31")
    ap.add_argument("--suite", choices=["ablation", "paper"], default="ablation",
                    help="ablation: the TASA ablation rows (one seed); paper: TASA at --bits code "
                         "bits and storage bits vs RTN W4, GPTQ W4/W3 and a HIGGS-style baseline "
                         "over --seeds, plus the --sweep budgets")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds of the paper suite")
    ap.add_argument("--other-seeds", type=int, default=None,
                    help="how many of --seeds GPTQ W3 and TASA at storage bits get (default all)")
    ap.add_argument("--sweep", default="", help="storage budgets of the paper suite's sweep, "
                    "e.g. 3.25:4.25:0.125 or 3.3,3.5")
    ap.add_argument("--sweep-seeds", default="0", help="calibration seeds of the sweep rows (seed 0's "
                    "are the sweep table; others pair each step again, with --rows to pick budgets)")
    ap.add_argument("--granularity", default=defaults.GRANULARITY, help="sensitivity unit")
    # the committed tables were measured with probes at 3 and 4 bits (the default until
    # 2026-12-07): a re-run extends them consistently
    ap.add_argument("--sens-widths", default="3,4")
    ap.add_argument("--sens-dtype", default=defaults.SENS_DTYPE)
    ap.add_argument("--rows", default="", help="only these rows (exact names separated by ';' -- "
                    "names contain commas; 'TASA*' selects every TASA row)")
    ap.add_argument("--limit", type=int, default=None, help="items per lm-eval task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=None)
    g = ap.add_argument_group("measurement size (default: tasa quantize's defaults)")
    for k in ("n-gen", "n-task", "n-test", "sens-ppl-windows", "sens-math-items", "sens-arc-items"):
        g.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--gsm8k-em", action=argparse.BooleanOptionalAction, default=None,
                    help="also GSM8K exact match (generation: slow)")
    ap.add_argument("--gsm8k-shots", type=int, default=None)
    ap.add_argument("--gsm8k-limit", type=int, default=None, help="GSM8K EM items (0: --limit)")
    ap.add_argument("--max-gen-toks", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress bars for GPTQ blocks, lm-eval requests and perplexity windows")
    args = ap.parse_args(argv)
    args.widths = tuple(int(x) for x in args.widths.split(","))
    args.seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    args.sens_widths = tuple(int(x) for x in args.sens_widths.split(",") if x.strip())
    args.sweep_seeds = tuple(int(x) for x in args.sweep_seeds.split(",") if x.strip()) or (0,)
    if ":" in args.sweep:
        a, b, st = (float(x) for x in args.sweep.split(":"))
        args.sweep = tuple(round(a + i * st, 4) for i in range(int(round((b - a) / st)) + 1))
    else:
        args.sweep = tuple(float(x) for x in args.sweep.split(",") if x.strip())
    if args.table is None:
        args.table = str(Path(args.out).parent / "reproduction.md")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tasa import pipeline
    from tasa.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
            "command": full_command(argv if argv is not None else sys.argv[1:])}
    for mname in [m for m in args.models.split(",") if m]:
        margs = model_args(args, mname)
        mdir = out / slug(mname)
        (mdir / "rows").mkdir(parents=True, exist_ok=True)
        check_settings(mdir, mname, settings_of(margs), meta)
        cfg = pipeline.PipelineConfig(model=mname, data=args.data, seed=args.seed, hadamard=False,
                                      granularity=args.granularity,
                                      sens_widths=args.sens_widths, sens_dtype=args.sens_dtype)
        for k in ("n_gen", "n_task", "n_test", "sens_ppl_windows", "sens_math_items",
                  "sens_arc_items"):
            if getattr(args, k) is not None:
                setattr(cfg, k, getattr(args, k))
        mpath = mdir / "measurement.json"
        rows_def = (paper_rows(margs.bits, margs.beta, args.seeds, args.sweep, args.other_seeds,
                               args.sweep_seeds)
                    if args.suite == "paper" else rows_for(margs.bits, margs.beta, margs.extra_budgets))
        if args.rows:
            keep = [k.strip() for k in args.rows.split(";") if k.strip()]
            names = [r[0] for r in rows_def]
            unknown = [k for k in keep if k not in names and k != "TASA*"]
            if unknown:
                ap.error(f"unknown rows {unknown}; rows: {names}")
            rows_def = [r for r in rows_def if r[0] in keep
                        or ("TASA*" in keep and r[1]["kind"] == "tasa")]
        measurement = None
        if any(s["kind"] == "tasa" or s.get("alpha") == "star" for _, s in rows_def):
            if not (mpath.is_file() and Measurement.load(mpath).complete):
                print(f"[{mname}] measuring (mixture search + sensitivity) ...", flush=True)
                t0 = time.perf_counter()
                model, tok, _ = load_model(mname)
                pipeline.measure(model, tok, cfg, mpath, progress=args.progress)
                del model
                print(f"[{mname}] measured in {time.perf_counter() - t0:.0f} s", flush=True)
            measurement = Measurement.load(mpath)
        for name, spec in rows_def:
            p = mdir / "rows" / f"{slug(name)}.json"
            if p.is_file():
                continue
            try:
                twin = same_plan_row(mdir, spec, measurement, margs) if spec.get("sweep") else None
            except ValueError as e:      # a sweep budget below the all-narrowest plan
                if not spec.get("sweep"):
                    raise
                print(f"[{mname}] {name}: skipped ({e})", flush=True)
                continue
            if twin is not None:
                # a sweep budget whose plan, calibration seed and mix equal a computed row's:
                # the same model, so its numbers (and sample logs) are that row's
                row = dict(twin, name=name, spec=spec, same_as=twin["name"])
                write_json_atomic(p, row, default=str)
                print(f"[{mname}] {name}: the plan of {twin['name']!r}, not recomputed", flush=True)
                continue
            print(f"[{mname}] {name} ...", flush=True)
            row = run_row(name, spec, mname, margs, mdir, measurement)
            row["settings"] = settings_of(margs)
            row["commit"] = meta["commit"]
            write_json_atomic(p, row, default=str)
            print(f"[{mname}] {name}: avg bits {row['avg_bits']}, quant {row['quant_seconds']:.0f} s, "
                  f"eval {row['eval_seconds']:.0f} s", flush=True)
            write_table(out, Path(args.table))
    p = write_table(out, Path(args.table))
    print(p.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
