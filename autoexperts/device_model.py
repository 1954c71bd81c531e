"""The device model: each backend's latency and peak memory on one device, for any experts layer shape.

Fitted on a calibration over a designed set of shapes (`autoexperts.calibration.design`), per backend, on the work
the backend does (`autoexperts.work`) rather than on the shape's dimensions, so that it carries over to shapes it
never saw. Four forms of the latency model are fitted and the one with the lowest leave-one-shape-out regret is kept:

- `"additive"`: latency = a non-negative combination of the work features (seconds per FLOP, per byte of weights
  read, per byte gathered, per kernel launch, ...), fitted for relative error. A roofline written as a sum: it
  extrapolates linearly in the work, the way the hardware does once it is saturated.
- `"power"`: log latency = a linear function of the logs of the work features (ridge). It bends where the additive
  form cannot (small, inefficient matmuls), but extrapolates as a power law.
- `"boosted"`: gradient-boosted trees on the log features. Flexible inside the design set, flat outside it.
- `"relative"`: one reference backend as `"power"`, every other backend as boosted trees of its latency ratio to the
  reference (on the log features and the shape). `auto` asks which backend is faster, not how fast: a ratio model
  spends its flexibility on that question.

Leave-one-shape-out: for each design shape, every form is fitted on the others and chooses a backend at each of the
held-out shape's measured token counts; the regret is the measured latency of those choices over the oracle's
(the measured fastest). `fit` records each form's regret and the chosen form's latency error in `loso`.

Memory: a non-negative least-squares fit of peak bytes on the memory features (rows × weights copied, activations),
exact in the token count, so a budget's cut-off is one division.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .cost_model import SLOW_FACTOR, Measurement, Status, relative_spread
from .layer import LayerSpec
from .work import LATENCY_FEATURES, MEMORY_FEATURES, SHAPE_FEATURES, feature_matrix

FORMAT_VERSION = 1
FORMS = ("additive", "power", "boosted", "relative")
# Token counts a table built from the device model decides one by one (latency grows with the tokens beyond).
TABLE_MAX_TOKENS = 16384
# Worker processes that fit the held-out folds at most (each imports torch: a few hundred MB while it lives).
MAX_FIT_WORKERS = 8
# The columns of every latency feature matrix.
_X = LATENCY_FEATURES + SHAPE_FEATURES
# The log features of the "power" and "boosted" forms (the constant and exact duplicates left out) ...
_LOG_FEATURES = ("flops", "weight_bytes", "gather_bytes", "activation_bytes", "experts_hit", "rows")
# ... and of the "relative" form's ratio model, which also sees the shape.
_RELATIVE_FEATURES = _LOG_FEATURES + SHAPE_FEATURES


@dataclass(frozen=True)
class ShapePoints:
    """One design shape's measurements."""

    spec: LayerSpec
    measurements: tuple[Measurement, ...]


def _ok_points(
    shapes: Sequence[ShapePoints], backend: str
) -> tuple[list[LayerSpec], np.ndarray, np.ndarray, np.ndarray]:
    specs, tokens, latency, peaks = [], [], [], []
    for shape in shapes:
        for m in shape.measurements:
            if m.backend == backend and m.status == Status.OK and m.median_ms:
                specs.append(shape.spec)
                tokens.append(m.num_tokens)
                latency.append(m.median_ms)
                peaks.append(m.peak_bytes or 0)
    return specs, np.array(tokens, dtype=np.float64), np.array(latency), np.array(peaks, dtype=np.float64)


def _features(specs: list[LayerSpec], tokens: np.ndarray, names: tuple[str, ...] = _X) -> np.ndarray:
    """`(num_points, len(names))` for points of (possibly) different shapes."""
    rows = np.empty((len(specs), len(names)))
    by_spec: dict[LayerSpec, list[int]] = {}
    for i, spec in enumerate(specs):
        by_spec.setdefault(spec, []).append(i)
    for spec, indices in by_spec.items():
        rows[indices] = feature_matrix(spec, tokens[indices], names)
    return rows


def _logs(x: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """`log1p` of the named columns of a latency feature matrix `(num_points, len(_X))`."""
    return np.log1p(x[:, [_X.index(n) for n in names]])


def _boosted_trees():
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.1, min_samples_leaf=5, random_state=0)


