#!/usr/bin/env bash
# The README's test command: installs the servers the tests start (redis-server,
# redis-sentinel, redis-cli) and openssl when they are missing, then runs the whole
# suite with every feature. Extra arguments go to `cargo test`.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh --test redis    # one test file
#
# Installing uses apt-get (Debian, Ubuntu), with sudo when not root. Elsewhere it stops
# and names what to install; no test is ever skipped for a missing server.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)

if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: the tests need these programs, which are not installed: ${missing[*]}" >&2
        echo "Install Redis (with redis-sentinel and redis-cli) and OpenSSL with your package" >&2
        echo "manager (e.g. 'brew install redis openssl'), then run this script again." >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "error: need root (or sudo) to run: apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
        sudo="sudo"
    fi
    echo "== installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

redis-server --version
openssl version

exec cargo test --all-features "$@"
