"""``python -m benchmarks``: run the cases against the local broker and print the table.

See ``benchmarks/README.md`` for what each case measures and how to read the table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import pstats
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from amqp_agents.testing import BrokerAdmin, broker_reachable, url_for_vhost
from benchmarks.cases import SIDES
from benchmarks.common import find_broker_pid, progress, run_loop, uvloop_available
from benchmarks.report import compare_table, load, results_json, results_table
from benchmarks.runner import (
    ALL_CASES,
    LOOPS,
    SideResult,
    detect_faststream,
    run_cases,
    select_cases,
)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
RESULTS = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    groups = sorted({case.group for case in ALL_CASES})
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark amqp-agents against raw aio-pika (and FastStream).",
        epilog="cases: " + ", ".join(f"{case.id} ({case.title})" for case in ALL_CASES),
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help=f"run only these cases, by group ({', '.join(groups)}) or id; repeatable",
    )
    parser.add_argument(
        "--side", action="append", choices=SIDES, help="run only these sides; repeatable"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per side (default 3)")
    parser.add_argument("--quick", action="store_true", help="10x fewer calls, for iterating")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"broker (default {DEFAULT_URL})")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        help="the event loop of every process of every side: asyncio, uvloop, or both"
        " (every selected case once per loop, a table each); default uvloop when installed",
    )
    parser.add_argument(
        "--no-uvloop",
        dest="loop",
        action="store_const",
        const="asyncio",
        help="the same as --loop asyncio",
    )
    parser.add_argument("--compare", metavar="OLD.json", help="also compare with an earlier run")
    parser.add_argument("--output", type=Path, help="results file (default results/<time>.json)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile ours (client and server) into results/profile-<time>/; slows ours",
    )
    parser.add_argument(
        "--faststream-python",
        metavar="PATH",
        help="interpreter with faststream[rabbit] (default: this one, else .venv-faststream)",
    )
    return parser


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "amqp_agents"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _print_profiles(folder: Path, top: int = 25) -> None:
    for path in sorted(folder.glob("*.prof")):
        print(f"\n== {path} (top {top} by own time)", file=sys.stderr)
        stats = pstats.Stats(str(path), stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(top)


def _loops(choice: str | None) -> list[str]:
    """The loops to run, in order: ``--loop`` (``both``: uvloop, then asyncio)."""
    if choice is None:
        return ["uvloop" if uvloop_available() else "asyncio"]
    wanted = ["uvloop", "asyncio"] if choice == "both" else [choice]
    if "uvloop" in wanted and not uvloop_available():
        raise SystemExit("--loop uvloop: uvloop is not installed (pip install -e '.[speed]')")
    return wanted


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when every side ran, 1 when one failed (targets never fail)."""
    args = _parser().parse_args(argv)
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) stop the run the
    # same way: server processes are stopped and the vhost is deleted.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.reps < 1:
        raise SystemExit("--reps must be at least 1")
    cases = select_cases(args.case)
    if not broker_reachable(args.url):
        raise SystemExit(f"no broker at {args.url}: start RabbitMQ first")
    loops = _loops(args.loop)
    faststream, faststream_missing = detect_faststream(args.faststream_python)
    broker_pid, broker_unmeasured = find_broker_pid(args.url)
    if broker_pid is None:
        progress(f"broker CPU is not measured: {broker_unmeasured}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    profile_dir = RESULTS / f"profile-{stamp}" if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)

    meta: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv[1:] if argv is None else argv,
        "reps": args.reps,
        "quick": args.quick,
        "loops": loops,
        "profiled": args.profile,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "faststream_python": None if faststream is None else faststream.python,
        "broker_pid": broker_pid,
        "versions": {
            name: _version(name)
            for name in ("amqp-agents", "aio-pika", "aiormq", "pydantic", "uvloop", "faststream")
        },
    }
    admin = BrokerAdmin()
    meta["broker"] = admin.run("version").strip()
    vhost = admin.create_vhost("amqp-agents-bench")
    progress(
        f"vhost {vhost}; {len(cases)} case(s) x {args.reps} rep(s)"
        f"{' (quick)' if args.quick else ''}; loop: {', then '.join(loops)};"
        f" faststream: {faststream.python if faststream else faststream_missing}"
    )
    results: dict[str, dict[str, dict[str, SideResult]]] = {}
    # The clients run here: their start-up heap is frozen like every server's (proc.ready).
    gc.collect()
    gc.freeze()
    try:
        for loop in loops:
            use_uvloop = loop == "uvloop"
            if len(loops) > 1:
                progress(f"== loop: {loop}")
            results[loop] = run_loop(
                run_cases(
                    cases,
                    url=url_for_vhost(args.url, vhost),
                    reps=args.reps,
                    quick=args.quick,
                    sides=args.side or SIDES,
                    loop=loop,
                    faststream=faststream,
                    faststream_missing=faststream_missing,
                    profile_dir=profile_dir,
                    broker_pid=broker_pid,
                ),
                use_uvloop=use_uvloop,
            )
    finally:
        admin.delete_vhost(vhost)
    meta["loadavg_after"] = os.getloadavg()

    for loop, by_case in results.items():
        print(f"\nloop: {loop}")
        print(results_table(cases, by_case))
    data = results_json(cases, results, meta)
    output: Path = args.output or RESULTS / f"{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(
        f"\nsides: medians of {args.reps} rep(s); ours/...: median of the per-rep ratios;"
        f" load average {meta['loadavg_before'][0]:.2f} before,"
        f" {meta['loadavg_after'][0]:.2f} after; results: {output}"
    )
    if args.compare:
        print(f"\ncompared with {args.compare}:")
        print(compare_table(load(args.compare), data))
    if profile_dir is not None:
        _print_profiles(profile_dir)
        print(f"profiles: {profile_dir} (open with python -m pstats or snakeviz)")
    failed = [
        f"{case_id} {side} ({loop}): {error}"
        for loop, by_case in results.items()
        for case_id, per_side in by_case.items()
        for side, result in per_side.items()
        for error in result.errors
    ]
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
