"""The `terrasam` command line: a click group whose subcommands live one per module."""

from __future__ import annotations

import importlib
import sys

import click

from terrasam import __version__
from terrasam.errors import TerrasamError
from terrasam.warn import routed

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
    "sample": "terrasam.cli.sample:sample",
}


def _usage_sentence(exc: click.UsageError) -> str:
    """click's usage error as terrasam's one sentence, pointing at the command's --help."""
    text = " ".join(exc.format_message().split()).rstrip(".").replace(". Did you", "; did you")
    text = text[:1].lower() + text[1:]
    command = " ".join(["terrasam", *(exc.ctx.command_path.split()[1:] if exc.ctx else [])])
    return f"{text} (see `{command} --help`)."


INTERRUPTED = "terrasam: interrupted: run the same command to resume"


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
        from terrasam.interrupt import answered
        from terrasam.io import remove_own_temporaries

        try:
            # terrasam's and GDAL's warnings: each once, as "terrasam: warning: ..."; a Ctrl-C
            # that a long native call holds back ends the run after 1.5 s all the same
            with routed(echo=lambda line: click.echo(line, err=True)), \
                    answered(INTERRUPTED, cleanup=remove_own_temporaries):
                return super().invoke(ctx)
        except TerrasamError as exc:
            click.echo(f"terrasam: error: {exc}", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # BadParameter, MissingParameter, NoSuchOption, ...
            click.echo(f"terrasam: error: {_usage_sentence(exc)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            from terrasam.interrupt import EXIT_CODE, say_once

            say_once(INTERRUPTED)
            sys.exit(EXIT_CODE)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="terrasam")
def main():
    """Segment Anything on georeferenced rasters, delivered as GIS vectors."""
