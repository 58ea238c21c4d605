"""A config kept in Prefect, so workers on any machine run with the same one.

``profile-relay config push`` stores the YAML text, validated and with every secret still a
reference (``${ENV_VAR}``, a Secret block), in a block of this type; ``-c
prefect-block://NAME`` (and a deployment's ``config_path``) reads it back. The text is
stored as written, so references are resolved where the config is loaded, never in Prefect.
"""

from __future__ import annotations

from prefect.blocks.core import Block


class RelayConfig(Block):
    """A profile-relay YAML config."""

    _block_type_name = "profile-relay config"
    _block_type_slug = "profile-relay-config"
    _description = "A profile-relay YAML config (secrets as references), pushed by profile-relay config push."

    yaml: str
    source: str = ""  # the file it was pushed from, for whoever reads the block in the UI


def read_config_text(name: str) -> str:
    # _sync: a config is loaded inside async flows too
    return RelayConfig.load(name, _sync=True).yaml


def push_config_text(name: str, text: str, source: str) -> None:
    RelayConfig(yaml=text, source=source).save(name, overwrite=True, _sync=True)
