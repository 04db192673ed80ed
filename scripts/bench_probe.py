#!/usr/bin/env python3
"""A steady client for `make bench`'s fairness row: POST the body to /v1/events RATE times a
second for SECONDS seconds, one request at a time, and print the p50 and p95 latency in ms and
how many answers were not 202.

usage: bench_probe.py BASE_URL API_KEY BODY RATE SECONDS
"""
import http.client
import sys
import time
import urllib.parse

base, key, body, rate, seconds = sys.argv[1], sys.argv[2], sys.argv[3].encode(), float(sys.argv[4]), float(sys.argv[5])
url = urllib.parse.urlparse(base)
connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
latencies, refused = [], 0
start = time.time()
next_at = start
while time.time() - start < seconds:
    time.sleep(max(0.0, next_at - time.time()))
    next_at += 1 / rate
    sent = time.time()
    connection.request("POST", "/v1/events", body=body, headers=headers)
    response = connection.getresponse()
    response.read()
    latencies.append((time.time() - sent) * 1000)
    if response.status != 202:
        refused += 1
latencies.sort()
p50 = latencies[len(latencies) // 2]
p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
print(f"{p50:.1f} {p95:.1f} {refused} {len(latencies)}")
