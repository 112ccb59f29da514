"""The results: a table of medians with ratios and targets, the JSON file, comparisons."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.cases import SIDES, Case
from benchmarks.runner import SideResult, all_rep_ratios

__all__ = ["compare_table", "load", "results_json", "results_table"]

NOT_PART = "-"


def _number(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(result: SideResult | None, metric: str) -> str:
    if result is None:
        return NOT_PART
    if result.na is not None:
        return result.na
    median = result.medians().get(metric)
    if median is None:
        return "error" if result.errors else NOT_PART
    return _number(median)


def _ratio(ratios: Mapping[str, Mapping[str, Mapping[int, float]]], metric: str, other: str) -> str:
    """The median of the per-repetition ratios ours/other (see :func:`rep_ratios`)."""
    per_rep = ratios.get(other, {}).get(metric)
    if not per_rep:
        return NOT_PART
    return f"{statistics.median(per_rep.values()):.2f}x"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    right = {i for i, name in enumerate(header) if name not in ("case", "metric", "side", "target")}

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def results_table(cases: Sequence[Case], results: Mapping[str, Mapping[str, SideResult]]) -> str:
    """Medians per case and metric, ours/raw and ours/faststream, targets and PASS/FAIL.

    The side columns are each side's median over the repetitions; the ratio columns
    are the median of the per-repetition ratios, which is what the targets judge.
    """
    header = [
        "case",
        "metric",
        *SIDES,
        "ours/raw",
        "ours/faststream",
        "target",
        "result",
    ]
    rows: list[list[str]] = []
    for case in cases:
        per_side = results.get(case.id, {})
        medians = {side: result.medians() for side, result in per_side.items()}
        ratios = all_rep_ratios(per_side)
        for metric in case.metrics:
            targets = [target for target in case.targets if target.metric == metric.key]
            verdicts = []
            for target in targets:
                passed = target.check(medians, ratios)
                verdicts.append("n/a" if passed is None else "PASS" if passed else "FAIL")
            rows.append(
                [
                    case.id,
                    metric.label,
                    *(_cell(per_side.get(side), metric.key) for side in SIDES),
                    _ratio(ratios, metric.key, "raw"),
                    _ratio(ratios, metric.key, "faststream"),
                    "; ".join(target.describe() for target in targets),
                    "; ".join(verdicts),
                ]
            )
    return _render(header, rows)


def results_json(
    cases: Sequence[Case],
    results: Mapping[str, Mapping[str, Mapping[str, SideResult]]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything measured, by loop (``asyncio``, ``uvloop``) and case: every
    repetition, the medians, every per-repetition ratio with its median, and the
    target verdicts. (Format 1, before ``--loop``, had one ``cases`` for the run.)"""
    return {
        "format": 2,
        "meta": dict(meta),
        "loops": {
            loop: {"cases": _cases_json(cases, by_case)} for loop, by_case in results.items()
        },
    }


def _cases_json(
    cases: Sequence[Case], results: Mapping[str, Mapping[str, SideResult]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in cases:
        per_side = results.get(case.id, {})
        medians = {side: result.medians() for side, result in per_side.items()}
        ratios = all_rep_ratios(per_side)
        sides: dict[str, Any] = {}
        for side, result in per_side.items():
            if result.na is not None:
                sides[side] = {"na": result.na}
            else:
                sides[side] = {
                    "values": result.values,
                    "reps": {str(rep): run for rep, run in sorted(result.runs.items())},
                    "medians": medians[side],
                    "errors": result.errors,
                }
            if side in ratios:
                sides[side]["ours_over_side"] = {
                    metric: {
                        "per_rep": {str(rep): ratio for rep, ratio in sorted(per_rep.items())},
                        "median": statistics.median(per_rep.values()),
                    }
                    for metric, per_rep in ratios[side].items()
                }
        out[case.id] = {
            "title": case.title,
            "metrics": [
                {"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better}
                for m in case.metrics
            ],
            "sides": sides,
            "targets": [
                {"metric": t.metric, "target": t.describe(), "passed": t.check(medians, ratios)}
                for t in case.targets
            ],
        }
    return out


def _by_loop(data: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{loop: {case id: case}}`` of a results file, of either format."""
    if data.get("format", 1) == 1:
        loop = "uvloop" if data.get("meta", {}).get("uvloop") else "asyncio"
        return {loop: data.get("cases", {})}
    return {loop: run.get("cases", {}) for loop, run in data.get("loops", {}).items()}


def compare_table(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Old median, new median and change for every loop/case/side/metric both runs have."""
    header = ["case", "loop", "metric", "side", "old", "new", "change"]
    rows: list[list[str]] = []
    old_loops = _by_loop(old)
    for loop, new_cases in _by_loop(new).items():
        for case_id, case in new_cases.items():
            old_case = old_loops.get(loop, {}).get(case_id)
            if old_case is not None:
                rows += _compare_case(case_id, loop, old_case, case)
    if not rows:
        return "(no case, loop, side and metric in common with the compared run)"
    return _render(header, rows)


def _compare_case(
    case_id: str, loop: str, old_case: Mapping[str, Any], case: Mapping[str, Any]
) -> list[list[str]]:
    rows: list[list[str]] = []
    for metric in case["metrics"]:
        key = metric["key"]
        for side in SIDES:
            new_median = case["sides"].get(side, {}).get("medians", {}).get(key)
            old_median = old_case["sides"].get(side, {}).get("medians", {}).get(key)
            if new_median is None or old_median is None or old_median == 0:
                continue
            change = (new_median - old_median) / old_median * 100
            better = change > 0 if metric["higher_is_better"] else change < 0
            verdict = "better" if better else "worse"
            rows.append(
                [
                    case_id,
                    loop,
                    metric["label"],
                    side,
                    _number(old_median),
                    _number(new_median),
                    f"{change:+.1f}% {verdict if abs(change) >= 0.05 else ''}".strip(),
                ]
            )
    return rows


def load(path: str) -> dict[str, Any]:
    """A results file written by an earlier run."""
    with open(path, encoding="utf-8") as file:
        data: dict[str, Any] = json.load(file)
    return data
