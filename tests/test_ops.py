"""The tasa ops on the CPU against the pure-torch reference and float64 oracles."""
import math

import pytest
import torch
from torch.library import opcheck

import tasa_ext
from tasa_ext import reference as ref
from tasa_ext.testing import BIT_PATTERNS, random_packed


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("pattern", list(BIT_PATTERNS))
@pytest.mark.parametrize("N", [1, 37, 50])
def test_pack_roundtrip_matches_reference(G, pattern, N):
    K = G * 6
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym=False, act_order=False)
    q_ref, gt_ref = ref.pack(p["codes"], p["gb"], G)
    assert torch.equal(p["qweight"], q_ref)
    assert torch.equal(p["gtable"], gt_ref)
    assert p["qweight"].shape == (math.ceil(N / 16), int(gt_ref[:, 0].sum()) * G // 32, 16)
    assert torch.equal(tasa_ext.unpack(p["qweight"], p["gtable"], N, G), p["codes"])
    assert torch.equal(ref.unpack(p["qweight"], p["gtable"], N, G), p["codes"])
    # groups are stored sorted by bits with cumulative offsets
    bits = p["gtable"][:, 0].tolist()
    assert bits == sorted(bits)


def test_packed_bits_follow_the_spec_diagram():
    # 3-bit: code i at bits [3i, 3i+3) of the little-endian concatenation of the tile's 3 words.
    codes = torch.arange(32, dtype=torch.uint8).remainder(8).reshape(1, 32)
    q, _ = tasa_ext.pack(codes, torch.tensor([3], dtype=torch.int32), 32)
    words = [int(w) & 0xFFFFFFFF for w in q[0, :, 0]]
    big = words[0] | words[1] << 32 | words[2] << 64
    assert [(big >> (3 * i)) & 7 for i in range(32)] == codes[0].tolist()
    assert q[0, :, 1:].eq(0).all()        # padding columns hold code 0


@pytest.mark.parametrize("pattern", ["u3", "u8", "mix"])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequant_exact(pattern, asym, act_order):
    p = random_packed(37, 384, 64, BIT_PATTERNS[pattern], asym, act_order)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 64)
    assert torch.equal(tasa_ext.dequant(*args), ref.dequant(*args))


@pytest.mark.parametrize("pattern", ["u2", "u3", "u4", "u8", "mix"])
@pytest.mark.parametrize("asym,act_order", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("N,K,G,ids_shape", [(53, 320, 64, (3, 7)), (1, 96, 32, (4,)),
                                             (37, 384, 128, (1, 1)), (1000, 160, 32, (700,))])
def test_embed_rows_equal_dequant(pattern, asym, act_order, N, K, G, ids_shape):
    """embed(ids) is exactly W[ids] of the same packed matrix (the reference's fp64 rounding),
    for odd N, every width and mix, perm and zeros, ids repeated and at both ends; the
    (700, K) case crosses the threaded branch."""
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order, seed=N)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    g = torch.Generator().manual_seed(K)
    ids = torch.randint(0, N, ids_shape, generator=g)
    ids.view(-1)[0] = N - 1
    ids.view(-1)[-1] = 0
    got = tasa_ext.embed(ids, *args)
    assert got.shape == (*ids_shape, K) and got.dtype == torch.float32
    assert torch.equal(got, ref.embed(ids, *args))
    assert torch.equal(got, tasa_ext.dequant(*args)[ids])


def test_embed_refuses_bad_ids_and_empty():
    p = random_packed(20, 64, 32, [4, 8], asym=True, act_order=False)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 32)
    for bad in ([20], [-1], [0, 2**62]):
        with pytest.raises(RuntimeError, match="outside"):
            tasa_ext.embed(torch.tensor(bad), *args)
    with pytest.raises(RuntimeError, match="int64"):
        tasa_ext.embed(torch.tensor([1], dtype=torch.int32), *args)
    assert tasa_ext.embed(torch.zeros(0, dtype=torch.long), *args).shape == (0, 64)
    p["scales"][1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        tasa_ext.embed(torch.tensor([3]), *args)
    assert torch.isfinite(tasa_ext.embed(torch.tensor([4]), *args)).all()   # other rows fine


def rel_err(y, y64):
    return float((y.double() - y64).norm() / y64.norm())


@pytest.fixture
def dense_rows():
    """Sets the CPU gemm's dense-path threshold for one test, restoring the default after."""
    yield tasa_ext.ops.set_dense_rows
    tasa_ext.ops.set_dense_rows(None)


@pytest.mark.parametrize("path", ["fused", "dense"])
@pytest.mark.parametrize("M", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["u2", "u3", "u4", "u8", "mix"])
@pytest.mark.parametrize("asym,act_order", [(False, False), (True, False), (True, True)])
def test_gemm_matches_float64(isa, dense_rows, path, M, dtype, pattern, asym, act_order):
    """Both CPU paths at every M: the fused kernel (dense path off) and dequantize-once + torch
    matmul (dense path from one row on), each against float64 within 2x torch's own matmul
    error in the same dtype (the dense bf16 path rounds W to bf16, as torch's matmul here)."""
    N, K, G = 53, 768, 128
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order, seed=M)
    x = torch.randn(M, K).to(dtype)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    W64 = ref.dequant(*args, dtype=torch.float64)
    y64 = x.double() @ W64.T
    dense_rows(1 if path == "dense" else 0)
    y = tasa_ext.gemm(x, *args)
    assert y.dtype == dtype and y.shape == (M, N)
    y_torch = x @ W64.to(dtype).T                 # torch's own matmul in the same dtype
    err, err_torch = rel_err(y, y64), rel_err(y_torch, y64)
    # the dense path's sgemm accumulates along K in order (x @ W^T with W^T [K, N] row-major):
    # measured up to 3x torch's x @ W.T (a blocked dot product) at M = 1, so the bound is floored
    # at the typical fp32 dot-product error u * sqrt(K) * |x||W| / |y| (a wrong decode is O(1))
    floor = 1e-7 if path == "fused" else 2.0 ** -24 * math.sqrt(K) * float(
        (x.double().abs() @ W64.abs().T).norm() / y64.norm())
    assert err <= 2 * err_torch + floor, (err, err_torch, floor)


SIMD_ISAS = [i for i in tasa_ext.ops.cpu_isas_available() if i != "scalar"]
# the AVX2 GEMV with its int8 path off (its float decode of every width)
SIMD_PATHS = SIMD_ISAS + (["avx2-float"] if "avx2" in SIMD_ISAS else [])


