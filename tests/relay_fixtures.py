"""Building a real store with exports queued, for the delivery tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson

from config import Config, load_config
from state import Store, open_store
from tasks import pipeline
from tasks.ingest import ingest_stream
from tasks.pipeline import PassResult
from testkit.procs import FLOW, write_config

# what the in-process delivery tests want of the destination unless they say otherwise
FAST = {"retry_backoff_seconds": 0, "timeout_seconds": 2}


def fragment(pid: str, first: str = "Ann", status: str | None = "realized") -> bytes:
    doc: dict[str, Any] = {"profileId": pid, "attributes": {"person": {"name": {"firstName": first}}}}
    if status:
        doc["segmentMembership"] = {"ups": {"seg-a": {"status": status}}}
    return orjson.dumps(doc) + b"\n"


def ingest(store: Store, config: Config, *lines: bytes) -> None:
    ingest_stream(store, io.BytesIO(b"".join(lines)), "test",
                  frozenset(s.id for s in config.segments))


def decide(store: Store, config: Config) -> None:
    """One export pass of the dataflow (mappings, backfills, micro-batches), no sending."""
    pipeline.decide_pass(store, config, config.dataflow(FLOW), PassResult())


def store(tmp_path: Path, endpoint: str, **dest: Any) -> tuple[Config, Store]:
    config = load_config(write_config(tmp_path, endpoint, **(FAST | dest)))
    st = open_store(config.state_path)
    decide(st, config)  # registers the dataflow so later changes stream
    return config, st
