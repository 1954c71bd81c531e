"""Turns `--model` into a Transformers config: a built-in preset, a local folder or config.json, or a Hub id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ..errors import UsageError
from ..presets import DEFAULT_PRESET, PRESETS


@dataclass
class ModelSource:
    """A resolved `--model`: its config and where it came from (`"preset"`, `"local"` or `"hub"`)."""

    config: PretrainedConfig
    kind: str
    name: str
    hub_id: str | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "hub_id": self.hub_id, "model_type": self.config.model_type}


def _config_from_json_file(path: Path) -> PretrainedConfig:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from error
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise UsageError(f"{path} is not a Transformers config.json (it has no 'model_type')")
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path}: {error}") from error


def resolve_model(model: str | None) -> ModelSource:
    """Resolves `model`: a preset name or the Hub id of a preset's model (case-insensitive), a folder with
    config.json, a config.json, or another Hub id (read from the local cache first).

    Raises:
        `UsageError`: with a one-line reason when `model` is none of these or cannot be read.
    """
    name = model or DEFAULT_PRESET
    # A preset's own name, or the Hub id of the public model it copies (same config.json, no network needed).
    preset_name = next(
        (key for key, p in PRESETS.items() if name.lower() in (key, (p.get("hub_id") or "").lower())), None
    )
    if preset_name is not None:
        preset = PRESETS[preset_name]
        config = AutoConfig.for_model(preset["model_type"], **preset["config"])
        return ModelSource(config, "preset", preset_name, preset.get("hub_id"))

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json")
        return ModelSource(_config_from_json_file(path / "config.json"), "local", str(path.resolve()))
    if path.is_file():
        return ModelSource(_config_from_json_file(path), "local", str(path.resolve()))

    known = ", ".join(sorted(PRESETS))
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.endswith(".json"):
        raise UsageError(f"unknown model {name!r}: not a preset ({known}), a folder or a config.json")
    try:
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True)  # the cache first: no network wait
        except OSError:
            config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise UsageError(
            f"cannot get the config of {name!r} from the Hugging Face Hub (offline and not cached, or no such model): "
            f"{reason}. Presets: {known}"
        ) from error
    return ModelSource(config, "hub", name, name)
