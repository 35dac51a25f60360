#!/usr/bin/env bash
# Install the real services the production profile and its tests use:
#   - Kubo (IPFS), built from the Go module proxy inside a throwaway tools module
#   - nats-server, built the same way (JetStream)
#   - redis-server, from Debian
#   - PostgreSQL (the production profile's search index), from Debian; the test harness runs
#     its own cluster (initdb into the services directory) as the OS user ``postgres`` when root
# Binaries are cached by version under $GATEWAY_TOOLS_DIR (default ~/.cache/alliance-gateway/bin),
# so a second run does not rebuild. Prints the directory holding the binaries on its last line.
set -euo pipefail

# v0.43.1 (named in DESIGN.md) replaces go-libp2p with a fork the module proxy does not serve
# (403), so it cannot be built here; v0.42.0 has no replace directive and builds as is.
KUBO_VERSION="${KUBO_VERSION:-v0.42.0}"
NATS_VERSION="${NATS_VERSION:-v2.15.1}"
TOOLS_DIR="${GATEWAY_TOOLS_DIR:-$HOME/.cache/alliance-gateway/bin}"
mkdir -p "$TOOLS_DIR"

log() { echo "[install-services] $*" >&2; }

build_go_tool() {
    # build_go_tool NAME MODULE VERSION PACKAGE
    local name="$1" module="$2" version="$3" package="$4"
    local out="$TOOLS_DIR/$name-$version"
    if [[ -x "$out" ]]; then
        log "$name $version cached at $out"
    else
        log "building $name $version from the Go module proxy (first run only; several minutes)"
        local work
        work="$(mktemp -d)"
        (
            cd "$work"
            go mod init tools >/dev/null 2>&1
            # A tools module does not inherit the replace directives of the module it builds
            # (Kubo replaces go-libp2p with a patched fork), so copy them over first.
            local gomod
            gomod="$(go mod download -json "$module@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
            python3 - "$gomod" <<'PY' | while read -r rep; do go mod edit "-replace=$rep"; done
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"^replace\s*\((.*?)^\)", text, re.S | re.M)
lines = [l for b in blocks for l in b.splitlines()]
lines += re.findall(r"^replace\s+([^(].*)$", text, re.M)
for line in lines:
    line = line.split("//")[0].strip()
    m = re.match(r"(\S+)(?:\s+\S+)?\s*=>\s*(\S+)\s+(\S+)$", line)
    if m:
        print(f"{m.group(1)}={m.group(2)}@{m.group(3)}")
PY
            GOFLAGS=-mod=mod go get "$package@$version" >&2
            CGO_ENABLED=0 go build -trimpath -o "$out.tmp" "$package" >&2
        )
        mv "$out.tmp" "$out"
        rm -rf "$work"
        log "$name built: $out"
    fi
    ln -sf "$out" "$TOOLS_DIR/$name"
}

build_go_tool ipfs github.com/ipfs/kubo "$KUBO_VERSION" github.com/ipfs/kubo/cmd/ipfs
build_go_tool nats-server github.com/nats-io/nats-server/v2 "$NATS_VERSION" github.com/nats-io/nats-server/v2

if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server from Debian"
    if [[ "$(id -u)" == 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >&2
    # Debian's package starts a system redis on 6379; our tests use their own port and process.
fi
ln -sf "$(command -v redis-server)" "$TOOLS_DIR/redis-server"
ln -sf "$(command -v redis-cli)" "$TOOLS_DIR/redis-cli"

if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    log "installing postgresql from Debian"
    if [[ "$(id -u)" == 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
    # Debian's package may start a system cluster on 5432; tests run their own on another port.
fi
PG_BIN="$(dirname "$(ls -d /usr/lib/postgresql/*/bin/postgres | sort -V | tail -1)")"
for tool in initdb postgres pg_ctl; do ln -sf "$PG_BIN/$tool" "$TOOLS_DIR/$tool"; done

echo "$TOOLS_DIR"
