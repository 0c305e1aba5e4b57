"""The ``pacsnode`` console command.

Verbs are entry points of the group ``pacsnode.commands`` (see pyproject.toml), each a
``typer.Typer`` app or a plain typer-annotated function. They are imported only when invoked
(or listed by ``--help``), so ``pacsnode serve`` never pays for, nor needs, the packages that
bring torch, and this module imports none of the packages above ``node`` (no import cycles).
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

import typer
import typer.main
from typer.core import TyperGroup

ENTRY_POINT_GROUP = "pacsnode.commands"


def _command_from_object(name: str, obj: object) -> Any:
    """Turn a Typer app or a typer-annotated function into a command named ``name``."""
    if isinstance(obj, typer.Typer):
        command = typer.main.get_command(obj)
    elif callable(obj):
        app = typer.Typer(add_completion=False)
        app.command(name=name)(obj)
        command = typer.main.get_command(app)
    else:
        raise TypeError(f"entry point {name!r} is neither a Typer app nor a function")
    command.name = name
    return command


def not_installed(name: str, error: ImportError) -> typer.Exit:
    """Say that verb ``name`` lacks packages on this host; the exit to raise."""
    typer.echo(f"'pacsnode {name}' is not available here: {error}. "
               "Install the extras it needs (e.g. pip install 'pacsnode[ml]').", err=True)
    return typer.Exit(1)


def _unavailable(name: str, error: ImportError) -> Any:
    """A stand-in for a verb whose packages are not installed on this host."""

    def verb() -> None:
        raise not_installed(name, error)

    verb.__doc__ = f"(not installed here: {error.name or error})"
    return _command_from_object(name, verb)


class LazyVerbs(TyperGroup):
    """Subcommands are entry points, imported on first use."""

    @staticmethod
    def _entry_points() -> dict[str, EntryPoint]:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(self._entry_points())

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry_point = self._entry_points().get(cmd_name)
        if entry_point is None:
            return None
        try:
            obj = entry_point.load()
        except ImportError as exc:
            return _unavailable(cmd_name, exc)
        return _command_from_object(cmd_name, obj)


app = typer.Typer(cls=LazyVerbs, no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def root() -> None:
    """pacsnode: a DICOM-native AI node beside the hospital PACS."""


def main() -> None:
    app()


if __name__ == "__main__":  # ``python -P -m node.cli``: how the node starts its own children
    main()
