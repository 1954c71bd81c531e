"""Profile files on disk, for shape profiles (`autoexperts.profile`) and device models (`autoexperts.device_profile`)
alike: where they lie, how they are written, and when their pickles may be loaded.

- **Layout**: `<profile dir>/<device slug>/<stem>.{json,joblib}`. The JSON is the readable record (its `kind` and
  `schema_version` say what it is, and it holds every measurement, so the model can always be refit from it); the
  joblib holds the fitted estimators, and the JSON records its SHA-256.
- **Writing**: both files are written atomically (a temporary file, then a rename) while holding the file's write
  lock (`locking.file_lock` on `.<stem>.lock`, a file that exists only while held), so readers see a whole old or a
  whole new pair, and of concurrent writers the last to take the lock wins. A save that replaces a pair first copies
  it to `<stem>.previous.{json,joblib}` (one generation), which no search reads.
- **Trust**: joblib is pickle, and loading a pickle runs code. A `.joblib` is unpickled only when it lies (symbolic
  links resolved) inside a trusted folder (the user's profile folder, `AUTOEXPERTS_PROFILE_DIR` or the user cache,
  and the folder the project ships), matches the checksum its JSON records, and was written by the running
  scikit-learn; anything else is refit from the JSON, with one `ProfileRefitWarning` when the file itself is at
  fault.
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
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from . import settings
from .device import device_slug
from .errors import ProfileRefitWarning, UsageError, warn_once
from .locking import file_lock

logger = logging.getLogger(__name__)

# The ending of the backup of a replaced file's JSON (`<stem>.previous.json`, its joblib `<stem>.previous.joblib`).
BACKUP_SUFFIX = ".previous.json"
# Device models lie beside shape profiles under this name; profile searches pass them over.
DEVICE_MODEL_PREFIX = "device-model-"
# How long a writer waits for another process writing the same file (a write takes milliseconds).
LOCK_TIMEOUT_S = 120
# Where a refit's `source` says the model came from.
FROM_JOBLIB = "joblib"
OUTSIDE_TRUST = "outside the trusted folders, not unpickled"

Model = TypeVar("Model")


@dataclasses.dataclass(frozen=True)
class Replaced:
    """The file a save replaced, kept as `backup` (its `.json`, with its `.joblib` beside it).

    `points` is how many measurements it held and `tokens` its smallest and largest token count (`None` when its
    JSON could not be read as a shape profile).
    """

    backup: Path
    points: int | None
    tokens: tuple[int, int] | None


class ProfileError(ValueError):
    """A profile file that cannot be used; `reason` says why without the path (`str()` has both)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def default_write_dir() -> Path:
    """Where `calibrate` writes when no `--out` is given (and where `auto` looks first)."""
    return settings.user_profile_dir()


def search_dirs() -> list[Path]:
    """The trusted folders `auto` reads from, in order: the user's, then the shipped one."""
    return [settings.user_profile_dir(), settings.shipped_profile_dir()]


def is_trusted(path: Path) -> bool:
    """Whether `path` (symbolic links resolved) lies inside one of the trusted folders, `search_dirs()`."""
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(folder.resolve()) for folder in search_dirs())


