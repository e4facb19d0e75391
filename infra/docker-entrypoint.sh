#!/bin/sh
# Image entrypoint: export DATABASE_URL, RABBITMQ_URL and API_TOKENS from Docker secrets,
# then run `workflows "$@"`. The app reads plain environment variables only; Swarm hands
# secrets over as files, so this bridges the two.
#
# For each NAME in DATABASE_URL, RABBITMQ_URL, API_TOKENS the value comes from, first found:
#   1. the file named by NAME_FILE (an error if it is set but unreadable);
#   2. /run/secrets/<name in lower case>, e.g. /run/secrets/database_url;
#   3. NAME itself, as given to the container.
set -eu

load_secret() {  # load_secret NAME EXPLICIT_FILE DEFAULT_FILE
    name=$1 file=$2
    if [ -n "$file" ]; then
        if [ ! -r "$file" ]; then
            echo "docker-entrypoint: ${name}_FILE=$file is not a readable file" >&2
            exit 1
        fi
    elif [ -r "$3" ]; then
        file=$3
    else
        return 0
    fi
    value=$(cat "$file")  # $(...) drops the trailing newline `docker secret create` keeps
    export "$name=$value"
}

load_secret DATABASE_URL "${DATABASE_URL_FILE:-}" /run/secrets/database_url
load_secret RABBITMQ_URL "${RABBITMQ_URL_FILE:-}" /run/secrets/rabbitmq_url
load_secret API_TOKENS "${API_TOKENS_FILE:-}" /run/secrets/api_tokens
unset DATABASE_URL_FILE RABBITMQ_URL_FILE API_TOKENS_FILE value

exec workflows "$@"
