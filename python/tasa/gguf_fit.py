"""A TASA measurement fitted to llama.cpp's own type menu under a byte budget (issue 26 item 2).

``tasa export --gguf`` maps the plan's widths to llama.cpp types (3 -> Q3_K, 4 -> Q4_K ...). The
plan was allocated for tasa's quantizer (GPTQ-MSE with the in-group rotation, groups of 128) and
its cost model, not for llama.cpp's: measured on SmolLM2 (benchmarks/results/
quality_per_byte_smollm2-135m.md), the 3.5-bit plan exported that way is 94.9 MB and loses to
llama.cpp's Q3_K_M (93.5 MB) on task-text KL, 0.128 vs 0.084 -- most of SmolLM2's rows (576) are
no multiple of 256, so the plan's 3 and 4 bits land on llama.cpp's 4.5- and 5.5-bit fallbacks,
chosen by tasa's widths rather than by what they cost in llama.cpp's bytes.

Here the export allocates over what llama.cpp can actually write, by what each choice costs:

* **Menu** per tensor: k-quants where the row length is a multiple of 256
  (:data:`K_MENU`: Q3_K 3.44, IQ4_XS 4.25, Q4_K 4.5, Q5_K 5.5, Q6_K 6.56, Q8_0 8.5 bits per
  weight), llama.cpp's 32-blocks elsewhere (:data:`LEGACY_MENU`: IQ4_NL 4.5, Q4_1 5, Q5_0 5.5,
  Q5_1 6, Q8_0 8.5). Each option is quantized by llama.cpp itself, with tasa's task-aware
  importance matrix, and read back: its bytes are the file's, not a formula's.
* **Error** of tensor ``t`` at type ``tau``: the output-error proxy
  ``e_t(tau) = tr(dW H_t dW^T)``, ``dW`` = llama.cpp's dequantized tensor minus the reference,
  ``H_t`` the full input Hessian of the linear on the calibration mix alpha* (GPTQ's objective;
  llama.cpp's own imatrix is its diagonal).
* **Gain** per sensitivity unit (the TASA part, ``scoring="tasa"``): the probes measured the
  loss increase ``D_u(b)`` of unit ``u`` (TASA's beta-aggregate of the objectives,
  :func:`tasa.scoring.unit_errors`) when quantized with the probe quantizer at ``b`` bits; the
  same proxy of those probe weights, ``P_u(b)``, calibrates ``g_u = sum_b D_u(b) P_u(b) /
  sum_b P_u(b)^2`` (least squares through the origin; HIGGS's linearity theorem: the loss
  increase is linear in the layers' error energies). A unit whose probes never raised the
  loss (``g_u = 0``: noise) gets the smallest positive gain measured, not zero -- a zero
  would hand it the cheapest type whatever its error. ``scoring="proxy"`` sets every gain
  to 1 (the task-aware Hessian alone; no probes needed).
* **Allocation**: a multiple-choice knapsack over the exact bytes (:func:`fit_types`),
  ``minimise sum_t g_u(t) e_t(tau_t)  s.t.  fixed + sum_t bytes_t(tau_t) <= budget``, where
  ``fixed`` is everything else in the file (metadata, tokenizer, norms, the embedding at its
  type, alignment), measured on the option files.

Measured on SmolLM2-135M (benchmarks/results/quality_per_byte_smollm2-135m.md, KL general /
GSM8K text at Q3_K_M's exact 93.5 MB): Q3_K_M 0.094 / 0.084, this fit 0.040 / 0.037, the same
with every gain 1 (Hessian only) 0.057 / 0.048 -- the probes' gains fall ~100x from the first
block to the last, which no per-layer Hessian sees; without the types the dequantized reference
re-quantizes to losslessly (its Q4_1 grid) 0.070 / 0.067, still ahead of llama.cpp's mix.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from itertools import zip_longest
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from tqdm.auto import tqdm

from .util import read_json, weights_digest, write_json_atomic

# bits per weight (llama.cpp's block sizes): Q3_K 110 B / 256, IQ4_XS 136 / 256, Q4_K 144 / 256,
# Q5_K 176 / 256, Q6_K 210 / 256, Q8_0 34 / 32; IQ4_NL and Q4_0 18 / 32, Q4_1 20 / 32, Q5_0
# 22 / 32, Q5_1 24 / 32. Q4_0 is left out: IQ4_NL has its size and a non-uniform grid fitted
# with the importance matrix. Q2_K is left out: below every budget of 3-5 bits per parameter.
K_MENU = ("Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LEGACY_MENU = ("IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
SCORINGS = ("tasa", "proxy")
# the knapsack's capacity in units at most (one numpy pass of that length per option): the unit
# is then a few hundred bytes on a 0.5B model, and the slack the rounding leaves is spent greedily
MAX_UNITS = 200_000


def menu(k_in: int) -> tuple:
    """The types a tensor with rows of ``k_in`` can take (:data:`K_MENU` needs multiples of 256)."""
    from .gguf_export import QK_K
    return K_MENU if k_in % QK_K == 0 else LEGACY_MENU


def _padded(n: int, align: int) -> int:
    return -(-int(n) // align) * align


def _alignment(reader) -> int:
    f = reader.fields.get("general.alignment")
    return int(f.contents()) if f is not None else 32


def option_files(ref_file, k_in: Mapping[str, int], workdir, imatrix=None,
                 token_embedding_type: Optional[str] = None,
                 output_tensor_type: Optional[str] = None, progress: bool = True) -> list:
    """llama.cpp's quantization of the reference at every menu type: file ``i`` holds the
    ``i``-th type of each tensor's menu (``k_in``: ``{llama.cpp tensor name: row length}``),
    quantized with ``imatrix``; the rest as the export will write it. Returns ``[(path,
    {tensor: type asked})]``."""
    from .gguf_export import llama_quantize
    slots = list(zip_longest(K_MENU, LEGACY_MENU))
    out = []
    for i, (kt, lt) in enumerate(tqdm(slots, desc="llama.cpp options", disable=not progress)):
        asked = {}
        for g, k in k_in.items():
            t = kt if menu(k) is K_MENU else lt
            if t is not None:
                asked[g] = t
        path = Path(workdir) / f"option-{i}.gguf"
        llama_quantize(ref_file, path, "Q8_0", overrides=asked, imatrix=imatrix,
                       token_embedding_type=token_embedding_type,
                       output_tensor_type=output_tensor_type)
        out.append((path, asked))
    return out


def error_table(model, ids, names: Mapping[str, str], files: Sequence[tuple], ref_file,
                probe=None, progress: bool = True) -> dict:
    """One block-by-block pass of the full-precision ``model`` over the calibration ``ids``:
    per linear ``fqn`` (``names[fqn]`` its llama.cpp name) the option table ``{"options": {type:
    {"bytes": padded bytes in the file, "error": e_t}}, "probe": {b: P_t(b)}}``, and the fixed
    bytes of the file. ``probe``: ``(method, widths, spec_of(linear, b), damp)`` -- the probe
    quantizer whose weights the gains are calibrated on (None: no probe errors)."""
    import gguf
    from . import calib
    from .quant import output_error
    ref = gguf.GGUFReader(str(ref_file))
    ref_t = {t.name: t for t in ref.tensors}
    gnames = set(names.values())
    fixed = []
    options = []                 # per option file: ({tensor name: tensor}, alignment, asked)
    for path, asked in files:
        r = gguf.GGUFReader(str(path))
        al = _alignment(r)
        lin = sum(_padded(t.n_bytes, al) for t in r.tensors if t.name in gnames)
        fixed.append(Path(path).stat().st_size - lin)
        options.append(({t.name: t for t in r.tensors}, al, asked))
    table: Dict[str, dict] = {}
    wanted = set(names)

    def arr(t):
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        return torch.from_numpy(a.reshape([int(x) for x in reversed(t.shape)]))

    def on_block(idx, block, prefix, hessians):
        for lname, (H, _count) in hessians.items():
            full = f"{prefix}.{lname}"
            if full not in wanted:
                continue
            H0 = H[0].float()
            g = names[full]
            W = arr(ref_t[g])
            row = {"options": {}, "probe": {}}
            for tens, al, asked in options:
                if g not in asked:
                    continue
                t = tens[g]
                typ = t.tensor_type.name
                if typ in row["options"]:
                    continue
                row["options"][typ] = {"bytes": _padded(t.n_bytes, al),
                                       "error": output_error(W, arr(t), H0), "asked": asked[g]}
            if probe is not None:
                meth, widths, spec_of, damp = probe
                lin = block.get_submodule(lname)
                for b in widths:
                    q = meth.quantize(lin.weight, spec_of(lin, b), H0, damp=damp, name=full)
                    row["probe"][int(b)] = output_error(lin.weight, q.dequantize(), H0)
            table[full] = row
        return False                   # inputs stay the full-precision model's

    calib.run_blockwise(model, ids, on_block, progress=progress, batch_size=4,
                        linear_filter=lambda f: f in wanted)
    missing = sorted(wanted - set(table))
    if missing:
        raise ValueError(f"tasa: the calibration pass never reached {missing[:3]}")
    return {"linears": table, "fixed_bytes": max(fixed)}


def unit_gains(D: Mapping[str, Mapping[int, float]], P: Mapping[str, Mapping[int, float]]) -> dict:
    """``g_u = sum_b D_u(b) P_u(b) / sum_b P_u(b)^2`` over the widths both measured (module
    docstring); a unit with ``g_u <= 0`` gets the smallest positive gain. All zero -> all 1 (no
    probe raised any loss: the proxy alone)."""
    g = {}
    for u, d in D.items():
        bs = [b for b in d if b in P[u]]
        den = sum(P[u][b] ** 2 for b in bs)
        g[u] = sum(max(float(d[b]), 0.0) * P[u][b] for b in bs) / den if den > 0 else 0.0
    pos = [v for v in g.values() if v > 0]
    if not pos:
        return {u: 1.0 for u in g}
    floor = min(pos)
    return {u: (v if v > 0 else floor) for u, v in g.items()}


def fit_types(options: Mapping[str, Mapping[str, dict]], weight: Mapping[str, float],
              capacity: int) -> Dict[str, str]:
    """``{tensor: type}`` minimising ``sum weight[t] * error`` with ``sum bytes <= capacity``
    (``options[t][type] = {"bytes", "error"}``): the exact multiple-choice knapsack over byte
    units (:func:`tasa.alloc._mckp`), the unit coarsened to keep at most :data:`MAX_UNITS`
    (option costs rounded up, capacity down: always feasible), then the exact slack spent
    greedily on the upgrades with the best error decrease per byte."""
    from .alloc import _mckp
    names = list(options)
    opts = {n: sorted(options[n].items(), key=lambda kv: (kv[1]["bytes"], kv[1]["error"]))
            for n in names}
    base = sum(o[0][1]["bytes"] for o in opts.values())
    if base > capacity:
        raise ValueError(f"tasa: {capacity / 1e6:.2f} MB cannot hold the decoder linears even at "
                         f"the smallest types ({base / 1e6:.2f} MB)")
    room = int(capacity - base)
    deltas = [o[1]["bytes"] - opts[n][0][1]["bytes"] for n in names for o in opts[n]]
    g = 0
    for d in deltas:
        g = math.gcd(g, int(d))
    unit = max(g, 1)
    if room // unit > MAX_UNITS:
        unit = -(-room // MAX_UNITS)
    costs = [np.array([-(-(o[1]["bytes"] - opts[n][0][1]["bytes"]) // unit) for o in opts[n]])
             for n in names]
    errs = [np.array([float(weight[n]) * o[1]["error"] for o in opts[n]]) for n in names]
    picks = _mckp(costs, errs, room // unit)
    pick = {n: j for n, j in zip(names, picks)}

    def used():
        return sum(opts[n][pick[n]][1]["bytes"] for n in names)

    while True:                                 # the slack the rounding left
        slack = capacity - used()
        best = None
        for n in names:
            cur = opts[n][pick[n]][1]
            for j, (_t, o) in enumerate(opts[n]):
                extra = o["bytes"] - cur["bytes"]
                gain = float(weight[n]) * (cur["error"] - o["error"])
                if extra <= 0 or extra > slack or gain <= 0:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, n, j)
        if best is None:
            break
        pick[best[1]] = best[2]
    return {n: opts[n][pick[n]][0] for n in names}


DEFAULT_CACHE = object()        # fit(): tasa's cache folder


def _table_key(ref_file, ids, names, imatrix, emb, head, probe) -> str:
    import hashlib
    h = hashlib.sha256()
    st = Path(ref_file).stat()
    h.update(repr((Path(ref_file).name, st.st_size, sorted(names.items()), emb, head,
                   probe)).encode())
    h.update(ids.numpy().tobytes())
    for g in sorted(imatrix or {}):
        h.update(g.encode())
        h.update(imatrix[g].float().numpy().tobytes())
    return h.hexdigest()[:16]


def fit(model, tok, cfg, alpha: float, names: Mapping[str, str], ref_file, size_bytes: int,
        measurement=None, beta: Optional[float] = None, scoring: str = "tasa", imatrix=None,
        token_embedding_type: Optional[str] = None, output_tensor_type: Optional[str] = None,
        table_cache=DEFAULT_CACHE, calibration: Optional[tuple] = None,
        exclude: Sequence[str] = (), drop_lossless: bool = False, progress: bool = True,
        log=print) -> dict:
    """The type of every linear of ``names`` (``{fqn: llama.cpp name}``) for a file of at most
    ``size_bytes``: the option files, the error table, the gains (``scoring="tasa"``: from
    ``measurement``, :class:`tasa.measurement.Measurement`, with its plan's ``beta``), the
    knapsack. ``table_cache``: a folder keeping the option tables by what they depend on
    (default: ``$TASA_CACHE/fit``; None: not kept); ``calibration``: ``(ids, info)`` of
    :func:`tasa.pipeline.stages.gptq_calibration` at ``alpha`` if the caller has them;
    ``exclude``: types left out of the menu (e.g. the reference file's own format: weights
    dequantized from Q4_1 re-quantize to Q4_1 almost losslessly, which says nothing about
    original weights); ``drop_lossless``: also drop, per tensor, every type whose error is
    exactly 0 (the reference's own grid: a benchmark's control, where the reference is a
    dequantized file). Returns ``{"types": {llama.cpp name: type}, "predicted": summed
    weighted error, "gains": {unit: g}, "table": ...}``."""
    from . import defaults, sensitivity
    from .pipeline.stages import gptq_calibration
    from .quant import get_method
    from .scoring import unit_errors
    if scoring not in SCORINGS:
        raise ValueError(f"tasa: fit scoring must be one of {SCORINGS}, got {scoring!r}")
    exclude = set(exclude)
    unknown = sorted(exclude - set(K_MENU) - set(LEGACY_MENU))
    if unknown:
        raise ValueError(f"tasa: {unknown} are not in llama.cpp's menu here "
                         f"({sorted(set(K_MENU) | set(LEGACY_MENU))})")
    if table_cache is DEFAULT_CACHE:
        from .models import cache_dir
        table_cache = cache_dir() / "fit"
    table_cache = None if table_cache is None else Path(table_cache)
    mc = {}
    if scoring == "tasa" and measurement is None:
        raise ValueError("tasa: fitting with TASA's gains needs the job's measurement.json "
                         "(or --fit-scoring proxy)")
    ref_w = {}
    for n in names:
        ref_w[n] = model.get_submodule(n).weight
    k_in = {names[n]: int(w.shape[1]) for n, w in ref_w.items()}
    probe = None
    units = {}
    if scoring == "tasa":
        if not measurement.complete:
            raise ValueError("tasa: the measurement is incomplete (its sensitivity probes did "
                             "not all finish): finish the job first (tasa quantize resumes it)")
        digest = measurement.config.get("weights")
        if digest is not None and digest != weights_digest(model):
            raise ValueError("tasa: the measurement was made on other weights than the "
                             "reference being exported (weights fingerprint differs)")
        units = {u: list(v["linears"]) for u, v in measurement.units.items()}
        absent = sorted(set(names) - {f for fs in units.values() for f in fs})
        if absent:
            raise ValueError(f"tasa: the measurement has no unit for {absent[:3]}: it was made "
                             f"on another model or other targets")
        mc = measurement.config
        widths = [int(b) for b in measurement.sensitivity.widths]
        meth = get_method(mc.get("sens_method", "rtn"))
        rot = bool(mc.get("hadamard")) and meth.needs_hessian

        def spec_of(lin, b):
            return dataclasses.replace(sensitivity.probe_spec(
                lin, b, int(mc.get("group_size", defaults.GROUP_SIZE)),
                mc.get("mode", defaults.MODE)), hadamard=rot)
        probe = (meth, widths, spec_of, float(mc.get("damp", 0.01)))
    ids, info = calibration if calibration is not None else gptq_calibration(tok, cfg, alpha,
                                                                              log=log)
    # the table depends on the reference, the calibration, the importance matrix, the fixed
    # types and the probe settings -- not on the size: kept, so trying other sizes costs seconds
    # (SmolLM2-135M: the table takes ~4 min on 2 cores, the knapsack < 1 s)
    key = _table_key(ref_file, ids, names, imatrix, token_embedding_type, output_tensor_type,
                     None if probe is None else (probe[0].name, probe[1], dict(
                         group_size=mc.get("group_size"), mode=mc.get("mode"),
                         hadamard=mc.get("hadamard"), damp=probe[3])))
    cache = table_cache / f"{key}.json" if table_cache is not None else None
    tab = read_json(cache, "fit table") if cache is not None and cache.is_file() else None
    if tab is not None:
        log(f"llama.cpp option table from {cache}")
        for r in tab["linears"].values():            # JSON keys are strings
            r["probe"] = {int(b): v for b, v in r["probe"].items()}
    else:
        wd = Path(tempfile.mkdtemp(prefix="tasa-fit-"))
        try:
            files = option_files(ref_file, k_in, wd, imatrix, token_embedding_type,
                                 output_tensor_type, progress=progress)
            tab = error_table(model, ids, names, files, ref_file, probe, progress=progress)
        finally:
            for p in wd.glob("option-*.gguf"):
                p.unlink()
            wd.rmdir()
        if cache is not None:
            write_json_atomic(cache, tab)
    lin = {f: {**r, "options": {t: o for t, o in r["options"].items() if t not in exclude
                                and not (drop_lossless and o["error"] == 0.0)}}
           for f, r in tab["linears"].items()}
    empty = sorted(f for f, r in lin.items() if not r["options"])
    if empty:
        raise ValueError(f"tasa: excluding {sorted(exclude)} leaves no type for {empty[:3]}")
    if scoring == "tasa":
        err, _scores, dropped = unit_errors(measurement, defaults.BETA if beta is None else beta,
                                            widths, "tasa")
        P = {u: {b: sum(lin[f]["probe"][b] for f in fs) for b in widths}
             for u, fs in units.items()}
        gains = unit_gains({u: {b: err[u][b] for b in widths} for u in units}, P)
        weight = {f: gains[u] for u, fs in units.items() for f in fs if f in names}
    else:
        gains, weight = {}, {f: 1.0 for f in names}
    capacity = int(size_bytes) - int(tab["fixed_bytes"])
    smallest = sum(min(o["bytes"] for o in r["options"].values()) for r in lin.values())
    if capacity < smallest:
        raise ValueError(f"tasa: {size_bytes / 1e6:.2f} MB is below the smallest file llama.cpp's "
                         f"menu allows here ({(smallest + tab['fixed_bytes']) / 1e6:.2f} MB: the "
                         f"rest of the file is {tab['fixed_bytes'] / 1e6:.2f} MB)")
    picks = fit_types({f: r["options"] for f, r in lin.items()}, weight, capacity)
    predicted = sum(weight[f] * lin[f]["options"][t]["error"] for f, t in picks.items())
    log(f"fitted {len(picks)} tensors to {size_bytes / 1e6:.2f} MB by llama.cpp's menu "
        f"({scoring} scoring): predicted error {predicted:.4g}")
    return {"types": {names[f]: t for f, t in picks.items()},
            "asked": {names[f]: lin[f]["options"][t]["asked"] for f, t in picks.items()},
            "predicted": predicted, "gains": gains, "scoring": scoring,
            "fixed_bytes": tab["fixed_bytes"], "calibration": info, "excluded": sorted(exclude),
            "dropped_lossless": sum(1 for f, r in tab["linears"].items() for t, o in
                                    r["options"].items() if t not in lin[f]["options"]
                                    and t not in exclude),
            "table": {f: {"tensor": names[f], **r} for f, r in lin.items()}}


def _measurement_beside(path) -> Optional[Path]:
    p = Path(path)
    m = (p if p.is_dir() else p.parent) / "measurement.json"
    return m if m.is_file() else None


def export(out, size_bytes: Optional[int] = None, model: Optional[str] = None, plan=None,
           quantized=None,
           alpha: Optional[float] = None, data=None, scoring: str = "tasa", measurement=None,
           exclude: Sequence[str] = (), drop_lossless: bool = False,
           bits_per_param: Optional[float] = None, embedding_type: Optional[str] = None,
           head_type: Optional[str] = None, progress: bool = True, log=print) -> dict:
    """``tasa export --gguf --size-mb``: the GGUF ``out`` of at most ``size_bytes`` (or of
    ``bits_per_param`` over every parameter of the reference file: one of the two), each tensor
    at the llama.cpp type :func:`fit` picks; the plan (``plan`` / ``quantized``, as
    :func:`tasa.gguf_export.export`) gives the linears, the embedding's width and alpha*, its
    job's measurement the gains (``measurement``: a Measurement or a path; default: the
    measurement.json beside the plan / in the folder). ``embedding_type`` / ``head_type``: the
    llama.cpp types of the token embedding and of an untied output head, fixed (not fitted;
    default: the plan's widths), e.g. those of the llama.cpp mix a fit is compared with. The
    report has the plan export's keys and ``fit`` (scoring, predicted error, gains, fixed bytes,
    the option table)."""
    from . import gguf_export as ge
    from .measurement import Measurement
    if scoring not in SCORINGS:
        raise ValueError(f"tasa: fit scoring must be one of {SCORINGS}, got {scoring!r}")
    if (size_bytes is None) == (bits_per_param is None):
        raise ValueError("tasa: give the size in bytes or in bits per parameter (one of the two)")
    for v, what in ((size_bytes, "--size-mb"), (bits_per_param, "--bits-per-param")):
        if v is not None and not v > 0:
            raise ValueError(f"tasa: {what} must be positive, got {v}")
    if scoring == "tasa" and measurement is None:
        measurement = _measurement_beside(quantized if quantized is not None else plan)
        if measurement is None:
            raise ValueError("tasa: fitting to a size with TASA's gains needs the job's "
                             "measurement.json beside the plan (or in the folder); give "
                             "--measurement, or --fit-scoring proxy")
    if isinstance(measurement, (str, Path)):
        measurement = Measurement.load(measurement)
    s = ge.setup(model, plan, quantized, alpha, data, progress, log)
    gguf_im = {s["names"][n]: v for n, v in s["imatrix"].items()}     # llama.cpp's names
    # An untied output head packed by the plan (a model whose head is its own matrix, e.g.
    # Qwen2.5-Coder-0.5B dequantized from its GGUF) is one of the plan's linears but no
    # sensitivity unit: it keeps the plan's type, fixed as the embedding's is, and is not fitted.
    names = dict(s["names"])
    ref = s["ref"]
    head = next((n for n, m in ref.named_modules() if m is ref.get_output_embeddings()), None)
    if head in names:
        if head_type is None:
            head_type = ge.tensor_types({head: s["specs"][head]},
                                        {head: s["shapes"][head]})[head]["type"]
        names.pop(head)
    elif head_type is None:
        head_type = s["head_type"]
    emb_type = embedding_type if embedding_type is not None else s["embedding_type"]
    if size_bytes is None:
        params = sum(t["params"] for t in ge.gguf_tensors(s["ref_file"]).values())
        size_bytes = int(bits_per_param * params / 8)
    fitted = fit(s["ref"], s["tok"], s["cfg"], s["alpha"], names, s["ref_file"],
                 int(size_bytes), measurement=measurement, beta=s["beta"], scoring=scoring,
                 imatrix=gguf_im, token_embedding_type=emb_type,
                 output_tensor_type=head_type, calibration=(s["ids"], s["info"]),
                 exclude=exclude, drop_lossless=drop_lossless, progress=progress, log=log)
    report = ge.export_types(s["ref_file"], out, fitted["asked"], names,
                             imatrix=gguf_im, token_embedding_type=emb_type,
                             output_tensor_type=head_type)
    if report["bytes"] > size_bytes:
        raise RuntimeError(f"tasa: the fitted file is {report['bytes']} bytes, over the "
                           f"{int(size_bytes)} asked (the fixed part was measured at "
                           f"{fitted['fixed_bytes']}): a bug, please report it")
    report["fit"] = {k: fitted[k] for k in ("scoring", "predicted", "gains", "fixed_bytes",
                                            "table", "excluded", "dropped_lossless")}
    report["fit"]["size_bytes"] = int(size_bytes)
    return ge.finish_report(report, s)
