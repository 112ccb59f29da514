"""Run the selected cases: every repetition runs every side, interleaved.

Order: for each case, for each repetition, ``ours``, ``raw``, ``faststream``. A side that
fails records its error and the run goes on; its cell then shows ``error``.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.cases import (
    SIDES,
    Case,
    FastStreamSetup,
    RunContext,
    consume,
    events,
    inmemory,
    memory,
    rpc,
)
from benchmarks.common import progress

__all__ = [
    "ALL_CASES",
    "FASTSTREAM_VENV",
    "LOOPS",
    "SideResult",
    "all_rep_ratios",
    "detect_faststream",
    "rep_ratios",
    "run_cases",
    "select_cases",
]

ALL_CASES: tuple[Case, ...] = (
    *rpc.CASES,
    *events.CASES,
    *consume.CASES,
    *inmemory.CASES,
    *memory.CASES,
)

FASTSTREAM_VENV = Path(__file__).resolve().parent / ".venv-faststream"

LOOPS = ("asyncio", "uvloop", "both")
"""The choices of ``--loop``."""


@dataclass(slots=True)
class SideResult:
    """One side of one case over all repetitions."""

    na: str | None = None
    """Why the side did not run (then nothing else is set)."""
    runs: dict[int, dict[str, float]] = field(default_factory=dict)
    """The metrics of every repetition that succeeded, by repetition number (from 1)."""
    errors: list[str] = field(default_factory=list)

    @property
    def values(self) -> dict[str, list[float]]:
        """Each metric's values over the repetitions that succeeded, in order."""
        values: dict[str, list[float]] = {}
        for rep in sorted(self.runs):
            for key, value in self.runs[rep].items():
                values.setdefault(key, []).append(value)
        return values

    def medians(self) -> dict[str, float]:
        """The median of each metric over the repetitions that succeeded."""
        return {key: statistics.median(vals) for key, vals in self.values.items() if vals}


def rep_ratios(ours: SideResult, other: SideResult) -> dict[str, dict[int, float]]:
    """``ours / other`` for each metric: ``{metric: {repetition: ratio}}``, for every
    repetition in which both sides measured it.

    A repetition runs the sides back to back, so load that drifts over the run hits
    both terms of its ratio alike; the median of these ratios is what the table shows
    and what targets judge, not the ratio of the two sides' medians (which can pair
    ours' luckiest repetition with the other side's unluckiest).
    """
    ratios: dict[str, dict[int, float]] = {}
    for rep in sorted(ours.runs.keys() & other.runs.keys()):
        mine, theirs = ours.runs[rep], other.runs[rep]
        for key in mine.keys() & theirs.keys():
            if theirs[key]:
                ratios.setdefault(key, {})[rep] = mine[key] / theirs[key]
    return ratios


def all_rep_ratios(
    per_side: Mapping[str, SideResult],
) -> dict[str, dict[str, dict[int, float]]]:
    """:func:`rep_ratios` of ours against every other side that ran, by side."""
    ours = per_side.get("ours")
    if ours is None or ours.na is not None:
        return {}
    return {
        side: rep_ratios(ours, result)
        for side, result in per_side.items()
        if side != "ours" and result.na is None
    }


def select_cases(names: Sequence[str] | None) -> list[Case]:
    """Cases named by id (``rpc.c1``) or group (``rpc``); all when ``names`` is empty."""
    if not names:
        return list(ALL_CASES)
    known = {case.id for case in ALL_CASES} | {case.group for case in ALL_CASES}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [case for case in ALL_CASES if case.id in names or case.group in names]


def detect_faststream(python: str | None) -> tuple[FastStreamSetup | None, str]:
    """Where FastStream runs, or ``(None, why not)``.

    ``--faststream-python`` wins; else this interpreter if it can import FastStream;
    else ``benchmarks/.venv-faststream``.
    """
    if python:
        return FastStreamSetup(python), ""
    if importlib.util.find_spec("faststream") is not None:
        return FastStreamSetup(sys.executable), ""
    venv_python = FASTSTREAM_VENV / "bin" / "python"
    if venv_python.exists():
        return FastStreamSetup(str(venv_python)), ""
    return None, "n/a (pip install -e '.[bench]')"


async def run_cases(
    cases: Sequence[Case],
    *,
    url: str,
    reps: int,
    quick: bool,
    sides: Sequence[str],
    loop: str,
    faststream: FastStreamSetup | None,
    faststream_missing: str,
    profile_dir: Path | None,
    broker_pid: int | None = None,
) -> dict[str, dict[str, SideResult]]:
    """Run ``reps`` repetitions of each case, sides interleaved; results by case and side.

    ``loop`` (``asyncio`` or ``uvloop``) is the loop of every child process; the
    caller runs this coroutine on the same kind of loop, so the clients in this
    process use it too.
    """
    results: dict[str, dict[str, SideResult]] = {}
    for case in cases:
        n = case.quick_n if quick else case.n
        per_side: dict[str, SideResult] = {}
        for side in SIDES:
            if side not in case.sides or side not in sides:
                continue
            runner = case.sides[side]
            if isinstance(runner, str):
                per_side[side] = SideResult(na=runner)
            elif side == "faststream" and faststream is None:
                per_side[side] = SideResult(na=faststream_missing)
            else:
                per_side[side] = SideResult()
        results[case.id] = per_side
        for rep in range(1, reps + 1):
            for side, result in per_side.items():
                runner = case.sides[side]
                if result.na is not None or isinstance(runner, str):
                    continue
                ctx = RunContext(
                    url=url,
                    name=f"{case.id.replace('.', '-')}-{side}-{loop}-r{rep}",
                    n=n,
                    warmup=min(1000, n // 10),
                    rep=rep,
                    use_uvloop=loop == "uvloop",
                    faststream=faststream,
                    profile_dir=profile_dir if side == "ours" else None,
                    broker_pid=broker_pid,
                )
                progress(f"{case.id} ({loop}) rep {rep}/{reps} {side}: n={n} ...")
                started = time.monotonic()
                try:
                    measured = await runner(ctx)
                except Exception as exc:
                    result.errors.append(f"rep {rep}: {type(exc).__name__}: {exc}")
                    progress(
                        f"{case.id} ({loop}) rep {rep}/{reps} {side}: FAILED\n"
                        + traceback.format_exc()
                    )
                    continue
                result.runs[rep] = {
                    metric.key: measured[metric.key]
                    for metric in case.metrics
                    if metric.key in measured
                }
                shown = "  ".join(
                    f"{metric.label}={measured[metric.key]:,.2f}"
                    for metric in case.metrics
                    if metric.key in measured
                )
                progress(
                    f"{case.id} ({loop}) rep {rep}/{reps} {side}: {shown}"
                    f"  ({time.monotonic() - started:.1f}s)"
                )
    return results
