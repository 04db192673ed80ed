#!/usr/bin/env python3
"""Live-feed stream benchmarks for `make bench` (scripts/bench.sh, section "streams").

    bench_streams.py herald  …   (a) N idle SSE streams on one `herald serve`: memory per stream and
                                 CPU at idle; (b) POST /v1/events to a group whose N members all
                                 hold a stream (`--rounds` times, one after the other): from the
                                 202 until each client has its `notification.created`. A plain LISTEN connection (herald_events,
                                 herald_stream) runs beside it, timing what the bus announces.
    bench_streams.py ceiling …   the same client harness against a minimal asyncio SSE server
                                 (`serve-ceiling`, started here in its own process) that pushes one
                                 event of the same size to N held connections.

One asyncio process holds every client connection (raw sockets: a GET, chunked SSE parsed by
hand), opened at a bounded rate; measurement starts once each has its first `unread_count`.
Results are KEY=value lines (sourced by bench.sh). Access tokens are ES256 JWTs minted here with
the server's key (Sources/HeraldAPI/AccessTokens.swift: iss, aud, sub, org, exp, nbf, iat, jti).
"""
import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import resource
import struct
import subprocess
import sys
import time
import uuid

CREATED = "notification.created"


def log(*args):
    print("bench_streams:", *args, file=sys.stderr, flush=True)


# --- access tokens -----------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_minter(keys_dir):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    pem = sorted(f for f in os.listdir(keys_dir) if f.endswith(".pem"))[-1]
    kid = pem[:-4]
    with open(os.path.join(keys_dir, pem), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    header = b64url(json.dumps({"alg": "ES256", "kid": kid, "typ": "JWT"}, separators=(",", ":")).encode())

    def mint(org, user, ttl=7200):
        now = int(time.time())
        claims = {"iss": "herald", "aud": ["herald-api"], "sub": user, "org": org,
                  "exp": now + ttl, "nbf": now, "iat": now, "jti": str(uuid.uuid4())}
        signing_input = header + "." + b64url(json.dumps(claims, separators=(",", ":")).encode())
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    return mint


# --- the client harness ------------------------------------------------------------------------

class Stream:
    """One SSE client: GET, then chunked transfer decoded by hand, events split on blank lines."""

    def __init__(self, index, host, port, path, headers):
        self.index, self.host, self.port, self.path, self.headers = index, host, port, path, headers
        self.ready = asyncio.get_running_loop().create_future()  # first unread_count
        self.created_at = None  # monotonic time the timed event arrived
        self.events = 0
        self.error = None
        self.writer = None

    async def run(self, on_event):
        try:
            reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: text/event-stream\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            self.writer.write((head + "\r\n").encode())
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"stream {self.index}: {status.decode(errors='replace').strip()}")
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                    chunked = True
            buffer = b""
            while True:
                if chunked:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data = await reader.readexactly(size + 2)
                    buffer += data[:-2]
                else:
                    data = await reader.read(65536)
                    if not data:
                        break
                    buffer += data
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    name, data = None, b""
                    for line in block.split(b"\n"):
                        if line.startswith(b"event:"):
                            name = line[6:].strip().decode()
                        elif line.startswith(b"data:"):
                            data = line[5:].strip()
                    if name:
                        self.events += 1
                        on_event(self, name, data)
            if not self.ready.done():
                raise RuntimeError(f"stream {self.index}: ended before its first event")
        except (asyncio.CancelledError, ConnectionResetError, BrokenPipeError):
            pass
        except Exception as error:  # noqa: BLE001: a failed client is counted, not fatal
            self.error = error
            if not self.ready.done():
                self.ready.set_exception(error)

    def close(self):
        if self.writer:
            self.writer.close()


class Harness:
    def __init__(self, host, port, path, rate):
        self.host, self.port, self.path, self.rate = host, port, path, rate
        self.streams, self.tasks = [], []
        self.timing = False
        self.sample = None  # the data of one timed event

    def on_event(self, stream, name, data):
        if name == "unread_count" and not stream.ready.done():
            stream.ready.set_result(time.monotonic())
        elif name == CREATED and self.timing and stream.created_at is None:
            stream.created_at = time.monotonic()
            self.sample = self.sample or data

    async def open(self, headers_for):
        """Opens one stream per entry of headers_for, `rate` at a time, each waited for until
        its first unread_count."""
        start = time.monotonic()
        for offset in range(0, len(headers_for), self.rate):
            batch = []
            for i in range(offset, min(offset + self.rate, len(headers_for))):
                stream = Stream(i, self.host, self.port, self.path, headers_for[i])
                self.streams.append(stream)
                self.tasks.append(asyncio.ensure_future(stream.run(self.on_event)))
                batch.append(stream.ready)
            results = await asyncio.gather(*batch, return_exceptions=True)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise RuntimeError(f"{len(failed)} streams failed to open, first: {failed[0]}")
        return time.monotonic() - start

    async def close(self):
        for stream in self.streams:
            stream.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.streams, self.tasks = [], []

    async def wait_all(self, deadline):
        while time.monotonic() < deadline:
            if all(s.created_at is not None for s in self.streams):
                return True
            await asyncio.sleep(0.01)
        return False


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


