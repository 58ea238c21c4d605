"""What every flow and command does first: load and validate the config, open the store."""

from __future__ import annotations

import os
from pathlib import Path

import sqlite_utils

from destinations.config import Config, Dataflow, load_config
from state.db import open_db

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# A fresh PREFECT_HOME spends ~15 s migrating its database; Prefect's default 20 s wait for
# its temporary server is too close to that on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def open_config(config_path: str | Path) -> tuple[Config, sqlite_utils.Database]:
    config = load_config(config_path)
    return config, open_db(config.state_path)


def select_dataflows(config: Config, name: str | None) -> list[Dataflow]:
    """One named dataflow, or all of them."""
    if name is None:
        return list(config.dataflows)
    return [config.dataflow(name)]
