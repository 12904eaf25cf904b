"""How ``gpushare`` talks to the admin: lines with markers, one JSON document, progress,
and the one-line failure that ends a command."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import click

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Failure(Exception):
    """Ends a command with one line for the user and a non-zero exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def _can_encode(text: str, stream) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class Output:
    """Human text with success and failure markers, or one JSON document (--json)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        fancy = _can_encode("✓✗→•", sys.stdout) and _can_encode("✓✗", sys.stderr)
        self.mark_ok, self.mark_fail = ("✓", "✗") if fancy else ("OK", "FAIL")
        self.mark_step, self.mark_item = ("→", "•") if fancy else ("->", "-")

    def line(self, text: str = "") -> None:
        if not self.as_json:
            click.echo(text)

    def lines(self, lines: list[str]) -> None:
        for text in lines:
            self.line(text)

    def step(self, text: str) -> None:
        self.line(f"{self.mark_step} {text}")

    def item(self, text: str) -> None:
        self.line(f"  {self.mark_item} {text}")

    def ok(self, text: str) -> None:
        self.line(f"{self.mark_ok} {text}")

    def problem(self, text: str, fix: str) -> None:
        self.line(f"  {self.mark_fail} {text}")
        self.line(f"      fix: {fix}")

    def warn(self, text: str) -> None:
        # warnings reach the user in --json mode too, on stderr
        click.echo(f"! {text}", err=True)

    def fail(self, text: str) -> None:
        click.echo(f"{self.mark_fail} {text}", err=True)
        if self.as_json:
            self.json({"ok": False, "error": text})

    def json(self, document: Mapping) -> None:
        click.echo(json.dumps(document, indent=2, sort_keys=False))


class Progress:
    """One status line: rewritten in place on a terminal, else printed when it changes."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.shown = False

    def update(self, text: str, elapsed: float, timeout: float) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K  {text} ({elapsed:.0f}s of {timeout:.0f}s)")
            sys.stderr.flush()
            self.shown = True
        elif text != self.last:
            sys.stderr.write(f"  [{elapsed:5.1f}s] {text}\n")
            sys.stderr.flush()
        self.last = text

    def close(self) -> None:
        if self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.shown = False
