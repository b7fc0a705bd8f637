#!/usr/bin/env bash
# Installs what percept needs on Debian 12: GStreamer (runtime, plugins, development files,
# RTSP server library), and the tools the tests use to make media and check metrics.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# One list, shared with .ci/run.
$SUDO apt-get install -y -qq --no-install-recommends \
  $(cat "$(dirname "$0")/debian-packages.txt") >/dev/null
if ! command -v cargo >/dev/null; then
  echo "percept: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
