#!/usr/bin/env bash
# Builds and runs ferrymq, passing on its arguments; with none it runs on
# its embedded defaults (MQTT on 127.0.0.1:1883, data in ./ferrymq-data).
# Installs what the build needs first when it is missing (see
# install-build-deps.sh). The first build takes 10 to 30 minutes on 2
# cores, most of it RocksDB's C++; later runs start at once.
#
#   scripts/run.sh                           # the embedded defaults
#   scripts/run.sh --config ferrymq.toml
#   FERRYMQ_PROFILE=dev scripts/run.sh ...   # a debug build (CI uses it)
set -euo pipefail
# Relative paths in the arguments (and the data directory) stay relative
# to where it was started.
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/install-build-deps.sh"
manifest=(--manifest-path "$root/Cargo.toml" --locked --bin ferrymq)
case "${FERRYMQ_PROFILE:-release}" in
  release) exec cargo run --release "${manifest[@]}" -- "$@" ;;
  dev) exec cargo run "${manifest[@]}" -- "$@" ;;
  *) echo "FERRYMQ_PROFILE: release or dev, not ${FERRYMQ_PROFILE}" >&2; exit 2 ;;
esac
