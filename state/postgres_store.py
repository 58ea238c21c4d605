"""PostgresStore: the Store on PostgreSQL, for state shared by processes on many machines.

Same verbs, same semantics and the same columns (epoch milliseconds) as ``SqliteStore``;
the contract suite (``tests/test_store_contract.py``) runs on both. What differs is how
concurrency is made safe, since SQLite serializes every writer and PostgreSQL does not:

- **Ingest is serialized** by a transaction-level advisory lock (the "ingest" lock) taken
  before the merge reads the profiles. Two things need it. A fragment merge is a
  read-modify-write of the profile document, and two ingests of one profile would lose one
  merge. And the change log's cursor semantics: a ``bigint`` identity hands out seqs when a
  row is inserted, not when it commits, so ingest A could take seqs 10-19, ingest B 20-29,
  B commit first, a stream reader read up to 29 and move its cursor there, and A's 10-19
  commit behind the cursor, never read. Under the lock, seqs are reserved and committed in
  the same order, and PostgreSQL makes a commit visible before it releases the lock, so a
  reader that sees seq N sees every seq below it that will ever commit. A second writer
  path to the log would have to take the same lock. Ingest of one installation is one
  stream of batches anyway; COPY keeps the section under the lock short.
- **Forget excludes the writers that add profile-keyed rows**: it takes the ingest lock
  and the "erase" lock exclusively; queueing exports, recording outcomes and re-queueing
  failures take the "erase" lock shared (they do not exclude each other). Without it an
  export queued while a forget runs could outlive it.
- **Schema migrations** run in one transaction under the "migrate" lock: two processes
  starting at once apply them once.
- **The sender's lock** (``lock_sending``) is a session-level advisory lock on a
  connection of its own, held until released; it dies with the connection (a killed
  process, a lost network with TCP keepalives), so it is never left held.
- **Leases** are judged by the database's clock, not the callers'.

Reads of many profiles by id are index-driven: the ids first, then a join of the
``(shard, profile_id)`` pairs (``unnest``) against the tables' ``(shard, profile_id)``
keys, in a "probe" transaction (``PROBE``: nested loops and plain index scans only), so the
plan is one index probe per id however large the table is and whatever its statistics. (``shard = ANY(..) AND profile_id = ANY(..)`` looks simpler
but PostgreSQL 15 reads it either as a sequential scan, the planner's choice for 10,000
ids, or as a scan of whole shards of the index with the ids as a filter: 330 ms for 10,000
ids out of 500,000 rows, against 50 to 90 ms for the pair join, flat in table size.)

Bulk writes go through COPY: the change log is copied straight into its table, upserts
(profiles, memberships, the outbox, snapshots, outcomes) are copied into a temporary
staging table and applied with one ``INSERT ... ON CONFLICT`` or joined ``UPDATE`` /
``DELETE`` each (10,000 outbox upserts: 149 ms, against 200 ms with ``executemany``).

Scans that read many rows into Polars use ``COPY (query) TO STDOUT`` in CSV, read by
``polars.read_csv`` (``_frame``), not ADBC: a million change-log rows into a DataFrame took
0.79 s this way, 0.74 s with ADBC and 1.44 s through the cursor, and ADBC would add
``adbc-driver-postgresql``, its driver manager and ``pyarrow`` (about 200 MB installed)
next to psycopg, which the store needs anyway (COPY, advisory locks). The verbs of today
hand at most 10,000 rows to Python as tuples, where the cursor is the fastest (see
``FRAME_READER``), so they use it; ``_frame`` is for scans that go to Polars whole.

psycopg is imported here only: ``pip install profile-relay[postgres]`` brings it, and the
embedded SQLite default does not need it.
"""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson

from state.db import now_ms, shard_of
from state.erase import DROP_KINDS, FORGET_KINDS
from state.leases import _gone as owner_gone
from state.model import (
    RANGE_LEASES,
    REMAP_BACKFILL,
    SHARD_COUNT,
    SKIP_DELIVERED,
    Attempt,
    Backfill,
    BreakerState,
    CursorMoved,
    DeliveryRecord,
    Export,
    FailedEntry,
    Forgotten,
    Fragment,
    LeaseLost,
    Pending,
    ShardScope,
    StoredDataflow,
    StoredProfile,
    SyncResult,
    deep_merge,
    leaf_paths,
    merge_identities,
    newest_per_profile,
)
from state.pg_schema import MIGRATIONS
from state.stats import DataflowStats
from state.target import StateUnavailable, redact

log = logging.getLogger("profile_relay")

CONNECT_TIMEOUT_S = 10
POOL_MAX = 8
FORGET_CHECK_MARGIN_MS = 60_000  # as the SQLite store: clocks of two hosts, and a little more
# TCP keepalives: a sender whose machine vanished loses its lock within about a minute
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}
# A process frozen (SIGSTOP, a stalled VM) inside a transaction keeps its locks, and some
# are the dataflow's (its row, written at each cursor advance; its lease lock): until the
# process resumed, every shard group of the dataflow would wait, past its lease's TTL. The
# server ends such a session after this long idle, under half a group's lease TTL (6 s),
# so the others' renewals still get through in time.
IDLE_IN_TRANSACTION_MS = 3_000
# An ingest transaction parses and merges each batch between its statements (a batch of
# very wide lines takes seconds); its ingest lock holds up only other ingests.
INGEST_IDLE_IN_TRANSACTION_MS = 120_000

# Advisory locks are (namespace, key) pairs of int4 ('RELA', 'RELB', 'RELC' in ASCII); the
# key hashes the store's schema with what is locked, so two stores in two schemas of one
# database (``options=-csearch_path%3D...``) do not lock each other out.
LOCK_NS = 0x52454C41      # "migrate", "ingest", "erase": the store-wide locks
SEND_NS = 0x52454C42      # a dataflow's sender (lock_sending)
DATAFLOW_NS = 0x52454C43  # a dataflow's registration (sync_dataflow)
LEASE_NS = 0x52454C44     # a dataflow's leases, taken and renewed one at a time


def _key32(*parts: str) -> int:
    """A stable signed int4 for an advisory lock key."""
    return zlib.crc32("\0".join(parts).encode()) - 2**31


# -- SQL, in one place -------------------------------------------------------------------------
# Every statement of the store. ``KEYS`` is the list of (shard, profile_id) pairs a
# micro-batch reads by; statements joined to it run in a probe transaction (``_txn(probe=
# True)``), where the join can only be a nested loop of index probes.

NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
QUALIFIED = "('realized', 'existing')"
KEYS = "unnest(%(shards)s::smallint[], %(ids)s::text[]) AS k(shard, profile_id)"
# A probe transaction only looks rows up by key: nested loops over the key list (or a
# staging table) with index probes inside, whatever the statistics say (a table just
# filled by a backfill looks nearly empty to the planner until it is analyzed; a join it
# then planned as a loop over a materialized scan of the whole outbox took 1.6 s for
# 10,000 outcomes). Sequential scans stay allowed: the key list and the staging tables are
# read that way, and turning them off made small transactions 30x slower to plan.
PROBE = ("SELECT " + ", ".join(f"set_config('enable_{what}', 'off', true)" for what in (
    "hashjoin", "mergejoin", "bitmapscan", "material")))
XACT_LOCK = "SELECT pg_advisory_xact_lock(%s, %s)"
XACT_LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared(%s, %s)"
IDLE_TIMEOUT = "SET idle_in_transaction_session_timeout = %d"
INGEST_IDLE = f"SET LOCAL idle_in_transaction_session_timeout = {INGEST_IDLE_IN_TRANSACTION_MS}"

CURRENT_SCHEMA = "SELECT current_schema()"
SCHEMA_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM schema_version"
SCHEMA_RECORD = "INSERT INTO schema_version (version) VALUES (%s)"

# staging tables: name -> columns; created per transaction, dropped at its commit
STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "stage_profiles": (("profile_id", "text"), ("shard", "int2"), ("attributes", "bytea"),
                       ("identity_map", "bytea"), ("created_at", "int8"),
                       ("updated_at", "int8"), ("last_seq", "int8")),
    "stage_segments": (("profile_id", "text"), ("segment_id", "text"), ("shard", "int2"),
                       ("status", "text"), ("last_qualification_time", "text")),
    "stage_exports": (("profile_id", "text"), ("shard", "int2"), ("seq", "int8"),
                      ("reason", "text"), ("change_at", "int8")),
    "stage_snapshots": (("profile_id", "text"), ("shard", "int2"), ("qualified", "text"),
                        ("exported_seq", "int8")),
    "stage_outcomes": (("ord", "int4"), ("kind", "text"), ("profile_id", "text"),
                       ("shard", "int2"), ("item_seq", "int8"), ("sent_seq", "int8"),
                       ("key", "text"), ("status", "int4"), ("error", "text"),
                       ("at", "int8"), ("next_attempt_at", "int8"), ("attempts", "int4"),
                       ("reason", "text"), ("first_attempt_at", "int8"),
                       ("change_at", "int8"), ("redelivery", "int4"),
                       ("first_failed_at", "int8")),
}

PROFILES_FOR_MERGE = (
    "SELECT p.profile_id, p.attributes, p.identity_map, p.created_at FROM " + KEYS +
    " JOIN profiles p ON p.shard = k.shard AND p.profile_id = k.profile_id")
RESERVE_SEQS = ("SELECT nextval(pg_get_serial_sequence('changes', 'seq')) "
                "FROM generate_series(1, %s)")
COPY_CHANGES = ("COPY changes (seq, profile_id, shard, ts, committed_at, attr_paths, identities, "
                "identity_changed, segments) FROM STDIN (FORMAT binary)")
