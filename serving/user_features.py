"""Users' histories and context from the Feast online store: the `user_history` view, and the
`user_context` view of registered context features once there is one (both kept fresh by the
pipeline), read in one lookup per batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from features.repo import USER_CONTEXT, USER_HISTORY


@dataclass(frozen=True)
class UserFeatures:
    """A user's stored history (item ids and rewards, oldest first) and latest context values."""

    item_ids: tuple[str, ...] = ()
    rewards: tuple[float, ...] = ()
    context: dict[str, Any] = field(default_factory=dict)


class OnlineUserFeatures:
    """UserFeatures per user id; an unknown user has an empty history and no context."""

    def __init__(self, store: Any) -> None:
        self.store = store  # features.FeatureStoreClient

    def __call__(self, user_ids: Sequence[str]) -> list[UserFeatures]:
        if not user_ids:
            return []
        has_context = USER_CONTEXT in self.store.views()
        read = (USER_HISTORY, USER_CONTEXT) if has_context else (USER_HISTORY,)
        frame = self.store.read_online_views(read, list(user_ids))
        names = self.store.columns(USER_CONTEXT) if has_context else []
        out = []
        for i, (items, rewards) in enumerate(zip(frame["history_item_ids"], frame["history_rewards"])):
            items = [str(item) for item in items] if items is not None else []
            rewards = [float(r) for r in rewards] if rewards is not None else [1.0] * len(items)
            context = {name: frame[name].iat[i] for name in names if frame[name].iat[i] is not None}
            out.append(UserFeatures(tuple(items), tuple(rewards), context))
        return out
