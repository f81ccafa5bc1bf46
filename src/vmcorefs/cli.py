"""Command line: ``vmcorefs mount`` and ``vmcorefs info``.

Exit codes: 0 success, 2 bad input or usage, 1 any other failure.  Errors are
one line on stderr (``vmcorefs: ...``); ``--debug`` adds the detail.

``vmcorefs mount`` without ``-f`` behaves like sshfs: it starts a daemon (this
program re-executed with ``--foreground`` and a readiness pipe) and exits 0
only once the daemon reports the mount ready, or relays the daemon's error
and exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from typing import Any, Callable, Coroutine, Sequence

from vmcorefs import __version__
from vmcorefs.errors import QEMUGoneError, UsageError, VmcorefsError

log = logging.getLogger("vmcorefs")
READY_TIMEOUT = 120.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmcorefs", description="A running QEMU guest as a live ELF core over FUSE.")
    p.add_argument("--version", action="version", version=f"vmcorefs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("mount", help="mount a guest's live core at MOUNTPOINT",
                       description="Mount MOUNTPOINT/vmcore (live ELF core), pmem and vmcoreinfo.")
    m.add_argument("qmp_socket", metavar="QMP_SOCKET", help="QEMU's QMP unix socket (-qmp unix:PATH,server=on)")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--freeze", action="store_true",
                   help="pause the guest while vmcore or pmem is open (resumed at the last close)")
    m.add_argument("--cache", action="store_true",
                   help="serve reads through the kernel page cache, emptied at each open (a tool sees"
                        " memory as of its first read of each page; exact with --freeze)")
    m.add_argument("--allow-other", action="store_true", help="let other users through the mount (files stay 0400)")
    m.add_argument("--mode", type=_file_mode, default=0o400, metavar="OCTAL",
                   help="permission bits of the files, read bits only (default 0400; with"
                        " --allow-other, e.g. 0440 lets the mounting user's group read)")
    m.add_argument("--memory", choices=("auto", "shared", "procmem"), default="auto",
                   help="how to read guest RAM: shared backing file, /proc/PID/mem, or auto (default)")
    m.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="how long a QMP command may take before the request fails (default 10)")
    m.add_argument("--debug", action="store_true", help="log every request (stderr with -f, else --log-file)")
    m.add_argument("--log-file", metavar="FILE", help="daemon log file (default: none)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    i = sub.add_parser("info", help="show what a mount of this guest would expose")
    i.add_argument("qmp_socket", metavar="QMP_SOCKET")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--memory", choices=("auto", "shared", "procmem"), default="auto")
    i.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS")
    i.add_argument("--debug", action="store_true")
    return p


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if mode & ~0o444 or not mode & 0o400:
        raise argparse.ArgumentTypeError(f"only read bits, including the owner's (e.g. 0400, 0440): {text!r}")
    return mode


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds: {text!r}")
    return value


def _setup_logging(debug: bool, log_file: str | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # Library chatter (qemu.qmp task failures, asyncio) would print
        # tracebacks; our own errors already say what happened.
        for name in ("qemu.qmp", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _check_mountpoint(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: mountpoint does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # a FUSE daemon died here
            raise UsageError(f"{path}: stale FUSE mount (run 'fusermount3 -u {path}')") from None
        raise UsageError(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: mountpoint is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path}: already a mount point")
    return os.path.abspath(path)


async def _serve(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    import pyfuse3
    import pyfuse3.asyncio

    from vmcorefs.fs import VmcoreFS
    from vmcorefs.qemu.guest import Guest
    from vmcorefs.qemu.monitor import connect

    pyfuse3.asyncio.enable()
    mountpoint = _check_mountpoint(args.mountpoint)
    monitor = await connect(args.qmp_socket, timeout=args.timeout)
    guest = Guest(monitor, args.memory)
    try:
        snap = await guest.snapshot()
        fs = VmcoreFS(guest, freeze=args.freeze, file_mode=args.mode, mountpoint=mountpoint,
                      cache=args.cache)
        fs.set_initial(snap)
        options = {"fsname=vmcorefs", "subtype=vmcorefs", "ro", "default_permissions", "noatime"}
        if args.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(fs, mountpoint, options)
        except RuntimeError as e:
            raise VmcorefsError(f"{mountpoint}: cannot mount ({e}; is /dev/fuse usable and fuse3 installed?)") from None
        loop = asyncio.get_running_loop()
        pidfd = _watch_process(loop, monitor.pid, fs)
        loop.add_signal_handler(signal.SIGINT, pyfuse3.terminate)
        loop.add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
        ready()
        try:
            await pyfuse3.main(min_tasks=2, max_tasks=16)
        finally:
            if pidfd is not None:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            try:
                await fs.thaw()
            except VmcorefsError as e:
                log.warning("could not resume the guest: %s", e)
            pyfuse3.close(unmount=True)
        if fs.gone_reason is not None:
            raise QEMUGoneError(f"QEMU exited while mounted; {mountpoint} unmounted")
        return 0
    finally:
        guest.close()
        await monitor.close()


def _watch_process(loop: asyncio.AbstractEventLoop, pid: int | None, fs: Any) -> int | None:
    """Call ``fs.guest_gone`` as soon as the QEMU process exits (pidfd)."""
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    loop.add_reader(pidfd, fs.guest_gone, f"QEMU (pid {pid}) exited")
    return pidfd


async def _info(args: argparse.Namespace) -> int:
    from vmcorefs.qemu.guest import Guest
    from vmcorefs.qemu.monitor import connect

    monitor = await connect(args.qmp_socket, timeout=args.timeout)
    guest = Guest(monitor, args.memory)
    try:
        info = await guest.info()
    finally:
        guest.close()
        await monitor.close()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"QMP socket   {info['qmp_socket']} (QEMU {info['qemu_version']}, pid {info['qemu_pid']})",
        f"guest        {info['arch']}, {info['status']}, {info['vcpus']} vCPU(s)",
        f"memory       {len(info['memory'])} block(s), {_mib(sum(m['size'] for m in info['memory']))}:",
    ]
    for m in info["memory"]:
        lines.append(f"  {m['gpa_start']:#018x}-{m['gpa_end'] - 1:#018x}  {_mib(m['size']):>10}  "
                     f"{m['kind']:<3}  {m['name']:<12} {m['access']:<7} {m['backing']}")
    lines.append(f"vmcore       {info['vmcore_size']} bytes; pmem {info['pmem_size']} bytes")
    v = info["vmcoreinfo"]
    lines.append("VMCOREINFO   none (guest did not publish it: add -device vmcoreinfo and load qemu_fw_cfg)"
                 if v is None else
                 f"VMCOREINFO   OSRELEASE={v['OSRELEASE']} KERNELOFFSET={v['KERNELOFFSET']} PAGESIZE={v['PAGESIZE']}")
    if info.get("gdb"):
        lines.append(f"gdb          {info['gdb']}")
    return "\n".join(lines)


def _daemonize(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Start the serving daemon and wait until it reports ready or fails."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "vmcorefs", *argv[:1], "--foreground", f"--ready-fd={w}", *argv[1:]]
    out = open(args.log_file, "ab") if args.log_file else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, pass_fds=(w,), start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    finally:
        os.close(w)
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]
    with os.fdopen(r, "rb") as pipe:
        message = pipe.read(4096).decode(errors="replace").strip()
    if message == "OK":
        return 0
    if message.startswith("ERR "):
        code, _, text = message[4:].partition(" ")
        print(f"vmcorefs: {text}", file=sys.stderr)
        try:
            proc.wait(timeout=READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
        return int(code) if code.isdigit() else 1
    rc = proc.wait()
    print(f"vmcorefs: the daemon exited (status {rc}) before the mount was ready", file=sys.stderr)
    return 1


def _event_loop_run(coro: Coroutine[Any, Any, int]) -> int:
    """Run the daemon on uvloop when available (cheaper per FUSE request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _run_mount(argv: Sequence[str], args: argparse.Namespace) -> int:
    if not args.foreground:
        return _daemonize(argv, args)
    _setup_logging(args.debug, args.log_file if args.ready_fd is None else None)
    ready_fd = args.ready_fd

    def ready() -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, b"OK")
            os.close(ready_fd)
            ready_fd = None

    try:
        return _event_loop_run(_serve(args, ready))
    except VmcorefsError as e:
        if ready_fd is not None:
            os.write(ready_fd, f"ERR {e.exit_code} {e}".encode()[:4000])
            os.close(ready_fd)
            ready_fd = None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "mount":
            return _run_mount(argv, args)
        _setup_logging(args.debug)
        return asyncio.run(_info(args))
    except VmcorefsError as e:
        print(f"vmcorefs: {e}", file=sys.stderr)
        if debug:
            log.debug("detail", exc_info=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("vmcorefs: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line, detail with --debug
        print(f"vmcorefs: internal error: {type(e).__name__}: {e}"
              + ("" if debug else " (run with --debug for details)"), file=sys.stderr)
        if debug:
            import traceback

            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
