"""WebSocket channels: plugin channel handlers mounted into a trio-websocket server.

- :mod:`.channel`: the ``Channel`` a session handler talks through (standard library only,
  so worker children can import it);
- :mod:`.router`: ``WebSocketRouter``, path -> route, whose ``handle`` trio-websocket calls;
- :mod:`.registry`: ``ConnectionRegistry``, live connections, broadcast and close;
- :mod:`.connection`: ``ServerChannel``, the host's end of one accepted WebSocket;
- :mod:`.websocket`: ``mount_websocket_channels``, one route per declared channel;
- :mod:`.events`: the ``events`` handler style (``WSInput``, ``WSSender``, JSON envelopes);
- :mod:`.bridge`: carrying a session over the worker protocol for process backends.

This package imports nothing itself: a worker child imports :mod:`.channel` and
:mod:`.events` without paying for trio-websocket.
"""
