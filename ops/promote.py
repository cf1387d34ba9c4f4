"""Promotion (DESIGN.md, contracts: promotion): move a label to a version through gates, roll it back,
and keep an append-only audit log. Serving and the trainer read the labels; only this module writes them.

<model_dir>/labels.json   {"stable": N, "canary": M}, replaced atomically
<model_dir>/audit.jsonl   one JSON object per change: at, who, action, label, from, to, reason, forced, gates

Gates of `plum promote VERSION` (each named in a refusal):
  complete          the version directory is complete and its manifest is one this server can serve
  invalid_sid       its recorded invalid-SID rate is 0
  staleness         its data watermark is at most max_staleness_hours behind the newest event in the log
  popularity_floor  on by default, also on a first promotion (promote.popularity_floor false records it
                    as not applied, with its figures): Recall@10 strictly above recent popularity's
                    (trainer.evaluate.popularity_floor; a tie fails) on the same users: the newest event of
                    each user that the candidate (and the labelled version) has not trained on (at least
                    min_eval_examples users); with too few such events, the figures the trainer recorded for
                    both at export; with neither, the gate fails
  quality           Recall@10 and NDCG@10 not below the labelled version's by more than `margin`, on the same
                    events: both versions evaluated now on the newest event of each user that neither has
                    trained on (at least min_eval_examples users); with too few such events, the figures the
                    trainer recorded when it evaluated the candidate against that very version at export
Every version is evaluated with the beam width its manifest records (the search it is served with;
`promote.beam_width` only for versions whose manifest records none).
`plum rollback` moves the label back to the version it pointed at before (the audit log's history) and
checks only `complete` and `invalid_sid`: a rollback is the way out of a bad version, not a new bet.
`--force` skips failed gates but needs a reason, and the audit entry records the failed gates.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from ops.config import PromoteSettings
from ops.errors import PlumError
from trainer.checkpoint import CheckpointError, read_manifest
from trainer.servable import LABELS, labels, recorded_beam_width, version_numbers

AUDIT = "audit.jsonl"
LABEL_NAMES = ("stable", "canary")
Say = Callable[[str], None]


class PromotionRefused(PlumError):
    """A gate failed and --force was not given."""


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def operator() -> str:
    """Who is changing the labels: $PLUM_OPERATOR, or the login user at this host."""
    return os.environ.get("PLUM_OPERATOR") or f"{getpass.getuser()}@{socket.gethostname()}"


@contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    """One label change at a time (two on-call engineers, one model)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / ".labels.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_labels(model_dir: Path, new: dict[str, int]) -> None:
    """Replace labels.json atomically: a reader sees the old labels or the new ones, never a torn file."""
    tmp = model_dir / f".{LABELS}.tmp"
    tmp.write_text(json.dumps(new, indent=1, sort_keys=True))
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, model_dir / LABELS)


def audit_log(model_dir: Path) -> list[dict[str, Any]]:
    """Every recorded change, oldest first."""
    path = model_dir / AUDIT
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise PlumError(f"{path} line {number} is not JSON; the audit log must only be appended to") from None
    return entries