def check_writable(folder: Path) -> None:
    """Fails early when profiles cannot be written under `folder`, without creating anything there.

    Raises:
        `UsageError` (a `ValueError`): saying why.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    reason = None
    if not existing.is_dir():
        reason = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is not writable"
    elif existing == folder:
        try:  # access() can be wrong (read-only mounts for root, network file systems): try a file
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".autoexperts-write-test-"):
                pass
        except OSError as error:
            reason = error.strerror or str(error)
    if reason is not None:
        raise UsageError(f"cannot write profiles to {folder}: {reason}")


def file_target(folder: Path, device_name: str, stem: str) -> Path:
    """Where a file of `device_name` named `stem` is saved, without suffix: `folder/<device slug>/<stem>`."""
    return Path(folder) / device_slug(device_name) / stem


def backup_path(json_path: Path) -> Path:
    """Where the file at `json_path` is kept once a new save replaces it: `<stem>.previous.json` (and
    `<stem>.previous.joblib`). Searches never read these."""
    return json_path.with_name(json_path.stem + BACKUP_SUFFIX)


def is_backup(path: Path) -> bool:
    return Path(path).name.endswith(BACKUP_SUFFIX)


def is_device_model_file(path: Path) -> bool:
    return Path(path).name.startswith(DEVICE_MODEL_PREFIX)


def profile_files(folders: Iterable[Path]) -> list[Path]:
    """Every shape profile JSON under `folders` (one level of device folders, or flat), newest first per folder;
    backups and device models are left out."""
    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        files = [
            p
            for p in (*folder.glob("*.json"), *folder.glob("*/*.json"))
            if not is_backup(p) and not is_device_model_file(p)
        ]
        found.extend(sorted(files, key=_mtime, reverse=True))
    return found


def device_model_files(folders: Iterable[Path]) -> list[Path]:
    """Every device model JSON in `folders`' device subfolders (backups left out)."""
    found = []
    for folder in map(Path, folders):
        found += sorted(p for p in folder.glob(f"*/{DEVICE_MODEL_PREFIX}*.json") if not is_backup(p))
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed or replaced since the listing
        return 0.0


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
    """The inter-process lock that writers of the file at `target` (without suffix) hold; its file
    `.<name>.lock` beside it exists only while it is held (see `locking`)."""
    return file_lock(target.parent / f".{target.name}.lock", LOCK_TIMEOUT_S)


def save_files(target: Path, record: dict, fits: dict) -> tuple[Path, Replaced | None]:
    """Writes `record` as `<target>.json` and the fitted estimators `fits` as `<target>.joblib` (the record gains a
    `cost_model` entry naming that file, its format and its SHA-256), atomically and under the write lock, after
    copying a pair already there to its backup.

    Returns:
        `tuple[Path, Replaced | None]`: the JSON path, and the replaced pair (`None` when there was none).
    """
    import joblib  # like scikit-learn, imported only where a model is saved or loaded

    json_path, model_path = target.with_suffix(".json"), target.with_suffix(".joblib")
    buffer = io.BytesIO()
    joblib.dump(fits, buffer)
    model_bytes = buffer.getvalue()
    entry = {"file": model_path.name, "format": fits["format"], "sha256": hashlib.sha256(model_bytes).hexdigest()}
    text = json.dumps({**record, "cost_model": entry}, indent=2) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    with write_lock(target):
        replaced = _back_up(json_path, model_path)
        atomic_write_bytes(model_path, model_bytes)
        atomic_write_bytes(json_path, text.encode("utf-8"))
    if replaced is not None:
        logger.info("%s replaced; the replaced one is kept as %s", json_path, replaced.backup)
    return json_path, replaced


def _back_up(json_path: Path, model_path: Path) -> Replaced | None:
    """Copies the pair at `json_path` to its backup, byte for byte, so that renaming the two back restores it;
    called under the write lock, before the new files replace it. A copy rather than a move: the old pair stays
    readable until the new one is in place."""
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
    except (ValueError, KeyError, TypeError):  # a device model, or unreadable: kept all the same
        return Replaced(backup, None, None)
    return Replaced(backup, len(measured), (min(measured), max(measured)) if measured else None)


def read_record(json_path: Path, kind: str, schema_version: int) -> dict:
    """Reads a JSON record and checks that it is a `kind` file of `schema_version`.

    Raises:
        `ProfileError`: when the file cannot be read, or is not such a file this version can read.
    """
    try:
        record = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ProfileError(json_path, f"cannot be read ({error})") from error
    except json.JSONDecodeError as error:
        raise ProfileError(json_path, f"invalid JSON ({error})") from error
    if not isinstance(record, dict) or record.get("kind") != kind:
        raise ProfileError(json_path, f"not an {kind.replace('-', ' ')}")
    version = record.get("schema_version")
    if version != schema_version:
        newer = isinstance(version, int) and version > schema_version
        raise ProfileError(
            json_path,
            f"schema version {version!r} is {'newer than' if newer else 'not'} the version this autoexperts reads "
            f"({schema_version}): {'update autoexperts or ' if newer else ''}recalibrate",
        )
    return record


