"""The `profile-relay` command line (the interface contract in the README's Commands section)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

import flows  # noqa: F401  (first: Prefect's offline and start-up settings)
from config import Config, ConfigError, config_location, identity_warnings, load_config
from state.model import group_problem
from state.target import StateUnavailable, describe
from tasks.supervise import GROUP_DEPLOYMENT

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Stream customer profiles to HTTP endpoints.")
# emoji=False: rich would turn ":name:" in printed bodies and headers into emoji.
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
out = Console(highlight=False, soft_wrap=True, emoji=False)

ConfigOpt = Annotated[str, typer.Option(
    "-c", "--config", help="YAML config file, or prefect-block://NAME (see config push)")]


def _config(path: str) -> Config:
    """Validate the config the same way for every command; exit 2 when it is invalid."""
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]invalid config[/] {exc.source}:", markup=True)
        for field, message in exc.problems:
            err.print(f"  {field}: {message}" if field else f"  {message}", markup=False)
        raise typer.Exit(2) from None


def _run(coro: object) -> object:
    """Run a command's coroutine. A flow run without PREFECT_API_URL starts Prefect's
    temporary server: its first start in a PREFECT_HOME is made first, under a file lock,
    so that commands started at once do not race to set up the same database."""
    frame = getattr(coro, "cr_frame", None)
    if frame is not None and str(frame.f_globals.get("__name__", "")).startswith("prefect."):
        from app.tempserver import start_temporary_server

        try:
            start_temporary_server()
        except BaseException:
            coro.close()  # type: ignore[attr-defined]
            raise
    return asyncio.run(coro)  # type: ignore[arg-type]


def _finish(state: Any) -> None:
    """Print a flow run's figures; exit 3 when it ended Failed (exports in the failed
    store), 1 when it crashed."""
    from tasks.report import ExportsFailed

    result = state.result(raise_on_failure=False)
    if state.is_completed():
        out.print_json(data=result if isinstance(result, dict) else {})
        return
    if isinstance(result, ExportsFailed):
        out.print_json(data=result.counts)
    err.print(f"{state.name}: {state.message}", markup=False)
    raise typer.Exit(3 if isinstance(result, ExportsFailed) else 1)


@app.command()
def validate(config: ConfigOpt) -> None:
    """Check the config; exit 2 with each problem and its field path when invalid."""
    cfg = _config(config)
    for field in cfg.inline_secret_fields:
        err.print(f"warning: {field} is written inline; prefer ${{ENV_VAR}} or a Prefect "
                  "Secret block reference", markup=False)
    for line in identity_warnings(cfg):
        err.print(f"warning: {line}", markup=False)
    if any(d.template is not None for d in cfg.destinations):
        from tasks.sample import template_problems

        if problems := template_problems(cfg):
            err.print(f"[bold red]invalid config[/] {config}:", markup=True)
            for field, message in problems:
                err.print(f"  {field}: {message}", markup=False)
            raise typer.Exit(2)
    out.print(f"{config}: valid ({len(cfg.segments)} segment(s), {len(cfg.destinations)} "
              f"destination(s), {len(cfg.dataflows)} dataflow(s); state {describe(cfg.state_target)})",
              markup=False)


@app.command()
def ingest(config: ConfigOpt,
           files: Annotated[list[str], typer.Argument(help="NDJSON files, - for stdin")]) -> None:
    """Merge NDJSON profile fragments into the store; exit 1 if any line was rejected."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from state import open_store
    from tasks.ingest import ingest_files

    cfg = _config(config)
    for path in files:
        if path != "-" and not Path(path).is_file():
            err.print(f"error: {path}: no such file", markup=False)
            raise typer.Exit(2)
    store = open_store(cfg.state_target)
    total = sum(Path(p).stat().st_size for p in files if p != "-")
    shown = 0

    def reject(rejection: object) -> None:
        nonlocal shown
        shown += 1
        if shown <= 200:
            err.print(f"rejected {rejection}", markup=False)
        elif shown == 201:
            err.print("... (further rejections counted, not shown)", markup=False)

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err, transient=True,
                  disable=not sys.stderr.isatty() or total < 5_000_000) as bar:
        task_id = bar.add_task("ingest", total=total or None)
        result = ingest_files(store, files, frozenset(s.id for s in cfg.segments), on_reject=reject,
                              on_progress=lambda n: bar.advance(task_id, n))
    out.print(f"ingested {result.ingested}, rejected {result.rejected}", markup=False)
    raise typer.Exit(1 if result.rejected else 0)