def summary(prefix, t_reply, streams):
    got = [s.created_at - t_reply for s in streams if s.created_at is not None]
    out = {f"{prefix}_RECEIVED": len(got), f"{prefix}_CLIENTS": len(streams)}
    if got:
        out.update({f"{prefix}_P50": percentile(got, 50), f"{prefix}_P99": percentile(got, 99),
                    f"{prefix}_LAST": max(got), f"{prefix}_FIRST": min(got)})
    return out


async def http_request(host, port, method, path, headers, body=b""):
    reader, writer = await asyncio.open_connection(host, port)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write((head + "\r\n").encode() + body)
    status = await reader.readline()
    t_reply = time.monotonic()
    rest = await reader.read()
    writer.close()
    return int(status.split()[1]), t_reply, rest.split(b"\r\n\r\n", 1)[-1]


# --- process figures ---------------------------------------------------------------------------

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


# --- a plain LISTEN connection (PostgreSQL wire protocol, SCRAM-SHA-256) -----------------------

class Listener:
    def __init__(self):
        self.messages = []  # (monotonic time, channel, payload)

    async def connect(self, host, port, user, password, database, channels):
        self.reader, self.writer = await asyncio.open_connection(host, port)
        params = f"user\0{user}\0database\0{database}\0\0".encode()
        self.writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
        nonce = b64url(os.urandom(18))
        first_bare = f"n=,r={nonce}"
        while True:
            kind, body = await self.message()
            if kind == b"R":
                code = struct.unpack("!i", body[:4])[0]
                if code == 0:
                    continue
                if code == 10:
                    initial = ("n,," + first_bare).encode()
                    payload = b"SCRAM-SHA-256\0" + struct.pack("!i", len(initial)) + initial
                    self.send(b"p", payload)
                elif code == 11:
                    server_first = body[4:].decode()
                    attrs = dict(part.split("=", 1) for part in server_first.split(","))
                    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
                    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                    stored = hashlib.sha256(client_key).digest()
                    final_bare = f"c=biws,r={attrs['r']}"
                    auth = f"{first_bare},{server_first},{final_bare}".encode()
                    signature = hmac.new(stored, auth, hashlib.sha256).digest()
                    proof = bytes(a ^ b for a, b in zip(client_key, signature))
                    self.send(b"p", f"{final_bare},p={base64.b64encode(proof).decode()}".encode())
                elif code == 12:
                    continue
                else:
                    raise RuntimeError(f"authentication {code} not supported")
            elif kind == b"E":
                raise RuntimeError(f"PostgreSQL: {body!r}")
            elif kind == b"Z":
                break
        for channel in channels:
            self.send(b"Q", f"LISTEN {channel}\0".encode())
            while (await self.message())[0] != b"Z":
                pass

    def send(self, kind, body):
        self.writer.write(kind + struct.pack("!i", len(body) + 4) + body)

    async def message(self):
        kind = await self.reader.readexactly(1)
        length = struct.unpack("!i", await self.reader.readexactly(4))[0]
        return kind, await self.reader.readexactly(length - 4)

    async def run(self):
        try:
            while True:
                kind, body = await self.message()
                if kind == b"A":
                    at = time.monotonic()
                    channel, payload = body[4:].split(b"\0")[:2]
                    self.messages.append((at, channel.decode(), payload.decode()))
        except (asyncio.CancelledError, asyncio.IncompleteReadError):
            pass


# --- (a) and (b) against Herald ----------------------------------------------------------------