CHANGE_TYPES = ("int8", "text", "int2", "int8", "int8", "text", "text", "int2", "text")
UPSERT_PROFILES = (
    "INSERT INTO profiles (profile_id, shard, attributes, identity_map, created_at, updated_at, "
    "last_seq) SELECT profile_id, shard, attributes, identity_map, created_at, updated_at, "
    "last_seq FROM stage_profiles ON CONFLICT (shard, profile_id) DO UPDATE SET "
    "attributes = excluded.attributes, identity_map = excluded.identity_map, "
    "updated_at = excluded.updated_at, last_seq = excluded.last_seq")
UPSERT_SEGMENTS = (
    "INSERT INTO profile_segments (profile_id, segment_id, shard, status, "
    "last_qualification_time) SELECT profile_id, segment_id, shard, status, "
    "last_qualification_time FROM stage_segments ON CONFLICT (shard, profile_id, segment_id) "
    "DO UPDATE SET status = excluded.status, "
    "last_qualification_time = excluded.last_qualification_time")
LOAD_PROFILES = (
    "SELECT p.profile_id, p.attributes, p.identity_map, p.last_seq FROM " + KEYS +
    " JOIN profiles p ON p.shard = k.shard AND p.profile_id = k.profile_id")
LOAD_SEGMENTS = (
    "SELECT m.profile_id, m.segment_id, m.status, m.last_qualification_time FROM " + KEYS +
    " JOIN profile_segments m ON m.shard = k.shard AND m.profile_id = k.profile_id")
PROFILE_COUNT = "SELECT count(*) FROM profiles"
HEAD_SEQ = "SELECT coalesce(max(seq), 0) FROM changes"
READ_CHANGES = ("SELECT seq, profile_id, committed_at, attr_paths, identity_changed, segments "
                "FROM changes WHERE seq > %s ORDER BY seq LIMIT %s")
MEMBERSHIPS = (
    "SELECT m.profile_id, m.segment_id, m.status FROM " + KEYS +
    " JOIN profile_segments m ON m.shard = k.shard AND m.profile_id = k.profile_id "
    "WHERE m.segment_id = ANY(%(segments)s)")

DATAFLOW_ROW = "SELECT mapping_hash, destination, endpoint, removed_at FROM dataflows WHERE name = %s"
DATAFLOW_SEGMENTS = "SELECT segment_id FROM dataflow_segments WHERE dataflow = %s"
INSERT_DATAFLOW = (
    "INSERT INTO dataflows (name, destination, mapping_hash, created_at, cursor, endpoint) "
    "VALUES (%s, %s, %s, %s, (SELECT coalesce(max(seq), 0) FROM changes), %s)")
SET_MAPPING = "UPDATE dataflows SET mapping_hash = %s, destination = %s WHERE name = %s"
TOUCH_MAPPINGS = "UPDATE dataflow_segments SET mapping_updated_at = %s WHERE dataflow = %s"
SET_ENDPOINT = "UPDATE dataflows SET endpoint = %s WHERE name = %s"
SET_DESTINATION = "UPDATE dataflows SET destination = %s WHERE name = %s"
CLEAR_REMOVED = "UPDATE dataflows SET removed_at = NULL WHERE name = %s"
UNMAP_SEGMENTS = "DELETE FROM dataflow_segments WHERE dataflow = %s AND segment_id = ANY(%s)"
REMEMBER_UNMAPPED = (
    "INSERT INTO dataflow_unmapped_segments (dataflow, segment_id, unmapped_at) "
    "SELECT %s, s, %s FROM unnest(%s::text[]) AS s ON CONFLICT (dataflow, segment_id) "
    "DO UPDATE SET unmapped_at = excluded.unmapped_at")
REMAPPED = ("SELECT segment_id FROM dataflow_unmapped_segments WHERE dataflow = %s "
            "AND segment_id = ANY(%s)")
FORGET_UNMAPPED = ("DELETE FROM dataflow_unmapped_segments WHERE dataflow = %s "
                   "AND segment_id = ANY(%s)")
MAP_SEGMENT = ("INSERT INTO dataflow_segments (dataflow, segment_id, mapping_created_at, "
               "mapping_updated_at) VALUES (%s, %s, %s, %s)")
INSERT_BACKFILL = ("INSERT INTO backfills (dataflow, segment_id, reason, created_at) "
                   "VALUES (%s, %s, %s, %s) RETURNING id")
UNMAPPED = ("SELECT segment_id FROM dataflow_unmapped_segments WHERE dataflow = %s "
            "ORDER BY segment_id")
STALE_QUALIFIED = (
    "SELECT d.profile_id FROM dataflow_profiles d WHERE d.dataflow = %(flow)s "
    "AND d.profile_id > %(after)s AND d.qualified <> '' AND EXISTS (SELECT 1 FROM "
    "unnest(%(segments)s::text[]) AS s(seg) WHERE s.seg = ANY(string_to_array(d.qualified, E'\\n')) "
    "AND NOT EXISTS (SELECT 1 FROM profile_segments m WHERE m.shard = d.shard "
    f"AND m.profile_id = d.profile_id AND m.segment_id = s.seg AND m.status IN {QUALIFIED})) "
    "ORDER BY d.profile_id LIMIT %(limit)s")
STORED_DATAFLOWS = ("SELECT name, destination, endpoint, created_at, cursor, removed_at "
                    "FROM dataflows ORDER BY name")
MARK_REMOVED = ("UPDATE dataflows SET removed_at = %s WHERE removed_at IS NULL "
                "AND NOT (name = ANY(%s)) RETURNING name")
CURSOR = "SELECT cursor FROM dataflows WHERE name = %s"
MAPPING_TIMES = ("SELECT segment_id, mapping_created_at, mapping_updated_at "
                 "FROM dataflow_segments WHERE dataflow = %s")
SNAPSHOTS = (
    "SELECT d.profile_id, d.qualified, d.exported_seq FROM " + KEYS +
    " JOIN dataflow_profiles d ON d.dataflow = %(flow)s AND d.shard = k.shard "
    "AND d.profile_id = k.profile_id")
MOVE_CURSOR = "UPDATE dataflows SET cursor = %s WHERE name = %s AND cursor = %s"
LAST_FORGET = "SELECT value FROM store_flags WHERE name = 'last_forget_at'"
LIVE_PROFILES = (
    "SELECT p.profile_id FROM " + KEYS +
    " JOIN profiles p ON p.shard = k.shard AND p.profile_id = k.profile_id")
UPSERT_OUTBOX = (
    "INSERT INTO outbox (dataflow, profile_id, shard, seq, reason, change_at, enqueued_at) "
    "SELECT %s, profile_id, shard, seq, reason, change_at, %s FROM stage_exports "
    "ON CONFLICT (dataflow, shard, profile_id) DO UPDATE SET seq = excluded.seq, "
    "reason = excluded.reason, change_at = excluded.change_at, "
    "enqueued_at = excluded.enqueued_at, attempts = 0, next_attempt_at = 0, "
    "first_attempt_at = NULL, last_attempt_at = NULL, last_status = NULL, last_error = NULL "
    "WHERE excluded.seq >= outbox.seq")
UPSERT_SNAPSHOTS = (
    "INSERT INTO dataflow_profiles (dataflow, profile_id, shard, qualified, exported_seq) "
    "SELECT %s, profile_id, shard, qualified, exported_seq FROM stage_snapshots "
    "ON CONFLICT (dataflow, shard, profile_id) DO UPDATE SET qualified = excluded.qualified, "
    "exported_seq = greatest(dataflow_profiles.exported_seq, excluded.exported_seq)")
BACKFILL_PROGRESS = "UPDATE backfills SET after_profile = %s, done = done + %s WHERE id = %s"
OPEN_BACKFILLS = ("SELECT id, dataflow, segment_id, reason, total, done, after_profile "
                  "FROM backfills WHERE dataflow = %s AND finished_at IS NULL ORDER BY id")
COUNT_QUALIFIED = (f"SELECT count(DISTINCT profile_id) FROM profile_segments WHERE status IN "
                   f"{QUALIFIED} AND segment_id = ANY(%s)")
QUALIFIED_AFTER = (
    f"SELECT DISTINCT profile_id FROM profile_segments WHERE status IN {QUALIFIED} "
    "AND segment_id = ANY(%s) AND profile_id > %s ORDER BY profile_id LIMIT %s")
BACKFILL_QUALIFIED = (
    "SELECT m.profile_id, string_agg(m.segment_id, E'\\n' ORDER BY m.segment_id) FROM " + KEYS +
    " JOIN profile_segments m ON m.shard = k.shard AND m.profile_id = k.profile_id "
    f"WHERE m.status IN {QUALIFIED} AND m.segment_id = ANY(%(segments)s) GROUP BY m.profile_id")
BACKFILL_PROFILES = (
    "SELECT p.profile_id, p.last_seq FROM " + KEYS +
    " JOIN profiles p ON p.shard = k.shard AND p.profile_id = k.profile_id "
    "ORDER BY p.profile_id")
SET_BACKFILL_TOTAL = "UPDATE backfills SET total = %s WHERE id = %s AND total IS NULL"
FINISH_BACKFILL = "UPDATE backfills SET finished_at = %s WHERE id = %s"

CLAIM_DUE = (
    "SELECT o.profile_id, o.seq, o.reason, o.change_at, o.attempts, o.first_attempt_at, "
    "coalesce(d.delivered_seq, 0), o.redelivery, o.first_failed_at "
    "FROM outbox o LEFT JOIN dataflow_profiles d "
    "ON d.dataflow = o.dataflow AND d.shard = o.shard AND d.profile_id = o.profile_id "
    "WHERE o.dataflow = %(flow)s AND o.shard BETWEEN %(lo)s AND %(hi)s AND {due} "
    "AND (%(tried)s::bigint IS NULL "
    "OR o.last_attempt_at IS NULL OR o.last_attempt_at < %(tried)s::bigint) "
    "ORDER BY o.seq LIMIT %(limit)s")
