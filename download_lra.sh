#!/usr/bin/env bash
# Download the Long Range Arena release and the other datasets into the data root.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./download_lra.sh [--dir DIR] [--only PARTS] [--keep-archives] [--help]

Downloads into DIR (default ./data) what `dataloaders.py` reads:
  lra     LRA release (ListOps, AAN retrieval, Pathfinder, Path-X)  ~7.7 GB  -> DIR/lra_release/
  imdb    Stanford IMDB reviews (LRA Text)                            ~84 MB  -> DIR/aclImdb/
  cifar   CIFAR-10, python version (LRA Image, sCIFAR)               ~163 MB  -> DIR/cifar-10-batches-py/
  mnist   MNIST IDX files (sMNIST, psMNIST)                           ~12 MB  -> DIR/MNIST/raw/
  speech  Speech Commands v0.02 (35 words, 16 kHz WAV)                ~2.4 GB -> DIR/speech_commands_v0.02/

  --only PARTS      comma-separated subset, e.g. --only imdb or --only imdb,cifar (default: all but speech)
  --keep-archives   keep the downloaded archives after extraction (default: delete them)

Each download resumes where an interrupted one stopped, is checked (md5, or size against the server's)
before extraction, and is skipped when its data is already present: a second run does nothing.
ListOps needs no download: train_ex.py generates it when the release is absent.
Environment: LRA_URL, IMDB_URL, CIFAR_URL, MNIST_URL (base URL of the four files), SPEECH_URL override the
sources; LRA_MD5, IMDB_MD5, CIFAR_MD5, SPEECH_MD5 the expected md5 sums.
EOF
}

DIR=./data
PARTS=lra,imdb,cifar,mnist
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=${2:?"--dir needs a folder"}; shift 2 ;;
    --dir=*) DIR=${1#*=}; shift ;;
    --only) PARTS=${2:?"--only needs parts, e.g. imdb,cifar"}; shift 2 ;;
    --only=*) PARTS=${1#*=}; shift ;;
    --keep-archives) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# official sources and their md5 sums; an overridden URL (a mirror, a test server) is checked against
# ${PART}_MD5 if set, else by size against the server's Content-Length
official() {  # official VAR DEFAULT_URL DEFAULT_MD5 -> sets VAR (url) and VAR_MD5
  local url_var=$1 md5_var=${1%_URL}_MD5
  if [ -z "${!url_var:-}" ] || [ "${!url_var}" = "$2" ]; then
    printf -v "$url_var" '%s' "$2"; printf -v "$md5_var" '%s' "${!md5_var:-$3}"
  else
    printf -v "$md5_var" '%s' "${!md5_var:-}"
  fi
}
official LRA_URL https://storage.googleapis.com/long-range-arena/lra_release.gz ""
official IMDB_URL https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz 7c2ac02c03563afcf9b574c7e56c153a
official CIFAR_URL https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz c58f30108f718f92721af3b95e74349a
official SPEECH_URL http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz ""
MNIST_OFFICIAL=https://ossci-datasets.s3.amazonaws.com/mnist
MNIST_URL=${MNIST_URL:-$MNIST_OFFICIAL}

for p in ${PARTS//,/ }; do
  case "$p" in lra|imdb|cifar|mnist|speech) ;; *) echo "error: unknown part '$p': use lra, imdb, cifar, mnist, speech" >&2; exit 2 ;; esac
done
command -v curl >/dev/null || { echo "error: curl is needed (apt-get install curl)" >&2; exit 1; }
mkdir -p "$DIR"
say() { printf '[download_lra] %s\n' "$*"; }

need_space() {  # need_space GB
  local free_kb; free_kb=$(df -Pk "$DIR" | awk 'NR==2 {print $4}')
  if [ "$free_kb" -lt $(( $1 * 1024 * 1024 )) ]; then
    echo "error: $1 GB free needed in $DIR, only $(( free_kb / 1024 / 1024 )) GB available" >&2; exit 1
  fi
}

