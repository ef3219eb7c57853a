"""The report of a ``tasa quantize`` run: ``report.md`` plus PNG plots (alpha curve, per-unit
sensitivities at every probed width, bit map). Plots need matplotlib (a dependency of tasa); the
markdown is written first, so a plotting failure never loses the numbers.

The figures are meant to be read at a glance: units are named as in the report's table
(``29.mlp``, never an index), every probed width gets its own series, and the bit map uses one
fixed, distinct colour per width with a legend (a continuous scale made 3 and 4 bits two
near-identical blues and hid the few 8-bit groups). The quality paragraph says in words how far
the quantized model moved from the reference, and warns when the move is large."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np

from .measurement import Measurement
from .mixture import MixtureCurve
from .scoring import error_shape
from .util import atomic_write_bytes

__all__ = ["write_report", "plot_alpha_curve", "plot_sensitivity", "plot_bitmap",
           "sensitivity_figure", "bitmap_figure", "quality_lines", "width_colour",
           "PPL_RATIO_SMALL", "PPL_RATIO_LARGE", "KL_LARGE", "NLL_DELTA_LARGE"]

# ---- quality thresholds ------------------------------------------------------------------------
# Perplexity ratio (quantized / reference) up to which the report calls the change small: the
# quick WikiText-2 check scores a few windows, and good 4-bit quantizations of small models cost
# a few percent, so a rise within 10% is what a usable quantization pays.
PPL_RATIO_SMALL = 1.10
# Above this ratio the report prints a warning: +50% perplexity is far past what any usable
# 3-4 bit quantization of these models costs (5-30%), and is where generations visibly degrade
# (a user saw 24 -> 68, 2.8x, with no word about it).
PPL_RATIO_LARGE = 1.5
# The same scale in nats per token: a mean NLL rise of ln 1.5 on a task's gold answers is a 1.5x
# perplexity on that text, so task NLL deltas above it get the same warning.
NLL_DELTA_LARGE = math.log(PPL_RATIO_LARGE)
# Mean next-token KL(reference || quantized) above which the report warns. Same ln 1.5 scale
# (0.405 nats per token); defaults.py records 0.2-1.2 for 3.5-bit decoders of small models, so
# the upper half of that range is flagged as large.
KL_LARGE = math.log(PPL_RATIO_LARGE)

# ---- figure settings ---------------------------------------------------------------------------
# One fixed colour per width, the same in every figure (the sensitivity series use them too):
# neighbouring widths get colours of different hue, not shades of one, so 3 and 4 bits never
# look alike and the rare 8-bit groups stand out.
WIDTH_COLOURS = {1: "#000000", 2: "#7b3294", 3: "#e6550d", 4: "#2166ac", 5: "#17becf",
                 6: "#bcbd22", 7: "#8c564b", 8: "#1a9850", 16: "#969696", 32: "#cccccc"}
# colours for widths outside the table above (cycled; still distinct from the table's)
_EXTRA_COLOURS = ("#e7298a", "#66a61e", "#a6761d", "#fdbf6f", "#6a3d9a")
# at most this many unit names on an axis; beyond it every k-th name is shown (names stay names:
# the labels are thinned, never replaced by indices)
MAX_UNIT_LABELS = 64
# a sensitivity panel switches to a log (or symlog, when zeros/negatives are present) y axis when
# its nonzero magnitudes span at least this factor (two decades): on a linear axis the small
# units of such a profile all sit on the zero line
LOG_SPAN = 100.0
# sub-cells per bit-map cell: a linear's groups are drawn as slices proportional to the share at
# each width (every width present gets at least one slice, so a few 8-bit groups stay visible)
_BITMAP_SLICES = 24


def width_colour(bits: int) -> str:
    """The fixed colour of a code width in every figure of the report."""
    b = int(bits)
    if b in WIDTH_COLOURS:
        return WIDTH_COLOURS[b]
    return _EXTRA_COLOURS[b % len(_EXTRA_COLOURS)]


def _short(name: str) -> str:
    """A unit's name without the model's module prefix, as the report's table prints it: from
    the layer index on (``model.layers.29.mlp`` -> ``29.mlp``,
    ``model.layers.3.mlp.down_proj`` -> ``3.mlp.down_proj``), or ``layers.0`` for a whole
    block (a bare ``0`` reads as a count). Names without an index keep their last two parts."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            if i == len(parts) - 1 and i > 0:
                return ".".join(parts[i - 1:])
            return ".".join(parts[i:])
    return ".".join(parts[-2:]) if len(parts) > 2 else name


