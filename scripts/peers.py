#!/usr/bin/env python3
"""Test peers for the integration tests: one fake SMTP server + one fake HTTP
webhook receiver, in a single process.

Usage:

    python3 peers.py --smtp 127.0.0.1:PORT --http 127.0.0.1:PORT
                     [--pidfile FILE]
                     [--smtp-fail-rcpt-prefix fail-]
                     [--smtp-tempfail-rcpt-prefix tempfail-]

Runs until SIGTERM/SIGINT, then shuts both servers down, removes the pidfile
and exits with status 0.  When both servers are listening it prints one line
"peers ready smtp=HOST:PORT http=HOST:PORT pid=N" to stdout and writes the
pidfile (written atomically, so its existence means "ready").  An HTTP port
of 0 picks a free port (see the ready line); the SMTP port must be explicit.

Requires Python 3.11, aiosmtpd and standardwebhooks.

SMTP server
-----------
Accepts every message (many per session are fine) and keeps it in memory as

    {"mail_from": str, "rcpt_tos": [str, ...],
     "data": str,            # raw message, utf-8 decoded (surrogateescape)
     "received_at": float}   # epoch seconds

Failure simulation (RCPT TO only; the local part is matched):
  * --smtp-fail-rcpt-prefix P      local part starting with P
                                   -> "550 5.1.1 mailbox unavailable"
  * --smtp-tempfail-rcpt-prefix T  local part starting with T
                                   -> "451 4.3.0 try again later"
    T defaults to "tempfail-" when --smtp-fail-rcpt-prefix is given, and is
    disabled otherwise.  T is checked before P.
A message is stored with its accepted recipients only; if no recipient was
accepted, aiosmtpd rejects DATA and nothing is stored.

HTTP server (HTTP/1.1, keep-alive, chunked request bodies accepted)
-------------------------------------------------------------------
<name> is [A-Za-z0-9._-]+.  JSON answers have Content-Type application/json.

POST /hooks/<name>     Record {"time", "method", "path" (with query),
                       "headers" (dict, lower-cased names), "body" (str),
                       "status" (the status we answered)} under <name>, then
                       answer per <name>'s config (default: 200, body "ok").
PUT  /_config/<name>   JSON body, all keys optional:
                         {"fail_times": 0, "fail_status": 500,
                          "retry_after": null, "status": 200,
                          "delay_ms": 0, "body": "ok"}
                       After this PUT, the first fail_times requests to
                       /hooks/<name> get fail_status (body "fail", plus a
                       Retry-After header if retry_after is set), the rest get
                       status/body.  delay_ms sleeps before every answer (the
                       request is recorded on arrival).  Unknown keys -> 400.
                       Examples: {"status": 410} (always 410);
                       {"fail_times": 2, "fail_status": 503, "retry_after": "3"}
GET  /_requests/<name> JSON list of recorded requests, arrival order.
GET  /_ids/<name>      {"total": n, "unique": distinct webhook-id values,
                        "duplicates": {id: count} for ids seen > 1 time,
                        "inconsistent": [ids whose deliveries had different
                                         bodies],
                        "missing": requests without a webhook-id header}
POST /_verify          {"name": ..., "secret": "whsec_...", "index": optional}
                       Verifies every (or the one) recorded request of <name>
                       with standardwebhooks Webhook(secret).verify(body,
                       headers) (timestamps older than 5 minutes fail).
                       -> {"verified": n_ok, "failed": [{"index", "error"}]}
POST /sink             200 "ok", only counted (throughput benchmarks).
GET  /_sink            {"count": n}
GET  /_mail[?rcpt=A]   JSON list of stored messages (having recipient A,
                       compared case-insensitively, <> optional).
GET  /_mail/count      {"count": n}
GET  /_health          200 "ok"
POST /_reset           Forget everything (requests, configs, mail, sink).
Anything else: 404 (405 if the path exists with another method).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from aiosmtpd.controller import Controller
from standardwebhooks.webhooks import Webhook

NAME = r"(?P<name>[A-Za-z0-9._-]+)"

DEFAULT_CONFIG = {
    "fail_times": 0,
    "fail_status": 500,
    "retry_after": None,
    "status": 200,
    "delay_ms": 0,
    "body": "ok",
}


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _norm_addr(addr: str) -> str:
    return addr.strip().strip("<>").lower()


# --------------------------------------------------------------------------
# Shared state
# --------------------------------------------------------------------------

class Store:
    """All recorded state; every access goes through one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests: dict[str, list[dict]] = {}
        self.configs: dict[str, dict] = {}
        self.served: dict[str, int] = {}   # hooks answered since last PUT
        self.mail: list[dict] = []
        self.sink = 0


# --------------------------------------------------------------------------
# SMTP
# --------------------------------------------------------------------------

