"""Calibration-mixture search: how much general text vs task text to calibrate with.

The criterion
-------------
For every quantized linear ``l`` we have three input second-moment matrices ("Hessians", the
GPTQ ``H = 2/n * X X^T`` up to a constant factor, symmetric PSD, ``[K, K]``):

* ``H_gen``  -- from the general calibration pool,
* ``H_task`` -- from the task calibration pool,
* ``H_test`` -- from a held-out slice of the task (never used for calibration).

Calibrating with a fraction ``alpha`` of general sequences and ``1 - alpha`` of task sequences
gives the mixture Hessian ``alpha*H_gen + (1-alpha)*H_task`` (assumption: the Hessians are
*per-token means* -- GPTQ's running-mean rescale -- and the two pools have sequences of the
same length, so a fraction ``alpha`` of the sequences is a fraction ``alpha`` of the tokens).
The criterion is

    f(alpha) = sum_l w_l * tr( H_test,l @ (alpha*H_gen,l + (1-alpha)*H_task,l + lam_l*I)^-1 ).

``tr(H_test H_cal^-1)`` is the classical covariate-shift variance term: the expected test error
of a least-squares (OBS/GPTQ) error compensation fitted on the calibration distribution and
evaluated on the test distribution. It is convex in alpha (see below), so the search is cheap
and has a single minimum on [0, 1].

Damping (``lam_l``)
-------------------
GPTQ adds ``percdamp * mean(diag(H))`` to the diagonal before inverting. Here the damping must
*not* depend on alpha -- otherwise the curves for different alpha would compare differently
regularised problems and the closed form below would not hold. We therefore fix

    lam_l = percdamp * mean(diag((H_gen,l + H_task,l) / 2)),      percdamp = 0.01 by default,

i.e. GPTQ's damping of the alpha = 1/2 mixture (mean diag is linear in alpha, so this is also the
average of GPTQ's damping over alpha in [0, 1]). With a fixed lam the damped mixture is an exact
convex combination of the damped endpoints:
``alpha*(H_gen + lam I) + (1-alpha)*(H_task + lam I) = alpha*H_gen + (1-alpha)*H_task + lam I``.
If both Hessians are identically zero (a dead input), ``lam = percdamp`` (absolute) so that the
matrix stays invertible; such a layer then contributes ``tr(H_test)/lam``.
A consequence worth knowing: with a *relative* damping the per-layer term is invariant to a
common rescaling of the layer's three Hessians (``c^2 H`` everywhere gives the same value).

Closed form
-----------
Let ``A = H_task + lam I`` (positive definite) with Cholesky ``A = L L^T`` and
``B = H_gen - H_task``, so the damped mixture is ``A + alpha B``. Whiten:
``C = L^-1 B L^-T = V diag(mu) V^T`` (symmetric eigendecomposition). Then
``A + alpha B = L V (I + alpha diag(mu)) V^T L^T`` and

    tr(H_test (A + alpha B)^-1) = sum_i d_i / (1 + alpha*mu_i),
    d_i = (U^T H_test U)_ii,   U = L^-T V.

So one eigendecomposition per layer gives the whole curve as a sum of K rational terms.
For alpha in [0, 1] every ``1 + alpha mu_i > 0`` (the mixture is positive definite at both
ends, hence ``1 + mu_i > 0``), and ``d_i >= 0`` (H_test is PSD), so each term is convex:
``d/dalpha^2 [d/(1+alpha mu)] = 2 d mu^2 / (1+alpha mu)^3 >= 0``. Derivatives are analytic, which
the argmin uses. All linear algebra runs in float64 whatever the input dtype, on the Hessians' device
(an eigendecomposition of K = 4096 takes minutes on a laptop CPU, about a second on a GPU).

Layer weights
-------------
``w_l = user_weight_l * norm_l`` with ``normalize``:

* ``"oracle"`` (default): ``norm_l = 1 / tr(H_test (H_test + lam_l I)^-1)``, the value the layer
  would have if it were calibrated on the test distribution itself (its "effective dimension",
  ``sum_i e_i/(e_i+lam)`` over the eigenvalues of H_test). Each layer's term then reads "error
  relative to the best achievable for this layer", every layer has the same say, and the sum is
  not dominated by the layers with the most input features (MLP down-projections have K about
  2.7x the others) or by a few layers whose raw values are large. It stays sensitive to real
  distribution shift (a layer whose test activations are much larger than its calibration
  activations keeps a large relative term).
* ``"dim"``: ``norm_l = 1/K`` -- a cheap version of the above (removes the dimension effect only).
* ``"trace"``: ``norm_l = 1/tr(H_test)``. Offered because it was asked for, but *not* the
  default: because the damping is relative, the raw term is already invariant to the activation
  scale of the layer, so dividing by ``tr(H_test)`` re-introduces a ``1/scale^2`` dependence and
  lets the layers with the *smallest* activations dominate.
* ``"none"``: ``norm_l = 1`` (raw sum).

Linears that share their input (q/k/v, gate/up) have identical Hessians; pass them once (or
give them a user weight equal to their multiplicity) -- the choice is the caller's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_GRID", "NORMALIZATIONS", "damping", "mixture_hessian", "layer_terms",
    "layer_curve_direct", "layer_weight", "trace_curve_direct", "MixtureCurve", "build_curve",
    "mixture_counts",
]

DEFAULT_GRID: Tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
NORMALIZATIONS = ("oracle", "dim", "trace", "none")
_ALPHA_TOL = 1e-12  # alphas this far outside [0, 1] are clipped, further ones are an error

LayerTriple = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Hessians = Union[Mapping[str, LayerTriple], Iterable[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# single layer
# ---------------------------------------------------------------------------------------------
def _as64(H: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(H, torch.Tensor):
        H = torch.as_tensor(np.asarray(H))
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be a square [K, K] matrix, got shape {tuple(H.shape)}")
    H = H.detach().to(dtype=torch.float64)  # stays on its device (eigh on a GPU is much faster)
    if not torch.isfinite(H).all():
        raise ValueError(f"{name} has non-finite entries")
    return (H + H.T) * 0.5  # symmetrise: accumulation round-off makes H slightly asymmetric


def _check_triple(H_gen, H_task, H_test) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Hg, Ht, Hs = _as64(H_gen, "H_gen"), _as64(H_task, "H_task"), _as64(H_test, "H_test")
    if not (Hg.device == Ht.device == Hs.device):
        raise ValueError(f"Hessians on different devices: {Hg.device}, {Ht.device}, {Hs.device}")
    if not (Hg.shape == Ht.shape == Hs.shape):
        raise ValueError(f"Hessian shapes differ: H_gen {tuple(Hg.shape)}, H_task "
                         f"{tuple(Ht.shape)}, H_test {tuple(Hs.shape)}")
    return Hg, Ht, Hs


def damping(H_gen: torch.Tensor, H_task: torch.Tensor, percdamp: float = 0.01) -> float:
    """``percdamp * mean(diag((H_gen + H_task)/2))``: the alpha-independent damping (see module
    docstring); ``percdamp`` itself if that mean diagonal is zero (dead input)."""
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0, got {percdamp}")
    md = 0.5 * float(torch.diagonal(_as64(H_gen, "H_gen")).mean()
                     + torch.diagonal(_as64(H_task, "H_task")).mean())
    return percdamp * md if md > 0 else float(percdamp)


def mixture_hessian(H_gen: torch.Tensor, H_task: torch.Tensor, alpha: float,
                    lam: float = 0.0) -> torch.Tensor:
    """``alpha*H_gen + (1-alpha)*H_task + lam*I`` in float64."""
    Hg, Ht = _as64(H_gen, "H_gen"), _as64(H_task, "H_task")
    M = alpha * Hg + (1.0 - alpha) * Ht
    return M + lam * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def layer_terms(H_gen: torch.Tensor, H_task: torch.Tensor, H_test: torch.Tensor,
                lam: Optional[float] = None, percdamp: float = 0.01) -> Tuple[np.ndarray, np.ndarray, float]:
    """Closed form of one layer: returns ``(d, mu, lam)`` with
    ``tr(H_test (alpha H_gen + (1-alpha) H_task + lam I)^-1) = sum_i d_i / (1 + alpha mu_i)``.
    ``lam`` defaults to :func:`damping` (``percdamp``)."""
    Hg, Ht, Hs = _check_triple(H_gen, H_task, H_test)
    if lam is None:
        lam = damping(Hg, Ht, percdamp)
    if not lam > 0:
        raise ValueError(f"damping lam must be > 0, got {lam}")
    K = Hg.shape[0]
    eye = torch.eye(K, dtype=torch.float64, device=Ht.device)
    A = Ht + lam * eye
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:  # H_task not PSD beyond round-off: say so instead of returning garbage
        raise ValueError("H_task + lam*I is not positive definite (is H_task PSD?)")
    B = Hg - Ht
    X = torch.linalg.solve_triangular(L, B, upper=False)            # L^-1 B
    C = torch.linalg.solve_triangular(L, X.T, upper=False)          # L^-1 (L^-1 B)^T = L^-1 B L^-T
    C = (C + C.T) * 0.5
    mu, V = torch.linalg.eigh(C)
    U = torch.linalg.solve_triangular(L.T, V, upper=True)           # L^-T V
    d = ((Hs @ U) * U).sum(dim=0)                                   # diag(U^T H_test U)
    if float(mu.min()) <= -1.0:
        raise ValueError("H_gen + lam*I is not positive definite (is H_gen PSD?)")
    return d.cpu().numpy().copy(), mu.cpu().numpy().copy(), float(lam)


def layer_curve_direct(H_gen: torch.Tensor, H_task: torch.Tensor, H_test: torch.Tensor,
                       alphas: Sequence[float], lam: Optional[float] = None,
                       percdamp: float = 0.01) -> np.ndarray:
    """Oracle for one layer: ``tr(H_test (alpha H_gen + (1-alpha) H_task + lam I)^-1)`` for each
    alpha by a direct (Cholesky) solve, float64."""
    Hg, Ht, Hs = _check_triple(H_gen, H_task, H_test)
    if lam is None:
        lam = damping(Hg, Ht, percdamp)
    out = []
    for a in np.asarray(alphas, dtype=np.float64).ravel():
        M = mixture_hessian(Hg, Ht, float(a), lam)
        L = torch.linalg.cholesky(M)
        out.append(float(torch.trace(torch.cholesky_solve(Hs, L))))
    return np.asarray(out)


def layer_weight(H_test: torch.Tensor, lam: float, normalize: str = "oracle") -> float:
    """The normalisation factor ``norm_l`` of one layer (module docstring, "Layer weights")."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "none":
        return 1.0
    Hs = _as64(H_test, "H_test")
    if normalize == "dim":
        return 1.0 / Hs.shape[0]
    if normalize == "trace":
        t = float(torch.trace(Hs))
    else:  # oracle: effective dimension sum e/(e+lam)
        e = torch.linalg.eigvalsh(Hs).clamp_min(0.0)
        t = float((e / (e + lam)).sum())
    if not t > 0:
        raise ValueError(f"cannot normalize by {normalize!r}: H_test is zero")
    return 1.0 / t