def _fit_latency(form: str, x: np.ndarray, latency_ms: np.ndarray) -> dict:
    """One backend's latency estimator of an absolute `form` on a latency feature matrix `x` `(num_points, len(_X))`."""
    from sklearn.linear_model import LinearRegression, Ridge

    if form == "additive":
        work = x[:, [_X.index(n) for n in LATENCY_FEATURES]]
        scale = np.maximum(work.max(axis=0), 1e-30)
        # Relative error: minimise sum(((work @ theta) / y - 1) ** 2) over theta >= 0.
        weighted = (work / scale) / latency_ms[:, None]
        model = LinearRegression(positive=True, fit_intercept=False).fit(weighted, np.ones(len(latency_ms)))
        return {"form": form, "estimator": model, "scale": scale}
    model = Ridge(alpha=1e-3) if form == "power" else _boosted_trees()
    return {"form": form, "estimator": model.fit(_logs(x, _LOG_FEATURES), np.log(latency_ms))}


def _predict_latency(fit: dict, x: np.ndarray) -> np.ndarray:
    """Predicted milliseconds at each row of the latency feature matrix `x`."""
    if fit["form"] == "relative":
        reference = _predict_latency(fit["reference"], x)
        if fit["estimator"] is None:  # the reference backend itself
            return reference
        return reference * np.exp(fit["estimator"].predict(_logs(x, _RELATIVE_FEATURES)))
    if fit["form"] == "additive":
        work = x[:, [_X.index(n) for n in LATENCY_FEATURES]]
        return np.maximum((work / fit["scale"]) @ fit["estimator"].coef_, 1e-6)
    return np.exp(fit["estimator"].predict(_logs(x, _LOG_FEATURES)))


def _fit_memory(x: np.ndarray, peaks: np.ndarray) -> dict:
    from sklearn.linear_model import LinearRegression

    scale = np.maximum(x.max(axis=0), 1e-30)
    model = LinearRegression(positive=True, fit_intercept=False).fit(x / scale, peaks)
    return {"coef": model.coef_ / scale}


def _fit_backends(shapes: Sequence[ShapePoints], backends: Sequence[str], form: str) -> dict:
    """Each backend with at least three successful points: its latency fit of `form` and its memory fit.

    The `"relative"` form fits the backend measured at the most points (the reference) as `"power"` does, and every
    other backend's log latency ratio to it, at the points where both were measured, with boosted trees.
    """
    points = {b: _ok_points(shapes, b) for b in backends}
    points = {b: p for b, p in points.items() if len(p[1]) >= 3}
    if not points:
        return {}
    latency = {}
    if form == "relative":
        # Ties go to the first name in sorted order, so a refit from the JSON (whose backend order may differ from
        # the calibration's) picks the same reference.
        reference = max(sorted(points), key=lambda b: len(points[b][1]))
        specs, tokens, times, _ = points[reference]
        reference_fit = _fit_latency("power", _features(specs, tokens), times)
        reference_ms = {(spec, n): ms for spec, n, ms in zip(specs, tokens, times, strict=True)}
        for backend, (specs, tokens, times, _) in points.items():
            if backend == reference:
                latency[backend] = {"form": form, "reference": reference_fit, "estimator": None}
                continue
            paired = [i for i, key in enumerate(zip(specs, tokens, strict=True)) if key in reference_ms]
            if len(paired) < 3:
                continue
            x = _features([specs[i] for i in paired], tokens[paired])
            ratio = np.log(times[paired] / np.array([reference_ms[specs[i], tokens[i]] for i in paired]))
            trees = _boosted_trees().fit(_logs(x, _RELATIVE_FEATURES), ratio)
            latency[backend] = {"form": form, "reference": reference_fit, "estimator": trees, "of": reference}
    else:
        for backend, (specs, tokens, times, _) in points.items():
            latency[backend] = _fit_latency(form, _features(specs, tokens), times)
    fits = {}
    for backend, fit in latency.items():
        specs, tokens, _, peaks = points[backend]
        fits[backend] = {"latency": fit, "memory": _fit_memory(_features(specs, tokens, MEMORY_FEATURES), peaks)}
    return fits


@dataclass
class _HeldOut:
    """One held-out shape's outcome: the chosen and the oracle totals and the prediction errors at its points."""

    chosen: float = 0.0
    oracle: float = 0.0
    latency_errors: list[float] = field(default_factory=list)  # |log(predicted / measured)|
    ratio_errors: list[float] = field(default_factory=list)  # the same of the latency ratio of two backends


