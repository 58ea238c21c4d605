"""Property tests over config files: whatever the file holds, loading it either gives a
Config or a ConfigError naming fields, never a traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import ConfigError, load_config, parse_config

VALID = {
    "state": "relay.db",
    "segments": [{"id": "seg-a", "name": "A", "createdAt": 1, "updatedAt": 2}],
    "destinations": [{
        "name": "crm", "endpoint": "https://example.com/hook",
        "auth": {"type": "oauth2_client_credentials", "token_url": "https://example.com/token",
                 "client_id": "c", "client_secret": "s",
                 "credentials_type": "basic_authorization"},
        "headers": "a:b", "query_parameters": "p=1", "rate_limit": 100, "max_in_flight": 8,
    }],
    "dataflows": [{"name": "f", "destination": "crm", "segments": ["seg-a"],
                   "attributes": ["person.name"]}],
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                        children, max_size=4),
    max_leaves=20,
)


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def test_the_base_config_is_valid() -> None:
    assert parse_config(VALID).dataflow("f").destination == "crm"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mutation_gives_a_config_or_field_errors(data: st.DataObject) -> None:
    doc = copy.deepcopy(VALID)
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p]))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(json_values)
    try:
        parse_config(doc)
    except ConfigError as exc:
        assert exc.problems
        for field, message in exc.problems:
            assert isinstance(field, str) and message
            assert "Traceback" not in message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_file_content_is_a_config_error_or_a_config(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems and str(path) in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values)
def test_any_yaml_document_is_handled(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems
