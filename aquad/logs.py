"""aquad's log lines: one per event, `event key=value ...` (logfmt).

The first word names what happened (`tenant_joined`, `slice_revoked`, ...)
and the keys are stable, so `journalctl -u aquad | grep tenant_dropped` and
log shippers can read them without parsing prose. Levels mean something:
error, the daemon could not do what it should (a bug, a failed accept);
warning, an operator should look (a tenant dropped for silence, a slice
revoked, connections turned away); info, the life of the daemon and its
tenants (start, stop, joins, leaves); debug, per request and per slice.
Nothing is logged per request at the default level (info).

Under systemd (stderr is the journal: $JOURNAL_STREAM) each line starts
with its syslog priority, `<4>`, which journald turns into the entry's
priority, and carries no timestamp of its own; elsewhere lines are
timestamped.
"""

from __future__ import annotations

import logging
import os
import sys

# logging level -> syslog priority (sd-daemon(3)'s <N> prefixes)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def quote(value: object) -> str:
    """A logfmt value: bare if it is one word, else double-quoted."""
    text = str(value)
    if text and not any(c in text for c in ' "=\n\\'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line(event: str, /, **fields: object) -> str:
    """`event k=v ...`; lists are joined with commas, None fields left out."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        parts.append(f"{key}={quote(value)}")
    return " ".join(parts)


def event(log: logging.Logger, level: int, name: str, /, **fields: object) -> None:
    """Log one event line, formatting it only if the level is on."""
    if log.isEnabledFor(level):
        log.log(level, "%s", line(name, **fields))


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        text = super().format(record)
        # A traceback continues on more lines: each gets the priority too.
        return "\n".join(prefix + part for part in text.split("\n"))


def to_journal() -> bool:
    """Whether stderr is the journal's stream: systemd sets $JOURNAL_STREAM
    to its device:inode (a child with stderr redirected inherits the
    variable, not the stream)."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return os.environ.get("JOURNAL_STREAM", "") == f"{st.st_dev}:{st.st_ino}"


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if to_journal():
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s aquad %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
