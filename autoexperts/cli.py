"""The `autoexperts` command: `calibrate` a model's experts layer (or the whole device) here, `show` the profiles'
decision tables, `bench` auto against every fixed backend, list the built-in `presets`, and `serve` models with
Transformers' server, auto by default."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from . import settings
from .choices import BENCH_PARTS, CALIBRATION_MODES, DEFAULT_BENCH_PARTS, EP_IMPLEMENTATIONS, NONE
from .errors import BackendFailedWarning, CalibrationInterrupted, ProfileWarning, UsageError

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """Reports bad arguments on one line (exit status 2) instead of usage plus message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _list_items(text: str) -> list[str]:
    """The items of a comma-separated list; an empty item (`1,,2`, `1,2,`) or a repeated one is an error, so a typo
    cannot silently shrink a calibration."""
    items = [part.strip() for part in text.split(",")]
    if "" in items:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give a comma-separated list without blanks")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{text!r} repeats {', '.join(repeated)}")
    return items


def _token_list(text: str) -> list[int]:
    items = _list_items(text)
    try:
        tokens = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(tokens) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be positive integers")
    if len(set(tokens)) < len(tokens):  # the same count written twice, e.g. 4 and 04
        raise argparse.ArgumentTypeError(f"{text!r} repeats a token count")
    return tokens


def _choice_list(choices: tuple[str, ...], noun: str):
    """A comma-list type whose items must be among `choices` (`noun` names one in the error)."""

    def parse(text: str) -> list[str]:
        names = _list_items(text)
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {noun} {', '.join(map(repr, unknown))}: use {', '.join(choices)}"
            )
        return names

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _token_range(text: str) -> tuple[int, int]:
    """`MIN-MAX` (inclusive, positive, MIN <= MAX), or one count `N` for `N-N`."""
    low, _, high = text.partition("-")
    try:
        low, high = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range MIN-MAX of token counts, e.g. 16-1024") from None
    if low < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be positive integers")
    if low > high:
        raise argparse.ArgumentTypeError(f"{text!r}: MIN is above MAX")
    return low, high


def _budget_setting(text: str) -> tuple[str, float]:
    try:
        return settings.parse_memory_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _routing(text: str):
    from .calibration.routing import Routing  # no torch: argument errors stay quick

    try:
        return Routing.parse(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_ROUTING_HELP = (
    "the experts each token is routed to: uniform, zipf:S (expert of popularity rank r weighs r^-S) or a routing file "
    "from autoexperts.record_routing (default: uniform)"
)
_PIN_ALLOCATOR_HELP = (
    "on CPU: fix glibc's mmap and trim thresholds in this process first, as autoexperts.pin_cpu_allocator() does in "
    "yours: the crossovers measured then hold in a process that calls it (the profile records the settings)"
)


_VERBOSE_HELP = "log progress details (INFO) and decisions"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoexperts", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    # `-v` is also accepted after the command; SUPPRESS keeps a command's parser from resetting one given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    calibrate = commands.add_parser(
        "calibrate", parents=[verbose], help="measure every backend on this device and save a profile"
    )
    calibrate.add_argument("--model", help="a preset name, a folder or config.json, or a Hub id (default: small-moe)")
    calibrate.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    calibrate.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    calibrate.add_argument(
        "--tokens", type=_token_list, help="comma-separated token counts (default: 1,2,3,4,6,...,4096)"
    )
    calibrate.add_argument(
        "--backends", type=_list_items, help="comma-separated backends (default: eager,batched_mm,grouped_mm)"
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
        default=NONE,
        help="measure the backends under torch.compile in this mode (dynamic shapes, fullgraph); default: none",
    )
    calibrate.add_argument(
        "--device-model",
        action="store_true",
        help="calibrate this device for every expert shape: sweep the design shapes and fit a device model",
    )
    calibrate.add_argument(
        "--full-grid",
        action="store_true",
        help="measure every default token count even when a device model could pick the counts around its crossovers",
    )
    calibrate.add_argument(
        "--tp-size", type=_positive_int, default=1, help="tensor-parallel ranks, as in DistributedConfig (default: 1)"
    )
    calibrate.add_argument(
        "--ep-size",
        type=_positive_int,
        default=1,
        help="expert-parallel ranks, as in DistributedConfig: calibrate the layer one rank runs (default: 1)",
    )
    calibrate.add_argument(
        "--ep-implementation",
        choices=EP_IMPLEMENTATIONS,
        default="auto",
        help="how tokens reach a rank's experts, as in DistributedConfig (default: auto, Transformers' inference "
        "choice: all_reduce when --ep-size equals --tp-size, else all_to_all)",
    )
    calibrate.add_argument("--routing", type=_routing, help=_ROUTING_HELP)
    calibrate.add_argument("--pin-allocator", action="store_true", help=_PIN_ALLOCATOR_HELP)
    calibrate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    calibrate.add_argument(
        "--resume",
        action="store_true",
        help="keep the points an interrupted calibration of the same layer measured (its checkpoint) and go on",
    )

    show = commands.add_parser("show", parents=[verbose], help="print a profile's decision table")
    show.add_argument("profile", nargs="?", help="a profile .json (default: every profile auto would read)")
    show.add_argument(
        "--budget", type=_budget_setting, help=f"memory budget to apply (default: ${settings.MEMORY_BUDGET_ENV} or 0.8)"
    )

    commands.add_parser("presets", parents=[verbose], help="list the built-in presets")
    _add_bench_parser(commands, verbose)
    _add_serve_parser(commands, verbose)
    return parser


