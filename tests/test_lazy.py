"""tasa.lazy: a checkpoint quantized block by block from safetensors gives the same folder as the
in-memory driver, loads with tasa.load, and its peak host memory stays near one block."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tasa
from tasa.modelquant import quantize_model
from tasa.lazy import INDEX_NAME, Checkpoint, quantize_lazy, skeleton
from tasa.quant import uniform_plan

from helpers import REPO, tiny_gemma3, tiny_llama


def _calib(n=8, T=32):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make,method", [(tiny_llama, "gptq"), (tiny_llama, "rtn"),
                                         (tiny_gemma3, "gptq")])
def test_lazy_equals_in_memory_and_loads(tmp_path, make, method):
    m = make()
    m.save_pretrained(tmp_path / "src")
    plan = uniform_plan(m, 3, 32, "asym")
    ids = _calib()
    r = quantize_lazy(tmp_path / "src", plan, tmp_path / "out", method=method,
                      calib_ids=ids if method == "gptq" else None, batch_size=4, progress=False)
    kw = {"calib_ids": ids, "batch_size": 4} if method == "gptq" else {}
    quantize_model(m, plan, method, progress=False, **kw)
    out = tmp_path / "out"
    assert (out / INDEX_NAME).is_file() and r["shards"] == len(list(out.glob("model-*.safetensors")))
    q = tasa.load(out)
    a, b = m.state_dict(), q.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randint(0, 256, (1, 12))
    assert torch.equal(m(x).logits, q(x).logits)


def test_lazy_refuses_what_it_cannot_do(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "src")
    plan = uniform_plan(m, 4, 32, "asym")
    with pytest.raises(ValueError, match="needs calibration token ids"):
        quantize_lazy(tmp_path / "src", plan, tmp_path / "out")
    with pytest.raises(ValueError, match="decoder-block linears only"):
        quantize_lazy(tmp_path / "src", {"lm_head": next(iter(plan.values()))}, tmp_path / "o2",
                      method="rtn")
    with pytest.raises(FileNotFoundError, match="lazy loading reads safetensors only"):
        Checkpoint(tmp_path)
    sk = skeleton(tmp_path / "src")
    assert all(p.is_meta for p in sk.parameters())


# ---- peak host memory -------------------------------------------------------------------------

_RSS_SCRIPT = r"""
import json, sys, threading, time, torch
torch.set_num_threads(1)
from tasa.lazy import quantize_lazy, skeleton
from tasa.quant import LayerSpec
from transformers import AutoConfig

src, out = sys.argv[1], sys.argv[2]
cfg = AutoConfig.from_pretrained(src)
ids = torch.randint(0, cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
plan = {}
for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    for n, k in [("self_attn.q_proj", cfg.hidden_size), ("self_attn.k_proj", cfg.hidden_size),
                 ("self_attn.v_proj", cfg.hidden_size), ("self_attn.o_proj", cfg.hidden_size),
                 ("mlp.gate_proj", cfg.hidden_size), ("mlp.up_proj", cfg.hidden_size),
                 ("mlp.down_proj", cfg.intermediate_size)]:
        plan[p + n] = LayerSpec([4] * (k // 128), 128, "asym")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

peak = [0]
stop = threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
skeleton(src)     # code loading (the model class's module) is a fixed cost, not a block's
before = rss()
t = threading.Thread(target=watch, daemon=True)
t.start()
r = quantize_lazy(src, plan, out, calib_ids=ids, batch_size=8, progress=False)
stop.set(); t.join()
print(json.dumps({"before": before, "peak": max(peak[0], rss()), "block_seconds": r["block_seconds"]}))
"""


def _big_llama(path, layers=6):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=256)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(path)
    blk = sum(p.numel() * p.element_size() for p in m.model.layers[0].parameters())
    whole = sum(p.numel() * p.element_size() for p in m.parameters())
    return blk, whole


@pytest.mark.slow
def test_lazy_peak_rss_near_one_block(tmp_path):
    """The increase of the resident set during the lazy GPTQ run (sampled every 2 ms, after
    the model code is loaded) against one fp32 block (40 MiB here; 14 blocks, 568 MiB with the
    embeddings). Measured on the 2-core machines, default method (gptq-mse): 4.3-5.1x a block
    over five runs (the block, its Hessians, GPTQ's K x K temporaries of down_proj, the
    quantized copy, the calibration activations; glibc's arenas make it drift by ~0.8 block
    from run to run; CI once saw 5.09 against the former 5.0 bound). The bound is 6.5x, under
    half the whole model's 14.2x, so loading the model whole (or keeping the blocks) fails it."""
    blk, whole = _big_llama(tmp_path / "src", layers=14)
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO / "python"), str(REPO)] + sys.path))
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "src"),
                          str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    factor = (m["peak"] - m["before"]) / blk
    print(f"lazy peak RSS increase: {(m['peak'] - m['before']) / 2**20:.1f} MiB = {factor:.2f} x "
          f"one block ({blk / 2**20:.1f} MiB); whole model {whole / 2**20:.1f} MiB")
    assert whole > 2 * 6.5 * blk
    assert factor < 6.5
    assert tasa.load(tmp_path / "out") is not None


