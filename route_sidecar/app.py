"""The composition root: builds config, store, core service, Matrix side and both
listeners, starts them in order and stops them in reverse. Nothing else opens the
database or reads the config file."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .api import LookupApi
from .appservice import AppserviceShell
from .config import Config, ConfigError, is_loopback
from .crypto_db import PICKLE_KEY_META, crypto_store_path, keep_pickle_key, move_store_to_its_file
from .matrix import MatrixBot, run_outbox
from .metrics import Metrics
from .service import RouteService, new_salt
from .store import Store

log = logging.getLogger("route_sidecar")
SWEEP_SECONDS = 1.0
FORGET_SECONDS = 600.0


@dataclass
class Sidecar:
    config: Config
    store: Store
    service: RouteService
    bot: MatrixBot
    crypto: Any = None  # route_sidecar.crypto.BotCrypto when encryption is on
    runners: list[web.BaseRunner] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def stop(self) -> None:
        self.stopping.set()
        for runner in reversed(self.runners):
            await runner.cleanup()
        with contextlib.suppress(Exception):
            await self.service.flush()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.bot.close()
        if self.crypto is not None:
            with contextlib.suppress(Exception):
                await self.crypto.close()
        await self.store.close()
        log.info("stopped")


async def start_sidecar(config: Config) -> Sidecar:
    if not is_loopback(config.api.listen.host):
        log.warning(
            "lookup API listens on a public address host=%s: keep its tokens secret",
            config.api.listen.host,
        )
    store = await Store.open(config.database_path)
    async with store.atomic() as tx:
        salt = await tx.meta("salt")
        if salt is None:
            salt = new_salt()
            await tx.set_meta("salt", salt)
        instance = await tx.meta("instance")
        if instance is None:
            instance = new_salt()[:12]
            await tx.set_meta("instance", instance)
    try:
        pickle_key = await _pickle_key(config, store)
    except BaseException:
        await store.close()
        raise
    metrics = Metrics()
    service = RouteService(config, store, bytes.fromhex(salt), metrics)
    await service.load()
    crypto = None
    if config.encryption.enabled:
        from .crypto import BotCrypto  # python-olm: only when encryption is on

        assert pickle_key is not None  # kept (or made) whenever encryption is on
        crypto = BotCrypto(config, crypto_store_path(config.database_path), pickle_key)
    bot = MatrixBot(
        config,
        store,
        metrics,
        instance,
        queued=service.outbox,
        clock=service.clock,
        crypto=crypto,
    )
    await bot.start()
    service.room_powers = bot.power_levels
    sidecar = Sidecar(config, store, service, bot, crypto)
    appservice = AppserviceShell(config, service, bot, metrics, crypto)
    for runner, listen in (
        (LookupApi(config, service, metrics).make_runner(), config.api.listen),
        (appservice.make_runner(), config.appservice.listen),
    ):
        await runner.setup()
        sidecar.runners.append(runner)
        try:
            await web.TCPSite(runner, listen.host, listen.port).start()
        except OSError as error:
            await sidecar.stop()
            where = f"{listen.host}:{listen.port}"
            raise ConfigError("", f"cannot listen on {where}: {error.strerror or error}") from None
        log.info("listening host=%s port=%d", listen.host, listen.port)
    stop = sidecar.stopping
    sidecar.tasks += [
        asyncio.create_task(_register(bot, service, crypto, appservice, stop)),
        asyncio.create_task(run_outbox(bot, service.outbox.changed, stop)),
        asyncio.create_task(_every(SWEEP_SECONDS, service.sweep, stop)),
        asyncio.create_task(_every(FORGET_SECONDS, service.forget_old_records, stop)),
    ]
    # What start-up made lives as long as the process: moved out of the collector's view,
    # so collections while serving scan only what requests make (docs/performance.md).
    gc.collect()
    gc.freeze()
    log.info("started bot=%s live_intents=%d", config.bot_user_id, len(service.live))
    return sidecar


async def _pickle_key(config: Config, store: Store) -> str | None:
    """The crypto store's pickle key, from its own file (route_sidecar/crypto_db.keep_pickle_key).
    One that earlier versions kept in the database is moved out of it, and its bytes with
    it; the encryption store they kept in the database, or left at a misplaced path, is
    moved to its own file first."""
    async with store.atomic() as tx:
        in_meta = await tx.meta(PICKLE_KEY_META)
    path = config.database_path
    if config.encryption.enabled:
        await asyncio.to_thread(
            move_store_to_its_file,
            crypto_store_path(path),
            path,
            config.misplaced_crypto_stores,
        )
    key = await asyncio.to_thread(keep_pickle_key, path, in_meta, config.encryption.enabled)
    if in_meta is not None and not await store.forget_meta(PICKLE_KEY_META):
        log.warning("the database's write-ahead log is in use: the old key leaves it later")
    return key


async def _register(
    bot: MatrixBot,
    service: RouteService,
    crypto: Any,
    appservice: AppserviceShell,
    stop: asyncio.Event,
) -> None:
    """Register the bot user and learn its rooms, then set up its device when encryption
    is on (both retried while the homeserver is unreachable)."""
    await bot.ensure_registered(stop)
    await bot.leave_rooms_not_allowed()
    listed_at = service.clock()
    rooms = await bot.joined_rooms()
    if rooms is not None:
        await service.on_joined_rooms(rooms, listed_at)
        await bot.descriptions.publish_all(rooms)  # made current: the targets may have changed
    delay = 1.0
    while crypto is not None and not stop.is_set():
        try:
            await crypto.start()
            await appservice.resume_undecrypted()
            return
        except Exception as error:  # any failure: retry later
            log.warning(
                "encryption setup failed, retrying in %.0fs error=%s", delay, type(error).__name__
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 60)


async def _every(seconds: float, job, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        if stop.is_set():
            return
        try:
            await job()
        except Exception:
            log.exception("periodic job failed job=%s", getattr(job, "__name__", job))


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (a dependency on Linux and macOS), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def run(config: Config) -> None:
    sidecar = await start_sidecar(config)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    log.info("stopping")
    await sidecar.stop()
