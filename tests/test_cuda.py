"""The tasa ops on CUDA against the CPU op and the pure-torch reference (tasa_ext.reference).

The reference is built from the same integer codes the kernels pack, so a mismatch isolates
kernel error from quantization error. Every CUDA test carries ``@pytest.mark.cuda`` and skips
cleanly (through the ``dev`` fixture, never at import) when torch has no usable GPU or the
extension was built without CUDA. The end-to-end benchmark's CPU smoke test runs everywhere.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tasa_ext
from tasa_ext import reference as ref

REPO = Path(__file__).resolve().parents[1]

from tasa_ext.testing import BIT_PATTERNS, random_packed  # noqa: E402


@pytest.fixture
def dev():
    if not tasa_ext.build_info()["with_cuda"]:
        pytest.skip("tasa_ext was built without CUDA")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def to_dev(p, dev):
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in p.items()}


# ---- pack / unpack / dequant ------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("pattern", list(BIT_PATTERNS))
@pytest.mark.parametrize("N", [1, 37, 333])
def test_pack_unpack_match_cpu(dev, G, pattern, N):
    K = G * 6
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym=False, act_order=False)
    q, gt = tasa_ext.pack(p["codes"].to(dev), p["gb"].to(dev), G)
    assert q.is_cuda and gt.is_cuda
    assert torch.equal(q.cpu(), p["qweight"])          # bit-identical layout
    assert torch.equal(gt.cpu(), p["gtable"])
    assert torch.equal(tasa_ext.unpack(q, gt, N, G).cpu(), p["codes"])


@pytest.mark.cuda
def test_pack_rejects_out_of_range_code(dev):
    codes = torch.zeros(5, 64, dtype=torch.uint8, device=dev)
    codes[3, 40] = 4                                    # group 1 is 2-bit
    with pytest.raises(RuntimeError, match="does not fit"):
        tasa_ext.pack(codes, torch.tensor([4, 2], dtype=torch.int32, device=dev), 32)


@pytest.mark.cuda
def test_unpack_rejects_bad_gtable(dev):
    p = to_dev(random_packed(20, 128, 32, [2, 4], asym=False, act_order=False), dev)
    bad = p["gtable"].clone()
    bad[0, 0] = 5
    with pytest.raises(RuntimeError, match="bit width"):
        tasa_ext.unpack(p["qweight"], bad, 20, 32)


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", ["u2", "u3", "u8", "mix"])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequant_bit_identical_to_cpu(dev, pattern, asym, act_order):
    N, G = 37, 64
    K = G * 6
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order)
    W_cpu = tasa_ext.dequant(p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    d = to_dev(p, dev)
    W = tasa_ext.dequant(d["qweight"], d["scales"], d["zeros"], d["gtable"], d["perm"], G)
    assert torch.equal(W.cpu(), W_cpu)


@pytest.mark.cuda
def test_dequant_rejects_nonfinite_scale(dev):
    p = random_packed(20, 64, 32, [4], asym=True, act_order=False)
    p["scales"][1, 3] = float("nan")
    d = to_dev(p, dev)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        tasa_ext.dequant(d["qweight"], d["scales"], d["zeros"], d["gtable"], None, 32)


@pytest.mark.cuda
@pytest.mark.parametrize("pattern", ["u3", "u8", "mix"])
@pytest.mark.parametrize("asym,act_order", [(False, False), (True, False), (True, True)])
def test_embed_bit_identical_to_cpu(dev, pattern, asym, act_order):
    N, G = 53, 64
    K = G * 5
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order)
    ids = torch.randint(0, N, (3, 7))
    want = tasa_ext.embed(ids, p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    d = to_dev(p, dev)
    got = tasa_ext.embed(ids.to(dev), d["qweight"], d["scales"], d["zeros"], d["gtable"], d["perm"], G)
    assert torch.equal(got.cpu(), want)
    with pytest.raises(RuntimeError, match="outside"):
        tasa_ext.embed(torch.tensor([N], device=dev), d["qweight"], d["scales"], d["zeros"],
                       d["gtable"], d["perm"], G)


# ---- gemm -------------------------------------------------------------------------------------

# Per-element bound |y - y_ref| <= eps * (|x| @ |W|^T) + eps * |y_ref|: eps covers fp32
# accumulation (fp32), and for 16-bit activations the rounding of the output and -- on the
# tensor-core path -- of the dequantized weight to the activation type.
EPS = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def check_gemm(y, x, p, G):
    W = ref.dequant(p["qweight"].cpu(), p["scales"].cpu(), None if p["zeros"] is None else p["zeros"].cpu(),
                    p["gtable"].cpu(), None if p["perm"] is None else p["perm"].cpu(), G, torch.float64)
    xc = x.cpu().double()
    y_ref = xc @ W.T
    bound = EPS[x.dtype] * (xc.abs() @ W.abs().T + y_ref.abs()) + 1e-6
    err = (y.cpu().double() - y_ref).abs()
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert bool((err <= bound).all()), f"max err {float(err.max()):.3g}, worst ratio {float((err / bound).max()):.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("M", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("pattern", list(BIT_PATTERNS))
@pytest.mark.parametrize("asym,act_order", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_matches_reference(dev, dtype, M, pattern, asym, act_order):
    N, G = 333, 64
    K = G * 6
    p = to_dev(random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order), dev)
    x = torch.randn(M, K, device=dev).to(dtype)
    y = tasa_ext.gemm(x, p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    check_gemm(y, x, p, G)


@pytest.mark.cuda
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("N", [37, 333])
@pytest.mark.parametrize("M", [1, 8, 17, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gemm_shapes_and_group_sizes(dev, G, N, M, dtype):
    K = G * 5
    p = to_dev(random_packed(N, K, G, BIT_PATTERNS["mix"], asym=True, act_order=True, seed=N + M), dev)
    x = torch.randn(M, K, device=dev).to(dtype)
    y = tasa_ext.gemm(x, p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    check_gemm(y, x, p, G)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gemm_matches_cpu_op_and_keeps_batch_dims(dev, dtype):
    N, G, K = 37, 32, 256
    p = random_packed(N, K, G, BIT_PATTERNS["mix"], asym=True, act_order=True)
    x = torch.randn(2, 3, K).to(dtype)
    y_cpu = tasa_ext.gemm(x, p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    d = to_dev(p, dev)
    y = tasa_ext.gemm(x.to(dev), d["qweight"], d["scales"], d["zeros"], d["gtable"], d["perm"], G)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y.cpu().float(), y_cpu.float(), rtol=EPS[dtype] * 4, atol=EPS[dtype] * 4)


@pytest.mark.cuda
def test_gemm_empty_batch(dev):
    p = to_dev(random_packed(37, 64, 32, [4], asym=False, act_order=False), dev)
    y = tasa_ext.gemm(torch.empty(0, 64, device=dev, dtype=torch.float16), p["qweight"], p["scales"], None,
                      p["gtable"], None, 32)
    assert y.shape == (0, 37)


@pytest.mark.cuda
def test_gemm_argument_errors_name_the_tensor(dev):
    p = to_dev(random_packed(37, 64, 32, [4], asym=False, act_order=False), dev)
    with pytest.raises(RuntimeError, match="x must have last dimension"):
        tasa_ext.gemm(torch.randn(2, 63, device=dev), p["qweight"], p["scales"], None, p["gtable"], None, 32)
    with pytest.raises(RuntimeError, match="scales is on"):
        tasa_ext.gemm(torch.randn(2, 64, device=dev), p["qweight"], p["scales"].cpu(), None, p["gtable"], None, 32)


@pytest.mark.cuda
def test_gemm_is_cuda_graph_capturable(dev):
    """gemm must not synchronize (decoding runs under CUDA graphs)."""
    N, G, K = 333, 128, 512
    p = to_dev(random_packed(N, K, G, BIT_PATTERNS["mix35"], asym=False, act_order=False), dev)
    x = torch.randn(1, K, device=dev, dtype=torch.float16)
    args = (p["qweight"], p["scales"], None, p["gtable"], None, G)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tasa_ext.gemm(x, *args)                     # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tasa_ext.gemm(x, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, tasa_ext.gemm(x, *args))


@pytest.mark.cuda
def test_opcheck_cuda(dev):
    from torch.library import opcheck

    N, G, K = 37, 32, 128
    p = to_dev(random_packed(N, K, G, BIT_PATTERNS["mix"], asym=True, act_order=True), dev)
    x = torch.randn(3, K, device=dev, dtype=torch.float16)
    opcheck(torch.ops.tasa.gemm.default, (x, p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G))
    opcheck(torch.ops.tasa.dequant.default, (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G))
    opcheck(torch.ops.tasa.unpack.default, (p["qweight"], p["gtable"], N, G))
    opcheck(torch.ops.tasa.embed.default, (torch.tensor([[0, N - 1, 5]], device=dev), p["qweight"],
                                           p["scales"], p["zeros"], p["gtable"], p["perm"], G))


# ---- hessian ----------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [37, 64, 200])
@pytest.mark.parametrize("S", [1, 3, 6])
def test_hessian_multi_source_matches_reference(dev, dtype, K, S):
    g = torch.Generator().manual_seed(K + S)
    H0 = torch.randn(S, K, K, generator=g)
    H0 = H0 + H0.transpose(1, 2)
    count0 = torch.randint(0, 50, (S,), generator=g, dtype=torch.int64)
    H_ref, c_ref = H0.clone(), count0.clone()
    H_cpu, c_cpu = H0.clone(), count0.clone()
    H, c = H0.to(dev), count0.to(dev)
    for step, T in enumerate([70, 1, 33]):
        X = torch.randn(T, K, generator=g).to(dtype)
        # source S-1 never gets rows when S > 1 (must stay untouched)
        src = torch.randint(0, max(S - 1, 1), (T,), generator=g, dtype=torch.int64) if S > 1 else None
        ref.hessian_accumulate_(H_ref, X, src, c_ref)
        tasa_ext.hessian_accumulate_(H_cpu, X, src, c_cpu)
        tasa_ext.hessian_accumulate_(H, X.to(dev), None if src is None else src.to(dev), c)
    assert torch.equal(c.cpu(), c_ref)
    Hc = H.cpu()
    assert torch.equal(Hc, Hc.transpose(1, 2))        # exactly symmetric, like the CPU op
    torch.testing.assert_close(Hc, H_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Hc, H_cpu, rtol=1e-4, atol=1e-4)
    if S > 1:
        assert torch.equal(Hc[S - 1], H0[S - 1])


@pytest.mark.cuda
def test_hessian_argument_errors(dev):
    H = torch.zeros(2, 8, 8, device=dev)
    with pytest.raises(RuntimeError, match="src is required"):
        tasa_ext.hessian_accumulate_(H, torch.randn(4, 8, device=dev), None,
                                     torch.zeros(2, dtype=torch.int64, device=dev))
    with pytest.raises(RuntimeError, match="count"):
        tasa_ext.hessian_accumulate_(H, torch.randn(4, 8, device=dev), torch.zeros(4, dtype=torch.int64, device=dev),
                                     torch.zeros(3, dtype=torch.int64, device=dev))


# ---- end-to-end benchmark smoke test (CPU; keeps benchmarks/bench_e2e.py from rotting) --------

@pytest.mark.slow
def test_bench_e2e_smoke_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--device", "cpu", "--layers", "1",
           "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2", "--vocab", "512",
           "--tokens", "4", "--group-size", "64", "--out-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(tmp_path.glob("e2e_*.json"))
    assert len(files) == 1 and len(list(tmp_path.glob("e2e_*.md"))) == 1
    res = json.loads(files[0].read_text())
    assert {row["config"] for row in res["rows"]} == {"fp16 dense", "tasa mix 3/4-bit"}
    for row in res["rows"]:
        assert row["tokens_per_s"] > 0 and row["tokens"] == 4
    assert res["cuda_graphs"] is False and "command" in res and "git_commit" in res
