"""Command line: ``vmcorefs mount`` and ``vmcorefs info``.

Exit codes: 0 success, 2 bad input or usage, 1 any other failure.  Errors are
one line on stderr (``vmcorefs: ...``); ``--debug`` adds the detail.  A
standard output that cannot be written is one line too (exit 1), except a
pipe whose reader has gone (``| head -1``): silent, exit 141 like a tool
killed by SIGPIPE.

``vmcorefs mount`` without ``-f`` behaves like sshfs: it forks a daemon
(before any thread or event loop exists, so the fork is safe and costs no
second interpreter start-up) and exits 0 only once the daemon reports the
mount ready on a pipe, or relays the daemon's error and exit code.

SIGINT and SIGTERM are caught from the start of :func:`main` until a
command installs its own handlers: one line, exit 130 or 143, never a
traceback.  So that this covers the start-up too, the module imports only
what that needs; asyncio, argparse, logging and the rest are imported by
the functions that use them, after the handlers are in place.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time

from vmcorefs import __version__
from vmcorefs.errors import MountError, QEMUGoneError, UsageError, VmcorefsError, stat_or_usage_error

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up (mypy knows the name)
if TYPE_CHECKING:
    import argparse
    import asyncio
    import logging
    import types
    from typing import Any, Callable, Coroutine, Sequence, TextIO

    from vmcorefs.qemu.guest import Guest
    from vmcorefs.qemu.monitor import Monitor

READY_TIMEOUT = 120.0


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("vmcorefs")


class Interrupted(VmcorefsError):
    """SIGINT or SIGTERM stopped a command before it had handlers of its own;
    exit 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _SignalInterrupt(KeyboardInterrupt):
    """What :class:`_Signals` raises in synchronous code (a KeyboardInterrupt,
    so that code which handles Ctrl-C handles SIGTERM the same way)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StdoutError(VmcorefsError):
    """Standard output could not be written (``| head -1``, a full disk).
    A reader that went away (EPIPE) ends the command silently with 141, as
    SIGPIPE ends other Unix tools; any other error is one line, exit 1."""

    def __init__(self, error: OSError, fd: int | None) -> None:
        super().__init__(f"cannot write to standard output: {error.strerror or error}")
        self.broken_pipe = error.errno == errno.EPIPE
        self.exit_code = 128 + signal.SIGPIPE if self.broken_pipe else 1
        self.fd = fd

    def discard_output(self) -> None:
        """Point the file descriptor at /dev/null: what is still buffered is
        dropped at exit, not written again ("Exception ignored ...")."""
        if self.fd is None:
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.fd)
        finally:
            os.close(devnull)


class _Stdout:
    """``sys.stdout`` while :func:`main` runs: the stream itself, except that
    a write or flush that fails raises :class:`StdoutError` -- never an
    OSError that might be anyone's, nor one that argparse (``--help``)
    would swallow only for Python to report it again at exit."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def _error(self, error: OSError) -> StdoutError:
        try:
            fd: int | None = self.stream.fileno()
        except (OSError, ValueError):  # not a file (an in-memory stream), or closed
            fd = None
        return StdoutError(error, fd)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            raise self._error(e) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise self._error(e) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _flush_stdout() -> None:
    """Write out what the command printed, so that a failure is reported
    by :func:`_guarded`, not by Python at exit."""
    if sys.stdout is not None:
        sys.stdout.flush()


