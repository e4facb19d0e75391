#!/usr/bin/env bash
# Runs the workflows stack (infra/docker-stack.yml) on Docker Swarm; docs/deploy.md explains.
# Every subcommand can be run again: what already exists is left as it is.
set -euo pipefail

STACK=workflows
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_FILE=$ROOT/infra/docker-stack.yml
ENV_FILE=$ROOT/.env

usage() {
  cat <<EOF
usage: infra/stack.sh COMMAND

  deploy          join or start a swarm, create .env and the secrets if missing,
                  build the API image (unless API_IMAGE is set), deploy or update
  rm              remove the stack; volumes (the data) and secrets are kept
  status          the stack's services and tasks
  logs [SERVICE]  follow the logs of api (default), postgres or rabbitmq

Variables come from the environment first, then from .env (see .env.example).
EOF
}

die() { echo "stack.sh: $*" >&2; exit 1; }
say() { echo "stack.sh: $*"; }

require_engine() {
  command -v docker >/dev/null 2>&1 ||
    die "docker is not installed: install Docker Engine (or Docker Desktop) first"
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
    die "cannot reach the Docker engine${DOCKER_HOST:+ at $DOCKER_HOST}: is dockerd running, and may this user use it?"
}

swarm_state() { docker info --format '{{.Swarm.LocalNodeState}}'; }

require_swarm() {
  local state
  state=$(swarm_state)
  [ "$state" = active ] || die "this node is not in an active swarm (state: ${state:-none}): nothing is deployed"
}

ensure_swarm() {
  local state
  state=$(swarm_state)
  case $state in
    active) ;;
    inactive)
      say "starting a single-node swarm (docker swarm init)"
      docker swarm init ${SWARM_ADVERTISE_ADDR:+--advertise-addr "$SWARM_ADVERTISE_ADDR"} >/dev/null ;;
    *) die "the swarm is '$state' on this node: fix it (docker info) and run again" ;;
  esac
  [ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] ||
    die "this node is a swarm worker: run deploy on a manager"
}

ensure_env_file() {
  if [ ! -f "$ENV_FILE" ]; then
    cp "$ROOT/.env.example" "$ENV_FILE"
    chmod 600 "$ENV_FILE"
    say "created .env from .env.example"
  fi
}

env_value() {  # env_value NAME: the environment's value, else the last NAME= line of .env
  local name=$1
  if [ -n "${!name:-}" ]; then
    printf '%s' "${!name}"
  else
    sed -n "s/^$name=//p" "$ENV_FILE" | tail -n 1 | tr -d '\r'
  fi
}

set_env_value() {  # set_env_value NAME VALUE: replace (or append) NAME= in .env
  local tmp
  tmp=$(mktemp "$ENV_FILE.XXXXXX")
  awk -v name="$1" -v value="$2" '
    index($0, name "=") == 1 { print name "=" value; done = 1; next }
    { print }
    END { if (!done) print name "=" value }' "$ENV_FILE" >"$tmp"
  chmod 600 "$tmp"
  mv "$tmp" "$ENV_FILE"
}

password() {  # password NAME: its value, generated into .env when empty
  local name=$1 value
  value=$(env_value "$name")
  if [ -z "$value" ]; then
    value=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    set_env_value "$name" "$value"
    say "generated $name and wrote it to .env" >&2
  fi
  [[ $value =~ ^[A-Za-z0-9._~-]+$ ]] ||
    die "$name may hold only letters, digits and . _ ~ - (it goes into a URL as is)"
  printf '%s' "$value"
}

ensure_secret() {  # ensure_secret NAME VALUE: create the swarm secret unless it exists
  if docker secret inspect "$1" >/dev/null 2>&1; then
    return 0
  fi
  printf '%s' "$2" | docker secret create "$1" - >/dev/null
  say "created secret $1"
}

ensure_secrets() {
  local pg_user pg_db pg_pass mq_user mq_pass version
  pg_user=$(env_value POSTGRES_USER); pg_user=${pg_user:-workflows}
  pg_db=$(env_value POSTGRES_DB); pg_db=${pg_db:-workflows}
  mq_user=$(env_value RABBITMQ_USER); mq_user=${mq_user:-workflows}
  pg_pass=$(password POSTGRES_PASSWORD)
  mq_pass=$(password RABBITMQ_PASSWORD)
  version=$(env_value SECRETS_VERSION); version=${version:-1}
  ensure_secret "workflows_postgres_password_v$version" "$pg_pass"
  ensure_secret "workflows_rabbitmq_password_v$version" "$mq_pass"
  ensure_secret "workflows_database_url_v$version" "postgresql://$pg_user:$pg_pass@postgres:5432/$pg_db"
  ensure_secret "workflows_rabbitmq_url_v$version" "amqp://$mq_user:$mq_pass@rabbitmq:5672/%2F"
}

export_env_file() {  # every NAME=value of .env not already in the environment, for interpolation
  local line name
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    [[ $line =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
    name=${BASH_REMATCH[1]}
    [ -n "${!name+set}" ] || export "$name=${BASH_REMATCH[2]}"
  done <"$ENV_FILE"
}

build_image() {  # sets API_IMAGE to a fresh local tag, so each deploy rolls the API
  local commit
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo dev)
  if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then
    commit="$commit-dirty-$(date +%s)"
  fi
  export API_IMAGE="workflows:$commit"
  say "building $API_IMAGE"
  docker build -f "$ROOT/infra/Dockerfile" -t "$API_IMAGE" \
    --build-arg WORKFLOWS_COMMIT="$commit" "$ROOT"
  if [ "$(docker node ls --quiet | wc -l)" -gt 1 ]; then
    say "warning: $API_IMAGE exists on this node only; other nodes need API_IMAGE from a registry" >&2
  fi
}

deploy() {
  require_engine
  ensure_swarm
  ensure_env_file
  ensure_secrets
  export_env_file
  local args=(--compose-file "$STACK_FILE" --prune)
  if [ -n "${API_IMAGE:-}" ]; then
    args+=(--with-registry-auth)
  else
    build_image
    args+=(--resolve-image never)
  fi
  if docker stack deploy --help 2>/dev/null | grep -q -- '--detach'; then
    args+=(--detach=false)  # wait until the services converge (Docker 26+)
  fi
  say "deploying stack $STACK with $API_IMAGE"
  docker stack deploy "${args[@]}" "$STACK"
  docker stack services "$STACK"
}

main() {
  [ $# -ge 1 ] || { usage >&2; exit 2; }
  local command=$1
  shift
  case $command in
    deploy) [ $# -eq 0 ] || { usage >&2; exit 2; }; deploy ;;
    rm) [ $# -eq 0 ] || { usage >&2; exit 2; }
      require_engine; require_swarm; docker stack rm "$STACK" ;;
    status) [ $# -eq 0 ] || { usage >&2; exit 2; }
      require_engine; require_swarm
      docker stack services "$STACK"
      docker stack ps "$STACK" \
        --format 'table {{.Name}}\t{{.Image}}\t{{.Node}}\t{{.DesiredState}}\t{{.CurrentState}}\t{{.Error}}' ;;
    logs) [ $# -le 1 ] || { usage >&2; exit 2; }
      case ${1:-api} in api | postgres | rabbitmq) ;; *) usage >&2; exit 2 ;; esac
      require_engine; require_swarm
      docker service logs --follow --tail 200 "${STACK}_${1:-api}" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
