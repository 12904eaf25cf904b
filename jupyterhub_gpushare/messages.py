"""What users read while they wait: plain text and escaped HTML for the spawn page.

JupyterHub's spawn page puts ``html_message`` into the page as markup (and the
plain ``message`` as text when there is no HTML), so every value that goes into
the HTML is escaped here, numbers included: they come from the service's JSON.
The HTML carries its own inline styles, since the spawn page loads no
stylesheet of ours; colours lean on ``currentColor`` and translucent fills so
that they read in the hub's light and dark themes alike.
"""

from __future__ import annotations

import math
import time
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .objects import GPUShare

from .tickets import TicketStatus


def format_wait(seconds: float | None, bound: float | None = None) -> str:
    """ "about 4 minutes, at most 20": the estimate rounded, the bound rounded up
    (it is a promise), each left out where unknown."""
    if seconds is None and bound is None:
        return "unknown"
    parts = []
    if seconds is not None:
        if seconds < 90:
            parts.append("about a minute")
        elif seconds < 3600:
            parts.append(f"about {round(seconds / 60)} minutes")
        else:
            parts.append(f"about {seconds / 3600:.1f} hours")
    if bound is not None:
        minutes = max(math.ceil(bound / 60), 1)
        if minutes >= 120:
            at_most = f"{math.ceil(bound / 360) / 10:.1f} hours"
        elif seconds is not None and 90 <= seconds < 3600:
            at_most = str(minutes)  # "about 4 minutes, at most 20"
        else:
            at_most = f"{minutes} minute{'s' if minutes != 1 else ''}"
        parts.append(f"at most {at_most}")
    return ", ".join(parts)


def gpu_name(pool: dict) -> str:
    products = [p.removesuffix("-SHARED").replace("-", " ") for p in pool.get("products") or []]
    return ", ".join(products) or "GPU"


def _count(value: object) -> int:
    """A non-negative whole number from the service's JSON, whatever it holds."""
    try:
        return max(int(value), 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _seconds_until(value: object, now: float) -> float | None:
    """Seconds from ``now`` until a Unix time from the service's JSON (0 if past)."""
    try:
        moment = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(moment):
        return None
    return max(moment - now, 0.0)


BAR_STYLE = (
    "display:inline-block;width:9em;height:0.6em;border-radius:0.3em;overflow:hidden;"
    "vertical-align:middle;background:rgba(127,168,107,0.35);"
    "box-shadow:inset 0 0 0 1px rgba(127,168,107,0.8)"
)


def queue_message(status: TicketStatus, now: float | None = None) -> dict:
    """A progress event (``message`` and ``html_message``) for a waiting spawn."""
    now = time.time() if now is None else now
    pool = status.pool or {}
    free, total = _count(pool.get("slices_free")), _count(pool.get("slices_total"))
    name = gpu_name(pool)
    if not status.ready:
        # the cause (API server address, RBAC) is for the admins' log, not the page
        text = "Waiting for a GPU slice: the GPU service is reading the cluster's GPU nodes"
        return {"message": text, "html_message": escape(text)}
    position, waiting = _count(status.position), _count(status.waiting)
    wait = format_wait(_seconds_until(status.eta_at, now), _seconds_until(status.eta_bound_at, now))
    notes = []
    if status.kept_place:
        notes.append("You kept your place in line from before the hub restarted.")
    if status.reason:
        notes.append(f"Why you still wait: {status.reason}.")
    text = " ".join(
        [
            f"Waiting for a GPU slice: you are number {position} of {waiting} in line.",
            f"{free} of {total} slices free on {name}. Estimated wait: {wait}.",
            *notes,
        ]
    )
    used_percent = min(round(100 * (total - min(free, total)) / total), 100) if total else 100
    note_html = "".join(f'<span class="gpushare-note">{escape(n)}</span>' for n in notes)
    html = (
        '<div class="gpushare-queue" style="display:inline-flex;align-items:center;'
        "gap:1em;text-align:left;padding:0.6em 1em;margin:0.5em 0;border-radius:0.5em;"
        'border:1px solid rgba(217,130,43,0.6);background:rgba(217,130,43,0.08)">'
        f'<span class="gpushare-position" style="font-size:3em;font-weight:700;line-height:1;'
        f'color:#d9822b;font-variant-numeric:tabular-nums" title="your place in line">'
        f"{position}</span>"
        '<span style="display:flex;flex-direction:column;gap:0.2em">'
        f'<span style="font-weight:600">of {waiting} in line for a GPU slice'
        f" on {escape(name)}</span>"
        f'<span><span class="gpushare-free">{free} of {total} slices free</span> '
        f'<span class="gpushare-bar" role="img" aria-label="{used_percent}% of the slices in use" '
        f'style="{BAR_STYLE}"><span style="display:block;height:100%;width:{used_percent}%;'
        'background:#d9822b"></span></span></span>'
        f'<span style="opacity:0.8">Estimated wait: {escape(wait)}</span>'
        f"{note_html}"
        "</span></div>"
    )
    return {"message": text, "html_message": html}


def share_message(share: GPUShare) -> str:
    """What a GPU server gets, for the spawn page: slices, memory, and what kind of cap."""
    if share.replicas <= 1:
        return "Your server gets a whole GPU."
    slices = f"{share.slices} of the {share.replicas} slices of a GPU"
    memory_mib = share.memory_mib
    if memory_mib:
        memory = f"{memory_mib / 1024:.1f} GiB of its memory"
    else:
        memory = f"{share.fraction:.0%} of its memory"
    if share.hard_cap:
        cap = (
            "a hard cap: with MPS the GPU itself holds every process to it, "
            f"and to 1/{share.replicas} of the GPU's compute"
        )
    else:
        cap = (
            "a cooperative cap: PyTorch, JAX, CuPy and TensorFlow keep to it, and "
            "while the others are idle your work gets the whole GPU's compute"
        )
    return f"Your server gets {slices} and {memory} ({cap})."
