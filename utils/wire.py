"""Counted bytes: what the Linux kernel saw this process send on its TCP sockets.

Used where the course calls a byte figure *counted* for a gloo rank (see
``utils.comm``, whose other figures are *modelled*).

What it counts
    For every TCP socket this process holds, the kernel keeps ``struct tcp_info``
    (``getsockopt(fd, IPPROTO_TCP, TCP_INFO)``). ``tcpi_bytes_sent`` (RFC 4898
    tcpEStatsPerfHCDataOctetsOut, Linux >= 4.19) counts the payload bytes TCP
    handed to IP on that socket, retransmissions included; ``tcpi_bytes_retrans``
    counts the retransmitted ones. ``sent`` here is their difference: each byte
    the program wrote and TCP transmitted, once. (Even on loopback a rank starved
    of CPU occasionally gets a tail-loss probe: one 65483-byte segment, loopback's
    MSS, sent twice; that shows in ``retrans``, not in ``sent``.) Payload means
    what the program wrote: for a gloo rank, the tensor data plus gloo's framing,
    a 48-byte preamble per message (``gloo/transport/tcp/pair.h``, ``Op``): per
    point-to-point transfer the sender writes a "send ready" notice and the data
    message (96 bytes of preambles), the receiver a "recv ready" notice (48), and
    a new pair's handshake writes a few bytes (8 seen). Never TCP/IP headers or
    ACKs. Every TCP socket of the process is counted: every process group's gloo
    pairs and listener, and a TCPStore client if there is one (the course's
    launcher rendezvouses through a FileStore, so its ranks have only gloo's).
    ``received`` (``tcpi_bytes_received``) is what arrived meanwhile; it depends on
    when the peers' messages land relative to ``start``/``stop`` (a neighbouring
    operation's notices may fall inside), so it wanders by a few preambles.

What it does not count
    Anything that is not TCP: NCCL over NVLink, PCIe, InfiniBand/RoCE verbs or its
    shared-memory and P2P transports, gloo's ibverbs transport, shared memory
    between processes, AF_UNIX pipes (the launcher's). On a GPU job these figures
    are 0 or nearly so: there the course's figures stay *modelled*.

How it relates to the modelled figure
    The modelled figure is nccl-tests' accounting: a collective on a buffer of S
    bytes over n ranks moves factor x S bytes per rank (2(n-1)/n for all-reduce,
    (n-1)/n for reduce-scatter and all-gather, 1 for broadcast), the bytes of a
    bandwidth-optimal algorithm. The counted figure is what the backend's algorithm
    really sent from this rank. For gloo on CPU (torch 2.13, whose bundled gloo
    has no shared-memory all-reduce; ``tests/test_wire.py`` checks every figure
    below to the byte, at n = 2 and 4 with S = 4 MiB) they agree to within gloo's
    preambles (< 0.03 %) for all-reduce (``gloo::allreduce``'s default algorithm,
    the ring of gloo/allreduce.cc: a reduce-scatter then an all-gather, 2(n-1)/n x
    S per rank) and all-gather (gloo/allgather.cc, a ring: (n-1)/n x S). They
    differ where gloo's algorithm is not the one the model assumes:
    ``reduce_scatter_tensor``/``reduce_scatter_single`` on gloo all-reduces a copy
    of the whole input and keeps its chunk
    (``ProcessGroupGloo::reduce_scatter_tensor_coalesced``), so it sends 2(n-1)/n x
    S, twice the model; broadcast (gloo/broadcast.cc) is a binomial tree, so the
    root sends ceil(log2 n) x S, inner ranks S per child and the leaves nothing,
    (n-1) x S in all (the model's "S per rank" is a pipelined chain's figure).
    A ``send`` of S bytes counts S + 96 on the sender and 48 on the receiver.

API
    ``tcp_bytes_sent()``  payload bytes (``tcpi_bytes_sent - tcpi_bytes_retrans``)
                          summed over the TCP sockets open now, each over its
                          lifetime; ``None`` where unsupported (not Linux, or a
                          kernel whose ``tcp_info`` is too short to hold
                          ``tcpi_bytes_sent``). ``supported()`` says which.
    ``read_sockets()``    {socket inode: ``SocketReading``} for the TCP sockets
                          open now (``sent``, ``retrans``, ``received``,
                          ``acked``, ``notsent``, ``state``, ``payload``).
    ``WireCounter``       bytes sent (``.sent``), retransmitted (``.retrans``) and
                          received (``.received``) between ``start()`` and
                          ``stop()`` (None where unsupported), with ``.sockets``
                          (TCP sockets seen, listeners included) and ``.closed``;
                          ``sample()`` reads every socket mid-interval. Also a
                          context manager::

        with WireCounter() as wire:
            dist.all_reduce(x)
        wire.sent        # bytes this rank's TCP sockets sent meanwhile

    It keeps one baseline per socket, keyed by the socket's inode, so it is right
    when sockets open or close in between (torch 2.13 connects gloo's full mesh in
    ``init_process_group``, n-1 pairs per rank, but ``TORCH_GLOO_LAZY_INIT=1``
    opens pairs on first use, and ``new_group`` opens new ones; a destroyed group's
    sockets close later, asynchronously): a socket that appears counts from 0 (the
    kernel's counters start at 0 when a socket is created, so its connection
    handshake's payload is included). A socket that disappears keeps its *last
    reading*: a closed socket can no longer be read, so what it sent after the last
    ``start()``/``sample()``/``stop()`` before it closed is lost; call ``sample()``
    before closing sockets if that matters. ``stop()`` first waits (up to
    ``settle_s``) until no socket has bytes queued that TCP has not yet sent
    (``tcpi_notsent_bytes``), so a collective's last send, already handed to the
    kernel but not yet transmitted, is counted; ``start()`` waits the same way so
    the previous operation's tail is not. A rank's counters see only its own
    sends, so no barrier is needed around the interval. Reading walks
    ``/proc/self/fd`` and queries a duplicate of each socket descriptor (closed
    again at once; the original is never touched): ~0.2 ms for 20 descriptors.

Struct layout (``struct tcp_info``, include/uapi/linux/tcp.h; checked with
``offsetof`` against the Linux 6.1 UAPI header and read on a 6.18 kernel):
``tcpi_state`` u8 at 0, ``tcpi_bytes_acked`` u64 at 120, ``tcpi_bytes_received``
u64 at 128, ``tcpi_notsent_bytes`` u32 at 144, ``tcpi_bytes_sent`` u64 at 200,
``tcpi_bytes_retrans`` u64 at 208. The kernel copies ``min(len, sizeof)`` bytes,
so a reply shorter than 216 bytes means an older kernel.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import sys
import time
from typing import NamedTuple

__all__ = [
    "SocketReading",
    "WireCounter",
    "read_sockets",
    "supported",
    "tcp_bytes_sent",
]

GLOO_PREAMBLE = 48
"""Bytes of gloo's per-message header (``gloo/transport/tcp/pair.h``, ``Op``: six
``size_t``). Per point-to-point transfer of S bytes the sender writes a send-ready
notice and the data message's header (S + 96 counted on the sender), the receiver a
recv-ready notice (48); ``tests/test_wire.py`` checks it to the byte."""

_TCP_INFO = getattr(socket, "TCP_INFO", 11)  # 11 on Linux
_ASK = 512  # bytes requested; the kernel returns min(_ASK, sizeof(struct tcp_info))
_OFF_ACKED = 120  # __u64 tcpi_bytes_acked      (Linux >= 4.1)
_OFF_RECEIVED = 128  # __u64 tcpi_bytes_received (Linux >= 4.1)
_OFF_NOTSENT = 144  # __u32 tcpi_notsent_bytes  (Linux >= 4.6)
_OFF_SENT = 200  # __u64 tcpi_bytes_sent        (Linux >= 4.19)
_OFF_RETRANS = 208  # __u64 tcpi_bytes_retrans  (Linux >= 4.19)
_NEEDED = _OFF_RETRANS + 8


class SocketReading(NamedTuple):
    """One TCP socket's counters (bytes since the socket was created)."""

    sent: int
    retrans: int
    received: int
    acked: int
    notsent: int  # written by the program, not yet sent by TCP (a level, not a count)
    state: int  # tcpi_state: 1 ESTABLISHED, 10 LISTEN, ... (include/net/tcp_states.h)

    @property
    def payload(self) -> int:
        """Bytes sent once each: ``tcpi_bytes_sent`` less ``tcpi_bytes_retrans``."""
        return self.sent - self.retrans


