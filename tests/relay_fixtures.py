"""Building a real store with exports queued, for the delivery tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import sqlite_utils
import yaml

from destinations.config import Config, load_config
from state import dataflows as flows_state
from state.db import open_db
from tasks.export import export_batch, payload_spec, run_backfill, sync_mapping
from tasks.ingest import ingest_stream

FLOW = "crm-stream"


def write_config(tmp_path: Path, endpoint: str, **dest: Any) -> Path:
    """A config with one destination at ``endpoint`` (``dest`` overrides its options)."""
    doc = {
        "state": "relay.db",
        "segments": [{"id": "seg-a", "name": "A"}, {"id": "seg-b", "name": "B"}],
        "destinations": [{"name": "crm", "endpoint": endpoint, "retry_backoff_seconds": 0,
                          "timeout_seconds": 2, **dest}],
        "dataflows": [{"name": FLOW, "destination": "crm", "segments": ["seg-a"],
                       "attributes": ["person.name.firstName"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def fragment(pid: str, first: str = "Ann", status: str | None = "realized") -> bytes:
    doc: dict[str, Any] = {"profileId": pid, "attributes": {"person": {"name": {"firstName": first}}}}
    if status:
        doc["segmentMembership"] = {"ups": {"seg-a": {"status": status}}}
    return orjson.dumps(doc) + b"\n"


def ingest(db: sqlite_utils.Database, config: Config, *lines: bytes) -> None:
    ingest_stream(db, io.BytesIO(b"".join(lines)), "test", frozenset(s.id for s in config.segments))


def decide(db: sqlite_utils.Database, config: Config) -> None:
    """One export pass of the dataflow (mappings, backfills, micro-batches), no sending."""
    flow = config.dataflow(FLOW)
    sync_mapping(db, config, flow)
    spec = payload_spec(db, config, flow)
    for job in flows_state.open_backfills(db, FLOW):
        run_backfill(db, flow, spec, job)
    while export_batch(db, flow, spec):
        pass


def store(tmp_path: Path, endpoint: str, **dest: Any) -> tuple[Config, sqlite_utils.Database]:
    config = load_config(write_config(tmp_path, endpoint, **dest))
    db = open_db(config.state_path)
    decide(db, config)  # registers the dataflow so later changes stream
    return config, db
