#!/usr/bin/env bash
# Bring up Apptainer for tests/test_containers.py: Debian sid packages Apptainer
# (1.4.x) and this Debian does not, so it runs from a sid root file system made
# with debootstrap, entered with unshare + pivot_root. Needs root.
#
#   tests/container/bringup.sh BIN_DIR     # makes ROOT once, writes BIN_DIR/apptainer, prints its version
#
# BIN_DIR/apptainer is a shim for the host's PATH (Snakemake calls `apptainer`):
# it enters ROOT with the host's working folders bound at the same paths and
# runs ROOT's apptainer with the same arguments and environment. `apptainer
# build` runs there as an unprivileged user with --fakeroot (see below).
#
# ROOT is FTFLOW_APPTAINER_ROOT (default /var/lib/ftflow-apptainer/root); it is
# kept and reused, and must lie outside every bound folder. The bound folders
# are FTFLOW_APPTAINER_BIND_SAME (colon-separated; default: those of /home
# /root /tmp /var/tmp /work /srv /mnt /data that exist) plus, at each call, the
# current folder and FTFLOW_APPTAINER_EXTRA_BINDS. A bind source given to
# `apptainer build --bind` is a path inside ROOT: bind its host folder so. Facts this setup relies on (checked on Debian 12
# hosts run as root in a sandbox):
#  - `debootstrap --variant=minbase sid` takes about a minute; the sid mirror's
#    Release file can be older than its Valid-Until, so apt in ROOT ignores it;
#  - under chroot Apptainer refuses ("weak chrooted environment"): pivot_root;
#  - `apptainer build` as root stops in %post: the sandbox lacks
#    CAP_SYS_RESOURCE. As a non-root user with /etc/subuid and /etc/subgid
#    entries, `apptainer build --fakeroot` works, %post included;
#  - `apptainer exec` as root needs `root default capabilities = no`;
#  - `Bootstrap: docker` needs Docker Hub; `Bootstrap: debootstrap` from
#    deb.debian.org works (containers/Apptainer-debian.def).
set -euo pipefail

bin_dir=${1:?usage: bringup.sh BIN_DIR}
root=${FTFLOW_APPTAINER_ROOT:-/var/lib/ftflow-apptainer/root}
apt_opts="-o Acquire::Check-Valid-Until=false -o Acquire::Retries=3"
packages="apptainer debootstrap python3 ca-certificates util-linux"

if [[ $(id -u) -ne 0 ]]; then
    echo "bringup.sh: needs root (debootstrap, unshare --mount, pivot_root)" >&2
    exit 2
fi
mkdir -p "$bin_dir"
bin_dir=$(cd "$bin_dir" && pwd)
default_binds=""
for d in /home /root /tmp /var/tmp /work /srv /mnt /data; do
    [[ -d $d ]] && default_binds="$default_binds${default_binds:+:}$d"
done
binds=${FTFLOW_APPTAINER_BIND_SAME:-$default_binds}
IFS=: read -ra bind_list <<< "$binds"
for d in "${bind_list[@]}"; do
    case "$root/" in "$d"/*)
        echo "bringup.sh: ROOT $root lies inside the bound folder $d; set FTFLOW_APPTAINER_ROOT elsewhere" >&2
        exit 2 ;;
    esac
done

if [[ ! -x $root/usr/bin/apptainer ]]; then
    command -v debootstrap > /dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    }
    mkdir -p "$(dirname "$root")"
    # debootstrap into a side folder first, so a killed run never leaves a half root in place
    if [[ ! -x $root/bin/bash ]]; then
        rm -rf "$root.partial"
        debootstrap --variant=minbase sid "$root.partial" http://deb.debian.org/debian
        rm -rf "$root"
        mv "$root.partial" "$root"
    fi
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" bash -c "apt-get $apt_opts update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get $apt_opts install -y -qq --no-install-recommends $packages"
    sed -i 's/^root default capabilities = .*/root default capabilities = no/' "$root/etc/apptainer/apptainer.conf"
    # builds run as this user, with a subordinate id range for --fakeroot
    chroot "$root" bash -c 'id builder > /dev/null 2>&1 || useradd -m -d /var/lib/builder -u 1000 builder
        grep -q "^builder:" /etc/subuid || echo builder:100000:65536 >> /etc/subuid
        grep -q "^builder:" /etc/subgid || echo builder:100000:65536 >> /etc/subgid'
fi
# the host's resolver may change between runs
cp /etc/resolv.conf "$root/etc/resolv.conf"

cat > "$bin_dir/apptainer.tmp" <<SHIM
#!/usr/bin/env bash
# apptainer from $root (written by tests/container/bringup.sh): the host's working
# folders are bound there at the same paths, so the paths Snakemake hands over hold.
#   apptainer exec|run|shell|inspect|... as usual (as root, in ROOT)
#   apptainer build [--bind SRC[:DST]]... OUT.sif DEF [--build-arg K=V]...
#       runs as ROOT's user builder with --fakeroot; OUT is written by root afterwards
set -euo pipefail
root=$root
binds="$binds"
exec "$bin_dir/apptainer-enter" "\$root" "\$binds" "\$@"
SHIM
chmod 755 "$bin_dir/apptainer.tmp"
mv "$bin_dir/apptainer.tmp" "$bin_dir/apptainer"
cp "$(dirname "$0")/enter.sh" "$bin_dir/apptainer-enter.tmp"
chmod 755 "$bin_dir/apptainer-enter.tmp"
mv "$bin_dir/apptainer-enter.tmp" "$bin_dir/apptainer-enter"
"$bin_dir/apptainer" --version
