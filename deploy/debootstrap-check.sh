#!/usr/bin/env bash
# Proves the image's runtime package list (deploy/runtime-packages.txt, what
# deploy/Containerfile installs) without a container registry: a fresh Debian bookworm root
# made with debootstrap, exactly those packages installed into it, and percept's binary run
# there in a chroot on a synthetic test source (video + audio through GStreamer) and on the
# tiny Gemma 4 fixture with `percept model run`. Run by hand as root, from the repository:
#   sudo deploy/debootstrap-check.sh [BINARY]      (default target/release/percept)
# Minutes of downloads from Debian's archive; not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/percept}
ROOT=${ROOT:-/var/tmp/percept-debootstrap}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS=$(cat deploy/runtime-packages.txt)
[ -x "$BIN" ] || { echo "debootstrap-check: no binary at $BIN (cargo build --release)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "debootstrap-check: apt-get install debootstrap" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "debootstrap-check: run as root (debootstrap, chroot)" >&2; exit 2; }

cleanup() { umount "$ROOT/proc" 2>/dev/null || true; }
trap cleanup EXIT
if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  rm -rf "$ROOT"
  echo "== debootstrap --variant=minbase bookworm $ROOT"
  debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >/tmp/percept-debootstrap.log 2>&1 \
    || { tail -20 /tmp/percept-debootstrap.log; exit 1; }
fi
mount -t proc proc "$ROOT/proc"
echo "== apt-get install --no-install-recommends $PKGS"
chroot "$ROOT" apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive chroot "$ROOT" apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
echo "== installed: $(chroot "$ROOT" dpkg-query -W -f '${Package}\n' | wc -l) packages," \
  "$(du -sh --exclude=proc "$ROOT" | cut -f1) root"
# No compiler, no development package came in with them.
if chroot "$ROOT" dpkg-query -W -f '${Package}\n' | grep -E -- '-dev$|^(gcc|g\+\+|cpp|clang|rustc|cargo)(-[0-9]+)?$'; then
  echo "debootstrap-check: FAIL: build packages in the runtime set" >&2; exit 1
fi
install -D -m 0755 "$BIN" "$ROOT/usr/local/bin/percept"
rm -rf "$ROOT/fixture" && mkdir -p "$ROOT/fixture" && cp -r crates/gemma4/tests/fixtures/gemma4/model "$ROOT/fixture/model"
missing=$(chroot "$ROOT" ldd /usr/local/bin/percept | grep 'not found' || true)
[ -z "$missing" ] || { echo "debootstrap-check: FAIL: unresolved libraries:"; echo "$missing"; exit 1; } >&2
echo "== ldd: every library resolved ($(chroot "$ROOT" ldd /usr/local/bin/percept | wc -l) libraries)"

echo "== percept run on a test source (video + audio, 3 s)"
chroot "$ROOT" env -i PATH=/usr/bin:/bin HOME=/tmp /usr/local/bin/percept run --no-http --no-model \
  --source 'cam=test:?video=smpte&audio=sine&width=320&height=240&fps=10&duration=3&live=false' \
  --fps 2 --events /tmp/events.jsonl 2>/tmp/percept-run.log || { cat /tmp/percept-run.log; exit 1; }
grep '"kind":"summary"' "$ROOT/tmp/events.jsonl" | head -1
grep -q '"frames_analyzed":[1-9]' "$ROOT/tmp/events.jsonl" || { echo "FAIL: no frame analysed" >&2; exit 1; }
grep -q '"kind":"audio"' "$ROOT/tmp/events.jsonl" || { echo "FAIL: no audio analysed" >&2; exit 1; }

echo "== percept model run on the tiny fixture"
chroot "$ROOT" env -i PATH=/usr/bin:/bin HOME=/tmp /usr/local/bin/percept model run \
  --model /fixture/model --prompt 'Describe the weather in Paris today.' --max-tokens 8 --json
echo "== OK: the runtime packages run percept in a bare Debian bookworm root"
