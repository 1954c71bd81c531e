"""The `autoexperts` command: `calibrate` a model's experts layer on this device, `show` a profile's decisions."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from transformers.utils import logging as transformers_logging

from . import settings
from .compile_mode import CALIBRATION_MODES
from .errors import UsageError

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """Reports bad arguments on one line (exit status 2) instead of usage plus message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _token_list(text: str) -> list[int]:
    try:
        tokens = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not tokens or min(tokens) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be positive integers")
    return tokens


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one backend")
    return names


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _budget_setting(text: str) -> tuple[str, float]:
    try:
        return settings.parse_memory_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoexperts", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO) and decisions")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    calibrate = commands.add_parser("calibrate", help="measure every backend on this device and save a profile")
    calibrate.add_argument("--model", help="a preset name, a folder or config.json, or a Hub id (default: small-moe)")
    calibrate.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    calibrate.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    calibrate.add_argument(
        "--tokens", type=_token_list, help="comma-separated token counts (default: 1,2,3,4,6,...,4096)"
    )
    calibrate.add_argument(
        "--backends", type=_name_list, help="comma-separated backends (default: eager,batched_mm,grouped_mm)"
    )
    calibrate.add_argument("--top-k", type=int, help="experts per token, when the config does not say")
    calibrate.add_argument(
        "--out", help=f"profile folder (default: ${settings.PROFILE_DIR_ENV} or ~/.cache/autoexperts/profiles)"
    )
    calibrate.add_argument(
        "--seconds-per-point", type=_positive_float, default=0.6, help="timing budget per token count"
    )
    calibrate.add_argument(
        "--compile",
        dest="compile_mode",
        choices=CALIBRATION_MODES,
        default="none",
        help="measure the backends under torch.compile in this mode (dynamic shapes, fullgraph); default: none",
    )
    calibrate.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    show = commands.add_parser("show", help="print a profile's decision table")
    show.add_argument("profile", nargs="?", help="a profile .json (default: every profile auto would read)")
    show.add_argument(
        "--budget", type=_budget_setting, help=f"memory budget to apply (default: ${settings.MEMORY_BUDGET_ENV} or 0.8)"
    )

    commands.add_parser("presets", help="list the built-in presets")
    return parser


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".autoexperts-write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"cannot write profiles to {folder}: {error.strerror or error}") from error


def _budget(setting: tuple[str, float] | None, device_type: str) -> tuple[float, str]:
    """The budget `auto` would apply in a process like this one, in bytes, and how it was set."""
    import torch

    from .dispatch import memory_budget_bytes

    try:
        setting = setting or settings.memory_budget_setting()
    except ValueError as error:
        raise UsageError(str(error)) from error
    device = torch.device("cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu")
    kind, value = setting
    label = "fixed" if kind == "bytes" else f"{value:g} of the free memory of this machine's {device.type}"
    return memory_budget_bytes(device, setting), label


def _calibrate(args: argparse.Namespace) -> int:
    from .calibration.run import calibrate, resolve_device
    from .profile import default_write_dir
    from .report import describe_profile

    device = resolve_device(args.device)
    out = Path(args.out).expanduser() if args.out else default_write_dir()
    _check_writable(out)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be a positive integer")
    profile = calibrate(
        model=args.model,
        device=str(device),
        dtype=args.dtype,
        tokens=args.tokens,
        backends=args.backends,
        out=out,
        top_k=args.top_k,
        progress=not args.no_progress,
        seconds_per_point=args.seconds_per_point,
        compile_mode=args.compile_mode,
    )
    budget, label = _budget(None, profile.spec.device_type)
    print(describe_profile(profile, budget, label))
    print(f"\ncalibrated in {profile.metadata['sweep']['wall_seconds']:.1f} s; profile written to {profile.json_path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .profile import load_profile, profile_files, search_dirs
    from .report import describe_profile

    if args.profile:
        path = Path(args.profile).expanduser()
        if not path.is_file():
            raise UsageError(f"no profile at {path}")
        paths = [path]
    else:
        paths = profile_files(search_dirs())
        if not paths:
            print(f"no profiles in {', '.join(str(d) for d in search_dirs())}; run: autoexperts calibrate")
            return 0
    for index, path in enumerate(paths):
        try:
            profile = load_profile(path)
        except ValueError as error:
            if args.profile:
                raise UsageError(str(error)) from error
            logger.warning("skipping %s", error)
            continue
        budget, label = _budget(args.budget, profile.spec.device_type)
        print(("\n" if index else "") + describe_profile(profile, budget, label))
    return 0


def _presets() -> int:
    from .presets import DEFAULT_PRESET, PRESETS

    for name, preset in PRESETS.items():
        note = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:<20}{preset['model_type']:<14}{preset.get('hub_id') or 'built-in small shape'}{note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.verbose:
        logging.getLogger("autoexperts").setLevel(logging.DEBUG)
    else:  # keep errors to our one line: third-party retries and notices only with -v
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        transformers_logging.set_verbosity_error()
    try:
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "show":
            return _show(args)
        return _presets()
    except UsageError as error:
        print(f"autoexperts: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoexperts: interrupted; nothing partial was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
