"""Every command's --help renders (help texts are plain text: `hf://OWNER/REPO[/PATH]` once broke rich markup)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_help_renders(name):
    r = CliRunner().invoke(cli.app, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "--help" in r.output


def test_help_keeps_brackets():
    out = CliRunner().invoke(cli.app, ["build", "--help"]).output
    assert "[/PATH]" in out  # shown as written, not read as a markup tag