def _held_out(fits: dict, shape: ShapePoints) -> _HeldOut | None:
    """How `fits` choose on one shape's measured token counts; `None` when it has none.

    The choice is the backend predicted fastest among those fitted; a pick the sweep did not time there (it had
    stopped timing a backend far slower than the fastest) costs `cost_model.SLOW_FACTOR` times the oracle.
    """
    measured: dict[int, dict[str, float]] = {}
    for m in shape.measurements:
        if m.status == Status.OK and m.backend in fits:
            measured.setdefault(m.num_tokens, {})[m.backend] = m.median_ms
    if not measured:
        return None
    counts = sorted(measured)
    x = feature_matrix(shape.spec, np.array(counts, dtype=np.float64), _X)
    predicted = {b: _predict_latency(fit["latency"], x) for b, fit in fits.items()}
    outcome = _HeldOut()
    for i, n in enumerate(counts):
        times = measured[n]
        pick = min(fits, key=lambda b: predicted[b][i])
        fastest = min(times.values())
        outcome.chosen += times.get(pick, SLOW_FACTOR * fastest)
        outcome.oracle += fastest
        outcome.latency_errors += [abs(math.log(predicted[b][i] / ms)) for b, ms in times.items()]
        outcome.ratio_errors += [
            abs(math.log(predicted[b][i] / predicted[c][i]) - math.log(times[b] / times[c]))
            for b, c in itertools.combinations(sorted(times), 2)
        ]
    return outcome


def _fold(shapes: Sequence[ShapePoints], backends: Sequence[str], form: str, index: int) -> _HeldOut | None:
    """`form` fitted on every shape but `shapes[index]`, and how it chooses on that one (`None`: it cannot)."""
    fits = _fit_backends([s for j, s in enumerate(shapes) if j != index], backends, form)
    return _held_out(fits, shapes[index]) if len(fits) >= 2 else None


def _held_out_outcomes(
    shapes: Sequence[ShapePoints], backends: Sequence[str], forms: Sequence[str], n_jobs: int
) -> dict[str, list[_HeldOut | None]]:
    """Each form's outcome on each held-out shape. With `n_jobs` other than 1 the folds are fitted in that many
    worker processes (joblib): the boosted trees make them the slow part of a calibration's fit,
    and the trees' own threads gain little on a thousand points. The outcomes are the same either way."""
    tasks = [(form, index) for form in forms for index in range(len(shapes))]
    if n_jobs == 1 or len(tasks) < 2:
        outcomes = [_fold(shapes, backends, form, index) for form, index in tasks]
    else:
        from joblib import Parallel, delayed

        outcomes = Parallel(n_jobs=n_jobs)(delayed(_fold)(shapes, backends, form, index) for form, index in tasks)
    by_form: dict[str, list[_HeldOut | None]] = {form: [] for form in forms}
    for (form, _), outcome in zip(tasks, outcomes, strict=True):
        by_form[form].append(outcome)
    return by_form


def _loso_summary(form: str, outcomes: Sequence[_HeldOut | None]) -> dict:
    regrets, latency_errors, ratio_errors = [], [], []
    for outcome in outcomes:
        if outcome is None:
            continue
        regrets.append(outcome.chosen / outcome.oracle)
        latency_errors += outcome.latency_errors
        ratio_errors += outcome.ratio_errors
    if not regrets:
        return {"form": form, "shapes": 0}
    return {
        "form": form,
        "shapes": len(regrets),
        "median_regret": float(np.median(regrets)),
        "worst_regret": float(np.max(regrets)),
        "mean_regret": float(np.mean(regrets)),
        "median_abs_log_error": float(np.median(latency_errors)),
        "median_abs_log_ratio_error": float(np.median(ratio_errors)) if ratio_errors else 0.0,
    }