fetch() {  # fetch URL FILE MD5: resumable download, verified
  local url=$1 out=$2 md5=$3
  if [ -f "$out" ] && verify "$url" "$out" "$md5" quiet; then say "already downloaded: $out"; return; fi
  say "downloading $url"
  if ! curl -fL --retry 3 -C - --progress-bar -o "$out.part" "$url"; then
    say "resume failed; restarting the download from the beginning"
    rm -f "$out.part"
    curl -fL --retry 3 --progress-bar -o "$out.part" "$url"
  fi
  mv "$out.part" "$out"
  verify "$url" "$out" "$md5" || { rm -f "$out"; exit 1; }
}

verify() {  # verify URL FILE MD5 [quiet]
  local url=$1 out=$2 md5=$3
  if [ -n "$md5" ]; then
    local got; got=$(md5sum "$out" | cut -d' ' -f1)
    if [ "$got" != "$md5" ]; then
      [ -n "${4:-}" ] || echo "error: $out: md5 $got, expected $md5 (corrupt download; it was removed, run again)" >&2
      return 1
    fi
  else
    local want; want=$(curl -sfIL "$url" | tr -d '\r' | awk 'tolower($1)=="content-length:" {n=$2} END {print n}')
    local have; have=$(stat -c %s "$out")
    if [ -n "$want" ] && [ "$want" != "$have" ]; then
      [ -n "${4:-}" ] || echo "error: $out: $have bytes, the server has $want (incomplete; run again)" >&2
      return 1
    fi
  fi
  [ -n "${4:-}" ] || say "verified $out"
}

extract() {  # extract ARCHIVE [INTO]   (INTO: a folder under DIR, for archives without a top folder)
  say "checking and extracting $1"
  gzip -t "$1" || { echo "error: $1 is not a valid gzip archive; delete it and run again" >&2; exit 1; }
  mkdir -p "$DIR/${2:-}"
  tar -xzf "$1" -C "$DIR/${2:-}"
  [ "$KEEP" = 1 ] || rm -f "$1"
}

part_archive() {  # part_archive NAME URL MD5 GB RESULT_DIR [INTO]
  local name=$1 url=$2 md5=$3 gb=$4 result=$5 into=${6:-}
  if [ -f "$DIR/.done-$name" ] && [ -d "$DIR/$result" ]; then
    say "$name: already present in $DIR/$result, skipping"; return
  fi
  need_space "$gb"
  local archive="$DIR/$(basename "$url")"
  fetch "$url" "$archive" "$md5"
  extract "$archive" "$into"
  [ -d "$DIR/$result" ] || { echo "error: $name: extraction did not create $DIR/$result" >&2; exit 1; }
  touch "$DIR/.done-$name"
  say "$name: ready in $DIR/$result"
}

part_mnist() {
  if [ -f "$DIR/.done-mnist" ]; then say "mnist: already present in $DIR/MNIST/raw, skipping"; return; fi
  mkdir -p "$DIR/MNIST/raw"
  local f md5
  for pair in train-images-idx3-ubyte.gz:f68b3c2dcbeaaa9fbdd348bbdeb94873 \
              train-labels-idx1-ubyte.gz:d53e105ee54ea40749a09fcbcd1e9432 \
              t10k-images-idx3-ubyte.gz:9fb629c4189551a2d022fa330f9573f3 \
              t10k-labels-idx1-ubyte.gz:ec29112dd5afa0611ce80d1b7f02629c; do
    f=${pair%%:*}; md5=${pair#*:}
    [ "$MNIST_URL" = "$MNIST_OFFICIAL" ] || md5=""
    fetch "$MNIST_URL/$f" "$DIR/MNIST/raw/$f" "$md5"
  done
  touch "$DIR/.done-mnist"
  say "mnist: ready in $DIR/MNIST/raw"
}

for p in ${PARTS//,/ }; do
  case "$p" in
    lra) part_archive lra "$LRA_URL" "" 25 lra_release ;;
    imdb) part_archive imdb "$IMDB_URL" "$IMDB_MD5" 1 aclImdb ;;
    cifar) part_archive cifar "$CIFAR_URL" "$CIFAR_MD5" 1 cifar-10-batches-py ;;
    mnist) part_mnist ;;
    speech) part_archive speech "$SPEECH_URL" "$SPEECH_MD5" 6 speech_commands_v0.02 speech_commands_v0.02 ;;
  esac
done
say "done: $DIR"