@app.command()
def stream(config: ConfigOpt,
           dataflow: Annotated[str | None, typer.Option(help="only this dataflow")] = None,
           interval: Annotated[float, typer.Option(help="at most this many seconds between passes; new changes start one sooner")] = 2.0,
           once: Annotated[bool, typer.Option("--once", help="one whole pass, then exit")] = False,
           run_seconds: Annotated[float, typer.Option(help="end the run after this long")] = 3600.0,
           group: Annotated[int, typer.Option(help="with --groups: the shard group this run owns (from 0)")] = 0,
           groups: Annotated[int | None, typer.Option(help="split each dataflow's shards into this many groups (PostgreSQL state)")] = None,
           standby: Annotated[bool, typer.Option("--standby", help="with --groups: wait as the group's standby and take it over when its lease lapses")] = False,
           ) -> None:
    """Run the stream flow: poll for changes, export and deliver."""
    cfg = _config(config)
    if dataflow is not None:
        _known_dataflow(cfg, dataflow)
    if standby and groups is None:
        err.print("error: --standby needs --groups (a standby waits for one shard group)",
                  markup=False)
        raise typer.Exit(2)
    if groups is not None and (problem := group_problem(groups, group)):
        err.print(f"error: --{problem}", markup=False)
        raise typer.Exit(2)
    from flows.stream import stream_flow

    _finish(_run(stream_flow(config_location(config), dataflow, interval, once, run_seconds,
                             group, groups, standby, return_state=True)))


@app.command()
def supervise(config: ConfigOpt,
              groups: Annotated[int, typer.Option(help="shard groups per dataflow (1 to 256)")],
              deployment: Annotated[str, typer.Option(help="the stream deployment the group runs start from")] = GROUP_DEPLOYMENT,
              interval: Annotated[float, typer.Option(help="seconds between two looks at the leases")] = 2.0,
              run_seconds: Annotated[float, typer.Option(help="end after this long")] = 3600.0,
              group_run_seconds: Annotated[float, typer.Option(help="each group run ends after this long (and is replaced)")] = 3600.0,
              standby: Annotated[bool, typer.Option(help="keep a standby run per group too, which takes the group over within a poll of its lease lapsing")] = True,
              ) -> None:
    """Keep N shard-group stream runs alive on a Prefect work pool (PostgreSQL state)."""
    _config(config)
    if problem := group_problem(groups):
        err.print(f"error: --{problem}", markup=False)
        raise typer.Exit(2)
    from flows.supervise import supervise_flow

    _finish(_run(supervise_flow(config_location(config), groups, deployment, interval,
                                run_seconds, group_run_seconds=group_run_seconds,
                                standby=standby, return_state=True)))


def _known_dataflow(cfg: Config, name: str) -> None:
    try:
        cfg.dataflow(name)
    except KeyError as exc:
        err.print(f"error: {exc.args[0]}", markup=False)
        raise typer.Exit(2) from None


