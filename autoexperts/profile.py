"""Profiles on disk: a readable `.json` record and a `.joblib` holding the fitted cost model.

Layout: `<profile dir>/<device slug>/<experts class>-e<E>-h<H>-i<I>-k<top_k>-<dtype>-<compile mode>.{json,joblib}`.
The JSON holds everything measured (so the cost model can always be refit from it) and the SHA-256 of the joblib
written with it; the joblib holds the fitted estimators.

Trust: joblib is pickle, and loading a pickle runs code. A `.joblib` is unpickled only when it lies (symbolic links
resolved) inside a trusted folder: the user's profile folder (`AUTOEXPERTS_PROFILE_DIR`, else the user cache) or the
folder the project ships. A profile anywhere else is refit from its JSON measurements, which is cheap and gives the
same cost model. A damaged, mismatched or foreign-version joblib is refit likewise, with one warning.

Writes are atomic (temporary file, then rename) and a file lock serialises the writers of one profile, so readers
see a whole old or a whole new profile, and of concurrent writers the last to take the lock wins. The lock's file
exists only while a writer holds it. A save that replaces a profile first copies it to `<stem>.previous.{json,joblib}`
(one generation), which no profile search reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Hashable, Iterable
from pathlib import Path

import numpy as np

from . import settings
from .cost_model import CostModel, Measurement
from .device import device_slug
from .errors import ProfileRefitWarning, ProfileSkippedWarning, StaleProfileWarning, user_stacklevel
from .freshness import stale_reasons
from .layer import LayerSpec
from .locking import file_lock

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PROFILE_KIND = "autoexperts-profile"
# The ending of the backup of a replaced profile's JSON (`<stem>.previous.json`, its joblib `<stem>.previous.joblib`).
BACKUP_SUFFIX = ".previous.json"
# Device models (`autoexperts.device_profile`) lie beside profiles under this name; profile searches pass them over.
DEVICE_MODEL_PREFIX = "device-model-"
# How long a writer waits for another process writing the same profile (a write takes milliseconds).
LOCK_TIMEOUT_S = 120

_warned_lock = threading.Lock()
_warned: set[tuple[str, Hashable]] = set()


@dataclasses.dataclass(frozen=True)
class Replaced:
    """The profile a save replaced, kept as `backup` (its `.json`, with its `.joblib` beside it).

    `points` is how many measurements it held and `tokens` its smallest and largest token count (`None` when its
    JSON could not be read).
    """

    backup: Path
    points: int | None
    tokens: tuple[int, int] | None


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


def is_trusted(path: Path) -> bool:
    """Whether `path` (symbolic links resolved) lies inside one of the trusted folders, `search_dirs()`."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(folder.resolve()) for folder in search_dirs())


def profile_path(folder: Path, device_name: str, stem: str) -> Path:
    """Where a profile is saved, without suffix: `folder/<device slug>/<stem>`."""
    return Path(folder) / device_slug(device_name) / stem


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to a temporary file in `path`'s folder, then renames it over `path` (no half-written file,
    even on Ctrl-C: the temporary file is removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            tmp_file.write(data)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_lock(target: Path) -> contextlib.AbstractContextManager[None]:
    """The inter-process lock that writers of the profile at `target` hold; its file `.<name>.lock` beside the
    profile exists only while it is held (see `locking`)."""
    return file_lock(target.parent / f".{target.name}.lock", LOCK_TIMEOUT_S)


def pickled_fits(fits: dict, model_path: Path, record: dict) -> tuple[bytes, dict]:
    """The joblib bytes of fitted estimators `fits`, and `record` with the `cost_model` entry naming that file, its
    format and its SHA-256 (what a load checks before unpickling)."""
    import joblib  # like scikit-learn, imported only where a cost model is saved or loaded

    buffer = io.BytesIO()
    joblib.dump(fits, buffer)
    model_bytes = buffer.getvalue()
    entry = {"file": model_path.name, "format": fits["format"], "sha256": hashlib.sha256(model_bytes).hexdigest()}
    return model_bytes, {**record, "cost_model": entry}


