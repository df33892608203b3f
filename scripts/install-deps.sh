#!/usr/bin/env bash
# Installs what moongate needs to build, run and test on Debian 12 (run as root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# LuaJIT comes in two Debian builds whose -dev packages conflict. Where OpenResty's runtime
# (libluajit2-5.1-2, which nginx's Lua module depends on) or its -dev package is installed, use
# libluajit2-5.1-dev: installing libluajit-5.1-dev there would remove the operator's nginx module.
lua_dev=libluajit-5.1-dev
for pkg in libluajit2-5.1-2 libluajit2-5.1-dev; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        lua_dev=libluajit2-5.1-dev
    fi
done
# The tests start their own redis-server on a free loopback port; the Debian package's service is
# not needed, so a redis-server installed here (not one that was already) is stopped again.
fresh_redis=1
if dpkg-query -W -f='${Status}' redis-server 2>/dev/null | grep -q 'install ok installed'; then
    fresh_redis=0
fi
apt-get install -y -qq --no-install-recommends \
    build-essential cmake pkg-config ca-certificates \
    libssh2-1-dev libssl-dev libuv1-dev "$lua_dev" libwebsockets-dev libcmocka-dev libhttp-parser-dev libwslay-dev libjansson-dev libhiredis-dev \
    openssh-server openssh-client curl clang libclang-rt-14-dev \
    dpkg-dev adduser systemd strace haproxy redis-server >/dev/null
if [ "$fresh_redis" = 1 ]; then
    { systemctl disable --now redis-server || service redis-server stop; } >/dev/null 2>&1 || true
fi
# The tests run the real openai and ollama npm clients against the gateway (tests/sdk).
if ! command -v npm >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
echo "install-deps: done"
