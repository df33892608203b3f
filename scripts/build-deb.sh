#!/usr/bin/env bash
# Builds the Debian package from this tree: moongate_VERSION_ARCH.deb in OUTDIR (default: the
# current directory). A build tree of its own (BUILD_DIR, default build-deb) with the prefix
# /usr, no tests, and /etc/moongate laid out (MG_PACKAGE). Needs what scripts/install-deps.sh
# installs (dpkg-dev for the shared-library dependencies).
#   scripts/build-deb.sh [OUTDIR]          then: apt-get install ./moongate_*.deb
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-.}" && cd "${1:-.}" && pwd)"
build="${BUILD_DIR:-$src/build-deb}"

cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=/usr \
    -DMG_TESTS=OFF -DMG_PACKAGE=ON >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null
(cd "$build" && cpack -G DEB -B "$out" >/dev/null)
rm -rf "$out/_CPack_Packages"
ls "$out"/moongate_*.deb
