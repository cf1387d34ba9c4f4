"""The durable embedded state backend: the pipeline's per-user state (history, latest context values,
event ids within the de-duplication retention), per-item stats, co-occurrence counts, item
metadata, read positions and batches awaiting publication, in one SQLite file.

What the state becomes is decided by the pure folds of ingest/folds.py, the same ones the Beam
keyed-state transforms call; this module only decides where the state lives when the runner (the
DirectRunner) keeps none of its own. Everything a batch changes is committed in one transaction
together with the offsets it came from, so after a crash the pipeline resumes exactly where its
state is, and an event id seen within the retention is never applied again. Commits are durable
against an OS crash or a power loss (synchronous=FULL: the WAL is fsynced at every commit);
`durable=False` (synchronous=NORMAL) exists only to measure what that costs.

A read position belongs to a log epoch: the incarnation of the partition's log its offsets count
in (ingest/epochs.py tells when a broker's log restarted at offset 0). A new epoch restarts the
position at 0; the position also keeps the fingerprint of the record just before it, by which
the next start can tell whether the log it finds is still the one it read.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ingest.events import EngagementEvent, ItemUpsert
from ingest.folds import (ItemMetadata, ItemStats, UserContext, UserFoldSettings, UserHistory, UserState, fold_user,
                          item_contributions, item_metadata, merge_into, restate_context)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_event_ids (
    user_id TEXT NOT NULL, event_id TEXT NOT NULL, event_time INTEGER NOT NULL,
    PRIMARY KEY (user_id, event_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_event_ids_by_time ON seen_event_ids (user_id, event_time);
CREATE TABLE IF NOT EXISTS user_history (
    user_id TEXT PRIMARY KEY, item_ids TEXT NOT NULL, rewards TEXT NOT NULL, times TEXT NOT NULL,
    event_count INTEGER NOT NULL, last_event_time INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_stats (
    item_id TEXT PRIMARY KEY, impressions INTEGER NOT NULL, clicks INTEGER NOT NULL,
    event_count INTEGER NOT NULL, reward_sum REAL NOT NULL, last_event_time INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_metadata (
    item_id TEXT PRIMARY KEY, title TEXT NOT NULL, tags TEXT NOT NULL, published_at INTEGER,
    description TEXT, updated_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_index (item_id TEXT PRIMARY KEY, idx INTEGER NOT NULL UNIQUE) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cooccurrence (
    item_a INTEGER NOT NULL, item_b INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (item_a, item_b)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0, last_record TEXT,
    PRIMARY KEY (topic, partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied_ranges (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, start_offset INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    last_record TEXT,
    PRIMARY KEY (topic, partition, start_offset)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_publish (
    batch_id TEXT PRIMARY KEY, users TEXT NOT NULL, items TEXT NOT NULL, metadata_items TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_commit (id INTEGER PRIMARY KEY CHECK (id = 0), unix_time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS user_context (
    user_id TEXT PRIMARY KEY, context TEXT NOT NULL, last_event_time INTEGER NOT NULL,
    written_us INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS context_features_filled (name TEXT PRIMARY KEY) WITHOUT ROWID;
"""

# Columns added since the first release: a state store written before them gains them on open.
_ADDED_COLUMNS = {
    "read_positions": {"epoch": "INTEGER NOT NULL DEFAULT 0", "last_record": "TEXT"},
    "applied_ranges": {"last_record": "TEXT"},
}

_CHUNK = 900  # SQLite's default limit on bound parameters is 999


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i:i + _CHUNK]


class EpochMismatchError(Exception):
    """A batch read in one log epoch of a partition met a state store at another."""


@dataclass(frozen=True)
class ReadPosition:
    """Where reading a partition resumes, in which log epoch, and what was read last."""

    next_offset: int
    epoch: int
    last_record: str | None  # fingerprint of the record at next_offset - 1 (None: unknown)
    furthest_offset: int  # the end of the furthest applied range (>= next_offset when batches committed out of order)


