"""FoldItems: per-item aggregates in runner-owned keyed state (key = item_id).

Each source batch's new events become per-item contributions (ingest/folds.py), merged into the
item's running ItemStats in Beam state. As the key's owner the fold pushes the items' stats
online at the end of each bundle (ingest/transforms/stores.py); the absolute stats of every item
the batch touched are gathered back under the batch id (ingest/transforms/batches.py) for the
offline store. Item metadata has its owner here too: the last upsert of an item by log position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from ingest.folds import ItemMetadata, ItemStats, item_contributions, item_metadata, merge_item_stats
from ingest.parse import ParsedBatch
from ingest.transforms.batches import GatherParts, UserBatch
from ingest.transforms.stores import OnlineWrites, StoreSettings


@dataclass
class ItemPart:
    """One item's stats for one source batch: its contribution going in, its absolute stats coming out."""

    batch_id: str
    items_in_batch: int
    stats: ItemStats


def item_parts(batch: UserBatch) -> Iterator[tuple[str, ItemPart]]:
    parts = item_contributions(batch.new_events, batch.rewards, batch.times)
    for item_id, stats in parts.items():
        yield item_id, ItemPart(batch.batch_id, len(parts), stats)


class _OnlineOwner(beam.DoFn):
    """A keyed DoFn that pushes its keys' latest values online when the bundle ends."""

    def __init__(self, stores: StoreSettings | None = None) -> None:
        self.stores = stores

    def setup(self) -> None:
        self.features = self.stores.open_features() if self.stores else None
        self.online = OnlineWrites()

    def finish_bundle(self) -> None:
        self.online.flush(self.features)


class FoldItemState(_OnlineOwner):
    """(item_id, ItemPart contribution) -> (batch_id, ItemPart absolute); item_stats pushed online."""

    ITEM = ReadModifyWriteStateSpec("item", PickleCoder())

    def process(self, element: tuple[str, ItemPart], item: Any = beam.DoFn.StateParam(ITEM)
                ) -> Iterator[tuple[str, ItemPart]]:
        item_id, part = element
        current = item.read()
        stats = merge_item_stats(current, part.stats) if current is not None else part.stats
        item.write(stats)
        self.online.items[item_id] = stats
        yield part.batch_id, ItemPart(part.batch_id, part.items_in_batch, stats)


class _ByItem(beam.PTransform):
    """Batches cut into one element per item (`split`), folded by `owner`, the items' keyed owner."""

    def __init__(self, stores: StoreSettings | None = None) -> None:
        super().__init__()
        self.stores = stores

    def by_item(self, batches: beam.PCollection, split: Any, owner: type[_OnlineOwner]) -> beam.PCollection:
        return batches | "ByItem" >> beam.FlatMap(split) | "Fold" >> beam.ParDo(owner(self.stores))


class FoldItems(_ByItem):
    """PCollection[UserBatch] -> PCollection[(batch_id, [ItemPart])], the absolute stats per batch."""

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return self.by_item(batches, item_parts, FoldItemState) | "Gather" >> beam.ParDo(GatherParts("items_in_batch"))


@dataclass
class PositionedMetadata:
    """An item's metadata from one upsert and where that upsert sits in the log (epoch, offset)."""

    position: tuple[int, int]
    metadata: ItemMetadata


def metadata_by_item(batch: ParsedBatch) -> Iterator[tuple[str, PositionedMetadata]]:
    """(item_id, its last upsert in the batch); updated_at is the record's Kafka timestamp."""
    upserts, offsets, upserted_at = batch.upserts()
    offset_of = {u.item_id: o for u, o in zip(upserts, offsets)}  # the last upsert of each item
    for metadata in item_metadata(upserts, upserted_at):
        yield metadata.item_id, PositionedMetadata((batch.epoch, offset_of[metadata.item_id]), metadata)


class KeepLatestMetadata(_OnlineOwner):
    """(item_id, PositionedMetadata) -> item_metadata online, unless a later upsert of the item
    (by log position) was applied already: batches of the items topic may arrive in any order."""

    APPLIED = ReadModifyWriteStateSpec("applied", PickleCoder())

    def process(self, element: tuple[str, PositionedMetadata], applied: Any = beam.DoFn.StateParam(APPLIED)
                ) -> Iterator[ItemMetadata]:
        item_id, upsert = element
        last = applied.read()
        if last is None or upsert.position > last:
            applied.write(upsert.position)
            self.online.metadata[item_id] = upsert.metadata
            yield upsert.metadata


class KeepItemMetadata(_ByItem):
    """PCollection[ParsedBatch of the items topic] -> item_metadata online, the last upsert winning."""

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return self.by_item(batches, metadata_by_item, KeepLatestMetadata)
