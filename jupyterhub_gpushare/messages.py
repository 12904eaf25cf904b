"""What users read while they wait: plain text and escaped HTML for the spawn page."""

from __future__ import annotations

from html import escape


def format_wait(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return "about a minute"
    if seconds < 3600:
        return f"about {round(seconds / 60)} minutes"
    return f"about {seconds / 3600:.1f} hours"


def gpu_name(pool: dict) -> str:
    products = [p.removesuffix("-SHARED").replace("-", " ") for p in pool.get("products") or []]
    return ", ".join(products) or "GPU"


def queue_message(status: dict) -> dict:
    """A progress event (``message`` and ``html_message``) for a waiting spawn."""
    pool = status.get("pool") or {}
    free, total = pool.get("slices_free", 0), pool.get("slices_total", 0)
    name = gpu_name(pool)
    if not status.get("ready", True):
        text = f"Waiting for a GPU slice: checking what is free ({status.get('problem', '')})"
        return {"message": text, "html_message": escape(text)}
    position, waiting = status.get("position", 0), status.get("waiting", 0)
    wait = format_wait(status.get("eta_seconds"))
    text = (
        f"Waiting for a GPU slice: you are number {position} of {waiting} in line. "
        f"{free} of {total} slices free on {name}. Estimated wait: {wait}."
    )
    used_percent = round(100 * (total - free) / total) if total else 100
    html = (
        '<div class="gpushare-queue">'
        f'<span class="gpushare-position" style="font-size:2em;font-weight:bold">{position}</span>'
        f" of {waiting} in line for a GPU slice &middot; "
        f'<span class="gpushare-free">{free} of {total} slices free</span> on {escape(name)}'
        f' <span class="gpushare-bar" style="display:inline-block;width:8em;height:0.7em;'
        f'background:#dfe8d8;vertical-align:middle"><span style="display:block;height:100%;'
        f'width:{used_percent}%;background:#d9822b"></span></span>'
        f" &middot; estimated wait: {escape(wait)}</div>"
    )
    return {"message": text, "html_message": html}