@app.command()
def backfill(config: ConfigOpt, dataflow: Annotated[str, typer.Option(help="dataflow name")],
             segment: Annotated[str | None, typer.Option(help="only this mapped segment")] = None,
             ) -> None:
    """Run the backfill flow for a dataflow (or one of its segments)."""
    cfg = _config(config)
    _known_dataflow(cfg, dataflow)
    if segment is not None and segment not in cfg.dataflow(dataflow).segments:
        err.print(f"error: segment {segment!r} is not mapped to {dataflow!r}", markup=False)
        raise typer.Exit(2)
    from flows.backfill import backfill_flow

    _finish(_run(backfill_flow(config_location(config), dataflow, segment, return_state=True)))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now_s: float | None = None) -> int:
    """``--since``: an ISO 8601 time (``2026-12-03T10:00:00Z``; no zone: UTC) or an age
    (``90s``, ``15m``, ``2h``, ``1d``); epoch milliseconds."""
    from datetime import UTC, datetime

    text = text.strip()
    if m := _DURATION.match(text):
        now = time.time() if now_s is None else now_s
        return int((now - float(m.group(1)) * _UNIT_SECONDS[m.group(2)]) * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither an ISO 8601 time (2026-12-03T10:00:00Z)"
                                 " nor an age such as 90s, 15m, 2h or 1d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _iso(ms: int | None) -> str:
    """Epoch ms as ISO 8601 UTC to the second; "-" for none."""
    from datetime import UTC, datetime

    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


@app.command()
def replay(config: ConfigOpt, dataflow: Annotated[str, typer.Option(help="dataflow name")],
           since: Annotated[str | None, typer.Option(
               help="only entries that failed since then: an ISO 8601 time or an age "
                    "(90s, 15m, 2h, 1d)")] = None,
           profile: Annotated[list[str] | None, typer.Option(
               help="only this profile's entry (repeat for several)")] = None) -> None:
    """Replay the failed-request store of a dataflow (or part of it), each profile with
    its current state."""
    cfg = _config(config)
    _known_dataflow(cfg, dataflow)
    since_ms = parse_since(since) if since is not None else None
    from flows.replay import replay_flow

    _finish(_run(replay_flow(config_location(config), dataflow, since_ms, profile or None,
                             return_state=True)))


@app.command()
def failed(config: ConfigOpt, dataflow: Annotated[str, typer.Option(help="dataflow name")],
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
           ) -> None:
    """List the failed-request store of a dataflow: profile, status, error, attempts,
    first and last failure, next automatic redelivery."""
    from rich.table import Table

    from state import open_store

    cfg = _config(config)
    store = open_store(cfg.state_target)
    try:
        entries = store.open_failures(dataflow)
    finally:
        store.close()
    rows = [{"profile": e.profile_id, "seq": e.seq, "status": e.last_status,
             "error": e.last_error, "attempts": e.attempts, "redeliveries": e.redeliveries,
             "first_failure": _iso(e.first_failed_at), "last_failure": _iso(e.last_failed_at),
             "next_redelivery": _iso(e.next_redelivery_at) if e.next_redelivery_at
             else "replay by hand", "idempotency_key": e.idempotency_key} for e in entries]
    if as_json:
        out.print_json(data={"dataflow": dataflow, "failed": rows})
        return
    table = Table(title=f"failed-request store of {dataflow}: {len(rows)} entr"
                        f"{'y' if len(rows) == 1 else 'ies'}")
    for col in ("profile", "status", "error", "attempts", "redeliveries", "first failure",
                "last failure", "next redelivery"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["profile"], str(r["status"] or "-"), (r["error"] or "")[:80],
                      str(r["attempts"]), str(r["redeliveries"]), r["first_failure"],
                      r["last_failure"], r["next_redelivery"])
    out.print(table)


@app.command()
def deliveries(config: ConfigOpt, dataflow: Annotated[str, typer.Option(help="dataflow name")],
               profile: Annotated[str, typer.Option(help="the profile id")],
               as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
               limit: Annotated[int, typer.Option(min=1, help="at most this many, newest "
                                                            "first")] = 100) -> None:
    """One profile's delivery history to a dataflow: when, which state (seq), the answer,
    attempts, newest first (within the delivery log's retention_days)."""
    from rich.table import Table

    from state import open_store

    cfg = _config(config)
    store = open_store(cfg.state_target)
    try:
        history = store.delivery_history(dataflow, profile, limit)
    finally:
        store.close()
    rows = [{"at": _iso(h.at), "seq": h.seq, "outcome": h.outcome, "status": h.status,
             "attempts": h.attempts, "idempotency_key": h.idempotency_key, "error": h.error}
            for h in history]
    if as_json:
        out.print_json(data={"dataflow": dataflow, "profile": profile, "deliveries": rows})
        return
    table = Table(title=f"deliveries of {profile} to {dataflow} (newest first)")
    for col in ("at", "seq", "outcome", "status", "attempts", "idempotency key", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["at"], str(r["seq"]), r["outcome"], str(r["status"] or "-"),
                      str(r["attempts"]), r["idempotency_key"], (r["error"] or "")[:60])
    out.print(table)
    if not rows:
        out.print(f"no delivery of {profile} to {dataflow} on record", markup=False)


@app.command()
def status(config: ConfigOpt,
           as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False) -> None:
    """Per dataflow: pending, delivered, failed, skipped, lag, latency p50/p95 (last hour).

    Dataflows removed from the config whose state is still stored are listed as removed;
    skipped are exports closed without a request, by reason."""
    from rich.table import Table

    from state import open_store

    cfg = _config(config)
    store = open_store(cfg.state_target)
    names = [f.name for f in cfg.dataflows]
    removed = [f.name for f in store.stored_dataflows() if f.name not in names]
    stats = [store.stats(name) for name in names + removed]
    breakers = {s.dataflow: store.breaker(s.dataflow) for s in stats}
    states = {s.dataflow: "removed" if s.dataflow in removed else
              "active" if s.known else "not started" for s in stats}
    if as_json:
        out.print_json(data={"dataflows": [{
            **s.as_dict(), "state": states[s.dataflow],
            "delivery": "paused" if breakers[s.dataflow].paused else "running",
            "paused_since": breakers[s.dataflow].paused_at,
            "next_probe_at": breakers[s.dataflow].next_probe_at,
            "failed_in_a_row": breakers[s.dataflow].failures_in_row} for s in stats]})
        return
    table = Table(title="profile-relay status (deliveries and latency: last hour)")
    for col in ("dataflow", "delivery", "lag", "pending", "retrying", "delivered", "failed",
                "skipped", "p50 ms", "p95 ms", "last error"):
        table.add_column(col)
    for s in stats:
        state = states[s.dataflow]
        breaker = breakers[s.dataflow]
        table.add_row(s.dataflow + ("" if state == "active" else f" ({state})"),
                      f"paused since {_iso(breaker.paused_at)}" if breaker.paused else "running",
                      f"{s.lag_changes} / {s.lag_seconds:.1f}s", str(s.pending), str(s.retrying),
                      str(s.delivered), str(s.failed), str(sum(s.skipped.values())),
                      str(s.latency_p50_ms or "-"), str(s.latency_p95_ms or "-"),
                      (s.last_error or "")[:60])
    out.print(table)
    for s in stats:
        breaker = breakers[s.dataflow]
        if breaker.paused:
            out.print(f"{s.dataflow}: delivery paused since {_iso(breaker.paused_at)} (exports "
                      f"failed in a row); next probe at {_iso(breaker.next_probe_at)}; new exports "
                      "stay queued", markup=False)
    for s in stats:
        if s.skipped:
            out.print(f"{s.dataflow}: skipped (closed without a request): " + ", ".join(
                f"{n} {why}" for why, n in s.skipped.items()), markup=False)
    if removed:
        out.print(f"removed from the config, state kept: {', '.join(removed)} (`profile-relay "
                  "dataflows drop -c CONFIG NAME` erases one)", markup=False)


@app.command()
def forget(config: ConfigOpt,
           profile_ids: Annotated[list[str] | None, typer.Argument(
               help="profile ids to erase", show_default=False)] = None,
           file: Annotated[Path | None, typer.Option(
               "--file", help="a file of profile ids, one a line")] = None) -> None:
    """Erase profiles everywhere and print what was erased.

    The profile, its memberships, change log, queued exports, dataflow snapshots, failed
    store entries and delivery records, in one transaction; a later fragment for the same
    id starts a new profile."""
    from state import open_store
    from tasks.lifecycle import LifecycleError, forget_profiles

    cfg = _config(config)
    ids = list(profile_ids or [])
    if file is not None:
        try:
            ids += [line.strip() for line in file.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            err.print(f"error: cannot read {file}: {getattr(exc, 'strerror', None) or exc}",
                      markup=False)
            raise typer.Exit(2) from None
    if not ids:
        err.print("error: no profile ids: give them as arguments or with --file", markup=False)
        raise typer.Exit(2)
    store = open_store(cfg.state_target)
    try:
        done = forget_profiles(store, ids)
    except LifecycleError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    finally:
        store.close()
    unique = len(set(ids))
    found = done.counts.get("profiles", 0)
    out.print(f"forgot {found} of {unique} profile(s)"
              + (f"; {unique - found} not in the store" if found < unique else "")
              + "; erased:", markup=False)
    for kind, count in done.counts.items():
        out.print(f"  {kind:<20} {count}", markup=False)
    if done.rewritten:
        out.print("the store's file was rewritten once (VACUUM) to clear what earlier versions "
                  "deleted without overwriting", markup=False)
    if not done.wal_truncated:
        err.print("warning: another process was reading the store: its write-ahead log still "
                  "holds erased pages until the next checkpoint", markup=False)


config_app = typer.Typer(no_args_is_help=True, help="A config kept in Prefect, for workers "
                         "on any machine: push one, then run with -c prefect-block://NAME.")
app.add_typer(config_app, name="config")


@config_app.command("push")
def config_push(config: ConfigOpt,
                name: Annotated[str, typer.Option(help="the block's name (letters, digits, -)")],
                ) -> None:
    """Validate a config file and store it in Prefect as a block (secrets stay references)."""
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        err.print(f"error: --name {name!r}: lowercase letters, digits and '-' only", markup=False)
        raise typer.Exit(2)
    cfg = _config(config)
    if cfg.inline_secret_fields:  # stored in Prefect as plain text: refuse
        err.print("error: a pushed config keeps secrets as references (${ENV_VAR} or a "
                  "Prefect Secret block); written inline: "
                  + ", ".join(cfg.inline_secret_fields), markup=False)
        raise typer.Exit(2)
    from config.blocks import push_config_text

    text = Path(config).read_text(encoding="utf-8")
    try:
        push_config_text(name, text, config_location(config))
    except Exception as exc:  # the server's errors vary; one line, no traceback
        err.print(f"error: cannot store the config in Prefect ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''})", markup=False)
        raise typer.Exit(1) from None
    out.print(f"pushed {config} as prefect-block://{name} ({len(cfg.dataflows)} dataflow(s)); "
              f"run with -c prefect-block://{name}", markup=False)


dataflows_app = typer.Typer(no_args_is_help=True, help="Stored dataflows: drop a removed "
                            "dataflow's state.")
app.add_typer(dataflows_app, name="dataflows")


@dataflows_app.command("drop")
def dataflows_drop(config: ConfigOpt,
                   name: Annotated[str, typer.Argument(help="a dataflow no longer in the config")],
                   ) -> None:
    """Erase the state of a dataflow removed from the config.

    Refused for a dataflow still in the config. Added again after a drop, a dataflow
    starts afresh (with a backfill)."""
    from state import open_store
    from tasks.lifecycle import LifecycleError, drop_dataflow

    cfg = _config(config)
    store = open_store(cfg.state_target)
    try:
        counts = drop_dataflow(store, cfg, name)
    except LifecycleError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from None
    finally:
        store.close()
    out.print(f"dropped dataflow {name!r}; erased: " + ", ".join(
        f"{kind} {count}" for kind, count in counts.items()), markup=False)


@app.command("test-send")
def test_send(config: ConfigOpt,
              destination: Annotated[str, typer.Option(help="destination name")],
              dry_run: Annotated[bool, typer.Option(
                  "--dry-run", help="print the request (headers, exact body) without sending")
              ] = False) -> None:
    """Send one sample profile and print the answer; exit non-zero unless it is 2xx."""
    cfg = _config(config)
    try:
        cfg.destination(destination)
    except KeyError as exc:
        err.print(f"error: {exc.args[0]}; known: {[d.name for d in cfg.destinations]}",
                  markup=False)
        raise typer.Exit(2) from None
    from tasks.body import TemplateError
    from tasks.sample import sample_request, send_sample

    dest = cfg.destination(destination)
    try:
        if dry_run:
            _print_request(sample_request(cfg, destination), dest)
            return
        result = _run(send_sample(cfg, destination))
    except TemplateError as exc:
        index = [d.name for d in cfg.destinations].index(destination)
        err.print(f"error: destinations[{index}].template: {exc} (rendering the sample "
                  "profile)", markup=False)
        raise typer.Exit(2) from None
    modelled = _modelled(result.sample)
    out.print(f"{dest.method} {result.url}", markup=False)
    if route := _route(dest):
        out.print(f"  ({route})", markup=False)
    for name, value in [*result.headers, *_encoding_header(dest)]:
        out.print(f"  {name}: {value}", markup=False)
    out.print(f"  body ({len(result.sample.body)} bytes"
              f"{', sent gzip-compressed' if dest.compression == 'gzip' else ''}, "
              f"sample {modelled}):", markup=False)
    out.print(f"  {result.sample.body.decode()}", markup=False)
    outcome = result.outcome
    status = str(outcome.status) if outcome.status is not None else "no response"
    out.print(f"status {status}, latency {outcome.latency_ms:.1f} ms", markup=False)
    if result.body_start:
        out.print("response body (first 300 bytes):", markup=False)
        out.print("  " + result.body_start.decode("utf-8", "replace"), markup=False)
    if result.ok:
        out.print("ok: the endpoint accepted the sample", markup=False)
        return
    diag = result.diagnosis
    assert diag is not None
    err.print(f"failed: {diag.reason}: {diag.detail or 'no detail'}", markup=False)
    if diag.reason != "TLS/certificate":
        # a TLS error's text already says what to change (ca_bundle, client_cert, the host
        # name); the general TLS hint would only contradict it
        err.print(f"hint: {diag.hint}", markup=False)
    raise typer.Exit(1)


def _route(dest: Any) -> str | None:
    """Which proxy test-send's request goes through (host and port only), if any."""
    from destinations.network import proxy_for

    proxy = proxy_for(dest.endpoint, dest.proxy)
    if proxy is None:
        return None
    source = "the destination's proxy" if proxy.source == "proxy" else proxy.source
    return f"via proxy {proxy.where}, from {source}"


def _encoding_header(dest: Any) -> list[tuple[str, str]]:
    """The header ``compression: gzip`` adds to every request."""
    return [("Content-Encoding", "gzip")] if dest.compression == "gzip" else []


def _modelled(sample: Any) -> str:
    """What the sample profile was modelled on, for test-send's output."""
    return (f"modelled on dataflow {sample.dataflow!r}" if sample.dataflow
            else "no dataflow uses this destination: identities only")


def _print_request(request: Any, dest: Any) -> None:
    """``test-send --dry-run``: the request line, the headers (secret values masked), a
    blank line, then the body byte for byte (before compression, with ``compression:
    gzip``: what the receiver reads once it has decoded it)."""
    from destinations.sender import gzip_body

    modelled = _modelled(request.sample)
    body = request.sample.body
    gzipped = dest.compression == "gzip"
    out.print(f"{dest.method} {request.url}", markup=False)
    for name, value in [*request.headers, *_encoding_header(dest)]:
        out.print(f"{name}: {value}", markup=False)
    out.print(f"Content-Length: {len(gzip_body(body) if gzipped else body)}", markup=False)
    out.print("", markup=False)
    sys.stdout.flush()
    out.file.write(body.decode())
    if not body.endswith(b"\n"):
        out.file.write("\n")
    out.file.flush()
    what = ("exactly what test-send would send, before gzip compression" if gzipped
            else "exactly what test-send would send")
    route = _route(dest)
    err.print(f"dry run: nothing sent (sample {modelled}; the body above is {what}"
              f"{'; ' + route if route else ''})", markup=False)


@app.command()
def receiver(
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0: any free one)")] = 8080,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    fail_rate: Annotated[float, typer.Option(min=0.0, max=1.0,
                                             help="answer 500 with this probability")] = 0.0,
    status: Annotated[int | None, typer.Option(min=100, max=599,
                                               help="always answer this status")] = None,
    record: Annotated[Path, typer.Option(help="NDJSON file each request is appended to")] = Path(
        "receiver.ndjson"),
    seed: Annotated[int | None, typer.Option(help="random seed for --fail-rate")] = None,
) -> None:
    """A local endpoint: accepts POSTs on any path, answers 200 and records them."""
    from app.receiver import Receiver, serve_until_stopped

    def ready(r: Receiver) -> None:
        answers = (f"answers {status}" if status is not None
                   else f"answers 200, 500 with probability {fail_rate:g}" if fail_rate
                   else "answers 200")
        out.print(f"receiver listening on {r.base_url} ({answers}; recording to {record}); "
                  "Ctrl-C stops", markup=False)

    try:
        record.open("ab").close()
    except OSError as exc:
        err.print(f"error: cannot write {record}: {exc.strerror or exc}", markup=False)
        raise typer.Exit(2) from None
    try:
        count = asyncio.run(serve_until_stopped(port, host, status, fail_rate, record,
                                                echo=sys.stdout, seed=seed, on_ready=ready))
    except OSError as exc:
        err.print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", markup=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # signal handlers unavailable (not the main thread)
        count = None
    out.print("receiver stopped" + (f" after {count} request(s)" if count is not None else ""),
              markup=False)


