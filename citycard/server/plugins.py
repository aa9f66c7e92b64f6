"""The built-in applications, run by ``citycard serve`` as processes of their own (apps/plugin.py).

Before starting one, the server registers its manifest (first start) or rotates its credential (later
starts: the old token is gone with the old process), and hands the token over in the child's
environment, never on its command line. A child that dies is restarted with back-off, a few times; on
shutdown each gets SIGTERM, then SIGKILL if it does not stop in time.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

from citycard.apps.plugin import ENV_SERVER, ENV_TOKEN, Plugin
from citycard.core.registry import Registry
from citycard.server import applications
from citycard.server.auth import OPERATOR, AppRecord, Principal
from citycard.server.common import Services

__all__ = ["BUILTIN_PLUGINS", "PluginSupervisor"]

BUILTIN_PLUGINS = ("medical", "transit")
# A built-in application's module under apps/ when it is not named like the application (DESIGN.md keeps
# transit in apps/bus/).
PLUGIN_MODULES = {"transit": "bus"}
RESTARTS_MAX = 5
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 5.0
log = logging.getLogger("citycard.server.plugins")
_SERVER = Principal(OPERATOR, "citycard-serve")


def plugin_module(name: str) -> str:
    """The module that runs the built-in application ``name`` (``python -m`` starts it)."""
    return f"citycard.apps.{PLUGIN_MODULES.get(name, name)}"


def load_plugin(name: str) -> Plugin:
    module = importlib.import_module(plugin_module(name))
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Plugin) and value is not Plugin \
                and getattr(value, "name", None) == name:
            return value()
    raise LookupError(f"{plugin_module(name)} defines no Plugin named {name!r}")


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    task: asyncio.Task[None] | None = None
    stopping: bool = field(default=False)


class PluginSupervisor:
    def __init__(self, services: Services, address: str, names: tuple[str, ...] = BUILTIN_PLUGINS) -> None:
        self.services = services
        self.address = address
        self.names = names
        self._children: dict[str, _Child] = {}

    async def start(self) -> None:
        for name in self.names:
            plugin = load_plugin(name)
            token = await self._enrol(plugin)
            child = _Child(name)
            self._children[name] = child
            env = {**os.environ, ENV_SERVER: self.address, ENV_TOKEN: token}
            await self._spawn(child, env)
            child.task = asyncio.ensure_future(self._keep_running(child, env))

    async def _enrol(self, plugin: Plugin) -> str:
        manifest = plugin.manifest()
        tls = self.services.auth.tls

        def enrol(registry: Registry) -> tuple[str, list[AppRecord]]:
            if self.services.auth.app(plugin.name) is None:
                _, token = applications.register(registry, manifest, _SERVER, tls=tls)
            else:
                _, added = applications.add_new_accounts(registry, plugin.name, manifest, _SERVER)
                if added:
                    log.info("plugin accounts opened", extra={"plugin": plugin.name, "accounts": added})
                _, token = applications.rotate_credential(registry, plugin.name, _SERVER)
            return token or "", applications.load_applications(registry)

        token, apps = await self.services.writer.call(enrol)
        self.services.auth.publish(apps)
        return token

    @staticmethod
    async def _spawn(child: _Child, env: dict[str, str]) -> None:
        child.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", plugin_module(child.name), env=env, stdin=asyncio.subprocess.DEVNULL)
        log.info("plugin started", extra={"plugin": child.name, "pid": child.process.pid})

    async def _keep_running(self, child: _Child, env: dict[str, str]) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if child.stopping:
                break
            child.restarts += 1
            log.warning("plugin exited", extra={"plugin": child.name, "exit_code": code, "restarts": child.restarts})
            if child.restarts > RESTARTS_MAX:
                log.error("plugin keeps failing; not restarting it", extra={"plugin": child.name})
                return
            await asyncio.sleep(RESTART_DELAY_S * child.restarts)
            if child.stopping:
                break
            await self._spawn(child, env)

    def pids(self) -> dict[str, int]:
        return {name: child.process.pid for name, child in self._children.items()
                if child.process is not None and child.process.returncode is None}

    async def stop(self) -> None:
        for child in self._children.values():
            child.stopping = True
            if child.process is not None and child.process.returncode is None:
                child.process.terminate()
        for child in self._children.values():
            if child.process is None:
                continue
            try:
                await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("plugin did not stop; killing it", extra={"plugin": child.name})
                child.process.kill()
                await child.process.wait()
            if child.task is not None:
                child.task.cancel()  # it may be waiting out a restart back-off
                await asyncio.gather(child.task, return_exceptions=True)
            log.info("plugin stopped", extra={"plugin": child.name, "exit_code": child.process.returncode})
