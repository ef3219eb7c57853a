"""End-to-end decode benchmark: a LLaMA-3-8B-shaped decoder stack with random weights, fp16
dense vs the same stack with every linear layer packed by tasa (a 3/4-bit mix, ~3.5 bits).

Defaults are LLaMA-3-8B's dimensions (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
32 layers, vocab 128256). Batch 1, greedy decoding of --tokens tokens after a --context-token
KV cache; on CUDA every decode step is one replayed CUDA graph (static KV cache, the position
lives in a device tensor), so the numbers measure the kernels, not Python. The embedding,
final norm and LM head stay fp16 dense in both configurations (as in most weight-only
quantization deployments); only the 7 linear layers per block are quantized.

    python benchmarks/bench_e2e.py --device cuda                 # full 32-layer model, H100
    python benchmarks/bench_e2e.py --device cuda --layers 8      # if memory is short
    python benchmarks/bench_e2e.py --device cpu --layers 1 --hidden 256 --intermediate 512 \
        --heads 4 --kv-heads 2 --vocab 512 --tokens 4            # smoke test (no CUDA graphs)

Prints a table and writes benchmarks/results/e2e_<device>_<date>.{json,md} with the device
name, date, git commit and command line.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

import tasa_ext
from common import machine, timeit
from tasa.layers import TasaLinear
from tasa.quant import QuantizedWeight
from tasa_ext.testing import random_packed

ROOT = Path(__file__).resolve().parents[1]


# ---- model ----------------------------------------------------------------------------------

class DenseLinear(torch.nn.Module):
    def __init__(self, n_out, k_in, dtype, device, gen):
        super().__init__()
        w = torch.randn(n_out, k_in, device=device, generator=gen, dtype=torch.float32) / math.sqrt(k_in)
        self.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight)


def tasa_linear(n_out, k_in, group_bits, group_size, device, seed):
    """tasa.layers.TasaLinear holding random symmetric codes (generated and packed on ``device``);
    w = (q - 2^(b-1)) * s with |w| <~ 1/sqrt(K), like the dense layer."""
    s = 1.0 / (math.sqrt(k_in) * 2 ** (max(group_bits) - 1))
    p = random_packed(n_out, k_in, group_size, group_bits, seed=seed, device=device,
                      scale_range=(0.5 * s, 1.5 * s))
    q = QuantizedWeight(p["codes"], p["scales_logical"], None, None, p["bits"], group_size, "sym")
    return TasaLinear.from_quantized(q, bias=None)


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class Block(torch.nn.Module):
    def __init__(self, a, make_linear, dtype, device):
        super().__init__()
        h, hd = a.hidden, a.hidden // a.heads
        self.heads, self.kv_heads, self.hd = a.heads, a.kv_heads, hd
        self.q = make_linear(a.heads * hd, h)
        self.k = make_linear(a.kv_heads * hd, h)
        self.v = make_linear(a.kv_heads * hd, h)
        self.o = make_linear(h, a.heads * hd)
        self.gate = make_linear(a.intermediate, h)
        self.up = make_linear(a.intermediate, h)
        self.down = make_linear(h, a.intermediate)
        self.n1 = torch.nn.Parameter(torch.ones(h, dtype=dtype, device=device), requires_grad=False)
        self.n2 = torch.nn.Parameter(torch.ones(h, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x, pos, cos, sin, kc, vc, mask):
        # x [1, 1, h]; pos int64 [1] (device); kc/vc [1, kv_heads, max_len, hd] static caches
        b = x.shape[0]
        hn = rms_norm(x, self.n1)
        q = self.q(hn).view(b, 1, self.heads, self.hd).transpose(1, 2)
        k = self.k(hn).view(b, 1, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(hn).view(b, 1, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        att = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, 1, -1))
        hn = rms_norm(x, self.n2)
        return x + self.down(F.silu(self.gate(hn)) * self.up(hn))


def rope(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Decoder(torch.nn.Module):
    def __init__(self, a, quantized, dtype, device):
        super().__init__()
        gen = torch.Generator(device=device).manual_seed(0)
        if quantized:
            seeds = itertools.count(1)

            def make_linear(n, k):
                return tasa_linear(n, k, a.mix, a.group_size, device, next(seeds))
        else:
            def make_linear(n, k):
                return DenseLinear(n, k, dtype, device, gen)
        self.embed = torch.nn.Parameter(
            (torch.randn(a.vocab, a.hidden, device=device, generator=gen) * 0.02).to(dtype), requires_grad=False)
        self.blocks = torch.nn.ModuleList()
        for _ in range(a.layers):
            self.blocks.append(Block(a, make_linear, dtype, device))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.norm = torch.nn.Parameter(torch.ones(a.hidden, dtype=dtype, device=device), requires_grad=False)
        self.head = DenseLinear(a.vocab, a.hidden, dtype, device, gen)
        hd = a.hidden // a.heads
        self.max_len = a.context + a.tokens
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.arange(self.max_len, device=device, dtype=torch.float32)[:, None] * inv[None]
        self.register_buffer("cos", ang.cos().to(dtype))
        self.register_buffer("sin", ang.sin().to(dtype))
        shape = (1, a.kv_heads, self.max_len, hd)
        self.kc = [torch.randn(shape, device=device, dtype=dtype) for _ in range(a.layers)]
        self.vc = [torch.randn(shape, device=device, dtype=dtype) for _ in range(a.layers)]
        self.positions = torch.arange(self.max_len, device=device)

    def step(self, tok, pos):
        """One decode step; tok int64 [1], pos int64 [1] (both device tensors, updated in place:
        tok <- greedy next token, pos <- pos + 1), so the step can be captured in a graph."""
        x = F.embedding(tok, self.embed).view(1, 1, -1)
        cos = self.cos.index_select(0, pos).view(1, 1, 1, -1)
        sin = self.sin.index_select(0, pos).view(1, 1, 1, -1)
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for blk, kc, vc in zip(self.blocks, self.kc, self.vc):
            x = blk(x, pos, cos, sin, kc, vc, mask)
        logits = self.head(rms_norm(x, self.norm)).view(-1)
        tok.copy_(logits.argmax().view(1))
        pos.add_(1)


# ---- benchmark ------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model, a, device):
    """(median seconds to decode a.tokens tokens after an a.context-token cache over a.repeats
    timed runs that follow one untimed run, whether CUDA graphs were used)."""
    tok = torch.zeros(1, dtype=torch.int64, device=device)
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    use_graph = device.type == "cuda" and not a.no_graph
    with torch.inference_mode():
        if use_graph:
            s = torch.cuda.Stream(device)
            s.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(s):
                for _ in range(2):                     # warm-up (allocator, lazy init)
                    pos.fill_(a.context)
                    model.step(tok, pos)
            torch.cuda.current_stream(device).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.step(tok, pos)
            run = graph.replay
        else:
            def run():
                model.step(tok, pos)

        def decode():
            pos.fill_(a.context)
            tok.zero_()
            for _ in range(a.tokens):
                run()

        dt = timeit(decode, min_time=0, warmup=0, repeats=a.repeats, sync=lambda: sync(device))
    return dt, use_graph


def linear_stats(model):
    """Stored bits of the 7 linear layers per block (tasa's exact cost model for packed ones)."""
    bits = params = 0
    for blk in model.blocks:
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            lin = getattr(blk, name)
            if isinstance(lin, TasaLinear):
                bits += tasa_ext.cost_bits(lin.out_features, lin.in_features, lin.group_size, lin.group_bits,
                                           lin.mode, lin.perm is not None)
                params += lin.out_features * lin.in_features
            else:
                bits += lin.weight.numel() * lin.weight.element_size() * 8
                params += lin.weight.numel()
    return bits / max(params, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens (timed)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed decodes of --tokens tokens (after one untimed); the median is reported")
    p.add_argument("--context", type=int, default=0, help="KV-cache length before the first timed token")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--mix", type=lambda s: [int(b) for b in s.split(",")], default=[3, 4],
                   help="bit widths assigned to groups round-robin (default 3,4 = half at 3, half at 4)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--no-graph", action="store_true", help="eager decoding even on CUDA")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    rows = []
    for quantized in (False, True):
        dense = "fp16 dense" if dtype == torch.float16 else "bf16 dense"
        label = "tasa mix " + "/".join(map(str, a.mix)) + "-bit" if quantized else dense
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = Decoder(a, quantized, dtype, device)
        dt, used_graph = bench(model, a, device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        rows.append(dict(config=label, tokens=a.tokens, seconds=dt, tokens_per_s=a.tokens / dt,
                         ms_per_token=1e3 * dt / a.tokens, peak_mem_gib=None if peak is None else peak / 2**30,
                         linear_avg_bits=linear_stats(model)))
        del model
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base

    now = _dt.datetime.now(_dt.timezone.utc)
    meta = machine(a.device)
    res = dict(benchmark="e2e_decode", device=meta["device"], device_type=device.type,
               date=meta["date"], git_commit=meta["commit"], command=meta["command"], torch=meta["torch"],
               python=meta["python"], threads=meta["threads"], repeats=a.repeats,
               tasa=tasa_ext.build_info(), cuda_graphs=bool(used_graph),
               model=dict(layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                          kv_heads=a.kv_heads, vocab=a.vocab, context=a.context, group_size=a.group_size,
                          mix=a.mix, dtype=a.dtype, batch=1),
               rows=rows)

    head = f"{'config':<22} {'avg bits':>8} {'tok/s':>10} {'ms/tok':>8} {'peak GiB':>9} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pk = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        lines.append(f"{r['config']:<22} {r['linear_avg_bits']:>8.3f} {r['tokens_per_s']:>10.2f} "
                     f"{r['ms_per_token']:>8.3f} {pk:>9} {r['speedup']:>7.2f}x")
    print(f"device: {res['device']}  layers: {a.layers}  tokens: {a.tokens}  context: {a.context}  "
          f"CUDA graphs: {res['cuda_graphs']}")
    print("\n".join(lines))

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", res["device"]).strip("-").lower() or device.type
    stem = out / f"e2e_{slug}_{now.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# End-to-end decode: {res['device']}", "",
          f"- date: {res['date']}", f"- git commit: {res['git_commit']}", f"- command: `{res['command']}`",
          f"- torch {res['torch']}, CUDA graphs: {res['cuda_graphs']}",
          f"- model: {json.dumps(res['model'])}",
          "- linear layers only are quantized; embedding, final norm and LM head stay dense", "",
          "| config | linear avg bits | tokens/s | ms/token | peak GiB | speedup |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pk = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        md.append(f"| {r['config']} | {r['linear_avg_bits']:.3f} | {r['tokens_per_s']:.2f} | "
                  f"{r['ms_per_token']:.3f} | {pk} | {r['speedup']:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return res


if __name__ == "__main__":
    main()
