"""The ``gpushare`` command: set up, inspect and undo GPU time-slicing."""

import click

from ._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpushare")
def main() -> None:
    """Share NVIDIA GPUs between JupyterHub users on Kubernetes."""
