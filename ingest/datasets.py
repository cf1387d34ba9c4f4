"""Public recommendation data sets in one common form, and their replay as contract events.

Every loader returns a `Dataset`: interactions (user_id, item_id, timestamp, rating) in event-time
order and items (item_id, title, tags, published_at, description). `to_item_upserts` and
`to_events` turn one into the ItemUpsert / EngagementEvent records of the event contract.

Choices made per data set:
- movielens-100k (RecBole atomic files from the pinned recbole wheel): RecBole writes the one
  unknown movie (item 267) as title and year "unkonwn"; it gets an empty title and no date. The
  genre "unknown" is a placeholder, not a genre, and is not kept as a tag.
- movietweetings-100k: "Title (Year)" is split into title and published_at (1 January of the
  year, UTC); movie ids stay the zero-padded IMDb ids of the file.
- amazon-beauty: the only text is 5-8 word-piece keywords per item, each a separate keyword (a
  piece without the '▁' word-start marker is a sub-word that survived keyword extraction, not
  the continuation of the piece before it: gluing "▁consolid|ren" would invent "consolidren").
  So each piece becomes one word with the marker removed; the title is those words joined by
  spaces and the tags are the distinct words. There are no timestamps: event times are
  synthesised as 2014-01-01 UTC + position in the user's sequence (days) + the user's line
  number (seconds), which keeps each user's order and interleaves users; has_real_time=False.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from ingest.events import EngagementEvent, EventType, ItemUpsert, stable_event_id

log = logging.getLogger(__name__)

MOVIELENS_100K = "movielens-100k"
MOVIETWEETINGS_100K = "movietweetings-100k"
AMAZON_BEAUTY = "amazon-beauty"

BEAUTY_TIME_BASE = datetime(2014, 1, 1, tzinfo=timezone.utc).timestamp()
_DAY_SECONDS = 86_400.0
_RECBOLE_UNKNOWN = "unkonwn"  # sic: RecBole's spelling for ML-100K's unknown movie
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_WORD_START = "\u2581"  # '▁', the SentencePiece word-start marker


class DatasetError(Exception):
    """A data set's files are missing or do not have the expected layout."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """One data set in the common form.

    interactions: user_id (str), item_id (str), timestamp (float64 unix seconds), rating (float64,
    NaN without ratings); sorted by (timestamp, user_id), ties kept in file order.
    items: item_id (str), title (str), tags (list[str]), published_at (UTC timestamp or NaT),
    description (str or None); every interacted item has a row.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    rating_scale: float | None
    has_real_time: bool


def load_movielens_100k(path: str | os.PathLike[str]) -> Dataset:
    """MovieLens-100K from the RecBole atomic files (ml-100k.inter, ml-100k.item) in path; ratings 1-5."""
    directory = Path(path)
    hint = "point at the ml-100k folder extracted from the recbole asset"
    inter = _read_atomic(_require(directory, "ml-100k.inter", hint))
    raw_items = _read_atomic(_require(directory, "ml-100k.item", hint))
    interactions = _interactions(inter["user_id"], inter["item_id"], inter["timestamp"], inter["rating"])
    titles = raw_items["movie_title"].where(raw_items["movie_title"] != _RECBOLE_UNKNOWN, "")
    tags = [[genre for genre in genres.split() if genre != "unknown"] for genres in raw_items["class"]]
    items = _items(raw_items["item_id"], titles, tags, _year_start(raw_items["release_year"]))
    return _dataset(MOVIELENS_100K, interactions, items, rating_scale=5.0, has_real_time=True)


def load_movietweetings(path: str | os.PathLike[str]) -> Dataset:
    """MovieTweetings (ratings.dat, movies.dat in path, '::'-separated); ratings 0-10, real tweet times."""
    directory = Path(path)
    hint = f"pass --data-dir with the folder that holds {MOVIETWEETINGS_100K}/"
    ratings_file = _require(directory, "ratings.dat", hint)
    movies_file = _require(directory, "movies.dat", hint)
    rows = _split_lines(ratings_file, "user::movie::rating::time", lambda line: line.split("::"), fields=4)
    users, movies, ratings, times = zip(*rows) if rows else ((), (), (), ())
    interactions = _interactions(users, movies, times, ratings)
    movie_rows = _split_lines(movies_file, "id::Title (Year)::Genres", _split_movie_line, fields=3)
    titles, years = [], []
    for _, title_year, _ in movie_rows:
        match = _TITLE_YEAR.match(title_year)
        titles.append(match["title"] if match else title_year.strip())
        years.append(match["year"] if match else "")
    items = _items(
        [row[0] for row in movie_rows], titles, [[g for g in row[2].split("|") if g] for row in movie_rows],
        _year_start(pd.Series(years, dtype=object)),
    )
    return _dataset(MOVIETWEETINGS_100K, interactions, items, rating_scale=10.0, has_real_time=True)


