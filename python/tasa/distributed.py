"""Data parallel over processes with ``torch.distributed`` (torchrun; gloo on CPU, NCCL on GPU).

``torchrun --nproc-per-node N -m tasa quantize ...`` (or the Python API in a process group)
splits the work of the measurement and of GPTQ over the ranks; no home-made transport:

* **Calibration** (:func:`tasa.calib.run_blockwise`): the calibration sequences are cut into the
  same batches as in one process (``batch_size`` sequences each, so every batch's forward is the
  very same computation whatever the world size) and each rank gets a contiguous run of whole
  batches (:meth:`Dist.shard`). Per batch, the kernel's fp32 running mean ``H_b = 2/n_b sum x
  x^T`` becomes the float64 sum ``n_b H_b`` (exact: a 24-bit mantissa times an integer below
  2^29); the sums and token counts of every source are all-reduced in float64 and renormalised
  (:meth:`Dist.reduce_hessians`). Float64 additions of these terms are exact unless one entry's
  terms span more than ~2^17 in magnitude, and the fp32 rounding of the result hides what is
  left, so every rank holds the same Hessian as a one-process run of the same code, bit for bit
  (tests/test_distributed.py checks the packed weights).
* **Sensitivity probes** are independent given the cached block inputs: every rank caches them
  (the base pass), the probes are divided by cost (:func:`lpt_assign`, cost = blocks recomputed)
  and gathered after every round of one probe per rank; rank 0 writes ``measurement.json``.
* **GPTQ** of a block's linears is divided by cost ``N K^2`` (the Cholesky and the column loop)
  among the ranks; the owner of a linear broadcasts its packed buffers, so all ranks hold the
  same quantized block and recompute their own shard's outputs through it.

A rank that raises inside a guarded step (:meth:`Dist.guard`) tells the others through an
all-reduced error flag and every rank raises :class:`RankFailed` naming it; a rank that dies
outright makes its peers' next collective fail (gloo: connection closed), reported the same way.
The process group's timeout (``TASA_DIST_TIMEOUT`` seconds, default 1800) bounds any other hang.
"""
from __future__ import annotations

import contextlib
import datetime
import heapq
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as tdist
from torch import nn

from .layers import TasaLinear, set_module
from .quant import LayerSpec
from .util import FAULT_ENV, fault_point

__all__ = ["Dist", "RankFailed", "current", "init_from_env", "lpt_assign", "split_batches",
           "FAULT_ENV"]

# fault injection for the tests (tasa.util.fault_point, the one mechanism): every guarded step is
# a fault point, "<rank>:<point>@<n>:raise" makes that rank raise at the n-th visit of <point>,
# ":kill" SIGKILLs it there (a rank that dies without a word: the others learn it from the
# broken collective) (tests/test_distributed.py)


class RankFailed(RuntimeError):
    """Another rank (or this one) failed during a distributed step; the message names it."""


def lpt_assign(costs: Mapping[str, float], world: int) -> Tuple[Dict[str, int], float]:
    """Greedy longest-processing-time assignment of the items ``costs`` (name -> cost) to
    ``world`` ranks: items by decreasing cost (ties by name, so every rank computes the same
    assignment), each to the least loaded rank (ties: the lowest rank). Returns ``(owner,
    max/mean load)``; LPT's worst case is 4/3 - 1/(3 world) of the optimum."""
    if world < 1:
        raise ValueError(f"tasa: world size must be >= 1, got {world}")
    heap = [(0.0, r) for r in range(world)]
    owner = {}
    loads = [0.0] * world
    for name in sorted(costs, key=lambda k: (-float(costs[k]), k)):
        load, r = heapq.heappop(heap)
        owner[name] = r
        loads[r] = load + float(costs[name])
        heapq.heappush(heap, (loads[r], r))
    mean = sum(loads) / world
    return owner, (max(loads) / mean if mean > 0 else 1.0)


