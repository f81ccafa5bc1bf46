"""A fake QMP server (tests only) that misbehaves: vmcorefs must fail with one
clear line, never a traceback, never hang beyond its timeouts, and leave
nothing mounted."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from vmcorefs.testing import is_mounted, run_vmcorefs, unmount

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}

Behaviour = Callable[[socket.socket], None]


def _send(conn: socket.socket, obj: object) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\r\n")


def _requests(conn: socket.socket) -> Iterator[dict]:  # type: ignore[type-arg]
    """JSON objects as the client sends them (QMP needs no newlines)."""
    decoder = json.JSONDecoder()
    buf = ""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data.decode()
        while True:
            buf = buf.lstrip()
            try:
                obj, end = decoder.raw_decode(buf)
            except ValueError:
                break
            buf = buf[end:]
            yield obj


def _serve_commands(answer: Callable[[dict], object | None]) -> Behaviour:  # type: ignore[type-arg]
    """Greet, accept qmp_capabilities, then answer each command via ``answer``
    (returning None sends nothing)."""

    def behaviour(conn: socket.socket) -> None:
        _send(conn, GREETING)
        for req in _requests(conn):
            if req.get("execute") == "qmp_capabilities":
                _send(conn, {"return": {}, "id": req.get("id")})
                continue
            reply = answer(req)
            if reply is not None:
                _send(conn, {**reply, "id": req.get("id")})  # type: ignore[dict-item]

    return behaviour


def _garbage_greeting(conn: socket.socket) -> None:
    conn.sendall(b"this is not json at all\r\n")
    time.sleep(10)


def _wrong_greeting(conn: socket.socket) -> None:
    _send(conn, {"QMP": 1})
    time.sleep(10)


def _huge_line(conn: socket.socket) -> None:
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(24):  # 24 MiB without a newline
            conn.sendall(chunk)
    except OSError:
        pass


def _close_mid_reply(conn: socket.socket) -> None:
    _send(conn, GREETING)
    for req in _requests(conn):
        if req.get("execute") == "qmp_capabilities":
            _send(conn, {"return": {}, "id": req.get("id")})
            continue
        conn.sendall(b'{"return": "Flat')
        conn.shutdown(socket.SHUT_RDWR)
        return


_MTREE_JUNK = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n  zzzz-yyyy (prio x, ram): ?\n"
_MTREE_HUGE = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n" + "".join(
    f"  {i << 12:016x}-{(i << 12) + 0xfff:016x} (prio 0, i/o): dev{i}\n" for i in range(70000))

SCENARIOS: dict[str, tuple[Behaviour, int, str]] = {
    "garbage-greeting": (_garbage_greeting, 2, "not a QMP monitor"),
    "wrong-greeting": (_wrong_greeting, 2, "not a QMP monitor"),
    "huge-line": (_huge_line, 2, "not a QMP monitor"),
    "error-replies": (_serve_commands(lambda r: {"error": {"class": "GenericError", "desc": "no such thing"}}),
                      1, "no such thing"),
    "absurd-mtree": (_serve_commands(lambda r: {"return": _MTREE_JUNK}), 1, "unparsable 'info mtree -f' line"),
    "huge-mtree": (_serve_commands(lambda r: {"return": _MTREE_HUGE}), 1, "more than"),
    "no-memory-view": (_serve_commands(lambda r: {"return": "FlatView #0\n AS \"I/O\", root: io\n"}), 1,
                       'no FlatView for address space "memory"'),
    "wrong-type": (_serve_commands(lambda r: {"return": {"not": "text"}}), 1, "answer is not text"),
    "slow": (_serve_commands(lambda r: None), 1, "no answer within 1 s"),
    "close-mid-reply": (_close_mid_reply, 1, "monitor connection lost"),
}


@pytest.fixture
def fake_qmp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, int, str]]:
    behaviour, code, words = SCENARIOS[request.param]
    path = str(tmp_path / "fake-qmp.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            def run(c: socket.socket = conn) -> None:
                try:
                    behaviour(c)
                except (OSError, ValueError):
                    pass
                finally:
                    c.close()
            threading.Thread(target=run, daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield path, code, words
    stop.set()
    t.join()
    srv.close()


def _check(r, code: int, words: str, started: float) -> None:  # type: ignore[no-untyped-def]
    assert time.monotonic() - started < 20, "took too long"
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmcorefs: "), r.stderr
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("fake_qmp", sorted(SCENARIOS), indirect=True)
def test_info_fails_cleanly(fake_qmp: tuple[str, int, str]) -> None:
    path, code, words = fake_qmp
    t = time.monotonic()
    r = run_vmcorefs("info", "--timeout", "1", path, timeout=60)
    _check(r, code, words, t)


@pytest.mark.parametrize("fake_qmp", ["wrong-greeting", "absurd-mtree", "slow", "close-mid-reply"], indirect=True)
def test_mount_fails_cleanly(fake_qmp: tuple[str, int, str], tmp_path: Path) -> None:
    path, code, words = fake_qmp
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    t = time.monotonic()
    try:
        r = run_vmcorefs("mount", "--timeout", "1", path, str(mnt), timeout=60)
        _check(r, code, words, t)
        assert not is_mounted(mnt)
    finally:
        unmount(mnt)
