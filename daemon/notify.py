"""systemd integration without extra dependencies: sd_notify messages and journald-friendly logs.

``sd_notify`` writes datagrams such as ``READY=1`` to the AF_UNIX socket systemd names in
``$NOTIFY_SOCKET`` (a path, or an abstract name starting with ``@``). Outside systemd the variable
is unset and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

# logging level -> syslog priority, which journald reads from a "<N>" line prefix (sd-daemon(3)).
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class Notifier:
    """Sends sd_notify state messages; does nothing when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, state: str) -> bool:
        """Send one message, e.g. ``"READY=1"``; True if it was delivered to a socket."""
        if self._sock is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(state.encode(), target)
        except OSError as e:  # systemd gone or socket unusable: never fatal for the daemon
            log.debug("sd_notify %r to %s failed: %s", state, self.address, e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(configured: float = 0.0) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is asked for.

    ``configured`` (config ``daemon.watchdog_seconds``) is the ping interval itself; 0 means half
    of systemd's ``$WATCHDOG_USEC`` (set by WatchdogSec=, for our PID only), as
    sd_watchdog_enabled(3) recommends.
    """
    if configured > 0:
        return configured
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        timeout = int(usec) / 1_000_000
    except ValueError:
        return None
    return timeout / 2 if timeout > 0 else None


def journal_stream_is_stderr() -> bool:
    """True when stderr is connected to journald ($JOURNAL_STREAM names stderr's device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """``<N>name: message``: journald adds time and process, and takes the priority from <N>."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno)
        if priority is None:
            priority = 7 if record.levelno < logging.INFO else 4 if record.levelno < logging.ERROR else 3
        text = super().format(record)
        # Each line of a multi-line message (a traceback) is a journal entry of its own: prefix all.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def setup_logging(verbose: bool = False) -> None:
    """Plain line-buffered log lines on stderr; syslog priority prefixes under journald."""
    stream = sys.stderr
    try:
        stream.reconfigure(line_buffering=True)  # never block-buffered, even into a pipe
    except (AttributeError, ValueError):
        pass
    handler = logging.StreamHandler(stream)
    if journal_stream_is_stderr():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Third-party chatter: APScheduler logs every job run at INFO, watchdog every event at DEBUG.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.INFO if verbose else logging.WARNING)
