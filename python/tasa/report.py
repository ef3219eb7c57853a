"""The report of a ``tasa quantize`` run: ``report.md`` plus PNG plots (alpha curve, per-layer
sensitivities per objective, bit map). Plots need matplotlib (a dependency of tasa); the
markdown is written first, so a plotting failure never loses the numbers."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .measurement import Measurement
from .mixture import MixtureCurve
from .stats import normalize
from .util import atomic_write_bytes

__all__ = ["write_report", "plot_alpha_curve", "plot_sensitivity", "plot_bitmap"]


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else name


def _fmt(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_alpha_curve(measurement: Measurement, path) -> Path:
    plt = _plt()
    mix = measurement.mixture
    curve = MixtureCurve.from_dict(mix.curve)
    a = np.linspace(0, 1, 201)
    f = curve(a)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(a, f / mix.f_star, lw=2, label="closed form")
    g = [r for r in mix.table if not r.get("argmin")]
    ax.plot([r["alpha"] for r in g], [r["f_rel"] for r in g], "o", label="candidate grid")
    ax.axvline(mix.alpha_star, color="k", ls="--", lw=1,
               label=f"alpha* = {mix.alpha_star:.3f}")
    ax.set_xlabel("alpha (share of general text in the calibration mix)")
    ax.set_ylabel("f(alpha) / f(alpha*)")
    ax.set_title("Calibration-mixture criterion tr(H_test H_alpha^-1)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sensitivity(measurement: Measurement, scores: Mapping[str, float], path) -> Path:
    plt = _plt()
    sens = measurement.sensitivity
    units = list(measurement.units)
    x = np.arange(len(units))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for k in sens.objectives:
        v = np.array([sens.delta[u][k] for u in units])
        try:
            ax.plot(x, normalize(v), marker=".", label=f"{k} (loss +{v.sum():.3f} total)")
        except ValueError:
            pass
    ax.plot(x, [scores[u] for u in units], "k--", lw=1.5, label="aggregate s (beta)")
    ax.set_xlabel(f"unit ({measurement.config.get('granularity', 'block')}, in model order)")
    ax.set_ylabel("normalized sensitivity (sums to 1)")
    ax.set_title(f"Per-unit sensitivity: RTN {sens.bits}-bit probe of one unit at a time")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bitmap(measurement: Measurement, plan: Mapping[str, Mapping], path) -> Path:
    plt = _plt()
    units = measurement.units
    rows = list(units)
    kinds = []
    for u in rows:
        for f in units[u]["linears"]:
            k = f.split(".")[-1]
            if k not in kinds:
                kinds.append(k)
    M = np.full((len(rows), len(kinds)), np.nan)
    for i, u in enumerate(rows):
        for f in units[u]["linears"]:
            b = plan[f]["bits"]
            M[i, kinds.index(f.split(".")[-1])] = float(np.mean(b))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.0 + 0.22 * len(rows)))
    im = ax.imshow(M, aspect="auto", cmap="viridis", vmin=2, vmax=8)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r) for r in rows], fontsize=6)
    fig.colorbar(im, ax=ax, label="mean code width of the linear's groups")
    ax.set_title("Bit map")
    return _save(fig, path)


def noise_lines(sens) -> list:
    """The noise bounds of the rankings (``sens.noise``, :func:`tasa.stats.noise_report`) as
    report lines: each objective's split-half reliability and every tau's bootstrap interval."""
    noise = getattr(sens, "noise", None)
    if not noise:
        return []
    L = []
    for b, rep in noise.items():
        L.append(f"Noise bounds at {b} bits ({rep['n_splits']} random item splits, "
                 f"{rep['n_boot']} bootstrap resamples of the items):\n")
        L.append("| objective | split-half Kendall tau (mean, 95% range) |")
        L.append("|---|---|")
        for k, r in rep["reliability"].items():
            L.append(f"| {k} | {r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] |")
        L.append("")
        L.append("| a | b | Kendall tau | 95% bootstrap CI | distinct from 0 | vs reliability |")
        L.append("|---|---|---|---|---|---|")
        for r in rep["tau"]:
            L.append(f"| {r['a']} | {r['b']} | {r['tau']:+.3f} | [{r['lo']:+.3f}, {r['hi']:+.3f}] | "
                     f"{'yes' if r['distinct_from_0'] else 'no'} | {r['vs_reliability']} the "
                     f"lower split-half tau |")
        L.append("")
    return L


def write_report(out, measurement: Measurement, allocation: Mapping, summary: Mapping) -> Path:
    out = Path(out)
    m, A = measurement, allocation
    mix, sens = m.mixture, m.sensitivity
    cfg = summary["config"]
    units = list(m.units)
    L = []
    kind = cfg.get("budget", "storage")
    L.append(f"# tasa report: {summary['model']} at {cfg['bits']} average {kind} bits\n")
    L.append(f"- model: {summary['model_note']}")
    L.append(f"- date: {summary['date']}; machine: {summary['machine']['platform']}, "
             f"{summary['machine']['cpus']} CPUs, torch {summary['machine']['torch']}, "
             f"tasa CPU ISA {summary['machine']['tasa_cpu_isa']}")
    L.append(f"- data: {'slices shipped with tasa' if cfg['data'] is None else cfg['data']}; "
             f"split sizes {m.data}")
    L.append(f"- total wall time {summary['timings_s']['total']:.0f} s, peak RSS "
             f"{summary['peak_rss_mib']:.0f} MiB; stages (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items() if k != "total"))
    L.append("")
    L.append("## Result\n")
    L.append("| | average bits (exact storage cost) | average code bits (paper's count) | "
             "WikiText-2 ppl |")
    L.append("|---|---|---|---|")
    pp = summary.get("ppl_protocol") or {}
    L.append(f"| reference (full precision) | 32 | 32 | {_fmt(summary['ppl_reference'], 3)} |")
    L.append(f"| tasa ({cfg['method']}, budget {cfg['bits']} {kind} bits) | "
             f"{summary['avg_bits']:.4f} | {A['summary']['code_avg_bits']:.4f} | "
             f"{_fmt(summary['ppl_quantized'], 3)} |")
    if pp:
        L.append(f"\nPerplexity: {pp['text']}, first {pp['windows']} windows of {pp['seqlen']} "
                 f"tokens ({pp['tokens']} scored tokens) -- a quick check, not a paper number.")
    L.append("\nWidths: " + ", ".join(f"{b}-bit {100 * f:.1f}% of weights"
                                      for b, f in A["summary"]["width_fraction"].items()) + ".")
    emb = summary.get("embedding")
    L.append("Token embedding and output projection: " + (
        f"`{emb['module']}`{' (tied to `' + emb['head'] + '`: one packed table)' if emb['tied'] else ''}"
        f" RTN {emb['bits']}-bit, {emb['avg_bits']:.4f} average bits (not in the decoder "
        f"average above)" if emb else "as the checkpoint stores them (`--embed-bits 0`)") + ".")
    size = summary.get("size")
    if size:
        L.append("\n**Whole model file** (every parameter counted, as llama.cpp reports a GGUF): "
                 f"**{size['file_bytes'] / 1e6:.1f} MB, {size['bits_per_param']:.2f} bits per "
                 f"parameter** over {size['params'] / 1e6:.1f}M parameters.\n")
        L.append("| part | MB | parameters (M) | bits per parameter |")
        L.append("|---|---|---|---|")
        for name, p in size["parts"].items():
            if p["params"]:
                L.append(f"| {name} | {p['bytes'] / 1e6:.2f} | {p['params'] / 1e6:.2f} | "
                         f"{p['bits_per_param']:.3f} |")
    L.append("")
    L.append("## 1. Calibration mixture\n")
    L.append("Criterion f(alpha) = sum_l w_l tr(H_test,l (alpha H_gen,l + (1-alpha) H_task,l + "
             "lam_l I)^-1), closed form from one generalized eigendecomposition per unique "
             f"linear input; normalization `{mix.curve['normalize']}`. Tokens: {mix.tokens}.\n")
    L.append("| alpha | f(alpha) / f(alpha*) |")
    L.append("|---|---|")
    for r in mix.table:
        tag = " **(alpha\\*)**" if r.get("argmin") else ""
        L.append(f"| {r['alpha']:.3f}{tag} | {r['f_rel']:.5f} |")
    la = np.array(list(mix.layer_alpha.values()))
    L.append(f"\nalpha* = **{mix.alpha_star:.3f}** "
             f"({'searched' if mix.alpha_searched else 'given'}); best grid point "
             f"{mix.best_on_grid}. Per-layer minimisers: median {np.median(la):.2f}, "
             f"range [{la.min():.2f}, {la.max():.2f}]. "
             f"GPTQ calibration used: {summary['quantization'].get('calibration')}.\n")
    L.append("![alpha curve](alpha_curve.png)\n")
    L.append("## 2. Sensitivity and the perplexity illusion\n")
    widths = sens.widths
    L.append(f"RTN probe of one {cfg['granularity']} at a time at {widths} bits "
             f"({sens.compute_dtype or 'float32'} compute); loss increase "
             "in nats per scored token. Objectives: "
             + "; ".join(f"`{o['name']}`: {o['description']} ({o['scored_tokens']} scored tokens)"
                         for o in sens.objective_data) + ".")
    L.append("Baseline losses: " + ", ".join(f"{k} {v:.4f}" for k, v in sens.base.items())
             + f"; {sens.seconds:.0f} s.\n")
    if sens.illusion:
        L.append("| a | b | Kendall tau-b | Spearman rho | top-k overlap |")
        L.append("|---|---|---|---|---|")
        for r in sens.illusion:
            L.append(f"| {r['a']} | {r['b']} | {r['kendall_tau']:.3f} | {r['spearman_rho']:.3f} | "
                     f"{r['top_k_overlap']:.2f} (k={r['k']}) |")
        L.append("")
    L.extend(noise_lines(sens))
    objs = sens.objectives
    cols = [(b, o) for b in widths for o in objs]
    L.append("| unit | " + " | ".join(f"d{o}@{b}" for b, o in cols) + " | aggregate s | bits |")
    L.append("|---|" + "---|" * (len(cols) + 2))
    for u in units:
        L.append(f"| {_short(u)} | " + " | ".join(f"{sens.deltas(b)[u][o]:+.4f}" for b, o in cols)
                 + f" | {A['scores'][u]:.4f} | {A['item_bits'][u]} |")
    L.append(f"\nAggregate s = beta norm(s_ppl) + (1 - beta) mean_k norm(s_k), beta = "
             f"{cfg['beta']}, norm = clip at 0 and divide by the sum."
             + (f" Left out (no probe increased their loss): {A['dropped_objectives']}."
                if A.get("dropped_objectives") else "") + "\n")
    L.append("![sensitivity](sensitivity.png)\n")
    L.append("## 3. Allocation\n")
    la_ = A["layer_allocation"]
    L.append(f"Multiple-choice knapsack over widths {A['widths']} per {cfg['granularity']} "
             f"(exact DP: {la_['exact']}) on the measured loss increases at {widths} bits "
             f"(other widths from the nearest lower probe by the 4^-b noise model; errors made "
             f"non-increasing in the width), budget {A['budget_bits']} {kind} bits = "
             f"{cfg['bits']} x {A['summary']['n_weights']} weights; plan cost "
             f"{A['summary']['cost_bits']} bits = {A['summary']['avg_bits']:.5f} average storage "
             f"bits, {A['summary']['code_avg_bits']:.5f} average code bits. Intra-layer group "
             f"step: {'on' if A['intra'] else 'off'}.\n")
    changed = sum(1 for f, e in A["plan"].items() if len(set(e["bits"])) > 1)
    L.append(f"Linears with mixed group widths after the intra-layer step: {changed} of "
             f"{len(A['plan'])}.\n")
    L.append("![bit map](bitmap.png)\n")
    md = out / "report.md"
    atomic_write_bytes(md, ("\n".join(L) + "\n").encode())
    plot_alpha_curve(m, out / "alpha_curve.png")
    plot_sensitivity(m, A["scores"], out / "sensitivity.png")
    plot_bitmap(m, A["plan"], out / "bitmap.png")
    return md
