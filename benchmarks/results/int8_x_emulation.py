# Emulation behind gemm_cpu_3bit_amd.md (13:50 UTC 2026-11-30): python int8_x_emulation.py smollm2-135m 256
# (needs benchmarks/ on the path and the check_gemv_precision helpers of commit c9e4e66, texts/teacher_forced).
# Emulate one int8 piece of x per block of B (B=128: the withdrawn option; B=32: llama.cpp's
# Q8_0 activation blocks) on the M=1 path and measure argmax agreement with the default.
import sys, torch, json
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/tmp/kv")
from tasa.nn import TasaLinear
import tasa_ext
from bench_generate import _tasa_model
from check_gemv_precision import texts, teacher_forced
torch.set_num_threads(2)
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
