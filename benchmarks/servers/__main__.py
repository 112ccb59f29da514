"""Dispatch ``python -m benchmarks.servers KIND ...`` to the module serving KIND.

Modules are imported lazily so that a FastStream server needs neither amqp_agents nor
the bench's own dependencies.
"""

from __future__ import annotations

import sys

from benchmarks.proc import ServerMain, child_main


def _servers(kind: str) -> dict[str, ServerMain]:
    if kind.startswith("ours-"):
        from benchmarks.servers.ours import SERVERS
    elif kind.startswith("raw-"):
        from benchmarks.servers.raw import SERVERS
    elif kind.startswith("faststream-"):
        from benchmarks.faststream_side import SERVERS
    else:
        raise SystemExit(f"unknown server kind {kind!r}: use ours-*, raw-* or faststream-*")
    return SERVERS


if __name__ == "__main__":
    child_main(_servers(sys.argv[1] if len(sys.argv) > 1 else ""), "python -m benchmarks.servers")
