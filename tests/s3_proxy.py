"""A fault-injecting HTTP/1.1 proxy in front of an S3-compatible server (the tests' moto server).

    proxy = FaultProxy("http://127.0.0.1:5000", rates={"503": 0.1, "truncate": 0.1}, seed=0)
    url = proxy.start()            # "http://127.0.0.1:PORT": point AWS_ENDPOINT_URL at it
    ...
    proxy.set_rates({})            # no faults from now on
    proxy.stop()

Requests are forwarded byte for byte (the Host header as the client sent it: SigV4 signs it, and
the server does not check that it names itself); responses come back byte for byte, unless a
fault is drawn. For every request five independent draws are made from random.Random(seed), in
the order requests arrive, one per kind ("latency", "reset", "500", "503", "truncate", "short",
always all six, so the sequence of draws does not depend on which faults fire), and a draw below the kind's
rate selects it:

- "latency": sleep `latency_s` before forwarding (combines with any other fault);
- "reset": the request IS forwarded and answered by the server, then the client connection is
  closed with an RST (SO_LINGER 0) and nothing of the answer is sent: the nastiest case for a
  client, whose write happened although it sees an error (a conditional PUT retried then meets
  its own object). A client cannot tell this from a reset before forwarding, except by the effect;
- "500": answer an S3 XML error InternalError with status 500, not forwarding;
- "503": answer `<Error><Code>SlowDown</Code>...` with status 503, not forwarding;
- "truncate": forward, then send the real status line and headers (the real Content-Length) but
  only half the body, and close the connection. Only a response with a body of 2 bytes or more
  (a GET's 200/206) can be truncated; for other requests the draw has no effect;
- "short" (a lying server, beyond the five kinds above): like truncate, but Content-Length says
  the short length and the connection stays open, so the HTTP layer cannot notice; only the
  client's own checks can (the length a range asked for, the ETag's MD5).

Of reset, 500, 503, truncate and short at most one applies to a request (that order decides). `counts`
holds "requests" (all requests seen) and the number of faults applied per kind.

Each client connection gets its own thread and its own keep-alive upstream connection. Request
bodies may be sized by Content-Length (aws-chunked uploads carry one too) or sent chunked;
`Expect: 100-continue` is answered by the proxy itself.

Also runnable by hand:  python tests/s3_proxy.py --upstream URL --port N --rate-503 0.05 ...
"""
from __future__ import annotations

import argparse
import random
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

KINDS = ("latency", "reset", "500", "503", "truncate", "short")
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


class _Closed(Exception):
    """The peer closed the connection (between requests: a normal end of a keep-alive connection)."""


def _read_head(f) -> tuple[bytes, list[tuple[str, str]], bytes]:
    """(first line, headers, raw head bytes) of a request or response from a buffered reader."""
    raw = bytearray()
    line = f.readline(65537)
    while line in (b"\r\n", b"\n"):          # tolerate stray blank lines between messages
        line = f.readline(65537)
    if not line:
        raise _Closed()
    raw += line
    first = line.rstrip(b"\r\n")
    headers = []
    while True:
        line = f.readline(65537)
        if not line:
            raise ConnectionError("connection closed inside a message head")
        raw += line
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip().lower(), v.strip()))
    return first, headers, bytes(raw)


