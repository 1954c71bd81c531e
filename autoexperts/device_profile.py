"""Device models on disk: `<profile dir>/<device slug>/device-model-<dtype>-<compile mode>.{json,joblib}`.

The JSON holds every design shape's measurements (so the model can always be refit from it), the form chosen and
each form's leave-one-shape-out result; the joblib holds the fitted estimators. Writing, backups and trust are
`autoexperts.store`'s, as for shape profiles.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from . import settings, store
from .choices import NONE
from .cost_model import Measurement
from .device_model import DeviceModel, ShapePoints
from .errors import ProfileSkippedWarning, warn_once
from .freshness import admit_stale, stale_reasons
from .layer import LayerSpec

logger = logging.getLogger(__name__)

DEVICE_MODEL_KIND = "autoexperts-device-model"
SCHEMA_VERSION = 1


@dataclasses.dataclass
class DeviceProfile:
    """A device model with what it was measured on and how (`model_source` as a profile's)."""

    device_name: str
    device_type: str
    dtype: str
    compile_mode: str
    shapes: list[ShapePoints]
    model: DeviceModel
    metadata: dict
    json_path: Path | None = None
    model_source: str = "fitted"

    def stem(self) -> str:
        return device_model_stem(self.dtype, self.compile_mode)

    def stale_reasons(self) -> list[str]:
        """How what it was measured with differs from what runs now (`freshness.stale_reasons`; empty if nothing)."""
        return stale_reasons({"versions": self.metadata.get("versions"), "device": self.metadata.get("device", {})})

    def to_json(self) -> dict:
        return {
            "kind": DEVICE_MODEL_KIND,
            "schema_version": SCHEMA_VERSION,
            **self.metadata,
            "device": {**self.metadata.get("device", {}), "name": self.device_name, "type": self.device_type},
            "dtype": self.dtype,
            "compile_mode": self.compile_mode,
            "form": self.model.form,
            "leave_one_shape_out": self.model.loso,
            "shapes": [
                {"experts": s.spec.shape_fields(), "measurements": [m.to_json() for m in s.measurements]}
                for s in self.shapes
            ],
        }


def device_model_command(device_type: str, dtype: str, compile_mode: str) -> str:
    """The command that calibrates the device model of `device_type`, `dtype` and calibration mode `compile_mode`."""
    command = f"autoexperts calibrate --device-model --device {device_type} --dtype {dtype}"
    return command + (f" --compile {compile_mode}" if compile_mode != NONE else "")


def device_model_stem(dtype: str, compile_mode: str) -> str:
    return f"{store.DEVICE_MODEL_PREFIX}{dtype}-{compile_mode}"


def save_device_profile(profile: DeviceProfile, folder: Path) -> Path:
    """Saves `profile` under `folder/<device slug>/` (see `store.save_files`) and returns the JSON path."""
    target = store.file_target(folder, profile.device_name, profile.stem())
    profile.json_path, _ = store.save_files(target, profile.to_json(), profile.model.fits)
    return profile.json_path


def load_device_profile(json_path: Path, trusted: bool | None = None) -> DeviceProfile:
    """Reads a device model; its joblib is used only where it can be trusted (see `store.load_model`), else the
    model is refit from the JSON.

    Raises:
        `ProfileError` (a `ValueError`): when the file is not a device model this version reads.
    """
    json_path = Path(json_path)
    record = store.read_record(json_path, DEVICE_MODEL_KIND, SCHEMA_VERSION)
    try:
        device_type, dtype = record["device"]["type"], record["dtype"]
        shapes = [
            ShapePoints(
                LayerSpec(**shape["experts"], dtype=dtype, device_type=device_type),
                tuple(Measurement.from_json(m) for m in shape["measurements"]),
            )
            for shape in record["shapes"]
        ]
        form, loso = record["form"], record["leave_one_shape_out"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        reason = f"missing or malformed fields ({type(error).__name__}: {error})"
        raise store.ProfileError(json_path, reason) from error

    def refit() -> DeviceModel:
        backends = sorted({m.backend for s in shapes for m in s.measurements})
        return DeviceModel.of_form(shapes, backends, form, loso)

    model, source = store.load_model(json_path, record, build=DeviceModel, refit=refit, trusted=trusted)
    metadata = {k: v for k, v in record.items() if k in ("created", "versions", "sweep")}
    metadata["device"] = record["device"]
    return DeviceProfile(
        record["device"]["name"], device_type, dtype, record["compile_mode"], shapes, model, metadata, json_path, source
    )


def find_device_profile(
    device_name: str, dtype: str, compile_mode: str, folders, stale_policy: str = settings.STALE_USE
) -> DeviceProfile | None:
    """The first readable device model for `device_name`, `dtype` and `compile_mode` in `folders`, if any.

    A stale one (measured with other software or, on CPU, other allocator settings) is used or skipped as
    `stale_policy` says, with a `StaleProfileWarning` either way (`freshness.admit_stale`), as profiles are.
    """
    for folder in folders:
        target = store.file_target(Path(folder), device_name, device_model_stem(dtype, compile_mode))
        json_path = target.with_suffix(".json")
        if not json_path.is_file():
            continue
        try:
            profile = load_device_profile(json_path)
        except (OSError, ValueError) as error:
            reason = error.reason if isinstance(error, store.ProfileError) else str(error)
            warn_once(
                ProfileSkippedWarning, str(json_path), f"autoexperts: skipping device model {json_path}: {reason}"
            )
            continue
        if profile.device_name != device_name:
            continue
        command = device_model_command(profile.device_type, dtype, compile_mode)
        if admit_stale("device model", json_path, profile.stale_reasons(), stale_policy, command):
            return profile
    return None
