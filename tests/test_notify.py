"""sd_notify over a real AF_UNIX datagram socket, and the journald log format in a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_messages_arrive_on_the_socket(notify_socket):
    path, sock = notify_socket
    notifier = Notifier(str(path))
    assert notifier.ready("watching 2 albums")
    assert sock.recv(4096) == b"READY=1\nSTATUS=watching 2 albums"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_socket_address():
    name = f"phototag-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier("@" + name).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready()


def test_vanished_socket_is_not_fatal(tmp_path):
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.watchdog() is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    assert watchdog_interval(configured=10) == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() is None


LOGGING_CHILD = textwrap.dedent(
    """
    import logging, sys
    from daemon.notify import setup_logging
    setup_logging(verbose=False)
    log = logging.getLogger("phototag.test")
    log.info("batch done")
    log.warning("bad file")
    log.debug("hidden")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("boom")
    sys.stderr.flush()
    sys.stdin.readline()  # stay alive until the test has read the lines
    """
)


def run_logging_child(stderr, env):
    return subprocess.Popen(
        [sys.executable, "-c", LOGGING_CHILD],
        stdin=subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=Path(__file__).parent.parent,
    )


def test_journald_priority_prefixes(tmp_path):
    log_file = tmp_path / "journal.txt"
    with open(log_file, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        child = run_logging_child(f, env)
        child.communicate(b"\n", timeout=30)
    lines = log_file.read_text().splitlines()
    assert lines[0] == "<6>phototag.test: batch done"
    assert lines[1] == "<4>phototag.test: bad file"
    assert lines[2] == "<3>phototag.test: boom"
    assert all(line.startswith("<3>") for line in lines[2:])  # the traceback lines too
    assert any("ZeroDivisionError" in line for line in lines)
    assert not any("hidden" in line for line in lines)


def test_plain_lines_without_journald_and_never_block_buffered(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    child = run_logging_child(subprocess.PIPE, env)
    try:
        # Read while the child is still alive and blocked on stdin: lines must already be out.
        first = child.stderr.readline().decode()
        second = child.stderr.readline().decode()
        assert child.poll() is None
    finally:
        child.communicate(b"\n", timeout=30)
    assert first.rstrip().endswith("INFO phototag.test: batch done")
    assert not first.startswith("<")
    assert "WARNING phototag.test: bad file" in second