_SERVE_DESCRIPTION = (
    'Runs Transformers\' server (transformers serve) in this process, with experts_implementation="auto" as the '
    "default of every model it loads (a model loaded with an explicit experts implementation keeps it). Every "
    "argument other than the options below goes to transformers serve unchanged: the model, --port, "
    "--continuous-batching, ... (transformers serve --help lists them). Needs Transformers' serving extras: "
    "pip install 'autoexperts[serve]'."
)


def _add_serve_parser(commands, verbose: argparse.ArgumentParser) -> None:
    # allow_abbrev=False: an option of transformers serve must never be taken for an abbreviation of ours.
    serve = commands.add_parser(
        "serve",
        parents=[verbose],
        allow_abbrev=False,
        usage="autoexperts serve [-h] [-v] [--tune-on FILE] [--tune-seconds-per-point S] [TRANSFORMERS_SERVE_ARGS ...]",
        help="run transformers serve with auto as every model's experts implementation",
        description=_SERVE_DESCRIPTION,
    )
    serve.add_argument(
        "--tune-on",
        metavar="FILE",
        help='a warm-up file (JSON Lines: a prompt string, or {"messages": [...]} or {"prompt": ...}, with an '
        'optional "max_tokens", a line): each model the server loads runs it inside autoexperts.tune before its '
        "first request, and auto decides from the profiles measured",
    )
    serve.add_argument(
        "--tune-seconds-per-point",
        type=_positive_float,
        metavar="S",
        help="--tune-on's timing budget per token count (default: 0.6, as calibrate)",
    )


