#!/usr/bin/env bash
# Build nn~'s PureData external (nn~.pd_linux) from the vendored public source (tests/vendor/nn_tilde)
# against libtorch 2.5.1, the libtorch nn~ 1.6 ships. Prints the external's directory on its last line.
#
#   bash tests/pd/build_nn_tilde.sh            # build (or reuse the cached build)
#
# Needs: g++, Pd's headers (apt: puredata-dev), nlohmann-json3-dev, libcurl4-openssl-dev, and pip
# (PYTHON, default python3) to fetch libtorch once. Everything goes under NN_TILDE_CACHE
# (default ~/.cache/msprior/nn_tilde), OUTSIDE the project venv (which holds a newer torch):
#   torch-2.5.1/   the PyPI torch==2.5.1 wheel, installed --no-deps --target: PyPI has no CPU-only
#                  2.5.1 wheel, and its libtorch_cpu.so also needs the CUDA runtime and CUPTI
#                  libraries (two small nvidia wheels, --no-deps too). Python never imports it.
#   build-<hash>/  nn~.pd_linux, keyed by a hash of the sources, this script, the libtorch version,
#                  Pd's header and the compiler: a re-run with nothing changed is instant.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
SRC="$HERE/../vendor/nn_tilde/src"
CACHE="${NN_TILDE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/msprior/nn_tilde}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.5.1
TORCH_PREFIX="$CACHE/torch-$TORCH_VERSION"
PD_INCLUDE="${PD_INCLUDE:-/usr/include/pd}"
CXX="${CXX:-g++}"

die() { echo "build_nn_tilde: $*" >&2; exit 1; }

command -v "$CXX" >/dev/null || die "no C++ compiler '$CXX' (apt-get install g++)"
[ -f "$PD_INCLUDE/m_pd.h" ] || die "no $PD_INCLUDE/m_pd.h (apt-get install puredata-dev)"
[ -f /usr/include/nlohmann/json.hpp ] || die "no nlohmann/json.hpp (apt-get install nlohmann-json3-dev)"
[ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] \
  || die "no curl/curl.h (apt-get install libcurl4-openssl-dev)"

# -- libtorch 2.5.1 (once) ------------------------------------------------------------------------
TORCH_LIB="$TORCH_PREFIX/torch/lib"
if [ ! -f "$TORCH_LIB/libtorch_cpu.so" ]; then
  echo "build_nn_tilde: installing torch==$TORCH_VERSION (libtorch) into $TORCH_PREFIX" >&2
  rm -rf "$TORCH_PREFIX.tmp"
  "$PYTHON" -m pip install -q --no-deps --target "$TORCH_PREFIX.tmp" "torch==$TORCH_VERSION" \
    nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-cupti-cu12==12.4.127 >&2 \
    || die "pip could not install torch==$TORCH_VERSION into $TORCH_PREFIX"
  rm -rf "$TORCH_PREFIX" && mv "$TORCH_PREFIX.tmp" "$TORCH_PREFIX"
fi
TORCH_INC="$TORCH_PREFIX/torch/include"
grep -q "\"$TORCH_VERSION\"" "$TORCH_INC/torch/csrc/api/include/torch/version.h" \
  || die "$TORCH_PREFIX does not hold libtorch $TORCH_VERSION (delete it to reinstall)"

# -- cached build ----------------------------------------------------------------------------------
KEY=$( { cat "$0"; find "$SRC" -type f | sort | xargs cat; cat "$PD_INCLUDE/m_pd.h";
         echo "$TORCH_VERSION"; "$CXX" --version; } | sha256sum | cut -c1-16)
OUT="$CACHE/build-$KEY"
if [ -f "$OUT/nn~.pd_linux" ]; then
  echo "$OUT"
  exit 0
fi

echo "build_nn_tilde: compiling nn~ (1-2 min) into $OUT" >&2
WORK="$CACHE/tmp-$KEY-$$"
rm -rf "$WORK" && mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
# Pd < 0.54 has no CLASS_MULTICHANNEL: define it as 0 (nn~ then builds without multichannel support)
cat > "$WORK/pd_compat.h" <<'EOF'
#include "m_pd.h"
#if PD_MINOR_VERSION < 54 && !defined(CLASS_MULTICHANNEL)
#define CLASS_MULTICHANNEL 0
#endif
EOF
# the torch wheel is built with the pre-C++11 std::string ABI
FLAGS=(-std=c++20 -O2 -fPIC -D_GLIBCXX_USE_CXX11_ABI=0 -DVERSION='"ca97f82"' -include "$WORK/pd_compat.h"
       -I"$PD_INCLUDE" -I"$SRC/shared" -I"$SRC/frontend/puredata/shared"
       -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" -w)
pids=()
for f in frontend/puredata/nn_tilde/nn_tilde.cpp backend/backend.cpp backend/parsing_utils.cpp; do
  "$CXX" "${FLAGS[@]}" -c "$SRC/$f" -o "$WORK/$(basename "$f" .cpp).o" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "compilation failed (see the compiler's messages above)"; done
# rpath: Pd dlopens the external; libtorch_cpu finds the nvidia runtime through its own $ORIGIN rpath
"$CXX" -shared -o "$WORK/nn~.pd_linux" "$WORK"/*.o -L"$TORCH_LIB" -Wl,-rpath,"$TORCH_LIB" \
  -ltorch_cpu -lc10 -lcurl -lpthread || die "link failed"
mkdir -p "$OUT" && mv "$WORK/nn~.pd_linux" "$OUT/"
echo "$OUT"