@pytest.mark.skipif(not SIMD_ISAS, reason="no SIMD path on this CPU")
@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", list(BIT_PATTERNS))
@pytest.mark.parametrize("N,K,G", [(1, 64, 32), (17, 96, 32), (100, 256, 64), (33, 768, 128)])
@pytest.mark.parametrize("asym,act_order", [(False, False), (True, True), (False, True)])
def test_gemv_simd_matches_scalar_twin(simd, dtype, pattern, N, K, G, asym, act_order):
    """M == 1 has its own kernels (the AVX-512 one reads x as exact bf16 pieces): odd N (a
    partial last column block), every width and mixed widths, every group size, perm, zeros."""
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order, seed=N + K)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    x = (torch.randn(1, K) * torch.logspace(-3, 3, K)[torch.randperm(K)]).to(dtype)  # wide range
    W64 = ref.dequant(*args, dtype=torch.float64)
    y64 = x.double() @ W64.T
    try:
        _gemv_path(simd)
        y = tasa_ext.gemm(x, *args)
        _gemv_path("scalar")
        y_scalar = tasa_ext.gemm(x, *args)
    finally:
        _gemv_reset()
    y_torch = x @ W64.to(dtype).T
    err, err_scalar, err_torch = rel_err(y, y64), rel_err(y_scalar, y64), rel_err(y_torch, y64)
    # With a single output (N = 1) and a short K the relative errors are single samples of
    # rounding noise; floor the bound at the typical fp32 dot-product error u * sqrt(K) * |x||W|
    # (a wrong decode is off by O(1), far above it).
    floor = 2.0 ** -24 * math.sqrt(K) * float((x.double().abs() @ W64.abs().T).norm() / y64.norm())
    assert err <= 2 * err_torch + floor, (err, err_torch, floor)
    assert err <= 2 * err_scalar + floor, (err, err_scalar, floor)


ROW_SHARED_ISAS = [i for i in ("avx2", "avx512", "avx512vnni")
                   if i in tasa_ext.ops.cpu_isas_available()]


@pytest.mark.skipif(not ROW_SHARED_ISAS, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("simd", ROW_SHARED_ISAS)
@pytest.mark.parametrize("M", [2, 3, 4, 5, 7, 9, 16])
@pytest.mark.parametrize("pattern", list(BIT_PATTERNS))
@pytest.mark.parametrize("asym,act_order", [(False, False), (True, True)])
def test_row_shared_gemv_matches_float64(dense_rows, simd, M, pattern, asym, act_order):
    """2 <= M <= gemv_rows: the GEMV's decode shared by chunks of up to 4 rows (every chunk
    size 1-4 occurs: M = 5 -> 3 + 2, 7 -> 4 + 3, 9 -> 3 + 3 + 3), the scale folded with the
    code's 2^-(32-b); odd N (a ragged last block), every width, zeros, perm, x over six decades.
    Against float64 within 2x torch's own error, and no worse than the dequantize-into-L1 GEMM
    it replaces (gemv_rows 1) and the scalar twin."""
    N, K, G = 37, 384, 64
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order, seed=M * 7 + len(pattern))
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    W64 = ref.dequant(*args, dtype=torch.float64)
    dense_rows(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(M, K) * torch.logspace(-3, 3, K)[torch.randperm(K)]).to(dtype)
        y64 = x.double() @ W64.T
        try:
            tasa_ext.set_cpu_isa(simd)
            tasa_ext.ops.set_gemv_rows(16)
            y = tasa_ext.gemm(x, *args)
            tasa_ext.ops.set_gemv_rows(1)
            y_gemm = tasa_ext.gemm(x, *args)
            tasa_ext.set_cpu_isa("scalar")
            y_scalar = tasa_ext.gemm(x, *args)
        finally:
            tasa_ext.ops.set_gemv_rows(None)
            tasa_ext.set_cpu_isa("auto")
        assert y.dtype == dtype and y.shape == (M, N)
        floor = 2.0 ** -24 * math.sqrt(K) * float((x.double().abs() @ W64.abs().T).norm()
                                                  / y64.norm())
        err = rel_err(y, y64)
        for other in (x @ W64.to(dtype).T, y_gemm, y_scalar):
            assert err <= 2 * rel_err(other, y64) + floor, (dtype, err, rel_err(other, y64))


def test_gemv_rows_setting_is_checked():
    default = tasa_ext.ops.gemv_rows()
    assert 1 <= default <= tasa_ext.ops.GEMV_ROWS_MAX
    for bad in (0, tasa_ext.ops.GEMV_ROWS_MAX + 1, -3, True, 2.0):
        with pytest.raises(ValueError, match="gemv rows"):
            tasa_ext.ops.set_gemv_rows(bad)
    try:
        tasa_ext.ops.set_gemv_rows(3)
        assert tasa_ext.ops.gemv_rows() == 3
    finally:
        tasa_ext.ops.set_gemv_rows(None)
    assert tasa_ext.ops.gemv_rows() == default


def test_x_pieces_setting_is_checked():
    default = tasa_ext.ops.x_pieces()
    assert default in (2, 3)
    for bad in (1, 4, 0, True, 2.0):
        with pytest.raises(ValueError, match="x_pieces"):
            tasa_ext.ops.set_x_pieces(bad)
    try:
        tasa_ext.ops.set_x_pieces(5 - default)
        assert tasa_ext.ops.x_pieces() == 5 - default
        assert tasa_ext.ops.build_info()["x_pieces"] == 5 - default
    finally:
        tasa_ext.ops.set_x_pieces(None)
    assert tasa_ext.ops.x_pieces() == default


@pytest.mark.parametrize("M", [1, 4, 70])
def test_gemm_nonfinite_x_propagates(isa, M):
    """A NaN/Inf in x makes exactly the outputs that read it non-finite, on every path (the
    AVX-512 GEMV splits x into bf16 pieces: a NaN must not become Inf, Inf - Inf no NaN)."""
    p = random_packed(40, 256, 64, BIT_PATTERNS["mix"], False, False)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 64)
    x = torch.randn(M, 256)
    x[0, 5] = float("nan")
    x[-1, 77] = float("inf")
    y = tasa_ext.gemm(x, *args)
    assert torch.isnan(y[0]).all()
    if M > 1:
        assert torch.isfinite(y[1:-1]).all()
        assert (~torch.isfinite(y[-1])).all()
    x2 = torch.randn(1, 256)
    x2[0, 9] = float("inf")
    y2 = tasa_ext.gemm(x2, *args)
    W = ref.dequant(*args)
    expect = x2.double() @ W.double().T            # +-Inf, or NaN where the weight is 0
    assert torch.equal(torch.isnan(y2), torch.isnan(expect))
    assert torch.equal(torch.isinf(y2), torch.isinf(expect))
    assert torch.equal(torch.sign(y2[torch.isinf(y2)]), torch.sign(expect[torch.isinf(expect)]).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["u2", "u3", "u4", "u8", "mix"])
@pytest.mark.parametrize("N,K,G,asym,act_order", [(700, 768, 128, True, True),
                                                   (33, 96, 32, False, False),
                                                   (1, 320, 64, True, False)])
def test_dense_path_dequantizes_bit_exactly(isa, dense_rows, dtype, pattern, N, K, G, asym,
                                            act_order):
    """x = the identity (K one-hot rows, channel order) makes the dense path's output its
    dequantized W^T itself: sums of one exact product. fp32 must equal tasa_ext.dequant (the
    exact value rounded once) bit for bit, bf16 that rounded to nearest even; on every ISA (the
    AVX-512 kernel and its scalar twin), with perm, zeros, a partial last column block and, at
    N = 700, several column chunks."""
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order, seed=N + K)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    dense_rows(1)
    try:
        tasa_ext.ops._C.set_dense_chunk_bytes(64 << 10)     # N = 700: 9-10 chunks, ragged tail
        y = tasa_ext.gemm(torch.eye(K, dtype=dtype), *args)
    finally:
        tasa_ext.ops._C.set_dense_chunk_bytes(0)
    W = tasa_ext.dequant(*args)
    assert torch.equal(W, ref.dequant(*args))
    assert torch.equal(y, W.T.to(dtype))


