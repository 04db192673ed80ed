#!/usr/bin/env bash
# Checks the live server against openapi.yaml with schemathesis (issue 8, item 10).
#
#   scripts/contract.sh BASE_URL   against a running server; it CHANGES ITS DATA (every
#                                  operation is called with generated values: users renamed and
#                                  deactivated, keys revoked, categories deleted), so only
#                                  against a scratch database
#   scripts/contract.sh --serve    starts `herald serve` on a free port against DATABASE_URL
#                                  (migrated with DATABASE_OWNER_URL, seeded with seed-demo),
#                                  runs the check, stops the server (what `make test` does)
#
# Credentials: CONTRACT_USER_TOKEN (a user's access JWT, for /v1/me and /v1/me/*) and
# CONTRACT_API_KEY (for everything else). Whatever is missing is made from the demo
# organisation (`herald seed-demo`): the owner logs in, and a throwaway API key with the owner
# role is created for this run and revoked afterwards, so every operation is reachable and the
# seeded key is left alone.
#
# The run fails on any 5xx, a response that breaks its schema, an undeclared status or content
# type, or a request the schema allows that the server rejects (400/422). It is bounded
# (CONTRACT_MAX_EXAMPLES per operation, and killed after CONTRACT_TIMEOUT seconds per pass) and
# repeatable (schemathesis's deterministic mode, or CONTRACT_SEED=n for a different, still
# repeatable, random search; no --max-time, which repeats the fuzzing until the time is spent).
# CONTRACT_ARGS adds schemathesis options, e.g. `--continue-on-failure`.
# The stateful phase is off: it chains real ids into destructive calls (revoking the run's own
# key, deactivating the owner) and its sequences are not repeatable.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXAMPLES=${CONTRACT_MAX_EXAMPLES:-15}
TIMEOUT=${CONTRACT_TIMEOUT:-240}
# One worker: hypothesis's lambda-source parsing is not thread-safe on Python 3.11 (random AST errors).
WORKERS=${CONTRACT_WORKERS:-1}
REPORT_DIR=$(realpath -m "${CONTRACT_REPORT_DIR:-.data/contract}")
ORGANISATION=${CONTRACT_ORGANISATION:-demo}
EMAIL=${CONTRACT_EMAIL:-admin@demo.example}
PASSWORD=${CONTRACT_PASSWORD:-demo-admin-password}
HERALD=${HERALD:-.build/debug/herald}
# CONTRACT_CHECKS replaces the list (the last two check 405 + Allow on undeclared methods).
CHECKS=${CONTRACT_CHECKS:-not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,positive_data_acceptance,unsupported_method,allow_header_conformance}

die() { echo "contract: $*" >&2; exit 1; }
python3 -c "import schemathesis" 2>/dev/null || die "schemathesis is not installed; run scripts/install-deps.sh"

