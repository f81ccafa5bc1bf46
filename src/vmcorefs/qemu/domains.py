"""All running domains of a libvirt connection, as they start and stop.

:class:`DomainWatcher` lists the running domains once and then follows
libvirt's lifecycle events (``virConnectDomainEventRegisterAny`` with
``VIR_DOMAIN_EVENT_ID_LIFECYCLE``), not polling: libvirt's default event
loop runs in a thread of its own and hands each start and stop to the
asyncio loop.  :class:`LazyGuest` is a domain's guest that talks to it only
when first used, so that listing 50 domains touches none of them;
:class:`FreezeWatchedGuest` adds the ``--freeze`` watchdog of a domain
when it is first paused.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

from vmcorefs.errors import LibvirtError
from vmcorefs.qemu.guest import Snapshot
from vmcorefs.qemu.libvirt import LibvirtGuest, _import_libvirt, _message, connect

log = logging.getLogger(__name__)

# virDomainEventType
VIR_DOMAIN_EVENT_STARTED, VIR_DOMAIN_EVENT_STOPPED = 2, 5
#: Seconds between wake-ups of the event thread (to notice it should stop).
EVENT_TICK = 0.5


class LazyGuest:
    """The guest of libvirt domain ``name``, connected on first use.

    Has the :class:`~vmcorefs.live.GuestControl` methods; each raises what
    :func:`vmcorefs.qemu.libvirt.connect` and :class:`LibvirtGuest` raise.
    """

    def __init__(self, uri: str, name: str, memory_mode: str = "auto", timeout: float = 10.0) -> None:
        self.uri, self.name, self.memory_mode, self.timeout = uri, name, memory_mode, timeout
        self.guest: LibvirtGuest | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> LibvirtGuest:
        """The connected guest (connects the first time: one lookup, one ``query-cpus-fast``)."""
        async with self._lock:
            if self.guest is None:
                monitor = await connect(self.uri, self.name, timeout=self.timeout)
                self.guest = LibvirtGuest(monitor, self.memory_mode)
            return self.guest

    async def snapshot(self) -> Snapshot:
        return await (await self.get()).snapshot()

    async def status(self) -> str:
        return await (await self.get()).status()

    async def pause(self) -> None:
        await (await self.get()).pause()

    async def resume(self) -> None:
        await (await self.get()).resume()

    async def close(self) -> None:
        """Close the guest's descriptors and libvirt connection, if it was used."""
        if self.guest is not None:
            self.guest.close()
            await self.guest.monitor.close()
            self.guest = None


class FreezeWatchedGuest:
    """A :class:`LazyGuest` under ``mount --all --freeze``: the first
    :meth:`pause` starts the domain's own ``--freeze`` watchdog
    (:mod:`vmcorefs.watchdog`), which resumes the domain through libvirt if
    the daemon dies while holding it paused; domains never paused get none.
    Without a watchdog (it cannot be spawned) the pause goes on, logged."""

    def __init__(self, lazy: LazyGuest) -> None:
        self.lazy = lazy
        self.watched: Any = None  # vmcorefs.watchdog.WatchedGuest, once paused

    async def snapshot(self) -> Snapshot:
        return await self.lazy.snapshot()

    async def status(self) -> str:
        return await self.lazy.status()

    async def pause(self) -> None:
        if self.watched is None:
            from vmcorefs.watchdog import WatchedGuest, action_for, start

            guest = await self.lazy.get()
            action = action_for(guest.monitor)
            try:
                if action is None:
                    raise OSError("no resume action for this kind of guest")
                self.watched = WatchedGuest(guest, start(action))
            except OSError as e:
                log.warning("--freeze: no watchdog for domain %s (%s); it stays paused if vmcorefs is killed",
                            self.lazy.name, e)
                await self.lazy.pause()
                return
        await self.watched.pause()

    async def resume(self) -> None:
        if self.watched is not None:
            await self.watched.resume()
        else:
            await self.lazy.resume()

    async def close(self) -> None:
        """Let the watchdog go (after the last resume: a pause still ours is
        then its to undo), then close the guest."""
        if self.watched is not None:
            self.watched.close()
            self.watched = None
        await self.lazy.close()


class DomainWatcher:
    """Calls ``on_start(name)`` for every running domain of ``uri`` (now and
    when one starts) and ``on_stop(name, reason)`` when one stops, on
    ``loop``.  :meth:`start` raises :class:`LibvirtError` when libvirtd
    cannot be reached or the binding is missing."""

    def __init__(self, uri: str, loop: asyncio.AbstractEventLoop, on_start: Callable[[str], None],
                 on_stop: Callable[[str, str], None]) -> None:
        self.uri, self.loop, self.on_start, self.on_stop = uri, loop, on_start, on_stop
        self._libvirt, _ = _import_libvirt()
        self._conn: Any = None
        self._callback: int | None = None
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> list[str]:
        """Register for lifecycle events, then list the running domains
        (each also reported to ``on_start``); returns their names."""
        lv = self._libvirt
        lv.virEventRegisterDefaultImpl()  # before the connection whose events we want
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            self._conn = lv.open(self.uri)
        except lv.libvirtError as e:
            raise LibvirtError(f"cannot connect to {self.uri}: {_message(e)} (is libvirtd running?)", "open") from None
        self._running = True
        lv.virEventAddTimeout(int(EVENT_TICK * 1000), lambda _timer, _opaque: None, None)
        self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
        self._thread.start()
        self._callback = self._conn.domainEventRegisterAny(
            None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)
        names = sorted(str(d.name()) for d in self._conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
        for name in names:
            self.on_start(name)
        return names

    def _run(self) -> None:
        while self._running:
            if self._libvirt.virEventRunDefaultImpl() < 0:
                log.warning("libvirt event loop failed; domains that start or stop are not seen")
                return

    def _event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        name = str(dom.name())
        if event == VIR_DOMAIN_EVENT_STARTED:
            self.loop.call_soon_threadsafe(self.on_start, name)
        elif event == VIR_DOMAIN_EVENT_STOPPED:
            self.loop.call_soon_threadsafe(self.on_stop, name, f"domain {name} stopped")

    def stop(self) -> None:
        """Stop following events and close the connection."""
        self._running = False
        if self._conn is not None:
            try:
                if self._callback is not None:
                    self._conn.domainEventDeregisterAny(self._callback)
                self._conn.close()
            except self._libvirt.libvirtError as e:
                log.info("libvirt: %s", _message(e))
            self._conn = None
        if self._thread is not None:
            self._thread.join(timeout=2 * EVENT_TICK + 1)
            self._thread = None