class _Signals:
    """SIGINT and SIGTERM of a command until it installs its own handlers
    (the mount's FUSE session, the dump's pause): the first one interrupts
    it -- :class:`_SignalInterrupt` in synchronous code (imports, argument
    parsing), a cancel of the task under :meth:`run` -- later ones are
    ignored, so that the clean-up and the error line are not cut short.
    A signal the command was started with ignored (SIGINT of a background
    job of a script, ``trap '' INT``) stays ignored, as Python leaves it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0
        self.done = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in self.SIGNALS:
            handler = signal.getsignal(signum)
            if handler != signal.SIG_IGN:
                self.previous[signum] = handler
                signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        """Back to the handlers from before :meth:`install` (the mount's own
        code takes over; a caller of :func:`main` in-process gets its own back)."""
        self.done = True
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if self.received or self.done:
            return
        self.received = signum
        raise _SignalInterrupt(signum)

    def run(self, make: Callable[[], Coroutine[Any, Any, int]]) -> int:
        """``asyncio.run(make())``, the signals cancelling its task (whose
        ``finally`` blocks close the monitor) and ending it in
        :class:`Interrupted`.  The command may install handlers of its own
        (the dump does, for its pause) and remove them."""
        import asyncio

        async def command() -> int:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()

            def on_signal(signum: int) -> None:
                if not self.received and not self.done and task is not None:
                    self.received = signum
                    task.cancel()

            caught = list(self.previous)
            for signum in caught:
                loop.add_signal_handler(signum, on_signal, signum)
            try:
                code = await make()
                self.done = True  # its work is done (a dump's OUTPUT in place): a later signal changes nothing
                return code
            except asyncio.CancelledError:
                if self.received:
                    raise Interrupted(self.received) from None
                raise
            finally:
                for signum in caught:
                    loop.remove_signal_handler(signum)
                    signal.signal(signum, self._on_signal)

        coro = command()
        try:
            return asyncio.run(coro)
        except asyncio.CancelledError:  # the cancel arrived as the command returned
            if self.received:
                raise Interrupted(self.received) from None
            raise
        finally:
            coro.close()  # never started (a signal in asyncio's set-up): no "never awaited" warning


def build_parser() -> argparse.ArgumentParser:
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # one line, exit 2
            raise UsageError(f"{message} (see '{self.prog} --help')")

    class _CommandParser(_Parser):
        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            # A command's unknown arguments are its own error (pointing to
            # 'vmcorefs dump --help'), not handed up to the top-level parser.
            parsed, extras = super().parse_known_args(args, namespace)
            if extras:
                self.error(f"unrecognized arguments: {' '.join(extras)}")
            return parsed, extras

    p = _Parser(prog="vmcorefs", description="A running QEMU guest as a live ELF core over FUSE.")
    p.add_argument("--version", action="version", version=f"vmcorefs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    m = sub.add_parser("mount", help="mount a guest's live core at MOUNTPOINT",
                       description="Mount MOUNTPOINT/vmcore (live ELF core), pmem and vmcoreinfo.")
    m.add_argument("qmp_socket", metavar="QMP_SOCKET", nargs="?",
                   help="QEMU's QMP unix socket (-qmp unix:PATH,server=on); not with --domain")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    _libvirt_options(m)
    m.add_argument("--all", action="store_true",
                   help="every running libvirt domain of --connect's URI as MOUNTPOINT/NAME/, following domains"
                        " as they start and stop")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--freeze", action="store_true",
                   help="pause the guest while vmcore, kcore or pmem is open (resumed at the last close)")
    m.add_argument("--direct", action="store_true",
                   help="no page cache: every read goes to guest memory (one FUSE request per read;"
                        " slow for tools that read a few bytes at a time)")
    m.add_argument("--max-age", type=_positive, metavar="SECONDS",
                   help="cached reads: drop cached guest memory older than this (default 1)")
    m.add_argument("--reads", choices=("auto", "native", "python"), default="auto",
                   help="who answers reads: the native read path (splices shared RAM, no Python per"
                        " request), Python, or auto (native when built, the default)")
    m.add_argument("--allow-other", action="store_true", help="let other users through the mount (files stay 0400)")
    m.add_argument("--mode", type=_file_mode, default=0o400, metavar="OCTAL",
                   help="permission bits of the files, read bits only (default 0400; with"
                        " --allow-other, e.g. 0440 lets the mounting user's group read)")
    m.add_argument("--memory", choices=("auto", "shared", "procmem"), default="auto",
                   help="how to read guest RAM: shared backing file, /proc/PID/mem, or auto (default)")
    m.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="how long a QMP command may take before the request fails (default 10)")
    m.add_argument("--debug", action="store_true",
                   help="log every request pyfuse3 serves (stderr with -f, else --log-file); reads answered by"
                        " the native path are counted in the root's user.vmcorefs.stats attribute instead")
    m.add_argument("--log-file", metavar="FILE", help="daemon log file (default: none)")

    i = sub.add_parser("info", help="show what a mount of this guest would expose")
    i.add_argument("qmp_socket", metavar="QMP_SOCKET", nargs="?")
    _libvirt_options(i)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--memory", choices=("auto", "shared", "procmem"), default="auto")
    i.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS")
    i.add_argument("--debug", action="store_true")

    from vmcorefs.dump import add_parser as add_dump_parser

    _libvirt_options(add_dump_parser(sub, seconds=_positive))  # --timeout checked as mount's and info's
    return p


def _libvirt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", metavar="NAME",
                   help="a running libvirt domain (name, UUID or id) instead of QMP_SOCKET: QMP through"
                        " libvirt's monitor passthrough (taints the domain 'custom-monitor')")
    p.add_argument("--connect", metavar="URI", help="libvirt URI for --domain (default qemu:///system)")


def _file_mode(text: str) -> int:
    import argparse

    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if mode & ~0o444 or not mode & 0o400:
        raise argparse.ArgumentTypeError(f"only read bits, including the owner's (e.g. 0400, 0440): {text!r}")
    return mode


def _positive(text: str) -> float:
    """Seconds: more than 0, at most an hour."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    if value > 3600:
        raise argparse.ArgumentTypeError(f"must be at most 3600 seconds: {text!r}")
    return value


