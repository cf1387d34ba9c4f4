"""The data set loaders on the real files: counts, order, types, and the events they replay as."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ingest.datasets import (
    AMAZON_BEAUTY,
    BEAUTY_TIME_BASE,
    MOVIELENS_100K,
    MOVIETWEETINGS_100K,
    Dataset,
    load_movielens_100k,
    load_movietweetings,
    to_events,
    to_item_upserts,
)
from ingest.events import EventType
from ops.assets import asset_path
from ops.datasets import known_datasets, load_dataset
from ops.errors import PlumError

pytestmark = pytest.mark.unit

# name: (interactions, users, interacted items, item rows)
COUNTS = {
    MOVIELENS_100K: (100_000, 943, 1_682, 1_682),
    MOVIETWEETINGS_100K: (100_000, 16_554, 10_506, 10_506),
    AMAZON_BEAUTY: (198_502, 22_363, 12_101, 12_101),
}


@pytest.fixture(scope="module")
def loaded(data_dir: Path, asset_cache_dir: Path):
    """Load each real data set once per module, on first use."""
    cache: dict[str, Dataset] = {}

    def load(name: str) -> Dataset:
        if name not in cache:
            if name == MOVIELENS_100K:
                # Unit tests never download: the integration tier fetches the recbole asset.
                movielens = asset_path("recbole", asset_cache_dir)
                if movielens is None:
                    pytest.skip(f"recbole asset not in {asset_cache_dir}; fetch it with ops.assets.fetch_asset")
                cache[name] = load_movielens_100k(movielens)
            else:
                cache[name] = load_dataset(name, data_dir, asset_cache_dir)
        return cache[name]

    return load


@pytest.mark.parametrize("name", list(COUNTS))
def test_loaders_match_the_published_counts(loaded, name):
    ds = loaded(name)
    interactions, users, items, item_rows = COUNTS[name]
    assert ds.name == name
    assert len(ds.interactions) == interactions
    assert ds.interactions["user_id"].nunique() == users
    assert ds.interactions["item_id"].nunique() == items
    assert len(ds.items) == item_rows
    assert ds.items["item_id"].is_unique


@pytest.mark.parametrize("name", list(COUNTS))
def test_tables_have_the_common_types_and_event_time_order(loaded, name):
    ds = loaded(name)
    frame = ds.interactions
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert frame["timestamp"].dtype == np.float64 and frame["rating"].dtype == np.float64
    assert all(isinstance(value, str) for value in frame["user_id"].head(1000))
    assert all(isinstance(value, str) for value in frame["item_id"].head(1000))
    order = frame.sort_values(["timestamp", "user_id"], kind="stable", ignore_index=True)
    pd.testing.assert_frame_equal(frame, order)
    items = ds.items
    assert list(items.columns) == ["item_id", "title", "tags", "published_at", "description"]
    assert str(items["published_at"].dtype) == "datetime64[ns, UTC]"
    assert all(isinstance(title, str) for title in items["title"])
    assert all(isinstance(tags, list) and all(isinstance(t, str) for t in tags) for tags in items["tags"])
    assert set(frame["item_id"]) <= set(items["item_id"])


def test_rating_scales_and_real_times(loaded):
    movielens, tweetings, beauty = loaded(MOVIELENS_100K), loaded(MOVIETWEETINGS_100K), loaded(AMAZON_BEAUTY)
    assert (movielens.rating_scale, tweetings.rating_scale, beauty.rating_scale) == (5.0, 10.0, None)
    assert movielens.interactions["rating"].between(1, 5).all()
    assert tweetings.interactions["rating"].between(0, 10).all()
    assert beauty.interactions["rating"].isna().all()
    assert movielens.has_real_time and tweetings.has_real_time and not beauty.has_real_time


def test_beauty_keeps_each_users_sequence_order(loaded, data_dir):
    frame = loaded(AMAZON_BEAUTY).interactions
    replayed = frame.groupby("user_id", sort=False)["item_id"].agg(list).to_dict()
    with (data_dir / AMAZON_BEAUTY / "user_sequence.txt").open() as handle:
        for user, *sequence in map(str.split, handle):
            assert replayed[user] == sequence
    first_day = frame[frame["timestamp"] < BEAUTY_TIME_BASE + 86_400]
    assert first_day["user_id"].nunique() == 22_363  # every user starts on day one: users interleave


def test_beauty_keyword_pieces_become_plain_words(loaded):
    items = loaded(AMAZON_BEAUTY).items.set_index("item_id")
    assert items.loc["B000P24EI2", "title"] == "loss brake fur consolid ren scalp profound"
    assert items.loc["B000P24EI2", "tags"] == ["loss", "brake", "fur", "consolid", "ren", "scalp", "profound"]
    assert not items["title"].str.contains("\u2581").any()
    assert items["published_at"].isna().all()


def test_movietweetings_titles_years_and_genres_are_split(loaded):
    items = loaded(MOVIETWEETINGS_100K).items.set_index("item_id")
    birth = items.loc["0004972"]
    assert birth["title"] == "The Birth of a Nation"
    assert birth["published_at"] == pd.Timestamp("1915-01-01", tz="UTC")
    assert birth["tags"] == ["Drama", "History", "Romance", "War"]
    assert items.loc["0021283", "tags"] == []  # one of the 66 movies without genres


def test_movielens_unknown_movie_has_empty_title_and_no_date(loaded):
    items = loaded(MOVIELENS_100K).items.set_index("item_id")
    assert items.loc["267", "title"] == ""
    assert pd.isna(items.loc["267", "published_at"])
    assert items.loc["1", "title"] == "Toy Story"
    assert items.loc["1", "tags"] == ["Animation", "Children's", "Comedy"]


@pytest.mark.parametrize("name, event_type", [
    (MOVIELENS_100K, EventType.RATING), (MOVIETWEETINGS_100K, EventType.RATING), (AMAZON_BEAUTY, EventType.CLICK),
])
def test_events_replay_in_time_order_with_stable_unique_ids(loaded, name, event_type):
    ds = loaded(name)
    ids, previous = [], None
    for event in to_events(ds):  # streamed: holding 200k events would time the garbage collector
        assert event.event_type is event_type
        assert event.rating_scale == ds.rating_scale
        assert (event.rating is None) == (ds.rating_scale is None)
        assert previous is None or previous <= event.event_time
        previous = event.event_time
        ids.append(event.event_id)
    assert len(ids) == len(ds.interactions) == len(set(ids))
    assert [event.event_id for event in itertools.islice(to_events(ds), 1000)] == ids[:1000]


@pytest.mark.parametrize("name", list(COUNTS))
def test_item_upserts_cover_every_item(loaded, name):
    ds = loaded(name)
    upserts = list(to_item_upserts(ds))
    assert [upsert.item_id for upsert in upserts] == list(ds.items["item_id"])


def test_rated_movie_missing_from_movies_dat_still_gets_an_item_row(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::0000001::7::1365029107\n2::0000002::9::1365029108\n")
    (tmp_path / "movies.dat").write_text("0000001::Odd: A Title :: With Colons (1999)::Drama|Comedy\n")
    ds = load_movietweetings(tmp_path)
    items = ds.items.set_index("item_id")
    assert items.loc["0000001", "title"] == "Odd: A Title :: With Colons"
    assert items.loc["0000002", "title"] == ""
    assert items.loc["0000002", "tags"] == []


def test_missing_file_is_a_plum_error_naming_file_and_folder(tmp_path):
    with pytest.raises(PlumError, match=r"Expected ratings\.dat under .*movietweetings-100k; pass --data-dir"):
        load_dataset(MOVIETWEETINGS_100K, tmp_path, tmp_path)


def test_unknown_data_set_name_lists_the_known_ones(tmp_path):
    with pytest.raises(PlumError, match="known data sets: movielens-100k, movietweetings-100k, amazon-beauty"):
        load_dataset("netflix-prize", tmp_path, tmp_path)
    assert known_datasets() == (MOVIELENS_100K, MOVIETWEETINGS_100K, AMAZON_BEAUTY)