class DeviceModel:
    """Latency and memory predictions per backend for any layer spec of one device, dtype and compile mode."""

    def __init__(self, fits: dict):
        if fits.get("format") != FORMAT_VERSION:
            raise ValueError(f"device model format {fits.get('format')!r} is not {FORMAT_VERSION}")
        self.fits = fits

    @classmethod
    def fit(
        cls,
        shapes: Sequence[ShapePoints],
        backends: Sequence[str],
        forms: Sequence[str] = FORMS,
        n_jobs: int | None = None,
    ) -> DeviceModel:
        """Fits every form, keeps the one with the lowest mean leave-one-shape-out regret (the lower latency error
        breaks ties) and refits it on every shape. `n_jobs`: worker processes for the held-out folds (default: one
        per core, at most `MAX_FIT_WORKERS`; 1: none)."""
        if n_jobs is None:
            n_jobs = min(os.cpu_count() or 1, MAX_FIT_WORKERS)
        outcomes = _held_out_outcomes(shapes, backends, forms, n_jobs)
        loso = [_loso_summary(form, outcomes[form]) for form in forms]
        scored = [r for r in loso if r["shapes"]]
        if scored:
            best = min(scored, key=lambda r: (round(r["mean_regret"], 4), r["median_abs_log_error"]))["form"]
        else:  # too few shapes to hold one out: the form that extrapolates like hardware
            best = "additive"
        return cls.of_form(shapes, backends, best, loso)

    @classmethod
    def of_form(
        cls, shapes: Sequence[ShapePoints], backends: Sequence[str], form: str, loso: list[dict] | None = None
    ) -> DeviceModel:
        """The model of one `form` fitted on every shape (`loso`: the leave-one-shape-out results to keep with it)."""
        backends_fit = _fit_backends(shapes, backends, form)
        if not backends_fit:
            raise ValueError("no backend has enough successful measurements to fit a device model")
        spreads = [
            relative_spread(m.times_ms)
            for shape in shapes
            for m in shape.measurements
            if m.status == Status.OK and len(m.times_ms) >= 2
        ]
        noise = float(np.median(spreads)) if spreads else 0.0
        return cls(
            {"format": FORMAT_VERSION, "form": form, "backends": backends_fit, "loso": loso or [], "noise": noise}
        )

    @property
    def backends(self) -> list[str]:
        return list(self.fits["backends"])

    @property
    def form(self) -> str:
        return self.fits["form"]

    @property
    def loso(self) -> list[dict]:
        return self.fits.get("loso", [])

    def noise(self) -> float:
        """The relative spread of repeated timings of one calibration point (interquartile range over median, the
        median over every point of every shape), as `CostModel.noise`: the saving below which a decision table
        merges a region into its neighbour. Not the prediction error: a ranking can be right when both latencies are
        off by the same share."""
        return float(self.fits.get("noise", 0.0))

    def margin(self) -> float:
        """The predicted saving a backend needs over the fallback rule's choice before the device model overrides it:
        the chosen form's leave-one-shape-out median relative error of the latency ratio between two backends (0
        when unknown). A ranking the model cannot tell apart from its own error is no reason to leave the default."""
        chosen = next((r for r in self.loso if r.get("form") == self.form and r.get("shapes")), None)
        return math.expm1(chosen.get("median_abs_log_ratio_error", 0.0)) if chosen else 0.0

    def latency_ms(self, spec: LayerSpec, backend: str, num_tokens: np.ndarray) -> np.ndarray:
        x = feature_matrix(spec, np.maximum(np.asarray(num_tokens, dtype=np.float64), 1.0), _X)
        return _predict_latency(self.fits["backends"][backend]["latency"], x)

    def peak_bytes(self, spec: LayerSpec, backend: str, num_tokens: np.ndarray) -> np.ndarray:
        x = feature_matrix(spec, np.asarray(num_tokens, dtype=np.float64), MEMORY_FEATURES)
        return np.maximum(x @ self.fits["backends"][backend]["memory"]["coef"], 0.0)

    def for_spec(self, spec: LayerSpec) -> ShapeCostModel:
        """The cost-model view of one shape, which `table.build_profile_table` turns into a decision table."""
        return ShapeCostModel(self, spec)


class ShapeCostModel:
    """A `DeviceModel` seen for one layer spec, with the interface of `cost_model.CostModel`."""

    def __init__(self, model: DeviceModel, spec: LayerSpec):
        self.model, self.spec = model, spec

    @property
    def backends(self) -> list[str]:
        return self.model.backends

    def max_tokens(self, backend: str) -> int:
        return TABLE_MAX_TOKENS

    def infeasible_from(self, backend: str) -> float:
        return math.inf

    def latency_ms(self, backend: str, num_tokens: np.ndarray) -> np.ndarray:
        tokens = np.maximum(np.asarray(num_tokens, dtype=np.float64), 1.0)
        inside = self.model.latency_ms(self.spec, backend, np.minimum(tokens, TABLE_MAX_TOKENS))
        return inside * np.maximum(tokens / TABLE_MAX_TOKENS, 1.0)

    def peak_bytes(self, backend: str, num_tokens: np.ndarray) -> np.ndarray:
        return self.model.peak_bytes(self.spec, backend, num_tokens)

    def memory_line(self, backend: str) -> tuple[float, float]:
        at_zero, at_one = self.model.peak_bytes(self.spec, backend, np.array([0.0, 1.0]))
        return float(at_zero), float(at_one - at_zero)

    def margin(self) -> float:
        return self.model.margin()

    def noise(self) -> float:
        return self.model.noise()
