"""A receiver's control connections to its senders: one channel per sender's control address,
opened on first use, each sender's liveness judged by what arrives on it, and closed once no live
room has needed it for the heartbeat timeout (with the data plane's connection to that sender).

Senders come and go (each restart is a new address), and a receiver that kept every channel it
ever opened would poll them all for good; closing at once instead would make the next room with
an idle sender pay the connection again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import zmq

from transfer.channel import Channel, connecting_socket
from transfer.config import TransferConfig
from transfer.data_plane import DataPlane
from transfer.liveness import Liveness
from transfer.messages import Codec, Error, ProtocolError, ToReceiver


class SenderLinks:
    def __init__(self, config: TransferConfig, poller: zmq.Poller, data_plane: DataPlane) -> None:
        self._config = config
        self._poller = poller
        self._data_plane = data_plane
        self._channels: dict[str, Channel[ToReceiver]] = {}
        self._data_addresses: dict[str, str] = {}
        """Each control address's data plane address, to drop both when the sender is no longer needed."""
        self._idle_since: dict[str, float] = {}
        self._liveness = Liveness(config.heartbeat_timeout_s)

    def to(self, address: str, data_address: str | None = None) -> Channel[ToReceiver]:
        """The channel to the sender listening at ``address`` (opened now if there is none);
        ``data_address``: its data plane's, dropped with the channel."""
        channel = self._channels.get(address)
        if channel is None:
            socket = connecting_socket(zmq.DEALER, self._config.max_message_bytes, self._config.control_keys)
            try:
                socket.connect(address)
            except zmq.ZMQError:
                socket.close(linger=0)
                raise
            channel = self._channels[address] = Channel(socket, Codec(ToReceiver, self._config.max_message_bytes))
            self._poller.register(socket, zmq.POLLIN)
        if data_address is not None:
            self._data_addresses[address] = data_address
        return channel

    def receive(self, now: float) -> Iterator[tuple[str, Channel[ToReceiver], ToReceiver | ProtocolError]]:
        """Every message waiting on every channel, with the address it came from."""
        for address, channel in list(self._channels.items()):
            for _, message in channel.receive():
                if not isinstance(message, (ProtocolError, Error)):
                    # Only a readable message of the protocol proves the sender is there and knows
                    # us: not junk (from whoever took its port, when there are no keys), nor its Error
                    # to a heartbeat of a connection it does not know (ours, reconnected under a new
                    # identity).
                    self._liveness.heard(address, now)
                yield address, channel, message

    def dead(self, needed: Iterable[str], now: float) -> list[str]:
        """Those of the ``needed`` senders heard from in no heartbeat timeout."""
        return list(self._liveness.dead(needed, now))

    def close_idle(self, needed: set[str], live_data: set[str], now: float) -> None:
        """Closes the channel of each sender no live room (``needed``) has needed for the heartbeat
        timeout, and the data plane's connection to it unless a live room's sender shares it
        (``live_data``). Dropping that connection also lets go of pulls from that peer that rooms
        gave up on and that are still pending: nobody takes their rows."""
        for address in list(self._channels):
            if address in needed:
                self._idle_since.pop(address, None)
                continue
            if now - self._idle_since.setdefault(address, now) <= self._config.heartbeat_timeout_s:
                continue
            data_address = self._data_addresses.pop(address, None)
            if data_address is not None and data_address not in live_data:
                self._data_plane.forget_peer(data_address)
            del self._idle_since[address]
            channel = self._channels.pop(address)
            self._poller.unregister(channel.socket)
            channel.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
