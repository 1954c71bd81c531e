"""Which experts the tokens of a calibration or benchmark call are routed to: uniform, Zipf-skewed, or the
popularity a real model produced (a file written by `autoexperts.record_routing`).

Backends react to skew differently: `eager` loops over the experts hit, `grouped_mm` runs one grouped GEMM whatever
the split, `batched_mm` gathers one expert per (token, slot). A calibration measured with the routing a model really
produces puts the crossovers where that model sees them.

Every routing draws, per token, `top_k` distinct experts: a sample without replacement from the experts' sampling
weights (Gumbel-top-k: the `top_k` largest of `log weight + Gumbel noise`, sorted by that score as a router's
top-k is), from a seeded generator, so one seed gives one draw.

- `uniform`: every expert alike (the draw is exactly the one autoexperts always made: top-k of uniform noise).
- `zipf:S` (`S >= 0`): the expert of popularity rank `r` (1, 2, ...) has sampling weight `r ** -S`; expert 0 is the
  most popular. Which expert is popular does not change any backend's cost, only how many tokens each one gets.
- a routing file: each expert's measured share of the tokens, for the layers of the calibrated layer's shape
  (same `num_experts` and `top_k`). Layers differ in *which* experts are hot, not in how skewed they are, so the
  curve used is the **mean over those layers of each layer's shares sorted from the most popular down** (averaging
  unsorted shares would flatten the skew). The sampling weights are fitted so that each expert's share of the
  drawn tokens matches that curve (a share is not proportional to its sampling weight once `top_k > 1`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:  # torch is imported where a draw needs it: parsing a --routing value stays quick
    import torch

logger = logging.getLogger(__name__)

ROUTING_FILE_KIND = "autoexperts-routing"
ROUTING_SCHEMA_VERSION = 1
UNIFORM, ZIPF, CAPTURED = "uniform", "zipf", "captured"
# The source of a routing `autoexperts.tune` captured from the model's own warm-up (no file).
IN_PLACE = "autoexperts.tune, in place"

# Fitting a captured curve's sampling weights: tokens of the fixed draw the shares are estimated on, iterations,
# and the largest share error at which the fit stops.
_FIT_TOKENS = 16384
_FIT_ITERATIONS = 40
_FIT_TOLERANCE = 2e-3
_FIT_SEED = 12345


@dataclasses.dataclass(frozen=True)
class CapturedLayer:
    """One experts layer of a routing file: its name, shape and each expert's count of tokens routed to it."""

    name: str
    num_experts: int
    top_k: int
    tokens: int
    expert_counts: tuple[int, ...]

    def sorted_shares(self) -> list[float]:
        """Each expert's share of the tokens (`count / tokens`, summing to `top_k`), most popular first."""
        return sorted((count / self.tokens for count in self.expert_counts), reverse=True)


