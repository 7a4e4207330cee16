"""The asyncio glue both ends of a tunnel run: a ``Connection`` over a WebSocket, its streams, their splicing."""