def _iter_hessians(hessians: Hessians) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    if isinstance(hessians, Mapping):
        for name, triple in hessians.items():
            if len(triple) != 3:
                raise ValueError(f"layer {name!r}: expected (H_gen, H_task, H_test)")
            yield (name, *triple)
    else:
        for item in hessians:
            if len(item) != 4:
                raise ValueError("expected items (name, H_gen, H_task, H_test)")
            yield tuple(item)


def trace_curve_direct(hessians: Hessians, alphas: Sequence[float] = DEFAULT_GRID,
                       weights: Optional[Mapping[str, float]] = None, normalize: str = "oracle",
                       percdamp: float = 0.01) -> np.ndarray:
    """Oracle: the weighted criterion ``f(alpha)`` on ``alphas`` by direct solves, one per layer
    and alpha. ``hessians``: ``{name: (H_gen, H_task, H_test)}`` or an iterable of
    ``(name, H_gen, H_task, H_test)``; same weighting as :func:`build_curve`."""
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    total = np.zeros_like(alphas)
    for name, Hg, Ht, Hs in _iter_hessians(hessians):
        lam = damping(Hg, Ht, percdamp)
        w = (1.0 if weights is None else float(weights.get(name, 1.0))) * layer_weight(Hs, lam, normalize)
        total += w * layer_curve_direct(Hg, Ht, Hs, alphas, lam=lam)
    return total