@dataclass
class BatchChanges:
    """What one applied batch changed: the entities whose features must be pushed."""

    new_events: list[EngagementEvent]
    rewards: list[float]
    duplicates: int
    expired: list[EngagementEvent]  # older than the de-duplication retention: for the dead-letter topic
    users: list[UserHistory]
    items: list[ItemStats]
    metadata: list[ItemMetadata]
    contexts: list[UserContext]  # users whose context values changed


class PipelineStateStore:
    """One SQLite database; callers serialise batches (one writer at a time)."""

    def __init__(self, path: Path, folding: UserFoldSettings | None = None, durable: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.folding = folding
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL only syncs the WAL at checkpoints: a power loss may undo the last commits, after
        # their files were published and their offsets committed to Kafka.
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
        # Ids a store written before per-user retention remembered (no user, no time): still
        # duplicates, never pruned, no longer added to.
        self._legacy_seen = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='seen_events'").fetchone() is not None

    def close(self) -> None:
        self.db.close()

    # -- read positions -------------------------------------------------------------------
    def read_position(self, topic: str, partition: int) -> int:
        """Where reading this partition resumes: the end of the contiguous applied prefix."""
        row = self.db.execute(
            "SELECT next_offset FROM read_positions WHERE topic=? AND partition=?", (topic, partition)
        ).fetchone()
        return row[0] if row else 0

    def read_positions(self) -> dict[tuple[str, int], int]:
        return {(t, p): o for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM read_positions")}

    def positions(self) -> dict[tuple[str, int], ReadPosition]:
        """Every partition read so far: its position, log epoch and last record read."""
        furthest = dict(((t, p), o) for t, p, o in self.db.execute(
            "SELECT topic, partition, MAX(next_offset) FROM applied_ranges GROUP BY topic, partition"))
        return {(t, p): ReadPosition(o, e, r, max(o, furthest.get((t, p), 0)))
                for t, p, o, e, r in self.db.execute(
                    "SELECT topic, partition, next_offset, epoch, last_record FROM read_positions")}

    def epoch(self, topic: str, partition: int) -> int:
        """The log epoch reading this partition is in (0 until a restart of its log was seen)."""
        row = self.db.execute("SELECT epoch FROM read_positions WHERE topic=? AND partition=?",
                              (topic, partition)).fetchone()
        return row[0] if row else 0

    def start_epoch(self, topic: str, partition: int) -> int:
        """The partition's log restarted: begin its next epoch, reading from offset 0 (in one
        transaction, which also drops applied ranges of the old log). Returns the new epoch."""
        self.begin()
        try:
            epoch = self.epoch(topic, partition) + 1
            self.db.execute("DELETE FROM applied_ranges WHERE topic=? AND partition=?", (topic, partition))
            self.db.execute("INSERT OR REPLACE INTO read_positions (topic, partition, next_offset, epoch, last_record) "
                            "VALUES (?,?,0,?,NULL)", (topic, partition, epoch))
            self.commit()
        except BaseException:
            self.rollback()
            raise
        return epoch

    def start_new_epochs(self) -> dict[tuple[str, int], int]:
        """Every partition something was read from in its current epoch begins the next one (a new
        broker with an empty log was started); returns the new epochs."""
        return {key: self.start_epoch(*key) for key, position in self.positions().items()
                if position.furthest_offset > 0}

    def _record_range(self, topic: str, partition: int, start: int, stop: int, last_record: str | None) -> None:
        # Batches of one partition may commit out of order, and a runner replaying from a checkpoint
        # may cut other batch boundaries, so the position moves over every applied range that starts
        # at or before it and ends after it (a gap stops it).
        self.db.execute(
            "INSERT INTO applied_ranges VALUES (?,?,?,?,?) ON CONFLICT(topic, partition, start_offset) DO UPDATE "
            "SET next_offset=excluded.next_offset, last_record=excluded.last_record "
            "WHERE excluded.next_offset > applied_ranges.next_offset", (topic, partition, start, stop, last_record))
        row = self.db.execute("SELECT next_offset, last_record FROM read_positions WHERE topic=? AND partition=?",
                              (topic, partition)).fetchone()
        position, last = row or (0, None)
        for begin, end, record in self.db.execute(
                "SELECT start_offset, next_offset, last_record FROM applied_ranges WHERE topic=? AND partition=? "
                "ORDER BY start_offset", (topic, partition)).fetchall():
            if begin <= position < end:
                position, last = end, record
        self.db.execute(
            "DELETE FROM applied_ranges WHERE topic=? AND partition=? AND next_offset<=?", (topic, partition, position)
        )
        self.db.execute(
            "INSERT INTO read_positions (topic, partition, next_offset, last_record) VALUES (?,?,?,?) "
            "ON CONFLICT(topic, partition) DO UPDATE SET next_offset=excluded.next_offset, "
            "last_record=excluded.last_record", (topic, partition, position, last))

    # -- applying a batch -----------------------------------------------------------------
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def _rows_in(self, table: str, key: str, ids: Iterable[str]) -> Iterator[tuple]:
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            yield from self.db.execute(f"SELECT * FROM {table} WHERE {key} IN ({marks})", chunk)

    def _item_index(self, item_ids: set[str]) -> dict[str, int]:
        """Dense integer ids of items, assigned on first sight (inside the caller's transaction)."""
        index = {row[0]: row[1] for row in self._rows_in("item_index", "item_id", item_ids)}
        missing = sorted(item_ids - index.keys())
        if missing:
            start = self.db.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM item_index").fetchone()[0]
            new = {item: start + k for k, item in enumerate(missing)}
            self.db.executemany("INSERT INTO item_index VALUES (?,?)", new.items())
            index.update(new)
        return index

    def load_users(self, user_ids: Iterable[str]) -> dict[str, UserHistory]:
        return {
            uid: UserHistory(uid, json.loads(items), json.loads(rewards), json.loads(times), count, last)
            for uid, items, rewards, times, count, last in self._rows_in("user_history", "user_id", user_ids)
        }

    def load_contexts(self, user_ids: Iterable[str]) -> dict[str, UserContext]:
        return {uid: UserContext(uid, {k: (v, t) for k, (v, t) in json.loads(context).items()}, last, written)
                for uid, context, last, written in self._rows_in("user_context", "user_id", user_ids)}

    def contexts_with(self, names: set[str], chunk: int = 5000) -> Iterator[list[UserContext]]:
        """Every user context holding a value of one of `names`, in chunks (by user id)."""
        after = ""
        while True:
            rows = self.db.execute("SELECT * FROM user_context WHERE user_id > ? ORDER BY user_id LIMIT ?",
                                   (after, chunk)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            found = [UserContext(uid, {k: (v, t) for k, (v, t) in json.loads(context).items()}, last, written)
                     for uid, context, last, written in rows]
            found = [c for c in found if names & c.values.keys()]
            if found:
                yield found

    def filled_context_features(self) -> set[str]:
        """Registered context features whose stored values were pushed to Feast (the backfill)."""
        return {row[0] for row in self.db.execute("SELECT name FROM context_features_filled")}

    def mark_context_features_filled(self, names: Iterable[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO context_features_filled VALUES (?)", ((n,) for n in names))

    def _save_contexts(self, contexts: list[UserContext]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO user_context VALUES (?,?,?,?)",
                            ((c.user_id, json.dumps(c.values, sort_keys=True), c.last_event_time, c.written_us)
                             for c in contexts))

    def restate_contexts(self, contexts: list[UserContext]) -> list[UserContext]:
        """The same values with a timestamp one microsecond after each user's newest row (saved)."""
        restated = [restate_context(c) for c in contexts]
        self._save_contexts(restated)
        return restated

    def load_items(self, item_ids: Iterable[str]) -> dict[str, ItemStats]:
        return {row[0]: ItemStats(*row) for row in self._rows_in("item_stats", "item_id", item_ids)}

    def load_metadata(self, item_ids: Iterable[str]) -> dict[str, ItemMetadata]:
        return {
            iid: ItemMetadata(iid, title, json.loads(tags), published, description, updated)
            for iid, title, tags, published, description, updated in self._rows_in("item_metadata", "item_id", item_ids)
        }

    def _seen(self, events: list[EngagementEvent]) -> dict[str, dict[str, int]]:
        """Per user, which of these events' ids it has seen within the retention (id -> event time)."""
        seen: dict[str, dict[str, int]] = defaultdict(dict)
        pairs = sorted({(e.user_id, e.event_id) for e in events})
        for i in range(0, len(pairs), _CHUNK // 2):
            chunk = pairs[i:i + _CHUNK // 2]
            marks = ",".join("(?,?)" for _ in chunk)
            for user, event_id, at in self.db.execute(
                    f"SELECT user_id, event_id, event_time FROM seen_event_ids WHERE (user_id, event_id) IN "
                    f"(VALUES {marks})", [v for pair in chunk for v in pair]):
                seen[user][event_id] = at
        if self._legacy_seen:
            legacy = {row[0] for row in self._rows_in("seen_events", "event_id", {e.event_id for e in events})}
            for event in events:
                if event.event_id in legacy:
                    seen[event.user_id].setdefault(event.event_id, 2**62)  # never below a retention horizon
        return seen

    def apply_events(self, events: list[EngagementEvent]) -> BatchChanges:
        """Fold the events into their users' state (ingest/folds.py: de-duplication, history,
        context, pairs), then merge the new events into item stats and co-occurrence counts."""
        if self.folding is None:
            raise ValueError("this state store was opened without fold settings; it can only be read")
        by_user: dict[str, list[EngagementEvent]] = defaultdict(list)
        for event in events:
            by_user[event.user_id].append(event)
        users = self.load_users(by_user)
        contexts = self.load_contexts(by_user)
        seen = self._seen(events)
        folds = {uid: fold_user(UserState(users.get(uid) or UserHistory(uid, [], [], [], 0, 0), contexts.get(uid),
                                          seen.get(uid, {})), user_events, self.folding)
                 for uid, user_events in by_user.items()}
        changed = [f for f in folds.values() if f.new_events]
        new = sorted(((e, r, t) for f in changed for e, r, t in zip(f.new_events, f.rewards, f.times)),
                     key=lambda row: (row[0].event_time, row[0].item_id, row[0].event_id))
        new_events, rewards, times = [r[0] for r in new], [r[1] for r in new], [r[2] for r in new]
        self.db.executemany(
            "INSERT OR REPLACE INTO seen_event_ids VALUES (?,?,?)",
            ((f.state.history.user_id, i, t) for f in changed for i, t in f.seen_added.items()))
        self.db.executemany("DELETE FROM seen_event_ids WHERE user_id=? AND event_time<?",
                            ((f.state.history.user_id, f.retain_from) for f in changed))
        histories = [f.state.history for f in changed]
        self.db.executemany(
            "INSERT OR REPLACE INTO user_history VALUES (?,?,?,?,?,?)",
            ((u.user_id, json.dumps(u.item_ids), json.dumps(u.rewards), json.dumps(u.times), u.event_count,
              u.last_event_time) for u in histories),
        )
        parts = item_contributions(new_events, rewards, times)
        items = merge_into(self.load_items(parts), parts)
        self.db.executemany(
            "INSERT OR REPLACE INTO item_stats VALUES (?,?,?,?,?,?)",
            ((s.item_id, s.impressions, s.clicks, s.event_count, s.reward_sum, s.last_event_time) for s in items.values()),
        )
        pairs: Counter[tuple[str, str]] = Counter()
        for fold in changed:
            pairs.update(fold.pairs)
        index = self._item_index({item for pair in pairs for item in pair})
        # Integer keys: the pair table takes most of the writes, and integer B-tree keys are cheaper.
        self.db.executemany(
            "INSERT INTO cooccurrence VALUES (?,?,?) ON CONFLICT(item_a, item_b) DO UPDATE SET count = count + excluded.count",
            ((index[a], index[b], n) for (a, b), n in pairs.items()),
        )
        contexts_changed = [f.state.context for f in changed if f.context_changed]
        self._save_contexts(contexts_changed)
        duplicates = sum(f.duplicates for f in folds.values())
        expired = [e for f in folds.values() for e in f.expired]
        self._bump("events_applied", len(new_events))
        self._bump("events_duplicate", duplicates)
        self._bump("events_expired", len(expired))
        return BatchChanges(new_events, rewards, duplicates, expired, histories, list(items.values()), [],
                            contexts_changed)

    def apply_items(self, upserts: list[ItemUpsert], updated_at: list[int]) -> list[ItemMetadata]:
        """Item upserts replace the item's metadata; the last upsert of a batch wins. `updated_at`:
        unix seconds of each upsert (its record's Kafka timestamp)."""
        rows = item_metadata(upserts, updated_at)
        self.db.executemany(
            "INSERT OR REPLACE INTO item_metadata VALUES (?,?,?,?,?,?)",
            ((m.item_id, m.title, json.dumps(m.tags), m.published_at, m.description, m.updated_at) for m in rows),
        )
        self._bump("items_upserted", len(upserts))
        return rows

    def record_batch(self, topic: str, partition: int, start: int, stop: int, rejected: int, epoch: int = 0,
                     last_record: str | None = None) -> None:
        """Record that offsets [start, stop) of the partition's log epoch `epoch` were applied
        (`last_record`: the fingerprint of the record at stop - 1)."""
        current = self.epoch(topic, partition)
        if epoch != current:
            raise EpochMismatchError(
                f"A batch of {topic}[{partition}] read in log epoch {epoch} reached a state store in epoch {current}; "
                "was the broker restarted under a running pipeline? Restart the pipeline.")
        self._record_range(topic, partition, start, stop, last_record)
        self._bump("records_rejected", rejected)
        self.db.execute("INSERT OR REPLACE INTO last_commit VALUES (0, ?)", (time.time(),))

    # -- publication bookkeeping ----------------------------------------------------------
    def add_pending(self, batch_id: str, users: list[str], items: list[str], metadata_items: list[str]) -> None:
        self.db.execute("INSERT OR REPLACE INTO pending_publish VALUES (?,?,?,?)",
                        (batch_id, json.dumps(users), json.dumps(items), json.dumps(metadata_items)))

    def pending(self) -> list[tuple[str, list[str], list[str], list[str]]]:
        return [(b, json.loads(u), json.loads(i), json.loads(m))
                for b, u, i, m in self.db.execute("SELECT * FROM pending_publish ORDER BY batch_id")]

    def clear_pending(self, batch_id: str) -> None:
        self.db.execute("DELETE FROM pending_publish WHERE batch_id=?", (batch_id,))

    # -- counters and reads for tools and tests ---------------------------------------------
    def _bump(self, name: str, n: int) -> None:
        if n:
            self.db.execute(
                "INSERT INTO counters VALUES (?,?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, value FROM counters"))

    def last_commit_time(self) -> float | None:
        """Unix time at which the newest batch was recorded (None before the first)."""
        row = self.db.execute("SELECT unix_time FROM last_commit").fetchone()
        return row[0] if row else None

    def catalogue_item_ids(self) -> list[str]:
        """Every item an upsert has described (the item_metadata the pipeline pushes to Feast)."""
        return [row[0] for row in self.db.execute("SELECT item_id FROM item_metadata ORDER BY item_id")]

    def cooccurrence(self, min_count: int = 1) -> list[tuple[str, str, int]]:
        """Item pairs seen within `cooccurrence_window` of each other in a user's history."""
        return list(self.db.execute(
            "SELECT a.item_id, b.item_id, c.count FROM cooccurrence c JOIN item_index a ON a.idx = c.item_a "
            "JOIN item_index b ON b.idx = c.item_b WHERE c.count >= ?", (min_count,)))