CLAIM_FRESH = CLAIM_DUE.format(
    due="o.next_attempt_at = 0 AND (%(after)s::bigint IS NULL OR o.seq > %(after)s)")
CLAIM_RETRIES = CLAIM_DUE.format(due="o.next_attempt_at > 0 AND o.next_attempt_at <= %(now)s")
PENDING_COUNT = "SELECT count(*) FROM outbox WHERE dataflow = %s AND shard BETWEEN %s AND %s"
NEXT_DUE = ("SELECT min(next_attempt_at) FROM outbox WHERE dataflow = %s "
            "AND shard BETWEEN %s AND %s")
CLOSE_EXPORTS = (
    "DELETE FROM outbox o USING stage_outcomes s WHERE s.kind IN ('delivered', 'failed', "
    "'skipped') AND o.dataflow = %s AND o.shard = s.shard AND o.profile_id = s.profile_id "
    "AND o.seq = s.item_seq")
COUNT_SKIPPED = (
    "INSERT INTO skipped_exports (dataflow, reason, count, last_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (dataflow, reason) DO UPDATE SET count = skipped_exports.count + excluded.count, "
    "last_at = excluded.last_at")
LOG_DELIVERIES = (
    "INSERT INTO deliveries (dataflow, profile_id, shard, seq, idempotency_key, status, attempts, "
    "latency_ms, delivered_at) SELECT %s, profile_id, shard, sent_seq, key, status, attempts + 1, "
    "greatest(0, at - change_at), at FROM stage_outcomes WHERE kind = 'delivered' ORDER BY ord")
REMEMBER_DELIVERED = (
    "INSERT INTO dataflow_profiles (dataflow, profile_id, shard, qualified, delivered_seq) "
    "SELECT %s, profile_id, shard, '', max(sent_seq) FROM stage_outcomes "
    "WHERE kind = 'delivered' GROUP BY shard, profile_id "
    "ON CONFLICT (dataflow, shard, profile_id) DO UPDATE SET "
    "delivered_seq = greatest(dataflow_profiles.delivered_seq, excluded.delivered_seq)")
RESCHEDULE = (
    "UPDATE outbox o SET attempts = o.attempts + 1, next_attempt_at = s.next_attempt_at, "
    "last_status = s.status, last_error = s.error, "
    "first_attempt_at = coalesce(o.first_attempt_at, s.at), last_attempt_at = s.at "
    "FROM stage_outcomes s WHERE s.kind = 'retrying' AND o.dataflow = %s AND o.shard = s.shard "
    "AND o.profile_id = s.profile_id AND o.seq = s.item_seq")
STORE_FAILED = (
    "INSERT INTO failed_requests (dataflow, profile_id, shard, seq, idempotency_key, reason, "
    "attempts, last_status, last_error, first_attempt_at, last_attempt_at, redelivery, "
    "first_failed_at, next_redelivery_at) "
    "SELECT %s, profile_id, shard, sent_seq, key, reason, attempts + 1, status, error, "
    "coalesce(first_attempt_at, at), at, redelivery, coalesce(first_failed_at, at), "
    "nullif(next_attempt_at, 0) FROM stage_outcomes WHERE kind = 'failed' ORDER BY ord")
SKIPPED_COUNTS = ("SELECT reason, count FROM skipped_exports WHERE dataflow = %s "
                  "ORDER BY reason")
TRY_SEND_LOCK = "SELECT pg_try_advisory_lock(%s, %s)"
SEND_UNLOCK = "SELECT pg_advisory_unlock(%s, %s)"

FAILED_COLUMNS = (
    "SELECT id, profile_id, seq, idempotency_key, reason, attempts, last_status, last_error, "
    "redelivery, first_failed_at, last_attempt_at, next_redelivery_at FROM failed_requests ")
OPEN_FAILURES = (
    FAILED_COLUMNS + "WHERE dataflow = %(flow)s AND state = 'failed' "
    "AND (%(since)s::bigint IS NULL OR last_attempt_at >= %(since)s) "
    "AND (%(pids)s::text[] IS NULL OR profile_id = ANY(%(pids)s::text[])) ORDER BY id")
DUE_REDELIVERIES = (
    FAILED_COLUMNS + "WHERE dataflow = %s AND state = 'failed' AND next_redelivery_at IS NOT "
    "NULL AND next_redelivery_at <= %s AND shard BETWEEN %s AND %s "
    "ORDER BY next_redelivery_at LIMIT %s")
HISTORY = (
    "SELECT * FROM (SELECT delivered_at, seq, 'delivered', status, attempts, idempotency_key, "
    "NULL::text FROM deliveries WHERE shard = %(shard)s AND profile_id = %(pid)s AND dataflow = "
    "%(flow)s UNION ALL SELECT last_attempt_at, seq, 'failed', last_status, attempts, "
    "idempotency_key, last_error FROM failed_requests WHERE shard = %(shard)s "
    "AND profile_id = %(pid)s AND dataflow = %(flow)s) h ORDER BY 1 DESC LIMIT %(limit)s")
BREAKER = "SELECT failures_in_row, paused_at, next_probe_at FROM breakers WHERE dataflow = %s"
SAVE_BREAKER = (
    "INSERT INTO breakers VALUES (%s, %s, %s, %s) ON CONFLICT (dataflow) DO UPDATE SET "
    "failures_in_row = excluded.failures_in_row, paused_at = excluded.paused_at, "
    "next_probe_at = excluded.next_probe_at")
LAST_SEQS = (
    "SELECT p.profile_id, p.last_seq FROM " + KEYS +
    " JOIN profiles p ON p.shard = k.shard AND p.profile_id = k.profile_id")
DELIVERED_SEQS = (
    "SELECT d.profile_id, d.delivered_seq FROM " + KEYS +
    " JOIN dataflow_profiles d ON d.dataflow = %(flow)s AND d.shard = k.shard "
    "AND d.profile_id = k.profile_id")
QUEUED = (
    "SELECT o.profile_id FROM " + KEYS +
    " JOIN outbox o ON o.dataflow = %(flow)s AND o.shard = k.shard AND o.profile_id = k.profile_id")
REQUEUE = (
    "INSERT INTO outbox (dataflow, profile_id, shard, seq, reason, change_at, enqueued_at, "
    "redelivery, first_failed_at) "
    "SELECT %s, r.profile_id, r.shard, r.seq, %s, %s, %s, r.redelivery, r.first_failed_at "
    "FROM unnest(%s::text[], %s::smallint[], %s::bigint[], %s::int[], %s::bigint[]) "
    "AS r(profile_id, shard, seq, redelivery, first_failed_at) "
    "ON CONFLICT (dataflow, shard, profile_id) DO NOTHING")
RESOLVE_FAILURES = (
    "UPDATE failed_requests f SET state = r.state, resolved_at = %s "
    "FROM unnest(%s::bigint[], %s::text[]) AS r(id, state) WHERE f.id = r.id")

LEASES_OF = ("SELECT grp, owner, epoch, expires_at > " + NOW_MS + ", lo, hi FROM leases "
             "WHERE dataflow = %s")
RENEW_LEASE = ("UPDATE leases SET expires_at = " + NOW_MS + " + %s WHERE dataflow = %s "
               "AND grp = %s AND owner = %s")
TAKE_LEASE = (
    "INSERT INTO leases (dataflow, grp, owner, epoch, expires_at, lo, hi) "
    "VALUES (%(flow)s, %(grp)s, %(owner)s, %(epoch)s, " + NOW_MS + " + %(ttl)s, %(lo)s, %(hi)s) "
    "ON CONFLICT (dataflow, grp) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, "
    "expires_at = excluded.expires_at, lo = excluded.lo, hi = excluded.hi")
DROP_LEASES = "DELETE FROM leases WHERE dataflow = %s AND grp = ANY(%s)"
# a group's writes run only while its lease row still names it with its epoch; FOR SHARE
# makes a takeover (which updates or deletes the row) wait for them to commit
FENCE = ("SELECT 1 FROM leases WHERE dataflow = %s AND grp = %s AND owner = %s "
         "AND epoch = %s FOR SHARE")
LIVE_GROUPS = ("SELECT count(*) FROM leases WHERE dataflow = %s AND grp >= %s "
               "AND expires_at > " + NOW_MS)
SET_LAYOUT = ("INSERT INTO shard_layouts (dataflow, groups, updated_at) VALUES (%s, %s, %s) "
              "ON CONFLICT (dataflow) DO UPDATE SET groups = excluded.groups, "
              "updated_at = excluded.updated_at")
LAYOUT = "SELECT groups FROM shard_layouts WHERE dataflow = %s"
LEASE_LIVE = ("SELECT expires_at > " + NOW_MS + " FROM leases WHERE dataflow = %s "
              "AND grp = %s")
# Shard cursors: missing ones start at the dataflow's cursor (the lowest of them once they
# exist; a one-process stream's cursor before), and a group's shards are brought up to it
# (a one-process stream may have run on since).
ENSURE_SHARD_CURSORS = (
    "INSERT INTO shard_cursors (dataflow, shard, seq) SELECT name, s, cursor FROM dataflows, "
    "generate_series(0, 255) AS s WHERE name = %s ON CONFLICT (dataflow, shard) DO NOTHING")