def _runs_dense(x, args) -> bool:
    """Whether gemm took the dense path: only it calls torch's matmul (aten::mm), which the
    profiler records whatever the CPU (a numeric tell, bf16 rounding, differs by ISA: the dense
    path rounds W to bf16 only from AVX-512 on, and the AMX fused kernel rounds it too; CI's
    machine made a numeric version of this test fail)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tasa_ext.gemm(x, *args)
    return any(e.name == "aten::mm" for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_threshold_picks_the_path(isa, dense_rows, dtype):
    """Below the threshold the fused kernel runs, from it on the dense path, on every ISA; the
    dense path's numbers are bf16 x bf16-rounded W where the ISA has AVX-512 (as a bf16 model's
    weights are) and fp32 semantics otherwise; the default is the measured DENSE_ROWS_DEFAULT
    and a bad threshold is refused."""
    assert tasa_ext.ops.dense_rows() == tasa_ext.ops.DENSE_ROWS_DEFAULT > 1
    p = random_packed(48, 256, 64, BIT_PATTERNS["mix"], True, False, seed=3)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 64)
    x = torch.randn(8, 256).to(dtype)
    dense_rows(0)
    assert not _runs_dense(x, args)
    dense_rows(9)
    assert not _runs_dense(x, args)                             # 8 rows < 9: fused
    dense_rows(8)
    assert _runs_dense(x, args)
    dense = tasa_ext.gemm(x, *args)
    W = tasa_ext.dequant(*args)
    if dtype == torch.bfloat16 and isa not in ("scalar", "avx2"):
        torch.testing.assert_close(dense, x @ W.to(dtype).T)
    else:
        torch.testing.assert_close(dense, (x.float() @ W.T).to(dtype))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense rows"):
            tasa_ext.ops.set_dense_rows(bad)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N", [17, 53, 100, 161])
@pytest.mark.parametrize("M", [2, 16, 33])
def test_gemm_every_column_block_count(isa, dense_rows, threads, N, M):
    """The GEMMs walk column blocks in passes (the AMX kernel takes up to 4 blocks per pass, the
    threads split the blocks in pairs): 2 to 11 blocks, ragged last blocks, 1 and 2 threads,
    16-row chunks with a padded tail; against float64 within 2x torch's own error."""
    p = random_packed(N, 384, 64, BIT_PATTERNS["mix"], True, True, seed=N * M)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 64)
    W64 = ref.dequant(*args, dtype=torch.float64)
    dense_rows(0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, 384).to(dtype)
            y64 = x.double() @ W64.T
            err = rel_err(tasa_ext.gemm(x, *args), y64)
            err_torch = rel_err(x @ W64.to(dtype).T, y64)
            assert err <= 2 * err_torch + 1e-7, (dtype, err, err_torch)
    finally:
        torch.set_num_threads(old)


