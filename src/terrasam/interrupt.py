"""Ctrl-C answered within two seconds, whatever the main thread is doing.

Python acts on SIGINT only between bytecodes of the main thread, so a single long call into
GEOS, GDAL or PyTorch would hold an interrupt back until it returns. The C-level signal
handler still writes the signal number to a wakeup pipe at once; a watcher thread reads it
and, if the process has not finished unwinding ``grace`` seconds later, prints the message,
removes this process's temporary outputs and exits with 130. That works because those long
calls release the GIL (shapely's and PyTorch's do); the resume work directory is kept, as on
a normal interrupt.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_CODE = 130
GRACE_S = 1.5
_said = threading.Lock()  # held once the message is printed (by whichever side is first)
_active: list[threading.Event] = []  # the "done" events of the answered() blocks open now


def stand_down() -> None:
    """Leave Ctrl-C to the caller from now on (a server that shuts down in its own time)."""
    for done in _active:
        done.set()


def say_once(message: str) -> None:
    """Print the interrupt message to stderr unless it was printed already."""
    if _said.acquire(blocking=False):
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()


@contextlib.contextmanager
def answered(message: str, cleanup=None, grace: float = GRACE_S):
    """Within this block, a SIGINT that the main thread has not answered after ``grace``
    seconds ends the process: ``message`` on stderr, ``cleanup()``, exit status 130.

    Does nothing outside the main thread (signals are delivered there only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _said.locked():  # a new run in this process (the API, a test runner) may say it again
        _said.release()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter's main thread
        os.close(read_fd)
        os.close(write_fd)
        yield
        return
    done = threading.Event()

    def watch():
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data or done.is_set():
                return
            if signal.SIGINT in data and not done.wait(grace):
                say_once(message)
                if cleanup is not None:
                    with contextlib.suppress(Exception):
                        cleanup()
                os._exit(EXIT_CODE)

    watcher = threading.Thread(target=watch, name="terrasam-interrupt", daemon=True)
    watcher.start()
    _active.append(done)
    try:
        yield
    finally:
        done.set()
        _active.remove(done)
        signal.set_wakeup_fd(previous)
        os.close(write_fd)  # the watcher's read returns b"" and it ends
        watcher.join(timeout=1.0)
        os.close(read_fd)
