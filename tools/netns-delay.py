#!/usr/bin/env python3
"""Delay every packet a host sends by a fixed time, for kernels without tc's netem.

tools/netns-hosts.sh runs one of these inside each emulated host when ``--delay`` is given and
the kernel has no ``sch_netem``. The host's firewall hands outgoing packets to it:

    socket -> OUTPUT hook: iptables -j NFQUEUE --queue-bypass -> [this process] -> eth0 (tbf: rate)
                                                 holds each packet D, then "accept"

It speaks nfnetlink_queue directly (stdlib only): it receives metadata only (no payload copy,
whole GSO super-packets, so a 64 KiB TCP burst is one message), keeps the packet ids in arrival
order and, once the oldest is D old, accepts it and every older one with one batch verdict.
Every packet waits the same D, so ids leave in order. Precision is that of a timer wake-up in a
Python process: it runs SCHED_FIFO (else busy-polling MPI ranks starve it for milliseconds) with
1 ns timer slack, and still adds ~20-100 us to D. With fail-open, a full queue or a dead delayer
(--queue-bypass) passes packets on undelayed instead of dropping them.

    ip netns exec mpt-h1 python3 tools/netns-delay.py 100us [--queue 0]
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import re
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
MSG_PACKET, MSG_CONFIG, MSG_VERDICT_BATCH = 0, 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
CFG_CMD, CFG_PARAMS, CFG_QUEUE_MAXLEN, CFG_MASK, CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND = 1
COPY_META = 1
F_FAIL_OPEN, F_GSO = 1, 4
ATTR_PACKET_HDR, ATTR_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5


def parse_delay(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(us|usec|ms|msec|s|sec)?", text.strip())
    if not m:
        raise SystemExit(f"netns-delay: bad delay '{text}': use e.g. 100us, 1.5ms, 0.01s")
    scale = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0, None: 1e-6}
    return float(m.group(1)) * scale[m.group(2)]


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def configure(sock, queue: int, maxlen: int) -> None:
    """Bind the queue; metadata only; whole GSO packets; fail open when full."""
    attrs = (attr(CFG_CMD, struct.pack("!BBH", CMD_BIND, 0, 0))
             + attr(CFG_PARAMS, struct.pack("!IB", 0, COPY_META))
             + attr(CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
             + attr(CFG_MASK, struct.pack("!I", F_FAIL_OPEN | F_GSO))
             + attr(CFG_FLAGS, struct.pack("!I", F_FAIL_OPEN | F_GSO)))
    sock.send(message(MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, 1))
    data = sock.recv(65536)
    # a packet may come before the ack: it is released by the first batch verdict (ids <= last)
    if struct.unpack_from("=H", data, 4)[0] == NLMSG_ERROR:
        err = struct.unpack_from("=i", data, 16)[0]
        if err:
            raise SystemExit(f"netns-delay: configuring queue {queue} failed: {os.strerror(-err)} "
                             "(another program bound to it? not root?)")


def packet_ids(data: bytes):
    """The packet id of each NFQNL_MSG_PACKET message in a buffer."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | MSG_PACKET:
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == ATTR_PACKET_HDR:
                    yield struct.unpack_from("!I", data, a + 4)[0]
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("delay", help="e.g. 100us, 1ms")
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--maxlen", type=int, default=65536, help="packets held at most (then fail open)")
    args = ap.parse_args()
    delay = parse_delay(args.delay)
    try:  # wake up on time: the default 50 us timer slack would add to every delay
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):
        pass
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    configure(sock, args.queue, args.maxlen)
    try:  # run before the busy-polling MPI ranks: a late wake-up adds to the delay
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        pass
    print(f"ready: queue {args.queue}, delay {delay * 1e6:.0f} us", flush=True)
    sock.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    held = collections.deque()  # (due time, packet id), in arrival order
    now = time.monotonic
    while True:
        timeout = max(0.0, held[0][0] - now()) if held else None
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                due = now() + delay
                held.extend((due, pid) for pid in packet_ids(data))
        t = now()
        last = None
        while held and held[0][0] <= t:
            last = held.popleft()[1]
        if last is not None:
            sock.send(message(MSG_VERDICT_BATCH, args.queue,
                              attr(ATTR_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))))


if __name__ == "__main__":
    sys.exit(main())
