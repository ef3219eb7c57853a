# Emulation behind gemm_cpu_3bit_amd.md (13:50 UTC 2026-11-30): python int8_x_emulation.py smollm2-135m 256
# (run from benchmarks/results/; texts and teacher_forced as in check_gemv_precision.py of commit c9e4e66)
# Emulate one int8 piece of x per block of B (B=128: the withdrawn option; B=32: llama.cpp's
# Q8_0 activation blocks) on the M=1 path and measure argmax agreement with the default.
import sys, torch, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasa.nn import TasaLinear
from bench_generate import _tasa_model
torch.set_num_threads(2)


def texts(n_tokens: int, tok) -> dict:
    from tasa import data

    gsm = "\n\n".join(data.format_gsm8k(it) for it in data.load_gsm8k(None, "train", limit=40))
    out = {}
    for name, text in (("wikitext2", data.load_wikitext2(None, "test")[:40000]), ("gsm8k", gsm)):
        ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
        if ids.shape[1] < n_tokens:
            raise SystemExit(f"{name}: only {ids.shape[1]} tokens in the shipped text")
        out[name] = ids
    return out


def teacher_forced(model, ids, step_mode: bool):
    """(per-token NLL of ids[1:], logits [T-1, V]) by decode steps (batch-1 GEMVs) or by one
    forward pass."""
    import torch

    from tasa.generation import _LeanDecoder

    T = ids.shape[1]
    with torch.inference_mode():
        if step_mode:
            step = _LeanDecoder(model, T)
            logits = torch.stack([step(ids[:, t:t + 1], t)[0].float() for t in range(T - 1)])
        else:
            logits = model(input_ids=ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return nll.double(), logits


BLOCK = {"b": None}
orig = TasaLinear.forward
def fwd(self, x):
    B = BLOCK["b"]
    if B and x.numel() == x.shape[-1]:
        K = x.shape[-1]
        xr = x.float().reshape(-1, K // B, B) if K % B == 0 else None
        if xr is not None:
            d = xr.abs().amax(-1, keepdim=True) / 127
            q = torch.where(d > 0, torch.round(xr / torch.where(d > 0, d, 1)), 0.0).clamp(-127, 127)
            x = (q * d).reshape(x.shape).to(x.dtype)
    return orig(self, x)
TasaLinear.forward = fwd
for name in sys.argv[1].split(","):
    model, tok, note = _tasa_model(name, 8)
    for text, ids in texts(int(sys.argv[2]), tok).items():
        BLOCK["b"] = None
        nh, lh = teacher_forced(model, ids, True)
        for B in (128, 32):
            BLOCK["b"] = B
            nb, lb = teacher_forced(model, ids, True)
            print(json.dumps({"model": name, "text": text, "block": B, "agree": float((lh.argmax(-1) == lb.argmax(-1)).double().mean()),
                              "dnll": float((nb - nh).mean()), "maxlogit": float((lh - lb).abs().max())}), flush=True)
