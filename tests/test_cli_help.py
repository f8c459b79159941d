"""The command line's conventions: a version, one help style with an example per command, no
reStructuredText backticks, one name per argument kind (STUDY, POLICY via --policy)."""

from __future__ import annotations

import click
import typer
from typer.testing import CliRunner

from fedomop import __version__
from fedomop.cli import app

runner = CliRunner()


def _commands() -> list[tuple[str, click.Command]]:
    def walk(command: click.Command, path: str):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, command

    return list(walk(typer.main.get_command(app), "fedomop"))


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedomop {__version__}"


def test_every_command_has_an_example_and_no_rst_backticks() -> None:
    commands = _commands()
    assert len(commands) >= 24
    for path, command in commands:
        texts = [command.help or "", *(getattr(p, "help", "") or "" for p in command.params)]
        assert "`" not in " ".join(texts), path
        assert f"Example: {path}" in " ".join((command.help or "").split()), path
        assert (command.help or "").strip().split("\n")[0].endswith("."), path


def test_one_name_per_argument_kind() -> None:
    """A study is STUDY, a permit PERMIT; a node policy is always --policy."""
    for path, command in _commands():
        for param in command.params:
            is_study = "study" in (param.name or "") or path.startswith("fedomop study")
            if isinstance(param, click.Argument) and is_study:
                assert param.metavar == "STUDY", path
            if "polic" in (param.name or ""):
                assert isinstance(param, click.Option) and "--policy" in param.opts, path
    assert runner.invoke(app, ["node", "check-policy", "--help"]).exit_code == 0
    assert "--policy" in runner.invoke(app, ["node", "check-policy", "--help"]).output