def _header(headers, name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _read_exact(f, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = f.read(n - len(out))
        if not b:
            raise ConnectionError("connection closed inside a message body")
        out += b
    return bytes(out)


def _read_chunked(f) -> bytes:
    """A chunked body, raw (sizes, data, trailers), as it came."""
    out = bytearray()
    while True:
        line = f.readline(65537)
        if not line:
            raise ConnectionError("connection closed inside a chunked body")
        out += line
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:                     # trailers, up to the blank line
                t = f.readline(65537)
                if not t:
                    raise ConnectionError("connection closed inside chunk trailers")
                out += t
                if t in (b"\r\n", b"\n"):
                    return bytes(out)
        out += _read_exact(f, size + 2)


def _read_body(f, headers, no_body: bool) -> tuple[bytes, bool]:
    """(raw body, ends_connection) of a message whose head was read."""
    if no_body:
        return b"", False
    te = (_header(headers, "transfer-encoding") or "").lower()
    if "chunked" in te:
        return _read_chunked(f), False
    cl = _header(headers, "content-length")
    if cl is not None:
        return _read_exact(f, int(cl)), False
    return b"", False


def _read_response(f, method: bytes) -> tuple[bytes, list, bytes, bytes, bool]:
    """(status line, headers, head bytes, body, upstream closes) of a response, 1xx skipped."""
    while True:
        first, headers, raw = _read_head(f)
        status = int(first.split()[1])
        if 100 <= status < 200:
            continue
        break
    no_body = method == b"HEAD" or status in (204, 304)
    te = (_header(headers, "transfer-encoding") or "").lower()
    closes = (_header(headers, "connection") or "").lower() == "close"
    if no_body or "chunked" in te or _header(headers, "content-length") is not None:
        body, _ = _read_body(f, headers, no_body)
    else:                                   # delimited by the connection's end
        body, closes = f.read(), True
    return first, headers, raw, body, closes


def _reset(sock: socket.socket) -> None:
    """Close with an RST: the client sees 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, upstream: str, rates: dict[str, float] | None = None, seed: int = 0, latency_s: float = 0.05):
        u = urlsplit(upstream)
        self.upstream = upstream
        self._up_addr = (u.hostname or "127.0.0.1", u.port or 80)
        self.latency_s = float(latency_s)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rates: dict[str, float] = {}
        self.set_rates(rates or {})
        self.counts: dict[str, int] = {"requests": 0, **{k: 0 for k in KINDS}}
        self.url = ""
        self._srv: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # control ------------------------------------------------------------------------------
    def set_rates(self, rates: dict[str, float]) -> None:
        bad = set(rates) - set(KINDS)
        if bad:
            raise ValueError(f"unknown fault kinds {sorted(bad)}; known: {KINDS}")
        with self._lock:
            self._rates = {k: float(rates.get(k, 0.0)) for k in KINDS}

    def reseed(self, seed: int) -> None:
        """Restart the draws from random.Random(seed) (a test's own sequence on a shared proxy)."""
        with self._lock:
            self._rng = random.Random(seed)

    def reset_counts(self) -> None:
        with self._lock:
            for k in self.counts:
                self.counts[k] = 0

    def start(self) -> str:
        return self.start_on(0)

    def start_on(self, port: int) -> str:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(256)
        self._srv = srv
        self.url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept_loop, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._stopping = True
        if self._srv is not None:
            try:
                self._srv.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._srv.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    # serving ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="s3-fault-proxy-conn", daemon=True).start()

    def _draw(self) -> tuple[bool, str | None]:
        with self._lock:
            self.counts["requests"] += 1
            hit = {k: self._rng.random() < self._rates[k] for k in KINDS}
        fault = next((k for k in ("reset", "500", "503", "truncate", "short") if hit[k]), None)
        return hit["latency"], fault

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def _serve(self, conn: socket.socket) -> None:
        up: socket.socket | None = None
        upf = None
        cf = conn.makefile("rb")
        try:
            while not self._stopping:
                try:
                    first, headers, head = _read_head(cf)
                except _Closed:
                    return
                method = first.split(b" ", 1)[0].upper()
                if (_header(headers, "expect") or "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body, _ = _read_body(cf, headers, False)
                latency, fault = self._draw()
                if latency:
                    self._count("latency")
                    time.sleep(self.latency_s)
                if fault in ("500", "503"):
                    self._count(fault)
                    status, reason, code, msg = _ERRORS[fault]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                           f"<Message>{msg}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                    conn.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                                 f"Content-Length: {len(xml)}\r\n\r\n".encode() + xml)
                    continue
                # forward, on the kept-alive upstream connection (a fresh one if it went stale)
                for attempt in (0, 1):
                    if up is None:
                        up = socket.create_connection(self._up_addr, timeout=300)
                        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        upf = up.makefile("rb")
                    try:
                        up.sendall(head + body)
                        status_line, rheaders, rhead, rbody, closes = _read_response(upf, method)
                        break
                    except (_Closed, ConnectionError, OSError):
                        upf.close(), up.close()
                        up = upf = None
                        if attempt == 1:
                            raise
                if closes:
                    upf.close(), up.close()
                    up = upf = None
                if fault == "reset":
                    self._count("reset")
                    return _reset(conn)
                if fault == "truncate" and len(rbody) >= 2 and method == b"GET" \
                        and _header(rheaders, "content-length") is not None:
                    self._count("truncate")
                    conn.sendall(rhead + rbody[: len(rbody) // 2])
                    return
                if fault == "short" and len(rbody) >= 2 and method == b"GET" \
                        and _header(rheaders, "content-length") is not None:
                    self._count("short")
                    cut = rbody[: len(rbody) // 2]
                    lines = [ln for ln in rhead.split(b"\r\n") if not ln.lower().startswith(b"content-length:")]
                    rhead = b"\r\n".join(lines[:1] + [b"Content-Length: %d" % len(cut)] + lines[1:])
                    conn.sendall(rhead + cut)
                    continue
                conn.sendall(rhead + rbody)
                if closes or (_header(headers, "connection") or "").lower() == "close":
                    return
        except (ConnectionError, OSError, ValueError):
            return                           # the client went away (or sent garbage): drop it
        finally:
            with self._lock:
                self._conns.discard(conn)
            for c in (cf, upf, up):
                try:
                    if c is not None:
                        c.close()
                except OSError:
                    pass
            try:
                conn.close()
            except OSError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description="a fault-injecting proxy in front of an S3-compatible server")
    ap.add_argument("--upstream", required=True, help="the server's URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (127.0.0.1); 0: any free one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-s", type=float, default=0.05)
    for k in KINDS:
        ap.add_argument(f"--rate-{k}", type=float, default=0.0, help=f"probability of a {k} fault per request")
    a = ap.parse_args()
    rates = {k: getattr(a, f"rate_{k}") for k in KINDS}
    p = FaultProxy(a.upstream, rates, seed=a.seed, latency_s=a.latency_s)
    print(f"proxy {p.start_on(a.port)} -> {a.upstream}; rates {rates}", flush=True)
    try:
        while True:
            time.sleep(10)
            print(f"counts {p.counts}", flush=True)
    except KeyboardInterrupt:
        p.stop()


if __name__ == "__main__":
    main()
