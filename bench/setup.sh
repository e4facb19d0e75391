#!/usr/bin/env bash
# What the benchmark needs beyond the project's venv, installed only when missing:
# wrk (Debian package), pgbench (ships with the PostgreSQL server), matplotlib (for the
# chart, into the project's venv as a bench-only dependency). Idempotent; needs root for apt.
set -euo pipefail
VENV=${VENV:-.venv}

if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi
if ! command -v pgbench >/dev/null 2>&1; then
  echo "bench: pgbench not found: it comes with the PostgreSQL server package (postgresql-NN)" >&2
  exit 1
fi
if ! command -v taskset >/dev/null 2>&1; then
  echo "bench: taskset not found (util-linux): load generators and service run unpinned" >&2
fi
if ! "$VENV/bin/python" -c "import matplotlib" >/dev/null 2>&1; then
  echo "bench: installing matplotlib into $VENV"
  "$VENV/bin/pip" install --quiet -c "$(dirname "$0")/../constraints.txt" "matplotlib>=3.8"
fi
