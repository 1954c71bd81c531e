"""The checkpoint of an unfinished calibration: the points measured so far, so that `--resume` continues from them.

It lies beside the profile it will become (`<folder>/<device slug>/<stem>.checkpoint`, JSON; not a `.json`, so
profile searches pass it over), is rewritten atomically after every token count, and is removed once the profile
is saved. It records what the points were measured for; resuming with anything else is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..cost_model import Measurement
from ..errors import UsageError
from ..store import atomic_write_bytes

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "autoexperts-checkpoint"
CHECKPOINT_VERSION = 1


def checkpoint_path(target: Path) -> Path:
    """The checkpoint of the profile saved at `target` (a path without suffix)."""
    return target.with_suffix(".checkpoint")


def write_checkpoint(path: Path, header: dict, measurements: list[Measurement]) -> None:
    """Replaces the checkpoint at `path` with `header` (what was measured) and `measurements`, atomically."""
    record = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, **header}
    record["measurements"] = [m.to_json() for m in measurements]
    atomic_write_bytes(path, (json.dumps(record) + "\n").encode("utf-8"))


def read_checkpoint(path: Path, header: dict) -> list[Measurement]:
    """The points in the checkpoint at `path`, which must have been measured for `header`.

    Raises:
        `UsageError`: when there is no checkpoint (asking to resume nothing is a mistake worth stopping for), or it
        cannot be read, or it was measured for something else.
    """
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path} to resume; run without --resume")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("kind") != CHECKPOINT_KIND or record.get("version") != CHECKPOINT_VERSION:
            raise ValueError("not an autoexperts checkpoint of this version")
        measurements = [Measurement.from_json(m) for m in record["measurements"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"cannot resume from {path}: {error}; run without --resume to start afresh") from error
    differences = [
        f"{key} {record.get(key)!r} (now {value!r})" for key, value in header.items() if record.get(key) != value
    ]
    if differences:
        raise UsageError(
            f"cannot resume from {path}: it was measured with {'; '.join(differences)}; "
            "run without --resume to start afresh"
        )
    return measurements