# ---------------------------------------------------------------------------------------------
# the whole curve
# ---------------------------------------------------------------------------------------------
def _check_alpha(alpha) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < -_ALPHA_TOL) or np.any(a > 1 + _ALPHA_TOL):
        raise ValueError("alpha must lie in [0, 1] (the closed form is only valid there)")
    return np.clip(a, 0.0, 1.0)


@dataclass
class _Layer:
    d: np.ndarray       # [m] float64, >= 0 up to round-off
    mu: np.ndarray      # [m] float64, > -1
    weight: float       # w_l (user weight x normalisation)
    lam: float          # damping used


@dataclass
class MixtureCurve:
    """``f(alpha) = sum_l weight_l * sum_i d_li / (1 + alpha mu_li)`` for alpha in [0, 1].

    Build with :func:`build_curve` or incrementally with :meth:`add_layer` (so a caller can
    stream Hessians layer by layer and free them). ``layers`` maps a layer name to its terms.
    """

    layers: Dict[str, _Layer] = field(default_factory=dict)
    normalize: str = "oracle"
    percdamp: float = 0.01

    # -- construction ------------------------------------------------------------------------
    def add_layer(self, name: str, H_gen: torch.Tensor, H_task: torch.Tensor,
                  H_test: torch.Tensor, weight: float = 1.0) -> None:
        """Eigendecompose one layer (``weight`` is the user weight; the normalisation of
        ``self.normalize`` is applied on top)."""
        if name in self.layers:
            raise ValueError(f"layer {name!r} added twice")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"layer {name!r}: weight must be finite and >= 0, got {weight}")
        d, mu, lam = layer_terms(H_gen, H_task, H_test, percdamp=self.percdamp)
        w = float(weight) * layer_weight(H_test, lam, self.normalize)
        self.layers[name] = _Layer(d, mu, w, lam)

    # -- evaluation --------------------------------------------------------------------------
    def _values(self, alpha, names=None) -> np.ndarray:
        a = _check_alpha(alpha)
        flat = a.reshape(-1, 1)
        out = np.zeros(flat.shape[0])
        for name in (self.layers if names is None else names):
            L = self.layers[name]
            out += L.weight * (L.d / (1.0 + flat * L.mu.reshape(1, -1))).sum(axis=1)
        return out.reshape(a.shape)

    def __call__(self, alpha) -> Union[float, np.ndarray]:
        """``f(alpha)``; scalar in, float out; array in, array out."""
        v = self._values(alpha)
        return float(v) if np.ndim(alpha) == 0 else v

    def derivative(self, alpha) -> Union[float, np.ndarray]:
        """``f'(alpha) = -sum w d mu / (1 + alpha mu)^2`` (increasing in alpha: f is convex)."""
        a = _check_alpha(alpha)
        flat = a.reshape(-1, 1)
        out = np.zeros(flat.shape[0])
        for L in self.layers.values():
            out -= L.weight * (L.d * L.mu / (1.0 + flat * L.mu) ** 2).sum(axis=1)
        out = out.reshape(a.shape)
        return float(out) if np.ndim(alpha) == 0 else out

    def layer_values(self, alpha) -> Dict[str, Union[float, np.ndarray]]:
        """Per-layer weighted terms ``w_l * f_l(alpha)``."""
        return {n: (float(v) if np.ndim(alpha) == 0 else v)
                for n in self.layers for v in [self._values(alpha, names=[n])]}

    def argmin(self, n_grid: int = 1001, tol: float = 1e-12) -> Tuple[float, float]:
        """``(alpha*, f(alpha*))`` over [0, 1]: a dense grid of ``n_grid`` points locates the
        minimum, then bisection on the analytic derivative (monotone, f being convex) inside the
        bracket of grid neighbours refines it to ``tol``. The grid makes the result robust even
        if round-off breaks convexity slightly; the refinement never returns a point worse than
        the best grid point."""
        if not self.layers:
            raise ValueError("empty curve")
        if n_grid < 3:
            raise ValueError("n_grid must be >= 3")
        grid = np.linspace(0.0, 1.0, n_grid)
        vals = self(grid)
        i = int(np.argmin(vals))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
        best_a, best_f = float(grid[i]), float(vals[i])
        d_lo, d_hi = self.derivative(lo), self.derivative(hi)
        if d_lo >= 0:
            cand = lo
        elif d_hi <= 0:
            cand = hi
        else:
            while hi - lo > tol:
                mid = 0.5 * (lo + hi)
                if self.derivative(mid) > 0:
                    hi = mid
                else:
                    lo = mid
            cand = 0.5 * (lo + hi)
        f_c = self(cand)
        if f_c <= best_f:
            best_a, best_f = float(cand), float(f_c)
        return best_a, best_f

    def table(self, grid: Sequence[float] = DEFAULT_GRID) -> List[Dict[str, float]]:
        """Report rows ``{"alpha", "f", "f_rel"}`` for the candidate grid, ``f_rel = f / f(alpha*)``
        with ``alpha*`` the continuous minimiser (so ``f_rel >= 1``; the best grid candidate is the
        row with the smallest ``f_rel``), followed by a row for ``alpha*`` itself marked
        ``"argmin": True``."""
        a_star, f_star = self.argmin()
        vals = self(np.asarray(grid, dtype=np.float64))
        rows = [{"alpha": float(a), "f": float(v), "f_rel": float(v / f_star)}
                for a, v in zip(grid, np.atleast_1d(vals))]
        rows.append({"alpha": a_star, "f": f_star, "f_rel": 1.0, "argmin": True})
        return rows

    def best_on_grid(self, grid: Sequence[float] = DEFAULT_GRID) -> float:
        """The candidate of ``grid`` with the smallest ``f`` (first one on ties)."""
        vals = np.atleast_1d(self(np.asarray(grid, dtype=np.float64)))
        return float(np.asarray(grid, dtype=np.float64)[int(np.argmin(vals))])

    # -- compact storage ---------------------------------------------------------------------
    @property
    def n_terms(self) -> int:
        return int(sum(L.d.size for L in self.layers.values()))

    def compress(self, rel_tol: float = 1e-6, merge: bool = False) -> "MixtureCurve":
        """Fewer terms with a guaranteed uniform relative error ``<= rel_tol`` on [0, 1].

        Terms are binned by ``nu = log(1 + mu)`` in bins of width ``delta = log(1 + rel_tol)``;
        each bin keeps the sum of its ``d`` and the ``mu`` of the bin's (log-)midpoint. For
        alpha in [0, 1], ``(1 + alpha mu)/(1 + alpha mu')`` is monotone in alpha, from 1 to
        ``(1+mu)/(1+mu')``, so each term (and, the terms being >= 0, the sum) moves by a relative
        factor in ``[e^-delta/2, e^delta/2]``. ``merge=True`` folds the weights in and merges all
        layers into one pseudo-layer ``"__all__"`` (the argmin only needs the total); tiny
        negative ``d`` from round-off are kept in their own bin sums.
        """
        if not rel_tol > 0:
            raise ValueError("rel_tol must be > 0")
        delta = math.log1p(rel_tol)

        def binned(d, mu):
            nu = np.log1p(mu)
            key = np.floor(nu / delta).astype(np.int64)
            uk, inv = np.unique(key, return_inverse=True)
            dd = np.zeros(uk.size)
            np.add.at(dd, inv, d)
            return dd, np.expm1((uk + 0.5) * delta)

        out = MixtureCurve(normalize=self.normalize, percdamp=self.percdamp)
        if merge:
            d = np.concatenate([L.weight * L.d for L in self.layers.values()])
            mu = np.concatenate([L.mu for L in self.layers.values()])
            dd, mm = binned(d, mu)
            out.layers["__all__"] = _Layer(dd, mm, 1.0, float("nan"))
        else:
            for n, L in self.layers.items():
                dd, mm = binned(L.d, L.mu)
                out.layers[n] = _Layer(dd, mm, L.weight, L.lam)
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (floats as Python floats: ``repr`` round-trips float64 exactly)."""
        return {
            "kind": "tasa.MixtureCurve", "version": 1, "normalize": self.normalize,
            "percdamp": self.percdamp,
            "layers": {n: {"weight": L.weight, "lam": L.lam, "d": L.d.tolist(), "mu": L.mu.tolist()}
                       for n, L in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "MixtureCurve":
        if obj.get("kind") != "tasa.MixtureCurve" or obj.get("version") != 1:
            raise ValueError("not a version-1 tasa.MixtureCurve dict")
        out = cls(normalize=obj["normalize"], percdamp=float(obj["percdamp"]))
        for n, L in obj["layers"].items():
            d, mu = np.asarray(L["d"], dtype=np.float64), np.asarray(L["mu"], dtype=np.float64)
            if d.shape != mu.shape or d.ndim != 1:
                raise ValueError(f"layer {n!r}: d and mu must be 1-D of equal length")
            out.layers[n] = _Layer(d, mu, float(L["weight"]), float(L["lam"]))
        return out


def build_curve(hessians: Hessians, weights: Optional[Mapping[str, float]] = None,
                normalize: str = "oracle", percdamp: float = 0.01) -> MixtureCurve:
    """The :class:`MixtureCurve` of all layers. ``hessians``: ``{name: (H_gen, H_task, H_test)}``
    or an iterable (e.g. a generator, to stream) of ``(name, H_gen, H_task, H_test)``;
    ``weights``: optional user weight per layer name (default 1)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    curve = MixtureCurve(normalize=normalize, percdamp=percdamp)
    for name, Hg, Ht, Hs in _iter_hessians(hessians):
        curve.add_layer(name, Hg, Ht, Hs, 1.0 if weights is None else float(weights.get(name, 1.0)))
    return curve


def mixture_counts(alpha: float, n_total: int) -> Tuple[int, int]:
    """``(n_general, n_task)`` sequences for mixing ratio ``alpha`` out of ``n_total``:
    ``n_general = round(alpha * n_total)`` (half up), ``n_task = n_total - n_general``. The
    realised ratio ``n_general / n_total`` is within ``1/(2 n_total)`` of alpha."""
    if isinstance(n_total, bool) or int(n_total) != n_total or n_total < 0:
        raise ValueError(f"n_total must be a non-negative integer, got {n_total!r}")
    a = float(_check_alpha(alpha))
    n_total = int(n_total)
    n_gen = min(n_total, int(math.floor(a * n_total + 0.5)))
    return n_gen, n_total - n_gen
