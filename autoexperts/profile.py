"""Shape profiles: one experts layer's calibration, its record and how `auto` finds the one for a layer.

A profile is `<profile dir>/<device slug>/<experts class>-e<E>-h<H>-i<I>-k<top_k>-<dtype>-<compile mode>.{json,joblib}`:
the JSON holds what was measured and how (every measurement, so the cost model can always be refit from it), the
joblib the fitted cost model. How the two files are written, backed up and trusted is `autoexperts.store`'s, shared
with device models.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import settings, store
from .cost_model import CostModel, Measurement, Status
from .device import device_slug
from .errors import ProfileSkippedWarning, warn_once
from .freshness import admit_stale, stale_reasons
from .layer import LayerSpec
from .store import ProfileError, Replaced

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PROFILE_KIND = "autoexperts-profile"


@dataclasses.dataclass
class Profile:
    """A calibration's record: where and what it measured, the raw measurements and the fitted cost model.

    `model_source` says where the cost model came from (`"joblib"`, or `"refit: <why>"`); `stale` lists how the
    recorded library and driver versions differ from the running ones (empty when they match).
    """

    spec: LayerSpec
    device_name: str
    compile_mode: str
    measurements: list[Measurement]
    metadata: dict
    cost_model: CostModel
    json_path: Path | None = None
    model_source: str = "fitted"
    stale: list[str] = dataclasses.field(default_factory=list)
    # Set by `save_profile` when the save replaced a profile at the same place (kept as a backup).
    replaced: Replaced | None = None
    # Set by `calibrate` when another process (e.g. another rank of the same torchrun launch) measured it meanwhile.
    measured_elsewhere: bool = False

    def to_json(self) -> dict:
        return {
            "kind": PROFILE_KIND,
            "schema_version": SCHEMA_VERSION,
            **self.metadata,
            "device": {**self.metadata.get("device", {}), "name": self.device_name, "type": self.spec.device_type},
            "dtype": self.spec.dtype,
            "compile_mode": self.compile_mode,
            "experts": {**self.metadata.get("experts", {}), **self.spec.shape_fields()},
            "measurements": [m.to_json() for m in self.measurements],
        }

    @property
    def device_type(self) -> str:
        return self.spec.device_type

    def stem(self) -> str:
        return self.spec.file_stem(self.compile_mode)


def save_profile(profile: Profile, folder: Path) -> Path:
    """Saves `profile` under `folder/<device slug>/` (see `store.save_files`) and returns the JSON path; a profile
    already at that place is kept as its backup, and `profile.replaced` then describes it."""
    target = store.file_target(folder, profile.device_name, profile.stem())
    profile.json_path, profile.replaced = store.save_files(target, profile.to_json(), profile.cost_model.fits)
    return profile.json_path


def spec_from_record(record: dict) -> LayerSpec:
    experts = record["experts"]
    fields = {f.name for f in dataclasses.fields(LayerSpec)} - {"dtype", "device_type"}
    defaults = {f.name: f.default for f in dataclasses.fields(LayerSpec) if f.default is not dataclasses.MISSING}
    return LayerSpec(
        **{name: experts.get(name, defaults.get(name)) if name in defaults else experts[name] for name in fields},
        dtype=record["dtype"],
        device_type=record["device"]["type"],
    )


def read_record(json_path: Path) -> dict:
    """Reads and checks a profile's JSON record.

    Raises:
        `ProfileError`: when the file is not a profile this version can read.
    """
    return store.read_record(json_path, PROFILE_KIND, SCHEMA_VERSION)


def _checked_cost_model(fits: dict, measurements: list[Measurement]) -> CostModel:
    """The cost model of unpickled `fits`, once it holds the measured backends and every estimator predicts.

    Raises:
        `ValueError`: saying why it cannot be used (it is then refit).
    """
    cost_model = CostModel(fits)
    measured = {m.backend for m in measurements if m.status == Status.OK}
    if set(cost_model.backends) != measured:
        raise ValueError(f"holds backends {sorted(cost_model.backends)}, measured {sorted(measured)}")
    for backend in cost_model.backends:
        latency = cost_model.latency_ms(backend, np.array([1, cost_model.max_tokens(backend)]))
        if not np.all(np.isfinite(latency)) or not np.all(np.isfinite(cost_model.peak_bytes(backend, [1]))):
            raise ValueError(f"predicts non-finite costs for {backend}")
        cost_model.memory_line(backend)
        cost_model.infeasible_from(backend)
    return cost_model


def load_profile(json_path: Path, trusted: bool | None = None) -> Profile:
    """Loads a profile: its JSON record and its cost model.

    Args:
        json_path (`Path`): the profile's `.json`.
        trusted (`bool`, *optional*): whether its `.joblib` may be unpickled. Default: only when it lies in a
            trusted folder (see `autoexperts.store`); otherwise the cost model is refit from the measurements.

    Raises:
        `ProfileError` (a `ValueError`): when the record cannot be read or holds no successful measurement.
    """
    json_path = Path(json_path)
    record = read_record(json_path)
    try:
        spec = spec_from_record(record)
        measurements = [Measurement.from_json(m) for m in record["measurements"]]
        device_name, compile_mode = str(record["device"]["name"]), str(record["compile_mode"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProfileError(json_path, f"missing or malformed fields ({type(error).__name__}: {error})") from error
    if not any(m.status == Status.OK for m in measurements):
        raise ProfileError(json_path, "no successful measurement to fit a cost model on")
    cost_model, source = store.load_model(
        json_path,
        record,
        build=lambda fits: _checked_cost_model(fits, measurements),
        refit=lambda: CostModel.fit(measurements),
        trusted=trusted,
    )
    metadata = {k: v for k, v in record.items() if k not in ("measurements", "cost_model")}
    return Profile(
        spec=spec,
        device_name=device_name,
        compile_mode=compile_mode,
        measurements=measurements,
        metadata=metadata,
        cost_model=cost_model,
        json_path=json_path,
        model_source=source,
        stale=stale_reasons(record),
    )


def _mismatch(record: dict, spec: LayerSpec, device_name: str, compile_mode: str) -> str | None:
    """How a record differs from what is wanted, in words, or `None` when it matches."""
    recorded = spec_from_record(record)
    if recorded != spec:
        changed = [
            f"{f.name} {getattr(recorded, f.name)!r}"
            for f in dataclasses.fields(LayerSpec)
            if getattr(recorded, f.name) != getattr(spec, f.name)
        ]
        return "it was measured for " + ", ".join(changed)
    if record["device"]["name"] != device_name:
        return f"it was measured on {record['device']['name']!r}, not {device_name!r}"
    if record["compile_mode"] != compile_mode:
        return f"it was measured in compile mode {record['compile_mode']!r}, not {compile_mode!r}"
    return None


def find_profile(
    spec: LayerSpec,
    device_name: str,
    compile_mode: str,
    folders: Iterable[Path],
    stale_policy: str = settings.STALE_USE,
) -> Profile | None:
    """The first usable profile in `folders` measured for `spec` on `device_name` in `compile_mode`, if any.

    Files that cannot be used are skipped with one `ProfileSkippedWarning` each, naming the file and the reason:
    unreadable files, and files at the place this profile would be saved (`<device slug>/<stem>.json`) whose
    record is for something else. Profiles of other layers and devices elsewhere are passed over silently.

    Args:
        stale_policy (`str`): use a stale profile with a `StaleProfileWarning` (`settings.STALE_USE`) or skip it
            (`settings.STALE_FALLBACK`); see `freshness.admit_stale`.
    """
    wanted = (device_slug(device_name), spec.file_stem(compile_mode))
    for json_path in store.profile_files(folders):
        where_ours = (json_path.parent.name, json_path.stem) == wanted
        try:
            record = read_record(json_path)
            mismatch = _mismatch(record, spec, device_name, compile_mode)
        except ProfileError as error:
            _skip(json_path, error.reason)
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            _skip(json_path, f"missing or malformed fields ({type(error).__name__}: {error})")
            continue
        if mismatch is not None:
            if where_ours:
                _skip(json_path, mismatch)
            else:
                logger.debug("%s does not apply: %s", json_path, mismatch)
            continue
        if not admit_stale("profile", json_path, stale_reasons(record), stale_policy, recalibrate_command(record)):
            continue
        try:
            return load_profile(json_path)
        except ProfileError as error:
            _skip(json_path, error.reason)
    return None


def recalibrate_command(record: dict) -> str:
    """The command that measures a profile like `record` again on this machine."""
    model = (record.get("model") or {}).get("name") or "<model id or config folder>"
    device = (record.get("device") or {}).get("type", "cpu")
    return f"autoexperts calibrate --model {model} --device {device} --dtype {record.get('dtype', 'float32')}"


def _skip(json_path: Path, reason: str) -> None:
    warn_once(ProfileSkippedWarning, f"{json_path}: {reason}", f"autoexperts: ignoring profile {json_path}: {reason}")