def save_profile(profile: Profile, folder: Path) -> Path:
    """Saves `profile` under `folder/<device slug>/` and returns the JSON path.

    Both files are written atomically while holding the profile's file lock; when several processes save the same
    profile at once, each write is whole and the last one to take the lock wins. A profile already at that place is
    first copied to its backup (`backup_path`), replacing an older backup; `profile.replaced` then describes it.
    """
    target = profile_path(folder, profile.device_name, profile.stem())
    json_path, model_path = target.with_suffix(".json"), target.with_suffix(".joblib")
    model_bytes, record = pickled_fits(profile.cost_model.fits, model_path, profile.to_json())
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    with write_lock(target):
        replaced = _back_up(json_path, model_path)
        atomic_write_bytes(model_path, model_bytes)
        atomic_write_bytes(json_path, text.encode("utf-8"))
    profile.json_path, profile.replaced = json_path, replaced
    if replaced is not None:
        logger.info(
            "%s replaces a profile of %s points (%d now); the replaced one is kept as %s",
            json_path,
            "?" if replaced.points is None else replaced.points,
            len(profile.measurements),
            replaced.backup,
        )
    return json_path


def backup_path(json_path: Path) -> Path:
    """Where the profile at `json_path` is kept once a new save replaces it: `<stem>.previous.json` (and
    `<stem>.previous.joblib`). Profile searches never read these."""
    return json_path.with_name(json_path.stem + BACKUP_SUFFIX)


def is_backup(path: Path) -> bool:
    return Path(path).name.endswith(BACKUP_SUFFIX)


def _back_up(json_path: Path, model_path: Path) -> Replaced | None:
    """Copies the profile at `json_path` (and its `.joblib`) to its backup, byte for byte, so that renaming the two
    back restores it; called under the write lock, before the new files replace it. A copy rather than a move: the
    old profile stays readable until the new one is in place."""
    try:
        old_record = json_path.read_bytes()
    except FileNotFoundError:
        return None
    backup = backup_path(json_path)
    backup_model = backup.with_suffix(".joblib")
    try:
        atomic_write_bytes(backup_model, model_path.read_bytes())
    except FileNotFoundError:  # a JSON without its joblib: no stale joblib beside its backup either
        backup_model.unlink(missing_ok=True)
    atomic_write_bytes(backup, old_record)
    try:
        measured = [int(m["num_tokens"]) for m in json.loads(old_record)["measurements"]]
    except (ValueError, KeyError, TypeError):  # not a profile we can read: kept all the same
        return Replaced(backup, None, None)
    return Replaced(backup, len(measured), (min(measured), max(measured)) if measured else None)


def spec_from_record(record: dict) -> LayerSpec:
    experts = record["experts"]
    fields = {f.name for f in dataclasses.fields(LayerSpec)} - {"dtype", "device_type"}
    defaults = {f.name: f.default for f in dataclasses.fields(LayerSpec) if f.default is not dataclasses.MISSING}
    return LayerSpec(
        **{name: experts.get(name, defaults.get(name)) if name in defaults else experts[name] for name in fields},
        dtype=record["dtype"],
        device_type=record["device"]["type"],
    )