def _add_bench_parser(commands, verbose: argparse.ArgumentParser) -> None:
    bench = commands.add_parser(
        "bench",
        parents=[verbose],
        help="calibrate, then time auto against every fixed backend and write JSON, Markdown and a plot",
    )
    bench.add_argument("--model", help="a preset name, a folder or config.json, or a Hub id (default: small-moe)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    bench.add_argument("--compile", default=NONE, choices=CALIBRATION_MODES, help="torch.compile mode (default: none)")
    bench.add_argument("--out", default="autoexperts-bench", help="results folder (default: ./autoexperts-bench)")
    bench.add_argument(
        "--profile-dir", help="use the profiles in this folder instead of calibrating (then calibration is not timed)"
    )
    bench.add_argument("--tokens", type=_token_list, help="layer sweep token counts (default: held out from the grid)")
    bench.add_argument(
        "--parts",
        type=_choice_list(BENCH_PARTS, "benchmark part"),
        default=list(DEFAULT_BENCH_PARTS),
        help=f"comma-separated parts of {','.join(BENCH_PARTS)} (default: {','.join(DEFAULT_BENCH_PARTS)}; serve is "
        "continuous batching on a request trace, with auto tuned in place)",
    )
    bench.add_argument("--layers", type=_positive_int, default=2, help="decoder layers of the benchmark model")
    bench.add_argument("--long-prefill", type=_positive_int, default=2048, help="tokens of the long prefill point")
    bench.add_argument("--batch-size", type=_positive_int, default=1, help="generate(): sequences per batch")
    bench.add_argument("--prompt-length", type=_positive_int, default=128, help="generate(): prompt tokens")
    bench.add_argument("--new-tokens", type=_positive_int, default=32, help="generate(): new tokens per call")
    bench.add_argument(
        "--rounds", type=_positive_int, default=3, help="generate() and serve: timed rounds per contender"
    )
    bench.add_argument(
        "--forward-rounds",
        type=_positive_int,
        help="model forward: the fewest interleaved rounds per point (default: 20)",
    )
    bench.add_argument("--requests", type=_positive_int, default=64, help="serve: requests in the trace")
    bench.add_argument(
        "--serve-prompt-lengths",
        type=_token_range,
        default=(16, 1024),
        metavar="MIN-MAX",
        help="serve: prompt lengths, drawn log-uniform (default: 16-1024)",
    )
    bench.add_argument(
        "--serve-new-tokens",
        type=_token_range,
        default=(16, 128),
        metavar="MIN-MAX",
        help="serve: new tokens per request, drawn uniform (default: 16-128)",
    )
    bench.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        help="serve: the most tokens one continuous-batching step takes (default: Transformers' own)",
    )
    bench.add_argument("--seconds-per-point", type=_positive_float, default=1.0, help="timing budget per point")
    bench.add_argument(
        "--calibration-seconds-per-point",
        type=_positive_float,
        default=0.6,
        help="timing budget per token count of calibrate and of serve's tune in place",
    )
    bench.add_argument("--routing", type=_routing, help=_ROUTING_HELP + "; calibrated and measured with it")
    bench.add_argument(
        "--compare-profile-dir",
        help="also read the layer sweep's picks off the same timings for the profile of this folder (default, with a "
        "--routing other than uniform: the uniform calibration's folder <out>/<device>/profiles, when it has one)",
    )
    bench.add_argument("--pin-allocator", action="store_true", help=_PIN_ALLOCATOR_HELP)
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _budget(setting: tuple[str, float] | None, device_type: str) -> tuple[float, str]:
    """The budget `auto` would apply in a process like this one, in bytes, and how it was set."""
    import torch

    from .dispatch import memory_budget_bytes

    try:
        setting = setting or settings.memory_budget_setting(strict=True)
    except ValueError as error:
        raise UsageError(str(error)) from error
    device = torch.device("cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu")
    kind, value = setting
    label = "fixed" if kind == "bytes" else f"{value:g} of the free memory of this machine's {device.type}"
    return memory_budget_bytes(device, setting), label


def _check_environment_budget() -> None:
    try:
        settings.memory_budget_setting(strict=True)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _calibrate(args: argparse.Namespace) -> int:
    from .calibration.run import calibrate, resolve_device
    from .report import describe_profile, describe_replacement
    from .store import check_writable, default_write_dir

    device = resolve_device(args.device)
    out = Path(args.out).expanduser() if args.out else default_write_dir()
    check_writable(out)
    if args.device_model:
        return _calibrate_device_model(args, device, out)
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
        resume=args.resume,
        compile_mode=args.compile_mode,
        full_grid=args.full_grid,
        tp_size=args.tp_size,
        ep_size=args.ep_size,
        ep_implementation=args.ep_implementation,
        routing=args.routing,
    )
    budget, label = _budget(None, profile.device_type)
    print(describe_profile(profile, budget, label))
    if profile.measured_elsewhere:
        print(f"\nmeasured meanwhile by another process (another rank of this launch); profile at {profile.json_path}")
        return 0
    _allocator_note(profile.spec.device_type)
    print(f"\ncalibrated in {profile.metadata['sweep']['wall_seconds']:.1f} s; profile written to {profile.json_path}")
    replacement = describe_replacement(profile)
    if replacement is not None:
        print(replacement)
    return 0


def _allocator_note(device_type: str) -> None:
    """On CPU under glibc's default thresholds, says once that the crossovers just measured depend on the process's
    history, and how to pin them (README: the CPU's allocator)."""
    from .allocator import allocator_settings, regime, uses_glibc_malloc

    if device_type == "cpu" and uses_glibc_malloc() and regime(allocator_settings()) == "glibc's defaults":
        print(
            "note: measured under glibc's default allocator thresholds, with which large CPU calls cost more or less "
            "by what the process ran before; for crossovers that hold, calibrate with --pin-allocator and call "
            "autoexperts.pin_cpu_allocator() in the process that runs the model"
        )


