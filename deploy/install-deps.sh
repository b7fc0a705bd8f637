#!/usr/bin/env bash
# Installs what percept needs on Debian 12: GStreamer (runtime, plugins, development files,
# RTSP server library), and the tools the tests use to make media and check metrics.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  pkg-config build-essential \
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev \
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav \
  espeak-ng ffmpeg prometheus procps python3 mosquitto mosquitto-clients chromium >/dev/null
if ! command -v cargo >/dev/null; then
  echo "percept: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
