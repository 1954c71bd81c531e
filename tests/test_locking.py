"""The profile writers' lock: mutual exclusion across threads (each opens the file on its own, as processes do),
no lock file left behind, and the check that makes removing the file safe."""

import os
import threading
import time
from contextlib import ExitStack

import pytest

from autoexperts import locking
from autoexperts.locking import file_lock


@pytest.mark.parametrize(
    "left_behind",
    [
        False,  # no lock file before
        True,  # an empty lock file left by a holder that was killed (SIGKILL runs no clean-up)
    ],
)
def test_lock_file_exists_only_while_held(tmp_path, left_behind):
    path = tmp_path / ".profile.lock"
    if left_behind:
        path.write_bytes(b"")
    with file_lock(path, timeout=10):
        assert path.is_file()
    assert list(tmp_path.iterdir()) == []


def test_writers_take_turns(tmp_path):
    counter, path = tmp_path / "counter", tmp_path / ".counter.lock"
    counter.write_text("0")
    writers, increments = 4, 25
    barrier = threading.Barrier(writers)

    def increment():
        barrier.wait()
        for _ in range(increments):
            with file_lock(path, timeout=60):
                value = int(counter.read_text())
                time.sleep(0.001)  # lets another thread run inside the critical section if the lock failed
                counter.write_text(str(value + 1))

    threads = [threading.Thread(target=increment) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(counter.read_text()) == writers * increments  # no increment lost
    assert not path.exists()


def test_a_waiter_that_opened_a_removed_lock_file_tries_again(tmp_path, monkeypatch):
    path = tmp_path / ".profile.lock"
    holder = ExitStack()
    holder.enter_context(file_lock(path, timeout=10))
    real_open, opened = os.open, []

    def open_then_let_the_holder_go(*args, **kwargs):
        descriptor = real_open(*args, **kwargs)
        opened.append(descriptor)
        if len(opened) == 1:
            holder.close()  # the holder removes the file this waiter has just opened, and lets go
        return descriptor

    monkeypatch.setattr(locking.os, "open", open_then_let_the_holder_go)
    with file_lock(path, timeout=10):
        # The first file is gone: holding its lock would exclude no one. The waiter must hold the file at the path.
        assert len(opened) == 2 and path.is_file()
        assert os.fstat(opened[1]).st_ino == path.stat().st_ino
    assert not path.exists()


def test_timeout_names_the_lock(tmp_path):
    path = tmp_path / ".profile.lock"
    with file_lock(path, timeout=10):
        waiter = file_lock(path, timeout=0.05)  # another writer (its own descriptor), while the first holds it
        with pytest.raises(TimeoutError, match=r"\.profile\.lock"):
            waiter.__enter__()
    assert not path.exists()
