"""Config loading and validation (the README's "Config reference"): real YAML files, exact field paths."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import (
    BearerAuth,
    ConfigError,
    NoAuth,
    OAuth2ClientCredentialsAuth,
    OAuth2PasswordAuth,
    inline_secrets,
    load_config,
    parse_config,
)

SECRETS = {
    "PR_TEST_CRM_TOKEN": "tok-5f1b9c0e-very-secret",
    "PR_TEST_OAUTH_SECRET": "cs-77a1e2-very-secret",
    "PR_TEST_OAUTH_PASSWORD": "pw-0c9d8e-very-secret",
    "PR_TEST_CC_SECRET": "cc-4b3a21-very-secret",
    "PR_TEST_SIGNING": "whsec_c2lnbmluZy1rZXktdmVyeS1zZWNyZXQ=",
}

FULL_YAML = """\
state: relay.db                      # relative to this file
segments:
  - {id: seg-a, name: "First name equals John", createdAt: 1648553325000, updatedAt: 1648553330000}
  - {id: seg-b, name: "Has email"}
  - {id: seg-c}
destinations:
  - name: crm
    description: CRM webhook
    endpoint: https://crm.example.com/hook
    auth: {type: none}
    headers: "header1:value1,header2:value2"
    query_parameters: "parameter1=value&parameter2=value"
    include_segment_names: true
    include_segment_timestamps: true
    rate_limit: 10000
    max_in_flight: 64
    timeout_seconds: 10
  - name: bearer-dest
    endpoint: http://localhost:8080/in
    auth: {type: bearer, token: "${PR_TEST_CRM_TOKEN}"}
    signing_secret: "${PR_TEST_SIGNING}"
  - name: password-dest
    endpoint: https://api.example.com/profiles
    auth:
      type: oauth2_password
      token_url: https://auth.example.com/token
      client_id: relay
      client_secret: "${PR_TEST_OAUTH_SECRET}"
      username: svc-relay
      password: "${PR_TEST_OAUTH_PASSWORD}"
  - name: cc-dest
    endpoint: https://api.example.com/cc
    rate_limit: 1
    auth:
      type: oauth2_client_credentials
      token_url: https://auth.example.com/token
      client_id: relay
      client_secret: "${PR_TEST_CC_SECRET}"
      credentials_type: basic_authorization
dataflows:
  - name: crm-stream
    destination: crm
    segments: [seg-a]
    attributes: [person.name.firstName, person.name.lastName, person.birthDate, personalEmail.address]
  - name: cc-stream
    destination: cc-dest
    segments: [seg-a, seg-b]
    attributes: []
