"""What an operator sees in the Prefect UI of `profile-relay serve`, checked in a real browser
(slow: `make test-browser`, which installs Chromium and Playwright when they are missing).

`serve` starts its own Prefect server on a port other than 4200 (``--prefect-port``); the
UI it serves must call the API on that port (a blank UI otherwise). The config has two
dataflows: ``local-stream`` to an endpoint answering 200 and ``bad-stream`` to one answering
400, so the first stream run (which backfills both) ends Failed, and the next one, with
nothing left to send, ends Completed with its summary artifact. Headless Chromium then
opens the UI and checks the deployments, both runs and the artifact; screenshots go to
``docs/screenshots/`` (``SCREENSHOTS_DIR`` to put them elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.procs import free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / ".venv" / "bin" / "profile-relay"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SHOTS = Path(os.environ.get("SCREENSHOTS_DIR", ROOT / "docs" / "screenshots"))


def _browser_available() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (make test-browser installs it)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (make test-browser installs it)"
    return None


@contextlib.contextmanager
def child(args: list[str], log: Path, env: dict[str, str], cwd: Path
          ) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def receiver(stack: contextlib.ExitStack, tmp_path: Path, env: dict[str, str], name: str,
             *options: str) -> str:
    log = tmp_path / f"{name}.log"
    stack.enter_context(child([str(RELAY), "receiver", "--port", "0", "--record",
                               str(tmp_path / f"{name}.ndjson"), *options], log, env, tmp_path))
    found = wait_for(lambda: re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text()),
                     30, 0.1, f"the {name} receiver")
    return found.group(1) + "/hook"


def write_config(tmp_path: Path, good: str, bad: str) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text(encoding="utf-8"))
    [local] = doc["destinations"]
    local["endpoint"] = good
    doc["destinations"].append({**local, "name": "partner", "endpoint": bad,
                                "description": "answers 400 to everything"})
    doc["dataflows"].append({"name": "bad-stream", "destination": "partner",
                             "segments": ["seg-vip"], "attributes": ["person.name.firstName"]})
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def stream_runs(api_url: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(
            name=FlowFilterName(any_=["profile-relay-stream"])))


def by_state(runs: list[Any], state: str) -> list[Any]:
    return [r for r in runs if r.state_type.value == state]


def test_serve_ui_on_another_port_shows_deployments_runs_and_artifacts(tmp_path: Path) -> None:
    if reason := _browser_available():
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    port = free_port()
    while port == 4200:
        port = free_port()
    base = f"http://127.0.0.1:{port}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        good = receiver(stack, tmp_path, env, "receiver")
        bad = receiver(stack, tmp_path, env, "partner", "--status", "400")
        config = write_config(tmp_path, good, bad)
        subprocess.run([str(RELAY), "ingest", "-c", str(config),
                        str(ROOT / "examples" / "profiles.ndjson")], cwd=tmp_path, env=env,
                       check=True, capture_output=True, timeout=60)
        serve_log = tmp_path / "serve.log"
        serve = stack.enter_context(child(
            [str(RELAY), "serve", "-c", str(config), "--prefect-port", str(port),
             "--run-seconds", "10", "--interval", "1"], serve_log, env, tmp_path))
        wait_for(lambda: "serving 4 deployment(s)" in serve_log.read_text() or serve.poll(),
                 180, 0.5, "serve")
        assert serve.poll() is None, serve_log.read_text()
        api_url = f"{base}/api"
        # the first stream run backfills both dataflows: bad-stream's exports get 400 (Failed);
        # the next run takes over and, with nothing left to send, ends Completed
        runs = wait_for(lambda: (lambda rs: rs if by_state(rs, "FAILED") and
                                 by_state(rs, "COMPLETED") else None)(stream_runs(api_url)),
                        90, 1, "a failed and a completed stream run")
        [failed] = by_state(runs, "FAILED")[:1]
        completed = by_state(runs, "COMPLETED")[0]
        assert "ended in the failed store" in (failed.state.message or ""), failed.state

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            calls: list[str] = []
            page.on("request", lambda r: calls.append(r.url) if "/api/" in r.url else None)

            page.goto(f"{base}/deployments")
            for name in ("stream", "backfill", "replay-local-stream", "replay-bad-stream"):
                expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible(
                    timeout=30_000)
            page.screenshot(path=str(SHOTS / "deployments.png"), full_page=True)
            assert calls and all(u.startswith(base) for u in calls), calls[:5]

            page.set_viewport_size({"width": 1440, "height": 1250})
            page.goto(f"{base}/runs")
            expect(page.get_by_text(failed.name).first).to_be_visible(timeout=30_000)
            expect(page.get_by_text(completed.name).first).to_be_visible(timeout=30_000)
            expect(page.get_by_text("Failed").first).to_be_visible()
            expect(page.get_by_text("Completed").first).to_be_visible()
            page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)

            page.set_viewport_size({"width": 1440, "height": 900})
            page.goto(f"{base}/runs/flow-run/{failed.id}")
            expect(page.get_by_text("Failed").first).to_be_visible(timeout=30_000)
            warning = page.get_by_text("ended in the failed store").first
            expect(warning).to_be_visible(timeout=30_000)
            warning.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "failed-run.png"))

            page.goto(f"{base}/runs/flow-run/{completed.id}")
            expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            key = page.get_by_text(re.compile(r"stream-local-stream-[0-9a-f]{8}")).first
            expect(key).to_be_visible(timeout=30_000)
            page.screenshot(path=str(SHOTS / "stream-run-artifacts.png"), full_page=True)

            key.click()
            expect(page.get_by_text("exports decided (streamed)").first).to_be_visible(
                timeout=30_000)
            page.screenshot(path=str(SHOTS / "stream-summary.png"), full_page=True)
            browser.close()

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, serve_log.read_text()
