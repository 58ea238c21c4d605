"""What ``supervise`` decides each poll: which shard groups have no live owner, and which of
them to start a run for. Plain functions over the store and a clock; the flow
(``flows.supervise``) starts the runs with Prefect's ``run_deployment``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from state.model import ShardScope
from state.postgres_store import PostgresStore

GROUP_DEPLOYMENT = "profile-relay-stream/stream-group"  # prefect.yaml's stream-group
START_GRACE_SECONDS = 45.0  # a started run has this long to take its lease (worker pickup)


def ownerless(store: PostgresStore, dataflows: Sequence[str], groups: int) -> list[int]:
    """The groups some dataflow's lease of which is not live: their run is gone (killed,
    partitioned, ended) or not started yet."""
    return [i for i in range(groups) if not all(
        store.lease_live(n, ShardScope.of_group(n, i, groups, "").lease_group)
        for n in dataflows)]


@dataclass
class Starts:
    """The runs started per group, so a run not yet up is given its grace, and a group
    whose run was up and then lapsed is replaced at once."""

    started_at: dict[int, float] = field(default_factory=dict)
    up_since_start: set[int] = field(default_factory=set)

    def due(self, missing: Sequence[int], groups: int, now: float) -> list[int]:
        """The groups to start a run for now."""
        for i in set(range(groups)) - set(missing):
            self.up_since_start.add(i)
        return [i for i in missing if i not in self.started_at or i in self.up_since_start
                or now - self.started_at[i] >= START_GRACE_SECONDS]

    def started(self, group: int, now: float) -> None:
        self.started_at[group] = now
        self.up_since_start.discard(group)
