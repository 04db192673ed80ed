# Herald — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

DEV_PORT  ?= 54329
# The test ports sit below Linux's ephemeral range (32768–60999): after `make bench` (10 000
# client sockets) a port inside it could still be held in TIME_WAIT, and a test server could
# not bind it.
TEST_PORT ?= 24330
# The test peers (scripts/peers.py): SMTP and an HTTP receiver; `make run` starts a pair too,
# as a local mail catcher and webhook receiver.
TEST_SMTP_PORT ?= 24325
TEST_HTTP_PORT ?= 24326
DEV_SMTP_PORT  ?= 2525
DEV_HTTP_PORT  ?= 2526
HERALD    := .build/debug/herald

# With DATABASE_URL unset, `make run` uses a private cluster under .data/dev.
ifeq ($(strip $(DATABASE_URL)),)
RUN_DB_UP := db-up
export DATABASE_URL       := postgres://herald_app:herald_app@127.0.0.1:$(DEV_PORT)/herald
export DATABASE_OWNER_URL := postgres://herald_owner:herald_owner@127.0.0.1:$(DEV_PORT)/herald
export DATABASE_WORKER_URL := postgres://herald_worker:herald_worker@127.0.0.1:$(DEV_PORT)/herald
endif

help:
	@echo "make run      install what is missing, build, start PostgreSQL, migrate, seed, serve"
	@echo "make test     the whole suite against a private PostgreSQL it starts and stops"
	@echo "make bench    benchmarks against a private cluster and a release build (docs/benchmarks.md)"
	@echo "make db-up | db-down | db-reset | fmt | lint | spec"

deps:
	@scripts/install-deps.sh

build: deps
	swift build --product herald

db-up:
	@scripts/pg.sh up dev $(DEV_PORT)

db-down:
	@scripts/pg.sh down dev

db-reset: db-up
	@scripts/pg.sh recreate-db dev $(DEV_PORT) herald
	$(HERALD) migrate

jwt-key:
	@ls .data/jwt/*.pem >/dev/null 2>&1 || $(HERALD) jwt-keygen --dir .data/jwt
	@test -s .data/link-keys || (umask 077; echo "k1:$$(head -c 32 /dev/urandom | base64 -w0)" > .data/link-keys)

# Email goes to a local catcher (GET http://127.0.0.1:$(DEV_HTTP_PORT)/_mail lists it) unless
# HERALD_SMTP_URL says otherwise; webhooks to 127.0.0.1 are allowed for the walkthrough. Pages of
# other origins may not call the API unless HERALD_CORS_ORIGINS lists them (a local web app:
# HERALD_CORS_ORIGINS=http://localhost:5173 make run); never `*` here, beside the demo's known passwords.
run: build $(RUN_DB_UP) jwt-key
	$(HERALD) migrate
	$(HERALD) seed-demo
	@python3 scripts/peers.py --smtp 127.0.0.1:$(DEV_SMTP_PORT) --http 127.0.0.1:$(DEV_HTTP_PORT) --pidfile .data/peers.pid >/dev/null & \
	trap 'kill $$(cat .data/peers.pid 2>/dev/null) 2>/dev/null' EXIT; \
	HERALD_LINK_KEYS=$${HERALD_LINK_KEYS:-$$(cat .data/link-keys)} \
	HERALD_SMTP_URL=$${HERALD_SMTP_URL:-smtp://127.0.0.1:$(DEV_SMTP_PORT)} \
	HERALD_DESTINATIONS_ALLOW=$${HERALD_DESTINATIONS_ALLOW:-127.0.0.1/32} \
	HERALD_DEMO_PAGES=$${HERALD_DEMO_PAGES:-1} \
	HERALD_LOG_FORMAT=$${HERALD_LOG_FORMAT:-text} $(HERALD) serve

# The suite needs a database it can create and drop: always a private cluster, stopped after.
# Then scripts/contract.sh serves a freshly seeded database and checks it against openapi.yaml.
test: deps lint
	swift build --build-tests
	@scripts/pg.sh up test $(TEST_PORT)
	@scripts/pg.sh recreate-db test $(TEST_PORT) herald_test
	@set -e; rm -f .data/test-peers.pid; python3 scripts/peers.py --smtp 127.0.0.1:$(TEST_SMTP_PORT) --http 127.0.0.1:$(TEST_HTTP_PORT) \
	    --smtp-fail-rcpt-prefix fail- --pidfile .data/test-peers.pid >/dev/null & \
	trap 'kill $$(cat .data/test-peers.pid 2>/dev/null) 2>/dev/null; scripts/pg.sh down test' EXIT; \
	for i in $$(seq 50); do test -s .data/test-peers.pid && break; sleep 0.1; done; \
	export HERALD_TEST_SMTP_URL=smtp://127.0.0.1:$(TEST_SMTP_PORT); \
	export HERALD_TEST_RECEIVER_URL=http://127.0.0.1:$(TEST_HTTP_PORT); \
	export HERALD_TEST_BINARY=$(CURDIR)/$(HERALD); \
	export HERALD_TEST_DATABASE_URL=postgres://herald_app:herald_app@127.0.0.1:$(TEST_PORT)/herald_test; \
	export HERALD_TEST_OWNER_URL=postgres://herald_owner:herald_owner@127.0.0.1:$(TEST_PORT)/herald_test; \
	export HERALD_TEST_WORKER_URL=postgres://herald_worker:herald_worker@127.0.0.1:$(TEST_PORT)/herald_test; \
	DATABASE_OWNER_URL=$$HERALD_TEST_OWNER_URL $(HERALD) migrate; \
	HERALD_SQL_DIR=$(CURDIR)/sql swift test --skip-build; \
	scripts/pg.sh recreate-db test $(TEST_PORT) herald_contract; \
	DATABASE_URL=postgres://herald_app:herald_app@127.0.0.1:$(TEST_PORT)/herald_contract \
	DATABASE_OWNER_URL=postgres://herald_owner:herald_owner@127.0.0.1:$(TEST_PORT)/herald_contract \
	HERALD=$(HERALD) scripts/contract.sh --serve

bench: deps
	@scripts/bench.sh

spec:
	python3 -m openapi_spec_validator openapi.yaml
	python3 scripts/spec-routes.py

# The style is .swift-format's; `make test` fails on any difference, `make fmt` applies it.
FORMATTED := Sources Tests Package.swift sql/HeraldMigrations.swift
fmt:
	swift format format --in-place --recursive $(FORMATTED)

lint:
	swift format lint --strict --recursive $(FORMATTED)

.PHONY: help deps build db-up db-down db-reset jwt-key run test bench spec fmt lint