RAISE_SHARD_CURSORS = (
    "UPDATE shard_cursors c SET seq = d.cursor FROM dataflows d WHERE d.name = c.dataflow "
    "AND c.dataflow = %s AND c.shard BETWEEN %s AND %s AND c.seq < d.cursor")
GROUP_CURSOR = ("SELECT min(seq) FROM shard_cursors WHERE dataflow = %s "
                "AND shard BETWEEN %s AND %s")
READ_GROUP_CHANGES = (
    "SELECT ch.seq, ch.profile_id, ch.committed_at, ch.attr_paths, ch.identity_changed, "
    "ch.segments FROM changes ch JOIN shard_cursors c ON c.dataflow = %(flow)s "
    "AND c.shard = ch.shard WHERE ch.seq > %(after)s AND ch.shard BETWEEN %(lo)s AND %(hi)s "
    "AND ch.seq > c.seq ORDER BY ch.seq LIMIT %(limit)s")
ADVANCE_SHARD_CURSORS = ("UPDATE shard_cursors SET seq = greatest(seq, %s) WHERE dataflow = %s "
                         "AND shard BETWEEN %s AND %s")
LOWEST_SHARD_CURSOR = ("UPDATE dataflows SET cursor = (SELECT min(seq) FROM shard_cursors "
                       "WHERE dataflow = %s) WHERE name = %s")
HOLDS_LEASE = ("SELECT epoch = %s AND expires_at > " + NOW_MS + " FROM leases "
               "WHERE dataflow = %s AND grp = %s")
RELEASE_LEASE = "UPDATE leases SET expires_at = 0 WHERE dataflow = %s AND grp = %s AND owner = %s"
LEASE_OWNER = ("SELECT owner FROM leases WHERE dataflow = %s AND grp = %s "
               "AND expires_at > " + NOW_MS)
# a standby is registered or renewed only where no other live one is
STAND_BY = (
    "INSERT INTO standbys (dataflow, grp, owner, expires_at) VALUES (%(flow)s, %(grp)s, "
    "%(owner)s, " + NOW_MS + " + %(ttl)s) ON CONFLICT (dataflow, grp) DO UPDATE SET "
    "owner = excluded.owner, expires_at = excluded.expires_at WHERE standbys.owner = "
    "excluded.owner OR standbys.expires_at <= " + NOW_MS + " RETURNING 1")
STANDBY_OWNER = ("SELECT owner FROM standbys WHERE dataflow = %s AND grp = %s "
                 "AND expires_at > " + NOW_MS)
LIVE_OWNERS = ("SELECT owner FROM leases WHERE dataflow = %(flow)s AND expires_at > " + NOW_MS
               + " UNION SELECT owner FROM standbys WHERE dataflow = %(flow)s AND expires_at > "
               + NOW_MS)
DROP_STANDBY = "DELETE FROM standbys WHERE dataflow = %s AND grp = %s AND owner = %s"
# the tables of shard groups, which the embedded store has not: dropped with the dataflow
GROUP_DROP_KINDS = (("shard cursors", "shard_cursors", "dataflow"),
                    ("shard layout", "shard_layouts", "dataflow"),
                    ("standbys", "standbys", "dataflow"))

STATS_CURSOR = "SELECT cursor FROM dataflows WHERE name = %s"
# The newest row's commit time says whether the log has rows at all (SQLite reads
# max(committed_at)); the oldest unread row is the first after the cursor: under the ingest
# lock commit times follow seqs, and this reads one row, not the whole backlog.
STATS_HEAD = ("SELECT seq, committed_at FROM changes ORDER BY seq DESC LIMIT 1")
STATS_OLDEST_UNREAD = "SELECT committed_at FROM changes WHERE seq > %s ORDER BY seq LIMIT 1"
STATS_OUTBOX = ("SELECT count(*), count(*) FILTER (WHERE attempts > 0) FROM outbox "
                "WHERE dataflow = %s")
STATS_DELIVERED = ("SELECT count(*), min(delivered_at), max(delivered_at) FROM deliveries "
                   "WHERE dataflow = %s AND delivered_at >= %s")
STATS_LATENCY_AT = ("SELECT latency_ms FROM deliveries WHERE dataflow = %s AND delivered_at >= %s "
                    "ORDER BY latency_ms OFFSET %s LIMIT 1")
STATS_FAILURES = "SELECT state, count(*) FROM failed_requests WHERE dataflow = %s GROUP BY state"
STATS_LAST_ERROR = (
    "SELECT last_error FROM (SELECT last_error, last_attempt_at FROM outbox WHERE dataflow = %s "
    "AND last_error IS NOT NULL UNION ALL SELECT last_error, last_attempt_at FROM "
    "failed_requests WHERE dataflow = %s AND last_error IS NOT NULL) AS e "
    "ORDER BY last_attempt_at DESC NULLS LAST LIMIT 1")
STATS_DECIDED = (
    "SELECT (SELECT count(*) FROM deliveries WHERE dataflow = %s AND delivered_at >= %s) + "
    "(SELECT count(*) FROM outbox WHERE dataflow = %s) + "
    "(SELECT count(*) FROM failed_requests WHERE dataflow = %s AND last_attempt_at >= %s)")

PRUNE_DELIVERIES = "DELETE FROM deliveries WHERE delivered_at < %s"
PRUNE_DELIVERIES_LIMITED = (
    "DELETE FROM deliveries WHERE id IN (SELECT id FROM (SELECT id, delivered_at "
    "FROM deliveries ORDER BY id LIMIT %s) AS oldest WHERE delivered_at < %s)")
PRUNE_CHANGES = (
    "DELETE FROM changes WHERE seq IN (SELECT seq FROM (SELECT seq, committed_at "
    "FROM changes WHERE seq <= coalesce((SELECT min(cursor) FROM dataflows), "
    "(SELECT max(seq) FROM changes)) AND seq < (SELECT max(seq) FROM changes) "
    "ORDER BY seq LIMIT %s) AS oldest WHERE committed_at < %s)")
PRUNE_RESOLVED = (
    "DELETE FROM failed_requests WHERE id IN (SELECT id FROM failed_requests "
    "WHERE state <> 'failed' AND resolved_at < %s ORDER BY id LIMIT %s)")

FORGET_ROWS = ("DELETE FROM {table} t USING " + KEYS +
               " WHERE t.shard = k.shard AND t.profile_id = k.profile_id")
MARK_FORGET = ("INSERT INTO store_flags (name, value) VALUES ('last_forget_at', %s) "
               "ON CONFLICT (name) DO UPDATE SET value = excluded.value")
# A backfill's resume point names the last profile of its last chunk: step back to the
# profile before it, which resumes at the same place (as the SQLite store).
STEP_BACK_BACKFILLS = (
    "UPDATE backfills SET after_profile = coalesce((SELECT max(profile_id) FROM profiles "
    "WHERE profile_id < backfills.after_profile), '') WHERE after_profile = ANY(%s)")
VACUUM = "VACUUM {tables}"
DROP_ROWS = "DELETE FROM {table} WHERE {column} = %s"

# The columnar reader: COPY of a query out as CSV, read by Polars.
FRAME_COPY = "COPY ({query}) TO STDOUT (FORMAT csv, HEADER true)"

FRAME_READER = """Measured on PostgreSQL 15 over its unix socket, 2 shared cores, the
change log's six columns, best of several runs:

    rows        cursor tuples  cursor->DataFrame  COPY csv->DataFrame  COPY csv->tuples  ADBC
    5,000            3.5 ms          5.6 ms              4.6 ms              6.3 ms     2.5 ms
    10,000           6.9 ms         11.1 ms              8.3 ms             11.6 ms     4.1 ms
    1,000,000       1213 ms         1440 ms               791 ms             2424 ms     739 ms
"""


def _rank(count: int, q: float) -> int | None:
    """The index ``state.stats._percentile`` reads in a sorted list of ``count`` values."""
    return None if not count else min(count - 1, max(0, round(q * (count - 1))))


def _keys(profile_ids: Iterable[str]) -> dict[str, list[Any]]:
    """The (shard, profile_id) pairs of distinct ids, in shard order: the ``KEYS`` rows."""
    pairs = sorted({(shard_of(pid), pid) for pid in profile_ids})
    return {"shards": [s for s, _ in pairs], "ids": [p for _, p in pairs]}


# memberships have a table of their own here (in SQLite they live in the profile row)
_FORGET_TABLES = [(kind, table or "profile_segments") for kind, table in FORGET_KINDS]


class PgSendLock:
    """A session-level advisory lock held on a connection of its own; closing the
    connection (or losing it) releases it."""

    def __init__(self, conn: Any, key: tuple[int, int]) -> None:
        self._conn: Any = conn
        self._key = key

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(SEND_UNLOCK, self._key)
        except Exception:  # a lost connection has released the lock already
            pass
        finally:
            conn.close()