class ProfileError(ValueError):
    """A profile file that cannot be used; `reason` says why without the path (`str()` has both)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_record(json_path: Path) -> dict:
    """Reads and checks a profile's JSON record.

    Raises:
        `ProfileError`: when the file is not a profile this version can read.
    """
    try:
        record = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ProfileError(json_path, f"cannot be read ({error})") from error
    except json.JSONDecodeError as error:
        raise ProfileError(json_path, f"invalid JSON ({error})") from error
    if not isinstance(record, dict) or record.get("kind") != PROFILE_KIND:
        raise ProfileError(json_path, "not an autoexperts profile")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise ProfileError(
            json_path,
            f"schema version {version!r} is {'newer than' if newer else 'not'} the version this autoexperts reads "
            f"({SCHEMA_VERSION}): {'update autoexperts or ' if newer else ''}recalibrate",
        )
    return record


def warn_once(category: type[Warning], key: Hashable, message: str) -> None:
    """Warns with `message` once per process for `(category, key)`, and logs it at INFO."""
    with _warned_lock:
        if (category.__name__, key) in _warned:
            return
        _warned.add((category.__name__, key))
    # A Python warning (shown by default, filterable) rather than a log record: the user can act on it.
    warnings.warn(message, category, stacklevel=user_stacklevel())
    logger.info("%s", message)


def forget_warnings() -> None:
    """Lets every profile warning be given again (`autoexperts.reset()` calls it)."""
    with _warned_lock:
        _warned.clear()


def _unpickled_cost_model(model_path: Path, record: dict, measurements: list[Measurement]) -> CostModel:
    """The cost model in `model_path`, checked against the JSON record.

    Raises:
        `ValueError`: saying why the file cannot be used (its cost model is then refit).
    """
    import joblib
    import sklearn

    try:  # scikit-learn >= 1.3
        from sklearn.exceptions import InconsistentVersionWarning
    except ImportError:  # pragma: no cover - older scikit-learn warns with a plain UserWarning
        InconsistentVersionWarning = UserWarning

    recorded = record.get("versions", {}).get("scikit-learn")
    if recorded and recorded != sklearn.__version__:
        # Estimators pickled by another scikit-learn may load wrongly: refit without unpickling at all.
        raise ValueError(f"was written by scikit-learn {recorded} (running {sklearn.__version__})")
    try:
        data = model_path.read_bytes()
    except FileNotFoundError:
        raise ValueError("is missing") from None
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror or error})") from error
    expected = record.get("cost_model", {}).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError("does not match its JSON record (truncated, damaged or from another write)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", InconsistentVersionWarning)
            cost_model = CostModel(joblib.load(io.BytesIO(data)))
        measured = {m.backend for m in measurements if m.status == "ok"}
        if set(cost_model.backends) != measured:
            raise ValueError(f"holds backends {sorted(cost_model.backends)}, measured {sorted(measured)}")
        for backend in cost_model.backends:  # every estimator must predict
            latency = cost_model.latency_ms(backend, np.array([1, cost_model.max_tokens(backend)]))
            if not np.all(np.isfinite(latency)) or not np.all(np.isfinite(cost_model.peak_bytes(backend, [1]))):
                raise ValueError(f"predicts non-finite costs for {backend}")
            cost_model.memory_line(backend)
            cost_model.infeasible_from(backend)
    except Exception as error:  # anything an arbitrary or damaged pickle throws
        raise ValueError(f"cannot be loaded ({type(error).__name__}: {error})") from error
    return cost_model


def _load_cost_model(json_path: Path, record: dict, measurements: list[Measurement], trusted: bool | None):
    """`(cost model, where it came from)`: unpickled when trusted and sound, else refit from the measurements."""
    name = str(record.get("cost_model", {}).get("file") or json_path.stem + ".joblib")
    if is_backup(json_path):  # a backup's JSON, copied unchanged, still names the joblib it was written with
        name = json_path.with_suffix(".joblib").name
    model_path = json_path.with_name(Path(name).name)
    if Path(name).name != name or not name.endswith(".joblib"):
        reason = f"its JSON names an invalid model file {name!r}"
        warn_once(ProfileRefitWarning, f"{json_path}:name", f"autoexperts: refitting profile {json_path}: {reason}")
        return CostModel.fit(measurements), f"refit: {reason}"
    if not (is_trusted(model_path) if trusted is None else trusted):
        logger.info(
            "%s is outside the trusted folders: its cost model is refit from the JSON, not unpickled", json_path
        )
        return CostModel.fit(measurements), "refit: outside the trusted folders, not unpickled"
    try:
        return _unpickled_cost_model(model_path, record, measurements), "joblib"
    except ValueError as error:
        reason = f"{model_path.name} {error}"
        warn_once(
            ProfileRefitWarning,
            str(json_path),
            f"autoexperts: refitting the cost model of profile {json_path} from its measurements: {reason}",
        )
        return CostModel.fit(measurements), f"refit: {reason}"


def load_profile(json_path: Path, trusted: bool | None = None) -> Profile:
    """Loads a profile: its JSON record and its cost model.

    Args:
        json_path (`Path`): the profile's `.json`.
        trusted (`bool`, *optional*): whether its `.joblib` may be unpickled. Default: only when it lies in a
            trusted folder (see the module docstring); otherwise the cost model is refit from the measurements.

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
    if not any(m.status == "ok" for m in measurements):
        raise ProfileError(json_path, "no successful measurement to fit a cost model on")
    cost_model, source = _load_cost_model(json_path, record, measurements, trusted)
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