class MailHandler:
    """aiosmtpd handler: stores every message, optionally rejects RCPTs."""

    def __init__(self, store: Store, fail_prefix: str | None,
                 tempfail_prefix: str | None) -> None:
        self.store = store
        self.fail_prefix = fail_prefix
        self.tempfail_prefix = tempfail_prefix

    async def handle_RCPT(self, server, session, envelope, address,
                          rcpt_options):
        local = address.rsplit("@", 1)[0]
        if self.tempfail_prefix and local.startswith(self.tempfail_prefix):
            return "451 4.3.0 try again later"
        if self.fail_prefix and local.startswith(self.fail_prefix):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        msg = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),  # e.g. SMTPUTF8
            "data": _decode(raw),
            "received_at": time.time(),
        }
        with self.store.lock:
            self.store.mail.append(msg)
        return "250 OK"


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class BadRequest(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "peers/1"
    wbufsize = -1                   # buffer the response, flushed once
    disable_nagle_algorithm = True
    store: Store                    # set on the subclass in make_http_server

    def log_message(self, format, *args):   # noqa: A002 - quiet by design
        pass

    # ---- plumbing -------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass                            # skip trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)              # CRLF after chunk
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:
            # The sender went away mid-request (e.g. killed): nothing was delivered, record nothing.
            raise ConnectionResetError("request body cut short")
        return body

    def _reply(self, status: int, body: bytes | str = b"",
               ctype: str = "text/plain; charset=utf-8",
               headers: dict | None = None) -> None:
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status in (204, 304):
            body = b""
        else:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._reply(status, json.dumps(obj), "application/json")

    def _json_body(self, raw: bytes) -> dict:
        try:
            obj = json.loads(raw or b"{}")
        except ValueError as e:
            raise BadRequest(f"invalid JSON: {e}")
        if not isinstance(obj, dict):
            raise BadRequest("JSON body must be an object")
        return obj

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        path = split.path
        try:
            body = self._read_body() if self.command in ("POST", "PUT") else b""
        except ValueError:
            self.close_connection = True
            return self._reply(400, "bad body framing")
        allowed = False
        for method, pattern, func in ROUTES:
            m = pattern.fullmatch(path)
            if not m:
                continue
            if method != self.command:
                allowed = True
                continue
            try:
                return func(self, body, split.query, **m.groupdict())
            except BadRequest as e:
                return self._json({"error": str(e)}, 400)
        self._reply(405 if allowed else 404,
                    "method not allowed" if allowed else "not found")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

    # ---- endpoints ------------------------------------------------------

    def sink(self, body, query):
        with self.store.lock:
            self.store.sink += 1
        self._reply(200, b"ok")

    def get_sink(self, body, query):
        with self.store.lock:
            n = self.store.sink
        self._json({"count": n})

    def health(self, body, query):
        self._reply(200, b"ok")

    def reset(self, body, query):
        with self.store.lock:
            self.store.reset()
        self._reply(200, b"ok")

    def hook(self, body, query, name):
        st = self.store
        with st.lock:
            cfg = st.configs.get(name, DEFAULT_CONFIG)
            n = st.served.get(name, 0)
            st.served[name] = n + 1
            failing = n < cfg["fail_times"]
            status = cfg["fail_status"] if failing else cfg["status"]
            st.requests.setdefault(name, []).append({
                "time": time.time(),
                "method": self.command,
                "path": self.path,
                "headers": self._headers_dict(),
                "body": _decode(body),
                "status": status,
            })
        if cfg["delay_ms"]:
            time.sleep(cfg["delay_ms"] / 1000.0)
        extra = {}
        if failing and cfg["retry_after"] is not None:
            extra["Retry-After"] = cfg["retry_after"]
        self._reply(status, "fail" if failing else cfg["body"], headers=extra)

    def _headers_dict(self) -> dict:
        out: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out

    def put_config(self, body, query, name):
        obj = self._json_body(body)
        unknown = set(obj) - set(DEFAULT_CONFIG)
        if unknown:
            raise BadRequest(f"unknown config keys: {sorted(unknown)}")
        cfg = {**DEFAULT_CONFIG, **obj}
        for key in ("fail_times", "fail_status", "status"):
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool):
                raise BadRequest(f"{key} must be an integer")
        for key in ("fail_status", "status"):
            if not 200 <= cfg[key] <= 599:
                raise BadRequest(f"{key} must be 200..599")
        if cfg["fail_times"] < 0:
            raise BadRequest("fail_times must be >= 0")
        if not isinstance(cfg["delay_ms"], (int, float)) or cfg["delay_ms"] < 0:
            raise BadRequest("delay_ms must be a number >= 0")
        if not isinstance(cfg["body"], str):
            raise BadRequest("body must be a string")
        if cfg["retry_after"] is not None:
            cfg["retry_after"] = str(cfg["retry_after"])
        with self.store.lock:
            self.store.configs[name] = cfg
            self.store.served[name] = 0
        self._json(cfg)

    def get_requests(self, body, query, name):
        with self.store.lock:
            reqs = list(self.store.requests.get(name, []))
        self._json(reqs)

    def get_ids(self, body, query, name):
        with self.store.lock:
            reqs = list(self.store.requests.get(name, []))
        counts: dict[str, int] = {}
        bodies: dict[str, set] = {}
        missing = 0
        for r in reqs:
            wid = r["headers"].get("webhook-id")
            if wid is None:
                missing += 1
                continue
            counts[wid] = counts.get(wid, 0) + 1
            bodies.setdefault(wid, set()).add(r["body"])
        self._json({
            "total": len(reqs),
            "unique": len(counts),
            "duplicates": {k: c for k, c in counts.items() if c > 1},
            "inconsistent": [k for k, b in bodies.items() if len(b) > 1],
            "missing": missing,
        })

    def verify(self, body, query):
        obj = self._json_body(body)
        name, secret = obj.get("name"), obj.get("secret")
        if not isinstance(name, str) or not isinstance(secret, str):
            raise BadRequest('need {"name": str, "secret": str}')
        try:
            wh = Webhook(secret)
        except Exception as e:
            raise BadRequest(f"bad secret: {type(e).__name__}: {e}")
        with self.store.lock:
            reqs = list(self.store.requests.get(name, []))
        indices = range(len(reqs))
        if obj.get("index") is not None:
            i = obj["index"]
            if not isinstance(i, int) or not 0 <= i < len(reqs):
                raise BadRequest(f"index out of range (have {len(reqs)})")
            indices = [i]
        ok, failed = 0, []
        for i in indices:
            try:
                wh.verify(reqs[i]["body"], reqs[i]["headers"], json_parse=False)
                ok += 1
            except Exception as e:
                failed.append({"index": i, "error": f"{type(e).__name__}: {e}"})
        self._json({"verified": ok, "failed": failed})

    def get_mail(self, body, query):
        rcpt = parse_qs(query).get("rcpt", [None])[0]
        with self.store.lock:
            mail = list(self.store.mail)
        if rcpt is not None:
            want = _norm_addr(rcpt)
            mail = [m for m in mail
                    if any(_norm_addr(r) == want for r in m["rcpt_tos"])]
        self._json(mail)

    def mail_count(self, body, query):
        with self.store.lock:
            n = len(self.store.mail)
        self._json({"count": n})


