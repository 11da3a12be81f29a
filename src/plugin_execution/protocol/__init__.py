"""The host <-> worker protocol, sans-I/O: typed messages in, bytes out, and back.

Like h11 and wsproto, nothing here touches a socket, a clock or a thread. A
:class:`Connection` turns messages into bytes (:meth:`Connection.send`) and bytes into
messages (:meth:`Connection.receive_data`, :meth:`Connection.next_message`); the host's
I/O loop around it is a few lines.

A frame is a 4-byte big-endian payload length, then a msgpack map
``{"t": <tag>, <field>: <value>, ...}`` whose keys are the attrs field names of the message.
This package is the definition of the protocol. :mod:`plugin_execution.worker._wire` writes
and reads the same bytes as plain dicts with the standard library and msgpack only, so a
worker child starts without attrs and cattrs; the tests hold the two to the same bytes.

Every way incoming bytes can be wrong raises :class:`ProtocolError`, and nothing else.

The parts, each importable on its own but used from here:

- ``_messages``: the message classes, their tags and directions, the protocol's constants;
- ``_codec``: encoding and strict decoding of each message class (built once);
- ``_connection``: :class:`Connection`, the state machine (framing, directions, handshake).
"""

from __future__ import annotations

from ._connection import Connection as Connection
from ._connection import ProtocolError as ProtocolError
from ._messages import DEFAULT_MAX_FRAME_SIZE as DEFAULT_MAX_FRAME_SIZE
from ._messages import DEFAULT_MAX_FRAME_VALUES as DEFAULT_MAX_FRAME_VALUES
from ._messages import MAX_ID_LENGTH as MAX_ID_LENGTH
from ._messages import MESSAGE_TYPES as MESSAGE_TYPES
from ._messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._messages import Batch as Batch
from ._messages import Cancel as Cancel
from ._messages import ChannelClose as ChannelClose
from ._messages import ChannelCredit as ChannelCredit
from ._messages import ChannelData as ChannelData
from ._messages import ChannelOpen as ChannelOpen
from ._messages import Error as Error
from ._messages import Event as Event
from ._messages import Execute as Execute
from ._messages import Hello as Hello
from ._messages import Message as Message
from ._messages import Ping as Ping
from ._messages import PlatformCall as PlatformCall
from ._messages import PlatformReply as PlatformReply
from ._messages import Pong as Pong
from ._messages import Result as Result
from ._messages import Role as Role
from ._messages import Shutdown as Shutdown
from ._messages import Warmed as Warmed
from ._messages import Warmup as Warmup

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_FRAME_VALUES",
    "MAX_ID_LENGTH",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Batch",
    "Cancel",
    "ChannelClose",
    "ChannelCredit",
    "ChannelData",
    "ChannelOpen",
    "Connection",
    "Error",
    "Event",
    "Execute",
    "Hello",
    "Message",
    "Ping",
    "PlatformCall",
    "PlatformReply",
    "Pong",
    "ProtocolError",
    "Result",
    "Role",
    "Shutdown",
    "Warmed",
    "Warmup",
]
