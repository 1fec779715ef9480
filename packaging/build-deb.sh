#!/usr/bin/env bash
# Build dist/cellos-probed_<version>_<arch>.deb: a virtualenv of the daemon
# for Debian 12's /usr/bin/python3 at /opt/cellos-probed, the hardened unit,
# the default config (a conffile) and the docs, packed by nfpm.
#
# The virtualenv is built in a staging directory and then relocated: its
# scripts' shebangs and pyvenv.cfg are rewritten to /opt/cellos-probed
# (venvs are not relocatable otherwise), so building needs no write to /opt.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
NFPM=${NFPM:-$REPO/.venv/bin/nfpm}
PYTHON=${DEB_PYTHON:-/usr/bin/python3}
FINAL=/opt/cellos-probed
OUT=${1:-$REPO/dist}

[ -x "$PYTHON" ] || { echo "build-deb: $PYTHON not found (apt-get install python3 python3-venv)" >&2; exit 1; }
[ -x "$NFPM" ] || { echo "build-deb: nfpm not found at $NFPM (make setup)" >&2; exit 1; }

STAGE=$(mktemp -d /tmp/cellos-deb.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
VENV=$STAGE$FINAL
"$PYTHON" -m venv "$VENV"
# build from a clean copy of the sources: no stale build/ tree, no tests; setup.py
# builds the C extension (gcc, python3-dev), not an in-place one of `make setup`
mkdir -p "$STAGE/src"
cp -r "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/README.md" "$REPO/cellos_probed" "$STAGE/src/"
find "$STAGE/src/cellos_probed" -name '*.so' -delete
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir "$STAGE/src" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -I -c "import cellos_probed.probes._fc_sum, nats, trio, pyroute2, nftables" \
    || { echo "build-deb: the staged virtualenv is incomplete" >&2; exit 1; }
# pip itself is not needed at run time
"$VENV/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null 2>&1 || true

# relocate: every reference to the staging path becomes the final path
grep -rlI --null "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" | xargs -0 -r sed -i "s#$VENV#$FINAL#g"
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
"$VENV/bin/python" -m compileall -q -d "$FINAL/lib" "$VENV/lib" >/dev/null || true
if grep -rIl "$STAGE" "$VENV/bin" "$VENV/pyvenv.cfg"; then
    echo "build-deb: staging path left in the virtualenv" >&2; exit 1
fi

VERSION=$("$VENV/bin/python" -c "import cellos_probed; print(cellos_probed.__version__)")
DEB_ARCH=$(dpkg --print-architecture)
mkdir -p "$OUT"
# nfpm expands variables in few fields; fill the recipe in ourselves
sed -e "s#\${STAGE}#$STAGE#g" -e "s#\${REPO}#$REPO#g" -e "s#\${VERSION}#$VERSION#g" \
    -e "s#\${DEB_ARCH}#$DEB_ARCH#g" "$REPO/packaging/nfpm.yaml" > "$STAGE/nfpm.yaml"
"$NFPM" package --config "$STAGE/nfpm.yaml" --packager deb --target "$OUT" >&2
echo "$OUT/cellos-probed_${VERSION}_${DEB_ARCH}.deb"