ROUTES = [(method, re.compile(pattern), func) for method, pattern, func in [
    ("POST", r"/sink", Handler.sink),
    ("POST", rf"/hooks/{NAME}", Handler.hook),
    ("GET", r"/_sink", Handler.get_sink),
    ("GET", r"/_health", Handler.health),
    ("POST", r"/_reset", Handler.reset),
    ("PUT", rf"/_config/{NAME}", Handler.put_config),
    ("GET", rf"/_requests/{NAME}", Handler.get_requests),
    ("GET", rf"/_ids/{NAME}", Handler.get_ids),
    ("POST", r"/_verify", Handler.verify),
    ("GET", r"/_mail", Handler.get_mail),
    ("GET", r"/_mail/count", Handler.mail_count),
]]


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: a sender opening 32 or more keep-alive connections at
    # once overflowed it, and some of its first requests were reset (a real receiver's backlog
    # is in the hundreds: nginx 511, the kernel's somaxconn 4096).
    request_queue_size = 512

    def handle_error(self, request, client_address):
        # Benchmark clients (wrk) reset keep-alive connections when done;
        # that is not worth a traceback.  Anything else is reported briefly.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):
            print(f"peers: error serving {client_address}: {exc!r}",
                  file=sys.stderr)


def make_http_server(host: str, port: int, store: Store) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"store": store})
    return QuietHTTPServer((host, port), handler)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smtp", type=host_port, required=True)
    p.add_argument("--http", type=host_port, required=True)
    p.add_argument("--pidfile")
    p.add_argument("--smtp-fail-rcpt-prefix")
    p.add_argument("--smtp-tempfail-rcpt-prefix")
    args = p.parse_args(argv)
    tempfail = args.smtp_tempfail_rcpt_prefix
    if tempfail is None and args.smtp_fail_rcpt_prefix:
        tempfail = "tempfail-"

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    store = Store()
    smtp_host, smtp_port = args.smtp
    controller = Controller(
        MailHandler(store, args.smtp_fail_rcpt_prefix, tempfail),
        hostname=smtp_host, port=smtp_port,
        enable_SMTPUTF8=True)
    controller.start()
    http = make_http_server(*args.http, store)
    http_thread = threading.Thread(target=http.serve_forever, args=(0.1,),
                                   name="http", daemon=True)
    http_thread.start()

    try:
        if args.pidfile:
            tmp = f"{args.pidfile}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, args.pidfile)
        http_host, http_port = http.server_address[:2]
        print(f"peers ready smtp={smtp_host}:{smtp_port} "
              f"http={http_host}:{http_port} pid={os.getpid()}", flush=True)
        while not stop.wait(0.2):
            pass
    finally:
        http.shutdown()
        http.server_close()
        controller.stop()
        if args.pidfile:
            try:
                os.remove(args.pidfile)
            except FileNotFoundError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
