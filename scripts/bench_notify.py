#!/usr/bin/env python3
"""One notify for `make bench`: POST /v1/events to a group, then, when the audience was above
the synchronous limit (the answer has `fanout`), GET /v1/events/{id} every 50 ms until every
chunk is written. Samples the server's resident memory meanwhile.

Prints: seconds to the 202, seconds until every row is committed, the server's peak memory
growth in MB, the event id. Exits non-zero when the answer or the final counts are wrong.

usage: bench_notify.py BASE_URL API_KEY GROUP MEMBERS SERVER_PID ANSWER_FILE
"""
import json
import sys
import threading
import time
import urllib.request

base, key, group, members, pid, answer_file = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]


def rss_kib():
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def call(method, path, body=None):
    request = urllib.request.Request(
        base + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.status, json.loads(response.read())


before = rss_kib()
peak = before
done = threading.Event()


def sample():
    global peak
    while not done.is_set():
        peak = max(peak, rss_kib())
        time.sleep(0.05)


sampler = threading.Thread(target=sample)
sampler.start()
start = time.time()
status, answer = call("POST", "/v1/events", {"type": "BENCH", "audience": {"groups": [group]}, "payload": {"isq": 25}})
accepted = time.time() - start
json.dump(answer, open(answer_file, "w"))
if status != 202:
    sys.exit(f"bench: notify answered {status}: {answer}")
event = answer["event_id"]
counts = answer["counts"]
if "fanout" in answer:
    while True:
        _, event_body = call("GET", f"/v1/events/{event}")
        if event_body["fanout"]["state"] != "EXPANDING":
            break
        time.sleep(0.05)
    if event_body["fanout"]["state"] != "DONE":
        sys.exit(f"bench: the fan-out ended {event_body['fanout']}")
    counts = event_body["counts"]
committed = time.time() - start
done.set()
sampler.join()
if counts["in_app"] != members:
    sys.exit(f"bench: {counts['in_app']} in-app rows for {members} members: {counts}")
print(f"{accepted:.3f} {committed:.3f} {(peak - before) / 1024:.0f} {event}")
