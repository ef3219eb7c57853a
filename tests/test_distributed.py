"""torch.distributed data parallel (tasa.distributed): 2 gloo processes against 1 on tiny models.

Every comparison is against a one-process run on random inputs (never against numbers the code
sets): packed GPTQ weights bit for bit, Hessians bit for bit, sensitivities within float
tolerance, the whole `tasa quantize` job (measurement.json, plan, packed weights), a rank that
fails mid-run (a clear error naming it) and the rerun that resumes from measurement.json."""
from __future__ import annotations

import datetime
import json
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from tasa import distributed
from tasa.distributed import lpt_assign, split_batches

from helpers import byte_tokenizer, tiny_llama

TINY_ARGS = ["--bits", "4.3", "--group-size", "32", "--n-gen", "8", "--n-task", "8", "--n-test",
             "4", "--mix-seqlen", "32", "--n-calib", "16", "--seqlen", "32", "--eval-windows",
             "0", "--granularity", "linear", "--no-progress", "--quiet"]


# ---- pure functions ---------------------------------------------------------------------------

def test_lpt_assign_balances_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    costs = {f"u{i}": float(c) for i, c in enumerate(torch.rand(40, generator=g) * 10 + 1)}
    owner, ratio = lpt_assign(costs, 3)
    loads = [sum(c for u, c in costs.items() if owner[u] == r) for r in range(3)]
    assert ratio == pytest.approx(max(loads) / (sum(loads) / 3))
    assert ratio <= 1.2
    assert lpt_assign(dict(reversed(list(costs.items()))), 3)[0] == owner   # order-free


def test_split_batches_whole_batches_and_clear_error():
    parts = [split_batches(21, 4, 2, r) for r in range(2)]
    assert parts == [(0, 12), (12, 21)]                   # 6 batches: 3 + 3, the last short
    with pytest.raises(ValueError, match="3 ranks but only 2 calibration batches"):
        split_batches(8, 4, 3, 0)


def test_one_process_dist_is_inactive():
    d = distributed.current()
    assert not d.active and d.world == 1 and d.is_writer
    with pytest.raises(KeyError):                        # the local error, unchanged
        with d.guard("x"):
            raise KeyError("boom")


# ---- spawned ranks ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args):
    port = _free_port()
    mp.spawn(fn, args=(world, port) + args, nprocs=world, join=True)


def _init(rank, world, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), TASA_DIST_TIMEOUT="120")


def _calib(n=24, T=32, seed=1):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


