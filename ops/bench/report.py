"""Benchmark results: machine facts, the JSON file, and the table between markers in docs/benchmarks.md."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Mapping

from ops.config import PROJECT_ROOT

RESULTS_DIR = PROJECT_ROOT / "ops" / "bench" / "results"
BENCHMARKS_DOC = PROJECT_ROOT / "docs" / "benchmarks.md"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"],
                                 cwd=PROJECT_ROOT, capture_output=True, text=True, check=False).stdout.strip()
        if commit and changed:
            commit += "+uncommitted"  # code edited since that commit ran: the figures are not that commit's
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit or None,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def command_line(command: str, run: Any, *, when_changed: Collection[str] = (),
                 option_names: Mapping[str, str] | None = None) -> str:
    """The command line that repeats `run`, a dataclass whose fields are `command`'s options in order:
    `--field-name value` per field (`option_names` maps a field to another option name; a tuple
    repeats its option; a float prints as %g; None leaves the option out, so its default applies).
    Fields named in `when_changed` appear only where they differ from the field's default."""
    parts = [command]
    for field in dataclasses.fields(run):
        value = getattr(run, field.name)
        if value is None or (field.name in when_changed and value == field.default):
            continue
        option = "--" + (option_names or {}).get(field.name, field.name.replace("_", "-"))
        for item in value if isinstance(value, tuple) else (value,):
            parts.append(f"{option} {item:g}" if isinstance(item, float) else f"{option} {item}")
    return " ".join(parts)


def with_earlier_datasets(path: Path, results: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """This run's per-data-set `results` plus the data sets of the earlier result file `path` that
    it did not measure (one data set's rows can take most of a session here), each given the `keys`
    (command, machine, settings) of the run that produced it; in the order of the known data sets."""
    from ops.datasets import known_datasets  # the data set registry only when merging

    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    merged = {set_name: {**{k: earlier.get(k) for k in keys}, **result}
              for set_name, result in earlier.get("datasets", {}).items() if set_name not in results}
    merged.update(results)
    order = list(known_datasets())
    return dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def with_earlier_rows(path: Path, results: dict[str, Any], key: str, order: list[str],
                      keys: tuple[str, ...] = ("command", "machine")) -> dict[str, Any]:
    """This run's data sets plus the earlier result file's rows that the run did not measure on them
    (rows told apart by row[key]; one row can take most of a session here, so a table is filled over
    several runs). A kept row keeps the `keys` of its own run (its data set's or the file's where the
    row has none). Rows in `order` of their key."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    merged = {}
    for name, result in results.items():
        before = earlier.get("datasets", {}).get(name, {})
        measured = {row[key] for row in result["rows"]}
        kept = [{**{k: before.get(k, earlier.get(k)) for k in keys}, **row}
                for row in before.get("rows", []) if row.get(key) in order and row.get(key) not in measured]
        rows = sorted([*result["rows"], *kept], key=lambda r: order.index(r[key]))
        merged[name] = {**result, "rows": rows}
    return merged


def provenance_lines(report: dict[str, Any], by_row: bool = False) -> list[str]:
    """Lines under a table saying when, at which commit and with which command a merged report's figures
    were measured: one per data set, or with `by_row` one per run that measured some of a data
    set's rows (each row then carries its own command and machine), naming the rows where a data
    set's rows come from more than one run."""
    lines = []
    for name, result in report["datasets"].items():
        runs: dict[tuple[str, str, str], list[str]] = {}
        for row in result["rows"] if by_row else [result]:
            run = row.get("machine") or result.get("machine") or report["machine"]
            key = (run["measured_at"], run["commit"], row.get("command") or result.get("command") or report["command"])
            runs.setdefault(key, []).append(row["row"] if by_row else "")
        for (when, commit, command), rows in runs.items():
            label = f"{name}, {'; '.join(rows)}" if len(runs) > 1 else name
            lines.append(f"{label}: measured {when} (commit {commit}) with `{command}`.")
    return lines


def write_json(path: Path, document: Any) -> Path:
    """Write a JSON document whole: into a temporary file beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_result(name: str, result: dict[str, Any], output: str | None = None) -> Path:
    return write_json(Path(output) if output else RESULTS_DIR / f"{name}.json", result)


def update_benchmarks_table(name: str, table: str, doc: Path = BENCHMARKS_DOC) -> bool:
    """Replace the block between <!-- bench:NAME --> and <!-- /bench:NAME --> in docs/benchmarks.md;
    False (nothing written) where the file or that marker pair is missing."""
    if not doc.is_file():
        return False
    text = doc.read_text()
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
    if not pattern.search(text):
        return False
    doc.write_text(pattern.sub(lambda m: m.group(1) + table.rstrip() + "\n" + m.group(2), text))
    return True