def test_gemm_batched_leading_dims():
    p = random_packed(40, 256, 32, BIT_PATTERNS["mix35"], True, False)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 32)
    x = torch.randn(2, 3, 256)
    y = tasa_ext.gemm(x, *args)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, tasa_ext.gemm(x.reshape(6, 256), *args).reshape(2, 3, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hessian_matches_gptq_formula(isa, dtype):
    K, S = 45, 3
    H = torch.zeros(S, K, K)
    count = torch.zeros(S, dtype=torch.long)
    H64 = torch.zeros(S, K, K, dtype=torch.float64)
    n = [0] * S
    for step in range(3):
        T = 300 + 37 * step
        X = torch.randn(T, K).to(dtype)
        src = torch.randint(0, S, (T,))
        tasa_ext.hessian_accumulate_(H, X, src, count)
        for s in range(S):                       # GPTQ's add_batch, in float64
            xs = X[src == s].double()
            m = xs.shape[0]
            H64[s] *= n[s] / (n[s] + m)
            n[s] += m
            xs = math.sqrt(2 / n[s]) * xs
            H64[s] += xs.T @ xs
    assert count.tolist() == n
    assert torch.equal(H, H.transpose(1, 2))
    assert float((H.double() - H64).abs().max() / H64.abs().max()) < 1e-5


def test_hessian_single_source_and_reference():
    K = 70
    X = torch.randn(513, K)
    H, c = torch.zeros(1, K, K), torch.zeros(1, dtype=torch.long)
    Hr, cr = torch.zeros(1, K, K), torch.zeros(1, dtype=torch.long)
    tasa_ext.hessian_accumulate_(H, X, None, c)
    ref.hessian_accumulate_(Hr, X, None, cr)
    torch.testing.assert_close(H, Hr, rtol=1e-5, atol=1e-5)
    assert int(c) == int(cr) == 513


def _sample_args():
    p = random_packed(37, 256, 64, BIT_PATTERNS["mix"], True, True)
    return p, (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 64)


def _gptq_cols_args(N, B, maxq, seed, c0=0, c1=None):
    """A block of GPTQ: W [N, B], U the upper Cholesky factor of a random SPD matrix's inverse,
    one group's (scale, zero) per row from the columns [c0, c1)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, B, generator=g)
    X = torch.randn(3 * B, B, generator=g)
    H = X.T @ X / (3 * B) + 0.01 * torch.eye(B)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    c1 = B if c1 is None else c1
    lo, hi = W[:, c0:c1].amin(1), W[:, c0:c1].amax(1)
    scale = ((hi - lo) / maxq).clamp(min=1e-6)
    zero = torch.round(-lo / scale)
    return W, U.contiguous(), scale, zero


@pytest.mark.parametrize("N,B,c0,c1,maxq", [(1, 32, 0, 32, 7), (37, 96, 32, 64, 15),
                                            (50, 160, 0, 160, 255), (19, 128, 96, 128, 3)])
def test_gptq_cols_matches_reference_bit_for_bit(N, B, c0, c1, maxq):
    W, U, scale, zero = _gptq_cols_args(N, B, maxq, seed=N + B, c0=c0, c1=c1)
    outs = []
    for f in (tasa_ext.gptq_cols_, ref.gptq_cols_):
        w = W.clone()
        codes = torch.full((N, B), 77, dtype=torch.uint8)
        err = torch.full((N, B), -1.0)
        f(w, U, scale, zero, maxq, c0, c1, codes, err)
        outs.append((w, codes, err))
    (w, codes, err), (wr, cr, er) = outs
    assert torch.equal(codes, cr) and torch.equal(err, er) and torch.equal(w, wr)
    # only columns [c0, c1) are written; the codes span the range; later columns moved
    assert codes[:, :c0].eq(77).all() and codes[:, c1:].eq(77).all()
    assert int(codes[:, c0:c1].max()) == maxq and int(codes[:, c0:c1].min()) == 0
    if c1 < B:
        assert not torch.equal(w[:, c1:], W[:, c1:])


def test_gptq_cols_refuses_bad_scales_and_shapes():
    W, U, scale, zero = _gptq_cols_args(5, 64, 15, seed=0)
    codes, err = torch.empty(5, 64, dtype=torch.uint8), torch.empty(5, 64)
    bad = scale.clone()
    bad[3] = 0.0
    with pytest.raises(RuntimeError, match="NaN or Inf|scale"):
        tasa_ext.gptq_cols_(W.clone(), U, bad, zero, 15, 0, 32, codes, err)
    bad[3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf|scale"):
        tasa_ext.gptq_cols_(W.clone(), U, bad, zero, 15, 0, 32, codes, err)
    with pytest.raises(RuntimeError, match="U must have shape"):
        tasa_ext.gptq_cols_(W.clone(), U[:32, :32].contiguous(), scale, zero, 15, 0, 32, codes, err)
    with pytest.raises(RuntimeError, match="outside"):
        tasa_ext.gptq_cols_(W.clone(), U, scale, zero, 15, 32, 65, codes, err)
    with pytest.raises(RuntimeError, match="maxq"):
        tasa_ext.gptq_cols_(W.clone(), U, scale, zero, 256, 0, 32, codes, err)


def _mse_weight(mode, W, seed):
    g = torch.Generator().manual_seed(seed)
    if mode == "none":
        return None
    if mode == "shared":
        return torch.rand(W.shape[-1], generator=g) * 3
    w = torch.rand(W.shape, generator=g) * 3
    w[..., ::5] = 0.0                                   # zero weights: columns the error ignores
    return w


def _mse_err(W, s, z, bits, weight):
    """Each row's weighted squared error with parameters (s, z), in float64."""
    q = torch.clamp(torch.round(W / s[..., None]) + z[..., None], 0, 2 ** bits - 1)
    d2 = ((W - (q - z[..., None]) * s[..., None]) ** 2).double()
    return (d2 * weight.double() if weight is not None else d2).sum(-1)


@pytest.mark.parametrize("shape", [(1, 32), (37, 128), (3, 11, 64), (577, 96)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("wmode", ["none", "shared", "full"])
def test_mse_params_matches_reference(isa, shape, bits, sym, wmode):
    """The clipping-search kernel (its AVX2 error loop and its scalar one) returns the torch
    search's (scale, zero) on random rows of odd sizes (outlier rows, an all-zero row, a constant row); where the two differ (the kernel
    sums errors in double, torch pairwise in fp32) the errors of the two choices are equal to
    rounding."""
    g = torch.Generator().manual_seed(bits * 100 + len(shape))
    W = torch.randn(shape, generator=g)
    W.view(-1, shape[-1])[0, 3] *= 40                   # an outlier the clipping should cut
    if W.numel() // shape[-1] > 2:
        W.view(-1, shape[-1])[1] = 0.0
        W.view(-1, shape[-1])[2] = 0.37
    weight = _mse_weight(wmode, W, seed=bits)
    shrink = torch.tensor([1.0 - 0.025 * i for i in range(21)])
    s, z = tasa_ext.mse_params(W, bits, sym, weight, shrink)
    rs, rz = ref.mse_params(W, bits, sym, weight, shrink)
    assert s.shape == z.shape == W.shape[:-1]
    same = (s == rs) & (z == rz)
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} of {same.numel()} rows differ"
    if not same.all():
        e, re = _mse_err(W, s, z, bits, weight), _mse_err(W, rs, rz, bits, weight)
        torch.testing.assert_close(e[~same], re[~same], rtol=1e-5, atol=1e-9)
    # every (s, z) is one of the candidates: s fp16-exact and > 0, z an integer code
    assert (s > 0).all() and torch.equal(s.half().float(), s)
    assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 2 ** bits - 1).all()


def test_mse_params_beats_min_max_and_refuses_bad_input():
    """The search never loses to its own first candidate (min/max) on the weighted error, and
    bad shapes, widths, dtypes and empty candidate lists are refused with the reason."""
    W = torch.randn(200, 64)
    W[:, 7] *= 25
    weight = torch.rand(200, 64)
    shrink = torch.tensor([1.0 - 0.025 * i for i in range(21)])
    s, z = tasa_ext.mse_params(W, 3, False, weight, shrink)
    s0, z0 = tasa_ext.mse_params(W, 3, False, weight, shrink[:1])
    e, e0 = _mse_err(W, s, z, 3, weight), _mse_err(W, s0, z0, 3, weight)
    assert (e <= e0).all() and (e < e0).float().mean() > 0.5
    with pytest.raises(RuntimeError, match="weight must have shape"):
        tasa_ext.mse_params(W, 3, False, torch.rand(63), shrink)
    with pytest.raises(RuntimeError, match="bits"):
        tasa_ext.mse_params(W, 9, False, None, shrink)
    with pytest.raises(RuntimeError, match="shrink"):
        tasa_ext.mse_params(W, 3, False, None, torch.tensor([]))
    with pytest.raises(RuntimeError, match="float32|Float|dtype"):
        tasa_ext.mse_params(W.double(), 3, False, None, shrink)


@pytest.mark.parametrize("H,KV,hd,L,pos", [(9, 3, 64, 50, 0), (9, 3, 64, 50, 37), (14, 2, 64, 300, 299),
                                            (5, 5, 6, 7, 3), (4, 1, 130, 2000, 1500), (3, 1, 2, 1, 0)])
def test_decode_attention_matches_reference(H, KV, hd, L, pos):
    """The decode step's fused attention against its torch semantics on odd sizes (GQA and MHA,
    an odd number of heads, hd = 2 and 130, the first and the last cache slot, a long context
    that takes the threaded loop): q and k rotated in place and the cache rows written bit for
    bit as transformers rounds them (nothing else in the caches touched), the attention output
    within fp32 rounding of float64."""
    g = torch.Generator().manual_seed(H * 1000 + pos)
    qkv = torch.randn((H + 2 * KV) * hd, generator=g)
    cos, sin = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    kc, vc = torch.randn(KV, L, hd, generator=g), torch.randn(KV, L, hd, generator=g)
    a = [qkv.clone(), cos, sin, kc.clone(), vc.clone()]
    b = [qkv.clone(), cos, sin, kc.clone(), vc.clone()]
    out = tasa_ext.ops.decode_attention_(*a, H, pos, 0.3)
    want = ref.decode_attention_(*b, H, pos, 0.3)
    for got, exp in ((a[0], b[0]), (a[3], b[3]), (a[4], b[4])):
        assert torch.equal(got, exp)
    others = torch.ones(L, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(a[3][:, others], kc[:, others]) and torch.equal(a[4][:, others], vc[:, others])
    assert out.shape == (H * hd,)
    # sequential fp32 sums over pos + 1 probabilities and hd products: u * (T + hd) per term of
    # size max|V| (a wrong position, head or rotation is off by O(max|V|))
    tol = 4 * 2.0 ** -24 * (pos + 1 + hd) * float(b[4].abs().max())
    assert float((out - want).abs().max()) <= tol


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 577), (7, 1), (2, 33)])
def test_rms_norm_matches_reference_and_transformers(shape):
    """RMSNorm rows of odd widths against the torch semantics (equal except where the double sum
    of squares rounds to the neighbouring float: 1 ulp of the variance) and against
    transformers' LlamaRMSNorm formula in fp32 (to fp32 rounding)."""
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])
    w = torch.randn(shape[-1], generator=g)
    y = tasa_ext.ops.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, ref.rms_norm(x, w, 1e-6), rtol=2.0 ** -21, atol=0)
    rows_equal = (y == ref.rms_norm(x, w, 1e-6)).reshape(-1, shape[-1]).all(-1)
    assert rows_equal.float().mean() >= 0.5
    hf = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(y, hf, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="rms_norm needs"):
        tasa_ext.ops.rms_norm(x, w[:-1], 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        tasa_ext.ops.rms_norm(x.double(), w, 1e-6)


def _decode_stack(seed, n_layers=2, D=64, H=3, KV=1, hd=32, I=96, L=9, bias=True, B=None):
    """Random arguments of tasa_ext.ops.decode_layers_: every layer's matrices of other widths,
    modes, permutations and rotations (group size 32), q/k/v and gate/up fused in even layers
    and apart in odd ones, biases on q/k/v, gate/up and down, caches holding random earlier
    positions; ``B`` streams: h [B, D] and caches [B, KV, L, hd]."""
    g = torch.Generator().manual_seed(seed)
    pats = list(BIT_PATTERNS.values())
    tensors, ints = [], []
    for li in range(n_layers):
        fused = li % 2 == 0
        qkv = [((H + 2 * KV) * hd, D), None, None] if fused else [(H * hd, D), (KV * hd, D), (KV * hd, D)]
        gu = [(2 * I, D), None] if fused else [(I, D), (I, D)]
        tensors += [torch.rand(D, generator=g) + 0.5 for _ in range(2)]
        for j, shape in enumerate(qkv + [(D, H * hd)] + gu + [(D, I)]):
            if shape is None:
                tensors += [None] * 6
                ints += [32, 0]
                continue
            N, K = shape
            k = seed + 7 * li + j
            p = random_packed(N, K, 32, pats[k % len(pats)], asym=k % 2 == 0,
                              act_order=k % 3 == 0, seed=k)
            b = torch.randn(N, generator=g) * 0.1 if bias and j != 3 else None
            tensors += [p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], b]
            ints += [32, k % 2]
    lead = () if B is None else (B,)
    kc = [torch.randn(*lead, KV, L, hd, generator=g) for _ in range(n_layers)]
    vc = [torch.randn(*lead, KV, L, hd, generator=g) for _ in range(n_layers)]
    cos, sin = torch.randn(L, hd, generator=g), torch.randn(L, hd, generator=g)
    return torch.randn(*lead, D, generator=g), tensors, ints, kc, vc, cos, sin, H