@dataclasses.dataclass(frozen=True)
class Routing:
    """A routing distribution (see the module docstring).

    Attributes:
        kind (`str`): `"uniform"`, `"zipf"` or `"captured"`.
        exponent (`float`): the Zipf exponent `S` (`zipf` only).
        source (`str`): the routing file (`captured` only).
        layers (`tuple[CapturedLayer, ...]`): the file's layers (`captured`, before `for_shape`).
        popularity (`tuple[float, ...]`): each expert's share of the tokens, most popular first (`captured`, after
            `for_shape`: the curve that is drawn from).
        used_layers (`tuple[str, ...]`): the layers `popularity` averages (`captured`, after `for_shape`).
    """

    kind: str = UNIFORM
    exponent: float = 0.0
    source: str | None = None
    layers: tuple[CapturedLayer, ...] = dataclasses.field(default=(), compare=False, repr=False)
    popularity: tuple[float, ...] | None = None
    used_layers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Routing:
        """`uniform`, `zipf:S` or the path of a routing file.

        Raises:
            `UsageError`: a malformed or negative exponent, a missing or unreadable file.
        """
        text = text.strip()
        if text == UNIFORM:
            return cls()
        if text.startswith(f"{ZIPF}:"):
            value = text.removeprefix(f"{ZIPF}:")
            try:
                exponent = float(value)
            except ValueError:
                raise UsageError(f"routing {text!r}: the Zipf exponent {value!r} is not a number") from None
            if not math.isfinite(exponent) or exponent < 0:
                raise UsageError(f"routing {text!r}: the Zipf exponent must be a finite number >= 0")
            return cls(kind=ZIPF, exponent=exponent)
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"routing {text!r} is neither uniform, zipf:S nor a routing file")
        return cls(kind=CAPTURED, source=str(path), layers=read_routing_file(path))

    @classmethod
    def in_place(cls, layers: tuple[CapturedLayer, ...]) -> Routing:
        """The routing `autoexperts.tune` recorded of a model's own layers."""
        return cls(kind=CAPTURED, source=IN_PLACE, layers=layers)

    @property
    def is_uniform(self) -> bool:
        return self.kind == UNIFORM

    def text(self) -> str:
        """What `parse` reads back to this routing (`uniform`, `zipf:1.2` or the file's path)."""
        if self.kind == ZIPF:
            return f"{ZIPF}:{self.exponent:g}"
        return self.source if self.kind == CAPTURED else UNIFORM

    def slug(self) -> str:
        """A file-name-safe label: `uniform`, `zipf1.2`, or `captured-<file stem>`."""
        if self.kind == ZIPF:
            return f"{ZIPF}{self.exponent:g}"
        return f"captured-{Path(self.source).stem}" if self.kind == CAPTURED else UNIFORM

    def for_shape(self, num_experts: int, top_k: int) -> Routing:
        """This routing for a layer of `num_experts` experts and `top_k`: a routing file's curve for that shape (the
        mean over its layers of that shape, see the module docstring); uniform and Zipf routings as they are.

        Raises:
            `UsageError`: when a routing file holds no layer of that shape, or `top_k > num_experts`.
        """
        if top_k > num_experts:
            raise UsageError(f"cannot route {top_k} distinct experts per token among {num_experts}")
        if self.kind != CAPTURED or self.popularity is not None:
            return self
        matching = [layer for layer in self.layers if (layer.num_experts, layer.top_k) == (num_experts, top_k)]
        if not matching:
            shapes = sorted({(layer.num_experts, layer.top_k) for layer in self.layers})
            found = ", ".join(f"{e} experts top-{k}" for e, k in shapes) or "no layers"
            raise UsageError(
                f"routing file {self.source} has no layer with {num_experts} experts and top-{top_k} (it has {found})"
            )
        curves = [layer.sorted_shares() for layer in matching]
        popularity = tuple(sum(column) / len(curves) for column in zip(*curves, strict=True))
        return dataclasses.replace(
            self, layers=(), popularity=popularity, used_layers=tuple(layer.name for layer in matching)
        )

    def log_weights(self, num_experts: int, top_k: int) -> torch.Tensor:
        """`(num_experts,)` float64 log sampling weights of the experts (`-inf`: never drawn)."""
        import torch

        if self.kind == UNIFORM:
            return torch.zeros(num_experts, dtype=torch.float64)
        if self.kind == ZIPF:
            ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
            return -self.exponent * ranks.log()
        resolved = self.for_shape(num_experts, top_k)
        return _fitted_log_weights(resolved.popularity, top_k).clone()

    def draw(self, num_tokens: int, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
        """`top_k_index (num_tokens, top_k)` int64: distinct experts per token, ordered by score (a router's top-k).

        Args:
            generator (`torch.Generator`): a CPU generator; the draw uses `num_tokens * num_experts` uniforms of it.
        """
        import torch

        uniforms = torch.rand(num_tokens, num_experts, generator=generator)  # (num_tokens, num_experts)
        if self.kind == UNIFORM:  # the top-k of uniform noise: autoexperts' original draw, bit for bit
            return uniforms.topk(top_k, dim=-1).indices
        log_weights = self.log_weights(num_experts, top_k).float()  # (num_experts,)
        return (log_weights + _gumbel(uniforms)).topk(top_k, dim=-1).indices  # (num_tokens, top_k)

    def describe(self) -> str:
        """One line, e.g. `zipf:1.2 (expert popularity rank r has weight r^-1.2)`."""
        if self.kind == UNIFORM:
            return "uniform (every expert alike), distinct experts per token"
        if self.kind == ZIPF:
            return f"zipf:{self.exponent:g} (the expert of popularity rank r has sampling weight r^-{self.exponent:g})"
        if self.popularity is None:
            return f"captured from {self.source} ({len(self.layers)} layers)"
        top_k = round(sum(self.popularity))
        head = ", ".join(f"{share:.0%}" for share in self.popularity[:3])
        return (
            f"captured from {self.source}: mean of {len(self.used_layers)} layers' sorted popularity; "
            f"the top experts take {head} of the tokens (uniform: {top_k / len(self.popularity):.0%})"
        )

    def to_json(self) -> dict:
        """What a profile records: the routing's text and kind, and a captured curve with its layers."""
        record: dict = {"kind": self.kind, "text": self.text(), "description": self.describe()}
        if self.kind == ZIPF:
            record["exponent"] = self.exponent
        if self.kind == CAPTURED:
            record["source"] = self.source
            if self.popularity is not None:
                record["layers"] = list(self.used_layers)
                record["popularity"] = [round(share, 6) for share in self.popularity]
        return record

    def checkpoint_identity(self) -> dict:
        """What a calibration's checkpoint records of the routing: all of it (`to_json`), except for a routing
        captured in place, whose curve changes with every warm-up (points measured under the last one are kept)."""
        if self.source == IN_PLACE:
            return {"kind": CAPTURED, "source": IN_PLACE}
        return self.to_json()

    @classmethod
    def from_json(cls, record: dict | str | None) -> Routing:
        """The routing a profile recorded; profiles from before routings were recorded (a plain string, or
        nothing) were measured uniform."""
        if not isinstance(record, dict) or record.get("kind", UNIFORM) == UNIFORM:
            return cls()
        if record["kind"] == ZIPF:
            return cls(kind=ZIPF, exponent=float(record["exponent"]))
        if record["kind"] == CAPTURED:
            popularity = record.get("popularity")
            return cls(
                kind=CAPTURED,
                source=record.get("source"),
                popularity=tuple(float(s) for s in popularity) if popularity is not None else None,
                used_layers=tuple(record.get("layers", ())),
            )
        raise ValueError(f"unknown routing kind {record['kind']!r}")


def _gumbel(uniforms: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms in [0, 1)."""
    import torch

    tiny = torch.finfo(uniforms.dtype).tiny
    return -(-uniforms.clamp_min(tiny).log()).log()


@functools.lru_cache(maxsize=16)
def _fitted_log_weights(popularity: tuple[float, ...], top_k: int) -> torch.Tensor:
    """Log sampling weights whose Gumbel-top-k draws give each expert the share `popularity` of the tokens.

    Multiplicative fixed-point iteration on one fixed draw of Gumbel noise (common random numbers, so the result is
    deterministic): each weight is scaled by its target share over its drawn share until the largest error is below
    `_FIT_TOLERANCE`. Experts with a zero share are never drawn.
    """
    import torch

    target = torch.tensor(popularity, dtype=torch.float64)  # (num_experts,)
    num_experts = target.numel()
    hit = target > 0
    log_weights = torch.where(hit, target.clamp_min(1e-12).log(), torch.tensor(-math.inf, dtype=torch.float64))
    if int(hit.sum()) <= top_k:  # exactly top_k experts ever hit: every token takes all of them
        return log_weights
    generator = torch.Generator().manual_seed(_FIT_SEED)
    noise = _gumbel(torch.rand(_FIT_TOKENS, num_experts, generator=generator, dtype=torch.float64))
    for _ in range(_FIT_ITERATIONS):
        index = (log_weights + noise).topk(top_k, dim=-1).indices  # (_FIT_TOKENS, top_k)
        drawn = torch.bincount(index.flatten(), minlength=num_experts).double() / _FIT_TOKENS  # (num_experts,)
        error = float((drawn - target).abs().max())
        if error < _FIT_TOLERANCE:
            break
        step = (target[hit] / drawn[hit].clamp_min(0.5 / _FIT_TOKENS)).log()
        log_weights[hit] += step
        log_weights[hit] -= log_weights[hit].max()  # keep the scale fixed
    logger.debug("fitted sampling weights: largest share error %.4f", error)
    return log_weights


def read_routing_file(path: Path) -> tuple[CapturedLayer, ...]:
    """The layers of a routing file written by `RoutingRecord.save`.

    Raises:
        `UsageError`: when the file is not a routing file this version reads, or holds no usable layer.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"routing file {path} cannot be read: {error}") from None
    if not isinstance(record, dict) or record.get("kind") != ROUTING_FILE_KIND:
        raise UsageError(f"routing file {path} is not an autoexperts routing file (see autoexperts.record_routing)")
    if record.get("schema_version") != ROUTING_SCHEMA_VERSION:
        raise UsageError(f"routing file {path} has schema version {record.get('schema_version')!r}, not 1")
    try:
        layers = tuple(
            CapturedLayer(
                name=str(entry["name"]),
                num_experts=int(entry["num_experts"]),
                top_k=int(entry["top_k"]),
                tokens=int(entry["tokens"]),
                expert_counts=tuple(int(c) for c in entry["expert_counts"]),
            )
            for entry in record["layers"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"routing file {path} has a malformed layer ({type(error).__name__}: {error})") from None
    usable = tuple(layer for layer in layers if layer.tokens > 0 and len(layer.expert_counts) == layer.num_experts)
    if not usable:
        raise UsageError(f"routing file {path} holds no layer that saw any token")
    return usable
