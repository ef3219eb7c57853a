"""fp32 vs bf16-autocast sensitivity probes on SmolLM2-135M: agreement and speed."""
import json, sys, time, torch
from tasa import models, sensitivity as S, stats
from tasa.pipeline import stages
from tasa.pipeline.config import PipelineConfig
torch.set_num_threads(2)
cfg = PipelineConfig(data="/work/shared/data")
model, tok, _ = models.load_model("smollm2-135m")
split = stages.split_data(cfg)
objs = stages.build_objectives(tok, split, cfg)
units = S.block_units(model, list(stages.default_targets(model)))
out = {}
for dt in (torch.bfloat16, torch.float32):
    t = time.perf_counter()
    r = S.measure_sensitivity(model, objs, units, widths=(3, 4), compute_dtype=dt, progress=False)
    out[str(dt)] = {"seconds": time.perf_counter() - t, "base": r["base"],
                    "delta": {str(b): v for b, v in r["delta"].items()}}
    print(dt, out[str(dt)]["seconds"], r["base"], flush=True)
json.dump(out, open("/work/exp/bf16_fidelity.json", "w"))
a, b = out["torch.bfloat16"]["delta"], out["torch.float32"]["delta"]
for w in ("3", "4"):
    for k in ("ppl", "math", "arc"):
        x = [a[w][u][k] for u in units]; y = [b[w][u][k] for u in units]
        import numpy as np
        x, y = np.array(x), np.array(y)
        print(w, k, "tau", round(stats.kendall_tau_b(x, y), 3), "pearson", round(float(np.corrcoef(x, y)[0, 1]), 4),
              "sum bf16", round(x.sum(), 4), "sum fp32", round(y.sum(), 4), "max|diff|", round(float(abs(x - y).max()), 5))
