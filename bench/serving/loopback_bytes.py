#!/usr/bin/env python3
"""Bare TCP loopback throughput: what moving a request's bytes costs without gRPC.

A client sends --up_mib to a server thread on 127.0.0.1, which reads all of it and sends
--down_mib back (the shape of one Attend: inputs up, output down). Prints each direction's time
and rate, and the round trip, for --reps repetitions on one connection. Large recv_into/sendall
calls on preallocated buffers, so the kernel's socket copies, not Python, set the pace.
"""
import argparse
import socket
import threading
import time

CHUNK = 4 << 20


def recv_exactly(sock, view):
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:got + CHUNK])
        if n == 0:
            raise ConnectionError("peer closed early")
        got += n


def serve(listener, up, down, reps):
    conn, _ = listener.accept()
    with conn:
        inbox = memoryview(bytearray(up))
        outbox = bytes(down)
        for _ in range(reps):
            recv_exactly(conn, inbox)
            conn.sendall(outbox)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--up_mib", type=int, default=192)
    parser.add_argument("--down_mib", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    up, down = args.up_mib << 20, args.down_mib << 20

    listener = socket.create_server(("127.0.0.1", 0))
    server = threading.Thread(target=serve, args=(listener, up, down, args.reps), daemon=True)
    server.start()
    client = socket.create_connection(listener.getsockname())
    outbox = bytes(up)
    inbox = memoryview(bytearray(down))
    for rep in range(args.reps):
        start = time.perf_counter()
        client.sendall(outbox)
        sent = time.perf_counter()
        recv_exactly(client, inbox)
        done = time.perf_counter()
        # The server starts sending only after it has read everything: `sent` is within a
        # socket buffer of the upload's end.
        print(f"loopback rep={rep}: up {args.up_mib} MiB {1e3 * (sent - start):.1f} ms "
              f"({up / (sent - start) / 1e9:.2f} GB/s), down {args.down_mib} MiB "
              f"{1e3 * (done - sent):.1f} ms ({down / (done - sent) / 1e9:.2f} GB/s), "
              f"round trip {1e3 * (done - start):.1f} ms")
    client.close()
    server.join()


if __name__ == "__main__":
    main()
