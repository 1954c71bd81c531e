"""The cost model: each backend's latency and peak memory as functions of the token count.

Per backend, fitted on one sweep's measurements:

- **latency**: an isotonic regression of log(latency) on log2(num_tokens). Between measured token counts it
  interpolates linearly in log–log space; it never predicts that more tokens cost less (a physical prior that also
  absorbs timing noise). Below the smallest measured count it holds the smallest measurement; above the largest,
  latency grows in proportion to the token count (throughput stays at its last measured value).
- **memory**: a non-negative affine fit of peak bytes on num_tokens (the transient tensors of every backend grow
  linearly with the tokens routed), which extrapolates in both directions.
- **feasibility**: a backend that failed or ran out of memory at some token count is infeasible from there up.
- **noise**: the median, over every successful point with at least two timings, of the spread of its timings
  (interquartile range over median): how far apart two timings of one kernel lie on this machine. Decision tables
  do not split a range for a predicted saving smaller than this (see `autoexperts.table`).

The fitted estimators are plain scikit-learn objects kept in a dict, so a saved model needs only scikit-learn to load.
scikit-learn is imported when a model is fitted (or unpickled), not with this module: it takes longer to import than
everything else `import autoexperts` needs, and a process whose layers have their decision tables never calls it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1


class Status:
    """What became of one sweep point (a backend at a token count)."""

    OK = "ok"  # measured
    OOM = "oom"  # the call ran out of memory
    ERROR = "error"  # the call raised
    SKIPPED = "skipped"  # not run: an earlier failure, or over the sweep's memory limit (infeasible)
    SLOW = "slow"  # not run: far slower than the fastest backend (its latency is extrapolated)


# The statuses that make a backend infeasible from that token count up.
FAILED = (Status.OOM, Status.ERROR, Status.SKIPPED)
# A backend at least this many times slower than the fastest at two successive token counts stops being timed
# (`Status.SLOW`); where a choice picks it anyway, it costs at least this many times the fastest.
SLOW_FACTOR = 8.0


@dataclass(frozen=True)
class Measurement:
    """One sweep point: `backend` at `num_tokens`.

    `status` is one of `Status`'s: `"ok"`, `"oom"`, `"error"`, `"skipped"` or `"slow"`.
    """

    backend: str
    num_tokens: int
    status: str
    median_ms: float | None = None
    peak_bytes: int | None = None
    times_ms: tuple[float, ...] = ()
    error: str | None = None

    def to_json(self) -> dict:
        record = {"backend": self.backend, "num_tokens": self.num_tokens, "status": self.status}
        if self.median_ms is not None:
            record["median_ms"] = self.median_ms
            record["times_ms"] = list(self.times_ms)
        if self.peak_bytes is not None:
            record["peak_bytes"] = self.peak_bytes
        if self.error is not None:
            record["error"] = self.error
        return record

    @classmethod
    def from_json(cls, record: Mapping) -> Measurement:
        return cls(
            backend=str(record["backend"]),
            num_tokens=int(record["num_tokens"]),
            status=str(record["status"]),
            median_ms=None if record.get("median_ms") is None else float(record["median_ms"]),
            peak_bytes=None if record.get("peak_bytes") is None else int(record["peak_bytes"]),
            times_ms=tuple(float(t) for t in record.get("times_ms", ())),
            error=record.get("error"),
        )


class CostModel:
    """Latency, memory and feasibility predictions per backend, fitted with `CostModel.fit`."""

    def __init__(self, fits: dict):
        if fits.get("format") != FORMAT_VERSION:
            raise ValueError(f"cost model format {fits.get('format')!r} is not {FORMAT_VERSION}")
        self.fits = fits

    @classmethod
    def fit(cls, measurements: Iterable[Measurement]) -> CostModel:
        """Fits one latency and one memory estimator per backend that has at least one successful point."""
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LinearRegression

        by_backend: dict[str, list[Measurement]] = {}
        for point in measurements:
            by_backend.setdefault(point.backend, []).append(point)
        backends = {}
        spreads = []
        for backend, points in by_backend.items():
            ok = sorted((p for p in points if p.status == Status.OK), key=lambda p: p.num_tokens)
            failed = [p.num_tokens for p in points if p.status in FAILED]
            if not ok:
                continue
            spreads += [relative_spread(p.times_ms) for p in ok if len(p.times_ms) >= 2]
            tokens = np.array([p.num_tokens for p in ok], dtype=np.float64)
            latency = IsotonicRegression(increasing=True, out_of_bounds="clip")
            latency.fit(np.log2(tokens), np.log([max(p.median_ms, 1e-6) for p in ok]))
            memory = LinearRegression(positive=True)
            peaks = np.array([p.peak_bytes or 0 for p in ok], dtype=np.float64)
            memory.fit(tokens.reshape(-1, 1), peaks)
            backends[backend] = {
                "latency": latency,
                "memory": memory,
                "max_tokens": int(tokens.max()),
                "infeasible_from": min((n for n in failed if n > tokens.min()), default=None),
            }
        noise = float(np.median(spreads)) if spreads else None
        return cls({"format": FORMAT_VERSION, "backends": backends, "noise": noise})

    @property
    def backends(self) -> list[str]:
        return list(self.fits["backends"])

    def max_tokens(self, backend: str) -> int:
        """The largest token count measured for `backend`."""
        return self.fits["backends"][backend]["max_tokens"]

    def infeasible_from(self, backend: str) -> float:
        """The smallest token count at which `backend` failed (`inf` when it never did)."""
        limit = self.fits["backends"][backend]["infeasible_from"]
        return math.inf if limit is None else limit

    def latency_ms(self, backend: str, num_tokens: np.ndarray) -> np.ndarray:
        """Predicted latency in milliseconds at each token count."""
        fit = self.fits["backends"][backend]
        tokens = np.maximum(np.asarray(num_tokens, dtype=np.float64), 1.0)
        top = float(fit["max_tokens"])
        inside = np.exp(fit["latency"].predict(np.log2(np.minimum(tokens, top))))
        # Beyond the measured range, time grows in proportion to the tokens.
        return inside * np.maximum(tokens / top, 1.0)

    def peak_bytes(self, backend: str, num_tokens: np.ndarray) -> np.ndarray:
        """Predicted transient peak memory in bytes at each token count."""
        tokens = np.asarray(num_tokens, dtype=np.float64).reshape(-1, 1)
        return np.maximum(self.fits["backends"][backend]["memory"].predict(tokens), 0.0)

    def noise(self) -> float:
        """The relative spread of repeated timings of one point (interquartile range over median, the median over
        points); 0.0 when no point was timed twice, or for a model saved before it was recorded."""
        noise = self.fits.get("noise")
        return 0.0 if noise is None else float(noise)

    def memory_line(self, backend: str) -> tuple[float, float]:
        """The memory fit as `(bytes at zero tokens, bytes per token)`."""
        memory = self.fits["backends"][backend]["memory"]
        return float(memory.intercept_), float(memory.coef_[0])


def relative_spread(times_ms: tuple[float, ...]) -> float:
    """The interquartile range of `times_ms` over their median."""
    q1, median, q3 = np.percentile(times_ms, [25, 50, 75])
    return float((q3 - q1) / median) if median > 0 else 0.0