def _setup_logging(debug: bool, log_file: str | None = None) -> None:
    import logging

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
    st = stat_or_usage_error(path, "mountpoint does not exist")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: mountpoint is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path}: already a mount point")
    return os.path.abspath(path)


def _import_pyfuse3() -> Any:
    """pyfuse3, switched to asyncio mode, without loading trio.

    pyfuse3 imports trio when it loads (~0.2 s, most of a mount's start-up)
    and only uses it through its module global ``trio``, which
    ``pyfuse3.asyncio.enable()`` replaces; a placeholder module stands in
    for the import.  Only the daemon does this.
    """
    import types

    if "trio" not in sys.modules:
        placeholder = types.ModuleType("trio", "placeholder: vmcorefs runs pyfuse3 in asyncio mode")
        sys.modules["trio"] = placeholder
    import pyfuse3
    import pyfuse3.asyncio

    pyfuse3.asyncio.enable()
    return pyfuse3


async def _serve(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    import asyncio

    from vmcorefs import readpath
    from vmcorefs.live import MAX_AGE, LiveCore
    from vmcorefs.watchdog import watch_freeze

    if args.direct and args.max_age is not None:
        raise UsageError("--max-age applies to cached reads, not --direct")
    if args.reads == "native" and not readpath.available():
        raise UsageError(f"--reads native: the native read path is not built ({readpath.IMPORT_ERROR})")
    mountpoint = _check_mountpoint(args.mountpoint)
    if args.all:
        return await _serve_all(args, mountpoint, ready)
    monitor, guest = await _open_guest(args)
    try:
        core = LiveCore(guest, mountpoint, freeze=args.freeze, cache=not args.direct,
                        max_age=args.max_age or MAX_AGE)
        # --freeze: a watchdog process resumes the guest if this daemon dies with it paused.
        watched = watch_freeze(core, monitor) if args.freeze else None
        try:
            core.set_initial(await guest.snapshot())
            session = _FuseSession(args, mountpoint, core, ready)

            def on_gone(gone: LiveCore) -> None:
                # Reads fail from now on: drop cached pages that would still answer,
                # let readers in flight get EIO (not ECONNABORTED) for a moment, unmount.
                session.guest_gone(gone, all_reads=True)
                asyncio.get_running_loop().call_later(GONE_GRACE, session.terminate)

            core.on_gone = on_gone
            pidfd = _watch_process(asyncio.get_running_loop(), monitor.pid, core)
            try:
                await session.run(monitor.pid, core.guest_gone)
            finally:
                if pidfd is not None:
                    asyncio.get_running_loop().remove_reader(pidfd)
                    os.close(pidfd)
                try:
                    await core.thaw()
                except VmcorefsError as e:
                    _log().warning("could not resume the guest: %s", e)
        finally:
            if watched is not None:
                watched.close()
        if core.gone_reason is not None:
            raise QEMUGoneError(f"QEMU exited while mounted; {mountpoint} unmounted")
        return 0
    finally:
        guest.close()
        await monitor.close()


async def _serve_all(args: argparse.Namespace, mountpoint: str, ready: Callable[[], None]) -> int:
    """``mount --all``: one directory per running libvirt domain, following
    libvirt's lifecycle events; no guest is touched until one of its files
    is used."""
    import asyncio

    from vmcorefs.live import MAX_AGE, LiveCore, LiveDirectory
    from vmcorefs.qemu.domains import DomainWatcher, FreezeWatchedGuest, LazyGuest
    from vmcorefs.qemu.libvirt import DEFAULT_URI

    uri = args.connect or DEFAULT_URI
    tree = LiveDirectory()
    guests: dict[str, LazyGuest | FreezeWatchedGuest] = {}
    loop = asyncio.get_running_loop()
    session: _FuseSession | None = None

    def started(name: str) -> None:
        if name in tree.cores:
            return
        lazy = LazyGuest(uri, name, args.memory, args.timeout)
        # --freeze: a domain's first pause starts its watchdog (resumes it if this daemon dies).
        guest = guests[name] = FreezeWatchedGuest(lazy) if args.freeze else lazy
        tree.add(LiveCore(guest, os.path.join(mountpoint, name), freeze=args.freeze, cache=not args.direct,
                          max_age=args.max_age or MAX_AGE, name=name))
        _log().info("domain %s: %s/%s", name, mountpoint, name)

    def stopped(name: str, reason: str) -> None:
        core = tree.remove(name, reason)
        guest = guests.pop(name, None)
        if core is not None and session is not None:
            session.guest_gone(core, all_reads=False)
        if guest is not None:
            loop.create_task(guest.close())
        _log().info("%s: %s/%s removed", reason, mountpoint, name)

    watcher = DomainWatcher(uri, loop, started, stopped)
    await loop.run_in_executor(None, watcher.start)
    try:
        # Several QEMU processes: the engine has none of its own (pid 0); each
        # open registers its snapshot's QEMU pid (process_vm_readv, pagemap).
        session = _FuseSession(args, mountpoint, tree, ready)
        await session.run(0, lambda reason: None)
        for core in list(tree.cores.values()):
            try:
                await core.thaw()
            except VmcorefsError as e:
                _log().warning("could not resume %s: %s", core.name, e)
        return 0
    finally:
        watcher.stop()
        for guest in guests.values():
            await guest.close()


class _FuseSession:
    """The FUSE side of a mount: pyfuse3 with the native read path attached."""

    def __init__(self, args: argparse.Namespace, mountpoint: str, root: Any, ready: Callable[[], None]) -> None:
        from vmcorefs import readpath

        self.pyfuse3 = _import_pyfuse3()  # first: fs imports pyfuse3, which would load trio
        from vmcorefs.fs import VmcoreFS

        self.readpath = readpath
        self.args, self.mountpoint, self.ready = args, mountpoint, ready
        self.fs = VmcoreFS(root, file_mode=args.mode)
        self.native: Any = None
        #: Between pyfuse3.init() and pyfuse3.close(): terminate() may call libfuse.
        self.session_open = False

    def guest_gone(self, core: Any, all_reads: bool) -> None:
        """``core``'s QEMU went away: its reads fail from now on (all of the
        native path's when it served only that guest), its cached pages go."""
        if self.native is not None:
            if all_reads:
                self.native.set_gone()
            else:  # served by Python from now on, which says EIO
                for fh, (handle, _inode) in self.fs.handles.items():
                    if handle.core is core:
                        self.native.unregister(fh)
        self.fs.drop_memory_caches(core)

    def terminate(self, tries: int = 3) -> None:
        """End pyfuse3's main loop.  pyfuse3 wakes each task waiting for
        /dev/fuse by setting an exception on its future; one the device had
        just woken already has a result (InvalidStateError, and the waiters
        after it are not woken): once that task has run, the rest again."""
        import asyncio

        if not self.session_open:
            return  # not mounted yet (run() ends it at once), or closed: libfuse has no session
        try:
            self.pyfuse3.terminate()
        except asyncio.InvalidStateError:
            if tries > 1:
                asyncio.get_running_loop().call_soon(self.terminate, tries - 1)

    async def run(self, pid: int | None, guest_gone: Callable[[str], None]) -> None:
        """Mount, serve until unmounted or terminated, unmount.  Raises
        :class:`MountError` when the mount cannot be made or libfuse refuses
        the kernel's FUSE_INIT."""
        import asyncio

        pyfuse3, readpath, args, mountpoint, fs = self.pyfuse3, self.readpath, self.args, self.mountpoint, self.fs
        options = {"fsname=vmcorefs", "subtype=vmcorefs", "ro", "default_permissions", "noatime"}
        if args.allow_other:
            options.add("allow_other")
        loop = asyncio.get_running_loop()
        # SIGINT/SIGTERM from here on end the session (a KeyboardInterrupt
        # raised inside pyfuse3's set-up made libfuse crash on the way out);
        # one that arrives before pyfuse3.main() ends it as soon as it starts.
        stop = False

        def on_stop() -> None:
            nonlocal stop
            stop = True
            self.terminate()

        loop.add_signal_handler(signal.SIGINT, on_stop)
        loop.add_signal_handler(signal.SIGTERM, on_stop)
        try:
            pyfuse3.init(fs, mountpoint, options)
        except RuntimeError as e:
            raise MountError(f"{mountpoint}: cannot mount ({e}; is /dev/fuse usable and fuse3 installed?)") from None
        self.session_open = True
        if not args.direct:
            # After FUSE_INIT, which sets the readahead to the kernel's default.
            fs.on_first_request = lambda: _tune_readahead(mountpoint)
        kernel_ended = init_refused = False
        if args.reads != "python" and readpath.available():

            def on_event(code: str) -> None:
                nonlocal kernel_ended, init_refused
                if code == "U":  # unmounted: what libfuse would see as ENODEV
                    kernel_ended = True
                    self.terminate()
                elif code == "G":
                    guest_gone("QEMU has exited")
                elif code == "R":  # libfuse accepted the kernel's FUSE_INIT: the mount answers
                    self.ready()
                elif code == "I":  # libfuse refused it and ends its session
                    init_refused = True
                    self.terminate()

            try:
                self.native = readpath.NativeReads.attach(pid, on_event)
            except BaseException:
                self.session_open = False
                pyfuse3.close(unmount=True)
                raise
            fs.native = self.native
            loop.add_reader(self.native.events, self.native.poll_events)
            _log().info("reads: native read path")
        else:
            _log().info("reads: Python (%s)", "--reads python" if args.reads == "python"
                        else f"native read path not built: {readpath.IMPORT_ERROR}")
        if stop:
            self.terminate()
        if self.native is None:
            self.ready()  # the native path says so once libfuse has accepted FUSE_INIT (R)
        try:
            await pyfuse3.main(min_tasks=2, max_tasks=16)
        finally:
            self.session_open = False
            pyfuse3.close(unmount=not kernel_ended)
            if self.native is not None:
                loop.remove_reader(self.native.events)
                self.native.stop()
        if init_refused:
            raise MountError(f"{mountpoint}: libfuse refused the kernel's FUSE_INIT (details with --debug);"
                             " unmounted")


#: Seconds requests fail with EIO after QEMU exits, before the unmount.
GONE_GRACE = 0.3
#: Readahead of a cached mount: FUSE's largest request (the default is 128 KiB).
READAHEAD_KB = 1024


def _hidden_files_warning(mountpoint: str) -> str | None:
    """The line to print once the mount is made when ``mountpoint`` is a
    directory with files in it: FUSE mounts over them (fusermount3 does;
    fuse 2 wanted ``-o nonempty``) and they are hidden until the unmount.
    Checked before mounting; None when it is empty, or cannot be listed, or
    is a mount point already (the mount says what is wrong)."""
    try:
        if os.path.ismount(mountpoint):
            return None
        with os.scandir(mountpoint) as entries:
            if next(entries, None) is None:
                return None
    except OSError:
        return None
    return f"vmcorefs: {mountpoint} is not empty: its files are hidden while mounted"


def _tune_readahead(mountpoint: str) -> None:
    """Raise the mount's readahead so that sequential cached reads arrive as
    1 MiB requests (~1.5-2x the throughput of 128 KiB ones).  Needs root;
    the mount works the same without it.  Called from the first request
    after FUSE_INIT (whose reply resets the readahead); the device number
    comes from /proc/self/mountinfo, not a stat() of our own mount."""
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [line.split()[2] for line in f if line.split()[4] == mountpoint]
        if not devs:
            return
        path = f"/sys/class/bdi/{devs[-1]}/read_ahead_kb"
        with open(path, "r+") as f:
            if int(f.read() or 0) < READAHEAD_KB:
                f.seek(0)
                f.write(str(READAHEAD_KB))
    except (OSError, ValueError) as e:
        _log().info("readahead left at the default: %s", e)


def _watch_process(loop: asyncio.AbstractEventLoop, pid: int | None, core: Any) -> int | None:
    """Call ``core.guest_gone`` as soon as the QEMU process exits (pidfd)."""
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    loop.add_reader(pidfd, core.guest_gone, f"QEMU (pid {pid}) exited")
    return pidfd


def _check_guest_args(args: argparse.Namespace) -> None:
    """Exactly one guest: QMP_SOCKET, or ``--domain`` (with ``--connect``);
    or, for ``mount --all``, every domain of ``--connect``'s URI."""
    if getattr(args, "all", False):
        if args.domain is not None or args.qmp_socket is not None:
            raise UsageError("--all mounts every libvirt domain: give no QMP_SOCKET or --domain with it")
        return
    if args.domain is None and args.connect is not None:
        raise UsageError("--connect needs --domain")
    if args.domain is None and args.qmp_socket is None:
        raise UsageError(f"give QMP_SOCKET or --domain NAME (see 'vmcorefs {args.command} --help')")
    if args.domain is not None and args.qmp_socket is not None:
        raise UsageError("give either QMP_SOCKET or --domain, not both")


async def _open_guest(args: argparse.Namespace) -> tuple[Monitor, Guest]:
    """The monitor and guest that ``args`` name: a QMP socket, or a libvirt
    domain (``--domain``, ``--connect``)."""
    if args.domain is None:
        from vmcorefs.qemu.guest import Guest as QMPGuest
        from vmcorefs.qemu.monitor import GREETING_TIMEOUT, connect

        # --timeout bounds the wait for QEMU's greeting too (5 s at most: a greeting is no command).
        monitor = await connect(args.qmp_socket, greeting_timeout=min(GREETING_TIMEOUT, args.timeout),
                                timeout=args.timeout)
        return monitor, QMPGuest(monitor, args.memory)
    from vmcorefs.qemu import libvirt

    lv_monitor = await libvirt.connect(args.connect or libvirt.DEFAULT_URI, args.domain, timeout=args.timeout)
    try:
        return lv_monitor, libvirt.LibvirtGuest(lv_monitor, args.memory)
    except BaseException:
        await lv_monitor.close()
        raise


async def _info(args: argparse.Namespace) -> int:
    import json

    monitor, guest = await _open_guest(args)
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
        f"QMP socket   {info['qmp_socket']} (QEMU {info['qemu_version']}, pid {info['qemu_pid']})"
        if "libvirt" not in info else
        f"libvirt      {info['libvirt']['uri']} domain {info['libvirt']['domain']} {info['libvirt']['uuid']}"
        f" (QEMU {info['qemu_version']}, pid {info['qemu_pid']})",
        f"guest        {info['arch']}, {info['status']}, {info['vcpus']} vCPU(s)",
        f"memory       {len(info['memory'])} block(s), {_mib(sum(m['size'] for m in info['memory']))}:",
    ]
    for m in info["memory"]:
        lines.append(f"  {m['gpa_start']:#018x}-{m['gpa_end'] - 1:#018x}  {_mib(m['size']):>10}  "
                     f"{m['kind']:<3}  {m['name']:<12} {m['access']:<7} {m['backing']}")
    lines.append(f"vmcore       {info['vmcore_size']} bytes; pmem {info['pmem_size']} bytes")
    v = info["vmcoreinfo"]
    origin = info.get("vmcoreinfo_origin", "device")
    lines.append(f"VMCOREINFO   {origin}" if v is None else
                 f"VMCOREINFO   OSRELEASE={v['OSRELEASE']} KERNELOFFSET={v['KERNELOFFSET']} PAGESIZE={v['PAGESIZE']}"
                 f" (from {origin})")
    if info.get("gdb"):
        lines.append(f"gdb          {info['gdb']}")
    return "\n".join(lines)