async def bench_herald(args):
    with open(args.users) as f:
        users = [line.split() for line in f if line.strip()]  # "<org> <user>"
    users = users[: args.streams]
    mint = token_minter(args.keys)
    log(f"minting {len(users)} access tokens")
    headers = [{"Authorization": "Bearer " + mint(org, user)} for org, user in users]
    results = {"STREAMS": len(users)}
    harness = Harness(args.host, args.port, "/v1/me/notifications/stream", args.rate)

    await asyncio.sleep(args.settle)
    rss_before = rss_kib(args.pid)
    log(f"server RSS before: {rss_before} KiB; opening {len(users)} streams, {args.rate} at a time")
    results["OPEN_SECONDS"] = await harness.open(headers)
    log(f"all open in {results['OPEN_SECONDS']:.1f} s; settling {args.settle} s")
    await asyncio.sleep(args.settle)
    rss_with = rss_kib(args.pid)
    results.update(RSS_BEFORE_KIB=rss_before, RSS_WITH_KIB=rss_with,
                   KIB_PER_STREAM=(rss_with - rss_before) / len(users))
    log(f"server RSS with streams: {rss_with} KiB ({results['KIB_PER_STREAM']:.1f} KiB per stream); CPU over {args.idle} s")
    ticks, t = cpu_ticks(args.pid), time.monotonic()
    await asyncio.sleep(args.idle)
    ticks, t = cpu_ticks(args.pid) - ticks, time.monotonic() - t
    results["IDLE_CPU_PERCENT"] = 100 * ticks / os.sysconf("SC_CLK_TCK") / t
    results["IDLE_SECONDS"] = t
    log(f"idle CPU {results['IDLE_CPU_PERCENT']:.2f} % of one core")
    gone = sum(1 for task in harness.tasks if task.done())
    if gone:
        raise RuntimeError(f"{gone} streams ended while idle")

    listener = Listener()
    pg_user, pg_password = args.pg_user.split(":", 1)
    await listener.connect(args.pg_host, args.pg_port, pg_user, pg_password, args.pg_db, ["herald_events", "herald_stream"])
    listening = asyncio.ensure_future(listener.run())
    body = json.dumps({"type": args.type, "audience": {"groups": [args.group]}, "payload": {"isq": 25}}).encode()
    # Several notifies to the same streams, one after the other: one fan-out's figures vary
    # from run to run on a shared 2-core machine. The headline figures are the worst round's.
    rounds = []
    for number in range(1, args.rounds + 1):
        for stream in harness.streams:
            stream.created_at = None
        listener.messages.clear()
        log(f"round {number} of {args.rounds}: POST /v1/events to group {args.group}")
        harness.timing = True
        t_sent = time.monotonic()
        status, t_reply, answer = await http_request(
            args.host, args.port, "POST", "/v1/events",
            {"Authorization": "Bearer " + args.api_key, "Content-Type": "application/json"}, body)
        if status != 202:
            raise RuntimeError(f"notify answered {status}: {answer[:300]!r}")
        complete = await harness.wait_all(time.monotonic() + args.timeout)
        await asyncio.sleep(0.5)
        harness.timing = False
        figures = {"NOTIFY_SECONDS": t_reply - t_sent}
        figures.update(summary("HERALD", t_reply, harness.streams))
        figures["HERALD_BEFORE_202"] = sum(1 for s in harness.streams if s.created_at is not None and s.created_at < t_reply)
        # The bus, from the same clock: the commit's announcement, then the numbered changes.
        stream_msgs = [(at, json.loads(p)) for at, ch, p in listener.messages if ch == "herald_stream"]
        announced = [at for at, ch, _ in listener.messages if ch == "herald_events"]
        figures["BUS_USERS_ANNOUNCED"] = sum(len(p.get("users", [])) for _, p in stream_msgs)
        figures["BUS_MESSAGES"] = len(stream_msgs)
        if announced:
            figures["BUS_EVENT_ANNOUNCED"] = min(announced) - t_reply
        if stream_msgs:
            figures["BUS_FIRST"] = stream_msgs[0][0] - t_reply
            figures["BUS_LAST"] = stream_msgs[-1][0] - t_reply
        log(f"notify 202 after {figures['NOTIFY_SECONDS']:.2f} s; {figures['HERALD_RECEIVED']}/{len(users)} clients "
            f"got {CREATED}; p99 {figures.get('HERALD_P99', float('nan')):.2f} s, last after "
            f"{figures.get('HERALD_LAST', float('nan')):.2f} s; bus: {figures['BUS_USERS_ANNOUNCED']} users in "
            f"{figures['BUS_MESSAGES']} messages, last after {figures.get('BUS_LAST', float('nan')):.2f} s")
        if not complete:
            log(f"WARNING: only {figures['HERALD_RECEIVED']} of {len(users)} clients received {CREATED} within {args.timeout} s")
        rounds.append(figures)
        await asyncio.sleep(2)
    listening.cancel()
    await listening
    worst = max(rounds, key=lambda f: (f["HERALD_RECEIVED"] < len(users), f.get("HERALD_P99", float("inf"))))
    results.update(worst)
    results["ROUNDS"] = len(rounds)
    results["WORST_ROUND"] = rounds.index(worst) + 1
    # Per round: "notify p50 p99 last bus_last", for the report's table.
    for number, figures in enumerate(rounds, 1):
        results[f"ROUND_{number}"] = '"' + " ".join(
            f"{figures.get(key, float('nan')):.3f}" for key in ("NOTIFY_SECONDS", "HERALD_P50", "HERALD_P99", "HERALD_LAST", "BUS_LAST")
        ) + f' {figures["HERALD_RECEIVED"]}"'
    if harness.sample:
        with open(args.event_out, "wb") as f:
            f.write(harness.sample + b"\n")
    await harness.close()
    return results


