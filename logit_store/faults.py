"""Named crash points, so that tests place a `kill -9` exactly where they mean to, not where a timer lands.

`MOEKD_FAULT=<point>:<n>` makes the process SIGKILL itself when code calls `crash_point(<point>, n)`: no cleanup,
no `finally`, no flush, as when a node dies. Unset (always, outside tests), a crash point is one dict lookup.
The points a build has are listed in docs/BUILD.md ("Crashes and resume").
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "MOEKD_FAULT"


def crash_point(point: str, index: int) -> None:
    """SIGKILL this process if `MOEKD_FAULT` is `<point>:<index>`."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)
