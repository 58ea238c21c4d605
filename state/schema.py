"""The store's schema as numbered migrations; append, never edit a released one.

A profile is one row: its attributes, identity map and segment statuses as one orjson
document each, and the segments it is qualified for as a short framed string (a fragment
merge is one read and one row write, however many segments it touches; backfills filter on
that string). The change log keeps one row per fragment with what it wrote, which the
stream flow explodes in Polars. ``profile_segments`` (the long form of memberships that
migrations 1 to 5 kept as a table) is a view over the profile rows since migration 6.
"""

MIGRATIONS: list[str] = [
    # 1: profile store, change log, dataflow state, outbox, delivery log, failed store
    """
    CREATE TABLE profiles (
        profile_id TEXT PRIMARY KEY,
        shard INTEGER NOT NULL,
        attributes BLOB NOT NULL,          -- orjson document
        identity_map BLOB NOT NULL,        -- orjson {namespace: [{"id": ...}]}
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_seq INTEGER NOT NULL
    );
    CREATE TABLE profile_segments (
        profile_id TEXT NOT NULL,
        segment_id TEXT NOT NULL,
        status TEXT NOT NULL,              -- realized | existing | exited
        last_qualification_time TEXT,      -- ISO 8601 UTC
        PRIMARY KEY (profile_id, segment_id)
    ) WITHOUT ROWID;
    CREATE INDEX profile_segments_by_segment ON profile_segments (segment_id, status, profile_id);
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        profile_id TEXT NOT NULL,
        shard INTEGER NOT NULL,
        ts INTEGER NOT NULL,               -- when the change happened (fragment timestamp, ms)
        committed_at INTEGER NOT NULL,     -- when the ingest transaction committed (ms)
        attr_paths TEXT,                   -- leaf paths written, newline separated
        identities TEXT,                   -- JSON of identities written
        identity_added INTEGER NOT NULL,   -- 1 when the identity map gained an identity
        segments TEXT                      -- JSON {segment: status} written
    );
    CREATE TABLE dataflows (
        name TEXT PRIMARY KEY,
        destination TEXT NOT NULL,
        mapping_hash TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        cursor INTEGER NOT NULL            -- last change seq decided for this dataflow
    );
    CREATE TABLE dataflow_segments (
        dataflow TEXT NOT NULL,
        segment_id TEXT NOT NULL,
        mapping_created_at INTEGER NOT NULL,
        mapping_updated_at INTEGER NOT NULL,
        PRIMARY KEY (dataflow, segment_id)
    ) WITHOUT ROWID;
    CREATE TABLE dataflow_profiles (
        dataflow TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        qualified TEXT NOT NULL,           -- mapped segments the dataflow last saw qualified, newline separated
        exported_seq INTEGER NOT NULL DEFAULT 0,
        delivered_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (dataflow, profile_id)
    ) WITHOUT ROWID;
    CREATE TABLE backfills (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dataflow TEXT NOT NULL,
        segment_id TEXT,                   -- NULL: every mapped segment (a new dataflow)
        reason TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        total INTEGER,
        done INTEGER NOT NULL DEFAULT 0,
        after_profile TEXT NOT NULL DEFAULT '',
        finished_at INTEGER
    );
    CREATE TABLE outbox (
        dataflow TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        shard INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        change_at INTEGER NOT NULL,        -- commit time of the change that caused it (latency)
        enqueued_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        first_attempt_at INTEGER,
        last_attempt_at INTEGER,
        last_status INTEGER,
        last_error TEXT,
        PRIMARY KEY (dataflow, profile_id)
    ) WITHOUT ROWID;
    CREATE INDEX outbox_due ON outbox (dataflow, next_attempt_at);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dataflow TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        delivered_at INTEGER NOT NULL
    );
    CREATE INDEX deliveries_by_time ON deliveries (dataflow, delivered_at);
    CREATE TABLE failed_requests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dataflow TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        shard INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        last_status INTEGER,
        last_error TEXT,
        first_attempt_at INTEGER,
        last_attempt_at INTEGER,
        state TEXT NOT NULL DEFAULT 'failed',   -- failed | requeued | superseded
        resolved_at INTEGER
    );
    CREATE INDEX failed_open ON failed_requests (dataflow, state)
    """,
    # 2: the by-segment index without status: a status change (realized -> existing, the
    # commonest write) no longer moves an index entry; halved the membership upsert in the
    # ingest benchmark. Backfill walks the primary key and counts read status from the row.
    """
    DROP INDEX profile_segments_by_segment;
    CREATE INDEX profile_segments_by_segment ON profile_segments (segment_id)
    """,
    # 3: the outbox as a rowid table. As WITHOUT ROWID, each ~1 KB body spilled into a 4 KB
    # overflow page of its own (about 4.7 KB per queued export); as a rowid table the store
    # is a third of the size, backfill writes ~27 % less, and draining is ~2.5x faster
    # (bench/dispatch.py). The due index reads fresh exports in seq order up to a limit.
    """
    CREATE TABLE outbox_v3 (
        id INTEGER PRIMARY KEY,
        dataflow TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        shard INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        change_at INTEGER NOT NULL,
        enqueued_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        first_attempt_at INTEGER,
        last_attempt_at INTEGER,
        last_status INTEGER,
        last_error TEXT,
        UNIQUE (dataflow, profile_id)
    );
    INSERT INTO outbox_v3 (dataflow, profile_id, shard, seq, idempotency_key, body, reason,
        change_at, enqueued_at, attempts, next_attempt_at, first_attempt_at, last_attempt_at,
        last_status, last_error)
    SELECT dataflow, profile_id, shard, seq, idempotency_key, body, reason, change_at,
        enqueued_at, attempts, next_attempt_at, first_attempt_at, last_attempt_at, last_status,
        last_error FROM outbox ORDER BY seq;
    DROP TABLE outbox;
    ALTER TABLE outbox_v3 RENAME TO outbox;
    CREATE INDEX outbox_due ON outbox (dataflow, next_attempt_at, seq)
    """,
    # 4: the outbox holds references, never wire format: a body is rendered from the
    # profile's state when it is sent, and its idempotency key identifies that state.
    # Leases (one owner per dataflow and shard group, with an epoch) for the senders.
    """
    CREATE TABLE outbox_v4 (
        id INTEGER PRIMARY KEY,
        dataflow TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        shard INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        reason TEXT NOT NULL,
        change_at INTEGER NOT NULL,
        enqueued_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        first_attempt_at INTEGER,
        last_attempt_at INTEGER,
        last_status INTEGER,
        last_error TEXT,
        UNIQUE (dataflow, profile_id)
    );
    INSERT INTO outbox_v4 (dataflow, profile_id, shard, seq, reason, change_at, enqueued_at,
        attempts, next_attempt_at, first_attempt_at, last_attempt_at, last_status, last_error)
    SELECT dataflow, profile_id, shard, seq, reason, change_at, enqueued_at, attempts,
        next_attempt_at, first_attempt_at, last_attempt_at, last_status, last_error
    FROM outbox ORDER BY seq;
    DROP TABLE outbox;
    ALTER TABLE outbox_v4 RENAME TO outbox;
    CREATE INDEX outbox_due ON outbox (dataflow, next_attempt_at, seq);
    CREATE TABLE leases (
        dataflow TEXT NOT NULL,
        grp INTEGER NOT NULL,
        owner TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (dataflow, grp)
    ) WITHOUT ROWID
    """,
    # 5: the profile lifecycle. The change log flags any change of the identity map (an
    # identity added or removed, a field of one changed), not only additions. A dataflow
    # keeps its endpoint (no query string, no credentials) to tell when it moved, when a
    # run found it gone from the config, and the segments it mapped once and unmapped
    # since (a remap also exports the exits that happened meanwhile). Exports closed
    # without a request are counted per reason. store_flags: whether every deleted byte of
    # this file was zeroed from its creation (secure_delete); a store made by an earlier
    # version is rewritten once (VACUUM) by the first forget. free_page_scrub: an always
    # empty table that a forget fills with zeros to overwrite the free pages.
    """
    ALTER TABLE changes RENAME COLUMN identity_added TO identity_changed;
    ALTER TABLE dataflows ADD COLUMN endpoint TEXT;
    ALTER TABLE dataflows ADD COLUMN removed_at INTEGER;
    CREATE TABLE dataflow_unmapped_segments (
        dataflow TEXT NOT NULL,
        segment_id TEXT NOT NULL,
        unmapped_at INTEGER NOT NULL,
        PRIMARY KEY (dataflow, segment_id)
    ) WITHOUT ROWID;
    CREATE TABLE skipped_exports (
        dataflow TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        last_at INTEGER NOT NULL,
        PRIMARY KEY (dataflow, reason)
    ) WITHOUT ROWID;
    CREATE TABLE store_flags (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO store_flags (name, value)
        SELECT 'deletes_zeroed', NOT EXISTS (SELECT 1 FROM sqlite_sequence);
    CREATE TABLE free_page_scrub (zeros BLOB)
    """,
    # 6: memberships move into the profile row. As a table of their own (a row per profile
    # and segment, with a by-segment index) every fragment upserted about two of them besides
    # its profile row: three B-tree writes where one does (bench/ingest.py). ``segments`` is
    # the orjson document {segment: [status, lastQualificationTime]}; ``qualified`` the
    # segments qualified now (realized or existing), sorted, each between line feeds
    # ("\nseg-a\nseg-b\n", or "" for none), which a backfill or a count filters on with
    # instr(). Memberships of a profile that had no profile row become a profile with no
    # attributes (``relay_shard``: the shard function, registered by ``state.db.open_db``).
    # ``profile_segments`` stays readable in long form as a view; inserting into it sets the
    # membership on the (existing) profile's row.
    """
    ALTER TABLE profiles ADD COLUMN segments BLOB NOT NULL DEFAULT '{}';
    ALTER TABLE profiles ADD COLUMN qualified TEXT NOT NULL DEFAULT '';
    INSERT INTO profiles (profile_id, shard, attributes, identity_map, created_at, updated_at,
        last_seq)
    SELECT DISTINCT m.profile_id, relay_shard(m.profile_id), X'7B7D', X'7B7D',
        CAST(strftime('%s', 'now') AS INTEGER) * 1000,
        CAST(strftime('%s', 'now') AS INTEGER) * 1000, 0
    FROM profile_segments m
    WHERE NOT EXISTS (SELECT 1 FROM profiles p WHERE p.profile_id = m.profile_id);
    UPDATE profiles SET
        segments = coalesce((SELECT json_group_object(segment_id,
                json_array(status, last_qualification_time))
            FROM (SELECT segment_id, status, last_qualification_time FROM profile_segments m
                  WHERE m.profile_id = profiles.profile_id ORDER BY segment_id)), '{}'),
        qualified = coalesce((SELECT char(10) || group_concat(segment_id, char(10)) || char(10)
            FROM (SELECT segment_id FROM profile_segments m
                  WHERE m.profile_id = profiles.profile_id
                  AND status IN ('realized', 'existing') ORDER BY segment_id)), '')
    WHERE EXISTS (SELECT 1 FROM profile_segments m WHERE m.profile_id = profiles.profile_id);
    DROP TABLE profile_segments;
    CREATE VIEW profile_segments (profile_id, segment_id, status, last_qualification_time) AS
    SELECT p.profile_id, j.key, j.value ->> 0, j.value ->> 1
    FROM profiles p, json_each(CAST(p.segments AS TEXT)) j;
    CREATE TRIGGER profile_segments_insert INSTEAD OF INSERT ON profile_segments BEGIN
        UPDATE profiles SET segments = json_patch(CAST(segments AS TEXT), json_object(NEW.segment_id,
            json_array(NEW.status, NEW.last_qualification_time)))
        WHERE profile_id = NEW.profile_id;
        UPDATE profiles SET qualified = coalesce((SELECT char(10) || group_concat(key, char(10))
            || char(10) FROM (SELECT key FROM json_each(CAST(profiles.segments AS TEXT))
                              WHERE value ->> 0 IN ('realized', 'existing') ORDER BY key)), '')
        WHERE profile_id = NEW.profile_id;
    END
    """,
    # 7: endpoints in the wild. The failed store redelivers by itself on a schedule: an
    # entry knows how many redeliveries came before it, when the export first failed for
    # good and when it is due again; a queued export carries its redelivery count. Each
    # dataflow has a circuit breaker. A profile's history reads the failed store by profile;
    # the delivery log has no index by profile on purpose: a random B-tree insert per
    # delivery cost 40 % of recording an outcome (8 of 20 us), for an operator's command
    # that can scan the dataflow's log instead.
    """
    ALTER TABLE outbox ADD COLUMN redelivery INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN first_failed_at INTEGER;
    ALTER TABLE failed_requests ADD COLUMN redelivery INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE failed_requests ADD COLUMN first_failed_at INTEGER;
    ALTER TABLE failed_requests ADD COLUMN next_redelivery_at INTEGER;
    UPDATE failed_requests SET first_failed_at = last_attempt_at;
    CREATE INDEX failed_by_profile ON failed_requests (dataflow, profile_id);
    CREATE INDEX failed_redelivery_due ON failed_requests (dataflow, next_redelivery_at)
        WHERE state = 'failed' AND next_redelivery_at IS NOT NULL;
    CREATE TABLE breakers (
        dataflow TEXT PRIMARY KEY,
        failures_in_row INTEGER NOT NULL,
        paused_at INTEGER,
        next_probe_at INTEGER
    ) WITHOUT ROWID
    """,
]
