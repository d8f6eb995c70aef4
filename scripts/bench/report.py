"""How the benchmark prints: the report as a Markdown table (one column per student, then the shared figures),
each figure in its unit, and pytest's JUnit XML counted for scripts/gpu_check.sh. Knows nothing of the rows
but the labels it is given."""

import math
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def format_value(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return {
        "ips": f"{value:.1f}",
        "share": f"{100 * value:.1f} %",
        "ratio": f"{value:.2f}x",
        "mib": f"{value:.0f}",
        "kib": f"{value:.1f}",
        "s": f"{value:.1f}",
        "bytes": f"{value:,.0f}",
        "ms": f"{value:.1f}",
        "count": f"{value:.4g}",
    }.get(unit, f"{value:.4g}")


def markdown(report: dict, preset_name: str, figures: dict[str, tuple[str, str]]) -> str:
    """The report as Markdown: the setting, a table with one column per student, the shared figures.
    `figures`: figure -> (label, unit), in the table's order; a figure without one is listed by its key, last."""
    setup = report["setup"]
    students = list(report["students"])
    batches = ", ".join(f"{student} {batch}" for student, batch in setup["students"].items())
    lines = [
        f"`python scripts/benchmark.py --preset {preset_name}` on {setup['device']}: batch per device {batches}; "
        f"teacher {setup['teacher']} (heavy teacher {setup['cache_teacher']}); {setup['img_size']} px, "
        f"{setup['num_classes']} classes, {setup['precision']}; {setup['timed_steps']} timed steps, best of "
        f"{setup['repeats']}; torch {setup['torch']}, timm {setup['timm']}, lightning {setup['lightning']}.",
        "",
        "| figure | " + " | ".join(students) + " |",
        "|---|" + "---|" * len(students),
    ]
    keys = [key for key in figures if any(key in report["students"][s] for s in students)]
    keys += sorted({key for s in students for key in report["students"][s]} - set(keys))
    for key in keys:
        label, unit = figures.get(key, (key, ""))
        cells = [
            format_value(report["students"][s][key], unit) if key in report["students"][s] else "" for s in students
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["shared"]:
        lines += ["", "| figure (shared) | value |", "|---|---|"]
        for key, value in report["shared"].items():
            label, unit = figures.get(key, (key, ""))
            lines.append(f"| {label} | {format_value(value, unit)} |")
    if report.get("errors"):
        lines += ["", "Rows that failed:"] + [f"- {key}: `{error}`" for key, error in report["errors"].items()]
    total = sum(report["seconds"].values())
    lines += ["", f"Measured in {total:.0f} s."]
    if report.get("load"):
        low, high = min(report["load"].values()), max(report["load"].values())
        lines[-1] += f" 1-minute load average after each row: {low:.1f} to {high:.1f} ({os.cpu_count()} cores)."
    if "gpu_tests" in report:
        counts = report["gpu_tests"]
        lines[-1] += (
            f" `pytest -m gpu`: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed."
        )
    return "\n".join(lines) + "\n"


def gpu_test_counts(junit_xml: Path) -> dict[str, int]:
    """passed / skipped / failed of a pytest --junitxml report (scripts/gpu_check.sh's pytest -m gpu)."""
    root = ElementTree.parse(junit_xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - skipped - failed, "skipped": skipped, "failed": failed}
