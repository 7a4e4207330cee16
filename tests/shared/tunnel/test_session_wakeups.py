"""What a message costs the tunnel's event loop: no task per message, a timer woken per deadline, not per message.

Two real sessions over a WebSocket on 127.0.0.1 (tunnel_loopback.py), with
keepalive and idle deadlines armed as on a real tunnel.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tunnel_loopback import read_exactly, run, tunnel

from shared.protocol import Liveness
from shared.protocol.frames import FrameType, encode_frame
from shared.tunnel.session import FRAMES_PER_TURN

#: Deadlines far beyond the scenario, as a real tunnel's are: none of them passes while it runs.
ARMED = Liveness(keepalive_interval=25.0, ping_timeout=10.0, idle_timeout=60.0)
#: Round trips measured: enough that a task per message would stand out from the few set-up ones.
ROUND_TRIPS = 300
#: Tasks the whole exchange may start: a stream's own few, nowhere near one per message.
MOST_TASKS = 20


def test_request_and_response_round_trips_start_no_task_per_message() -> None:
    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        async with tunnel(liveness=ARMED) as (relay, agent):
            outgoing = agent.open_stream("echo")
            await outgoing.wait_accepted()
            incoming = await relay.next_stream()
            await outgoing.write(b"warm-up")
            assert await read_exactly(incoming, 7) == b"warm-up"

            created = 0
            default_factory = loop.get_task_factory()

            def counting(loop_: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
                nonlocal created
                created += 1
                if default_factory is not None:
                    return default_factory(loop_, coro, **kwargs)  # type: ignore[return-value]
                return asyncio.Task(coro, loop=loop_, **kwargs)

            loop.set_task_factory(counting)
            try:
                for n in range(ROUND_TRIPS):
                    request = n.to_bytes(8, "big") * 8  # 64 bytes, as latency.py sends
                    await outgoing.write(request)
                    assert await read_exactly(incoming, 64) == request
                    await incoming.write(request)
                    assert await read_exactly(outgoing, 64) == request
            finally:
                loop.set_task_factory(default_factory)
            return created, ROUND_TRIPS * 2

    created, messages = run(scenario)
    assert created <= MOST_TASKS, f"{created} tasks for {messages} messages: a task per message or more"


def test_a_message_packed_with_tiny_frames_lets_other_tasks_run_between_slices() -> None:
    frames = FRAMES_PER_TURN * 8
    packed = encode_frame(FrameType.PING, 0, 0, bytes(8)) * frames

    async def scenario() -> int:
        async with tunnel() as (relay, agent):
            turns_while_pending = 0
            stop = asyncio.Event()

            async def other_tunnel() -> None:
                nonlocal turns_while_pending
                while not stop.is_set():
                    if relay.conn.input_pending:
                        turns_while_pending += 1
                    await asyncio.sleep(0)

            other = asyncio.ensure_future(other_tunnel())
            before = relay.conn.bytes_sent
            await agent.transport.send(packed)
            while relay.conn.bytes_sent - before < frames * 18:  # every PING answered
                await asyncio.sleep(0.01)
            stop.set()
            await other
            return turns_while_pending

    turns = run(scenario)
    assert turns >= 8 - 1, f"other tasks ran only {turns} times while {frames} frames were handled"