server_pid=""
key_id=""
cleanup() {
  if [ -n "$key_id" ] && [ -n "${CONTRACT_USER_TOKEN:-}" ]; then
    curl -s -o /dev/null -X DELETE "$BASE_URL/v1/api-keys/$key_id" -H "authorization: Bearer $CONTRACT_USER_TOKEN" || true
  fi
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if [ "${1:-}" = "--serve" ]; then
  : "${DATABASE_URL:?contract: --serve needs DATABASE_URL (the app role) and DATABASE_OWNER_URL}"
  : "${DATABASE_OWNER_URL:?contract: --serve needs DATABASE_OWNER_URL to migrate}"
  mkdir -p "$REPORT_DIR"
  jwt_dir=$(mktemp -d)
  trap 'cleanup; rm -rf "$jwt_dir"' EXIT
  "$HERALD" jwt-keygen --dir "$jwt_dir" >/dev/null
  port=${CONTRACT_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  export HERALD_JWT_KEYS_DIR=$jwt_dir HERALD_HOST=127.0.0.1 HERALD_PORT=$port
  # The API only: no delivery workers (events fan out into the outbox and stay there).
  export HERALD_WORKERS=0 DATABASE_WORKER_URL=
  # Endpoints the run creates point at a local address (CONTRACT_RECEIVER), which the SSRF guard must let through.
  export HERALD_DESTINATIONS_ALLOW=127.0.0.1/32
  export HERALD_ACCESS_TOKEN_TTL=3600 HERALD_LOG_LEVEL=${HERALD_LOG_LEVEL:-warning}
  # Cheap password hashes: the run logs in once, schemathesis many times with wrong passwords.
  export HERALD_ARGON2_ITERATIONS=1 HERALD_ARGON2_MEMORY_KIB=8192
  "$HERALD" migrate >/dev/null
  "$HERALD" seed-demo >/dev/null
  DATABASE_OWNER_URL= "$HERALD" serve 2>"$REPORT_DIR/server.log" &
  server_pid=$!
  BASE_URL=http://127.0.0.1:$port
  for _ in $(seq 100); do
    curl -sf "$BASE_URL/readyz" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || die "herald serve exited; see $REPORT_DIR/server.log"
    sleep 0.2
  done
  curl -sf "$BASE_URL/readyz" >/dev/null || die "herald serve is not ready on $BASE_URL"
else
  BASE_URL=${1:?usage: scripts/contract.sh BASE_URL | --serve}
  BASE_URL=${BASE_URL%/}
  mkdir -p "$REPORT_DIR"
fi

json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

if [ -z "${CONTRACT_USER_TOKEN:-}" ]; then
  login=$(python3 -c 'import json, sys; print(json.dumps(dict(zip(["organisation", "email", "password"], sys.argv[1:]))))' \
    "$ORGANISATION" "$EMAIL" "$PASSWORD")
  CONTRACT_USER_TOKEN=$(curl -sf -X POST "$BASE_URL/v1/auth/token" -H 'content-type: application/json' -d "$login" | json_field access_token) \
    || die "could not log in as $EMAIL in '$ORGANISATION' (run herald seed-demo, or set CONTRACT_USER_TOKEN)"
fi
if [ -z "${CONTRACT_API_KEY:-}" ]; then
  owner_role=$(curl -sf "$BASE_URL/v1/roles" -H "authorization: Bearer $CONTRACT_USER_TOKEN" \
    | python3 -c 'import json, sys; print(next(r["id"] for r in json.load(sys.stdin)["items"] if r["key"] == "owner"))') \
    || die "could not find the owner role"
  created=$(curl -sf -X POST "$BASE_URL/v1/api-keys" -H "authorization: Bearer $CONTRACT_USER_TOKEN" \
    -H 'content-type: application/json' -d "{\"name\":\"contract-check\",\"role_id\":\"$owner_role\"}") \
    || die "could not create the run's API key"
  key_id=$(json_field id <<<"$created")
  CONTRACT_API_KEY=$(json_field secret <<<"$created")
fi

# Test data the schema cannot describe (scripts/contract_hooks.py): what exists in the
# organisation, a webhook receiver the server accepts, and the credentials' own ids to protect.
CONTRACT_FIXTURES=$(BASE_URL=$BASE_URL USER_TOKEN=$CONTRACT_USER_TOKEN API_KEY=$CONTRACT_API_KEY KEY_ID=$key_id \
  RECEIVER=${CONTRACT_RECEIVER:-http://127.0.0.1:9/contract} python3 - <<'PY'
import json, os, urllib.request

def get(path, token=os.environ["USER_TOKEN"]):
    request = urllib.request.Request(os.environ["BASE_URL"] + path, headers={"authorization": "Bearer " + token})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)

def post(path, body):
    request = urllib.request.Request(os.environ["BASE_URL"] + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"authorization": "Bearer " + os.environ["USER_TOKEN"], "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)

# A group for imports to add users to (the demo has none), protected like the credentials.
groups = [g for g in get("/v1/groups?limit=100")["items"] if g["key"] == "contract-import"] \
    or [post("/v1/groups", {"key": "contract-import", "name": "Contract import"})]
# Built-in roles cannot be deleted; the categories and types used are protected like the credentials.
roles = [r for r in get("/v1/roles")["items"] if r["builtin"]]
categories, types = get("/v1/categories")["items"], get("/v1/notification-types")["items"]
me, key = get("/v1/me"), get("/v1/me", os.environ["API_KEY"])
print(json.dumps({
    "categories": [c["key"] for c in categories],
    "critical_categories": [c["key"] for c in categories if c.get("critical")],
    "types": [t["key"] for t in types],
    "permissions": [p["key"] for p in get("/v1/permissions")["items"]],
    "role_ids": [r["id"] for r in roles],
    "role_keys": [r["key"] for r in roles],
    "users": [u["id"] for u in get("/v1/users?limit=20")["items"]],
    "group_ids": [g["id"] for g in groups],
    "protect": [v for v in (me.get("user_id"), key.get("api_key_id"), os.environ["KEY_ID"]) if v]
               + [c["id"] for c in categories] + [t["id"] for t in types] + [g["id"] for g in groups],
    "receiver": os.environ["RECEIVER"],
}))
PY
) || die "could not read the organisation's categories, types, roles and users"
export CONTRACT_FIXTURES

# /v1/me and everything under it act as the calling user; the rest as the key.
ME='^/v1/me(/|$)'
# No U+0000 in generated text: openapi.yaml says once, for every string, that Herald refuses it
# (400; PostgreSQL cannot store it), rather than a pattern on each of them.
# Drawn page cursors are swapped for well-formed ones (scripts/contract_hooks.py says why).
export SCHEMATHESIS_HOOKS=$PWD/scripts/contract_hooks.py
common=("$PWD/openapi.yaml" --url "$BASE_URL" --checks "$CHECKS" --phases examples,coverage,fuzzing
  --max-examples "$MAX_EXAMPLES" --workers "$WORKERS"
  --request-timeout 10 --no-color --generation-allow-x00 false
  --suppress-health-check all ${CONTRACT_ARGS:-})
if [ -n "${CONTRACT_SEED:-}" ]; then common+=(--seed "$CONTRACT_SEED" --generation-database none); else common+=(--generation-deterministic); fi
status=0
# schemathesis as a module, not its script, which a user-level pip install may leave off PATH.
check_as() {
  local name=$1 token=$2; shift 2
  echo "contract: $BASE_URL as the $name"
  local rc=0
  timeout "$TIMEOUT" python3 -m schemathesis.cli run "${common[@]}" "$@" -H "Authorization: Bearer $token" \
    --report junit --report-junit-path "$REPORT_DIR/${name%% *}.xml" || rc=$?
  [ "$rc" = 124 ] && echo "contract: the $name pass took longer than ${TIMEOUT}s and was stopped" >&2
  [ "$rc" = 0 ] || status=1
}
# Run inside the report directory: schemathesis and hypothesis keep their caches in the working directory.
cd "$REPORT_DIR"
# The live stream and socket never end by themselves (a request timeout is all schemathesis would
# see); StreamTests covers them against a live server, on both transports.
check_as "user (/v1/me, /v1/me/*)" "$CONTRACT_USER_TOKEN" --include-path-regex "$ME" \
  --exclude-path-regex '^/v1/me/notifications/(stream|socket)$'
check_as "key (everything else)" "$CONTRACT_API_KEY" --exclude-path-regex "$ME"
cd - >/dev/null
# A credential lost mid-run would have turned the rest into 401s, which the checks accept.
for token in "$CONTRACT_USER_TOKEN" "$CONTRACT_API_KEY"; do
  curl -sf -o /dev/null "$BASE_URL/v1/me" -H "authorization: Bearer $token" \
    || { echo "contract: a credential of the run stopped working during it; the results are incomplete" >&2; status=1; }
done
[ "$status" = 0 ] && echo "contract: clean" || echo "contract: failures above (JUnit reports in $REPORT_DIR)" >&2
exit "$status"