def _daemonize(args: argparse.Namespace, warning: str | None = None) -> int:
    """Fork the serving daemon and wait until it reports ready or fails;
    print ``warning`` once the mount is ready.
    Ctrl-C meanwhile reaches only this process (the daemon has its own
    session): the daemon is let finish starting, then stopped (exit 130).
    Raises :class:`UsageError` when ``--log-file`` cannot be opened."""
    try:
        out = os.open(args.log_file or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise UsageError(f"--log-file {args.log_file}: {e.strerror}") from None
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    # Until the daemon has its own session, a Ctrl-C on the terminal would reach it too.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        code = 1
        try:
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # one pending from before setsid is dropped
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            os.close(devnull)
            code = _guarded(lambda: _run_foreground(args, w), args.debug)
        finally:
            import logging

            logging.shutdown()
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(w)
    os.close(out)
    chunks: list[bytes] = []
    interrupted = False
    try:
        while True:
            try:
                chunk = os.read(r, 4096)
            except KeyboardInterrupt:
                interrupted = True  # the daemon did not see it: wait for its word, then stop it
                continue
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    message = b"".join(chunks).decode(errors="replace").strip()
    if message == "OK":
        if not interrupted:
            if warning is not None:
                print(warning, file=sys.stderr)
            return 0
        os.kill(pid, signal.SIGTERM)  # the daemon unmounts and exits
        _reap(pid, READY_TIMEOUT)
        print("vmcorefs: interrupted; unmounted", file=sys.stderr)
        return 130
    if message.startswith("ERR "):
        status_text, _, text = message[4:].partition(" ")
        print(f"vmcorefs: {text}", file=sys.stderr)
        _reap(pid, READY_TIMEOUT)
        return int(status_text) if status_text.isdigit() else 1
    status = _reap(pid, None)
    print(f"vmcorefs: the daemon exited (status {status}) before the mount was ready", file=sys.stderr)
    return 1


def _reap(pid: int, timeout: float | None) -> int | None:
    """Wait for the daemon (up to ``timeout`` seconds); its exit status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if deadline is not None and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = None
        time.sleep(0.01)


def _event_loop_run(coro: Coroutine[Any, Any, int]) -> int:
    """Run the daemon on uvloop when available (cheaper per FUSE request)."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _run_foreground(args: argparse.Namespace, ready_fd: int | None, warning: str | None = None) -> int:
    """Serve the mount in this process; tell ``ready_fd`` (the waiting
    command of :func:`_daemonize`) or print ``warning`` once it is ready."""
    _setup_logging(args.debug, args.log_file if ready_fd is None else None)

    def ready() -> None:
        nonlocal ready_fd, warning
        if ready_fd is not None:
            os.write(ready_fd, b"OK")
            os.close(ready_fd)
            ready_fd = None
        if warning is not None:
            print(warning, file=sys.stderr)
            warning = None

    try:
        return _event_loop_run(_serve(args, ready))
    except BaseException as e:
        # The waiting parent prints this line: any failure before "ready",
        # not only ours (a bug would otherwise show as a bare exit status).
        if ready_fd is not None:
            code, text = ((e.exit_code, str(e)) if isinstance(e, VmcorefsError)
                          else (1, f"internal error: {type(e).__name__}: {e} (run with --debug -f for details)"))
            os.write(ready_fd, f"ERR {code} {text}".encode()[:4000])
            os.close(ready_fd)
            ready_fd = None
        raise


def _guarded(run: Callable[[], int], debug: bool) -> int:
    """Run a command; errors become one line on stderr and an exit code."""
    try:
        return run()
    except StdoutError as e:  # whichever command wrote, whenever
        e.discard_output()
        if not e.broken_pipe:
            print(f"vmcorefs: {e}", file=sys.stderr)
        return e.exit_code
    except VmcorefsError as e:
        print(f"vmcorefs: {e}", file=sys.stderr)
        if debug:
            _log().debug("detail", exc_info=True)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM too, before the command's own handlers
        signum = e.signum if isinstance(e, _SignalInterrupt) else signal.SIGINT
        print(f"vmcorefs: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # a bug: one line, detail with --debug
        print(f"vmcorefs: internal error: {type(e).__name__}: {e}"
              + ("" if debug else " (run with --debug for details)"), file=sys.stderr)
        if debug:
            import traceback

            traceback.print_exc()
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    signals = _Signals()

    def run() -> int:
        code = command()
        _flush_stdout()
        return code

    def command() -> int:
        signals.install()  # before the imports: asyncio alone takes ~50 ms
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help, --version
            _flush_stdout()
            raise
        _check_guest_args(args)
        if args.command == "mount":
            signals.restore()  # the mount has its own (the daemon's session, the FUSE session's)
            warning = _hidden_files_warning(args.mountpoint)  # before the mount hides them
            return _run_foreground(args, None, warning) if args.foreground else _daemonize(args, warning)
        _setup_logging(args.debug)
        if args.command == "dump":
            from vmcorefs.dump import dump_command

            return signals.run(lambda: dump_command(args, _open_guest))
        return signals.run(lambda: _info(args))

    stdout = sys.stdout
    if stdout is not None:
        sys.stdout = _Stdout(stdout)
    try:
        return _guarded(run, debug)
    finally:
        signals.restore()
        if stdout is not None:
            sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
