"""The ``mows`` command line. Subcommands are imported only when run: ``--help`` stays instant."""

from __future__ import annotations

import importlib
import logging
import sys

import click

__all__ = ["main"]

# name -> "module:attribute", imported on use.
_COMMANDS = {
    "crc32": ("mows.cli._crc32:crc32", "Generate or verify a model's crc32.txt."),
    "serve": ("mows.cli._serve:serve", "Run the node daemon (one per machine)."),
    "manifest": ("mows.cli._manifest:manifest", "Describe a model: files, chunks, tensors."),
    "load": ("mows.cli._client:load", "Load a model through the daemon, with progress."),
    "status": ("mows.cli._client:status", "Show the daemon's pool and models."),
    "prefetch": ("mows.cli._client:prefetch", "Queue a model for idle prefetch."),
    "reload": ("mows.cli._client:reload", "Make the daemon re-read its model list."),
    "scrub": ("mows.cli._client:scrub", "Re-check the pool's files against their CRCs now."),
    "config": ("mows.cli._serve:config", "Show the effective configuration and its sources."),
    "doctor": ("mows.cli._serve:doctor", "Check what breaks deployments."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = _COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module, _, attr = spec[0].partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, _COMMANDS[name][1]) for name in sorted(_COMMANDS)])


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="mows")
def cli(verbose: int) -> None:
    """mows: a model-weight service that caches LLM weights in node memory."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    from .._errors import MowsError

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except MowsError as e:
        click.echo(f"mows: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
