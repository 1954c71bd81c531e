"""glibc's allocator settings: what a calibration records, and `pin_cpu_allocator` (its CLI option: test_cli)."""

import json
import subprocess
import sys
import textwrap

import pytest

from autoexperts import allocator

GLIBC = allocator.uses_glibc_malloc()


@pytest.mark.parametrize(
    ("environ", "recorded"),
    [
        ({}, {}),  # glibc's defaults: nothing to record
        ({"MALLOC_MMAP_THRESHOLD_": "1073741824", "HOME": "/x"}, {"MALLOC_MMAP_THRESHOLD_": "1073741824"}),  # variable
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}),
        # jemalloc in glibc's place, with its own settings
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:-1"},
         {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:-1"}),
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4", "TCMALLOC_RELEASE_RATE": "0"},  # tcmalloc and its variables
         {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4", "TCMALLOC_RELEASE_RATE": "0"}),
        ({"LD_PRELOAD": "/usr/lib/libasan.so"}, {}),  # a preload that is no allocator: not recorded
    ],
)  # fmt: skip
def test_allocator_settings_record_the_environment(environ, recorded, monkeypatch):
    for name in [
        n
        for n in allocator.os.environ
        if n.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "TCMALLOC_", "MIMALLOC_"))
    ]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(allocator, "_pinned", {})
    assert allocator.allocator_settings() == recorded


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_pinning_stops_fresh_pages_for_a_block_allocated_again():
    # A 48 MiB block is above glibc's largest dynamic mmap threshold (32 MiB): by default it is mapped afresh, and its
    # pages faulted in, on every allocation; pinned, it comes from the heap and the second allocation faults nothing.
    # Run in a child process: pinning is for the rest of the process.
    script = textwrap.dedent(
        """
        import ctypes, json, resource
        import autoexperts
        from autoexperts.allocator import allocator_settings

        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]

        def pages_faulted(size=48 * 2**20, times=3):
            counts = []
            for _ in range(times):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                block = libc.malloc(size)
                ctypes.memset(block, 1, size)
                libc.free(block)
                counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            return counts

        default = pages_faulted()
        pinned = autoexperts.pin_cpu_allocator()
        print(json.dumps({"default": default, "pinned": pinned, "after": pages_faulted(),
                          "settings": allocator_settings()}))
        """
    )
    environ = {k: v for k, v in allocator.os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environ, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    pages = 48 * 2**20 // 4096
    assert all(count > pages // 2 for count in result["default"])  # mapped afresh each time
    assert result["pinned"] is True
    assert max(result["after"][1:]) < pages // 20  # reused: almost nothing faulted
    assert result["settings"] == {
        "mallopt_mmap_threshold": str(allocator.PINNED_MMAP_THRESHOLD),
        "mallopt_trim_threshold": str(allocator.PINNED_TRIM_THRESHOLD),
    }


def test_pinning_elsewhere_than_glibc_changes_nothing_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "uses_glibc_malloc", lambda: False)
    monkeypatch.setattr(allocator, "_pinned", {})
    assert allocator.pin_cpu_allocator() is False
    assert "not glibc's" in caplog.text and "mallopt_mmap_threshold" not in allocator.allocator_settings()


ENV_PINNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}  # the README's
MALLOPT_PINNED = {"mallopt_mmap_threshold": "1073741824", "mallopt_trim_threshold": "2147483647"}  # pin_cpu_allocator


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "glibc's defaults"),
        (ENV_PINNED, "pinned"),  # set before start-up
        (MALLOPT_PINNED, "pinned"),  # set at run time: the same regime, though spelled otherwise
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=0x40000000:glibc.malloc.trim_threshold=0x80000000"}, "pinned"),
        ({"MALLOC_TRIM_THRESHOLD_": "4294967296"}, "MALLOC_TRIM_THRESHOLD_=4294967296"),  # one of two: its own
        ({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "4294967296"},  # a low mmap threshold
         "MALLOC_MMAP_THRESHOLD_=131072, MALLOC_TRIM_THRESHOLD_=4294967296"),
        ({"MALLOC_ARENA_MAX": "2"}, "glibc's defaults"),  # neither threshold: the same crossovers
        ({"LD_PRELOAD": "/x/libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:-1"},  # jemalloc: its own settings
         "jemalloc (MALLOC_CONF=dirty_decay_ms:-1)"),
        ({"LD_PRELOAD": "/x/libjemalloc.so.2"}, "jemalloc"),  # jemalloc's defaults, unlike glibc's
    ],
)  # fmt: skip
def test_regime_tells_settings_that_move_crossovers_apart(settings, expected):
    assert allocator.regime(settings) == expected


def test_a_profile_measured_pinned_one_way_is_not_stale_pinned_the_other(monkeypatch):
    from autoexperts import freshness

    monkeypatch.setattr(freshness, "allocator_settings", lambda: MALLOPT_PINNED)
    assert freshness.stale_reasons({"device": {"type": "cpu", "allocator_settings": ENV_PINNED}}) == []
    monkeypatch.setattr(freshness, "allocator_settings", dict)
    assert freshness.stale_reasons({"device": {"type": "cpu", "allocator_settings": ENV_PINNED}}) == [
        "allocator settings pinned (running glibc's defaults)"
    ]


@pytest.mark.parametrize("thresholds", [{"trim_threshold": 4 * 2**30}, {"mmap_threshold": -1}])  # too large; negative
def test_pinning_with_a_threshold_mallopt_cannot_take_is_a_clear_error(thresholds, monkeypatch):
    monkeypatch.setattr(allocator, "_pinned", {})
    with pytest.raises(ValueError, match="mallopt takes a C int"):
        allocator.pin_cpu_allocator(**thresholds)
    assert allocator._pinned == {}  # nothing changed


def test_pinning_under_a_preloaded_allocator_changes_nothing(monkeypatch, caplog):
    # glibc's mallopt would succeed, but tensors come from jemalloc's malloc: pinning would pretend.
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setattr(allocator, "_pinned", {})
    assert allocator.pin_cpu_allocator() is False
    assert "LD_PRELOAD" in caplog.text and allocator._pinned == {}
