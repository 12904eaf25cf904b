"""The text ``gpushare`` prints: plans, node tables, summaries, status. Pure functions."""

from __future__ import annotations

import json
from collections.abc import Mapping

import yaml

from .cluster import GpuNode
from .health import node_row, summary
from .plan import Plan


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells
    )


def summary_lines(figures: Mapping) -> list[str]:
    replicas = figures["replicas"]
    if isinstance(replicas, list):
        replicas = ", ".join(map(str, replicas)) + " (differs per node)" if replicas else "-"
    rows = [
        ("Physical GPUs", figures["physical_gpus"]),
        ("Replicas per GPU", replicas),
        ("Virtual GPUs", figures["virtual_gpus"]),
        ("Max concurrent users", figures["max_concurrent_users"]),
    ]
    return [f"  {name + ':':<22}{value}" for name, value in rows]


def node_table(nodes: list[GpuNode], verified: set[str], plan: Plan | None) -> str:
    changed = {c.name for c in plan.affected} if plan else set()
    rows = []
    for node in nodes:
        if node.name in verified:
            state = "verified"
        elif node.name in changed:
            state = "not verified"
        else:
            state = "unchanged"
        row = node_row(node)
        rows.append(
            [
                row["node"],
                row["product"] or "-",
                row["gpus"] if row["gpus"] is not None else "?",
                row["strategy"],
                row["replicas"],
                row["resource"],
                row["slices"],
                state,
            ]
        )
    return format_table(
        ["NODE", "PRODUCT", "GPUS", "STRATEGY", "REPLICAS", "RESOURCE", "SLICES", "STATE"], rows
    )


def node_summary(nodes: list[GpuNode]) -> list[str]:
    return summary_lines(summary(nodes))


class _BlockDumper(yaml.SafeDumper):
    """safe_dump, with multi-line strings (device plugin configs) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def to_yaml(obj: object) -> str:
    return yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)


def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(", ", ": "))


def plan_lines(plan: Plan, full: bool = False) -> list[str]:
    """What a plan does, one line per object; ``full`` adds the objects and patches."""
    lines: list[str] = []
    action = plan.config_map_action
    if action:
        before = (plan.config_map_before or {}).get("data") or {}
        after = (plan.config_map_after or {}).get("data") or {}
        parts = []
        for verb, keys in (
            ("add", sorted(set(after) - set(before))),
            ("update", sorted(k for k in set(after) & set(before) if after[k] != before[k])),
            ("remove", sorted(set(before) - set(after))),
        ):
            if keys:
                parts.append(f"{verb} {', '.join(keys)}")
        detail = f" ({'; '.join(parts)})" if parts and action != "delete" else ""
        lines.append(f"ConfigMap {plan.namespace}/{plan.config_map_name}: {action}{detail}")
        if full and action != "delete":
            lines += ["    " + line for line in to_yaml(plan.config_map_after).splitlines()]
    if plan.policy_patch:
        if full:
            lines.append(f"ClusterPolicy {plan.policy_name}: merge patch")
            lines += ["    " + line for line in to_yaml(plan.policy_patch).splitlines()]
        else:
            config = (plan.policy_patch.get("spec") or {}).get("devicePlugin")
            what = f"spec.devicePlugin {_compact(config)}" if config else "annotations only"
            lines.append(f"ClusterPolicy {plan.policy_name}: patch {what}")
    for node, patch in sorted(plan.node_patches.items()):
        lines.append(f"node {node}: patch {_compact(patch['metadata'])}")
    for change in plan.affected:
        before = change.before.describe() if change.before else "device plugin cannot start"
        why = "" if change.before != change.after else " (restart only)"
        lines.append(
            f"node {change.name}: restart the device plugin; {before} -> "
            f"{change.after.describe()}{why}"
        )
    return lines


def policy_line(report: Mapping) -> str:
    policy = report["cluster_policy"]
    if policy is None:
        return "no GPU operator ClusterPolicy found (or not readable)"
    config = policy["config"] or {}
    managed = " (set up by gpushare)" if policy["set_up_by_gpushare"] else ""
    return (
        f"ClusterPolicy {policy['name']}: device plugin config "
        f"{config.get('name') or '-'}, default {config.get('default') or '-'}{managed}"
    )


def status_table(report: Mapping) -> str:
    rows = [
        [
            r["node"],
            r["product"] or "-",
            r["gpus"] if r["gpus"] is not None else "?",
            r["strategy"],
            r["replicas"],
            r["resource"],
            r["slices"],
            r["used"],
            r["free"],
            len(r["pods"]),
            len(r["pending"]),
        ]
        for r in report["nodes"]
    ]
    headers = ["NODE", "PRODUCT", "GPUS", "STRATEGY", "REPLICAS", "RESOURCE", "SLICES"]
    return format_table([*headers, "USED", "FREE", "PODS", "PENDING"], rows)
