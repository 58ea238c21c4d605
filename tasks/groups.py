"""A stream run's shard groups: taking their leases, keeping them renewed, the rate share.

A run given ``group`` of ``groups`` owns that range of every dataflow's shards (one lease
per dataflow, in PostgreSQL). The leases are renewed in the background every third of
their TTL, whatever the pipeline is doing, so a long pass never lets them lapse; a
renewal that fails (taken over, or the store unreachable for a whole TTL) ends the run.

A standby run (``supervise`` keeps one per group) registers itself as the group's standby
and polls the lease, taking it within a poll of its lapse: a killed or frozen run's
shards move in the TTL plus a poll, with no run to start. It keeps off the machine of
the group's active run while another worker is online.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from state import Store
from state.leases import machine, machine_of
from state.model import LeaseLost, ShardScope
from state.postgres_store import PostgresStore

GROUP_TTL_SECONDS = 6.0  # a killed group's shards are taken over this long after
TAKE_POLL_SECONDS = 0.5  # a standby takes a lapsed lease within this
PLACEMENT_SECONDS = 15.0  # how often a standby beside its active run asks for another worker
# the lease is trusted for this part of its TTL after the renewal started: the rest covers
# the renewal's own time and the distance between this host's clock rate and the server's
TRUST = 0.8


class GroupsNeedPostgres(ValueError):
    pass


@dataclass
class Groups:
    """The leases one run holds, and why it must stop if it must."""

    store: PostgresStore
    index: int
    count: int
    scopes: dict[str, ShardScope]
    ttl_ms: int = int(GROUP_TTL_SECONDS * 1000)
    lost: str | None = None
    views: dict[str, Store] = field(default_factory=dict)

    @classmethod
    def plan(cls, store: Store, names: Sequence[str], index: int, count: int,
             owner: str) -> Groups:
        if not isinstance(store, PostgresStore):
            raise GroupsNeedPostgres(
                "shard groups (--group/--groups) need PostgreSQL state (state: postgresql://"
                "...): the embedded SQLite store is one machine's, where one run streams all")
        scopes = {n: ShardScope.of_group(n, index, count, owner) for n in names}
        return cls(store, index, count, scopes,
                   views={n: store.scoped(s) for n, s in scopes.items()})

    @property
    def leads(self) -> bool:
        return self.index == 0

    def view(self, dataflow: str) -> Store:
        return self.views[dataflow]

    async def take(self, wait_seconds: float) -> bool:
        """Every lease, waiting up to ``wait_seconds`` for live owners to hand over (the
        previous run of a schedule, or a layout of another size); all or none."""
        deadline = time.monotonic() + wait_seconds
        while True:
            if await asyncio.to_thread(self._renew_all):
                return True
            if time.monotonic() >= deadline:
                self.release()
                return False
            await asyncio.sleep(TAKE_POLL_SECONDS)

    async def stand_by(self, until: float,
                       elsewhere: Callable[[], Awaitable[bool]]) -> str | None:
        """Wait as the group's standby until ``until`` (monotonic); take every lease as
        soon as they lapse (None), or end with the reason: the run's time is up,
        ``supervise`` changed the layout, another standby has the group, or this run is on
        the machine of the group's active run while ``elsewhere()`` says another worker
        is online (``supervise`` then starts another standby, which may land there)."""
        here, placed_at = machine(), 0.0
        why: str | None = "its run time ended before the group's lease lapsed"
        try:
            while time.monotonic() < until:
                if why_not := await asyncio.to_thread(self._standing_by):
                    why = why_not
                    break
                if await asyncio.to_thread(self._renew_all):
                    why = None
                    break
                if time.monotonic() - placed_at >= PLACEMENT_SECONDS and \
                        await asyncio.to_thread(self._beside_active, here):
                    placed_at = time.monotonic()
                    if await elsewhere():
                        why = (f"on the machine of the group's active run ({here}) while "
                               "another worker is online")
                        break
                await asyncio.sleep(TAKE_POLL_SECONDS)
        finally:
            for scope in self.scopes.values():
                self.store.drop_standby(scope)
        if why is not None:
            self.release()  # the leases of some dataflows, taken while others were held
        return why

    def _standing_by(self) -> str | None:
        if handover := self.handover():
            return handover
        for scope in self.scopes.values():
            if not self.store.stand_by(scope, self.ttl_ms):
                return f"{scope.name} has another standby"
        return None

    def _beside_active(self, here: str) -> bool:
        owners = (self.store.lease_owner(s.dataflow, s.lease_group) for s in self.scopes.values())
        return any(owner is not None and machine_of(owner) == here for owner in owners)

    def _renew_all(self) -> bool:
        started = time.monotonic()
        held = [self.store.take_group(s, self.ttl_ms) for s in self.scopes.values()]
        if not all(held):
            return False
        trusted = started + self.ttl_ms / 1000 * TRUST
        for name, scope in self.scopes.items():
            scope.valid_until = trusted
            scope.share = 1.0 / max(1, self.store.live_groups(name))
        return True

    def renew(self) -> bool:
        """Renew every lease; False (and ``lost`` says why) once one is gone."""
        try:
            if self._renew_all():
                return True
            self.lost = "another run holds the shards now"
        except LeaseLost as exc:
            self.lost = str(exc)
        except Exception as exc:  # the store unreachable: retried until the lease is past
            if all(time.monotonic() < s.valid_until for s in self.scopes.values()):
                return True
            self.lost = f"could not renew the lease in time ({type(exc).__name__})"
        for scope in self.scopes.values():
            scope.valid_until = 0.0  # send nothing more
        return False

    async def keep_renewed(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        """Renew every third of the TTL until a renewal fails or the task is cancelled."""
        while await asyncio.to_thread(self.renew):
            await asyncio.sleep(self.ttl_ms / 3000)
        logger.warning("group %d of %d: %s; this run stops", self.index, self.count, self.lost)

    def handover(self) -> str | None:
        """Why the run should hand over now: ``supervise`` runs another number of groups."""
        for name in self.scopes:
            wanted = self.store.layout(name)
            if wanted is not None and wanted != self.count:
                return f"{name} now runs in {wanted} group(s), not {self.count}"
        return None

    def release(self) -> None:
        for scope in self.scopes.values():
            self.store.release_lease(scope.dataflow, scope.lease_group, scope.owner)


def lease_lost(exc: BaseException) -> LeaseLost | None:
    """The LeaseLost inside ``exc`` (a drain's task group wraps it), if any."""
    if isinstance(exc, LeaseLost):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if found := lease_lost(inner):
                return found
    cause = exc.__cause__ or exc.__context__
    return lease_lost(cause) if cause is not None and cause is not exc else None