@pytest.mark.parametrize("seed,n_layers,KV,pos,bias", [(0, 2, 1, 5, True), (1, 3, 3, 0, False),
                                                       (2, 1, 1, 8, True)])
def test_decode_layers_match_the_ops_they_compose(seed, n_layers, KV, pos, bias):
    """One token through a stack of decoder layers in one op against the same ops called one by
    one (tasa_ext.ops: rms_norm, gemm with rotation + bias, decode_attention_) and against the
    float64 reference: the caches equal the op-by-op path's to fp32 rounding (only SiLU's exp
    may differ in the last bit), h and the caches close to float64's, and nothing else in the
    caches touched."""
    h, t, i, kc, vc, cos, sin, H = _decode_stack(seed, n_layers, KV=KV, bias=bias)
    runs = {}
    for name, ops, xp in (("op", None, 3), ("ops", tasa_ext.ops, 3), ("ref", ref, 3),
                          ("op2", None, 2), ("ops2", tasa_ext.ops, 2)):
        a = [h.clone(), t, i, [c.clone() for c in kc], [c.clone() for c in vc], cos, sin]
        if ops is None:
            tasa_ext.ops.decode_layers_(*a, H, pos, 1e-5, 0.2, x_pieces=xp)
        else:
            try:
                tasa_ext.ops.set_x_pieces(xp)        # the gemm op's pieces (ref: ignored)
                ref.decode_layers_(*a, H, pos, 1e-5, 0.2, ops=ops)
            finally:
                tasa_ext.ops.set_x_pieces(None)
        runs[name] = (a[0], torch.stack(a[3]), torch.stack(a[4]))
    for op, ops in (("op", "ops"), ("op2", "ops2")):      # x_pieces reaches the GEMVs
        for got, want in zip(runs[op], runs[ops]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for op in ("op", "op2"):
        for got, want in zip(runs[op], runs["ref"]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    others = torch.ones(kc[0].shape[1], dtype=torch.bool)
    others[pos] = False
    assert torch.equal(runs["op"][1][:, :, others], torch.stack(kc)[:, :, others])
    assert torch.equal(runs["op"][2][:, :, others], torch.stack(vc)[:, :, others])
    assert not torch.equal(runs["op"][0], h)


@pytest.mark.parametrize("B,pos", [(2, [5, 5]), (3, [0, 8, 3]), (5, [1, 2, 3, 4, 8])])
def test_decode_layers_batch_of_streams(B, pos):
    """B streams' tokens through the stack in one call (batched decode): each stream's h and
    caches as its own single-stream call gives them, to the rounding of one gemm over B rows
    against B GEMVs (the row-shared GEMM, fp32 x; the GEMVs' x in 3 int8 pieces), and close to
    the float64 reference; streams at different positions, the same position, and each stream's
    cache rows other than its own position untouched; one stream given as a list of one
    position is the single-stream call exactly."""
    h, t, i, kc, vc, cos, sin, H = _decode_stack(11 + B, n_layers=3, KV=3, B=B)
    batch = [h.clone(), t, i, [c.clone() for c in kc], [c.clone() for c in vc], cos, sin]
    tasa_ext.ops.decode_layers_(*batch, H, pos, 1e-5, 0.2)
    ref_run = [h.clone(), t, i, [c.clone() for c in kc], [c.clone() for c in vc], cos, sin]
    ref.decode_layers_(*ref_run, H, pos, 1e-5, 0.2)
    for b in range(B):
        one = [h[b].clone(), t, i, [c[b].clone() for c in kc], [c[b].clone() for c in vc], cos, sin]
        tasa_ext.ops.decode_layers_(*one, H, pos[b], 1e-5, 0.2)
        got = (batch[0][b], torch.stack([c[b] for c in batch[3]]), torch.stack([c[b] for c in batch[4]]))
        want = (one[0], torch.stack(one[3]), torch.stack(one[4]))
        exact = (ref_run[0][b], torch.stack([c[b] for c in ref_run[3]]),
                 torch.stack([c[b] for c in ref_run[4]]))
        for g_, w_, e_ in zip(got, want, exact):
            torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4 * float(w_.abs().max()))
            torch.testing.assert_close(g_, e_, rtol=1e-3, atol=1e-3 * float(e_.abs().max()))
        others = torch.ones(kc[0].shape[2], dtype=torch.bool)
        others[pos[b]] = False
        assert torch.equal(got[1][:, :, others], torch.stack([c[b] for c in kc])[:, :, others])
        assert not torch.equal(got[0], h[b])
    # one stream as a list: the int call exactly
    h1, t1, i1, kc1, vc1, cos1, sin1, H1 = _decode_stack(3)
    a = [h1.clone(), t1, i1, [c.clone() for c in kc1], [c.clone() for c in vc1], cos1, sin1]
    b_ = [h1.clone(), t1, i1, [c.clone() for c in kc1], [c.clone() for c in vc1], cos1, sin1]
    tasa_ext.ops.decode_layers_(*a, H1, 4, 1e-5, 0.2)
    tasa_ext.ops.decode_layers_(*b_, H1, [4], 1e-5, 0.2)
    assert torch.equal(a[0], b_[0]) and all(torch.equal(x, y) for x, y in zip(a[3], b_[3]))


def test_decode_layers_refuse_bad_input():
    h, t, i, kc, vc, cos, sin, H = _decode_stack(3)
    op = tasa_ext.ops.decode_layers_
    with pytest.raises(RuntimeError, match="44 tensors and 14 ints per layer"):
        op(h, t[:-1], i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(h, t, i, kc, vc, cos, sin, H, 9, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="do not fit"):
        op(h, t, i, kc, vc, cos, sin, H + 1, 0, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="norm weight"):
        op(h[:-32], t, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        op(h.double(), t, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="cos and sin"):
        op(h, t, i, kc, vc, cos[:-1], sin, H, 0, 1e-5, 1.0)
    bad = list(t)
    bad[7] = torch.zeros(5)                       # q/k/v's bias of the wrong length
    with pytest.raises(RuntimeError, match="bias has 5 values"):
        op(h, bad, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    bad = list(t)
    bad[3] = bad[3][:, :-16]                      # q/k/v's scales cut short
    with pytest.raises(RuntimeError, match="scales|N="):
        op(h, bad, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    bad = list(t)
    bad[44 + 2 + 6 * 2: 44 + 8 + 6 * 2] = [None] * 6     # layer 1 (apart): k without v
    with pytest.raises(RuntimeError, match="k without v"):
        op(h, bad, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    bad = list(t)
    bad[44 + 2 + 6 * 5] = t[44 + 2 + 6 * 4]              # layer 1's up: gate's codes, one row short
    bad[44 + 2 + 6 * 5] = bad[44 + 2 + 6 * 5][:, :-1]
    with pytest.raises(RuntimeError, match="packed rows|qweight"):
        op(h, bad, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    bad = list(t)
    bad[2 + 6 * 1 + 1] = t[3]                    # layer 0 (fused): scales but no qweight in k
    with pytest.raises(RuntimeError, match="no qweight"):
        op(h, bad, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="cache has shape"):
        op(h, t, i, kc, [vc[0], vc[1][:, :-1]], cos, sin, H, 0, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="x_pieces must be 2 or 3"):
        op(h, t, i, kc, vc, cos, sin, H, 0, 1e-5, 1.0, x_pieces=1)
    # several streams: h, caches and positions must agree on B
    hb, tb, ib, kb, vb, cb, sb, Hb = _decode_stack(3, B=2)
    with pytest.raises(RuntimeError, match=r"h must be \[B=3"):
        op(hb, tb, ib, kb, vb, cb, sb, Hb, [0, 1, 2], 1e-5, 1.0)
    with pytest.raises(RuntimeError, match=r"k_caches must be \[B=2"):
        op(hb, tb, ib, kc, vc, cb, sb, Hb, [0, 1], 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(hb, tb, ib, kb, vb, cb, sb, Hb, [0, 9], 1e-5, 1.0)
    with pytest.raises(RuntimeError, match="one position per stream"):
        op(hb, tb, ib, kb, vb, cb, sb, Hb, [], 1e-5, 1.0)


def test_decode_attention_refuses_bad_input():
    qkv, cs = torch.randn((4 + 2 * 2) * 8), torch.randn(8)
    kc = torch.zeros(2, 10, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        tasa_ext.ops.decode_attention_(qkv, cs, cs, kc, kc.clone(), 4, 10, 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV"):
        tasa_ext.ops.decode_attention_(qkv, cs, cs, kc, kc.clone(), 3, 0, 1.0)
    with pytest.raises(RuntimeError, match="qkv must hold"):
        tasa_ext.ops.decode_attention_(qkv[:-1], cs, cs, kc, kc.clone(), 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="cos and sin"):
        tasa_ext.ops.decode_attention_(qkv, cs[:6], cs, kc, kc.clone(), 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        tasa_ext.ops.decode_attention_(qkv.double(), cs, cs, kc, kc.clone(), 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="one shape"):
        tasa_ext.ops.decode_attention_(qkv, cs, cs, kc, torch.zeros(2, 9, 8), 4, 0, 1.0)


@pytest.mark.parametrize("op", ["pack", "unpack", "dequant", "embed", "gemm", "hessian_accumulate_",
                                "gptq_cols_", "mse_params", "decode_attention_", "rms_norm",
                                "decode_layers_"])
def test_opcheck(op):
    p, args = _sample_args()
    samples = {
        "pack": [(p["codes"], p["gb"], 64)],
        "unpack": [(p["qweight"], p["gtable"], 37, 64)],
        "dequant": [args, (p["qweight"], p["scales"], None, p["gtable"], None, 64)],
        "embed": [(torch.tensor([[0, 36, 5]]),) + args,
                  (torch.tensor([2]), p["qweight"], p["scales"], None, p["gtable"], None, 64)],
        "gemm": [(torch.randn(3, 256),) + args, (torch.randn(1, 256).bfloat16(),) + args,
                 (torch.randn(2, 5, 256).half(), p["qweight"], p["scales"], None, p["gtable"], None, 64)],
        "hessian_accumulate_": [(torch.zeros(2, 33, 33), torch.randn(20, 33), torch.randint(0, 2, (20,)),
                                 torch.zeros(2, dtype=torch.long))],
        "gptq_cols_": [(*_gptq_cols_args(7, 64, 7, seed=1)[:2], *_gptq_cols_args(7, 64, 7, seed=1)[2:],
                        7, 0, 32, torch.zeros(7, 64, dtype=torch.uint8), torch.zeros(7, 64))],
        "mse_params": [(torch.randn(9, 64), 3, False, torch.rand(64), torch.tensor([1.0, 0.9, 0.8])),
                       (torch.randn(2, 5, 32), 4, True, None, torch.tensor([1.0, 0.95]))],
        "decode_attention_": [(torch.randn((6 + 2 * 2) * 8), torch.randn(8), torch.randn(8),
                               torch.randn(2, 12, 8), torch.randn(2, 12, 8), 6, 5, 0.35)],
        "rms_norm": [(torch.randn(3, 4, 40), torch.randn(40), 1e-5), (torch.randn(1, 9), torch.randn(9), 1e-6)],
        "decode_layers_": [_decode_stack(4)[:7] + (3, [2], 1e-5, 0.2),
                           _decode_stack(5)[:7] + (3, [0], 1e-5, 0.2, 2),
                           _decode_stack(6, B=3)[:7] + (3, [4, 0, 8], 1e-5, 0.2)],
    }[op]
    for s in samples:
        opcheck(getattr(torch.ops.tasa, op).default, s)


def test_gemm_under_torch_compile():
    p, args = _sample_args()
    x = torch.randn(4, 256)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x):
        return tasa_ext.gemm(torch.relu(x), *args) * 2

    torch.testing.assert_close(f(x), tasa_ext.gemm(torch.relu(x), *args) * 2)


# ---- bad inputs: each error names the argument ---------------------------------------------------

def test_bad_bits():
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="group_bits"):
        tasa_ext.pack(codes, torch.tensor([4, 5], dtype=torch.int32), 32)
    with pytest.raises(RuntimeError, match="group_bits"):
        tasa_ext.pack(codes, torch.tensor([4, 4, 4], dtype=torch.int32), 32)


def test_bad_group_size():
    codes = torch.zeros(8, 96, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="not divisible by group_size"):
        tasa_ext.pack(codes, torch.tensor([4], dtype=torch.int32), 64)
    with pytest.raises(RuntimeError, match="group_size"):
        tasa_ext.pack(codes, torch.tensor([4, 4], dtype=torch.int32), 48)


def test_code_out_of_range():
    codes = torch.full((4, 32), 9, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="codes"):
        tasa_ext.pack(codes, torch.tensor([3], dtype=torch.int32), 32)


def test_bad_dtype_device_and_layout():
    p, args = _sample_args()
    with pytest.raises(RuntimeError, match="x must be float32"):
        tasa_ext.gemm(torch.ones(2, 256, dtype=torch.int32), *args)
    with pytest.raises(RuntimeError, match="scales must have dtype"):
        tasa_ext.gemm(torch.randn(2, 256), p["qweight"], p["scales"].float(), *args[2:])
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        tasa_ext.gemm(torch.randn(256, 2).T, *args)
    with pytest.raises(RuntimeError, match="x must have last dimension"):
        tasa_ext.gemm(torch.randn(2, 255), *args)
    with pytest.raises(RuntimeError, match="x is on meta"):
        tasa_ext.gemm(torch.randn(2, 256, device="meta"), *args)
    with pytest.raises(RuntimeError, match="codes must have dtype"):
        tasa_ext.pack(p["codes"].int(), p["gb"], 64)
    with pytest.raises(RuntimeError, match="perm"):
        bad = p["perm"].clone()
        bad[0] = bad[1]
        tasa_ext.gemm(torch.randn(2, 256), p["qweight"], p["scales"], p["zeros"], p["gtable"], bad, 64)
    with pytest.raises(RuntimeError, match="gtable"):
        gt = p["gtable"].clone()
        gt[0, 1] += 1
        tasa_ext.gemm(torch.randn(2, 256), p["qweight"], p["scales"], p["zeros"], gt, p["perm"], 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("M", [1, 5, 70])
def test_nonfinite_scales(isa, bad, M):
    p, args = _sample_args()
    s = p["scales"].clone()
    s[1, 7] = bad
    with pytest.raises(RuntimeError, match="NaN or Inf.*scales"):
        tasa_ext.gemm(torch.randn(M, 256), p["qweight"], s, *args[2:])
    with pytest.raises(RuntimeError, match="NaN or Inf.*scales"):
        tasa_ext.dequant(p["qweight"], s, *args[2:])


def test_cost_bits_counts_every_stored_bit():
    N, K, G = 37, 256, 64
    bits = [3, 4, 3, 8]
    n_pad = 48
    codes = sum(b * G * n_pad for b in bits)
    base = codes + 16 * 4 * N + 96 * 4
    assert tasa_ext.cost_bits(N, K, G, bits, "sym") == base
    assert tasa_ext.cost_bits(N, K, G, bits, "asym") == base + 16 * 4 * N
    assert tasa_ext.cost_bits(N, K, G, bits, "asym", act_order=True) == base + 16 * 4 * N + 32 * K
    p = random_packed(N, K, G, bits, asym=True, act_order=True)
    stored = (p["qweight"].numel() * 32 + p["scales"].numel() * 16 + p["zeros"].numel() * 16
              + p["gtable"].numel() * 32 + p["perm"].numel() * 32)
    assert tasa_ext.cost_bits(N, K, G, bits, "asym", act_order=True) == stored
    assert tasa_ext.average_bits(4096, 4096, 128, [4] * 32, "sym") == pytest.approx(4 + 16 / 128 + 96 / 128 / 4096)
    with pytest.raises(RuntimeError, match="unsupported width 5"):
        tasa_ext.cost_bits(N, K, G, [3, 4, 5, 8])


def test_set_cpu_isa_rejects_unknown():
    with pytest.raises(ValueError, match="unknown ISA"):
        tasa_ext.set_cpu_isa("avx9000")


VNNI = "avx512vnni" in tasa_ext.ops.cpu_isas_available()
AVX2 = "avx2" in tasa_ext.ops.cpu_isas_available()
# The two int8-piece GEMVs (M = 1) and the path each falls back to: the AVX-512 VNNI one (every
# width) and the AVX2 one (vpmaddubsw; its 2-, 3- and 4-bit groups, 8-bit on the float GEMV).
INT8_GEMVS = [pytest.param("avx512vnni", marks=pytest.mark.skipif(
                  not VNNI, reason="the CPU has no AVX512-VNNI: that int8-piece GEMV does not run")),
              pytest.param("avx2", marks=pytest.mark.skipif(
                  not AVX2, reason="the CPU has no AVX2: that int8-piece GEMV does not run"))]


def _gemv_path(name):
    """Selects a CPU GEMV path: "avx512vnni", "avx512", "avx2" (int8 pieces for 2/3/4-bit
    groups), "avx2-float" (the same ISA with that path off)."""
    tasa_ext.set_cpu_isa(name.split("-")[0])
    tasa_ext.ops.set_gemv_i8(False if name.endswith("-float") else None)


def _gemv_reset():
    tasa_ext.set_cpu_isa("auto")
    tasa_ext.ops.set_gemv_i8(None)


FALLBACK = {"avx512vnni": "avx512", "avx2": "avx2-float"}


def _x_piece_bound(x, W64, G, perm, nq):
    """sum_k |W_nk| * max|x_g(k)| * 254^-nq: the int8-piece GEMVs' documented x error, per output."""
    K = x.shape[1]
    logical = x[0, perm.long()] if perm is not None else x[0]
    gmax = logical.double().abs().reshape(K // G, G).amax(1).repeat_interleave(G)
    e = torch.empty(K, dtype=torch.float64)
    e[perm.long() if perm is not None else torch.arange(K)] = gmax * 254.0 ** -nq
    return W64.abs() @ e


@pytest.mark.parametrize("path", INT8_GEMVS)
@pytest.mark.parametrize("dtype,nq", [(torch.bfloat16, 2), (torch.float16, 3), (torch.float32, 3),
                                      (torch.float32, 2)])
@pytest.mark.parametrize("pattern", ["u2", "u3", "u4", "u8", "mix"])
@pytest.mark.parametrize("N,K,G,asym,act_order", [(45, 640, 128, False, False), (19, 288, 32, True, True),
                                                  (70, 192, 64, True, False)])
def test_int8_gemv_within_its_x_piece_bound(path, dtype, nq, pattern, N, K, G, asym, act_order):
    """The int8-piece GEMVs' error is the documented x_hat error (plus fp32 accumulation and the
    output rounding), on odd sizes, every width, zeros and a permutation; and it is a different
    computation from the exact path it replaces (its error is not zero where that one's is). On
    AVX2 exactly the 2-, 3- and 4-bit groups take it: outputs of 8-bit matrices are bit-equal
    with the int8 path on and off, the others are not (fp32 x). fp32 x in 2 pieces
    (``set_x_pieces(2)``) within the 2-piece bound, and not the 3-piece outputs."""
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order, seed=K + N)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    g = torch.Generator().manual_seed(N)
    x = (torch.randn(1, K, generator=g) * torch.logspace(-2, 2, K)[torch.randperm(K, generator=g)]).to(dtype)
    W64 = ref.dequant(*args, dtype=torch.float64)
    y64 = (x.double() @ W64.T)[0]
    try:
        _gemv_path(path)
        if dtype == torch.float32:
            tasa_ext.ops.set_x_pieces(5 - nq)          # the other count, to tell them apart
            y_other = tasa_ext.gemm(x, *args)[0].double()
            tasa_ext.ops.set_x_pieces(nq)
            assert tasa_ext.ops.x_pieces() == nq
        y = tasa_ext.gemm(x, *args)[0].double()
        _gemv_path(FALLBACK[path])
        y_exact = tasa_ext.gemm(x, *args)[0].double()
    finally:
        _gemv_reset()
        tasa_ext.ops.set_x_pieces(None)
    if dtype == torch.float32 and (pattern != "u8" or path == "avx512vnni"):
        assert not torch.equal(y, y_other)       # the piece count is what the GEMV used
    out_round = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10, torch.float32: 0.0}[dtype]
    accum = 2.0 ** -22 * math.sqrt(K) * (x.double().abs() @ W64.abs().T)[0]
    bound = _x_piece_bound(x, W64, G, p["perm"], nq)
    excess = (y - y64).abs() - out_round * y64.abs() - accum - 1.01 * bound
    assert (excess <= 0).all(), float(excess.max())
    if dtype == torch.float32:   # the piece error itself must show in fp32 outputs
        assert bool(((y - y64).abs() > 0).any())
        if path == "avx2":
            assert torch.equal(y, y_exact) == (pattern == "u8"), pattern


@pytest.mark.parametrize("path", INT8_GEMVS)
@pytest.mark.parametrize("scale", [0.0, 1e-33, 1e30])
def test_int8_gemv_zero_tiny_and_huge_groups(path, scale):
    """A group of zeros, one whose largest |x| is below 2^-96 (the driver falls back to the
    exact GEMV: the int8 steps would leave fp32's normal range) and a huge one."""
    p = random_packed(33, 384, 128, BIT_PATTERNS["mix"], True, False)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 128)
    x = torch.randn(1, 384)
    x[0, 128:256] *= scale
    W64 = ref.dequant(*args, dtype=torch.float64)
    y64 = x.double() @ W64.T
    try:
        _gemv_path(path)
        y = tasa_ext.gemm(x, *args)
        assert torch.isfinite(y).all()
        _gemv_path(FALLBACK[path])
        y_exact = tasa_ext.gemm(x, *args)
    finally:
        _gemv_reset()
    assert rel_err(y, y64) <= 4 * max(rel_err(y_exact, y64), 1e-7)


@pytest.mark.parametrize("path", INT8_GEMVS)
def test_int8_gemv_group_sum_overflow_falls_back(path):
    """Finite x whose group sum overflows fp32 (the quantizer, not a separate pass, detects it):
    the driver falls back and answers exactly as the exact GEMV does."""
    p = random_packed(33, 256, 128, BIT_PATTERNS["mix"], True, False)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], 128)
    x = torch.randn(1, 256)
    x[0, 130:140] = 3e38     # finite; 10 of them sum past fp32's largest value
    assert torch.isfinite(x).all()
    outs = {}
    try:
        for name in (path, FALLBACK[path]):
            _gemv_path(name)
            outs[name] = tasa_ext.gemm(x, *args)
    finally:
        _gemv_reset()
    a, b = outs[path], outs[FALLBACK[path]]
    assert torch.equal(a.isnan(), b.isnan())
    ok = ~b.isnan()
    assert torch.equal(a[ok], b[ok])


@pytest.mark.skipif(not AVX2, reason="the CPU has no AVX2: the row-shared int8 GEMV does not run")
@pytest.mark.parametrize("pattern", ["u2", "u3", "u4", "mix35", "mix"])
@pytest.mark.parametrize("M", [2, 3, 5, 8])
@pytest.mark.parametrize("N,K,G,asym,act_order", [(45, 640, 128, False, False), (19, 288, 32, True, True)])
def test_row_shared_int8_gemv_rows_equal_their_gemv(pattern, M, N, K, G, asym, act_order):
    """2 <= M <= gemv_rows with x in 2 int8 pieces (fp32 x with set_x_pieces(2), or bf16 x) on
    AVX2: the 2- to 4-bit groups go through the int8 GEMV by pairs of rows, so each row equals
    that row's own M = 1 GEMV bit for bit (a batched decode step gives each stream its
    one-stream values), odd M (a lone last row), zeros and a permutation; 8-bit groups (mix)
    stay on the float path, which is close but not bit-equal. With 3 pieces (fp32's default)
    the rows take the float path: not bit-equal to the int8 GEMV."""
    p = random_packed(N, K, G, BIT_PATTERNS[pattern], asym, act_order, seed=M + N)
    args = (p["qweight"], p["scales"], p["zeros"], p["gtable"], p["perm"], G)
    g = torch.Generator().manual_seed(M)
    x32 = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)[torch.randperm(K, generator=g)]
    W64 = ref.dequant(*args, dtype=torch.float64)
    try:
        tasa_ext.set_cpu_isa("avx2")
        tasa_ext.ops.set_gemv_rows(8)
        for x, xp in ((x32, 2), (x32.bfloat16(), 2), (x32, 3)):
            tasa_ext.ops.set_x_pieces(xp)
            y = tasa_ext.gemm(x, *args)
            rows = torch.cat([tasa_ext.gemm(x[m:m + 1], *args) for m in range(M)])
            y64 = x.double() @ W64.T
            floor = 2.0 ** -20 * math.sqrt(K) * float((x.double().abs() @ W64.abs().T).norm() / y64.norm())
            assert rel_err(y, y64) <= 2 * rel_err(rows, y64) + floor
            if xp == 2 and pattern != "mix":
                assert torch.equal(y, rows), (x.dtype, xp)
            elif x.dtype == torch.float32:   # (bf16 outputs may round the difference away)
                assert not torch.equal(y, rows), (x.dtype, xp)
    finally:
        tasa_ext.set_cpu_isa("auto")
        tasa_ext.ops.set_gemv_rows(None)
        tasa_ext.ops.set_x_pieces(None)


def test_gemv_i8_setting_is_checked():
    assert tasa_ext.ops.gemv_i8() is True        # the default
    for bad in (1, 0, "on", 1.0):
        with pytest.raises(ValueError, match="gemv_i8"):
            tasa_ext.ops.set_gemv_i8(bad)
    try:
        tasa_ext.ops.set_gemv_i8(False)
        assert tasa_ext.ops.gemv_i8() is False
    finally:
        tasa_ext.ops.set_gemv_i8(None)
    assert tasa_ext.ops.gemv_i8() is True