class PostgresStore:
    """The Store on a PostgreSQL database named by a ``postgresql://`` URL."""

    def __init__(self, url: str, *, pool_max: int = POOL_MAX,
                 idle_in_transaction_ms: int = IDLE_IN_TRANSACTION_MS) -> None:
        self.url = url
        self.target = redact(url)
        self.scope: ShardScope | None = None
        self._horizon: tuple[int, int] | None = None
        self._cursors_ready = False
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise StateUnavailable(
                f"state: {self.target} is a PostgreSQL URL, but the PostgreSQL driver is not "
                f"installed ({exc.name}): pip install 'profile-relay[postgres]'") from None
        self._psycopg = psycopg
        self._conn_kwargs: dict[str, Any] = {"application_name": "profile-relay", **KEEPALIVES}
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                 **self._conn_kwargs) as conn:
                self.schema = conn.execute(CURRENT_SCHEMA).fetchone()[0] or "public"
                self._migrate(conn)
        except psycopg.Error as exc:
            raise StateUnavailable(self._unreachable(exc)) from None
        self._idle_ms = idle_in_transaction_ms  # before the pool: it connects at once
        self.pool = ConnectionPool(url, min_size=1, max_size=pool_max, open=True,
                                   name="profile-relay", timeout=CONNECT_TIMEOUT_S * 3,
                                   kwargs={"autocommit": True, **self._conn_kwargs},
                                   configure=self._configure)

    def _configure(self, conn: Any) -> None:
        """Session settings of every pooled connection (set here, not passed as
        ``options``: that would replace a ``search_path`` in the URL's own ``options``)."""
        conn.execute(IDLE_TIMEOUT % int(self._idle_ms))

    def _unreachable(self, exc: BaseException) -> str:
        """One line naming ``state``, with the URL redacted and any password scrubbed."""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = self._psycopg.conninfo.conninfo_to_dict(self.url).get("password") \
            if self._parsable() else None
        if password:
            reason = reason.replace(str(password), "***")
        return f"state: cannot open the PostgreSQL store {self.target}: {reason}"

    def _parsable(self) -> bool:
        try:
            self._psycopg.conninfo.conninfo_to_dict(self.url)
        except Exception:
            return False
        return True

    # -- shard groups ---------------------------------------------------------------------------

    def scoped(self, scope: ShardScope) -> PostgresStore:
        """This store seen by a shard group: the same pool, but the change log, the cursor,
        the outbox and the redeliveries of ``scope``'s shards only, every write fenced by
        its lease, and the sender's lock and backfills per group (only the group of shard
        0 runs backfills). The pipeline runs on it unchanged."""
        view = copy.copy(self)
        view.scope, view._horizon, view._cursors_ready = scope, None, False
        return view

    def _range(self) -> tuple[int, int]:
        return (0, SHARD_COUNT - 1) if self.scope is None else (self.scope.lo, self.scope.hi)

    def _fence(self, cur: Any) -> None:
        """In a write transaction of a group: go on only while the lease is still ours."""
        sc = self.scope
        if sc is not None and cur.execute(FENCE, (sc.dataflow, sc.lease_group, sc.owner,
                                                  sc.epoch)).fetchone() is None:
            raise LeaseLost(f"{sc.name}: the lease of epoch {sc.epoch} is no longer held "
                            f"by this run")

    def take_group(self, scope: ShardScope, ttl_ms: int) -> bool:
        """Take or renew ``scope``'s lease (its epoch is set); False while a live lease of
        another owner covers any of its shards."""
        epoch = self._take_lease(scope.dataflow, scope.lease_group, scope.lo, scope.hi,
                                 scope.owner, ttl_ms)
        if epoch is None:
            return False
        if scope.epoch and epoch != scope.epoch:
            raise LeaseLost(f"{scope.name}: taken over (epoch {scope.epoch} -> {epoch})")
        scope.epoch = epoch
        return True

    def live_groups(self, dataflow: str) -> int:
        """How many shard groups of the dataflow hold a live lease."""
        return self._one(LIVE_GROUPS, (dataflow, RANGE_LEASES))

    def set_layout(self, dataflow: str, groups: int) -> None:
        """The number of groups ``supervise`` runs the dataflow in."""
        with self._txn() as cur:
            cur.execute(SET_LAYOUT, (dataflow, groups, now_ms()))

    def layout(self, dataflow: str) -> int | None:
        return self._one(LAYOUT, (dataflow,))

    def lease_live(self, dataflow: str, group: int) -> bool:
        """Whether someone holds that lease now (by the database's clock)."""
        return bool(self._one(LEASE_LIVE, (dataflow, group)))

    def lease_owner(self, dataflow: str, group: int) -> str | None:
        """Who holds that lease now, if anyone."""
        return self._one(LEASE_OWNER, (dataflow, group))

    def stand_by(self, scope: ShardScope, ttl_ms: int) -> bool:
        """Register or renew ``scope.owner`` as the standby of ``scope``'s group for
        ``ttl_ms``; False while another live standby has it."""
        with self._txn() as cur:
            return cur.execute(STAND_BY, {"flow": scope.dataflow, "grp": scope.lease_group,
                                          "owner": scope.owner, "ttl": ttl_ms}
                               ).fetchone() is not None

    def standby_owner(self, dataflow: str, group: int) -> str | None:
        """The live standby of that lease, if any."""
        return self._one(STANDBY_OWNER, (dataflow, group))

    def live_owners(self, dataflow: str) -> set[str]:
        """Every live lease holder and standby of the dataflow (where its runs are)."""
        return {owner for (owner,) in self._rows(LIVE_OWNERS, {"flow": dataflow})}

    def drop_standby(self, scope: ShardScope) -> None:
        with self._txn() as cur:
            cur.execute(DROP_STANDBY, (scope.dataflow, scope.lease_group, scope.owner))

    # -- plumbing ------------------------------------------------------------------------------

    def _lock(self, what: str) -> tuple[int, int]:
        """The advisory lock of a store-wide ``what`` ("migrate", "ingest", "erase")."""
        return (LOCK_NS, _key32(self.schema, what))

    def _migrate(self, conn: Any) -> int:
        """Apply the migrations this schema lacks, in one transaction under an advisory
        lock, so two processes starting at once apply each once."""
        with conn.transaction():
            conn.execute(XACT_LOCK, self._lock("migrate"))
            conn.execute(SCHEMA_VERSION_TABLE)
            current = conn.execute(SCHEMA_VERSION).fetchone()[0]
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                conn.execute(script)
                conn.execute(SCHEMA_RECORD, (version,))
        return len(MIGRATIONS)

    @contextmanager
    def _txn(self, probe: bool = False) -> Iterator[Any]:
        """One transaction on a pooled connection; yields a cursor. ``probe``: joins on
        the key list can only be nested loops of index probes (see the module's doc)."""
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            if probe:
                cur.execute(PROBE)
            yield cur

    def _rows(self, sql: str, params: Any = None, probe: bool = False) -> list[tuple]:
        with self._txn(probe) as cur:
            return cur.execute(sql, params).fetchall()

    def _one(self, sql: str, params: Any = None) -> Any:
        with self.pool.connection() as conn:
            row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _copy(cur: Any, statement: str, types: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        with cur.copy(statement) as copy:
            copy.set_types(list(types))
            for row in rows:
                copy.write_row(row)

    def _stage(self, cur: Any, name: str, rows: Iterable[Sequence[Any]]) -> None:
        """Fill the temporary staging table ``name`` (see ``STAGES``) by binary COPY."""
        columns = STAGES[name]
        cur.execute(f"DROP TABLE IF EXISTS {name}")  # staged already in this transaction
        cur.execute(f"CREATE TEMP TABLE {name} ("
                    + ", ".join(f"{c} {t}" for c, t in columns) + ") ON COMMIT DROP")
        self._copy(cur, f"COPY {name} FROM STDIN (FORMAT binary)", [t for _, t in columns], rows)

    def _frame(self, query: str, params: Any = None, schema: dict[str, Any] | None = None) -> Any:
        """A query's rows as a Polars DataFrame, through COPY ... TO STDOUT (the columnar
        reader; see ``FRAME_READER``). ``query`` is bound client-side."""
        import polars as pl

        buf = bytearray()
        with self.pool.connection() as conn, conn.cursor() as cur, \
                cur.copy(FRAME_COPY.format(query=query), params) as copy:
            for chunk in copy:
                buf += chunk
        return pl.read_csv(bytes(buf), schema=schema)

    # -- profiles and the change log -----------------------------------------------------------

    def append_changes(self, fragments: Sequence[Fragment]) -> int:
        """Merge and log the fragments in one transaction, under the ingest lock (see the
        module's doc: it orders seqs by commit, so a cursor never skips one)."""
        return self.append_change_groups([fragments]) if fragments else 0

    def append_change_groups(self, groups: Iterable[Sequence[Fragment]]) -> int:
        """Every group in one transaction under the ingest lock, each written before the
        next is taken from ``groups``."""
        last_seq = 0
        with self._txn(probe=True) as cur:
            cur.execute(INGEST_IDLE)
            cur.execute(XACT_LOCK, self._lock("ingest"))
            for fragments in groups:
                if fragments:
                    last_seq = self._append_group(cur, fragments)
        return last_seq

    def _append_group(self, cur: Any, fragments: Sequence[Fragment]) -> int:
        keys = _keys(f.profile_id for f in fragments)
        existing = {pid: [orjson.loads(attrs), orjson.loads(idmap), created]
                    for pid, attrs, idmap, created in cur.execute(PROFILES_FOR_MERGE, keys)}
        committed = now_ms()
        changes: list[list[Any]] = []
        shards: dict[str, int] = {}
        segment_rows: dict[tuple[str, str], tuple] = {}
        for frag in fragments:
            state = existing.get(frag.profile_id)
            if state is None:
                state = existing[frag.profile_id] = [{}, {}, committed]
            paths = None
            if frag.attributes:
                deep_merge(state[0], frag.attributes)
                written = frag.paths if frag.paths is not None else leaf_paths(frag.attributes)
                paths = "\n".join(written) or None
            identity_changed = int(bool(frag.identities)
                                   and merge_identities(state[1], frag.identities))
            shard = shards.get(frag.profile_id)
            if shard is None:
                shard = shards[frag.profile_id] = shard_of(frag.profile_id)
            for seg, (status, lqt) in frag.segments.items():
                segment_rows[(frag.profile_id, seg)] = (frag.profile_id, seg, shard, status, lqt)
            changes.append([
                0, frag.profile_id, shard, frag.ts, committed, paths,
                orjson.dumps(frag.identities).decode() if frag.identities else None,
                identity_changed,
                orjson.dumps({s: v[0] for s, v in frag.segments.items()}).decode()
                if frag.segments else None,
            ])
        seqs = sorted(s for (s,) in cur.execute(RESERVE_SEQS, (len(changes),)))
        last_by_profile: dict[str, int] = {}
        for seq, row in zip(seqs, changes, strict=True):
            row[0] = seq
            last_by_profile[row[1]] = seq
        self._copy(cur, COPY_CHANGES, CHANGE_TYPES, changes)
        self._stage(cur, "stage_profiles", (
            (pid, shards[pid], orjson.dumps(a), orjson.dumps(i), created, committed,
             last_by_profile[pid])
            for pid, (a, i, created) in existing.items() if pid in last_by_profile))
        cur.execute(UPSERT_PROFILES)
        if segment_rows:
            self._stage(cur, "stage_segments", segment_rows.values())
            cur.execute(UPSERT_SEGMENTS)
        return seqs[-1]

    def load_profiles(self, profile_ids: Sequence[str]) -> dict[str, StoredProfile]:
        if not profile_ids:
            return {}
        keys = _keys(profile_ids)
        with self._txn(probe=True) as cur:
            out = {pid: StoredProfile(pid, orjson.loads(attrs), orjson.loads(idmap), {}, last_seq)
                   for pid, attrs, idmap, last_seq in cur.execute(LOAD_PROFILES, keys)}
            for pid, seg, status, lqt in cur.execute(LOAD_SEGMENTS, keys):
                if pid in out:
                    out[pid].segments[seg] = (status, lqt)
        return out

    def profile_count(self) -> int:
        return self._one(PROFILE_COUNT)

    def head_seq(self) -> int:
        return self._one(HEAD_SEQ)

    def read_changes(self, after: int, limit: int) -> list[tuple]:
        """A group reads its shards' changes only. Fewer than ``limit``: its shards have
        nothing more up to the head seen before the read (under the ingest lock, every seq
        below a visible one is visible), so the next cursor advance goes that far (or this
        one, when there is nothing): a group whose shards are quiet does not lag behind."""
        if self.scope is None:
            return self._rows(READ_CHANGES, (after, limit))
        head = self.head_seq()
        lo, hi = self._range()
        rows = self._rows(READ_GROUP_CHANGES, {"flow": self.scope.dataflow, "after": after,
                                               "lo": lo, "hi": hi, "limit": limit})
        self._horizon = (after, head) if len(rows) < limit else None
        if not rows and head > after:
            with self._txn() as cur:
                self._advance(cur, head)
        return rows

    def _advance(self, cur: Any, to: int) -> None:
        """Move a group's shard cursors to ``to`` (fenced), and the dataflow's cursor to
        the lowest shard cursor."""
        self._fence(cur)
        lo, hi = self._range()
        name = self.scope.dataflow  # type: ignore[union-attr]
        cur.execute(ADVANCE_SHARD_CURSORS, (to, name, lo, hi))
        cur.execute(LOWEST_SHARD_CURSOR, (name, name))

    def memberships(self, profile_ids: Sequence[str],
                    segments: Sequence[str]) -> list[tuple[str, str, str]]:
        if not profile_ids or not segments:
            return []
        return self._rows(MEMBERSHIPS, {**_keys(profile_ids), "segments": list(segments)},
                          probe=True)

    # -- dataflow state --------------------------------------------------------------------------

    def sync_dataflow(self, name: str, destination: str, segments: Sequence[str],
                      mapping_hash: str, endpoint: str | None = None) -> SyncResult:
        """As the SQLite store; concurrent syncs of one dataflow queue on an advisory lock
        of its name (the row may not exist yet to be locked)."""
        wanted_set = set(segments)
        with self.pool.connection() as conn:
            row = conn.execute(DATAFLOW_ROW, (name,)).fetchone()
            if (row is not None and row[0] == mapping_hash and row[3] is None
                    and (endpoint is None or row[2] == endpoint)
                    and wanted_set == {s for (s,) in conn.execute(DATAFLOW_SEGMENTS, (name,))}):
                return SyncResult(False, (), ())  # the usual case: reads only
        now = now_ms()
        with self._txn() as cur:
            cur.execute(XACT_LOCK, (DATAFLOW_NS, _key32(self.schema, name)))
            row = cur.execute(DATAFLOW_ROW, (name,)).fetchone()
            stored = {s for (s,) in cur.execute(DATAFLOW_SEGMENTS, (name,))}
            wanted = list(dict.fromkeys(segments))
            new = [s for s in wanted if s not in stored]
            removed = sorted(stored - set(wanted))
            moved_from = None
            if row is None:
                cur.execute(INSERT_DATAFLOW, (name, destination, mapping_hash, now, endpoint))
            else:
                stored_hash, stored_dest, stored_endpoint, removed_at = row
                if stored_hash != mapping_hash:
                    cur.execute(SET_MAPPING, (mapping_hash, destination, name))
                    cur.execute(TOUCH_MAPPINGS, (now, name))
                if endpoint is not None and stored_endpoint != endpoint:
                    cur.execute(SET_ENDPOINT, (endpoint, name))
                # an endpoint stored before this was recorded is set silently
                if stored_dest != destination or (endpoint is not None and stored_endpoint
                                                  is not None and stored_endpoint != endpoint):
                    moved_from = (stored_dest, stored_endpoint)
                    cur.execute(SET_DESTINATION, (destination, name))
                if removed_at is not None:
                    cur.execute(CLEAR_REMOVED, (name,))
            if removed:
                cur.execute(UNMAP_SEGMENTS, (name, removed))
                cur.execute(REMEMBER_UNMAPPED, (name, now, removed))
            remapped = [s for (s,) in cur.execute(REMAPPED, (name, new))] \
                if new and row is not None else []
            if remapped:
                cur.execute(FORGET_UNMAPPED, (name, remapped))
            for s in new:
                cur.execute(MAP_SEGMENT, (name, s, now, now))
            if row is None:
                cur.execute(INSERT_BACKFILL, (name, None, "new dataflow", now))
            else:
                for s in new:
                    cur.execute(INSERT_BACKFILL, (name, s, REMAP_BACKFILL if s in remapped
                                                  else "segment newly mapped", now))
        remapped_set = set(remapped)
        return SyncResult(row is None, tuple(new), tuple(removed),
                          tuple(s for s in new if s in remapped_set),
                          row is not None and row[3] is not None, moved_from)

    def unmapped_segments(self, dataflow: str) -> list[str]:
        return [s for (s,) in self._rows(UNMAPPED, (dataflow,))]

    def stale_qualified(self, dataflow: str, segments: Sequence[str], after: str,
                        limit: int) -> list[str]:
        return [pid for (pid,) in self._rows(STALE_QUALIFIED, {
            "flow": dataflow, "after": after, "segments": list(segments), "limit": limit})]

    def stored_dataflows(self) -> list[StoredDataflow]:
        return [StoredDataflow(*row) for row in self._rows(STORED_DATAFLOWS)]

    def mark_removed(self, keep: Sequence[str]) -> list[str]:
        """One UPDATE: a row already marked is not matched, so each is reported once."""
        return sorted(n for (n,) in self._rows(MARK_REMOVED, (now_ms(), list(keep))))

    def drop_dataflow(self, name: str) -> dict[str, int]:
        with self._txn() as cur:
            counts = {}
            for kind, table, column in DROP_KINDS + GROUP_DROP_KINDS:
                cur.execute(DROP_ROWS.format(table=table, column=column), (name,))
                counts[kind] = cur.rowcount
        return counts

    def cursor(self, dataflow: str) -> int:
        """A group's cursor is the lowest of its shards'. On a view's first read the shard
        cursors are made where missing and its own brought up to the dataflow's cursor
        (see ``ENSURE_SHARD_CURSORS``), once the dataflow exists."""
        if self.scope is not None:
            lo, hi = self._range()
            if not self._cursors_ready:
                with self._txn() as cur:
                    self._fence(cur)
                    cur.execute(ENSURE_SHARD_CURSORS, (dataflow,))
                    cur.execute(RAISE_SHARD_CURSORS, (dataflow, lo, hi))
                    self._cursors_ready = cur.execute(CURSOR, (dataflow,)).fetchone() is not None
            value = self._one(GROUP_CURSOR, (dataflow, lo, hi))
        else:
            value = self._one(CURSOR, (dataflow,))
        if value is None:
            raise KeyError(f"dataflow {dataflow!r} has not run yet")
        return value

    def mapping_times(self, dataflow: str) -> dict[str, tuple[int, int]]:
        return {seg: (created, updated)
                for seg, created, updated in self._rows(MAPPING_TIMES, (dataflow,))}

    def snapshots(self, dataflow: str, profile_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        if not profile_ids:
            return {}
        return {pid: (qualified, exported) for pid, qualified, exported in self._rows(
            SNAPSHOTS, {**_keys(profile_ids), "flow": dataflow}, probe=True)}

    def enqueue_exports(self, dataflow: str, exports: Sequence[Export],
                        snapshot_updates: Sequence[tuple[str, str]] = (),
                        cursor_from: int | None = None, cursor_to: int | None = None,
                        backfill: tuple[int, str, int] | None = None,
                        read_at: int | None = None) -> None:
        """One transaction, as the SQLite store. A second decider holding the same cursor
        waits on the first's row lock, then finds the cursor moved (CursorMoved)."""
        now = now_ms()
        with self._txn(probe=True) as cur:
            cur.execute(XACT_LOCK_SHARED, self._lock("erase"))
            if self.scope is not None:
                if cursor_to is not None:  # to the head the read saw, when it read it all
                    read_all = self._horizon is not None and self._horizon[0] == cursor_from
                    self._advance(cur, max(cursor_to, self._horizon[1]) if read_all
                                  else cursor_to)  # type: ignore[index]
                else:
                    self._fence(cur)
            elif cursor_to is not None:
                cur.execute(MOVE_CURSOR, (cursor_to, dataflow, cursor_from))
                if cur.rowcount != 1:
                    raise CursorMoved(dataflow)
            forgot = cur.execute(LAST_FORGET).fetchone() if read_at is not None else None
            if (exports or snapshot_updates) and (
                    read_at is None or (forgot is not None
                                        and forgot[0] >= read_at - FORGET_CHECK_MARGIN_MS)):
                named = [e.profile_id for e in exports] + [pid for pid, _ in snapshot_updates]
                live = {pid for (pid,) in cur.execute(LIVE_PROFILES, _keys(named))}
                exports = [e for e in exports if e.profile_id in live]
                snapshot_updates = [u for u in snapshot_updates if u[0] in live]
            if exports:
                # one row per profile, as applying them in order would leave it: the newest
                # seq wins, the later of equal ones
                newest: dict[str, Export] = {}
                for e in exports:
                    held = newest.get(e.profile_id)
                    if held is None or e.seq >= held.seq:
                        newest[e.profile_id] = e
                self._stage(cur, "stage_exports", (
                    (e.profile_id, shard_of(e.profile_id), e.seq, e.reason, e.change_at)
                    for e in newest.values()))
                cur.execute(UPSERT_OUTBOX, (dataflow, now))
            snaps: dict[str, list[Any]] = {}
            for pid, qualified, seq in [*((e.profile_id, e.qualified, e.seq) for e in exports),
                                        *((pid, q, 0) for pid, q in snapshot_updates)]:
                held = snaps.get(pid)
                if held is None:
                    snaps[pid] = [pid, shard_of(pid), qualified, seq]
                else:
                    held[2], held[3] = qualified, max(held[3], seq)
            if snaps:
                self._stage(cur, "stage_snapshots", snaps.values())
                cur.execute(UPSERT_SNAPSHOTS, (dataflow,))
            if backfill is not None:
                job, after, done = backfill
                cur.execute(BACKFILL_PROGRESS, (after, done, job))

    # -- backfills -------------------------------------------------------------------------------

    def start_backfill(self, dataflow: str, segment: str | None, reason: str) -> int:
        with self._txn() as cur:
            return cur.execute(INSERT_BACKFILL, (dataflow, segment, reason, now_ms())).fetchone()[0]

    def open_backfills(self, dataflow: str) -> list[Backfill]:
        if self.scope is not None and not self.scope.leads:
            return []
        return [Backfill(*row) for row in self._rows(OPEN_BACKFILLS, (dataflow,))]

    def count_qualified(self, segments: Sequence[str]) -> int:
        return self._one(COUNT_QUALIFIED, (list(segments),))

    def qualified_after(self, segments: Sequence[str], after: str, limit: int) -> list[str]:
        return [pid for (pid,) in self._rows(QUALIFIED_AFTER, (list(segments), after, limit))]

    def backfill_rows(self, profile_ids: Sequence[str],
                      mapped_segments: Sequence[str]) -> list[tuple[str, int, str]]:
        if not profile_ids:
            return []
        keys = _keys(profile_ids)
        with self._txn(probe=True) as cur:
            qualified = dict(cur.execute(BACKFILL_QUALIFIED,
                                         {**keys, "segments": list(mapped_segments)}).fetchall())
            return [(pid, last_seq, qualified.get(pid) or "")
                    for pid, last_seq in cur.execute(BACKFILL_PROFILES, keys)]

    def queue_backfill(self, dataflow: str, job: int, segments: Sequence[str],
                       tracked: Sequence[str], after: str, limit: int) -> tuple[str, int] | None:
        """The chunk's ids and rows read first, then queued in one transaction that
        leaves out the profiles forgotten since the read (``enqueue_exports``' read_at)."""
        pids = self.qualified_after(segments, after, limit)
        if not pids:
            return None
        now = now_ms()
        exports = [Export(pid, seq, "backfill", now, qualified)
                   for pid, seq, qualified in self.backfill_rows(pids, tracked)]
        self.enqueue_exports(dataflow, exports, backfill=(job, pids[-1], len(pids)), read_at=now)
        return pids[-1], len(pids)

    def set_backfill_total(self, job: int, total: int) -> None:
        with self._txn() as cur:
            cur.execute(SET_BACKFILL_TOTAL, (total, job))

    def finish_backfill(self, job: int) -> None:
        with self._txn() as cur:
            cur.execute(FINISH_BACKFILL, (now_ms(), job))

    # -- the outbox ------------------------------------------------------------------------------

    def claim_due(self, dataflow: str, now: int, limit: int,
                  tried_before: int | None = None, after_seq: int | None = None) -> list[Pending]:
        """Never-tried exports and due retries, each read in seq order up to ``limit`` on
        the due index, merged by seq (as the SQLite store)."""
        if now < 0:
            return []
        lo, hi = self._range()
        params = {"flow": dataflow, "now": now, "limit": limit, "tried": tried_before,
                  "after": after_seq, "lo": lo, "hi": hi}
        with self._txn() as cur:
            self._fence(cur)
            fresh = cur.execute(CLAIM_FRESH, params).fetchall()
            retries = cur.execute(CLAIM_RETRIES, params).fetchall()
        if retries:
            fresh = sorted([*fresh, *retries], key=lambda r: r[1])[:limit]
        return [Pending(*row) for row in fresh]

    def pending_count(self, dataflow: str) -> int:
        return self._one(PENDING_COUNT, (dataflow, *self._range()))

    def next_due(self, dataflow: str) -> int | None:
        return self._one(NEXT_DUE, (dataflow, *self._range()))

    def record_outcomes(self, dataflow: str, delivered: Sequence[Attempt],
                        retrying: Sequence[Attempt], failed: Sequence[Attempt],
                        skipped: Sequence[Pending] = (),
                        skip_reason: str = SKIP_DELIVERED) -> None:
        """One staged COPY of the round, then one statement per kind of outcome; each row
        only touches the outbox if it still holds that very export."""
        if not (delivered or retrying or failed or skipped):
            return
        rows: list[tuple] = []
        for kind, attempts in (("delivered", delivered), ("retrying", retrying),
                               ("failed", failed)):
            for a in attempts:
                p = a.item
                rows.append((len(rows), kind, p.profile_id, shard_of(p.profile_id), p.seq,
                             a.sent_seq, a.key, a.status, a.error, a.at, a.next_attempt_at,
                             p.attempts, p.reason, p.first_attempt_at, p.change_at,
                             p.redelivery, p.first_failed_at))
        for p in skipped:
            rows.append((len(rows), "skipped", p.profile_id, shard_of(p.profile_id), p.seq,
                         p.seq, None, None, None, None, None, p.attempts, p.reason,
                         p.first_attempt_at, p.change_at, p.redelivery, p.first_failed_at))
        with self._txn(probe=True) as cur:
            cur.execute(XACT_LOCK_SHARED, self._lock("erase"))
            self._fence(cur)
            self._stage(cur, "stage_outcomes", rows)
            cur.execute(CLOSE_EXPORTS, (dataflow,))
            if skipped:
                cur.execute(COUNT_SKIPPED, (dataflow, skip_reason, len(skipped), now_ms()))
            if delivered:
                cur.execute(LOG_DELIVERIES, (dataflow,))
                cur.execute(REMEMBER_DELIVERED, (dataflow,))
            if retrying:
                cur.execute(RESCHEDULE, (dataflow,))
            if failed:
                cur.execute(STORE_FAILED, (dataflow,))

    def skipped_counts(self, dataflow: str) -> dict[str, int]:
        return dict(self._rows(SKIPPED_COUNTS, (dataflow,)))

    def lock_sending(self, dataflow: str) -> PgSendLock | None:
        """A session-level advisory lock on a dedicated connection (not a pooled one: the
        lock lives as long as the session). The server drops it when that connection
        ends, so a killed sender never leaves it held."""
        key = (SEND_NS, _key32(self.schema, dataflow if self.scope is None else self.scope.name))
        conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                     **self._conn_kwargs)
        try:
            got = conn.execute(TRY_SEND_LOCK, key).fetchone()[0]
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return None
        return PgSendLock(conn, key)

    # -- the failed-request store ---------------------------------------------------------------

    def open_failures(self, dataflow: str, since: int | None = None,
                      profiles: Sequence[str] | None = None) -> list[FailedEntry]:
        params = {"flow": dataflow, "since": since,
                  "pids": None if profiles is None else list(profiles)}
        return [FailedEntry(*row) for row in self._rows(OPEN_FAILURES, params)]

    def due_redeliveries(self, dataflow: str, now: int, limit: int) -> list[FailedEntry]:
        return [FailedEntry(*row) for row in self._rows(
            DUE_REDELIVERIES, (dataflow, now, *self._range(), limit))]

    def delivery_history(self, dataflow: str, profile_id: str,
                         limit: int = 100) -> list[DeliveryRecord]:
        params = {"flow": dataflow, "pid": profile_id, "shard": shard_of(profile_id),
                  "limit": limit}
        return [DeliveryRecord(*row) for row in self._rows(HISTORY, params)]

    def breaker(self, dataflow: str) -> BreakerState:
        rows = self._rows(BREAKER, (dataflow,))
        return BreakerState(*rows[0]) if rows else BreakerState()

    def save_breaker(self, dataflow: str, state: BreakerState) -> None:
        with self._txn() as cur:
            cur.execute(SAVE_BREAKER, (dataflow, state.failures_in_row, state.paused_at,
                                       state.next_probe_at))

    def requeue_failures(self, dataflow: str, entries: Sequence[FailedEntry],
                         redelivery: bool = False
                         ) -> tuple[list[FailedEntry], list[FailedEntry]]:
        """As the SQLite store: each profile's newest entry back to the outbox unless its
        profile is gone, already queued, or its current state delivered; all read inside
        the transaction."""
        now = now_ms()
        newest = newest_per_profile(entries)
        params = {**_keys(newest), "flow": dataflow}
        with self._txn(probe=True) as cur:
            cur.execute(XACT_LOCK_SHARED, self._lock("erase"))
            self._fence(cur)
            state = dict(cur.execute(LAST_SEQS, params).fetchall())
            delivered = dict(cur.execute(DELIVERED_SEQS, params).fetchall())
            queued = {pid for (pid,) in cur.execute(QUEUED, params)}
            keep = [e for pid, e in newest.items() if pid in state and pid not in queued
                    and delivered.get(pid, 0) < state[pid]]
            kept = {e.id for e in keep}
            superseded = [e for e in entries if e.id not in kept]
            if keep:
                cur.execute(REQUEUE, (
                    dataflow, "redelivery" if redelivery else "replay", now, now,
                    [e.profile_id for e in keep], [shard_of(e.profile_id) for e in keep],
                    [state[e.profile_id] for e in keep],
                    [e.redeliveries + 1 if redelivery else 0 for e in keep],
                    [e.first_failed_at if redelivery else None for e in keep]))
            done = "redelivered" if redelivery else "requeued"
            resolved = [(done, e.id) for e in keep] + [("superseded", e.id)
                                                       for e in superseded]
            if resolved:
                cur.execute(RESOLVE_FAILURES, (now, [i for _, i in resolved],
                                               [s for s, _ in resolved]))
        return keep, superseded

    # -- leases ----------------------------------------------------------------------------------

    def acquire_lease(self, dataflow: str, group: int, owner: str, ttl_ms: int) -> int | None:
        """Take or renew the lease, judged by the database's clock: renewing keeps the
        epoch, taking over an expired lease (or one whose owner's process on this host has
        exited) increments it. A plain lease is also refused while a shard group's lease
        of the dataflow is live."""
        return self._take_lease(dataflow, group, 0, SHARD_COUNT - 1, owner, ttl_ms)

    def _take_lease(self, dataflow: str, group: int, lo: int, hi: int, owner: str,
                    ttl_ms: int) -> int | None:
        """One transaction under the dataflow's lease lock, so two takers cannot both win.
        A lease conflicts with another of the same group, and a shard range's with every
        lease whose shards overlap it. Taking over deletes the lapsed conflicting leases of
        other groups, so their owners' fences fail from then on."""
        ranged = group >= RANGE_LEASES
        with self._txn() as cur:
            cur.execute(XACT_LOCK, (LEASE_NS, _key32(self.schema, dataflow)))
            epoch, lapsed = 0, []
            for grp, held_by, held_epoch, live, rlo, rhi in cur.execute(
                    LEASES_OF, (dataflow,)).fetchall():
                if grp == group and held_by == owner:
                    cur.execute(RENEW_LEASE, (ttl_ms, dataflow, group, owner))
                    return held_epoch
                if grp != group and not ((ranged or grp >= RANGE_LEASES)
                                         and rlo <= hi and lo <= rhi):
                    continue  # no conflict
                if live and not owner_gone(held_by):
                    return None
                epoch = max(epoch, held_epoch)
                if grp != group:
                    lapsed.append(grp)
            if lapsed:
                cur.execute(DROP_LEASES, (dataflow, lapsed))
            cur.execute(TAKE_LEASE, {"flow": dataflow, "grp": group, "owner": owner,
                                     "epoch": epoch + 1, "ttl": ttl_ms, "lo": lo, "hi": hi})
            return epoch + 1

    def holds_lease(self, dataflow: str, group: int, epoch: int) -> bool:
        return bool(self._one(HOLDS_LEASE, (epoch, dataflow, group)))

    def release_lease(self, dataflow: str, group: int, owner: str) -> None:
        with self._txn() as cur:
            cur.execute(RELEASE_LEASE, (dataflow, group, owner))

    # -- figures and upkeep ----------------------------------------------------------------------

    def stats(self, dataflow: str, since_ms: int | None = None) -> DataflowStats:
        """The SQLite store's figures; percentiles are read at their rank in the database
        rather than by fetching every latency."""
        now = now_ms()
        since = since_ms if since_ms is not None else now - 3_600_000
        with self._txn() as cur:
            row = cur.execute(STATS_CURSOR, (dataflow,)).fetchone()
            cursor = row[0] if row else 0
            head_row = cur.execute(STATS_HEAD).fetchone()
            head, head_at = head_row if head_row else (0, None)
            unread = cur.execute(STATS_OLDEST_UNREAD, (cursor,)).fetchone()
            oldest_unread = unread[0] if unread else None
            pending, retrying = cur.execute(STATS_OUTBOX, (dataflow,)).fetchone()
            delivered, first_at, last_at = cur.execute(STATS_DELIVERED, (dataflow, since)).fetchone()
            p50, p95 = _rank(delivered, 0.50), _rank(delivered, 0.95)
            latency = {rank: cur.execute(STATS_LATENCY_AT, (dataflow, since, rank)).fetchone()[0]
                       for rank in {p50, p95} if rank is not None}
            failures = dict(cur.execute(STATS_FAILURES, (dataflow,)).fetchall())
            last_error = cur.execute(STATS_LAST_ERROR, (dataflow, dataflow)).fetchone()
            decided = cur.execute(STATS_DECIDED, (dataflow, since, dataflow, dataflow,
                                                  since)).fetchone()[0]
            skipped = dict(cur.execute(SKIPPED_COUNTS, (dataflow,)).fetchall())
        span = ((last_at - first_at) / 1000) if first_at is not None else 0
        return DataflowStats(
            dataflow=dataflow,
            known=row is not None,
            cursor=cursor,
            lag_changes=max(0, head - cursor),
            lag_seconds=round(max(0, now - oldest_unread) / 1000, 3)
            if oldest_unread and head_at else 0.0,
            pending=pending,
            retrying=retrying,
            decided=decided,
            delivered=delivered,
            failed=failures.get("failed", 0),
            superseded=failures.get("superseded", 0),
            requeued=failures.get("requeued", 0),
            latency_p50_ms=latency.get(p50) if p50 is not None else None,
            latency_p95_ms=latency.get(p95) if p95 is not None else None,
            delivered_per_s=round(delivered / span, 1) if span > 0 else float(delivered),
            last_error=last_error[0] if last_error else None,
            skipped=skipped,
        )

    def prune_deliveries(self, older_than_ms: int, limit: int | None = None) -> int:
        with self._txn() as cur:
            if limit is None:
                cur.execute(PRUNE_DELIVERIES, (older_than_ms,))
            else:
                cur.execute(PRUNE_DELIVERIES_LIMITED, (limit, older_than_ms))
            return cur.rowcount

    def prune_changes(self, older_than_ms: int, limit: int) -> int:
        with self._txn() as cur:
            cur.execute(PRUNE_CHANGES, (limit, older_than_ms))
            return cur.rowcount

    def prune_resolved_failures(self, older_than_ms: int, limit: int) -> int:
        with self._txn() as cur:
            cur.execute(PRUNE_RESOLVED, (older_than_ms, limit))
            return cur.rowcount

    # -- profile lifecycle -----------------------------------------------------------------------

    def forget(self, profile_ids: Sequence[str]) -> Forgotten:
        """Delete every row about these profiles in one transaction, then VACUUM the
        tables it touched.

        What PostgreSQL can promise about the bytes: once the transaction commits, no query
        sees the rows. The deleted rows stay in the table files as dead tuples until VACUUM
        removes them; VACUUM makes their space reusable (and drops their index entries) but
        does not overwrite it at once, so the bytes can stay on disk until PostgreSQL
        writes over that space. VACUUM cannot remove rows that a transaction still open
        elsewhere may see. The write-ahead log, replicas, archived WAL and backups keep
        copies of their own until they are recycled or expire. Only ``VACUUM FULL`` (an
        exclusive lock: not run here) rewrites a table without them. The SQLite store
        overwrites the bytes; this one cannot, and says so (README, "PostgreSQL state")."""
        keys = _keys(profile_ids)
        result = Forgotten()
        with self._txn(probe=True) as cur:
            cur.execute(XACT_LOCK, self._lock("ingest"))
            cur.execute(XACT_LOCK, self._lock("erase"))
            for kind, table in _FORGET_TABLES:
                cur.execute(FORGET_ROWS.format(table=table), keys)
                result.counts[kind] = cur.rowcount
            # a decision read before this forget may still name these profiles: the queueing
            # transaction checks for them when a forget happened since (``enqueue_exports``)
            cur.execute(MARK_FORGET, (now_ms(),))
            cur.execute(STEP_BACK_BACKFILLS, (keys["ids"],))
        touched = sorted({table for kind, table in _FORGET_TABLES if result.counts[kind]})
        if touched:
            try:
                with self.pool.connection() as conn:  # autocommit: VACUUM runs outside a transaction
                    conn.execute(VACUUM.format(tables=", ".join(touched)))
            except self._psycopg.Error as exc:  # the forget has committed: say so, do not fail it
                log.warning("forget committed, but VACUUM of %s failed: %s", ", ".join(touched),
                            str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
        return result

    def close(self) -> None:
        self.pool.close()


__all__ = ["PgSendLock", "PostgresStore"]
