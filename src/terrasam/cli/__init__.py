"""The `terrasam` command line: a click group whose subcommands live one per module."""

from __future__ import annotations

import importlib
import sys

import click

from terrasam import __version__
from terrasam.errors import TerrasamError

# name -> "module:function"; imported only when the subcommand runs, so that
# `terrasam info` does not pay for importing torch.
COMMANDS = {
    "info": "terrasam.cli.info:info",
    "models": "terrasam.cli.models:models",
    "segment": "terrasam.cli.segment:segment",
    "prompt": "terrasam.cli.prompt:prompt",
    "preview": "terrasam.cli.preview:preview",
    "map": "terrasam.cli.preview:map_",
    "serve": "terrasam.cli.serve:serve",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TerrasamError as exc:
            click.echo(f"terrasam: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("terrasam: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="terrasam")
def main():
    """Segment Anything on georeferenced rasters, delivered as GIS vectors."""