_ZERO = SocketReading(0, 0, 0, 0, 0, 0)


def _parse(info: bytes) -> SocketReading | None:
    if len(info) < _NEEDED:
        return None
    sent, retrans = struct.unpack_from("=QQ", info, _OFF_SENT)
    received, acked = (
        struct.unpack_from("=Q", info, _OFF_RECEIVED)[0],
        struct.unpack_from("=Q", info, _OFF_ACKED)[0],
    )
    (notsent,) = struct.unpack_from("=I", info, _OFF_NOTSENT)
    return SocketReading(sent, retrans, received, acked, notsent, info[0])


_SUPPORTED: bool | None = None


def supported() -> bool:
    """True on Linux with a kernel whose ``tcp_info`` has ``tcpi_bytes_sent``."""
    global _SUPPORTED
    if _SUPPORTED is None:
        ok = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")
        if ok:
            try:  # an unconnected TCP socket answers TCP_INFO with the full struct
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    info = probe.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _ASK)
                ok = _parse(info) is not None
            except OSError:
                ok = False
        _SUPPORTED = ok
    return _SUPPORTED


def _read_fd(fd: int) -> tuple[int, SocketReading] | None:
    """(inode, reading) for ``fd`` if it is a TCP socket, else None.

    Works on a duplicate of ``fd`` (closed here), never on ``fd`` itself, so the
    caller's socket is untouched even if another thread closes ``fd`` meanwhile
    (the duplicate keeps the socket alive while it is read).
    """
    try:
        dup = os.dup(fd)
    except OSError:  # closed since the listing
        return None
    try:
        st = os.fstat(dup)
        if not stat.S_ISSOCK(st.st_mode):
            os.close(dup)
            return None
        sock = socket.socket(fileno=dup)  # owns dup from here on
    except OSError:
        os.close(dup)
        return None
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None  # AF_UNIX (the launcher's pipes), netlink, ...
        if sock.type != socket.SOCK_STREAM or sock.proto not in (0, socket.IPPROTO_TCP):
            return None  # UDP, SCTP, MPTCP, ...
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _ASK)
        except OSError:
            return None
    reading = _parse(info)
    return None if reading is None else (st.st_ino, reading)


