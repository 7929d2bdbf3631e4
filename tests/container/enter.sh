#!/usr/bin/env bash
# enter.sh ROOT BINDS APPTAINER_ARGS...: run ROOT's apptainer in a private mount
# namespace whose root is ROOT (pivot_root), with each folder of BINDS and of
# FTFLOW_APPTAINER_EXTRA_BINDS (colon-separated) and the current folder bound at
# the same path. The
# environment passes through (Apptainer hands it to the container), but PATH is
# ROOT's. `build` runs as ROOT's user builder with --fakeroot; its image is
# written to a temporary file and moved to the asked path by root.
set -euo pipefail
root=$1 binds=$2
shift 2
here=$PWD
# more host folders for this call only (e.g. a wheel folder or a CA bundle's folder a build binds)
IFS=: read -ra bind_list <<< "$binds${FTFLOW_APPTAINER_EXTRA_BINDS:+:$FTFLOW_APPTAINER_EXTRA_BINDS}"
covered=false
for d in "${bind_list[@]}"; do
    case "$here/" in "$d"/*) covered=true ;; esac
done
$covered || bind_list+=("$here")

build_out="" build_tmp=""
args=("$@")
if [[ ${args[0]:-} == build ]]; then
    # the first operand of `build` is the image to write; builder writes a temporary one
    i=1
    while ((i < ${#args[@]})); do
        case "${args[i]}" in
            -B | --bind | --build-arg | --build-arg-file | --section | --arch | --mount | --sandbox-dir) i=$((i + 2)) ;;
            -*) i=$((i + 1)) ;;
            *) break ;;
        esac
    done
    build_out=${args[i]:?apptainer build: no image path given}
    case "$build_out" in /*) ;; *) build_out=$here/$build_out ;; esac
    build_tmp=$(mktemp -d /tmp/ftflow-apptainer-build.XXXXXX)
    chmod 777 "$build_tmp"
    args[i]=$build_tmp/image.sif
    args=(build --fakeroot "${args[@]:1}")
fi

# shellcheck disable=SC2016
unshare --mount --fork bash -c '
    set -e
    root=$1 here=$2 build_tmp=$3 nbinds=$4
    shift 4
    binds=("${@:1:nbinds}")
    shift "$nbinds"
    mount --make-rprivate /
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    tmp_bound=false
    for d in "${binds[@]}"; do
        [[ -d $d ]] || continue
        [[ $d == /tmp ]] && tmp_bound=true
        mkdir -p "$root$d"
        mount --rbind "$d" "$root$d"
    done
    $tmp_bound || mount -t tmpfs -o size=8g tmpfs "$root/tmp"
    cd "$root"
    mkdir -p oldroot
    pivot_root . oldroot
    umount -l /oldroot
    cd "$here"
    export PATH=/usr/sbin:/usr/bin:/sbin:/bin
    if [[ -n $build_tmp ]]; then
        exec setpriv --reuid=builder --regid=builder --init-groups env HOME=/var/lib/builder apptainer "$@"
    fi
    exec apptainer "$@"
' enter "$root" "$here" "$build_tmp" "${#bind_list[@]}" "${bind_list[@]}" "${args[@]}" && rc=0 || rc=$?
if [[ -n $build_tmp ]]; then
    if ((rc == 0)); then
        mkdir -p "$(dirname "$build_out")"
        mv -f "$build_tmp/image.sif" "$build_out"
    fi
    rm -rf "$build_tmp"
fi
exit "$rc"
