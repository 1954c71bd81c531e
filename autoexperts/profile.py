"""Profiles on disk: a readable `.json` record and a `.joblib` holding the fitted cost model.

Layout: `<profile dir>/<device slug>/<experts class>-e<E>-h<H>-i<I>-k<top_k>-<dtype>-<compile mode>.{json,joblib}`.
The JSON holds everything measured (so the cost model can always be refit from it); the joblib holds the fitted
estimators. joblib is pickle, and loading a pickle runs code: profiles are only read from the folders the user
configured and the folder the project ships.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import joblib

from . import settings
from .cost_model import CostModel, Measurement
from .device import device_slug
from .layer import LayerSpec

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PROFILE_KIND = "autoexperts-profile"


@dataclasses.dataclass
class Profile:
    """A calibration's record: where and what it measured, the raw measurements and the fitted cost model."""

    spec: LayerSpec
    device_name: str
    compile_mode: str
    measurements: list[Measurement]
    metadata: dict
    cost_model: CostModel
    json_path: Path | None = None

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

    def stem(self) -> str:
        return self.spec.file_stem(self.compile_mode)

    def matches(self, spec: LayerSpec, device_name: str, compile_mode: str) -> bool:
        return self.spec == spec and self.device_name == device_name and self.compile_mode == compile_mode


def default_write_dir() -> Path:
    """Where `calibrate` writes when no `--out` is given (and where `auto` looks first)."""
    return settings.user_profile_dir()


def search_dirs() -> list[Path]:
    """The trusted folders `auto` reads profiles from, in order: the user's, then the shipped ones."""
    return [settings.user_profile_dir(), settings.shipped_profile_dir()]


def _atomic_write(path: Path, write) -> None:
    """Writes through a temporary file in the same folder, then renames it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            write(tmp_file)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_profile(profile: Profile, folder: Path) -> Path:
    """Saves `profile` under `folder/<device slug>/` and returns the JSON path."""
    target = Path(folder) / device_slug(profile.device_name) / profile.stem()
    json_path, model_path = target.with_suffix(".json"), target.with_suffix(".joblib")
    _atomic_write(model_path, lambda f: joblib.dump(profile.cost_model.fits, f))
    record = profile.to_json()
    record["cost_model"] = {"file": model_path.name, "format": profile.cost_model.fits["format"]}
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    _atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))
    profile.json_path = json_path
    return json_path


def spec_from_record(record: dict) -> LayerSpec:
    experts = record["experts"]
    fields = {f.name for f in dataclasses.fields(LayerSpec)} - {"dtype", "device_type"}
    return LayerSpec(
        **{name: experts[name] for name in fields}, dtype=record["dtype"], device_type=record["device"]["type"]
    )


def read_record(json_path: Path) -> dict:
    """Reads and checks a profile's JSON record.

    Raises:
        `ValueError`: when the file is not a profile this version can read.
    """
    try:
        record = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {json_path}: {error}") from error
    if not isinstance(record, dict) or record.get("kind") != PROFILE_KIND:
        raise ValueError(f"{json_path} is not an autoexperts profile")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{json_path} has schema version {record.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return record


def load_profile(json_path: Path) -> Profile:
    """Loads a profile: its JSON record and the fitted cost model beside it (refit from the JSON if it is missing).

    Raises:
        `ValueError`: when the record cannot be read.
    """
    json_path = Path(json_path)
    record = read_record(json_path)
    try:
        spec = spec_from_record(record)
        measurements = [Measurement.from_json(m) for m in record["measurements"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{json_path} is missing profile fields: {error}") from error
    model_path = json_path.with_name(record.get("cost_model", {}).get("file", json_path.stem + ".joblib"))
    try:
        cost_model = CostModel(joblib.load(model_path))
    except Exception as error:  # a missing or unreadable model is refit from the measurements
        logger.warning(
            "Refitting the cost model of %s from its measurements (%s: %s)", json_path, type(error).__name__, error
        )
        cost_model = CostModel.fit(measurements)
    metadata = {k: v for k, v in record.items() if k not in ("measurements", "cost_model")}
    return Profile(
        spec=spec,
        device_name=record["device"]["name"],
        compile_mode=record["compile_mode"],
        measurements=measurements,
        metadata=metadata,
        cost_model=cost_model,
        json_path=json_path,
    )


def profile_files(folders: Iterable[Path]) -> list[Path]:
    """Every profile JSON under `folders` (one level of device folders, or flat), newest first per folder."""
    found = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        files = [*folder.glob("*.json"), *folder.glob("*/*.json")]
        found.extend(sorted(files, key=lambda p: p.stat().st_mtime, reverse=True))
    return found


def find_profile(spec: LayerSpec, device_name: str, compile_mode: str, folders: Iterable[Path]) -> Profile | None:
    """The first profile in `folders` measured for `spec` on `device_name` in `compile_mode`, if any."""
    for json_path in profile_files(folders):
        try:
            record = read_record(json_path)
            candidate = spec_from_record(record)
            if candidate != spec or record["device"]["name"] != device_name or record["compile_mode"] != compile_mode:
                continue
            return load_profile(json_path)
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("Ignoring profile %s: %s", json_path, error)
    return None