def read_sockets() -> dict[int, SocketReading] | None:
    """{socket inode: reading} for this process's open TCP sockets; None where
    unsupported. A socket reachable through several descriptors appears once."""
    if not supported():
        return None
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    out: dict[int, SocketReading] = {}
    for fd in fds:
        got = _read_fd(fd)
        if got is not None:
            out[got[0]] = got[1]
    return out


def tcp_bytes_sent() -> int | None:
    """Payload bytes sent so far over the TCP sockets this process has open now
    (each over its lifetime, each byte once: retransmissions left out); None
    where unsupported."""
    readings = read_sockets()
    return None if readings is None else sum(r.payload for r in readings.values())


def _minus(a: SocketReading, b: SocketReading) -> tuple[int, int, int]:
    return a.payload - b.payload, a.retrans - b.retrans, a.received - b.received


class WireCounter:
    """Bytes this process's TCP sockets sent (and received) between ``start()``
    and ``stop()``; see the module docstring. ``sent``, ``retrans``, ``received``
    are None where unsupported; ``sockets`` is how many TCP sockets were seen
    during the interval, ``closed`` how many of them disappeared."""

    def __init__(self, settle_s: float = 1.0):
        self.settle_s = settle_s
        self.sent: int | None = None
        self.retrans: int | None = None
        self.received: int | None = None
        self.sockets = 0
        self.closed = 0
        self._base: dict[int, SocketReading] = {}
        self._last: dict[int, SocketReading] = {}
        self._gone = [0, 0, 0]  # sent, retrans, received of vanished sockets
        self._seen: set = set()
        self._running = False

    # The interval -------------------------------------------------------------
    def start(self) -> WireCounter:
        """Take the baselines (after the kernel has sent what is queued)."""
        self.sent = self.retrans = self.received = None
        self.sockets = self.closed = 0
        self._gone = [0, 0, 0]
        readings = self._settled()
        self._running = readings is not None
        self._base = dict(readings or {})
        self._last = dict(self._base)
        self._seen = set(self._base)
        return self

    def sample(self) -> None:
        """Read every socket now, so one that closes later keeps this reading."""
        if self._running:
            self._update(read_sockets())

    def stop(self) -> int | None:
        """End the interval; returns (and sets) ``sent``."""
        if not self._running:
            return self.sent
        self._running = False
        self._update(self._settled())
        sent, retrans, received = self._gone
        for ino, last in self._last.items():
            d = _minus(last, self._base[ino])
            sent, retrans, received = sent + d[0], retrans + d[1], received + d[2]
        self.sent, self.retrans, self.received = sent, retrans, received
        self.sockets = len(self._seen)
        return self.sent

    def __enter__(self) -> WireCounter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"WireCounter(sent={self.sent}, retrans={self.retrans}, "
            f"received={self.received}, sockets={self.sockets})"
        )

    # Internals ----------------------------------------------------------------
    def _settled(self) -> dict[int, SocketReading] | None:
        """A reading taken once no socket has unsent bytes queued (or settle_s)."""
        deadline = time.monotonic() + self.settle_s
        while True:
            readings = read_sockets()
            if readings is None:
                return None
            if not any(r.notsent for r in readings.values()):
                return readings
            if time.monotonic() >= deadline:
                return readings
            time.sleep(0.001)

    def _retire(self, ino: int) -> None:
        d = _minus(self._last[ino], self._base[ino])
        self._gone = [g + x for g, x in zip(self._gone, d)]
        self.closed += 1

    def _update(self, readings: dict[int, SocketReading] | None) -> None:
        if readings is None:
            return
        for ino in list(self._last):
            if ino not in readings:  # closed: keep its last reading
                self._retire(ino)
                del self._last[ino], self._base[ino]
        for ino, now in readings.items():
            if ino in self._last and now.sent < self._last[ino].sent:
                # The inode was reused by a new socket: retire the old one.
                self._retire(ino)
                self._base[ino] = _ZERO
                self._seen.add(("reused", ino, self.closed))
            elif ino not in self._base:  # opened during the interval
                self._base[ino] = _ZERO
            self._last[ino] = now
            self._seen.add(ino)
