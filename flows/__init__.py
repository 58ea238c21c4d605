"""The Prefect flows: stream, backfill, replay. Importing this package first sets Prefect's
offline defaults, so nothing leaves the machine unless the user asks for it."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# A fresh PREFECT_HOME spends ~15 s migrating its database; Prefect's default 20 s wait for
# its temporary server is too close to that on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
