#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, when it is
# missing: Debian's mosquitto broker and clients, libfaketime, chromium, Python paho-mqtt and
# prometheus-client (pinned),
# MQTT.js for node (pinned in tests/interop/mqttjs/package-lock.json), and
# cargo-nextest / cargo-fuzz. Idempotent and quick when all is present.
set -euo pipefail

# What the build itself needs (a C++ compiler, libclang).
"$(dirname "$0")/install-build-deps.sh"

PAHO_VERSION=2.1.0
PROMETHEUS_CLIENT_VERSION=0.21.1
CARGO_FUZZ_VERSION=0.13.1

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_packages=()
command -v mosquitto_pub >/dev/null || apt_packages+=(mosquitto-clients)
command -v mosquitto_sub >/dev/null || apt_packages+=(mosquitto-clients)
# The broker: the bridge's uplink tests start private instances of it on
# free loopback ports (they never use the system service the package starts
# on port 1883). mosquitto_passwd comes with it.
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || apt_packages+=(mosquitto)
command -v stdbuf >/dev/null || apt_packages+=(coreutils)
# openssl s_client: the TLS listener tests check which versions complete a
# handshake.
command -v openssl >/dev/null || apt_packages+=(openssl)
# libfaketime: the state topic tests run a node whose wall clock is an hour
# behind.
command -v faketime >/dev/null || apt_packages+=(faketime)
# Headless chromium: the status page test loads the page in a real browser.
command -v chromium >/dev/null || apt_packages+=(chromium)
# node and npm: MQTT.js is the WebSocket listener tests' client.
command -v node >/dev/null || apt_packages+=(nodejs)
command -v npm >/dev/null || apt_packages+=(npm)
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${apt_packages[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"
fi

if ! python3 -c "import paho.mqtt, sys; sys.exit(paho.mqtt.__version__ != '$PAHO_VERSION')" 2>/dev/null; then
  echo "install-test-deps: pip install paho-mqtt==$PAHO_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "paho-mqtt==$PAHO_VERSION"
fi

if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('prometheus-client') != '$PROMETHEUS_CLIENT_VERSION')" 2>/dev/null; then
  echo "install-test-deps: pip install prometheus-client==$PROMETHEUS_CLIENT_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "prometheus-client==$PROMETHEUS_CLIENT_VERSION"
fi

mqttjs_dir="$(cd "$(dirname "$0")/.." && pwd)/tests/interop/mqttjs"
mqttjs_version=$(sed -n 's/.*"mqtt": "\(.*\)".*/\1/p' "$mqttjs_dir/package.json")
if ! node -e "process.exit(require('$mqttjs_dir/node_modules/mqtt/package.json').version === '$mqttjs_version' ? 0 : 1)" 2>/dev/null; then
  echo "install-test-deps: npm ci (MQTT.js $mqttjs_version) in tests/interop/mqttjs"
  npm ci --prefix "$mqttjs_dir" --no-audit --no-fund --loglevel=error
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-test-deps: cargo install cargo-nextest"
  cargo install --locked cargo-nextest
fi

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "install-test-deps: cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
  # Its own target dir: installing must not evict the project's build.
  CARGO_TARGET_DIR="${HOME}/.cache/ferrymq/install-target" \
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
