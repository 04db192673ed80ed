#!/usr/bin/env bash
# Installs what Herald needs and the machine lacks: Debian packages, then PyPI packages.
# Safe to run again; it only installs what is missing.
set -euo pipefail
debs=(postgresql postgresql-contrib libargon2-dev libcurl4-openssl-dev libssl-dev wrk bc)
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
pips=(openapi-spec-validator PyYAML)
for p in "${pips[@]}"; do
  python3 -c "import importlib.metadata as m; m.version('$p')" 2>/dev/null || {
    echo "install-deps: pip installing $p"
    python3 -m pip install -q "$p"
  }
done
command -v swift >/dev/null || { echo "install-deps: Swift 6.2 or newer is needed (https://www.swift.org/install/linux/)" >&2; exit 1; }
