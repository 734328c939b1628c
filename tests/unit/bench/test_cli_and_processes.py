from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from bench.cli import _install_hint, _parse_selection, build_parser, main, missing_tools
from bench.processes import ProcessSet, StartupError, free_port, wait_http_ok


def test_missing_tools_and_the_exact_install_command() -> None:
    def fake_which(name: str) -> str | None:
        return None if name in ("wrk", "h2load") else f"/usr/bin/{name}"

    missing = missing_tools(["wrk", "h2load", "envoy"], which=fake_which)
    assert missing == ["wrk", "h2load"]
    assert _install_hint(missing) == "sudo apt-get install -y nghttp2-client wrk"
    assert _install_hint(["wrk"]) == "sudo apt-get install -y wrk"


def test_selection() -> None:
    parser = build_parser()
    assert _parse_selection(parser.parse_args(["--rows", "1,2a,5"])) == (["1", "2a"], True)
    assert _parse_selection(parser.parse_args(["--rows", "3h"])) == (["3h"], False)
    quick, micro = _parse_selection(parser.parse_args(["--quick"]))
    assert micro and "1" in quick and "2a" in quick
    everything, micro = _parse_selection(parser.parse_args([]))
    assert micro and len(everything) >= 14


def test_bad_rows_exit_2_without_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rows", "7"]) == 2
    assert "no row matches '7'" in capsys.readouterr().err
    assert main(["--duration", "0"]) == 2


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "2a" in out and "3gc2" in out and "micro" in out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_whole_process_group_is_killed_even_on_an_exception(tmp_path: Path) -> None:
    # The shell ignores SIGTERM and starts a grandchild: only the group SIGKILL ends both.
    script = "trap '' TERM; sleep 60 & echo $! > child.pid; wait"
    with pytest.raises(RuntimeError, match="boom"), ProcessSet(tmp_path) as procs:
        parent = procs.start("sh", ["sh", "-c", f"cd {tmp_path} && {script}"])
        deadline = time.monotonic() + 5
        while not (tmp_path / "child.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        child = int((tmp_path / "child.pid").read_text())
        assert _alive(parent.pid) and _alive(child)
        raise RuntimeError("boom")
    assert not _alive(parent.pid)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child)
    assert procs.processes == []


def test_a_process_that_dies_at_startup_is_reported_with_its_last_log_line(tmp_path: Path) -> None:
    with ProcessSet(tmp_path) as procs:
        proc = procs.start(
            "authz", [sys.executable, "-c", "import sys; print('error: invalid choice: serve'); sys.exit(2)"]
        )
        with pytest.raises(StartupError) as info:
            wait_http_ok(proc, free_port(), "/readyz", timeout_s=10)
    assert str(info.value) == "authz exited with code 2: error: invalid choice: serve"


def test_free_port_is_loopback_bindable() -> None:
    import socket

    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_sigterm_becomes_keyboard_interrupt() -> None:
    from bench.cli import _on_sigterm

    with pytest.raises(KeyboardInterrupt):
        _on_sigterm(signal.SIGTERM, None)


def test_every_module_exports_what_it_defines_publicly() -> None:
    import importlib
    import inspect

    for name in (
        "bare_grpc_check",
        "bare_http_check",
        "cli",
        "configs",
        "measure",
        "micro",
        "procstat",
        "processes",
        "report",
        "rows",
        "table",
        "tokens",
        "wrk",
    ):
        module = importlib.import_module(f"bench.{name}")
        exported = set(module.__all__)
        assert all(hasattr(module, n) for n in exported), name
        defined = {
            n
            for n, v in vars(module).items()
            if not n.startswith("_")
            and (inspect.isfunction(v) or inspect.isclass(v))
            and getattr(v, "__module__", None) == module.__name__
        }
        assert defined <= exported, f"bench.{name} does not export {sorted(defined - exported)}"