def load_amazon_beauty(path: str | os.PathLike[str]) -> Dataset:
    """Amazon Beauty 5-core (user_sequence.txt, item_keywords.txt in path); clicks at synthesised times."""
    directory = Path(path)
    hint = f"pass --data-dir with the folder that holds {AMAZON_BEAUTY}/"
    sequences = _split_lines(
        _require(directory, "user_sequence.txt", hint), "user item item ...", str.split, fields=None,
    )
    users: list[str] = []
    items_seen: list[str] = []
    times: list[float] = []
    for line_number, (user, *sequence) in enumerate(sequences):
        users.extend([user] * len(sequence))
        items_seen.extend(sequence)
        times.extend(BEAUTY_TIME_BASE + position * _DAY_SECONDS + line_number for position in range(len(sequence)))
    interactions = _interactions(users, items_seen, times, np.full(len(users), np.nan))
    keyword_rows = _split_lines(
        _require(directory, "item_keywords.txt", hint), "item_id |piece|piece|...",
        lambda line: line.split(" ", 1), fields=2,
    )
    item_ids, titles, tags = [], [], []
    for item_id, pieces in keyword_rows:
        words = [piece.strip().lstrip(_WORD_START) for piece in pieces.split("|")]
        words = [word for word in words if word]
        item_ids.append(item_id)
        titles.append(" ".join(words))
        tags.append(list(dict.fromkeys(words)))
    items = _items(item_ids, titles, tags, _no_dates(len(item_ids)))
    return _dataset(AMAZON_BEAUTY, interactions, items, rating_scale=None, has_real_time=False)


def to_item_upserts(ds: Dataset) -> Iterator[ItemUpsert]:
    """One ItemUpsert per item, in the items table's order."""
    items = ds.items
    for item_id, title, tags, published_at, description in zip(
        items["item_id"], items["title"], items["tags"], items["published_at"], items["description"]
    ):
        yield ItemUpsert(
            item_id=item_id,
            title=title,
            description=description,
            tags=list(tags),
            published_at=None if pd.isna(published_at) else published_at.to_pydatetime(),
        )


def to_events(ds: Dataset) -> Iterator[EngagementEvent]:
    """The interactions as EngagementEvents in event-time order: ratings if the data set has them, else clicks."""
    event_type = EventType.CLICK if ds.rating_scale is None else EventType.RATING
    frame = ds.interactions
    for user_id, item_id, timestamp, rating in zip(
        frame["user_id"].tolist(), frame["item_id"].tolist(), frame["timestamp"].tolist(), frame["rating"].tolist()
    ):
        event_time = datetime.fromtimestamp(timestamp, tz=timezone.utc)
        yield EngagementEvent(
            event_id=stable_event_id(ds.name, user_id, item_id, event_type.value, event_time),
            user_id=user_id,
            item_id=item_id,
            event_type=event_type,
            event_time=event_time,
            rating=None if rating != rating else rating,  # NaN != NaN: no rating
            rating_scale=ds.rating_scale,
        )


def _require(directory: Path, filename: str, hint: str) -> Path:
    path = directory / filename
    if not path.is_file():
        raise DatasetError(f"Expected {filename} under {directory}; {hint}.")
    return path


def _split_movie_line(line: str) -> list[str]:
    """`id::Title (Year)::Genres`, split at the first and the last '::' so a title holding '::' survives."""
    movie_id, first, rest = line.partition("::")
    title, last, genres = rest.rpartition("::")
    return [movie_id, title, genres] if first and last else [line]


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab-separated, header cells like `user_id:token`; all cells as text."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, encoding="utf-8")
    return frame.rename(columns=lambda header: header.split(":", 1)[0])


def _split_lines(
    path: Path, layout: str, split: Callable[[str], list[str]], fields: int | None
) -> list[list[str]]:
    """Non-empty lines of a text file, split; DatasetError naming the line when one has the wrong field count."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            row = split(line)
            if (fields is not None and len(row) != fields) or (fields is None and len(row) < 2):
                raise DatasetError(f"{path}:{number} does not look like `{layout}`; is this the right file?")
            rows.append(row)
    return rows


def _year_start(years: pd.Series) -> pd.Series:
    """1 January (UTC) of each four-digit year; NaT where there is none."""
    return pd.to_datetime(years, format="%Y", errors="coerce", utc=True)


def _no_dates(count: int) -> pd.Series:
    return pd.Series(pd.NaT, index=range(count), dtype="datetime64[ns, UTC]")


def _interactions(users, items, timestamps, ratings) -> pd.DataFrame:
    frame = pd.DataFrame({
        "user_id": np.asarray(users, dtype=object),
        "item_id": np.asarray(items, dtype=object),
        "timestamp": np.asarray(timestamps, dtype=np.float64),
        "rating": np.asarray(ratings, dtype=np.float64),
    })
    return frame.sort_values(["timestamp", "user_id"], kind="stable", ignore_index=True)


def _items(item_ids, titles, tags, published_at: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": np.asarray(item_ids, dtype=object),
        "title": np.asarray(titles, dtype=object),
        "tags": pd.Series(list(tags), dtype=object).to_numpy(),
        "published_at": published_at.reset_index(drop=True),
        "description": np.full(len(item_ids), None, dtype=object),
    })


def _dataset(
    name: str, interactions: pd.DataFrame, items: pd.DataFrame, rating_scale: float | None, has_real_time: bool
) -> Dataset:
    """Assemble a Dataset, giving every interacted item without metadata an empty item row."""
    missing = pd.Index(interactions["item_id"].unique()).difference(items["item_id"])
    if len(missing):
        log.warning("%s: %d interacted items have no metadata; they get empty titles", name, len(missing))
        filler = _items(missing, [""] * len(missing), [[] for _ in missing], _no_dates(len(missing)))
        items = pd.concat([items, filler], ignore_index=True)
    return Dataset(name, interactions, items, rating_scale, has_real_time)
