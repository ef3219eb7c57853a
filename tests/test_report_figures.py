"""tasa.report: figures a person reads at a glance, and the quality change in words. The
sensitivity figure names units as the table does and has one series per probed width; the bit
map gives every width its own distinct colour and legend entry (8-bit groups inside a mostly
3-bit linear stay visible); the report warns when perplexity nearly triples, stays calm for a
5% rise, and says "not measured" for numbers a run does not have."""
import math

import numpy as np
import pytest

from tasa import pipeline, report
from tasa.measurement import MEASUREMENT_KIND, MEASUREMENT_VERSION, Measurement

KINDS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
         "mlp": ["gate_proj", "up_proj", "down_proj"]}


def sublayer_measurement(n_layers=4, widths=(3, 4), group_size=32, seed=0) -> Measurement:
    """A complete measurement of a ``n_layers``-block model at sublayer granularity, unit and
    linear names as :func:`tasa.sensitivity.sublayer_units` gives them
    (``model.layers.{i}.mlp``), deltas at every probe width shrinking about 4x per bit."""
    rng = np.random.default_rng(seed)
    linears, units = {}, {}
    for i in range(n_layers):
        for sub, kinds in KINDS.items():
            fs = [f"model.layers.{i}.{sub}.{k}" for k in kinds]
            units[f"model.layers.{i}.{sub}"] = {"block": i, "linears": fs}
            for f in fs:
                linears[f] = {"n_out": 64, "k_in": 64, "group_size": group_size, "mode": "asym"}
    objs = ["ppl", "math"]
    base = {u: {k: float(rng.uniform(0.01, 1.0)) for k in objs} for u in units}
    base[next(iter(units))]["math"] = -0.002          # probe noise: a negative increase
    delta = {str(b): {u: {k: v * 4.0 ** -(b - widths[0]) for k, v in d.items()}
                      for u, d in base.items()} for b in widths}
    n_groups = 64 // group_size
    ew = [2, 3, 4, 8]
    doc = {"kind": MEASUREMENT_KIND, "version": MEASUREMENT_VERSION,
           "config": {"model": "tiny", "seed": 0, "sens_bits": widths[0],
                      "granularity": "sublayer"},
           "format_version": 1, "created": "2026-01-01 00:00 UTC",
           "linears": linears, "units": units, "data": {"gen_calib": 3},
           "mixture": {"alpha_star": 0.4, "f_star": 1.5, "alpha_searched": True,
                       "best_on_grid": 0.5, "table": [{"alpha": 0.0, "f": 2.0, "f_rel": 1.3}],
                       "curve": {"kind": "tasa.MixtureCurve", "version": 1,
                                 "normalize": "oracle", "percdamp": 0.01,
                                 "layers": {"x": {"weight": 1.0, "lam": 0.0, "d": [1.0, 2.0],
                                                  "mu": [-0.5, 1.0]}}},
                       "layer_alpha": {f: 0.4 for f in linears},
                       "shared_inputs": {}, "group_error_widths": ew,
                       "group_errors": {f: [[4.0 ** -b * (1 + g) for b in ew]
                                            for g in range(n_groups)] for f in linears},
                       "tokens": {"gen": 10}, "seconds": 1.0},
           "sensitivity": {"objectives": objs, "objective_data": [], "bits": widths[0],
                           "delta": delta[str(widths[0])],
                           "delta_by_width": {b: d for b, d in delta.items()
                                              if b != str(widths[0])},
                           "seconds": 2.0, "base": {"ppl": 3.0, "math": 2.0},
                           "illusion": [], "complete": True}}
    return Measurement.from_dict(doc)


def mixed_plan(m: Measurement) -> dict:
    """Every linear at 3 bits, except: each attention's ``o_proj`` at 4 bits, and one group of
    every ``down_proj`` at 8 (the few 8-bit groups a mean-colour map hid)."""
    plan = {}
    for f, v in m.linears.items():
        n = v["k_in"] // v["group_size"]
        b = [4] * n if f.endswith("o_proj") else [3] * n
        if f.endswith("down_proj"):
            b[0] = 8
        plan[f] = {"bits": b, "group_size": v["group_size"]}
    return plan