def _calibrate_device_model(args: argparse.Namespace, device, out: Path) -> int:
    from .calibration.device_run import calibrate_device_model
    from .report import describe_device_profile

    given = [
        f"--{name.replace('_', '-')}"
        for name in ("model", "tokens", "backends", "top_k", "full_grid", "routing")
        if getattr(args, name)
    ] + [f"--{name.replace('_', '-')}" for name in ("tp_size", "ep_size") if getattr(args, name) != 1]
    if given:
        raise UsageError(f"--device-model sweeps its own design shapes and token counts: drop {', '.join(given)}")
    profile = calibrate_device_model(
        device=str(device),
        dtype=args.dtype,
        compile_mode=args.compile_mode,
        out=out,
        progress=not args.no_progress,
        resume=args.resume,
    )
    budget, label = _budget(None, profile.device_type)
    print(describe_device_profile(profile, budget, label))
    seconds = profile.metadata["sweep"]["wall_seconds"]
    _allocator_note(profile.device_type)
    print(f"\ncalibrated in {seconds:.1f} s; device model written to {profile.json_path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    """Prints one profile or device model, or, without an argument, every one `auto` would read: this machine's
    devices first, then the others, grouped by device. A memory budget applies only to this machine's devices."""
    from .device import local_device_names
    from .store import ProfileError, device_model_files, profile_files, search_dirs

    local = local_device_names()
    if args.profile:
        path = Path(args.profile).expanduser()
        if not path.is_file():
            raise UsageError(f"no profile at {path}")
        try:
            shown = _load_shown(path)
        except (OSError, ValueError) as error:
            raise UsageError(str(error) if isinstance(error, ProfileError) else f"{path}: {error}") from error
        print(_describe_shown(shown, args.budget, local))
        return 0
    folders = search_dirs()
    paths = [*device_model_files(folders), *profile_files(folders)]
    loaded = []
    for path in paths:
        try:
            loaded.append(_load_shown(path))
        except (OSError, ValueError) as error:
            logger.warning("skipping %s: %s", path, error.reason if isinstance(error, ProfileError) else error)
    if not loaded:  # none found, or only unusable files (each named above)
        usable = "usable " if paths else ""
        print(f"no {usable}profiles in {', '.join(str(d) for d in folders)}; run: autoexperts calibrate")
        return 0
    devices = [*local, *sorted({item.device_name for item in loaded} - set(local))]
    blocks = []
    for device in devices:
        items = [item for item in loaded if item.device_name == device]
        if items:
            where = f"this machine's {local[device]}" if device in local else "another machine (no memory budget)"
            blocks += [f"== {device}: {where}", *(_describe_shown(item, args.budget, local) for item in items)]
    print("\n\n".join(blocks))
    return 0


def _load_shown(path: Path):
    """The device model or profile at `path`."""
    from .device_profile import load_device_profile
    from .profile import load_profile
    from .store import is_device_model_file

    return load_device_profile(path) if is_device_model_file(path) else load_profile(path)


def _describe_shown(item, budget_setting: tuple[str, float] | None, local: dict[str, str]) -> str:
    """`item`'s description, under this machine's memory budget where it is one of this machine's devices."""
    from .device_profile import DeviceProfile
    from .report import describe_device_profile, describe_profile

    budget, label = (None, None)
    if item.device_name in local:
        budget, label = _budget(budget_setting, item.device_type)
    describe = describe_device_profile if isinstance(item, DeviceProfile) else describe_profile
    return describe(item, budget, label)


def _bench(args: argparse.Namespace) -> int:
    from .bench.run import BenchOptions, run_benchmark
    from .store import check_writable

    out = Path(args.out).expanduser()
    check_writable(out)
    options = BenchOptions(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        compile_mode=args.compile,
        out=out,
        profile_dir=Path(args.profile_dir).expanduser() if args.profile_dir else None,
        sweep_tokens=args.tokens,
        parts=tuple(args.parts),
        layers=args.layers,
        long_prefill=args.long_prefill,
        batch=args.batch_size,
        prompt_length=args.prompt_length,
        new_tokens=args.new_tokens,
        generate_rounds=args.rounds,
        **({"forward_rounds": args.forward_rounds} if args.forward_rounds else {}),
        requests=args.requests,
        serve_prompt_lengths=args.serve_prompt_lengths,
        serve_new_tokens=args.serve_new_tokens,
        max_batch_tokens=args.max_batch_tokens,
        seconds_per_point=args.seconds_per_point,
        calibration_seconds_per_point=args.calibration_seconds_per_point,
        progress=not args.no_progress,
        pin_allocator=args.pin_allocator,
        routing=args.routing,
        compare_profile_dir=Path(args.compare_profile_dir).expanduser() if args.compare_profile_dir else None,
    )
    results = run_benchmark(options)
    for figure in results["headline"]:
        value = "-" if figure["value"] is None else f"{figure['value']:.3f}"
        print(f"{figure['name']}: {value}" + (f" ({figure['note']})" if figure["note"] else ""))
    for kind, path in results["files"].items():
        print(f"{kind:<9}{path}")
    return 0


def _serve(args: argparse.Namespace, transformers_args: list[str]) -> int:
    """Checks our options and the warm-up file (no torch yet), then runs transformers serve with the rest."""
    from .serving.command import check_extras, run
    from .serving.warmup import read_warm_up

    if args.tune_seconds_per_point is not None and args.tune_on is None:
        raise UsageError("--tune-seconds-per-point applies to --tune-on: give a warm-up file")
    _check_environment_budget()  # before serving: every layer would otherwise warn and use the default
    warm_up = None
    if args.tune_on is not None:
        try:
            warm_up = read_warm_up(args.tune_on, args.tune_seconds_per_point)
        except UsageError as error:
            raise UsageError(f"--tune-on {error}") from None
    check_extras()
    tuned = "" if warm_up is None else f", each tuned on {warm_up.source} ({len(warm_up.requests)} requests) first"
    print(
        f"autoexperts serve: models load with experts_implementation='auto' unless they name one{tuned}",
        file=sys.stderr,
    )
    return run(transformers_args, warm_up)


def _presets() -> int:
    from .presets import DEFAULT_PRESET, PRESETS

    for name, preset in PRESETS.items():
        note = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:<20}{preset['model_type']:<14}{preset.get('hub_id') or 'built-in small shape'}{note}")
    return 0


