"""A `websockets` echo server for the e2e tests: permessage-deflate on, as
that library has by default. Prints one JSON object per line on stdout:
{"port": N} once listening, {"open": <extensions or null>} per connection,
{"message": <bytes>} per message received, {"close": code, "reason": r}
per connection closed. Exits after 60 s, or when stdin closes.
"""

import asyncio
import json
import sys

from websockets.asyncio.server import serve


def emit(event):
    print(json.dumps(event), flush=True)


async def echo(ws):
    emit({"open": ws.response.headers.get("Sec-WebSocket-Extensions")})
    try:
        async for message in ws:
            emit({"message": len(message)})
            await ws.send(message)
    finally:
        emit({"close": ws.close_code, "reason": ws.close_reason})


async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None) as server:
        emit({"port": server.sockets[0].getsockname()[1]})
        loop = asyncio.get_running_loop()
        stdin_closed = loop.run_in_executor(None, sys.stdin.read)
        await asyncio.wait_for(stdin_closed, 60)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except TimeoutError:
        pass
