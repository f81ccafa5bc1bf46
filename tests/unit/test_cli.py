"""The command line as a user runs it, without QEMU or FUSE: signals during
start-up and the QMP connect, option checks.  Each command runs in a fresh
interpreter from this source tree, as the ``vmcorefs`` script runs it; a
listening socket that never greets stands in for QEMU's monitor."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

import vmcorefs
from vmcorefs import cli
from vmcorefs.errors import UsageError

SRC = Path(vmcorefs.__file__).resolve().parents[1]

#: ``vmcorefs ARGS`` as the installed script runs it (``from vmcorefs.cli
#: import main``), except that the interpreter sends itself SIGNUM as soon as
#: it starts importing MODULE: a Ctrl-C at a precise point of the start-up.
SIGNAL_AT_IMPORT = """
import os, sys
MODULE, SIGNUM = sys.argv.pop(1), int(sys.argv.pop(1))

class SignalAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), SIGNUM)
        return None

sys.meta_path.insert(0, SignalAtImport())
from vmcorefs.cli import main
sys.exit(main())
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SRC))


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmcorefs", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmcorefs: "), r.stderr
    return lines[0]


class SilentMonitor:
    """A unix socket that accepts clients and never greets (a QMP monitor
    that does not answer): ``connected`` is set at the first client,
    ``closed`` once it has hung up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connected = threading.Event()
        self.closed = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        with conn:
            self.connected.set()
            while conn.recv(4096):
                pass
            self.closed.set()

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[SilentMonitor]:
    m = SilentMonitor(tmp_path / "qmp.sock")
    yield m
    m.close()


def _command(name: str, sock: Path, tmp_path: Path) -> list[str]:
    return [name, str(sock), *([str(tmp_path / "out.core")] if name == "dump" else [])]


@pytest.mark.parametrize("module", ["asyncio", "vmcorefs.dump", "vmcorefs.qemu.monitor"],
                         ids=["imports", "parsing", "before-connect"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["info", "dump"])
def test_signal_during_start_up_is_one_line(monitor: SilentMonitor, tmp_path: Path, command: str,
                                           signum: int, module: str) -> None:
    """Ctrl-C (or SIGTERM) while the command imports its modules, parses its
    arguments or is about to connect: one line, 128 + the signal, never a
    traceback (asyncio, imported at start-up, took ~50 ms of it)."""
    r = subprocess.run([sys.executable, "-c", SIGNAL_AT_IMPORT, module, str(int(signum)),
                        *_command(command, monitor.path, tmp_path)],
                       capture_output=True, text=True, timeout=60, env=_env())
    name = signal.Signals(signum).name
    assert _one_line(r) == f"vmcorefs: interrupted by {name}"
    assert r.returncode == 128 + signum
    assert list(tmp_path.iterdir()) == [monitor.path]  # no output, no partial file


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["info", "dump"])
def test_signal_during_qmp_connect_is_one_line(monitor: SilentMonitor, tmp_path: Path, command: str,
                                              signum: int) -> None:
    """A signal while the command waits for the monitor's greeting: it hangs
    up, says so in one line and exits 128 + the signal."""
    p = subprocess.Popen([sys.executable, "-m", "vmcorefs", *_command(command, monitor.path, tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert monitor.connected.wait(30), "vmcorefs never connected"
        p.send_signal(signum)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    assert _one_line(r) == f"vmcorefs: interrupted by {signal.Signals(signum).name}"
    assert r.returncode == 128 + signum
    assert monitor.closed.wait(5)
    assert list(tmp_path.iterdir()) == [monitor.path]


@pytest.mark.parametrize("value, why", [("0", "must be more than 0 seconds"), ("-1", "must be more than 0 seconds"),
                                        ("-0.5", "must be more than 0 seconds"), ("nan", "not a number of seconds"),
                                        ("soon", "not a number of seconds"), ("1e9", "must be at most 3600 seconds")])
@pytest.mark.parametrize("command", ["mount", "info", "dump"])
def test_timeout_must_be_positive(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, value: str,
                                  why: str) -> None:
    """``--timeout 0`` (or less) is refused by the argument parser, for every
    command, in one line saying what a timeout must be -- the dump took it and
    failed its first QMP command with 'no answer within 0 s (is QEMU stopped
    or hung?)'."""
    sock = str(tmp_path / "qmp.sock")
    args = {"mount": [sock, str(tmp_path)], "info": [sock], "dump": [sock, str(tmp_path / "out.core")]}[command]
    assert cli.main([command, "--timeout", value, *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vmcorefs: argument --timeout: {why}: {value!r} (see 'vmcorefs {command} --help')"]


def _reap_children(timeout: float = 30.0) -> None:
    """Wait for the daemons ``cli.main(["mount", ...])`` forked here."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ChildProcessError):  # none left
        while time.monotonic() < deadline:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.01)


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_mount_over_a_non_empty_directory_warns(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                foreground: bool) -> None:
    """FUSE mounts over a directory with files in it (as fusermount3 does):
    one line says they are hidden while mounted, once the mount is ready; an
    empty directory says nothing; a mount that fails says only why."""
    async def serve(args: object, ready: Callable[[], None]) -> int:
        ready()
        return 0

    async def serve_fails(args: object, ready: Callable[[], None]) -> int:
        raise UsageError("no such QMP socket")

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = ["mount", *(["-f"] if foreground else []), str(tmp_path / "qmp.sock"), str(mnt)]
    monkeypatch.setattr(cli, "_serve", serve)
    try:
        assert cli.main(mount) == 0
        assert capsys.readouterr().err == ""
        (mnt / ".notes").write_text("kept")
        assert cli.main(mount) == 0
        assert capsys.readouterr().err.splitlines() == [
            f"vmcorefs: {mnt} is not empty: its files are hidden while mounted"]
        monkeypatch.setattr(cli, "_serve", serve_fails)
        assert cli.main(mount) == 2
        assert capsys.readouterr().err.splitlines() == ["vmcorefs: no such QMP socket"]
    finally:
        _reap_children()


@pytest.mark.parametrize("command", ["info", "dump"])
def test_an_ignored_sigint_stays_ignored(monitor: SilentMonitor, tmp_path: Path, command: str) -> None:
    """A command started with SIGINT ignored (a background job of a shell
    script) is not stopped by it, as Python leaves it ignored; SIGTERM still
    stops it in one line."""
    p = subprocess.Popen([sys.executable, "-m", "vmcorefs", *_command(command, monitor.path, tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert monitor.connected.wait(30), "vmcorefs never connected"
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert _one_line(subprocess.CompletedProcess(p.args, p.returncode, "", err)) == "vmcorefs: interrupted by SIGTERM"
    assert p.returncode == 128 + signal.SIGTERM


def test_dump_empty_output_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``vmcorefs dump SOCK ''``: an empty OUTPUT is refused as such (exit 2),
    before the guest is touched -- it was taken for the working directory
    ("/cwd: is a directory")."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["dump", str(tmp_path / "qmp.sock"), ""]) == 2
    assert capsys.readouterr().err.splitlines() == ["vmcorefs: OUTPUT is empty (see 'vmcorefs dump --help')"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["mount", "info", "dump"])
def test_unknown_argument_points_to_the_commands_help(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      command: str) -> None:
    """An argument a command does not know is that command's usage error
    ('vmcorefs dump --help', which lists its options), not the top level's;
    one before the command is the top level's."""
    sock = str(tmp_path / "qmp.sock")
    args = {"mount": [sock, str(tmp_path)], "info": [sock], "dump": [sock, str(tmp_path / "out.core")]}[command]
    for extra in (["--bogus"], ["--bogus", "stray"]):
        assert cli.main([command, *args, *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"vmcorefs: unrecognized arguments: {' '.join(extra)} (see 'vmcorefs {command} --help')"]
    assert cli.main(["--bogus", command, *args]) == 2
    assert capsys.readouterr().err.splitlines() == ["vmcorefs: unrecognized arguments: --bogus (see 'vmcorefs --help')"]
    assert list(tmp_path.iterdir()) == []


#: ``vmcorefs info SOCK`` whose guest prints SIZE bytes of output (``_info``
#: stands in for the guest: no QEMU needed); SIZE -1 raises BrokenPipeError.
INFO_PRINTS = """
import json, sys
from vmcorefs import cli
SIZE = int(sys.argv.pop(1))

async def info(args):
    if SIZE < 0:  # a broken pipe that is not stdout's (a bug)
        raise BrokenPipeError(32, "Broken pipe")
    if args.json:
        print(json.dumps({"vmcoreinfo": {"OSRELEASE": "6.1.0"}, "padding": "x" * SIZE}, indent=2))
    else:
        print("VMCOREINFO   OSRELEASE=6.1.0\\n" + "x" * SIZE)
    return 0

cli._info = info
sys.exit(cli.main())
"""


@contextlib.contextmanager
def _stdout(sink: str) -> Iterator[int]:
    """A file descriptor for a command's stdout: ``/dev/full``, or a pipe
    whose reader is gone (``| head -1`` once head has exited)."""
    if sink == "full":
        fd = os.open("/dev/full", os.O_WRONLY)
    else:
        r, fd = os.pipe()
        os.close(r)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("sink", ["closed-pipe", "full"])
@pytest.mark.parametrize("argv", [["info", "SOCK"], ["info", "SOCK", "--json"], ["info", "SOCK", "big"],
                                  ["info", "SOCK", "--json", "big"], ["--version"], ["--help"], ["dump", "--help"]],
                         ids=["info", "info-json", "info-big", "info-json-big", "version", "help", "dump-help"])
def test_stdout_that_cannot_be_written(sink: str, buffered: bool, argv: list[str]) -> None:
    """``vmcorefs info SOCK | head -1`` once head has gone: silent, 141 as a
    tool killed by SIGPIPE (was "internal error: BrokenPipeError", or
    Python's "Exception ignored ... BrokenPipeError" at exit).  ``> /dev/full``:
    one line saying so, exit 1.  The same for argparse's output, and for a
    write that fails mid-command (output larger than stdout's buffer)."""
    env = _env()
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    if argv[0] == "info":
        size = 1 << 20 if "big" in argv else 0
        cmd = ["-c", INFO_PRINTS, str(size), *(a for a in argv if a != "big")]
    else:
        cmd = ["-m", "vmcorefs", *argv]
    with _stdout(sink) as fd:
        r = subprocess.run([sys.executable, *cmd], stdout=fd, stderr=subprocess.PIPE, text=True, timeout=60, env=env)
    if sink == "closed-pipe":
        assert (r.returncode, r.stderr) == (128 + signal.SIGPIPE, "")
    else:
        assert _one_line(r) == "vmcorefs: cannot write to standard output: No space left on device"
        assert r.returncode == 1


def test_stdout_is_written(capfd: pytest.CaptureFixture[str]) -> None:
    """What the command prints arrives (the same runs as above, stdout fine)."""
    r = subprocess.run([sys.executable, "-c", INFO_PRINTS, "10", "info", "SOCK"], capture_output=True, text=True,
                       timeout=60, env=_env())
    assert (r.returncode, r.stdout, r.stderr) == (0, "VMCOREINFO   OSRELEASE=6.1.0\n" + "x" * 10 + "\n", "")
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capfd.readouterr().out == f"vmcorefs {vmcorefs.__version__}\n"
    assert sys.stdout is not None and not isinstance(sys.stdout, cli._Stdout)


def test_other_broken_pipes_are_not_stdouts() -> None:
    """Only a failed write to stdout is taken for a closed stdout: an EPIPE
    from elsewhere is still an internal error, not a silent 141."""
    r = subprocess.run([sys.executable, "-c", INFO_PRINTS, "-1", "info", "SOCK"], capture_output=True, text=True,
                       timeout=60, env=_env())
    assert _one_line(r).startswith("vmcorefs: internal error: BrokenPipeError")
    assert (r.returncode, r.stdout) == (1, "")
