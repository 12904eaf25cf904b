"""The ``gpushare`` command: set up, inspect and undo GPU time-slicing.

The commands and their options live here; what they do is in
:mod:`jupyterhub_gpushare.sharing`: the device plugin's reading of configs
(``pluginconfig``), the cluster's objects (``cluster``), planning (``plan``),
health (``health``), text (``report``, ``output``), Kubernetes access (``kube``)
and the flows that tie them together (``commands``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable
from typing import Any

import click

from ._version import __version__
from .sharing import commands
from .sharing.cluster import NODE_CONFIG_LABEL, OPERATOR_NAMESPACE, PRODUCT_LABEL
from .sharing.kube import with_kube
from .sharing.output import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, Failure, Output
from .sharing.plan import plan_disable, plan_setup
from .sharing.pluginconfig import (
    GPU_RESOURCE,
    SHARED_RESOURCE,
    STRATEGIES,
    ConfigError,
    Sharing,
    parse_replicas,
    render_config,
)


def _run(out: Output, work: Awaitable[Any]) -> Any:
    try:
        return asyncio.run(work)
    except Failure as e:
        out.fail(str(e))
        sys.exit(e.code)
    except ConfigError as e:
        out.fail(str(e))
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        out.fail("interrupted")
        sys.exit(EXIT_INTERRUPTED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpushare")
@click.option("-v", "--verbose", count=True, help="Log what happens (twice: debug).")
def main(verbose: int = 0) -> None:
    """Share NVIDIA GPUs between JupyterHub users on Kubernetes."""
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )


def _cluster_options(function):
    """Options of every command that reads the cluster."""
    options = [
        click.option(
            "--namespace",
            default=OPERATOR_NAMESPACE,
            show_default=True,
            help="Namespace of the GPU operator (its ConfigMap and device-plugin pods).",
        ),
        click.option(
            "--policy",
            metavar="NAME",
            help="The GPU operator's ClusterPolicy to use, where there are several "
            "(found by listing otherwise: cluster-policy from Helm, gpu-cluster-policy "
            "from OLM).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
        click.option("--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, ~/.kube)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _change_options(function):
    """Options that setup and disable share."""
    options = [
        click.option(
            "--dry-run", is_flag=True, help="Print the objects and patches; change nothing."
        ),
        click.option("--yes", "-y", is_flag=True, help="Apply without asking."),
        click.option(
            "--force",
            is_flag=True,
            help="Restart the device plugin even while GPU pods are Pending "
            "(they may fail with UnexpectedAdmissionError).",
        ),
        click.option(
            "--wait",
            "wait_pending",
            is_flag=True,
            help="Wait (up to --timeout) for Pending GPU pods instead of refusing at once.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=1),
            default=300,
            show_default=True,
            help="Seconds to wait for the new capacity (and with --wait, for Pending pods).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return _cluster_options(function)


@main.command()
@click.option(
    "--replicas",
    required=True,
    metavar="N",
    help="Slices per physical GPU: how many users share one GPU. At least 2; at most 48 "
    "with MPS, and as many as fit 60000 slices per node with time-slicing.",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default="time-slicing",
    show_default=True,
    help="time-slicing: GPUs take turns; mps: each slice gets 1/N of memory and compute.",
)
@click.option(
    "--rename",
    is_flag=True,
    help=f"Advertise {SHARED_RESOURCE} instead of {GPU_RESOURCE}.",
)
@click.option(
    "--nodes",
    "selector",
    metavar="SELECTOR",
    help="Only GPU nodes matching this label selector, through their "
    f"{NODE_CONFIG_LABEL} label (e.g. {PRODUCT_LABEL}=Tesla-T4; the "
    "-SHARED that GFD appends once shared is matched too).",
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the device plugin config only (for the plain device plugin Helm chart).",
)
@_change_options
def setup(
    replicas: str,
    strategy: str,
    rename: bool,
    selector: str | None,
    print_config: bool,
    namespace: str,
    policy: str | None,
    dry_run: bool,
    yes: bool,
    force: bool,
    wait_pending: bool,
    timeout: float,
    as_json: bool,
    kubeconfig: str | None,
) -> None:
    """Turn on GPU sharing: N slices per GPU, safely and idempotently.

    A config the nodes already select that gives the same sharing is kept as it is.
    """
    out = Output(as_json)
    try:
        sharing = Sharing(strategy, parse_replicas(replicas, strategy), rename)
    except ConfigError as e:
        out.fail(str(e))
        sys.exit(EXIT_USAGE)
    if print_config:
        click.echo(render_config(sharing), nl=False)
        return
    opts = commands.Options(namespace, dry_run, yes, force, wait_pending, timeout, policy, selector)
    title = sharing.describe() + (f" on nodes matching {selector!r}" if selector else "")

    def build(policy_object, config_map, nodes, selected):
        return plan_setup(policy_object, config_map, nodes, sharing, namespace, selected)

    result = _run(
        out,
        with_kube(kubeconfig, lambda kube: commands.change(kube, out, opts, "setup", build, title)),
    )
    if as_json:
        out.json(result)
    elif not dry_run and result.get("changed"):
        out.line()
        out.ok(f"GPU sharing is on: {title} (ClusterPolicy {result['cluster_policy']})")
        if strategy == "mps":
            out.item("under MPS each slice is capped at 1/N of the GPU's memory and compute")


@main.command()
@click.option(
    "--unshared",
    is_flag=True,
    help="Go back to no sharing (remove the ClusterPolicy's device plugin config) instead "
    "of putting back the config setup found: for when that config is gone or broken.",
)
@_change_options
def disable(
    unshared: bool,
    namespace: str,
    policy: str | None,
    dry_run: bool,
    yes: bool,
    force: bool,
    wait_pending: bool,
    timeout: float,
    as_json: bool,
    kubeconfig: str | None,
) -> None:
    """Undo setup: restore the ClusterPolicy's earlier config and the capacity."""
    out = Output(as_json)
    opts = commands.Options(namespace, dry_run, yes, force, wait_pending, timeout, policy)

    def build(policy_object, config_map, nodes, selected):
        return plan_disable(policy_object, config_map, nodes, namespace, unshared)

    title = "no sharing" if unshared else "the earlier config"
    result = _run(
        out,
        with_kube(
            kubeconfig, lambda kube: commands.change(kube, out, opts, "disable", build, title)
        ),
    )
    if as_json:
        out.json(result)
    elif not dry_run and result.get("changed"):
        out.line()
        back = "no sharing" if unshared else "the earlier config"
        out.ok(
            f"GPU sharing set up by gpushare is off; {back} is back "
            f"(ClusterPolicy {result['cluster_policy']})"
        )


@main.command()
@_cluster_options
def status(namespace: str, policy: str | None, as_json: bool, kubeconfig: str | None) -> None:
    """Show GPU slices per node: allocatable, used, free, who holds them, who waits,
    and what is wrong with the set-up, each problem with the command that fixes it."""
    out = Output(as_json)
    opts = commands.Options(namespace, policy=policy)
    result = _run(out, with_kube(kubeconfig, lambda kube: commands.status(kube, opts)))
    if as_json:
        out.json({"ok": True, **result})
    else:
        commands.print_status(out, result)


if __name__ == "__main__":
    main()
