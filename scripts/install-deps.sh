#!/usr/bin/env bash
# Installs what Herald needs and the machine lacks: Debian packages, then PyPI packages.
# Safe to run again; it only installs what is missing.
set -euo pipefail
# chromium: the bell page's browser test (Tests/HeraldIntegrationTests/BellPageTests.swift).
debs=(postgresql postgresql-contrib libargon2-dev libcurl4-openssl-dev libssl-dev wrk bc chromium)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Python: the suite reads openapi.yaml with PyYAML; `make spec` uses openapi-spec-validator.
# Debian's own package first (pip into the system Python is refused under PEP 668), then pip.
pip_install() {
  python3 -m pip install -q "$1" 2>/dev/null || python3 -m pip install -q --break-system-packages "$1"
}
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "install-deps: installing PyYAML"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-yaml >/dev/null 2>&1 || true
  python3 -c 'import yaml' 2>/dev/null || pip_install PyYAML
fi
# The test peers: a real SMTP server (aiosmtpd) and an independent Standard Webhooks verifier.
for module in aiosmtpd:aiosmtpd standardwebhooks:standardwebhooks; do
  if ! python3 -c "import ${module%%:*}" 2>/dev/null; then
    echo "install-deps: installing ${module##*:}"
    pip_install "${module##*:}"
  fi
done
if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
  echo "install-deps: installing openapi-spec-validator (for make spec)"
  pip_install openapi-spec-validator || echo "install-deps: openapi-spec-validator not installed; only 'make spec' needs it"
fi
# schemathesis checks the live server against openapi.yaml at the end of `make test`
# (scripts/contract.sh); its CLI is the 4.x one.
if ! python3 -c 'import schemathesis, sys; sys.exit(int(schemathesis.__version__.split(".")[0]) < 4)' 2>/dev/null; then
  echo "install-deps: installing schemathesis 4 (for the contract check in make test)"
  pip_install 'schemathesis>=4,<5'
fi
command -v swift >/dev/null || { echo "install-deps: Swift 6.2 or newer is needed (https://www.swift.org/install/linux/)" >&2; exit 1; }
