"""The line kept on disk, so that a restarted service knows the order at once.

Writing must never stop the queue: a read-only or full disk (or a hub without
a persistent volume) is logged once, the queue goes on in memory, and the next
write that works says so. A state file that cannot be read, or that holds
something other than a list of tickets, is logged once and ignored; whatever
entries in it are sound are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable

from ..fairqueue import FairQueue, Ticket


class QueueStore(LoggingConfigurable):
    state_file = Unicode(
        config=True,
        help="""
        Where the line is kept between restarts of the service. By default
        beside the hub's database (the hub's working directory)::

            c.QueueStore.state_file = "/srv/jupyterhub/gpushare-queue.json"
        """,
    )

    @default("state_file")
    def _state_file_default(self) -> str:
        return os.path.abspath("gpushare-queue.json")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._write_failing = False

    def load(self) -> list[Ticket]:
        """The tickets in the state file; none when it is missing or unusable."""
        path = Path(self.state_file)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            self.log.warning("Ignoring the unreadable queue state %s: %s", path, e)
            return []
        entries = state.get("tickets") if isinstance(state, dict) else None
        if not isinstance(entries, list):
            self.log.warning(
                "Ignoring the queue state %s: it holds no list of tickets "
                "(was it written by something else?)",
                path,
            )
            return []
        tickets, bad = [], 0
        for entry in entries:
            try:
                if not isinstance(entry, dict):
                    raise TypeError("not an object")
                tickets.append(Ticket.from_state(entry))
            except (KeyError, TypeError, ValueError):
                bad += 1
        if bad:
            self.log.warning("Ignored %d malformed entries of the queue state %s", bad, path)
        if tickets:
            self.log.info("Restored %d queued spawns from %s", len(tickets), path)
        return tickets

    def save(self, queue: FairQueue) -> bool:
        """Write the line; True if it was written. Failures are logged, never raised."""
        path = Path(self.state_file)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"tickets": queue.to_state()}))
            tmp.replace(path)
        except OSError as e:
            if not self._write_failing:
                self._write_failing = True
                self.log.error(
                    "Cannot write the queue state %s (%s): the line is kept in memory only, "
                    "and a restart of the service would lose its order until this is fixed",
                    path,
                    e,
                )
            return False
        if self._write_failing:
            self._write_failing = False
            self.log.info("Writing the queue state %s works again", path)
        return True
