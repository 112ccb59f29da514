"""What a benchmark case is: metrics, targets, and one function per side.

A *side* (``ours``, ``raw``, ``faststream``) is one async function that does the whole
measurement for one repetition: start its server process, run its client in the bench
process, stop the server, return ``{metric: value}``. A side that does not exist yet
is a string instead, saying why (shown as the cell's text). Adding ours to a case is
therefore one function in the case's module (plus, where there is a server, its entry
in :mod:`benchmarks.servers.ours`).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["SIDES", "Case", "FastStreamSetup", "Metric", "RunContext", "Side", "Target"]

SIDES = ("ours", "raw", "faststream")
"""Every side, in the order they run within a repetition and appear in the table."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One measured quantity."""

    key: str
    label: str
    higher_is_better: bool


@dataclass(frozen=True, slots=True)
class FastStreamSetup:
    """Where FastStream runs: the bench's interpreter (client in-process) or another venv."""

    python: str

    @property
    def in_process(self) -> bool:
        """True when FastStream is importable by the bench process itself."""
        return self.python == sys.executable


@dataclass(frozen=True, slots=True)
class RunContext:
    """Everything one side needs for one repetition."""

    url: str
    """Broker URL with this run's vhost."""
    name: str
    """A name unique to this case, side and repetition (queues, agents, exchanges)."""
    n: int
    """Calls, events or messages to measure."""
    warmup: int
    """Calls before measuring (RPC cases)."""
    rep: int
    use_uvloop: bool
    faststream: FastStreamSetup | None
    profile_dir: Path | None
    """When set, the ``ours`` side profiles its client and server into this folder."""
    broker_pid: int | None = None
    """The local broker's ``beam.smp`` process, whose CPU time every RabbitMQ case
    charges to its measured window; ``None`` when it cannot be read."""

    def child_args(self, kind: str, **options: int) -> list[str]:
        """Arguments for a child entry point: ``KIND --url --name [--OPTION N]... --uvloop``."""
        args = [kind, "--url", self.url, "--name", self.name]
        for option, value in options.items():
            args += [f"--{option.replace('_', '-')}", str(value)]
        args.append("--uvloop" if self.use_uvloop else "--no-uvloop")
        return args


Side = Callable[[RunContext], Awaitable[dict[str, float]]]


@dataclass(frozen=True, slots=True)
class Target:
    """A pass/fail goal on one metric of the ``ours`` side."""

    metric: str
    op: Literal[">=", "<="]
    value: float
    against: Literal["raw", "faststream", "absolute"]
    unit: str = ""

    def describe(self) -> str:
        """E.g. ``>= 1.0x raw`` or ``<= 2048 B``."""
        if self.against == "absolute":
            return f"{self.op} {self.value:g}{self.unit}"
        return f"{self.op} {self.value:g}x {self.against}"

    def check(
        self,
        medians: Mapping[str, Mapping[str, float]],
        ratios: Mapping[str, Mapping[str, Mapping[int, float]]],
    ) -> bool | None:
        """Pass or fail; ``None`` when not measurable.

        ``medians`` is ``{side: {metric: median}}`` (for absolute targets);
        ``ratios`` is ``{other side: {metric: {repetition: ours/other}}}``: a
        relative target judges the *median of the per-repetition ratios*.
        """
        if self.against == "absolute":
            ours = medians.get("ours", {}).get(self.metric)
            if ours is None:
                return None
            value, bound = ours, self.value
        else:
            per_rep = ratios.get(self.against, {}).get(self.metric)
            if not per_rep:
                return None
            value, bound = statistics.median(per_rep.values()), self.value
        return value >= bound if self.op == ">=" else value <= bound


@dataclass(frozen=True, slots=True)
class Case:
    """One benchmark case: its sides, what they measure, and the goals for ours."""

    id: str
    title: str
    n: int
    quick_n: int
    metrics: tuple[Metric, ...]
    sides: Mapping[str, Side | str]
    """A function per side, or why that side is not available."""
    targets: tuple[Target, ...] = ()

    @property
    def group(self) -> str:
        """The ``--case`` name selecting it with its siblings (``rpc`` for ``rpc.c1``)."""
        return self.id.split(".", 1)[0]