def _one_line_warnings(default_show):
    """A `warnings.showwarning` that prints autoexperts' own warnings as their one-line message (they name the file
    and the reason) and leaves the others to `default_show`."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (ProfileWarning, BackendFailedWarning)):
            print(str(message), file=sys.stderr if file is None else file)
        else:
            default_show(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the caller's warning display on return
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)  # `serve` passes the arguments it does not know on
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.verbose:
        logging.getLogger("autoexperts").setLevel(logging.DEBUG)
    elif args.command != "serve":  # keep errors to our one line: third-party retries and notices only with -v
        from transformers.utils import logging as transformers_logging  # after parsing: --help needs none of it

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        transformers_logging.set_verbosity_error()
    try:
        if args.command in ("calibrate", "bench"):
            _check_environment_budget()  # before measuring: calibrate prints its table under this budget at the end
            if args.pin_allocator:
                _pin_allocator()
        if args.command == "serve":
            return _serve(args, rest)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "show":
            return _show(args)
        if args.command == "bench":
            return _bench(args)
        return _presets()
    except UsageError as error:
        _print_error(f"error: {error}")
        return 2
    except CalibrationInterrupted as interrupt:
        if interrupt.checkpoint is None:
            _print_error("interrupted before the first point was measured; nothing was written")
        else:
            _print_error(
                f"interrupted; the {interrupt.points} points measured so far are kept in "
                f"{interrupt.checkpoint}: run the same command with --resume to go on"
            )
        return 130
    except KeyboardInterrupt:
        _print_error("interrupted; nothing partial was written")
        return 130


def _pin_allocator() -> None:
    from . import allocator

    if not allocator.uses_glibc_malloc():  # said here, in one line, rather than by pin_cpu_allocator's warning too
        raise UsageError(
            "--pin-allocator: this process's malloc is not glibc's (another C library, or an allocator in "
            "LD_PRELOAD): drop the option"
        )
    if not allocator.pin_cpu_allocator():
        raise UsageError("--pin-allocator: glibc refused the thresholds; drop the option")


def _print_error(message: str) -> None:
    """Prints `autoexperts: <message>` on stderr on a line of its own: an interrupted sweep leaves its progress bar
    on the current line, and `tqdm.write` clears it first."""
    from tqdm import tqdm

    tqdm.write(f"autoexperts: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
