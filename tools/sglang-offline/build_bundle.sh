#!/usr/bin/env bash
# Build folders (each < 60 MiB) that install stock SGLang on an offline GPU host that has torch 2.11 (CPython 3.12).
#   [PINS="flashinfer-python==0.6.18 ..."] bash tools/sglang-offline/build_bundle.sh [SGLANG_VERSION [SGLANG_KERNEL_VERSION]]
# (default 0.5.17 0.4.5; requirements.txt is that release's closure, PINS replace its lines of the same names)
# Run from anywhere inside the checkout; needs pip access to a package index here, none on the GPU host.
# Writes .sglang1/ .sglang2/ ... at the checkout's root (ignored through .git/info/exclude). On the host, run
# `python3 .sglangN/unpack.py` for each folder (any order); the last one extracts everything into /tmp/sgsite.
# The wheels are unzipped here (the tree is the same for any CPython 3.12 host); dropped from the tree: sgl_kernel's
# FlashAttention-3 library (1 GiB; only `--attention-backend fa3` loads it) and SM100 ops, xgrammar's static library.
set -euo pipefail
SGLANG=${1:-0.5.17}
KERNEL=${2:-0.4.5}
here=$(cd "$(dirname "$0")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel)
cd "$root"
grep -qx '/.sglang\*/' .git/info/exclude 2>/dev/null || echo '/.sglang*/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat="--only-binary=:all: --python-version 3.12 --implementation cp"
for n in 34 31 28 27 24 17 5; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
plat="$plat --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
export PIP_FIND_LINKS=
pip download -q --isolated --no-deps $plat -d "$work/w" "sglang==$SGLANG" "sglang-kernel==$KERNEL"
skip='^#'
for p in ${PINS:-}; do skip="$skip|^${p%%[=<>]*}=="; done
{ grep -vE "$skip" "$here/requirements.txt"; for p in ${PINS:-}; do echo "$p"; done; } |
  xargs pip download -q --isolated --no-deps $plat -d "$work/w"
python3 - "$work/w" "$work/site" <<'PY'
"""Unzip every wheel into one site folder: <name>.data/{purelib,platlib} merged into the root, scripts dropped."""
import pathlib, shutil, sys, zipfile
src, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
site.mkdir()
for whl in sorted(src.glob("*.whl")):
    zipfile.ZipFile(whl).extractall(site)
for data in site.glob("*.data"):
    for part in ("purelib", "platlib"):
        if (data / part).is_dir():
            shutil.copytree(data / part, site, dirs_exist_ok=True)
    shutil.rmtree(data)
print(len(list(src.glob("*.whl"))), "wheels unzipped")
PY
s="$work/site"
rm -rf "$s/sgl_kernel/flash_ops.abi3.so" "$s/sgl_kernel/sm100" "$s/xgrammar/lib"
find "$s" -name __pycache__ -prune -exec rm -rf {} +
printf '%s\n' "sglang==$SGLANG" "sglang-kernel==$KERNEL" > "$s/SGLANG_BUNDLE"
(cd "$s" && tar cf - .) | xz -T0 -6 > "$work/site.tar.xz"
rm -rf .sglang[0-9]*
(cd "$work" && split -b 58M -d -a 1 site.tar.xz part.)
parts=("$work"/part.*)
n=${#parts[@]}
sha=$(sha256sum "$work/site.tar.xz" | cut -d' ' -f1)
for i in $(seq 1 "$n"); do
  d=".sglang$i"
  mkdir -p "$d"
  mv "$work/part.$((i - 1))" "$d/"
  printf '%s %s\n' "$n" "$sha" > "$d/BUNDLE"
  cp "$here/unpack.py" "$d/"
done
du -sh .sglang[0-9]*