"""


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return SECRETS


def write(tmp_path: Path, text: str, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def base() -> dict[str, Any]:
    """A small valid document, mutated by each error test."""
    return {
        "state": "relay.db",
        "segments": [{"id": "seg-a"}, {"id": "seg-b"}],
        "destinations": [
            {"name": "crm", "endpoint": "https://crm.example.com/hook", "auth": {"type": "none"}},
            {"name": "other", "endpoint": "https://other.example.com/hook"},
        ],
        "dataflows": [
            {"name": "flow", "destination": "crm", "segments": ["seg-a", "seg-b"],
             "attributes": ["person.name.firstName", "person.birthDate", "email"]},
        ],
    }


def problems_of(tmp_path: Path, doc: Any) -> list[tuple[str, str]]:
    path = write(tmp_path, yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.problems, "a ConfigError always lists at least one problem"
    assert str(path) in str(err)
    return err.problems


def paths_of(problems: list[tuple[str, str]]) -> list[str]:
    return [p for p, _ in problems]


def one_problem(tmp_path: Path, doc: Any) -> tuple[str, str]:
    problems = problems_of(tmp_path, doc)
    assert len(problems) == 1, problems
    return problems[0]


# --- valid configs -------------------------------------------------------------------


def test_base_document_is_valid(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, yaml.safe_dump(base())))
    assert [d.name for d in config.destinations] == ["crm", "other"]
    assert isinstance(config.destinations[1].auth, NoAuth)  # auth defaults to none


def test_full_config_with_all_four_auth_types_loads(tmp_path: Path, secrets_env) -> None:
    config = load_config(write(tmp_path, FULL_YAML))
    crm, bearer, password, cc = config.destinations
    assert isinstance(crm.auth, NoAuth)
    assert crm.header_pairs == [("header1", "value1"), ("header2", "value2")]
    assert crm.query_pairs == [("parameter1", "value"), ("parameter2", "value")]
    assert crm.include_segment_names and crm.include_segment_timestamps
    assert crm.rate_limit == 10_000 and crm.max_in_flight == 64 and crm.timeout_seconds == 10
    assert isinstance(bearer.auth, BearerAuth)
    assert bearer.auth.token.get_secret_value() == secrets_env["PR_TEST_CRM_TOKEN"]
    assert bearer.signing_secret is not None
    assert bearer.signing_secret.get_secret_value() == secrets_env["PR_TEST_SIGNING"]
    assert isinstance(password.auth, OAuth2PasswordAuth)
    assert password.auth.token_url == "https://auth.example.com/token"
    assert password.auth.username == "svc-relay"
    assert password.auth.client_secret.get_secret_value() == secrets_env["PR_TEST_OAUTH_SECRET"]
    assert password.auth.password.get_secret_value() == secrets_env["PR_TEST_OAUTH_PASSWORD"]
    assert isinstance(cc.auth, OAuth2ClientCredentialsAuth)
    assert cc.auth.credentials_type == "basic_authorization"
    assert cc.auth.client_secret.get_secret_value() == secrets_env["PR_TEST_CC_SECRET"]
    assert cc.rate_limit == 1
    assert config.segment("seg-a").name == "First name equals John"
    assert config.segment("seg-a").createdAt == 1648553325000
    assert config.segment("nope") is None
    flow = config.dataflow("crm-stream")
    assert flow.destination == "crm" and flow.segments == ["seg-a"]
    assert flow.attributes[-1] == "personalEmail.address"
    assert config.dataflow("cc-stream").segments == ["seg-a", "seg-b"]
    assert config.destination("cc-dest") is cc
    with pytest.raises(KeyError):
        config.dataflow("missing")


def test_client_credentials_default_to_body_form_encoded(tmp_path: Path, secrets_env) -> None:
    doc = base()
    doc["destinations"][0]["auth"] = {
        "type": "oauth2_client_credentials", "token_url": "https://a.example.com/t",
        "client_id": "c", "client_secret": "${PR_TEST_CC_SECRET}"}
    config = load_config(write(tmp_path, yaml.safe_dump(doc)))
    assert config.destinations[0].auth.credentials_type == "body_form_encoded"


def test_secrets_never_appear_in_repr_str_or_json(tmp_path: Path, secrets_env) -> None:
    config = load_config(write(tmp_path, FULL_YAML))
    renderings = [repr(config), str(config), config.model_dump_json(),
                  str(config.model_dump()), repr(config.destinations), str(config.destinations[2])]
    for text in renderings:
        for value in secrets_env.values():
            assert value not in text
    # the values are still there for the code that needs them
    assert config.destinations[1].auth.token.get_secret_value() == secrets_env["PR_TEST_CRM_TOKEN"]


def test_secrets_resolve_at_load_time_from_the_environment(tmp_path, monkeypatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PR_TEST_CRM_TOKEN", "rotated-token")
    config = load_config(write(tmp_path, FULL_YAML))
    assert config.destinations[1].auth.token.get_secret_value() == "rotated-token"


def test_inline_secrets_are_found_but_references_are_not(tmp_path: Path) -> None:
    raw = yaml.safe_load(FULL_YAML)
    assert inline_secrets(raw) == []
    raw["destinations"][1]["auth"]["token"] = "plain-token"
    raw["destinations"][1]["signing_secret"] = "whsec_aGVsbG8="
    raw["destinations"][2]["auth"]["client_secret"] = "plain-client-secret"
    raw["destinations"][2]["auth"]["password"] = "{{ prefect.blocks.secret.relay-pw }}"
    raw["destinations"][3]["auth"]["client_secret"] = " ${PR_TEST_CC_SECRET} "
    assert inline_secrets(raw) == [
        "destinations[1].signing_secret",
        "destinations[1].auth.token",
        "destinations[2].auth.client_secret",
    ]
    # malformed sections are skipped, not crashed on
    assert inline_secrets({"destinations": ["x", {"auth": "y"}]}) == []
    assert inline_secrets({}) == []


def test_inline_secret_values_still_load(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][0]["auth"] = {"type": "bearer", "token": "plain-token"}
    config = load_config(write(tmp_path, yaml.safe_dump(doc)))
    assert config.destinations[0].auth.token.get_secret_value() == "plain-token"
    assert "plain-token" not in repr(config)


def test_state_path_is_relative_to_the_config_file(tmp_path: Path, monkeypatch) -> None:
    conf_dir = tmp_path / "conf" / "nested"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    doc = base()
    doc["state"] = "data/relay.db"
    config = load_config(write(conf_dir, yaml.safe_dump(doc)))
    assert config.state_path == conf_dir.resolve() / "data" / "relay.db"
    # also when the config is named by a relative path from another directory
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("conf/nested/relay.yaml"))
    assert config.state_path == conf_dir.resolve() / "data" / "relay.db"
    # an absolute state path is kept as written
    doc["state"] = str(tmp_path / "abs.db")
    config = load_config(write(conf_dir, yaml.safe_dump(doc)))
    assert config.state_path == tmp_path / "abs.db"
    # base_dir is not part of the serialised config
    assert "base_dir" not in config.model_dump()


def test_state_defaults_to_relay_db_beside_the_file(tmp_path: Path) -> None:
    doc = base()
    del doc["state"]
    config = load_config(write(tmp_path, yaml.safe_dump(doc)))
    assert config.state_path == tmp_path.resolve() / "relay.db"


def test_parse_config_directly_uses_base_dir(tmp_path: Path) -> None:
    config = parse_config(base(), base_dir=tmp_path)
    assert config.state_path == tmp_path / "relay.db"


# --- one test per error path ------------------------------------------------------------


def test_missing_token_url(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][0]["auth"] = {"type": "oauth2_password", "client_id": "c",
                                      "client_secret": "s", "username": "u", "password": "p"}
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[0].auth.token_url"
    assert "required" in msg.lower()


def test_token_url_not_http(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][1]["auth"] = {"type": "oauth2_client_credentials", "client_id": "c",
                                      "client_secret": "s", "token_url": "ftp://auth.example.com/t"}
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[1].auth.token_url"
    assert "http" in msg and "ftp" in msg


def test_duplicate_destination_name(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][1]["name"] = "crm"
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[1].name"
    assert "duplicate" in msg and "destinations[0]" in msg


def test_duplicate_segment_id_and_dataflow_name(tmp_path: Path) -> None:
    doc = base()
    doc["segments"].append({"id": "seg-a"})
    doc["dataflows"].append(copy.deepcopy(doc["dataflows"][0]))
    assert sorted(paths_of(problems_of(tmp_path, doc))) == ["dataflows[1].name", "segments[2].id"]


def test_unknown_destination(tmp_path: Path) -> None:
    doc = base()
    doc["dataflows"][0]["destination"] = "nowhere"
    path, msg = one_problem(tmp_path, doc)
    assert path == "dataflows[0].destination"
    assert "'nowhere'" in msg and "crm" in msg


def test_segment_not_in_catalogue(tmp_path: Path) -> None:
    doc = base()
    doc["dataflows"][0]["segments"] = ["seg-a", "seg-zzz"]
    path, msg = one_problem(tmp_path, doc)
    assert path == "dataflows[0].segments[1]"
    assert "seg-zzz" in msg and "catalogue" in msg


@pytest.mark.parametrize("bad", ["person..name", ".person", "person.", "per son", "a/b", ""])
def test_malformed_attribute_path(tmp_path: Path, bad: str) -> None:
    doc = base()
    doc["dataflows"][0]["attributes"][2] = bad
    path, _ = one_problem(tmp_path, doc)
    assert path == "dataflows[0].attributes[2]"


def test_reserved_attribute_root(tmp_path: Path) -> None:
    doc = base()
    doc["dataflows"][0]["attributes"] = ["identityMap.ecid"]
    path, msg = one_problem(tmp_path, doc)
    assert path == "dataflows[0].attributes[0]"
    assert "identityMap" in msg


def test_dataflow_needs_a_segment(tmp_path: Path) -> None:
    doc = base()
    doc["dataflows"][0]["segments"] = []
    assert one_problem(tmp_path, doc)[0] == "dataflows[0].segments"


@pytest.mark.parametrize("value", [0, 10001, -5])
def test_rate_limit_out_of_range(tmp_path: Path, value: int) -> None:
    doc = base()
    doc["destinations"][1]["rate_limit"] = value
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[1].rate_limit"
    assert ("1" if value < 1 else "10000") in msg


@pytest.mark.parametrize("value", [1, 10000, 2.5])
def test_rate_limit_bounds_are_inclusive(tmp_path: Path, value: float) -> None:
    doc = base()
    doc["destinations"][1]["rate_limit"] = value
    assert load_config(write(tmp_path, yaml.safe_dump(doc))).destinations[1].rate_limit == value


@pytest.mark.parametrize("endpoint", ["ftp://crm.example.com/x", "crm.example.com/hook",
                                      "file:///etc/passwd", "https://", "mailto:a@b.c"])
def test_non_http_endpoint(tmp_path: Path, endpoint: str) -> None:
    doc = base()
    doc["destinations"][0]["endpoint"] = endpoint
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[0].endpoint"
    assert "endpoint" in msg


def test_missing_endpoint(tmp_path: Path) -> None:
    doc = base()
    del doc["destinations"][0]["endpoint"]
    assert one_problem(tmp_path, doc)[0] == "destinations[0].endpoint"


@pytest.mark.parametrize("headers", ["header1", "header1:v,broken", "bad name:v", ":v"])
def test_unparsable_headers(tmp_path: Path, headers: str) -> None:
    doc = base()
    doc["destinations"][0]["headers"] = headers
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[0].headers"
    assert "header" in msg


@pytest.mark.parametrize("query", ["p1", "p1=v&&p2=v", "=v", "p1=v&p2"])
def test_unparsable_query_parameters(tmp_path: Path, query: str) -> None:
    doc = base()
    doc["destinations"][0]["query_parameters"] = query
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[0].query_parameters"
    assert "query parameter" in msg


def test_headers_and_query_edge_forms_parse(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][0]["headers"] = " X-Api-Key : abc:def , X-Other:1,"
    doc["destinations"][0]["query_parameters"] = "?a=1&b=&c=x%20y"
    dest = load_config(write(tmp_path, yaml.safe_dump(doc))).destinations[0]
    assert dest.header_pairs == [("X-Api-Key", "abc:def"), ("X-Other", "1")]
    assert dest.query_pairs == [("a", "1"), ("b", ""), ("c", "x y")]


def test_missing_env_var_names_field_and_var_without_secret(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PR_TEST_UNSET_TOKEN", raising=False)
    monkeypatch.setenv("PR_TEST_OTHER_SECRET", "leak-me-not-123")
    doc = base()
    doc["destinations"][0]["auth"] = {"type": "bearer", "token": "${PR_TEST_UNSET_TOKEN}"}
    doc["destinations"][1]["auth"] = {
        "type": "oauth2_password", "token_url": "https://a.example.com/t", "client_id": "c",
        "client_secret": "${PR_TEST_OTHER_SECRET}", "username": "u",
        "password": "${PR_TEST_UNSET_PASSWORD}"}
    path = write(tmp_path, yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert sorted(paths_of(problems)) == ["destinations[0].auth.token",
                                          "destinations[1].auth.password"]
    by_path = dict(problems)
    assert "PR_TEST_UNSET_TOKEN" in by_path["destinations[0].auth.token"]
    assert "PR_TEST_UNSET_PASSWORD" in by_path["destinations[1].auth.password"]
    assert "leak-me-not-123" not in str(info.value)
    assert "leak-me-not-123" not in repr(info.value.problems)


def test_env_var_set_but_empty(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PR_TEST_EMPTY", "")
    doc = base()
    doc["destinations"][0]["auth"] = {"type": "bearer", "token": "${PR_TEST_EMPTY}"}
    assert one_problem(tmp_path, doc)[0] == "destinations[0].auth.token"


def test_bad_signing_secret_does_not_echo_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PR_TEST_SIGN", "not-a-whsec-value-secret")
    doc = base()
    doc["destinations"][0]["signing_secret"] = "${PR_TEST_SIGN}"
    doc["destinations"][1]["signing_secret"] = "whsec_!!!notbase64"
    problems = problems_of(tmp_path, doc)
    assert sorted(paths_of(problems)) == ["destinations[0].signing_secret",
                                          "destinations[1].signing_secret"]
    text = repr(problems)
    assert "not-a-whsec-value-secret" not in text and "!!!notbase64" not in text


def test_unloadable_prefect_block_names_the_block(tmp_path: Path, monkeypatch) -> None:
    from prefect.blocks import system

    def boom(name: str, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("server says: value=hunter2")

    monkeypatch.setattr(system.Secret, "load", classmethod(lambda cls, *a, **k: boom(*a, **k)))
    doc = base()
    doc["destinations"][0]["auth"] = {"type": "bearer",
                                      "token": "{{ prefect.blocks.secret.crm-token }}"}
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[0].auth.token"
    assert "crm-token" in msg and "hunter2" not in msg


def test_unknown_auth_type(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][0]["auth"] = {"type": "kerberos"}
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[0].auth"
    assert "oauth2_password" in msg


def test_auth_without_type(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][0]["auth"] = {"token": "x"}
    path, msg = one_problem(tmp_path, doc)
    assert path == "destinations[0].auth"
    assert "type" in msg


def test_unknown_credentials_type(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][0]["auth"] = {
        "type": "oauth2_client_credentials", "token_url": "https://a.example.com/t",
        "client_id": "c", "client_secret": "s", "credentials_type": "header"}
    assert one_problem(tmp_path, doc)[0] == "destinations[0].auth.credentials_type"


@pytest.mark.parametrize(("where", "expected"), [
    ((), "colour"),
    (("destinations", 1), "destinations[1].colour"),
    (("destinations", 0, "auth"), "destinations[0].auth.colour"),
    (("dataflows", 0), "dataflows[0].colour"),
    (("segments", 1), "segments[1].colour"),
])
def test_unknown_field(tmp_path: Path, where: tuple[Any, ...], expected: str) -> None:
    doc = base()
    node: Any = doc
    for step in where:
        node = node[step]
    node["colour"] = "blue"
    path, msg = one_problem(tmp_path, doc)
    assert path == expected
    assert msg == "unknown field"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [("", "the config must be a YAML mapping")]


def test_section_of_the_wrong_shape(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"] = {"crm": {"endpoint": "https://x.example.com"}}
    doc["segments"] = ["seg-a"]
    problems = problems_of(tmp_path, doc)
    assert "destinations" in paths_of(problems)
    assert "segments[0]" in paths_of(problems)


def test_wrong_types_do_not_crash_cross_checks(tmp_path: Path) -> None:
    doc = base()
    doc["destinations"][0]["name"] = ["crm"]
    doc["segments"][0]["id"] = {"x": 1}
    doc["dataflows"][0]["destination"] = ["crm"]
    doc["dataflows"][0]["segments"] = [{"a": 1}, "seg-b"]
    assert sorted(paths_of(problems_of(tmp_path, doc))) == [
        "dataflows[0].destination", "dataflows[0].segments[0]",
        "destinations[0].name", "segments[0].id"]


def test_invalid_yaml_reports_line_number(tmp_path: Path) -> None:
    text = "state: relay.db\nsegments:\n  - {id: seg-a\ndestinations: []\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    [(path, msg)] = info.value.problems
    assert path == ""
    assert "line 4" in msg and "not valid YAML" in msg


def test_invalid_yaml_tab_indentation(tmp_path: Path) -> None:
    text = "state: relay.db\ndestinations:\n\t- name: x\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "line 3" in info.value.problems[0][1]


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    [(path, msg)] = info.value.problems
    assert path == "" and "cannot read" in msg and str(missing) in msg
    assert "No such file" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory cannot be read as a file
    assert "cannot read" in info.value.problems[0][1]
    if os.geteuid() != 0:  # root reads anything; only check permissions as a normal user
        locked = write(tmp_path, "state: x.db\n", "locked.yaml")
        locked.chmod(0)
        try:
            with pytest.raises(ConfigError) as info:
                load_config(locked)
            assert "Permission denied" in info.value.problems[0][1]
        finally:
            locked.chmod(0o600)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("state: caf\xe9.db\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "UTF-8" in info.value.problems[0][1]


def test_all_problems_are_listed_together(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("PR_TEST_NOT_SET", raising=False)
    doc = base()
    doc["destinations"][0]["endpoint"] = "ftp://crm.example.com"
    doc["destinations"][0]["rate_limit"] = 0
    doc["destinations"][0]["headers"] = "nocolon"
    doc["destinations"][1]["name"] = "crm"
    doc["destinations"][1]["auth"] = {"type": "bearer", "token": "${PR_TEST_NOT_SET}"}
    doc["dataflows"][0]["segments"] = ["seg-a", "seg-missing"]
    doc["dataflows"][0]["attributes"][2] = "bad..path"
    doc["dataflows"].append({"name": "f2", "destination": "ghost", "segments": ["seg-b"]})
    doc["surprise"] = True
    problems = problems_of(tmp_path, doc)
    assert sorted(paths_of(problems)) == sorted([
        "destinations[0].endpoint",
        "destinations[0].rate_limit",
        "destinations[0].headers",
        "destinations[1].name",
        "destinations[1].auth.token",
        "dataflows[0].segments[1]",
        "dataflows[0].attributes[2]",
        "dataflows[1].destination",
        "surprise",
    ])
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, yaml.safe_dump(doc)))
    text = str(info.value)
    assert "9 problem(s)" in text
    for path, msg in problems:
        assert f"{path}: {msg}" in text
