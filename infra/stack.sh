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

  deploy          join or start a swarm, create .env, its passwords and API token and
                  the secrets if missing, build the API image (unless API_IMAGE is
                  set), deploy or update
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

api_tokens() {  # API_TOKENS: its value, one token generated into .env when it has none
  local value token position=0 valid='^[A-Za-z0-9._~+/-]{16,}=*$' any=
  value=$(env_value API_TOKENS)
  [[ $value != *$'\n'* ]] || die "API_TOKENS: comma-separated on one line, not one token a line"
  while IFS= read -r token; do  # as the API does: comma-separated, blanks around ignored
    token=${token#"${token%%[![:space:]]*}"}
    token=${token%"${token##*[![:space:]]}"}
    [ -n "$token" ] || continue
    position=$((position + 1)) any=1
    [[ $token =~ $valid ]] ||  # never show the token itself
      die "API_TOKENS: token $position must be at least 16 characters of A-Z a-z 0-9 - . _ ~ + / (e.g. from openssl rand -hex 32)"
  done < <(printf '%s\n' "$value" | tr , '\n')
  if [ -z "$any" ]; then
    value=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')  # 64 hex digits, as openssl rand -hex 32
    set_env_value API_TOKENS "$value"
    say "generated API_TOKENS (the API's bearer token) and wrote it to .env" >&2
  fi
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
  local pg_user pg_db pg_pass mq_user mq_pass tokens version tokens_version
  pg_user=$(env_value POSTGRES_USER); pg_user=${pg_user:-workflows}
  pg_db=$(env_value POSTGRES_DB); pg_db=${pg_db:-workflows}
  mq_user=$(env_value RABBITMQ_USER); mq_user=${mq_user:-workflows}
  pg_pass=$(password POSTGRES_PASSWORD)
  mq_pass=$(password RABBITMQ_PASSWORD)
  tokens=$(api_tokens)
  version=$(env_value SECRETS_VERSION); version=${version:-1}
  tokens_version=$(env_value API_TOKENS_VERSION); tokens_version=${tokens_version:-1}
  ensure_secret "workflows_postgres_password_v$version" "$pg_pass"
  ensure_secret "workflows_rabbitmq_password_v$version" "$mq_pass"
  ensure_secret "workflows_database_url_v$version" "postgresql://$pg_user:$pg_pass@postgres:5432/$pg_db"
  ensure_secret "workflows_rabbitmq_url_v$version" "amqp://$mq_user:$mq_pass@rabbitmq:5672/%2F"
  ensure_secret "workflows_api_tokens_v$tokens_version" "$tokens"
}

usage_hint() {  # how to call the API; the token stays where it is, never in this output
  local where=$1 env_file
  env_file=$(printf '%q' "$ENV_FILE")
  say "the API wants 'Authorization: Bearer <token>', a token of API_TOKENS ($where), e.g.:"
  if [ "$where" = "in .env" ]; then
    # shellcheck disable=SC2016 # printed for the operator to run, not expanded here
    printf '  curl -H "Authorization: Bearer $(sed -n %s %s | tail -n 1 | cut -d, -f1)" http://127.0.0.1:%s/workflow\n' \
      "'s/^API_TOKENS=//p'" "$env_file" "${API_PORT:-5000}"
  else
    # shellcheck disable=SC2016
    printf '  curl -H "Authorization: Bearer ${API_TOKENS%%%%,*}" http://127.0.0.1:%s/workflow\n' "${API_PORT:-5000}"
  fi
  say "changing API_TOKENS takes a new secret: raise API_TOKENS_VERSION, deploy (docs/deploy.md)"
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

ensure_data_node() {  # PostgreSQL and RabbitMQ run on the one node labelled for their volumes
  local labelled
  labelled=$(docker node ls --quiet --filter node.label=workflows.data=true | wc -l)
  if [ "$labelled" -eq 0 ]; then
    say "labelling this node workflows.data=true: PostgreSQL and RabbitMQ (and their volumes) stay on it"
    docker node update --label-add workflows.data=true "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
  elif [ "$labelled" -gt 1 ]; then
    say "error: $labelled nodes have the label workflows.data=true; PostgreSQL's volume is on one of them only" >&2
    exit 1
  fi
}

build_image() {  # sets API_IMAGE to a fresh local tag, so each deploy rolls the API
  local commit
  # A tag that names this build: a fixed one ("dev", when git could not say) left the
  # service spec unchanged, and Swarm kept the old containers running.
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "nogit-$(date +%s)")
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
  local tokens_from="in .env"
  [ -z "${API_TOKENS:-}" ] || tokens_from="from the environment"
  ensure_secrets
  ensure_data_node
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
  usage_hint "$tokens_from"
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
