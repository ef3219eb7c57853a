"""An untied model's input embedding alone at 4 bits, the head at 8, against both at 8 (decoder
fp32): KL to the reference and gold NLL, paired over sequences (tasa.divergence). It decided
defaults.UNTIED_EMBED_BITS (results/embed_bits.md, addendum; raw: results/embed_split_qwen.json).

    python benchmarks/embed_split.py MODEL TOKENS_PER_TEXT > results/embed_split_<model>.json
"""
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ci95  # noqa: E402

import tasa  # noqa: E402,F401
from tasa import divergence as dv  # noqa: E402
from tasa.modelquant import quantize_embeddings  # noqa: E402
from tasa.models import load_model  # noqa: E402
from tasa.layers import TasaEmbedding, set_module  # noqa: E402
from tasa.quant import LayerSpec, quantize_rtn, resolve_group_size  # noqa: E402

name = sys.argv[1]; tokens = int(sys.argv[2])
ref, tok, _ = load_model(name)
seqs = {t: dv.kl_sequences(tok, t, None, tokens) for t in dv.TEXTS}
cands = {}
for eb in (8, 4):
    c = copy.deepcopy(ref)
    w = c.get_input_embeddings().weight.detach().clone()
    quantize_embeddings(c, 8, 128, "asym")          # head (untied) at 8
    if eb != 8:
        V, K = w.shape; G = resolve_group_size(K, 128)
        q = quantize_rtn(w, LayerSpec([eb] * (K // G), G, "asym"))
        set_module(c, "model.embed_tokens", TasaEmbedding.from_quantized(q, None, w.dtype))
    cands[f"input emb{eb} + head8 (decoder fp32)"] = c
res = {t: dv.compare(ref, cands, s, progress=False) for t, s in seqs.items()}
out = {t: {n: {k: v for k, v in r.items() if not k.endswith("_seq")} for n, r in R.items()} for t, R in res.items()}
for t, R in res.items():
    a, b = list(cands)
    d, h = ci95([y - x for x, y in zip(R[a]["kl_seq"], R[b]["kl_seq"])])
    out[t]["diff_kl"] = [d, h]
    d, h = ci95([y - x for x, y in zip(R[a]["nll_seq"], R[b]["nll_seq"])])
    out[t]["diff_nll"] = [d, h]
print(json.dumps(out, indent=1))