def _append_audit(model_dir: Path, entry: dict[str, Any]) -> None:
    with open(model_dir / AUDIT, "a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def label_history(entries: list[dict[str, Any]], label: str) -> list[int]:
    """The versions a label pointed at, oldest first, as promotions pushed and rollbacks popped them."""
    stack: list[int] = []
    for entry in entries:
        if entry.get("label") != label:
            continue
        if entry["action"] == "promote":
            if not stack and entry.get("from") is not None:
                stack.append(int(entry["from"]))
            stack.append(int(entry["to"]))
        elif entry["action"] == "rollback" and stack:
            stack.pop()
    return stack


# Gates ------------------------------------------------------------------------------------------------
def _manifest(model_dir: Path, version: int) -> dict[str, Any]:
    if version not in version_numbers(model_dir):
        raise PlumError(f"version {version} does not exist under {model_dir} "
                        f"(versions: {version_numbers(model_dir) or 'none'})")
    return read_manifest(model_dir / str(version))


def gate_complete(model_dir: Path, version: int) -> Gate:
    from serving.engine import IncompatibleVersion, check_manifest

    try:
        check_manifest(_manifest(model_dir, version))
    except (CheckpointError, IncompatibleVersion, OSError, KeyError, ValueError) as exc:
        return Gate("complete", False, f"version {version} cannot be served: {exc}")
    return Gate("complete", True, f"version {version} is complete and servable")


def gate_invalid_sid(manifest: dict[str, Any], version: int) -> Gate:
    rate = (manifest.get("eval") or {}).get("invalid_sid_rate")
    if rate is None:
        return Gate("invalid_sid", False, f"version {version} has no recorded invalid-SID rate (no eval figures)")
    return Gate("invalid_sid", rate == 0, f"invalid-SID rate {rate:.4f}" + ("" if rate == 0 else " (must be 0)"),
                {"invalid_sid_rate": rate})


def _watermark_time(manifest: dict[str, Any]) -> datetime | None:
    when = (manifest.get("data_watermark") or {}).get("event_time")
    return datetime.fromisoformat(when) if when else None


def gate_staleness(manifest: dict[str, Any], version: int, newest_event: datetime | None,
                   settings: PromoteSettings) -> Gate:
    trained = _watermark_time(manifest)
    if trained is None:
        return Gate("staleness", False, f"version {version} records no data watermark")
    if newest_event is None:
        return Gate("staleness", True, "the training log is empty: nothing newer to be behind")
    behind = max((newest_event - trained).total_seconds() / 3600, 0.0)
    return Gate("staleness", behind <= settings.max_staleness_hours,
                f"data watermark {behind:.2f} h behind the newest logged event (limit "
                f"{settings.max_staleness_hours:g} h)", {"hours_behind": round(behind, 3)})


@dataclass
class FreshEvaluation:
    """The versions a promotion compares, evaluated now on the newest event of each user that none of
    them has trained on, with recent popularity on the same users (figures empty and popularity None
    when fewer than min_eval_examples users have such an event)."""

    users: int
    figures: dict[int, dict[str, Any]]
    popularity: dict[str, Any] | None


def evaluate_fresh(model_dir: Path, events: list[Any], compared: dict[int, dict[str, Any]], settings: PromoteSettings,
                   say: Say) -> FreshEvaluation:
    """Evaluate the `compared` versions (number -> manifest, the candidate first) and recent popularity."""
    from trainer.continuous import evaluate_held_out, popularity_on
    from trainer.servable import ItemCatalogue, load_version
    from trainer.vocab import VocabLayout

    manifests = list(compared.values())
    held = held_out_after(events, [m.get("data_watermark") for m in manifests], _max_history(manifests[0]),
                          settings.eval_examples)
    if len(held) < settings.min_eval_examples:
        return FreshEvaluation(len(held), {}, None)
    say(f"promote: evaluating version{'s' if len(compared) > 1 else ''} {' and '.join(map(str, compared))} and "
        f"recent popularity on {len(held)} users' newest events that no compared version has trained on")
    figures = {}
    for number in compared:
        model, loaded, item_ids, sids = load_version(model_dir, number)
        layout = VocabLayout.from_json(loaded["vocabulary"])
        figures[number] = evaluate_held_out(model, layout, ItemCatalogue.build(layout, item_ids, sids), held,
                                            _max_history(loaded), _beam_width(loaded, settings))
    return FreshEvaluation(len(held), figures, popularity_on(held, events))


def _beam_width(manifest: dict[str, Any], settings: PromoteSettings) -> int:
    """The search a version is judged with: the beam width its manifest records (what serving runs)."""
    return recorded_beam_width(manifest) or settings.beam_width


def _headline(figures: dict[str, Any]) -> dict[str, Any]:
    """What a gate records of an evaluation: the gate metrics and the beam width searched with."""
    from trainer.evaluate import GATE_METRICS

    return {**{k: figures[k] for k in GATE_METRICS}, "beam_width": figures.get("beam_width")}


def gate_popularity_floor(version: int, manifest: dict[str, Any], fresh: FreshEvaluation,
                          settings: PromoteSettings) -> Gate:
    from trainer.evaluate import GATE_METRICS, popularity_floor

    if fresh.popularity is not None:
        candidate, popularity = fresh.figures[version], fresh.popularity
        how = f"both evaluated now on {fresh.users} users' newest untrained events"
    else:
        recorded = manifest.get("eval") or {}
        if not recorded.get("popularity"):
            if not settings.popularity_floor:
                return Gate("popularity_floor", True, "NOT APPLIED (promote.popularity_floor false), and no "
                            f"figures: only {fresh.users} users have events version {version} has not trained on",
                            {"users": fresh.users, "applied": False})
            return Gate("popularity_floor", False, f"no evaluation of version {version} against recent popularity "
                        f"on the same events: only {fresh.users} users have events it has not trained on (< "
                        f"min_eval_examples {settings.min_eval_examples}), and its manifest records no popularity "
                        f"figures from export", {"users": fresh.users})
        candidate, popularity = recorded, recorded["popularity"]
        how = (f"the trainer's evaluation at export on {recorded.get('examples')} users; only {fresh.users} newer "
               f"events now")
    passed, detail = popularity_floor(candidate, popularity)
    figures = {"candidate": _headline(candidate),
               "popularity": {**{k: popularity[k] for k in GATE_METRICS},
                              "recent_events": popularity.get("recent_events")},
               "examples": popularity["examples"], "how": how, "applied": settings.popularity_floor}
    if not settings.popularity_floor:
        return Gate("popularity_floor", True, f"NOT APPLIED (promote.popularity_floor false): {detail} ({how})",
                    {**figures, "would_pass": passed})
    return Gate("popularity_floor", passed, f"{detail} ({how})", figures)


def _compare(candidate: dict[str, Any], current: dict[str, Any], current_version: int, settings: PromoteSettings,
             how: str) -> Gate:
    from trainer.evaluate import quality_gate

    margin = settings.margin
    failing, compared = quality_gate(candidate, current, margin, settings.confidence)
    figures = {"candidate": _headline(candidate), "current": _headline(current),
               "how": how, "examples": candidate.get("examples"), "confidence": settings.confidence,
               "differences": {d.metric: {"mean": round(d.difference, 4), "upper": round(d.upper, 4),
                                          "paired": d.paired} for d in compared}}
    if failing is not None:
        metric = failing.metric
        return Gate("quality", False, f"{metric} {candidate[metric]:.4f} trails version {current_version}'s "
                    f"{current[metric]:.4f} by more than the margin {margin:g} ({failing.describe()}; {how})", figures)
    return Gate("quality", True, f"recall@10 {candidate['recall@10']:.4f} vs version {current_version}'s "
                f"{current['recall@10']:.4f}, ndcg@10 {candidate['ndcg@10']:.4f} vs {current['ndcg@10']:.4f}: "
                f"not worse by more than the margin {margin:g} ({compared[0].describe()}; {how})", figures)


def gate_quality(version: int, manifest: dict[str, Any], current: int, fresh: FreshEvaluation,
                 settings: PromoteSettings) -> Gate:
    if fresh.figures:
        return _compare(fresh.figures[version], fresh.figures[current], current, settings,
                        f"both evaluated now on {fresh.users} users' newest untrained events")
    recorded = manifest.get("eval") or {}
    if recorded.get("served_version") == current and recorded.get("served"):
        return _compare(recorded, recorded["served"], current, settings,
                        f"the trainer's side-by-side evaluation at export on {recorded.get('examples')} users; only "
                        f"{fresh.users} newer events now")
    return Gate("quality", False, f"no evaluation of version {version} against version {current} on the same "
                f"events: only {fresh.users} users have events neither trained on (< min_eval_examples "
                f"{settings.min_eval_examples}), and the trainer did not compare them at export")


def _max_history(manifest: dict[str, Any]) -> int:
    return int((manifest.get("prompt_schema") or {}).get("max_history", 20))


def read_log(log_dir: Path) -> list[Any]:
    """Every event in the training log (LoggedEvent), in file order."""
    from trainer.stream import published_files, read_events

    return [event for relative in published_files(log_dir) for event in read_events(log_dir, relative)]


def held_out_after(events: list[Any], watermarks: list[dict[str, Any] | None], max_history: int, limit: int) -> Any:
    """The newest event of each user that no watermark covers, with the user's earlier events as history
    (the newest `limit` users): events no compared version has trained on."""
    from trainer.continuous import held_out_of
    from trainer.stream import covered_by

    by_user: dict[str, list[Any]] = {}
    for event in events:
        by_user.setdefault(event.user_id, []).append(event)
    targets = []
    for history in by_user.values():
        history.sort(key=lambda e: e.order)
        newest = history[-1]
        if len(history) > 1 and not any(covered_by(w, newest) for w in watermarks):
            targets.append((newest, history[:-1]))
    targets.sort(key=lambda target: target[0].order, reverse=True)
    return held_out_of(targets[:limit], max_history)


def newest_event_time(events: list[Any]) -> datetime | None:
    if not events:
        return None
    return datetime.fromtimestamp(max(e.order[0] for e in events) / 1_000_000, timezone.utc)


# Actions ----------------------------------------------------------------------------------------------
def _check_label(label: str) -> None:
    if label not in LABEL_NAMES:
        raise PlumError(f"unknown label {label!r}; use one of {', '.join(LABEL_NAMES)}")


def _decide(gates: list[Gate], force: bool, what: str) -> list[Gate]:
    failed = [g for g in gates if not g.passed]
    if failed and not force:
        raise PromotionRefused(f"{what} refused by gate{'s' if len(failed) > 1 else ''} "
                               + "; ".join(f"{g.name}: {g.detail}" for g in failed)
                               + ". Fix the cause, or pass --force with a --reason that says why.")
    return failed


def _record(model_dir: Path, action: str, label: str, before: int | None, after: int, reason: str, force: bool,
            gates: list[Gate], who: str) -> dict[str, Any]:
    entry = {"at": _now(), "who": who, "action": action, "label": label, "from": before, "to": after,
             "reason": reason, "forced": force and any(not g.passed for g in gates),
             "gates": [asdict(g) for g in gates]}
    current = labels(model_dir)
    write_labels(model_dir, {**current, label: after})
    _append_audit(model_dir, entry)
    return entry


def promote(model_dir: Path, log_dir: Path, version: int, label: str, reason: str, settings: PromoteSettings,
            force: bool = False, who: str | None = None, say: Say = print) -> dict[str, Any]:
    """Point `label` at `version` if every gate passes (or --force with a reason); returns the audit entry."""
    _check_label(label)
    if not reason.strip():
        raise PlumError("a promotion needs --reason TEXT: the audit log keeps why every change was made")
    with _locked(model_dir):
        current = labels(model_dir).get(label)
        if current == version:
            raise PlumError(f"label {label!r} already points at version {version}; nothing to do")
        gates = [gate_complete(model_dir, version)]
        if gates[0].passed:
            manifest = _manifest(model_dir, version)
            gates.append(gate_invalid_sid(manifest, version))
            events = read_log(log_dir)
            gates.append(gate_staleness(manifest, version, newest_event_time(events), settings))
            compared = {version: manifest}
            if current is not None and current in version_numbers(model_dir):
                compared[current] = _manifest(model_dir, current)
            fresh = evaluate_fresh(model_dir, events, compared, settings, say)
            gates.append(gate_popularity_floor(version, manifest, fresh, settings))
            if current is not None and current in compared:
                gates.append(gate_quality(version, manifest, current, fresh, settings))
        _decide(gates, force, f"promoting version {version} to {label!r}")
        return _record(model_dir, "promote", label, current, version, reason, force, gates, who or operator())


def rollback(model_dir: Path, label: str, reason: str, force: bool = False, who: str | None = None
             ) -> dict[str, Any]:
    """Point `label` back at the version it pointed at before its last promotion."""
    _check_label(label)
    if not reason.strip():
        raise PlumError("a rollback needs --reason TEXT: the audit log keeps why every change was made")
    with _locked(model_dir):
        current = labels(model_dir).get(label)
        history = label_history(audit_log(model_dir), label)
        if current is None or len(history) < 2 or history[-1] != current:
            raise PlumError(f"label {label!r} has no earlier version to roll back to "
                            f"(it points at {current if current is not None else 'nothing'}; "
                            f"the audit log's history for it: {history or 'empty'})")
        target = history[-2]
        gates = [gate_complete(model_dir, target)]
        if gates[0].passed:
            gates.append(gate_invalid_sid(_manifest(model_dir, target), target))
        _decide(gates, force, f"rolling {label!r} back from version {current} to {target}")
        return _record(model_dir, "rollback", label, current, target, reason, force, gates, who or operator())
