#!/usr/bin/env python3
"""A flooding integrator for `make bench`'s fairness row that behaves as a client library
should: CONNECTIONS connections each POST the body to /v1/events as fast as they are answered,
and after a 429 wait the `Retry-After` seconds the server asked for. (wrk, the other flood,
ignores Retry-After.)

Prints: requests accepted per second, requests refused, requests sent.

usage: bench_flood.py BASE_URL API_KEY BODY CONNECTIONS SECONDS
"""
import http.client
import sys
import threading
import time
import urllib.parse

base, key, body, connections, seconds = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4]), float(sys.argv[5])
url = urllib.parse.urlparse(base)
headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
counts = {"accepted": 0, "refused": 0}
lock = threading.Lock()
deadline = time.time() + seconds


def flood():
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    while time.time() < deadline:
        connection.request("POST", "/v1/events", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        with lock:
            counts["accepted" if response.status == 202 else "refused"] += 1
        if response.status == 429:
            time.sleep(min(float(response.getheader("Retry-After", "1")), max(0.0, deadline - time.time())))


threads = [threading.Thread(target=flood) for _ in range(connections)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(f"{counts['accepted'] / seconds:.0f} {counts['refused']} {counts['accepted'] + counts['refused']}")
