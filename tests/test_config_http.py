"""Config that would break HTTP is refused by `validate`, naming the field: headers that
frame or route the request, line breaks in header values or the endpoint, a timeout under a
millisecond, and a `state` that is a directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import app


def validate(tmp_path: Path, state: str = "relay.db", **dest: object) -> tuple[int, str]:
    doc = {"state": state, "segments": [{"id": "seg-a"}],
           "destinations": [{"name": "crm", "endpoint": "https://crm.example.com/hook", **dest}],
           "dataflows": [{"name": "f", "destination": "crm", "segments": ["seg-a"],
                          "attributes": ["personalEmail.address"]}]}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["validate", "-c", str(path)])
    return result.exit_code, result.output


@pytest.mark.parametrize("header", ["Content-Length:5", "Transfer-Encoding:chunked",
                                    "host:evil.example.com", "Connection:close"])
def test_headers_that_frame_or_route_the_request_are_refused(tmp_path: Path, header: str) -> None:
    code, output = validate(tmp_path, headers=f"X-Team:growth,{header}")
    assert code == 2
    name = header.split(":")[0]
    assert f"destinations[0].headers: header {name!r} frames or routes the request" in output


def test_a_line_break_in_a_header_value_is_refused(tmp_path: Path) -> None:
    code, output = validate(tmp_path, headers="X-Team:growth\r\nX-Evil:1")
    assert code == 2
    assert "destinations[0].headers: header 'X-Team': the value contains a line break" in output


@pytest.mark.parametrize("endpoint", ["https://crm.example.com/hook\r\nX: 1",
                                      "https://crm.example.com/ho\nok"])
def test_a_line_break_in_the_endpoint_is_refused(tmp_path: Path, endpoint: str) -> None:
    code, output = validate(tmp_path, endpoint=endpoint)
    assert code == 2
    assert "destinations[0].endpoint: endpoint contains a line break" in output


def test_a_timeout_under_a_millisecond_is_refused(tmp_path: Path) -> None:
    code, output = validate(tmp_path, timeout_seconds=0.0001)
    assert code == 2 and "destinations[0].timeout_seconds" in output
    assert validate(tmp_path, timeout_seconds=0.001)[0] == 0


def test_a_state_that_is_a_directory_gets_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "store-dir").mkdir()
    code, output = validate(tmp_path, state="store-dir")
    assert code == 2
    assert "state: " in output and "is a directory" in output
    assert "Traceback" not in output