def _core_worker(rank, world, port, out):
    """GPTQ with a mixed-width plan, the mixture-style multi-source Hessians and the sensitivity
    probes, under ``world`` ranks; rank 0 saves what it holds."""
    _init(rank, world, port)
    tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        from tasa import calib
        from tasa.modelquant import quantize_model
        from tasa.quant import LayerSpec, default_targets
        from tasa.sensitivity import Objective, linear_units, measure_sensitivity

        d = distributed.current()
        res = {}
        # multi-source Hessians (as the mixture stage accumulates them)
        model = tiny_llama(seed=0)
        ids = _calib()
        src = torch.arange(24) % 3
        hs = {}

        def on_block(idx, block, prefix, hessians):
            for k, (H, c) in hessians.items():
                hs[f"{prefix}.{k}"] = (H.clone(), c.clone())
            return False
        ids_r, src_r = d.shard(ids, src, 4)
        calib.run_blockwise(model, ids_r, on_block, src=src_r, n_sources=3, batch_size=4,
                            progress=False, reduce=d.reduce_hessians)
        res["hessians"] = hs
        # GPTQ, mixed widths per group
        g = torch.Generator().manual_seed(5)
        plan = {}
        for name, m in default_targets(model).items():
            n_groups = m.in_features // 32
            bits = [int(b) for b in torch.tensor([2, 3, 4, 8])[torch.randint(0, 4, (n_groups,),
                                                                             generator=g)]]
            plan[name] = LayerSpec(bits, 32, "asym")
        r = quantize_model(model, plan, "gptq", calib_ids=ids, batch_size=4, progress=False,
                           dist=d)
        res["packed"] = {k: v.clone() for k, v in model.state_dict().items()}
        res["errors"] = r["errors"]
        # the same GPTQ, lazily from the checkpoint (rank 0 writes the shards)
        from tasa.lazy import quantize_lazy
        quantize_lazy(Path(out) / "src", plan, Path(out) / f"lazy_w{world}", method="gptq",
                      calib_ids=ids, batch_size=4, progress=False, dist=d)
        res["balance"] = dict(d.balance)
        # sensitivity probes (per linear), on a fresh model
        model = tiny_llama(seed=0)
        score = torch.rand(6, 32, generator=torch.Generator().manual_seed(2)) > 0.3
        objs = [Objective("a", _calib(6, 32, 3), score),
                Objective("b", _calib(4, 32, 4), torch.ones(4, 32, dtype=torch.bool))]
        units = linear_units(model)
        seen = []
        s = measure_sensitivity(model, objs, units, widths=(3, 4), group_size=32, progress=False,
                                dist=d, on_result=lambda b, u, dd, it: seen.append(f"{b}:{u}"))
        res["sens"] = {f"{b}:{u}": v for b, per in s["delta"].items() for u, v in per.items()}
        res["base"] = s["base"]
        res["seen"] = seen
        res["balance"].update(d.balance)
        if rank == 0:
            torch.save(res, Path(out) / f"core_w{world}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    out = tmp_path_factory.mktemp("core")
    tiny_llama(seed=0).save_pretrained(out / "src")
    _spawn(_core_worker, 1, str(out))
    _spawn(_core_worker, 2, str(out))
    return [torch.load(out / f"core_w{w}.pt", weights_only=False) for w in (1, 2)] + [out]


def test_hessians_identical_across_process_counts(core):
    one, two = core[:2]
    assert set(one["hessians"]) == set(two["hessians"])
    for k in one["hessians"]:
        assert torch.equal(one["hessians"][k][1], two["hessians"][k][1]), k
        assert torch.equal(one["hessians"][k][0], two["hessians"][k][0]), k


def test_hessians_match_the_plain_one_process_path(core):
    from tasa import calib

    model = tiny_llama(seed=0)
    ref = calib.collect_hessians(model, _calib(), src=torch.arange(24) % 3, n_sources=3,
                                 batch_size=4, progress=False)
    for k, (H, c) in core[1]["hessians"].items():
        assert torch.equal(c, ref[k][1])
        torch.testing.assert_close(H, ref[k][0], rtol=1e-5, atol=1e-6)


def test_gptq_packed_weights_bit_identical(core):
    one, two = core[:2]
    assert set(one["packed"]) == set(two["packed"])
    assert any(k.endswith("qweight") for k in one["packed"])
    for k in one["packed"]:
        assert torch.equal(one["packed"][k], two["packed"][k]), k
    assert one["errors"] == two["errors"]
    assert two["balance"]["calibration"] == 1.0          # 6 batches of 4: 3 per rank


def test_lazy_gptq_on_two_ranks_writes_the_same_model(core):
    import tasa

    for w in (1, 2):
        q = tasa.load(core[2] / f"lazy_w{w}").state_dict()
        assert set(q) == set(core[0]["packed"])
        for k, v in core[0]["packed"].items():
            assert torch.equal(q[k], v), (w, k)


def test_sensitivity_same_on_two_ranks(core):
    one, two = core[:2]
    assert list(two["sens"]) == list(one["sens"])
    assert sorted(two["seen"]) == sorted(one["sens"])    # rank 0 got every result once
    for k, v in one["base"].items():
        assert two["base"][k] == pytest.approx(v, rel=1e-6, abs=1e-7)
    for u, d in one["sens"].items():
        for k, v in d.items():
            assert two["sens"][u][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (u, k)
    assert two["balance"]["sensitivity"] <= 1.2


# ---- the whole job under 2 ranks: failure, resume, identical output ----------------------------

def _job_worker(rank, world, port, model_dir, out, fault, log):
    _init(rank, world, port)
    if fault:
        os.environ[distributed.FAULT_ENV] = fault
    from tasa import cli

    try:
        rc = cli.main(["quantize", "--model", model_dir, "--out", out, *TINY_ARGS])
    except Exception as e:
        rc = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    Path(log, f"rank{rank}.json").write_text(json.dumps({"rc": rc}))


def _job(world, model_dir, out, log, fault=""):
    Path(log).mkdir(parents=True, exist_ok=True)
    _spawn(_job_worker, world, str(model_dir), str(out), fault, str(log))
    return [json.loads(Path(log, f"rank{r}.json").read_text())["rc"] for r in range(world)]


def _packed(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_job_two_ranks_fail_resume_and_match_one(tmp_path, capfd):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    # reference: the job under one rank
    assert _job(1, model_dir, tmp_path / "one", tmp_path / "log1") == [0]
    # rank 1 fails at its 2nd probe: both ranks stop, rank 0 says which rank failed
    out = tmp_path / "two"
    rcs = _job(2, model_dir, out, tmp_path / "log2", fault="1:sensitivity probe@2:raise")
    err = capfd.readouterr().err
    assert rcs[0] == 2 and "rank 1 of 2 failed during sensitivity probe" in err
    assert "injected fault" in err and "resumed by running it again" in err
    assert "RuntimeError: injected fault" in str(rcs[1])
    m = json.loads((out / "measurement.json").read_text())
    n_done = len(m["sensitivity"]["delta"])
    assert 2 <= n_done < len(m["units"]) and not m["sensitivity"]["complete"]
    assert not (out / "config.json").exists()
    # the rerun resumes (the probes already measured are kept) and finishes
    assert _job(2, model_dir, out, tmp_path / "log3") == [0, 0]
    one = json.loads((tmp_path / "one" / "measurement.json").read_text())
    two = json.loads((out / "measurement.json").read_text())
    assert two["sensitivity"]["complete"]
    assert two["mixture"]["alpha_star"] == pytest.approx(one["mixture"]["alpha_star"], abs=1e-9)
    for u, d in one["sensitivity"]["delta"].items():
        for k, v in d.items():
            assert two["sensitivity"]["delta"][u][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
    assert (json.loads((out / "plan.json").read_text())["layers"]
            == json.loads((tmp_path / "one" / "plan.json").read_text())["layers"])
    a, b = _packed(tmp_path / "one"), _packed(out)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    run = json.loads((out / "run.json").read_text())
    assert run["distributed"]["world_size"] == 2


def test_nccl_without_cuda_is_refused(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: NCCL is allowed")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="NCCL backend needs CUDA; on CPU use gloo"):
        distributed.init_from_env("nccl")
    assert not tdist.is_initialized()


def test_torchrun_rank_killed_outright_then_resume(tmp_path):
    """Under torchrun, rank 1 is SIGKILLed mid-probe (no Python error, no message of its own):
    the run stops with a non-zero status, the launcher's report names the rank and the signal,
    no model is claimed, and the rerun keeps the probes already measured and finishes."""
    import subprocess
    import sys

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "tasa", "quantize", "--model",
           str(model_dir), "--out", str(out), *TINY_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", TASA_DIST_TIMEOUT="60")
    env[distributed.FAULT_ENV] = "1:sensitivity probe@2:kill"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log
    assert "local_rank: 1" in log and "SIGKILL" in log, log[-3000:]
    m = json.loads((out / "measurement.json").read_text())
    kept = m["sensitivity"]["delta"]
    assert 1 <= len(kept) < len(m["units"]) and not m["sensitivity"]["complete"]
    assert not (out / "config.json").exists()
    env.pop(distributed.FAULT_ENV)
    cmd[cmd.index("--master-port") + 1] = str(_free_port())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    m2 = json.loads((out / "measurement.json").read_text())
    assert m2["sensitivity"]["complete"] and (out / "config.json").exists()
    for u, d in kept.items():                     # the probes measured before the kill are kept
        assert m2["sensitivity"]["delta"][u] == d, u
