"""Entry point of the ``clipprior`` command: a Click group whose commands load lazily."""

from __future__ import annotations

import importlib

import click

from clipprior import __version__
from clipprior.cli._common import Group

__all__ = ["app", "main"]

# command name -> "module:attribute" inside clipprior.cli
_COMMANDS: dict[str, str] = {
    "precompute": "precompute:precompute",
    "inspect": "cache_cmds:inspect_cmd",
    "verify": "cache_cmds:verify_cmd",
    "merge": "cache_cmds:merge_cmd",
    "demo": "demo:demo",
    "show": "show:show",
    "evaluate": "evaluate:evaluate",
    "lists": "data_cmds:lists",
    "coco-to-masks": "data_cmds:coco_to_masks",
}


class _LazyGroup(Group):
    """A group that imports each command's module only when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in _COMMANDS if self._load(name) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(f"clipprior.cli.{module_name}")
        except ModuleNotFoundError as err:
            if err.name == f"clipprior.cli.{module_name}":
                return None  # command not built into this installation
            raise
        return getattr(module, attr)


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="clipprior")
def app() -> None:
    r"""clipprior: PI-CLIP prior maps (VTP, VVP, PIR) for few-shot segmentation.

    \b
    Examples:
      clipprior demo
      clipprior precompute --dataset pascal5i --fold 0 --data-root ~/data/VOC2012
      clipprior inspect priors.h5
    """


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
