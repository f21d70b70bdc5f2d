#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine, idempotently:
# the Python virtualenv with the package (which generates the gRPC code from protos/).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: need Python >= 3.11 (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv || {
        echo "setup: python3 -m venv failed; on Debian: apt-get install python3-venv" >&2
        exit 1
    }
fi
stamp=.venv/.devmodel-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "setup: installing Python packages"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    touch "$stamp"
fi
# The generated code follows the .proto files, also between installs.
if [ ! -f devmodel/v1/devmodel_pb2.py ] || [ -n "$(find protos -name '*.proto' -newer devmodel/v1/devmodel_pb2.py)" ]; then
    .venv/bin/python -m protos.generate
fi

# QEMU >= 10.1 (trixie-backports, in a debootstrap tree) and the guest image
# (Debian's kernel and a busybox initramfs), both cached under
# ${XDG_CACHE_HOME:-~/.cache}/devmodel. Installing QEMU needs root once;
# without it, the guest tests skip and say why.
if [ "$(id -u)" = 0 ] || .venv/bin/python -c 'import sys; from vmm_client.qemu.provision import load_tree; sys.exit(load_tree() is None)'; then
    .venv/bin/python -m vmm_client.qemu provision
    .venv/bin/python -m vmm_client.guest build
else
    echo "setup: not root and no QEMU tree cached: skipping QEMU and the guest image (run once as root)" >&2
fi
