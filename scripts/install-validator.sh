#!/usr/bin/env bash
# Build the FHIR R4 reference validator the tests run over what the gateway produces
# (tools/validator: HAPI FHIR's instance validator, offline). The build is cached under
# $GATEWAY_VALIDATOR_CACHE (default ~/.cache/alliance-gateway/validator)/<hash of the pom and
# sources>, so a second run is instant. Needs a JDK 17+ and Maven (installed from Debian if
# missing) and Maven Central (first run only). Prints the cache directory on its last line:
#   java -cp "$DIR/classes:$DIR/lib/*" alliance.validator.Main [--profiles DIR] FILE|DIR|-
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/tools/validator"
CACHE="${GATEWAY_VALIDATOR_CACHE:-$HOME/.cache/alliance-gateway/validator}"

log() { echo "[install-validator] $*" >&2; }

hash="$(cd "$SRC" && find pom.xml src -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
out="$CACHE/$hash"
if [[ -f "$out/ok" ]]; then
    log "cached at $out"
    echo "$out"
    exit 0
fi

if ! command -v mvn >/dev/null || ! command -v javac >/dev/null; then
    log "installing maven and a JDK from Debian"
    SUDO=""
    if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq maven openjdk-17-jdk-headless >&2
fi

log "building the validator (first run only; downloads HAPI FHIR from Maven Central)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$SRC/pom.xml" "$SRC/src" "$work/"
(cd "$work" && mvn -q -B package -DskipTests >&2)
mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.build.XXXXXX")"
cp -r "$work/target/classes" "$tmp/classes"
cp -r "$work/target/lib" "$tmp/lib"
touch "$tmp/ok"
rm -rf "$out"
mv "$tmp" "$out"
# Earlier builds (other sources) are 150 MB each: keep only this one.
find "$CACHE" -mindepth 1 -maxdepth 1 -type d ! -name "$hash" ! -name '.build.*' -exec rm -rf {} +
log "built into $out"
echo "$out"
