"""Destination templates (`template:`) against a real endpoint on loopback, through the
command line (`validate`, `stream --once`, `test-send [--dry-run]`, run by typer's
CliRunner in a thread beside the endpoint, on the session's Prefect harness): the output
byte for byte, unbatched and batched; errors at validate (field path and template line)
and at run time (that export in the failed store, the others delivered); the sandbox
refusing the classic escapes; no secret reachable from a template."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from app.cli import app
from config import load_config
from state import open_store
from tasks.body import TemplateError
from tasks.sample import SAMPLE_PROFILE_ID, sample_export
from tasks.template import ExportTemplate
from testkit.procs import write_config
from tests.relay_fixtures import FAST, FLOW, decide, ingest

pytestmark = pytest.mark.prefect

ATTRIBUTES = ["person.name.firstName", "person.name.lastName", "personalEmail.address"]


@pytest.fixture(autouse=True)
def harness(prefect_harness: None) -> None:
    """The CLI's flows run on the session's Prefect harness."""


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def setup(tmp_path: Path, endpoint: str, **dest: Any) -> tuple[Path, Any, Any]:
    """A config (three mapped attributes) and its store, the dataflow registered."""
    path = write_config(tmp_path, endpoint, attributes=ATTRIBUTES, **(FAST | dest))
    config = load_config(path)
    store = open_store(config.state_path)
    result = cli("validate", "-c", str(path))
    assert result.exit_code == 0, result.output
    decide(store, config)
    return path, config, store


def person(pid: str, first: str, last: str | None = None, email: str | None = None) -> bytes:
    name: dict[str, str] = {"firstName": first}
    if last is not None:
        name["lastName"] = last
    attributes: dict[str, Any] = {"person": {"name": name}}
    if email is not None:
        attributes["personalEmail"] = {"address": email}
    return orjson.dumps({"profileId": pid, "attributes": attributes,
                         "segmentMembership": {"ups": {"seg-a": {"status": "realized"}}}}) + b"\n"


async def stream_once(path: Path) -> Any:
    return await asyncio.to_thread(cli, "stream", "-c", str(path), "--once")


def failed_rows(store) -> list[dict]:
    return list(store.db.query("SELECT * FROM failed_requests ORDER BY id"))


# A CRM contact: the receiver wants its own field names, line breaks and spacing kept.
CONTACT = ('{"externalId": {{ profile_id | tojson }},\n'
           ' "properties": {"firstname": {{ profile.person.name.firstName | tojson }},'
           ' "email": {{ profile.personalEmail.address | tojson }}},\n'
           ' "lists": {{ profile.segmentMembership.ups | list | tojson }},'
           ' "seq": {{ sequence }}, "source": {{ [dataflow, destination.name] | tojson }}}')


def contact(pid: str, first: str, email: str | None, seq: int) -> bytes:
    return (f'{{"externalId": "{pid}",\n'
            f' "properties": {{"firstname": "{first}", "email": '
            f'{orjson.dumps(email).decode()}}},\n'
            f' "lists": ["seg-a"], "seq": {seq}, "source": ["{FLOW}","crm"]}}').encode()


# --- the output, byte for byte -------------------------------------------------------------


async def test_template_output_byte_for_byte(tmp_path, endpoint):
    path, config, store = setup(tmp_path, endpoint.url, template=CONTACT)
    ingest(store, config, person("p-1", "Zoë", email="zoe@example.com"), person("p-2", "Bo"))
    result = await stream_once(path)
    assert result.exit_code == 0, result.output
    bodies = sorted(r.body for r in endpoint.requests)
    # the template's own bytes: its spacing and line breaks, UTF-8 as is; a missing
    # attribute is null (the template is not strict)
    assert bodies == [contact("p-1", "Zoë", "zoe@example.com", 1), contact("p-2", "Bo", None, 2)]
    for r in endpoint.requests:
        assert r.headers["Content-Type"] == "application/json"
        assert int(r.headers["X-Relay-Sequence"]) == orjson.loads(r.body)["seq"]


async def test_template_output_batched_as_json_array_and_ndjson(tmp_path, endpoint):
    path, config, store = setup(tmp_path, endpoint.url, template=CONTACT,
                                batch={"max_profiles": 10})
    ingest(store, config, person("p-1", "Ann", email="a@example.com"), person("p-2", "Bo"))
    result = await stream_once(path)
    assert result.exit_code == 0, result.output
    [request] = endpoint.requests
    assert request.body == b"[" + contact("p-1", "Ann", "a@example.com", 1) + b"," + contact(
        "p-2", "Bo", None, 2) + b"]"

    endpoint.reset()
    write_config(tmp_path, endpoint.url, attributes=ATTRIBUTES, template=CONTACT,
                 batch={"max_profiles": 10, "format": "ndjson"}, **FAST)
    ingest(store, config, person("p-1", "Ann", email="a@example.com"), person("p-2", "Bo"))
    result = await stream_once(path)
    assert result.exit_code == 0, result.output
    [request] = endpoint.requests
    assert request.headers["Content-Type"] == "application/x-ndjson"
    # one line per export: the template's line breaks become spaces, all else is kept
    lines = [contact("p-1", "Ann", "a@example.com", 3).replace(b"\n", b" "),
             contact("p-2", "Bo", None, 4).replace(b"\n", b" ")]
    assert request.body == b"\n".join(lines) + b"\n"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "line", "message"), [
    ('{"id": {{ profile_id | tojson }},\n "x": {{ profile_id }\n}', 2, "unexpected '}'"),
    ('{"id": {{ profile_id | tojson }},\n\n "x": {{ profile_id | nope }}}', 3,
     "No filter named 'nope'"),
    ('{"id": {{ profile_id | tojson }},\n "tier": {{ profile.loyalty.tier | tojson }}}', 2,
     "'dict object' has no attribute 'loyalty'"),
    ('{% for s in profile.segmentMembership.ups %}\n{{ s.nope.deeper }}\n{% endfor %}', 2,
     "has no attribute 'nope'"),
])
def test_validate_reports_template_errors_with_path_and_line(tmp_path, template, line, message):
    path = write_config(tmp_path, "http://127.0.0.1:9/hook", attributes=ATTRIBUTES,
                        template=template, template_strict=True)
    result = cli("validate", "-c", str(path))
    assert result.exit_code == 2, result.output
    assert f"destinations[0].template: line {line}: " in result.stderr, result.stderr
    assert message in result.stderr
    assert "valid (" not in result.stdout


def test_validate_reports_output_that_is_not_json(tmp_path):
    path = write_config(tmp_path, "http://127.0.0.1:9/hook", attributes=ATTRIBUTES,
                        template='{"id": {{ profile_id }}}')  # no tojson: a bare word
    result = cli("validate", "-c", str(path))
    assert result.exit_code == 2
    assert "destinations[0].template: the output is not JSON" in result.stderr, result.stderr
    path = write_config(tmp_path, "http://127.0.0.1:9/hook", attributes=ATTRIBUTES,
                        template=CONTACT)
    result = cli("validate", "-c", str(path))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("batched", [False, True])
async def test_a_render_error_fails_that_export_and_the_others_go(tmp_path, endpoint, batched):
    template = ('{"id": {{ profile_id | tojson }},\n'
                ' "name": {{ (profile.person.name.firstName ~ " " ~'
                ' profile.person.name.lastName) | tojson }}}')
    extra = {"batch": {"max_profiles": 10}} if batched else {}
    path, config, store = setup(tmp_path, endpoint.url, template=template,
                                template_strict=True, **extra)
    ingest(store, config, person("p-1", "Ann", "Lee"), person("p-2", "Bo"),
           person("p-3", "Cy", "Ng"))
    result = await stream_once(path)
    assert result.exit_code == 3, result.output
    assert "1 export(s) ended in the failed store" in result.output
    sent = [orjson.loads(r.body) for r in endpoint.requests]
    docs = [d for body in sent for d in (body if batched else [body])]
    assert sorted(d["name"] for d in docs) == ["Ann Lee", "Cy Ng"]
    [row] = failed_rows(store)
    assert row["profile_id"] == "p-2" and row["last_status"] is None and row["attempts"] == 1
    assert row["last_error"] == "template: line 2: 'dict object' has no attribute 'lastName'"
    assert store.pending_count(FLOW) == 0


# --- the sandbox ----------------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os.environ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ profile.__class__ }}",
    "{{ profile | attr('__class__') }}",
    "{{ '{0.__class__}'.format(profile) }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ range.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ profile.pop('identityMap') }}",
    "{{ profile.segmentMembership.ups.clear() }}",
    "{% for x in range(100000000) %}{% endfor %}",
    "{{ 'x' * 100000000 }}",
    "{{ 9 ** 99999999 }}",
    "{{ [1] | random }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_are_refused(tmp_path, template):
    renderer = ExportTemplate(template, strict=False, destination={"name": "crm"})
    with pytest.raises(TemplateError):
        renderer.render({"identityMap": {}, "segmentMembership": {"ups": {}}}, "p-1", FLOW, 1)
    path = write_config(tmp_path, "http://127.0.0.1:9/hook", attributes=ATTRIBUTES,
                        template='{"x": ' + template + "}")
    result = cli("validate", "-c", str(path))
    assert result.exit_code == 2
    assert "destinations[0].template" in result.stderr


async def test_an_escape_at_run_time_sends_nothing_and_fails_each_export(tmp_path, endpoint):
    path, config, store = setup(tmp_path, endpoint.url, template=CONTACT)
    write_config(tmp_path, endpoint.url, attributes=ATTRIBUTES, **FAST,
                 template='{"x": {{ cycler.__init__.__globals__ | tojson }}}')
    ingest(store, config, person("p-1", "Ann"), person("p-2", "Bo"))
    result = await stream_once(path)
    assert result.exit_code == 3, result.output
    assert endpoint.requests == []
    rows = failed_rows(store)
    assert [r["profile_id"] for r in rows] == ["p-1", "p-2"]
    assert all(r["last_error"] == "template: line 1: refused by the sandbox: access to "
               "attribute '__init__' of 'type' object is unsafe" for r in rows)


async def test_no_secret_is_reachable_from_a_template(tmp_path, endpoint, monkeypatch):
    secrets = {"CRM_TOKEN": "tok-3f9a-very-secret", "SIGNING": "c2lnbmluZy1zZWNyZXQtdmFsdWU="}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    dest = {"auth": {"type": "bearer", "token": "${CRM_TOKEN}"},
            "signing_secret": "whsec_" + secrets["SIGNING"],
            "headers": "X-Api-Key:hdr-7c1e-very-secret", "description": "Our CRM",
            "query_parameters": "api_key=qs-88d2-very-secret"}
    secret_values = [*secrets.values(), "hdr-7c1e-very-secret", "qs-88d2-very-secret"]
    # everything a template is given, whole: the destination is its name and description
    everything = ('{"destination": {{ destination | tojson }}, "dataflow": {{ dataflow | tojson }},'
                  ' "profile": {{ profile | tojson }}, "auth": {{ destination.auth | tojson }},'
                  ' "headers": {{ destination.headers | tojson }},'
                  ' "endpoint": {{ destination.endpoint | tojson }}}')
    path, config, store = setup(tmp_path, endpoint.url, template=everything, **dest)
    ingest(store, config, person("p-1", "Ann"))
    result = await stream_once(path)
    assert result.exit_code == 0, result.output
    [request] = endpoint.requests
    body = orjson.loads(request.body)
    assert body["destination"] == {"name": "crm", "description": "Our CRM"}
    assert body["auth"] is None and body["headers"] is None and body["endpoint"] is None
    assert request.headers["Authorization"] == f"Bearer {secrets['CRM_TOKEN']}"  # sent, not shown
    for value in secret_values:
        assert value not in request.body.decode()
    # and the ways around: each refused, no secret in what validate prints
    for attempt in ("{{ destination.__class__.__init__.__globals__ }}",
                    "{{ self._TemplateReference__context.parent }}",
                    "{{ cycler.__init__.__globals__.os.environ.CRM_TOKEN }}",
                    "{{ profile.__class__.__subclasses__() }}"):
        write_config(tmp_path, endpoint.url, attributes=ATTRIBUTES, template=attempt, **dest,
                     **FAST)
        result = cli("validate", "-c", str(path))
        assert result.exit_code == 2
        for value in secret_values:
            assert value not in result.output


# --- test-send --dry-run --------------------------------------------------------------------


async def test_dry_run_shows_the_exact_request_without_sending(tmp_path, endpoint, monkeypatch):
    monkeypatch.setenv("CRM_TOKEN", "tok-dry-very-secret")
    template = ('{"id": {{ profile_id | tojson }},\n'
                ' "email": {{ profile.personalEmail.address | tojson }}}')
    path = write_config(tmp_path, endpoint.url, attributes=ATTRIBUTES, template=template,
                        batch={"max_profiles": 100, "format": "ndjson"},
                        auth={"type": "bearer", "token": "${CRM_TOKEN}"},
                        headers="X-Api-Key:key-dry-very-secret,X-Team:growth",
                        signing_secret="whsec_" + "ZHJ5LXJ1bi1zaWduaW5nLWtleQ==")
    result = cli("test-send", "-c", str(path), "--destination", "crm", "--dry-run")
    assert result.exit_code == 0, result.output
    body = (f'{{"id": "{SAMPLE_PROFILE_ID}",  "email": "jane.doe@example.com"}}\n').encode()
    assert sample_export(load_config(path), "crm").body == body
    out = result.stdout
    assert out.endswith("\n\n" + body.decode())  # a blank line, then the body as sent
    for line in (f"POST {endpoint.url}", "Content-Type: application/x-ndjson",
                 "Authorization: Bearer ***", "X-Api-Key: ***", "X-Team: growth",
                 "X-Relay-Batch-Size: 1", "webhook-signature: v1,***",
                 f"Content-Length: {len(body)}"):
        assert line in out.splitlines(), (line, out)
    assert "Idempotency-Key: " in out
    for secret in ("tok-dry-very-secret", "key-dry-very-secret", "ZHJ5LXJ1bi1zaWduaW5nLWtleQ=="):
        assert secret not in result.output
    assert endpoint.requests == []  # nothing sent
    assert "dry run: nothing sent" in result.stderr

    result = await asyncio.to_thread(cli, "test-send", "-c", str(path), "--destination", "crm")
    assert result.exit_code == 0, result.output
    [request] = endpoint.requests  # what the dry run showed is what goes out
    assert request.body == body
    assert request.headers["Content-Type"] == "application/x-ndjson"
    assert request.headers["X-Relay-Batch-Size"] == "1"


def test_dry_run_of_a_failing_template_exits_2(tmp_path):
    path = write_config(tmp_path, "http://127.0.0.1:9/hook", attributes=ATTRIBUTES,
                        template='{"tier": {{ profile.loyalty.tier | tojson }}}',
                        template_strict=True)
    result = cli("test-send", "-c", str(path), "--destination", "crm", "--dry-run")
    assert result.exit_code == 2
    assert ("destinations[0].template: line 1: 'dict object' has no attribute 'loyalty'"
            in result.stderr)
