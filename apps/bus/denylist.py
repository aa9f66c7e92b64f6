"""The denylist for gates: one stream from the core, fanned out to every subscribed gate.

The transit application follows ``Cards.StreamDenylist`` once and keeps the whole list and the deltas it has
seen, by version. A gate subscribes to ``Transit.StreamDenylist`` here, so a thousand gates cost the core one
stream. A gate that reconnects with a version the relay has history for gets exactly the changes since it
from memory; an older version (from before this process started) is answered by asking the core once for the
exact delta since it. After that first message every gate gets each change as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
from citycard.apps.bus.ids import app_serial_of_card

from citycard.v1 import cards_pb2, cards_pb2_grpc, transit_pb2

__all__ = ["Delta", "DenylistRelay"]

RECONNECT_S = 1.0
HISTORY_MAX = 10_000  # deltas kept in memory; older versions are asked of the core
log = logging.getLogger("citycard.apps.bus")


@dataclass(frozen=True)
class Delta:
    since: int
    version: int
    added: dict[str, str]  # card number -> application serial
    removed: frozenset[str]


@dataclass
class _History:
    base_version: int = -1  # the version the relay's first (whole-list) answer had
    deltas: list[Delta] = field(default_factory=list)


class DenylistRelay:
    def __init__(self, channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]]) -> None:
        self._cards = cards_pb2_grpc.CardsStub(channel)
        self._metadata = tuple(metadata)
        self.entries: dict[str, str] = {}  # the current list: card number -> application serial
        self.version = 0
        self._history = _History()
        self._subscribers: set[asyncio.Queue[Delta]] = set()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def is_denied(self, card_number: str) -> bool:
        return card_number in self.entries

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="denylist-follow")

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _follow(self) -> None:
        while True:
            try:
                stream = self._cards.StreamDenylist(
                    cards_pb2.StreamDenylistRequest(since_version=self.version, follow=True), metadata=self._metadata)
                async for message in stream:
                    self._apply(_delta(message))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return
                log.warning("the core's denylist stream ended (%s); reconnecting", exc.code().name)
            await asyncio.sleep(RECONNECT_S)

    def _apply(self, delta: Delta) -> None:
        if delta.version == self.version and not delta.added and not delta.removed and self._ready.is_set():
            return
        self.entries.update(delta.added)
        for card in delta.removed:
            self.entries.pop(card, None)
        if self._history.base_version < 0:
            self._history.base_version = delta.version
        else:
            self._history.deltas.append(delta)
            del self._history.deltas[:-HISTORY_MAX]
        self.version = delta.version
        self._ready.set()
        if delta.added or delta.removed:
            log.info("denylist version %d: %d card(s) refused", self.version, len(self.entries))
        for queue in self._subscribers:
            queue.put_nowait(delta)

    async def delta_since(self, since: int) -> Delta:
        """Exactly the changes after version ``since`` (0: the whole list), up to the relay's version."""
        if since == 0:
            return Delta(0, self.version, dict(self.entries), frozenset())
        history = self._history
        oldest = history.deltas[0].since if history.deltas else self.version
        if history.base_version >= 0 and since >= oldest:
            return _merge(since, self.version, [d for d in history.deltas if d.version > since])
        # Older than what this process has seen: the core knows exactly.
        stream = self._cards.StreamDenylist(cards_pb2.StreamDenylistRequest(since_version=since, follow=False),
                                            metadata=self._metadata)
        async for message in stream:
            older = _delta(message)
            later = [d for d in history.deltas if d.version > older.version]
            return _merge(since, max(self.version, older.version), [older, *later])
        raise RuntimeError("the core answered no denylist delta")

    async def subscribe(self, since: int, follow: bool) -> AsyncIterator[Delta]:
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._subscribers.add(queue)  # before the first answer: no change can fall between the two
        try:
            first = await self.delta_since(since)
            yield first
            version = first.version
            while follow:
                delta = await queue.get()
                if delta.version <= version:
                    continue
                version = delta.version
                yield delta
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


def _delta(message: cards_pb2.StreamDenylistResponse) -> Delta:
    return Delta(message.since_version, message.version,
                 {entry.card_number: app_serial_of_card(entry.card_id_code) for entry in message.added},
                 frozenset(message.removed))


def _merge(since: int, version: int, deltas: list[Delta]) -> Delta:
    added: dict[str, str] = {}
    removed: set[str] = set()
    for delta in deltas:
        for card, serial in delta.added.items():
            added[card] = serial
            removed.discard(card)
        for card in delta.removed:
            added.pop(card, None)
            removed.add(card)
    return Delta(since, version, added, frozenset(removed))


def delta_message(delta: Delta, sent_at_ns: int) -> transit_pb2.StreamGateDenylistResponse:
    message = transit_pb2.StreamGateDenylistResponse(
        since_version=delta.since, version=delta.version, removed=sorted(delta.removed),
        added=[transit_pb2.GateDenylistEntry(card_number=card, app_serial=serial)
               for card, serial in sorted(delta.added.items())])
    message.sent_at.FromNanoseconds(sent_at_ns)
    return message