def _short_names(units: Sequence[str]) -> List[str]:
    """:func:`_short` of every unit, or the full names where shortening would make two alike
    (a label that names two units is worse than a long one)."""
    short = [_short(u) for u in units]
    return short if len(set(short)) == len(short) else list(units)


def _fmt(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _num(x: float) -> str:
    """A perplexity-like number for prose: one decimal from 10 up, three below."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}"


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


def _label_units(ax, axis: str, names: Sequence[str], fontsize: float = 6) -> None:
    """Ticks named by unit on ``axis`` ("x" or "y"), every k-th name when there are more than
    :data:`MAX_UNIT_LABELS`."""
    step = max(1, math.ceil(len(names) / MAX_UNIT_LABELS))
    pos = list(range(0, len(names), step))
    labels = [names[i] for i in pos]
    if axis == "x":
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    else:
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=fontsize)


def _y_scale(ax, values) -> str:
    """Log y axis when the panel's nonzero magnitudes span :data:`LOG_SPAN` or more: ``log``
    when every value is positive, else ``symlog`` (linear near zero, so zero and the negative
    increases that probe noise gives stay on the plot). Returns the scale chosen."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    mag = np.abs(v[v != 0])
    if mag.size < 2 or mag.max() / mag.min() < LOG_SPAN:
        return "linear"
    if (v > 0).all():
        ax.set_yscale("log")
        return "log"
    # the linear region: the small end of the magnitudes, but never below 1e-4 of the largest
    # (else the symlog axis spends most of its height on noise-sized values)
    ax.set_yscale("symlog", linthresh=float(max(np.percentile(mag, 10), mag.max() * 1e-4)))
    return "symlog"


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


def _width_deltas(sens, bits: int) -> Mapping:
    """``{unit: {objective: delta}}`` at ``bits`` without :meth:`SensitivityResult.deltas`'s
    ``setdefault`` (drawing must not add an empty width to the measurement)."""
    if int(bits) == int(sens.bits):
        return sens.delta
    return sens.delta_by_width.get(str(int(bits)), {})


def sensitivity_figure(measurement: Measurement, scores: Optional[Mapping[str, float]] = None):
    """The sensitivity figure as a matplotlib Figure: one panel per objective with one series
    per probed width (legend ``3 bits``, ``4 bits``, ...; loss increase in nats per scored
    token, as the table), and, given ``scores``, a last panel with the allocation's aggregate
    score. The x axis names the units as the table does. Units not yet probed at a width are
    gaps, not zeros."""
    plt = _plt()
    sens = measurement.sensitivity
    units = list(measurement.units)
    names = _short_names(units)
    x = np.arange(len(units))
    objs = list(sens.objectives)
    panels = objs + (["aggregate"] if scores is not None else [])
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(max(8.0, min(18.0, 2.0 + 0.16 * len(units))),
                                      1.6 + 2.2 * len(panels)))
    axes = axes[:, 0]
    gran = measurement.config.get("granularity", "block")
    for ax, k in zip(axes, objs):
        shown = []
        for b in sens.widths:
            d = _width_deltas(sens, b)
            v = np.array([d.get(u, {}).get(k, np.nan) for u in units], dtype=float)
            if not np.isfinite(v).any():
                continue                   # nothing measured at this width yet
            ax.plot(x, v, marker="o", ms=3, lw=1, color=width_colour(b), label=f"{b} bits")
            shown.append(v)
        scale = _y_scale(ax, np.concatenate(shown)) if shown else "linear"
        if scale != "log":                # a zero line on a log axis would stretch it to 1e-15
            ax.axhline(0, color="0.6", lw=0.6)
        if shown:
            ax.legend(fontsize=7, title="probe width", title_fontsize=7)
        ax.set_ylabel(f"{k}: loss increase\n(nats / token)", fontsize=8)
        ax.grid(axis="x", color="0.92", lw=0.5)
    if scores is not None:
        ax = axes[-1]
        ax.plot(x, [scores.get(u, np.nan) for u in units], "k.-", lw=1,
                label="aggregate s (the allocation's score)")
        ax.set_ylabel("aggregate s", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(axis="x", color="0.92", lw=0.5)
    _label_units(axes[-1], "x", names)
    axes[-1].set_xlabel(f"unit ({gran}, in model order)")
    probe = ((measurement.config or {}).get("sens_method") or "rtn").upper()
    if (measurement.config or {}).get("hadamard"):
        probe += " (rotated)"
    axes[0].set_title(f"Per-unit sensitivity: {probe} probe of one {gran} at a time, at "
                      f"{', '.join(str(b) for b in sens.widths)} bits")
    return fig


def plot_sensitivity(measurement: Measurement, scores: Mapping[str, float], path) -> Path:
    """Writes :func:`sensitivity_figure` to ``path`` (PNG)."""
    return _save(sensitivity_figure(measurement, scores), path)


def _slices(counts: Mapping[int, float], n: int) -> List[int]:
    """``n`` slice widths (code widths, ascending) in proportion to ``counts``; every width
    with a nonzero count gets at least one slice."""
    ws = sorted(b for b, c in counts.items() if c > 0)
    tot = float(sum(counts[b] for b in ws))
    k = {b: max(1, int(round(n * counts[b] / tot))) for b in ws}
    while sum(k.values()) != n:           # give or take from the widest share
        big = max(ws, key=lambda b: k[b])
        k[big] += 1 if sum(k.values()) < n else -1
    return [b for b in ws for _ in range(k[b])]


def bitmap_figure(measurement: Measurement, plan: Mapping[str, Mapping]):
    """The bit map as a matplotlib Figure: one row per unit (named as in the table), one column
    per linear kind (``q_proj``, ``down_proj``, ...). Each cell is split in proportion to the
    weights of the linear stored at each width, narrowest first (the order of the groups inside
    the linear is not shown); every width present gets a visible slice. One discrete colour
    per width (:func:`width_colour`) and a legend entry per width present, with its share of
    the drawn weights."""
    plt = _plt()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    units = measurement.units
    rows = list(units)
    kinds = []
    for u in rows:
        for f in units[u]["linears"]:
            k = f.split(".")[-1]
            if k not in kinds:
                kinds.append(k)
    R = _BITMAP_SLICES
    cells = {}
    share = {}                            # weights (or groups) at each width, over the map
    weighted = all("n_out" in measurement.linears.get(f, {})
                   for u in rows for f in units[u]["linears"] if f in plan)
    for i, u in enumerate(rows):
        for f in units[u]["linears"]:
            if f not in plan:
                continue
            e = plan[f]
            per_group = (int(e.get("group_size", 1)) * int(measurement.linears[f]["n_out"])
                         if weighted else 1)
            counts = {}
            for b in e["bits"]:
                counts[int(b)] = counts.get(int(b), 0) + per_group
            for b, c in counts.items():
                share[b] = share.get(b, 0) + c
            cells[i, kinds.index(f.split(".")[-1])] = _slices(counts, R)
    present = sorted(share)
    M = np.full((len(rows), len(kinds) * R), np.nan)
    for (i, j), sl in cells.items():
        M[i, j * R:(j + 1) * R] = [present.index(b) for b in sl]
    # white: a kind this unit does not have (an attention unit has no down_proj)
    cmap = ListedColormap([width_colour(b) for b in present] or ["#ffffff"]).with_extremes(
        bad="white")
    norm = BoundaryNorm(np.arange(len(present) + 1) - 0.5, max(1, len(present)))
    fig, ax = plt.subplots(figsize=(2.6 + 0.9 * len(kinds), 1.0 + 0.2 * len(rows)))
    ax.imshow(M, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
              extent=(-0.5, len(kinds) - 0.5, len(rows) - 0.5, -0.5))
    for j in range(1, len(kinds)):        # cell borders: slices of two linears never merge
        ax.axvline(j - 0.5, color="white", lw=1.5)
    for i in range(1, len(rows)):
        ax.axhline(i - 0.5, color="white", lw=0.5)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=45, ha="right", fontsize=8)
    _label_units(ax, "y", _short_names(rows))
    tot = float(sum(share.values())) or 1.0
    what = "weights" if weighted else "groups"
    ax.legend(handles=[Patch(facecolor=width_colour(b), edgecolor="0.3",
                             label=f"{b} bits ({100 * share[b] / tot:.1f}% of {what})")
                       for b in present],
              title="code width", fontsize=7, title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title("Bit map (each cell split by its weights' widths)", fontsize=9)
    return fig


def plot_bitmap(measurement: Measurement, plan: Mapping[str, Mapping], path) -> Path:
    """Writes :func:`bitmap_figure` to ``path`` (PNG)."""
    return _save(bitmap_figure(measurement, plan), path)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def quality_lines(summary: Mapping, bits=None, widths: Optional[Sequence[int]] = None,
                  flag: str = "--bits") -> list:
    """How far the quantized model moved from the reference, in words (report lines).

    Reads ``summary["ppl_reference"]`` / ``["ppl_quantized"]`` (the quick WikiText-2 check) and,
    where a run records them, ``summary["kl"]`` (mean next-token KL(reference || quantized),
    nats per token) and ``summary["task_nll"]`` (``{task: {"reference": nll, "quantized":
    nll}}``, mean gold NLL in nats per token). A number that is absent or None is said to be
    not measured -- never estimated. Changes past :data:`PPL_RATIO_LARGE`, :data:`KL_LARGE` or
    :data:`NLL_DELTA_LARGE` open with a ``**Warning:**`` line that suggests a higher budget
    (``bits``: this run's, given with ``flag``; ``widths``: its allowed widths)."""
    warn, says, missing = [], [], []
    advice = (f"try a higher {flag}" + (f" than {bits}" if bits is not None else "")
              + (", or leave 2 bits out of --widths" if widths and 2 in widths else ""))
    ref, q = summary.get("ppl_reference"), summary.get("ppl_quantized")
    if ref is None and q is None:
        missing.append("perplexity")
    elif ref is None or q is None:
        have, val = ("quantized", q) if ref is None else ("reference", ref)
        says.append(f"Only the {have} perplexity was measured ({_fmt(val, 3)}); without the "
                    f"{'reference' if ref is None else 'quantized'} one the change is unknown.")
    elif not (_finite(ref) and _finite(q)) or ref <= 0:
        warn.append(f"**Warning:** perplexity is not a finite number (reference {ref}, "
                    f"quantized {q}): the quantized model is broken at this budget; {advice}.")
    else:
        r = q / ref
        if r > PPL_RATIO_LARGE:
            warn.append(f"**Warning:** perplexity rose {r:.1f}x ({_num(ref)} -> {_num(q)}): the "
                        f"model lost much of its quality at this budget; {advice}.")
        elif r > PPL_RATIO_SMALL:
            says.append(f"Perplexity rose {100 * (r - 1):.0f}% ({_num(ref)} -> {_num(q)}): a "
                        f"noticeable loss; check the model on your own prompts before relying "
                        f"on it.")
        else:
            says.append(f"Perplexity changed {100 * (r - 1):+.1f}% ({_num(ref)} -> {_num(q)}): "
                        f"close to the reference.")
    kl = summary.get("kl")
    if kl is None:
        missing.append("KL divergence to the reference")
    elif not _finite(kl) or kl > KL_LARGE:
        warn.append(f"**Warning:** mean KL divergence to the reference is {kl:.3f} nats per "
                    f"token (large: above {KL_LARGE:.2f}); the quantized model's next-token "
                    f"distribution is far from the reference's; {advice}.")
    else:
        says.append(f"Mean KL divergence to the reference: {kl:.4f} nats per token"
                    + (" (small)." if kl <= KL_LARGE / 4 else " (moderate)."))
    tasks = summary.get("task_nll") or {}
    if not tasks:
        missing.append("task NLL")
    for name, t in tasks.items():
        a, b = (t or {}).get("reference"), (t or {}).get("quantized")
        if a is None or b is None:
            missing.append(f"{name} NLL ({'reference' if a is None else 'quantized'})")
            continue
        dl = b - a
        if not (_finite(a) and _finite(b)) or dl > NLL_DELTA_LARGE:
            warn.append(f"**Warning:** {name} NLL rose {dl:+.3f} nats per token ({a:.3f} -> "
                        f"{b:.3f}, {math.exp(dl) if _finite(dl) else float('inf'):.1f}x its "
                        f"perplexity): the task's answers lost much of their likelihood; "
                        f"{advice}.")
        else:
            says.append(f"{name} NLL {a:.3f} -> {b:.3f} nats per token ({dl:+.3f}).")
    L = list(warn)
    if warn:
        L.append("")
    if says:
        L.append(" ".join(says))
    if missing:
        L.append(("Not measured in this run: " if says or warn else
                  "How far the quantized model moved from the reference was not measured in "
                  "this run: no ") + ", ".join(missing) + ".")
    return L


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
    """Writes ``report.md`` (first, so the numbers survive a plotting failure) and the PNGs it
    shows into ``out``; returns the markdown's path. ``allocation``: the allocation document
    (plan, scores, summary); ``summary``: the run summary (``run.json``)."""
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
    # how far the model moved, in words, before any table: a large loss must not hide in a row
    L.extend(quality_lines(summary, cfg.get("bits"), A.get("widths"),
                           "--code-bits" if kind == "code" else "--bits"))
    L.append("")
    L.append("| | average bits (exact storage cost) | average code bits (paper's count) | "
             "WikiText-2 ppl |")
    L.append("|---|---|---|---|")
    pp = summary.get("ppl_protocol") or {}
    L.append(f"| reference (full precision) | 32 | 32 | {_fmt(summary['ppl_reference'], 3)} |")
    rot = ", rotated" if cfg.get("hadamard") else ""
    L.append(f"| tasa ({cfg['method']}{rot}, budget {cfg['bits']} {kind} bits) | "
             f"{summary['avg_bits']:.4f} | {A['summary']['code_avg_bits']:.4f} | "
             f"{_fmt(summary['ppl_quantized'], 3)} |")
    if pp:
        L.append(f"\nPerplexity: {pp['text']}, first {pp['windows']} windows of {pp['seqlen']} "
                 f"tokens ({pp['tokens']} scored tokens) -- a quick check, not a paper number.")
    drift = summary.get("drift")
    if drift:
        L.append("\nDrift from the reference, token by token (`tasa eval --kl` measures more "
                 "text):\n")
        L.append("| text | positions | KL (nats/token) | top-1 agreement | gold NLL reference -> "
                 "quantized | NLL change (paired) |")
        L.append("|---|---|---|---|---|---|")
        for text, d in drift.items():
            L.append(f"| {text} | {d['tokens']} | {d['kl']:.4f} +- {d['kl_ci']:.4f} | "
                     f"{100 * d['top1']:.1f}% +- {100 * d['top1_ci']:.1f} | "
                     f"{d['nll_reference']:.3f} -> {d['nll']:.3f} | "
                     f"{d['dnll']:+.3f} +- {d['dnll_ci']:.3f} |")
        if summary.get("drift_protocol"):
            L.append(f"\n{summary['drift_protocol']}.")
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
    L.append(f"{cfg.get('sens_method', 'rtn').upper()}"
             f"{' (rotated, --hadamard)' if cfg.get('hadamard') else ''} probe of one "
             f"{cfg['granularity']} at a time at {widths} bits "
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
    for u, name in zip(units, _short_names(units)):
        L.append(f"| {name} | " + " | ".join(f"{sens.deltas(b)[u][o]:+.4f}" for b, o in cols)
                 + f" | {A['scores'][u]:.4f} | {A['item_bits'][u]} |")
    L.append(f"\nAggregate s = beta norm(s_ppl) + (1 - beta) mean_k norm(s_k), beta = "
             f"{cfg['beta']}, norm = clip at 0 and divide by the sum."
             + (f" Left out (no probe increased their loss): {A['dropped_objectives']}."
                if A.get("dropped_objectives") else "") + "\n")
    L.append("![sensitivity](sensitivity.png)\n")
    L.append("## 3. Allocation\n")
    la_ = A["layer_allocation"]
    shaped = sorted(error_shape(sens, list(m.units)))
    carried = (f"times each unit's own quantizer-error ratio at {shaped} bits, by the 4^-b "
               f"noise model elsewhere" if len(shaped) > 1 else "by the 4^-b noise model")
    L.append(f"Multiple-choice knapsack over widths {A['widths']} per {cfg['granularity']} "
             f"(exact DP: {la_['exact']}) on the measured loss increases at {widths} bits "
             f"(other widths from the nearest lower one {carried}; errors made "
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
