"""Users' histories from the Feast online store (the `user_history` view the pipeline keeps fresh)."""

from __future__ import annotations

from typing import Any, Sequence


class OnlineHistories:
    """(item ids, rewards) per user, oldest first; an unknown user has an empty history."""

    def __init__(self, store: Any) -> None:
        self.store = store  # features.FeatureStoreClient

    def __call__(self, user_ids: Sequence[str]) -> list[tuple[list[str], list[float]]]:
        if not user_ids:
            return []
        frame = self.store.read_online("user_history", list(user_ids))
        out = []
        for items, rewards in zip(frame["history_item_ids"], frame["history_rewards"]):
            items = list(items) if items is not None else []
            rewards = list(rewards) if rewards is not None else [1.0] * len(items)
            out.append(([str(i) for i in items], [float(r) for r in rewards]))
        return out
