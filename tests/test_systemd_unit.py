"""systemd/phototag.service: verified by systemd-analyze, which must print no warning at all.

``systemd-analyze verify`` exits 0 on unknown keys and bad values (it only warns), so any output
counts as a failure. It also checks that ExecStart's program exists: the test points it at this
checkout's console script, and changes nothing else.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "systemd" / "phototag.service"
SHIPPED_EXECUTABLE = "/opt/phototag/bin/phototag"
CONSOLE_SCRIPT = Path(sys.executable).parent / "phototag"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> values, over all sections (comments and blank lines skipped)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    unit = tmp_path / "phototag.service"
    unit.write_text(text.replace(SHIPPED_EXECUTABLE, str(CONSOLE_SCRIPT)))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=120)


@needs_systemd_analyze
def test_unit_verifies_without_any_warning(tmp_path):
    assert CONSOLE_SCRIPT.exists(), "install the package (pip install -e .) first"
    result = verify(tmp_path, UNIT.read_text())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        f"systemd-analyze printed:\n{result.stdout}{result.stderr}")


@needs_systemd_analyze
def test_the_check_catches_what_systemd_only_warns_about(tmp_path):
    """The empty-output rule is what makes the test above able to fail: exit 0, yet warnings."""
    text = UNIT.read_text().replace("[Service]\n", "[Service]\nWatchdogSecs=2min\nNice=eleven\n", 1)
    result = verify(tmp_path, text)
    assert result.returncode == 0
    assert "Unknown key" in result.stderr and "WatchdogSecs" in result.stderr


def test_unit_has_what_the_daemon_relies_on():
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == [f"{SHIPPED_EXECUTABLE} --config /etc/phototag/config.toml daemon"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["78"]
    assert d["StateDirectory"] == ["phototag"] and d["CacheDirectory"] == ["phototag"]
    assert d["ProtectSystem"] == ["strict"] and d["NoNewPrivileges"] == ["yes"]
    assert d["PrivateTmp"] == ["yes"] and d["IOSchedulingClass"] == ["idle"]
    assert d["User"] == ["phototag"] and d["Group"] == ["phototag"]
    for key in ("WatchdogSec", "RestartSec", "StartLimitIntervalSec", "StartLimitBurst", "Nice",
                "MemoryMax", "RequiresMountsFor", "ReadOnlyPaths"):
        assert d.get(key), key
    # The album path appears in the same three places.
    assert d["RequiresMountsFor"] == d["ReadOnlyPaths"]


def test_exec_start_command_line_is_accepted(tmp_path):
    """ExecStart's arguments parse with the real CLI (``daemon --help`` stops before running)."""
    config = tmp_path / "config.toml"
    config.write_text("")
    args = exec_start_args()
    args[args.index("/etc/phototag/config.toml")] = str(config)
    result = subprocess.run([str(CONSOLE_SCRIPT), *args, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--album" in result.stdout


def exec_start_args() -> list[str]:
    (exec_start,) = directives(UNIT.read_text())["ExecStart"]
    return exec_start.split()[1:]
