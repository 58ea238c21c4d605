"""What ``supervise`` decides each poll: which shard groups have no live owner or no live
standby, and which of them to start a run for. Plain functions over the store and a
clock; the flow (``flows.supervise``) starts the runs with Prefect's ``run_deployment``."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from state.model import ShardScope
from state.postgres_store import PostgresStore

GROUP_DEPLOYMENT = "profile-relay-stream/stream-group"  # prefect.yaml's stream-group
START_GRACE_SECONDS = 45.0  # a started run has this long to take its lease (worker pickup)
# a standby that was up and is gone (it took over, or left the machine of its group's
# active run) is replaced, but no sooner than this after the last start
STANDBY_RETRY_SECONDS = 10.0
# the workers of a pool poll on a fixed period (PREFECT_WORKER_QUERY_SECONDS), and so does
# supervise: starts at a fixed phase go to the same worker every time
STANDBY_JITTER_SECONDS = 3.0


def _lease_group(dataflow: str, index: int, groups: int) -> int:
    return ShardScope.of_group(dataflow, index, groups, "").lease_group


def ownerless(store: PostgresStore, dataflows: Sequence[str], groups: int) -> list[int]:
    """The groups some dataflow's lease of which is not live: their run is gone (killed,
    partitioned, ended) or not started yet."""
    return [i for i in range(groups) if not all(
        store.lease_live(n, _lease_group(n, i, groups)) for n in dataflows)]


def standing_by(store: PostgresStore, dataflows: Sequence[str], groups: int) -> set[int]:
    """The groups with a live standby for every dataflow: it takes over their leases the
    moment they lapse."""
    return {i for i in range(groups) if all(
        store.standby_owner(n, _lease_group(n, i, groups)) for n in dataflows)}


@dataclass
class Starts:
    """The runs started per key (a group, or a group's standby), so a run not yet up is
    given its grace, and one that was up and then went is replaced (after ``retry``)."""

    grace: float = START_GRACE_SECONDS
    retry: float = 0.0
    started_at: dict[Hashable, float] = field(default_factory=dict)
    up_since_start: set[Hashable] = field(default_factory=set)

    def due(self, missing: Sequence[Hashable], every: Iterable[Hashable],
            now: float) -> list[Hashable]:
        """The keys of ``missing`` to start a run for now."""
        self.up_since_start.update(set(every) - set(missing))
        return [k for k in missing if k not in self.started_at
                or now - self.started_at[k] >= self.grace
                or (k in self.up_since_start and now - self.started_at[k] >= self.retry)]

    def started(self, key: Hashable, now: float) -> None:
        self.started_at[key] = now
        self.up_since_start.discard(key)