def legend_texts(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


# ---- the sensitivity figure --------------------------------------------------------------------

def test_sensitivity_figure_names_units_and_has_one_series_per_width():
    m = sublayer_measurement(n_layers=4, widths=(2, 3, 4, 8))
    scores = {u: 1.0 / len(m.units) for u in m.units}
    fig = report.sensitivity_figure(m, scores)
    axes = fig.get_axes()
    assert len(axes) == 3                                  # ppl, math, aggregate
    for ax in axes[:2]:
        assert legend_texts(ax) == ["2 bits", "3 bits", "4 bits", "8 bits"]
    ticks = [t.get_text() for t in axes[-1].get_xticklabels()]
    assert ticks == [f"{i}.{s}" for i in range(4) for s in KINDS]     # names, as in the table
    assert "0.self_attn" in ticks and "3.mlp" in ticks
    # 4^-b across 2..8 bits spans decades; a negative math delta forces symlog, not log
    assert axes[0].get_yscale() == "log"
    assert axes[1].get_yscale() == "symlog"
    report._plt().close(fig)


def test_sensitivity_figure_thins_many_names_but_keeps_names(tmp_path):
    m = sublayer_measurement(n_layers=60)                 # 120 units
    fig = report.sensitivity_figure(m, None)
    ticks = [t.get_text() for t in fig.get_axes()[-1].get_xticklabels()]
    assert 0 < len(ticks) <= report.MAX_UNIT_LABELS
    assert ticks[0] == "0.self_attn" and all(not t.isdigit() for t in ticks)
    report._plt().close(fig)
    p = report.plot_sensitivity(m, {u: 0.0 for u in m.units}, tmp_path / "s.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_figure_leaves_an_unmeasured_width_out_and_keeps_the_file():
    m = sublayer_measurement(widths=(3, 4))
    m.sensitivity.delta_by_width = {}                     # an older file: 3-bit probes only
    fig = report.sensitivity_figure(m, None)
    assert legend_texts(fig.get_axes()[0]) == ["3 bits"]
    assert m.sensitivity.delta_by_width == {}             # drawing added no empty width
    report._plt().close(fig)


def test_short_names_match_the_table():
    assert report._short("model.layers.29.mlp") == "29.mlp"
    assert report._short("model.layers.0") == "layers.0"
    assert report._short("model.layers.3.mlp.down_proj") == "3.mlp.down_proj"
    assert report._short("b0.q") == "b0.q"


# ---- the bit map --------------------------------------------------------------------------------

def test_bitmap_has_a_distinct_colour_and_legend_entry_per_width(tmp_path):
    from matplotlib.colors import to_rgb

    m = sublayer_measurement(n_layers=3)
    fig = report.bitmap_figure(m, mixed_plan(m))
    ax = fig.get_axes()[0]
    texts = legend_texts(ax)
    assert [t.split(" (")[0] for t in texts] == ["3 bits", "4 bits", "8 bits"]
    assert all("% of weights" in t for t in texts)
    # the three colours are far apart (not two shades of one blue)
    cols = [np.array(to_rgb(report.width_colour(b))) for b in (3, 4, 8)]
    assert min(np.abs(a - b).sum() for i, a in enumerate(cols) for b in cols[i + 1:]) > 0.5
    handles = ax.get_legend().legend_handles
    assert [to_rgb(h.get_facecolor()) for h in handles] == [tuple(c) for c in cols]
    # 8-bit groups are drawn: the image holds the 8-bit index in every down_proj cell
    img = ax.get_images()[0].get_array()
    R = report._BITMAP_SLICES
    kinds = [t.get_text() for t in ax.get_xticklabels()]
    dj = kinds.index("down_proj")
    assert (np.asarray(img[:, dj * R:(dj + 1) * R]) == 2).any(axis=1)[1::2].all()   # mlp rows
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["0.self_attn", "0.mlp"]
    report._plt().close(fig)
    p = report.plot_bitmap(m, mixed_plan(m), tmp_path / "b.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_rare_width_still_gets_a_slice():
    sl = report._slices({3: 999, 8: 1}, report._BITMAP_SLICES)
    assert len(sl) == report._BITMAP_SLICES and sl.count(8) == 1 and sl == sorted(sl)


# ---- the quality paragraph ---------------------------------------------------------------------

def test_tripled_perplexity_warns_with_the_numbers():
    L = report.quality_lines({"ppl_reference": 24.1, "ppl_quantized": 67.9}, 3.5, [3, 4, 8])
    text = "\n".join(L)
    assert L[0].startswith("**Warning:**")
    assert "2.8x" in text and "24.1 -> 67.9" in text and "--bits than 3.5" in text


def test_a_five_percent_rise_is_calm():
    text = "\n".join(report.quality_lines({"ppl_reference": 20.0, "ppl_quantized": 21.0}, 4.0))
    assert "Warning" not in text and "+5.0%" in text and "close to the reference" in text


def test_threshold_is_where_the_constant_says():
    r = report.PPL_RATIO_LARGE
    below = report.quality_lines({"ppl_reference": 10.0, "ppl_quantized": 10.0 * r * 0.99})
    above = report.quality_lines({"ppl_reference": 10.0, "ppl_quantized": 10.0 * r * 1.01})
    assert not any("Warning" in x for x in below) and above[0].startswith("**Warning:**")


def test_missing_numbers_are_not_measured_never_invented():
    text = "\n".join(report.quality_lines({"ppl_reference": None, "ppl_quantized": None}))
    assert "not measured" in text and "perplexity" in text and "KL" in text
    assert not any(c.isdigit() for c in text)             # no number from nowhere
    one = "\n".join(report.quality_lines({"ppl_reference": None, "ppl_quantized": 30.0}))
    assert "Only the quantized perplexity" in one and "unknown" in one


def test_kl_and_task_nll_are_reported_and_judged():
    big = report.quality_lines({"ppl_reference": 20.0, "ppl_quantized": 21.0, "kl": 0.9,
                                "task_nll": {"gsm8k": {"reference": 1.0, "quantized": 1.6}}})
    warns = [x for x in big if x.startswith("**Warning:**")]
    assert len(warns) == 2 and "KL" in warns[0] and "gsm8k" in warns[1]
    calm = "\n".join(report.quality_lines({"ppl_reference": 20.0, "ppl_quantized": 20.4,
                                           "kl": 0.02, "task_nll": {"gsm8k": {
                                               "reference": 1.0, "quantized": 1.05}}}))
    assert "Warning" not in calm and "0.0200 nats" in calm and "+0.050" in calm
    assert "not measured" not in calm
    assert report.NLL_DELTA_LARGE == pytest.approx(math.log(report.PPL_RATIO_LARGE))


def test_non_finite_perplexity_warns():
    L = report.quality_lines({"ppl_reference": 20.0, "ppl_quantized": float("inf")})
    assert L[0].startswith("**Warning:**") and "not a finite" in L[0]


# ---- the whole report --------------------------------------------------------------------------

def run_summary(ppl_ref, ppl_q, bits=4.5):
    """The keys :func:`tasa.report.write_report` reads from the run summary, as
    :func:`tasa.pipeline.run` builds it."""
    return {"model": "tiny", "model_note": "tiny test model",
            "config": {"bits": bits, "budget": "storage", "data": None, "method": "gptq",
                       "granularity": "sublayer", "beta": 0.5},
            "date": "2026-01-01 00:00 UTC",
            "machine": {"platform": "test", "cpus": 2, "torch": "x", "tasa_cpu_isa": "scalar"},
            "timings_s": {"measure": 1.0, "total": 2.0}, "peak_rss_mib": 10.0,
            "avg_bits": bits, "embedding": None, "size": None,
            "ppl_reference": ppl_ref, "ppl_quantized": ppl_q, "ppl_protocol": None,
            "quantization": {"calibration": "general"}}


def test_write_report_warns_and_draws(tmp_path):
    m = sublayer_measurement(n_layers=3)
    A = pipeline.allocate(m, 4.5)
    md = report.write_report(tmp_path, m, A, run_summary(24.1, 67.9))
    text = md.read_text()
    result = text.split("## Result")[1]
    assert result.lstrip().startswith("**Warning:** perplexity rose 2.8x (24.1 -> 67.9)")
    assert "| 0.mlp |" in text                              # the table's names = the figure's
    for f in ("alpha_curve.png", "sensitivity.png", "bitmap.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"


def test_write_report_without_perplexity_says_not_measured(tmp_path):
    m = sublayer_measurement(n_layers=2)
    A = pipeline.allocate(m, 4.5)
    text = report.write_report(tmp_path, m, A, run_summary(None, None)).read_text()
    assert "Warning" not in text and "was not measured in this run" in text


def test_write_report_says_how_widths_not_probed_were_filled(tmp_path):
    """One probe width: with the measurement's per-unit quantizer errors the report names the
    error ratio, without them the noise model (it said 'noise model' for both)."""
    m = sublayer_measurement(n_layers=2, widths=(3,))
    text = report.write_report(tmp_path, m, pipeline.allocate(m, 4.5),
                               run_summary(None, None)).read_text()
    alloc = text.split("## 3. Allocation")[1]
    assert "by the 4^-b noise model;" in alloc and "quantizer-error ratio" not in alloc
    rng = np.random.default_rng(0)
    m.sensitivity.unit_error = {str(b): {u: float(rng.uniform(1, 2) * 4.0 ** -b) for u in m.units}
                                for b in (3, 4)}
    text = report.write_report(tmp_path, m, pipeline.allocate(m, 4.5),
                               run_summary(None, None)).read_text()
    assert "quantizer-error ratio at [3, 4] bits" in text.split("## 3. Allocation")[1]
