# Shared set-up for scripts/demo and scripts/test (sourced, not run).
# Installs the system packages fastpunch needs, then builds a wheel of this
# checkout and installs it into .venv, so everything runs against the
# installed build and never against the source tree.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTPUNCH_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ "$(id -u)" -ne 0 ]; then
  echo "fastpunch: run this as root (sudo $0): it installs system packages and creates" \
       "network namespaces, raw sockets and nftables tables" >&2
  exit 77
fi

# Debian/Ubuntu packages: netfilter userland and library, capture oracle,
# ffmpeg for the demo's camera and the video checks,
# compilers for the extension and the C fuzz harness, and whatever the lab
# tests list (tests/*/REQUIREMENTS-apt.txt).
APT_PACKAGES="nftables libnftables1 conntrack iproute2 tshark tcpdump gcc clang python3-dev python3-venv ffmpeg"
for req in "$ROOT"/tests/*/REQUIREMENTS-apt.txt; do
  [ -f "$req" ] && APT_PACKAGES="$APT_PACKAGES $(grep -v '^#' "$req" | tr '\n' ' ')"
done
missing=""
for pkg in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "== apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The lab's upnp gateway needs miniupnpd >= 2.3.9 (Debian 12 ships 2.3.1).
"$ROOT/scripts/build-miniupnpd"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null

echo "== building the wheel"
rm -rf "$ROOT/dist"
"$VENV/bin/python" -m pip wheel -q --no-deps -w "$ROOT/dist" "$ROOT"
WHEEL="$(ls "$ROOT"/dist/fastpunch-*.whl)"
echo "== installing $(basename "$WHEEL")"
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL"
"$VENV/bin/python" -m pip install -q "$WHEEL[$EXTRAS]"
