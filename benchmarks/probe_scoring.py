"""How much of a sensitivity ranking is signal: split-half reliability of each objective's unit
ranking with the gold-NLL scoring and with the KL scoring of the same probes (issue 27 item 1).

    python benchmarks/probe_scoring.py --model smollm2-135m --data ../shared/data

The pipeline's own objectives, units and probes (tasa's defaults: sublayer units, RTN 3- and
4-bit probes, bf16 probe passes; ``--ppl-windows`` / ``--math-items`` / ``--arc-items`` enlarge
the objective sets), scored two ways: ``scoring="nll"`` (the gold-token NLL increase) and
``scoring="kl"`` (KL from the full-precision model at every scored position,
``tasa.sensitivity``), both from the same probe passes. Reliability: Kendall tau between the unit rankings of two random
disjoint halves of the objective's items, mean and 95% range over 200 splits
(``tasa.stats.split_half_tau``; halves, so it bounds the full set's reliability from below).
Also: tau between the NLL and KL rankings of each objective (all items), and between the
objectives under each scoring.
Results: benchmarks/results/probe_scoring_<model>.{md,json}.
"""
from __future__ import annotations

# The rows of this benchmark's committed results (and its caches) were made before format
# version 2's rotation existed: it stays off here so a re-run extends them consistently; the
# rotation is measured apart (benchmarks/hadamard_quality.py, hadamard_probe.py).
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--ppl-windows", type=int, default=None)
    ap.add_argument("--math-items", type=int, default=None)
    ap.add_argument("--arc-items", type=int, default=None)
    ap.add_argument("--splits", type=int, default=200)
    args = ap.parse_args(argv)
    from tasa import pipeline, sensitivity, stats
    from tasa.models import load_model
    from tasa.pipeline import stages
    t0 = time.time()
    model, tok, info = load_model(args.model)
    # reliability at both probe widths (its committed tables report 3 and 4 bits)
    cfg = pipeline.PipelineConfig(model=args.model, data=args.data, hadamard=False,
                                  sens_widths=(3, 4))
    for k, f in (("ppl_windows", "sens_ppl_windows"), ("math_items", "sens_math_items"),
                 ("arc_items", "sens_arc_items")):
        if getattr(args, k) is not None:
            setattr(cfg, f, getattr(args, k))
    cfg.validate()
    split = pipeline.split_data(cfg)
    objs = stages.build_objectives(tok, split, cfg)
    units = stages._units(model, cfg)
    # one pass gives both scorings: a KL-scored probe also returns the gold-NLL increases of
    # the same forward (``nll_items``; tests/test_pipeline.py checks they equal an NLL run's)
    t = time.time()
    print(time.strftime("%H:%M:%S"), "probes (KL and NLL scoring, one pass)", flush=True)
    kl = sensitivity.measure_sensitivity(
        model, objs, units, widths=cfg.sens_widths, group_size=cfg.group_size,
        mode=cfg.mode, compute_dtype=getattr(torch, cfg.probe_dtype()), scoring="kl",
        progress=True)
    res = {"kl": kl, "nll": {"items": kl["nll_items"], "tokens": kl["tokens"]}}
    secs = {"both": time.time() - t}
    names = [o.name for o in objs]
    U = list(units)
    table = {}
    for b in cfg.sens_widths:
        for o in names:
            row = {}
            for sc in ("nll", "kl"):
                X = np.array([res[sc]["items"][b][u][o] for u in U])
                tok_ = res[sc]["tokens"][o]
                row[sc] = stats.split_half_tau(X, tok_, n_splits=args.splits)
                row[sc + "_profile"] = stats.profile_from_items(X, tok_).tolist()
            row["tau_nll_kl"] = stats.kendall_tau_b(row["nll_profile"], row["kl_profile"])
            table[(b, o)] = row
    between = {}
    for b in cfg.sens_widths:
        for sc in ("nll", "kl"):
            for i, a in enumerate(names):
                for c in names[i + 1:]:
                    between[(b, sc, a, c)] = stats.kendall_tau_b(table[(b, a)][sc + "_profile"],
                                                                 table[(b, c)][sc + "_profile"])
    meta = machine()
    meta.update({"model": args.model, "model_note": info.note(), "seconds": time.time() - t0,
                 "probe_seconds": secs,
                 "command": "python benchmarks/probe_scoring.py " + " ".join(
                     sys.argv[1:] if argv is None else argv)})
    desc = {o.name: f"{o.name}: {o.input_ids.shape[0]} items, {int(o.score[:, 1:].sum())} "
                    f"scored tokens" for o in objs}
    L = [f"# Probe scoring: gold NLL vs KL, {args.model}", "",
         f"{meta['date']}, commit {meta['commit']}, {meta['device']}, torch {meta['torch']}; "
         f"command: `{meta['command']}`; the probes (one pass, both scorings) took "
         f"{secs['both']:.0f} s.", "",
         f"{len(U)} units ({cfg.granularity}), RTN probes at {list(cfg.sens_widths)} bits, group "
         f"{cfg.group_size} {cfg.mode}, {cfg.probe_dtype()} probe passes. Objectives: "
         + "; ".join(desc.values()) + ".", "",
         "Split-half reliability = Kendall tau between the unit rankings of two disjoint random "
         f"halves of the items, mean [2.5%, 97.5%] over {args.splits} splits.", "",
         "| probe width | objective | reliability, NLL scoring | reliability, KL scoring | "
         "tau(NLL ranking, KL ranking) |", "|---|---|---|---|---|"]
    for (b, o), r in table.items():
        f = lambda d: f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"   # noqa: E731
        L.append(f"| {b} | {o} | {f(r['nll'])} | {f(r['kl'])} | {r['tau_nll_kl']:.3f} |")
    L += ["", "Agreement between objectives (Kendall tau of the full rankings; the "
          "'perplexity illusion' is read against the reliabilities above):", "",
          "| probe width | scoring | objectives | tau |", "|---|---|---|---|"]
    for (b, sc, a, c), v in between.items():
        L.append(f"| {b} | {sc} | {a} vs {c} | {v:.3f} |")
    md = "\n".join(L) + "\n"
    # objective sizes other than the job's: their own files, the default run's kept
    sizes = "".join(f"_{k.split('_')[0]}{v}" for k, v in (("ppl_windows", args.ppl_windows),
                    ("math_items", args.math_items), ("arc_items", args.arc_items)) if v is not None)
    stem = f"probe_scoring_{args.model}{sizes}"
    (RESULTS / f"{stem}.md").write_text(md)
    (RESULTS / f"{stem}.json").write_text(json.dumps({
        "meta": meta, "units": U,
        "table": [{"width": b, "objective": o, **r} for (b, o), r in table.items()],
        "between": [{"width": b, "scoring": sc, "a": a, "b": c, "tau": v}
                    for (b, sc, a, c), v in between.items()]}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
