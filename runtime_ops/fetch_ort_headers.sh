#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers from Debian's `libonnxruntime-dev`
# package (trixie) and unpack them into a directory of the build tree.
#
#   fetch_ort_headers.sh DEST_DIR
#
# On success DEST_DIR/include contains onnxruntime_c_api.h (and the C++ wrappers)
# and the script prints that include directory on its last line of stdout.
#
# Why this way: the headers are ~85 KB, MIT licensed, and the package is the
# smallest trustworthy source of a complete, versioned header set.  We never
# touch the system's apt configuration: apt gets a private sources.list, an
# empty sources.list.d, and private lists/cache/status directories, so the
# script works as an unprivileged user and leaves /etc and /var alone.  The .deb
# is only unpacked (`dpkg -x`), never installed.
#
# Environment overrides:
#   NORMACT_DEBIAN_MIRROR   (default http://deb.debian.org/debian)
#   NORMACT_DEBIAN_SUITE    (default trixie)
#   NORMACT_ORT_DEB         path to an already downloaded libonnxruntime-dev .deb
set -euo pipefail

dest=${1:?usage: fetch_ort_headers.sh DEST_DIR}
mirror=${NORMACT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=${NORMACT_DEBIAN_SUITE:-trixie}

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
work="$dest/apt"
unpack="$dest/root"

log() { echo "fetch_ort_headers: $*" >&2; }

deb=${NORMACT_ORT_DEB:-}
if [[ -z "$deb" ]]; then
  command -v apt-get >/dev/null || { log "apt-get not found; set ONNXRUNTIME_INCLUDE_DIR instead"; exit 1; }
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/sources.list.d" \
           "$work/etc/preferences.d" "$work/etc/apt.conf.d" "$work/debs"
  : > "$work/status"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  if [[ -r $keyring ]]; then
    signed="[signed-by=$keyring]"
  else
    # Without the Debian keyring we cannot verify the Release file; say so loudly.
    log "WARNING: $keyring not found, the download is NOT signature-checked"
    signed="[trusted=yes]"
  fi
  echo "deb $signed $mirror $suite main" > "$work/etc/sources.list"
  apt_opts=(
    -o "Dir::Etc::SourceList=$work/etc/sources.list"
    -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
    -o "Dir::Etc::Preferences=$work/etc/preferences"
    -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::State::status=$work/status"
    -o "Dir::Cache=$work/cache"
    -o "Debug::NoLocking=1"
    # apt drops privileges to _apt when run as root; that user cannot write our
    # private directories, so download as whoever runs the build.
    -o "APT::Sandbox::User=$(id -un)"
    -o "Acquire::Languages=none"
    -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
  )
  log "apt-get update ($mirror $suite, private lists in $work)"
  apt-get "${apt_opts[@]}" -qq update >&2
  log "apt-get download libonnxruntime-dev"
  (cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev >&2)
  deb=$(ls "$work"/debs/libonnxruntime-dev_*.deb | head -n1)
fi

log "unpacking $deb"
rm -rf "$unpack"
mkdir -p "$unpack"
dpkg -x "$deb" "$unpack"
hdr=$(find "$unpack" -name onnxruntime_c_api.h | head -n1)
[[ -n "$hdr" ]] || { log "onnxruntime_c_api.h not found in $deb"; exit 1; }
rm -rf "$dest/include"
mkdir -p "$dest/include"
cp "$(dirname "$hdr")"/*.h "$dest/include/"
ver=$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$dest/include/onnxruntime_c_api.h")
log "ONNX Runtime headers (ORT_API_VERSION $ver) in $dest/include"
echo "$dest/include"