def split_batches(n_rows: int, batch_size: int, world: int, rank: int) -> Tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: whole batches of ``batch_size`` rows (as one process
    cuts them), contiguous, the counts differing by at most one batch."""
    n_batches = -(-n_rows // batch_size)
    if world > n_batches:
        raise ValueError(f"tasa: {world} ranks but only {n_batches} calibration batches "
                         f"({n_rows} sequences / batch {batch_size}); every rank needs one -- use "
                         f"fewer processes or more calibration sequences")
    per, extra = divmod(n_batches, world)
    b_lo = rank * per + min(rank, extra)
    b_hi = b_lo + per + (1 if rank < extra else 0)
    return b_lo * batch_size, min(b_hi * batch_size, n_rows)


class Dist:
    """The process group as tasa uses it. ``Dist()`` without an initialised group is the one
    process world (``active`` False): every method then does the local thing."""

    def __init__(self, group=None):
        self.active = tdist.is_available() and tdist.is_initialized()
        self.group = group
        self.rank = tdist.get_rank(group) if self.active else 0
        self.world = tdist.get_world_size(group) if self.active else 1
        self.backend = tdist.get_backend(group) if self.active else None
        self.balance: Dict[str, float] = {}         # step -> max/mean rank work (last seen)

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes measurement.json, the plan and the model."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collectives' tensors must live: CUDA for NCCL, host memory for gloo."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- failure handling ----------------------------------------------------------------
    def _collective(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except RankFailed:
            raise
        except (RuntimeError, ConnectionError) as e:     # gloo / NCCL: a peer died or timed out
            others = [r for r in range(self.world) if r != self.rank]
            who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
            raise RankFailed(f"tasa: rank {self.rank}: {what}: {who} stopped answering (died, "
                             f"or timed out after TASA_DIST_TIMEOUT s): {e}") from None

    @contextlib.contextmanager
    def guard(self, what: str):
        """Local work that may raise: on exit every rank learns (one all-reduced flag) whether
        any rank failed in it, and all raise :class:`RankFailed` naming the first that did."""
        err: Optional[BaseException] = None
        try:
            fault_point(what, rank=self.rank)
            yield
        except Exception as e:       # reported to the others below, then re-raised
            err = e
        if not self.active:
            if err is not None:
                raise err
            return
        flag = torch.tensor([1 if err is not None else 0], dtype=torch.int32, device=self.device)
        self._collective(what, tdist.all_reduce, flag, group=self.group)
        if int(flag.item()) == 0:
            return
        msgs: List[Optional[str]] = [None] * self.world
        mine = None if err is None else f"{type(err).__name__}: {err}"
        self._collective(what, tdist.all_gather_object, msgs, mine, group=self.group)
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if err is not None:
            raise err              # the failing rank keeps its own error (and traceback)
        r0, m0 = bad[0]
        raise RankFailed(f"tasa: rank {r0} of {self.world} failed during {what}: {m0}"
                         + (f" (and ranks {[r for r, _ in bad[1:]]})" if len(bad) > 1 else "")
                         + "; the run can be resumed by running it again") from err

    # ---- small collectives -----------------------------------------------------------------
    def gather(self, obj, what: str) -> list:
        """``obj`` of every rank, by rank (picklable objects)."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        self._collective(what, tdist.all_gather_object, out, obj, group=self.group)
        return out

    def from_writer(self, obj, what: str):
        """Rank 0's ``obj`` on every rank (e.g. the measurement it resumed from disk)."""
        if not self.active:
            return obj
        box = [obj if self.is_writer else None]
        self._collective(what, tdist.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def barrier(self, what: str) -> None:
        if self.active:
            flag = torch.zeros(1, dtype=torch.int32, device=self.device)
            self._collective(what, tdist.all_reduce, flag, group=self.group)

    # ---- calibration ------------------------------------------------------------------------
    def shard(self, input_ids: torch.Tensor, src: Optional[torch.Tensor], batch_size: int):
        """This rank's whole batches of the calibration set: ``(input_ids, src)`` rows."""
        if not self.active:
            return input_ids, src
        lo, hi = split_batches(input_ids.shape[0], batch_size, self.world, self.rank)
        self.balance["calibration"] = _batch_balance(input_ids.shape[0], batch_size, self.world)
        return input_ids[lo:hi], None if src is None else src[lo:hi]

    def reduce_hessians(self, sums: Mapping[str, tuple]) -> Dict[str, tuple]:
        """``{name: (S f64 [S,K,K] = sum over batches of count_b H_b, count i64 [S])}`` of this
        rank's batches -> ``{name: (H f32 [S,K,K], count)}`` over all ranks' batches: the sums
        and counts all-reduced (float64 / int64), then ``H = S / count``. Entries that share one
        tensor (q/k/v) are reduced once and stay shared. Names are sorted so every rank runs
        the collectives in the same order."""
        done: Dict[int, tuple] = {}
        out = {}
        for name in sorted(sums):
            S, cnt = sums[name]
            key = id(S)
            if key not in done:
                S = S.to(self.device)
                cnt = cnt.to(self.device)
                if self.active:
                    self._collective(f"Hessian all-reduce of {name}", tdist.all_reduce, S,
                                     group=self.group)
                    self._collective(f"token-count all-reduce of {name}", tdist.all_reduce, cnt,
                                     group=self.group)
                S.div_(cnt.clamp(min=1).double()[:, None, None])      # in place (memory)
                H = S.float()
                del S
                done[key] = (H.to(sums[name][0].device), cnt.to(sums[name][1].device))
            out[name] = done[key]
        return out

    # ---- work splits ---------------------------------------------------------------------------
    def assign(self, costs: Mapping[str, float], step: str) -> Dict[str, int]:
        """Owner rank of every item (:func:`lpt_assign`); the max/mean ratio is kept in
        ``balance[step]``."""
        owner, ratio = lpt_assign(costs, self.world)
        self.balance[step] = ratio
        return owner

    def rounds(self, items: Sequence[str], costs: Mapping[str, float], step: str) -> List[list]:
        """This rank's items in rounds: round ``i`` holds its ``i``-th item (or nothing), the
        number of rounds the same on every rank, so results can be gathered after each round."""
        owner = self.assign({u: costs[u] for u in items}, step)
        per = [[u for u in items if owner[u] == r] for r in range(self.world)]
        n = max((len(p) for p in per), default=0)
        mine = per[self.rank]
        return [[mine[i]] if i < len(mine) else [] for i in range(n)]

    def share_quantized(self, block: nn.Module, owner: Mapping[str, int],
                        specs: Mapping[str, LayerSpec], local: Mapping[str, str]) -> None:
        """After each rank quantized the linears it owns (``owner[full name]``), the owners
        broadcast the packed buffers: every rank ends with the same TasaLinear modules.
        ``local[full name]`` = the name inside ``block``. Linears in sorted order (the same
        collective sequence on every rank)."""
        if not self.active:
            return
        for full in sorted(owner):
            lname, src = local[full], owner[full]
            cur = block.get_submodule(lname)
            if src != self.rank:
                if not isinstance(cur, nn.Linear):
                    raise RuntimeError(f"tasa: rank {self.rank}: {full} is not an nn.Linear "
                                       f"before its broadcast")
                cur = TasaLinear.skeleton_of(cur, specs[full])
                set_module(block, lname, cur)
            for bname, t in cur.packed_state().items():
                buf = t.to(self.device).contiguous()
                self._collective(f"broadcast of {full}.{bname} from rank {src}", tdist.broadcast,
                                 buf, src=src, group=self.group)
                if src != self.rank:
                    cur.set_packed(bname, buf.to(t.device))


def _batch_balance(n_rows: int, batch_size: int, world: int) -> float:
    rows = [split_batches(n_rows, batch_size, world, r) for r in range(world)]
    sizes = [hi - lo for lo, hi in rows]
    return max(sizes) / (sum(sizes) / world)


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialises the default process group when torchrun's environment says so (``WORLD_SIZE``
    set) and none exists: gloo on CPU, NCCL when CUDA is present (``backend`` overrides; NCCL
    without CUDA is refused). Returns whether a group is active."""
    if not tdist.is_available():
        return False
    if tdist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("tasa: the NCCL backend needs CUDA; on CPU use gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("TASA_DIST_TIMEOUT", "1800")))
    tdist.init_process_group(backend, timeout=timeout)
    return True


def current() -> Dist:
    """The :class:`Dist` of the default process group (the one-process world without one)."""
    return Dist()
