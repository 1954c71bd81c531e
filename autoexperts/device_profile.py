"""Device models on disk: `<profile dir>/<device slug>/device-model-<dtype>-<compile mode>.{json,joblib}`.

The JSON holds every design shape's measurements (so the model can always be refit from it), the form chosen and
each form's leave-one-shape-out result; the joblib holds the fitted estimators. The same rules as for profiles apply
(`autoexperts.profile`): atomic writes under the file lock, one `.previous` backup, and a joblib unpickled only
inside a trusted folder with a matching SHA-256 and scikit-learn version, else the model is refit from the JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path

from .cost_model import Measurement
from .device_model import DeviceModel, ShapePoints
from .errors import ProfileRefitWarning, ProfileSkippedWarning, StaleProfileWarning
from .freshness import stale_reasons
from .layer import LayerSpec
from .profile import (
    DEVICE_MODEL_PREFIX,
    _back_up,
    atomic_write_bytes,
    is_backup,
    is_trusted,
    pickled_fits,
    profile_path,
    warn_once,
    write_lock,
)

logger = logging.getLogger(__name__)

DEVICE_MODEL_KIND = "autoexperts-device-model"
SCHEMA_VERSION = 1


@dataclasses.dataclass
class DeviceProfile:
    """A device model with what it was measured on and how."""

    device_name: str
    device_type: str
    dtype: str
    compile_mode: str
    shapes: list[ShapePoints]
    model: DeviceModel
    metadata: dict
    json_path: Path | None = None

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
                {"experts": _spec_fields(s.spec), "measurements": [m.to_json() for m in s.measurements]}
                for s in self.shapes
            ],
        }


def device_model_command(device_type: str, dtype: str, compile_mode: str) -> str:
    """The command that calibrates the device model of `device_type`, `dtype` and calibration mode `compile_mode`."""
    command = f"autoexperts calibrate --device-model --device {device_type} --dtype {dtype}"
    return command + (f" --compile {compile_mode}" if compile_mode != "none" else "")


def device_model_stem(dtype: str, compile_mode: str) -> str:
    return f"{DEVICE_MODEL_PREFIX}{dtype}-{compile_mode}"


def is_device_model_file(path: Path) -> bool:
    return Path(path).name.startswith(DEVICE_MODEL_PREFIX)


def device_model_files(folders) -> list[Path]:
    """Every device model JSON in `folders`' device subfolders (backups left out)."""
    found = []
    for folder in folders:
        found += sorted(p for p in Path(folder).glob(f"*/{DEVICE_MODEL_PREFIX}*.json") if not is_backup(p))
    return found


def _spec_fields(spec: LayerSpec) -> dict:
    return spec.shape_fields()


def save_device_profile(profile: DeviceProfile, folder: Path) -> Path:
    """Saves `profile` under `folder/<device slug>/` (atomically, under the lock) and returns the JSON path."""
    target = profile_path(folder, profile.device_name, profile.stem())
    json_path, model_path = target.with_suffix(".json"), target.with_suffix(".joblib")
    model_bytes, record = pickled_fits(profile.model.fits, model_path, profile.to_json())
    target.parent.mkdir(parents=True, exist_ok=True)
    with write_lock(target):
        _back_up(json_path, model_path)
        atomic_write_bytes(model_path, model_bytes)
        atomic_write_bytes(json_path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    profile.json_path = json_path
    return json_path


def load_device_profile(json_path: Path) -> DeviceProfile:
    """Reads a device model; its joblib is used only where it can be trusted, else the model is refit.

    Raises:
        `ValueError`: when the file is not a device model this version reads.
    """
    json_path = Path(json_path)
    record = json.loads(json_path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("kind") != DEVICE_MODEL_KIND:
        raise ValueError("not an autoexperts device model")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema version {record.get('schema_version')!r} is not {SCHEMA_VERSION}: recalibrate")
    device_type, dtype = record["device"]["type"], record["dtype"]
    shapes = [
        ShapePoints(
            LayerSpec(**shape["experts"], dtype=dtype, device_type=device_type),
            tuple(Measurement.from_json(m) for m in shape["measurements"]),
        )
        for shape in record["shapes"]
    ]
    model = _trusted_model(json_path, record)
    if model is None:
        backends = sorted({m.backend for s in shapes for m in s.measurements})
        model = DeviceModel.of_form(shapes, backends, record["form"], record["leave_one_shape_out"])
    metadata = {k: v for k, v in record.items() if k in ("created", "versions", "sweep")}
    metadata["device"] = record["device"]
    return DeviceProfile(
        record["device"]["name"], device_type, dtype, record["compile_mode"], shapes, model, metadata, json_path
    )


def _trusted_model(json_path: Path, record: dict) -> DeviceModel | None:
    """The joblib's model when it lies in a trusted folder and matches the record, else `None` (refit)."""
    import joblib
    import sklearn

    model_path = json_path.with_suffix(".joblib")
    if not is_trusted(json_path):
        return None
    why = None
    recorded = record.get("versions", {}).get("scikit-learn")
    if recorded and recorded != sklearn.__version__:
        why = f"was written by scikit-learn {recorded} (running {sklearn.__version__})"
    else:
        try:
            data = model_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != record.get("cost_model", {}).get("sha256"):
                why = "does not match its JSON record"
            else:
                return DeviceModel(joblib.load(io.BytesIO(data)))
        except FileNotFoundError:
            why = "is missing"
        except Exception as error:  # a damaged pickle can raise anything
            why = f"cannot be loaded ({type(error).__name__})"
    warn_once(ProfileRefitWarning, str(model_path), f"autoexperts: {model_path} {why}; refitting it from {json_path}")
    return None


def find_device_profile(
    device_name: str, dtype: str, compile_mode: str, folders, stale_policy: str = "use"
) -> DeviceProfile | None:
    """The first readable device model for `device_name`, `dtype` and `compile_mode` in `folders`, if any.

    A stale one (measured with other software or, on CPU, other allocator settings: `freshness.stale_reasons`) is
    used with a `StaleProfileWarning`, or skipped with one when `stale_policy` is `"fallback"`, as profiles are.
    """
    for folder in folders:
        json_path = profile_path(Path(folder), device_name, device_model_stem(dtype, compile_mode)).with_suffix(".json")
        if not json_path.is_file():
            continue
        try:
            profile = load_device_profile(json_path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            warn_once(ProfileSkippedWarning, str(json_path), f"autoexperts: skipping device model {json_path}: {error}")
            continue
        if profile.device_name != device_name:
            continue
        stale = profile.stale_reasons()
        if stale:
            command = device_model_command(profile.device_type, dtype, compile_mode)
            skipping = stale_policy == "fallback"
            warn_once(
                StaleProfileWarning,
                str(json_path),
                f"autoexperts: device model {json_path} is stale: measured with {', '.join(stale)}; "
                + ("skipping it" if skipping else "using it anyway")
                + f". Recalibrate with: {command}",
            )
            if skipping:
                continue
        return profile
    return None