def test_lazy_killed_mid_run_leaves_no_model_and_reruns(tmp_path):
    """SIGKILL after the first block's shard (TASA_FAULT=lazy:block): the folder claims no
    model (config.json is written last); the rerun writes a complete, loadable one."""
    import os

    from tasa import storage as tio

    tiny_llama().save_pretrained(tmp_path / "src")
    script = ("import sys, torch; from tasa.lazy import quantize_lazy; "
              "from tasa.quant import uniform_plan; from tasa.lazy import skeleton; "
              "p = uniform_plan(skeleton(sys.argv[1]), 4, 32, 'asym'); "
              "quantize_lazy(sys.argv[1], p, sys.argv[2], method='rtn', progress=False)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO)] + sys.path))
    args = [sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "out")]
    r = subprocess.run(args, env=dict(env, TASA_FAULT="lazy:block"), capture_output=True)
    assert r.returncode == -9
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 1
    with pytest.raises(ValueError, match="not a tasa model folder"):
        tio.folder_kind(tmp_path / "out")
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    assert tio.folder_kind(tmp_path / "out") == "hf"
    assert tasa.load(tmp_path / "out") is not None


def test_cli_quantize_lazy_equals_in_memory_with_the_same_plan(tmp_path, capsys):
    """`tasa quantize --lazy --plan` (block by block from safetensors) writes the same model as
    `tasa quantize --plan` in memory: same GPTQ calibration (alpha from the plan), same bits;
    --lazy without a plan is refused with the reason."""
    from dataclasses import replace

    from helpers import byte_tokenizer
    from tasa import cli
    from tasa.quant import plan_to_dict

    m = tiny_llama()
    m.save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    plan = uniform_plan(m, 4, 32, "sym")
    for i, name in enumerate(sorted(plan)):          # mixed widths, one per linear
        plan[name] = replace(plan[name], bits=[(3, 4, 8)[i % 3]] * len(plan[name].bits))
    Path(tmp_path / "plan.json").write_text(json.dumps(plan_to_dict(plan, alpha=0.5)))
    common = ["quantize", "--model", str(tmp_path / "src"), "--plan", str(tmp_path / "plan.json"),
              "--n-calib", "8", "--seqlen", "32", "--eval-windows", "0", "--no-progress", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "mem")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "lazy"), "--lazy"]) == 0
    run = json.loads((tmp_path / "lazy" / "run.json").read_text())
    assert run["lazy"] and run["quantization"]["calibration"]["alpha"] == 0.5
    assert (tmp_path / "lazy" / INDEX_NAME).is_file() and (tmp_path / "lazy" / "plan.json").is_file()
    a, b = tasa.load(tmp_path / "mem").state_dict(), tasa.load(tmp_path / "lazy").state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    capsys.readouterr()
    assert cli.main(common[:3] + ["--out", str(tmp_path / "x"), "--lazy", "--quiet"]) == 2
    assert "--lazy quantizes with a given --plan" in capsys.readouterr().err


def test_lazy_rotated_equals_in_memory(tmp_path):
    """Format version 2: a rotated plan quantized block by block is the in-memory model bit for
    bit, and its saved config says every planned linear is rotated (read from the modules, which
    the lazy job has released to meta by then)."""
    m = tiny_llama()
    m.save_pretrained(tmp_path / "src")
    plan = uniform_plan(m, 3, 32, "asym", hadamard=True)
    ids = _calib()
    quantize_lazy(tmp_path / "src", plan, tmp_path / "out", method="gptq", calib_ids=ids,
                  batch_size=4, progress=False)
    quantize_model(m, plan, "gptq", calib_ids=ids, batch_size=4, progress=False)
    q = tasa.load(tmp_path / "out")
    qc = q.config.quantization_config.to_dict()
    assert {n for n, e in qc["modules"].items() if e.get("hadamard")} == set(plan)
    x = torch.randint(0, 256, (1, 12))
    assert torch.equal(m(x).logits, q(x).logits)
