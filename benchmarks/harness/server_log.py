"""A benchmark's server log, shown when the benchmark fails.

The servers a benchmark starts write their logs into temporary directories, which are gone
once it ends; when it fails (or is stopped by a time limit's SIGTERM), the log's tail is the
one place the server's own error shows, so it goes to stderr first.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def show_log(server: Any, label: str) -> None:
    """The tail of `server`'s log (its `log()`), on stderr."""
    print(f"--- {label}: the server's log (tail) ---\n{server.log()}\n--- end of log ---",
          file=sys.stderr, flush=True)


def exit_on_signal(signum: int, frame: Any) -> None:
    """A signal handler: the signal unwinds like an error (`finally` blocks run)."""
    raise SystemExit(128 + signum)


@contextmanager
def log_on_failure(server: Any, label: str) -> Iterator[None]:
    """`server` has `log()` (its log's tail). SIGTERM becomes SystemExit meanwhile, so a time
    limit's stop shows the log too (in the main thread only, where signals are handled)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, exit_on_signal) if main else None
    try:
        yield
    except BaseException:
        show_log(server, label)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