def load_model(
    json_path: Path,
    record: dict,
    build: Callable[[dict], Model],
    refit: Callable[[], Model],
    trusted: bool | None = None,
) -> tuple[Model, str]:
    """The model of the pair at `json_path`: `build(fits)` of its unpickled `.joblib` when that may and can be
    used, else `refit()` from the JSON's measurements.

    Args:
        record (`dict`): the JSON record (`read_record`), whose `cost_model` entry names the joblib and its SHA-256.
        build (`Callable[[dict], Model]`): the model of unpickled estimators; raises when they are unfit (a pickle
            of something else, another format, estimators that cannot predict).
        refit (`Callable[[], Model]`): the model fitted afresh from the record's measurements.
        trusted (`bool`, *optional*): whether the joblib may be unpickled (default: `is_trusted`).

    Returns:
        `tuple[Model, str]`: the model, and where it came from: `"joblib"` or `"refit: <why>"`. A refit because the
        file is at fault (missing, damaged, from another write or scikit-learn) gives one `ProfileRefitWarning`;
        one because it lies outside the trusted folders is only logged.
    """
    name = str(record.get("cost_model", {}).get("file") or json_path.stem + ".joblib")
    if is_backup(json_path):  # a backup's JSON, copied unchanged, still names the joblib it was written with
        name = json_path.with_suffix(".joblib").name
    model_path = json_path.with_name(Path(name).name)
    if Path(name).name != name or not name.endswith(".joblib"):
        return _refit(json_path, f"its JSON names an invalid model file {name!r}", refit)
    if not (is_trusted(model_path) if trusted is None else trusted):
        logger.info("%s is outside the trusted folders: its model is refit from the JSON, not unpickled", json_path)
        return refit(), f"refit: {OUTSIDE_TRUST}"
    try:
        return build(_unpickled_fits(model_path, record)), FROM_JOBLIB
    except Exception as error:  # anything an arbitrary or damaged pickle throws
        reason = str(error) if isinstance(error, _Unusable) else f"cannot be loaded ({type(error).__name__}: {error})"
        return _refit(json_path, f"{model_path.name} {reason}", refit)


class _Unusable(ValueError):
    """A joblib that is not unpickled at all (missing, from another write or scikit-learn)."""


def _refit(json_path: Path, reason: str, refit: Callable[[], Model]) -> tuple[Model, str]:
    warn_once(
        ProfileRefitWarning,
        f"{json_path}: {reason}",
        f"autoexperts: refitting the model of {json_path} from its measurements: {reason}",
    )
    return refit(), f"refit: {reason}"


def _unpickled_fits(model_path: Path, record: dict) -> dict:
    """The estimators pickled in `model_path`, once its checksum and scikit-learn version match `record`.

    Raises:
        `_Unusable`: saying why the file is not unpickled; anything unpickling raises.
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
        raise _Unusable(f"was written by scikit-learn {recorded} (running {sklearn.__version__})")
    try:
        data = model_path.read_bytes()
    except FileNotFoundError:
        raise _Unusable("is missing") from None
    except OSError as error:
        raise _Unusable(f"cannot be read ({error.strerror or error})") from error
    expected = record.get("cost_model", {}).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise _Unusable("does not match its JSON record (truncated, damaged or from another write)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InconsistentVersionWarning)
        fits = joblib.load(io.BytesIO(data))
    if not isinstance(fits, dict):
        raise _Unusable(f"holds a {type(fits).__name__}, not fitted estimators")
    return fits
