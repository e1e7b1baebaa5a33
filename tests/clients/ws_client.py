"""A `websockets` client for the e2e tests: permessage-deflate offered, as
that library (and every browser) does by default. Sends `count` messages of
`size` compressible bytes, each after the echo of the previous one, and
prints one JSON object: the extensions negotiated, the echoes received and
the Close that ended the connection, if any.

Usage: ws_client.py '{"url": "ws://127.0.0.1:port/ws", "count": 1, "size": 100000}'
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

READ_TIMEOUT = 5


async def main():
    args = json.loads(sys.argv[1])
    report = {"echoes": 0, "close": None, "reason": None}
    async with connect(args["url"], max_size=None, open_timeout=5, close_timeout=2) as ws:
        report["extensions"] = ws.response.headers.get("Sec-WebSocket-Extensions")
        try:
            for n in range(args.get("count", 1)):
                message = f"{n}:" + "a" * args.get("size", 10)
                await ws.send(message)
                echo = await asyncio.wait_for(ws.recv(), READ_TIMEOUT)
                if echo == message:
                    report["echoes"] += 1
        except ConnectionClosed as closed:
            if closed.rcvd is not None:
                report["close"] = closed.rcvd.code
                report["reason"] = closed.rcvd.reason
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