@app.command()
def demo(directory: Annotated[Path, typer.Option("--dir", help="scratch folder (wiped first)")] = Path(
        "demo-run")) -> None:
    """The whole job on the embedded default, end to end, on this machine."""
    from app.demo import DemoError, run_demo

    try:
        problems = asyncio.run(run_demo(directory, echo=lambda text: out.print(text, markup=False)))
    except DemoError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(1 if problems else 0)


@app.command()
def serve(config: ConfigOpt,
          interval: Annotated[float, typer.Option(help="stream: seconds between polls")] = 2.0,
          run_seconds: Annotated[float, typer.Option(
              min=10.0, help="stream: length of each run, and its schedule interval")] = 3600.0,
          replay_cron: Annotated[str, typer.Option(help="replay schedule (cron)")] = "*/15 * * * *",
          prefect_port: Annotated[int | None, typer.Option(
              min=0, max=65535, help="start a Prefect server of our own on this port (0: any "
              "free one) instead of using PREFECT_API_URL or one on port 4200")] = None,
          ) -> None:
    """Serve the Prefect deployments (stream, backfill, replay) in this process.

    Without PREFECT_API_URL, it uses a Prefect server on 127.0.0.1:4200 or starts one
    (with its UI) for as long as it runs."""
    cfg = _config(config)
    if not cfg.dataflows:
        err.print("error: the config has no dataflows to serve", markup=False)
        raise typer.Exit(2)
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from app.serve import ServerError
    from app.serve import serve as serve_deployments

    try:
        CronSchedule(cron=replay_cron)
    except ValidationError:
        err.print(f"error: --replay-cron {replay_cron!r} is not a valid cron expression",
                  markup=False)
        raise typer.Exit(2) from None

    def ready(names: list[str]) -> None:
        out.print(f"serving {len(names)} deployment(s) of {config}: {', '.join(names)}; "
                  f"the stream runs now and every {run_seconds:g} s, replay on "
                  f"'{replay_cron}'; Ctrl-C stops", markup=False)

    try:
        serve_deployments(config_location(config), cfg, interval, run_seconds, replay_cron,
                          on_ready=ready, echo=lambda text: err.print(text, markup=False),
                          server_port=prefect_port)
    except ServerError as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    out.print("serve stopped", markup=False)


def main() -> None:
    try:
        app()
    except StateUnavailable as exc:  # one line naming state (no password), not a traceback
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
