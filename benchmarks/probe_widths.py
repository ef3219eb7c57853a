"""One probe width or two: do the 4-bit probes earn their time (issue 27; the README job's
probes are 16 of its 19 minutes on the AVX2 EPYC, half of them at 4 bits)?

    python benchmarks/probe_widths.py --measurement tasa-out/measurement.json --out one/measurement.json

From a complete measurement probed at 3 and 4 bits it writes the same measurement with the
3-bit probes only (``sens_widths [3]``: the 4-bit probes dropped, nothing else changed), adding
to both each unit's quantizer error at 3 and 4 bits (``sensitivity.unit_error``, from the probe
weights' pass: :func:`tasa.pipeline.stages.probe_weights`) where the file lacks it. The one-width
file's 4-bit errors are then its 3-bit probes carried by each unit's own error ratio
(:func:`tasa.scoring.unit_errors`). Printed: how the carried 4-bit errors rank against the
measured ones, and the split-half reliability of the 3-bit and 4-bit probes' aggregate. The
quality of the two plans is measured with the CLI on the two files (see
``benchmarks/results/probe_widths_<model>.md``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def config_from(fp: dict):
    """The PipelineConfig of a measurement's fingerprint. A fingerprint leaves out the settings
    at their first values (defaults.FINGERPRINT_ABSENT: an RTN-probed file has no sens_method),
    so those come back first; else such a file would get today's default probe quantizer."""
    from tasa import defaults
    from tasa.pipeline import PipelineConfig
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v
          for k, v in {**defaults.FINGERPRINT_ABSENT, **fp}.items() if k in names}
    return PipelineConfig(**kw)


def aggregate_reliability(sens, names, b, beta, n_splits=200, seed=0):
    """Median split-half Kendall tau of the beta-aggregate the knapsack reads: each objective's
    items split at random into two halves, each half's clipped per-unit profile aggregated."""
    from tasa import stats
    rng = np.random.default_rng(seed)
    d = sens.item_delta[str(b)]
    X = {k: np.array([d[u][k] for u in names], dtype=np.float64) for k in sens.objectives}
    t = {k: np.asarray(sens.item_tokens[k], dtype=np.float64) for k in sens.objectives}
    tasks = [k for k in sens.objectives if k != "ppl"]
    taus = []
    for _ in range(n_splits):
        agg = [{}, {}]
        for k in sens.objectives:
            perm = rng.permutation(X[k].shape[1])
            for h, idx in enumerate((perm[: len(perm) // 2], perm[len(perm) // 2:])):
                agg[h][k] = np.maximum(X[k][:, idx].sum(1) / t[k][idx].sum(), 0.0)
        a, c = (stats.aggregate(g["ppl"], {k: g[k] for k in tasks}, beta) for g in agg)
        taus.append(stats.kendall_tau_b(a, c))
    return float(np.median(taus))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measurement", required=True, help="a complete measurement probed at 3 and 4 bits")
    ap.add_argument("--out", required=True, help="where the one-width measurement goes")
    ap.add_argument("--beta", type=float, default=None)
    args = ap.parse_args(argv)
    from tasa import defaults, models, stats
    from tasa.measurement import Measurement
    from tasa.pipeline import stages
    from tasa.scoring import unit_errors

    src = Path(args.measurement)
    m = Measurement.load(src)
    sens = m.sensitivity
    if not (m.complete and {3, 4} <= set(sens.widths)):
        raise SystemExit(f"{src}: needs a complete measurement probed at 3 and 4 bits "
                         f"(widths {sens.widths})")
    cfg = config_from(m.config)
    names = list(m.units)
    units = {u: (v["block"], list(v["linears"])) for u, v in m.units.items()}
    ew = [3, 4]
    if any(u not in sens.unit_error.get(str(b), {}) for b in ew for u in names):
        model, tok = models.load_model(cfg.model)[:2]
        stages.fill_unit_errors(model, tok, cfg, m.mixture, units, sens, stages.split_data(cfg), ew)
        m.save(src)
        print(f"unit errors at {ew} bits recorded in {src}")
    one = copy.deepcopy(m)
    s1 = one.sensitivity
    s1.delta_by_width = {}
    s1.item_delta = {"3": s1.item_delta["3"]}
    s1.bits = 3
    one.config["sens_widths"] = [3]
    s1.noise = stages.noise_bounds(s1, names, seed=cfg.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    one.save(out)

    beta = defaults.BETA if args.beta is None else args.beta
    E2, _, _ = unit_errors(m, beta=beta)
    E1, _, _ = unit_errors(one, beta=beta)
    e4m = np.array([E2[u][4] for u in names])
    e4c = np.array([E1[u][4] for u in names])
    e3 = np.array([E2[u][3] for u in names])
    ratio = np.array([sens.unit_error["4"][u] / sens.unit_error["3"][u] for u in names])
    res = {
        "measurement": str(src), "one_width": str(out), "beta": beta, "units": len(names),
        "tau_measured_vs_carried_4bit": stats.kendall_tau_b(e4m, e4c),
        "spearman_measured_vs_carried_4bit": stats.spearman_rho(e4m, e4c),
        "sum_measured_4bit": float(e4m.sum()), "sum_carried_4bit": float(e4c.sum()),
        "error_ratio_4_over_3": {"min": float(ratio.min()), "median": float(np.median(ratio)),
                                 "max": float(ratio.max())},
        "measured_4bit_over_3bit": {"median": float(np.median(e4m / np.maximum(e3, 1e-30)))},
        "split_half_tau_3bit": aggregate_reliability(sens, names, 3, beta),
        "split_half_tau_4bit": aggregate_reliability(sens, names, 4, beta),
        "probe_seconds_both_widths": float(sens.seconds),
    }
    print(json.dumps(res, indent=1))
    (out.parent / "probe_widths.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