# --- the ceiling: a minimal asyncio SSE server -------------------------------------------------

def serve_ceiling(args):
    """Holds SSE connections; POST /push answers 202, then writes one event to each."""
    clients = []
    event = None

    async def handle(reader, writer):
        nonlocal event
        request = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if request.startswith(b"POST /push"):
            data = await reader.readexactly(length)
            chunk = f"id: 2\nevent: {CREATED}\ndata: {data.decode()}\n\n".encode()
            framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            for client in list(clients):
                try:
                    client.write(framed)
                except Exception:  # noqa: BLE001
                    pass
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for chunk in (b"retry: 2000\n\n", b'id: 1\nevent: unread_count\ndata: {"by_category":{},"total":0}\n\n'):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        clients.append(writer)
        try:
            await reader.read()  # until the client goes
        finally:
            clients.remove(writer)
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=4096)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def bench_ceiling(args):
    with open(args.event) as f:
        data = f.read().strip()  # one notification.created data line as Herald sent it
    server = subprocess.Popen([sys.executable, __file__, "serve-ceiling", "--port", str(args.port)], stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline().strip() == b"ready"
        harness = Harness("127.0.0.1", args.port, "/stream", args.rate)
        await harness.open([{} for _ in range(args.streams)])
        await asyncio.sleep(1)
        harness.timing = True
        status, t_reply, _ = await http_request("127.0.0.1", args.port, "POST", "/push", {}, data.encode())
        assert status == 202
        await harness.wait_all(time.monotonic() + args.timeout)
        results = summary("CEILING", t_reply, harness.streams)
        results["CEILING_EVENT_BYTES"] = len(data)
        log(f"ceiling: {results['CEILING_RECEIVED']}/{args.streams}; p50 {results.get('CEILING_P50', 0):.3f} s, "
            f"p99 {results.get('CEILING_P99', 0):.3f} s, last {results.get('CEILING_LAST', 0):.3f} s")
        await harness.close()
        return results
    finally:
        server.terminate()
        server.wait()


def write_results(path, results):
    with open(path, "w") as f:
        for key, value in results.items():
            f.write(f"{key}={value:.4f}\n" if isinstance(value, float) else f"{key}={value}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("herald")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--pid", type=int, required=True, help="the `herald serve` process")
    h.add_argument("--keys", required=True, help="the server's JWT keys directory")
    h.add_argument("--users", required=True, help="file of '<org> <user>' lines")
    h.add_argument("--streams", type=int, default=10000)
    h.add_argument("--rate", type=int, default=500)
    h.add_argument("--settle", type=float, default=5)
    h.add_argument("--idle", type=float, default=30)
    h.add_argument("--timeout", type=float, default=120)
    h.add_argument("--rounds", type=int, default=3, help="notifies to the same streams, one after the other")
    h.add_argument("--api-key", required=True)
    h.add_argument("--type", required=True)
    h.add_argument("--group", required=True)
    h.add_argument("--pg-host", default="127.0.0.1")
    h.add_argument("--pg-port", type=int, required=True)
    h.add_argument("--pg-user", required=True, help="user:password")
    h.add_argument("--pg-db", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--event-out", required=True, help="where to keep one notification.created data line (for the ceiling)")
    c = sub.add_parser("ceiling")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--streams", type=int, default=10000)
    c.add_argument("--rate", type=int, default=500)
    c.add_argument("--timeout", type=float, default=60)
    c.add_argument("--event", required=True, help="file holding one notification.created data line")
    c.add_argument("--out", required=True)
    s = sub.add_parser("serve-ceiling")
    s.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.command == "serve-ceiling":
        serve_ceiling(args)
    else:
        results = asyncio.run(bench_herald(args) if args.command == "herald" else bench_ceiling(args))
        write_results(args.out, results)


if __name__ == "__main__":
    main()