def profile_files(folders: Iterable[Path]) -> list[Path]:
    """Every profile JSON under `folders` (one level of device folders, or flat), newest first per folder; the
    backups of replaced profiles (`*.previous.json`) and device models (`device-model-*.json`) are left out."""
    found = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        files = [
            p
            for p in (*folder.glob("*.json"), *folder.glob("*/*.json"))
            if not is_backup(p) and not p.name.startswith(DEVICE_MODEL_PREFIX)
        ]
        found.extend(sorted(files, key=_mtime, reverse=True))
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed or replaced since the listing
        return 0.0


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
    spec: LayerSpec, device_name: str, compile_mode: str, folders: Iterable[Path], stale_policy: str = "use"
) -> Profile | None:
    """The first usable profile in `folders` measured for `spec` on `device_name` in `compile_mode`, if any.

    Files that cannot be used are skipped with one `ProfileSkippedWarning` each, naming the file and the reason:
    unreadable files, and files at the place this profile would be saved (`<device slug>/<stem>.json`) whose
    record is for something else. Profiles of other layers and devices elsewhere are passed over silently.

    Args:
        stale_policy (`str`): `"use"` a stale profile (with a `StaleProfileWarning`) or skip it (`"fallback"`).
    """
    wanted = (device_slug(device_name), spec.file_stem(compile_mode))
    for json_path in profile_files(folders):
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
        stale = stale_reasons(record)
        if stale and stale_policy == "fallback":
            warn_once(
                StaleProfileWarning,
                str(json_path),
                f"autoexperts: skipping stale profile {json_path}: measured with {', '.join(stale)} "
                f"({settings.STALE_PROFILES_ENV}=fallback). Recalibrate with: {recalibrate_command(record)}",
            )
            continue
        try:
            profile = load_profile(json_path)
        except ProfileError as error:
            _skip(json_path, error.reason)
            continue
        if stale:
            warn_once(
                StaleProfileWarning,
                str(json_path),
                f"autoexperts: profile {json_path} is stale: measured with {', '.join(stale)}; using it anyway "
                f"({settings.STALE_PROFILES_ENV}=use; set it to fallback to skip stale profiles). "
                f"Recalibrate with: {recalibrate_command(record)}",
            )
        return profile
    return None


def recalibrate_command(record: dict) -> str:
    """The command that measures a profile like `record` again on this machine."""
    model = (record.get("model") or {}).get("name") or "<model id or config folder>"
    device = (record.get("device") or {}).get("type", "cpu")
    return f"autoexperts calibrate --model {model} --device {device} --dtype {record.get('dtype', 'float32')}"


def _skip(json_path: Path, reason: str) -> None:
    warn_once(ProfileSkippedWarning, f"{json_path}: {reason}", f"autoexperts: ignoring profile {json_path}: {reason}")
