"""A grpcio client for the e2e tests: one call of the test services
(tests/proto) through Envoy, reported as one JSON object on stdout.

Usage: grpc_client.py '<json>' with keys
  target   "127.0.0.1:port"
  mode     unary | upload | subscribe | chat_interactive | chat_batch
  count    messages to send (upload, chat_*), or to ask for (subscribe)
  size     payload bytes per ChatMessage (default 2)
  gzip     compress the call's messages with gzip (default false)
  interval_ms, hold   for subscribe
  deadline call deadline in seconds (default 10)

Messages are encoded by hand (no generated stubs): the services only use
varints and strings. Every time is measured from the call's start.
"""

import json
import sys
import time

import grpc


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number, data):
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def chat_message(text):
    return field_bytes(1, text.encode())


def text_of(message):
    """The text of a ChatMessage (field 1), or "" when absent."""
    pos = 0
    while pos < len(message):
        key, pos = read_varint(message, pos)
        if key & 7 == 2:
            size, pos = read_varint(message, pos)
            if key >> 3 == 1:
                return message[pos:pos + size].decode(errors="replace")
            pos += size
        else:
            _, pos = read_varint(message, pos)
    return ""


def read_varint(data, pos):
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def identity(data):
    return data


def main():
    args = json.loads(sys.argv[1])
    count = args.get("count", 1)
    payload = "x" * args.get("size", 2)
    deadline = args.get("deadline", 10)
    compression = grpc.Compression.Gzip if args.get("gzip") else grpc.Compression.NoCompression
    started = time.monotonic()
    report = {"received": [], "last_message_s": None}

    def elapsed():
        return round(time.monotonic() - started, 3)

    def receive(message):
        report["received"].append(text_of(message))
        report["last_message_s"] = elapsed()

    with grpc.insecure_channel(args["target"]) as channel:
        def call(kind, method):
            return getattr(channel, kind)(
                method, request_serializer=identity, response_deserializer=identity
            )

        try:
            mode = args["mode"]
            if mode == "unary":
                # GetUser(user_id = 7): the reply's text is not a ChatMessage;
                # only its arrival matters.
                call("unary_unary", "/user.UserService/GetUser")(
                    field_varint(1, 7), timeout=deadline, compression=compression
                )
                report["received"].append("user")
            elif mode == "upload":
                messages = (chat_message(f"m{n}{payload}") for n in range(1, count + 1))
                call("stream_unary", "/chat.ChatService/Upload")(
                    messages, timeout=deadline, compression=compression
                )
            elif mode == "subscribe":
                request = field_varint(1, count) + field_varint(3, args.get("interval_ms", 0))
                if args.get("hold"):
                    request += field_varint(2, 1)
                for message in call("unary_stream", "/chat.ChatService/Subscribe")(
                    request, timeout=deadline
                ):
                    receive(message)
            elif mode == "chat_batch":
                messages = [chat_message(f"m{n}{payload}") for n in range(1, count + 1)]
                for message in call("stream_stream", "/chat.ChatService/Chat")(
                    iter(messages), timeout=deadline, compression=compression
                ):
                    receive(message)
            elif mode == "chat_interactive":
                # Ping-pong: each message waits for the echo of the previous.
                import queue

                outbox = queue.Queue()
                done = object()

                def requests():
                    while (item := outbox.get()) is not done:
                        yield item

                responses = call("stream_stream", "/chat.ChatService/Chat")(
                    requests(), timeout=deadline, compression=compression
                )
                try:
                    for n in range(1, count + 1):
                        outbox.put(chat_message(f"m{n}{payload}"))
                        receive(next(responses))
                    outbox.put(done)
                    for message in responses:
                        receive(message)
                finally:
                    outbox.put(done)
            else:
                raise SystemExit(f"unknown mode {mode}")
            report["code"] = "OK"
        except grpc.RpcError as error:
            report["code"] = error.code().name
            report["details"] = error.details()
        except StopIteration:
            report["code"] = "OK"
            report["details"] = "the stream ended before its echo"
    report["ended_s"] = elapsed()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
