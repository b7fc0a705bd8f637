#!/usr/bin/env bash
# Builds percept with `--features cuda` on a machine without a system CUDA toolkit: NVIDIA's
# CUDA 13.0 wheels from PyPI (nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC) go into a venv
# outside the repository and stand in for /usr/local/cuda. No GPU is needed to build.
#
#   deploy/build-cuda.sh                      # cargo build --release --features cuda --bin percept
#   deploy/build-cuda.sh check --features cuda   # any other cargo command line
#
# Environment:
#   PERCEPT_CUDA_VENV  where the toolkit venv lives (default ~/.cache/percept/cuda-13.0)
#   CUDA_COMPUTE_CAP   GPU the kernels are compiled for (default 90 = H100/H200; 80 = A100,
#                      89 = L4/L40/RTX 40xx). 90 and above compile architecture-specific code
#                      (sm_90a) that runs on that architecture only.
#
# Why CUDA 13.0: the CUDA 12 nvcc wheels ship ptxas only (no nvcc); the CUDA 13 ones ship a
# complete nvcc. 13.0 rather than a newer 13.x because candle's kernels are PTX that the driver
# compiles at load time, and a driver only reads PTX from toolkits up to its own version: 13.0
# PTX runs on every driver that supports CUDA 13 (>= 580).
#
# The binary links libcuda.so.1 (the driver, from the NVIDIA driver package, not the toolkit)
# and the toolkit's libcudart/libcublas/libcublasLt/libcurand/libnvrtc. Building links against a
# generated stub of libcuda (in $CUDA_ROOT/lib/stubs, never on the runtime path); running needs
# the real driver and LD_LIBRARY_PATH=$CUDA_ROOT/lib (printed at the end).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PERCEPT_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/percept/cuda-13.0}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# One CUDA release (13.0 update 2); versions pinned so nvcc, headers and libraries match.
wheels=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.1.0.3"
  "nvidia-curand==10.4.0.35"
  "nvidia-cuda-cccl==13.0.85"
)

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/pip" show -q nvidia-cuda-nvcc >/dev/null 2>&1; then
  "$venv/bin/pip" install -q --no-cache-dir "${wheels[@]}"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cuda_root="$site/nvidia/cu13"
if [ ! -x "$cuda_root/bin/nvcc" ]; then
  echo "build-cuda: no nvcc under $cuda_root" >&2
  exit 1
fi

# The wheels carry only versioned sonames (libcublas.so.13); the linker's -lcublas wants the
# unversioned name.
for lib in cudart cublas cublasLt curand nvrtc; do
  real="$(cd "$cuda_root/lib" && ls "lib$lib.so."* 2>/dev/null | grep -v alt | sort | head -n1)"
  if [ -z "$real" ]; then
    echo "build-cuda: lib$lib.so.* missing in $cuda_root/lib" >&2
    exit 1
  fi
  ln -sfn "$real" "$cuda_root/lib/lib$lib.so"
done

export CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root" CUDA_HOME="$cuda_root"
export PATH="$cuda_root/bin:$PATH"
cd "$repo"

# libcuda comes with the driver, so no wheel has it. cudarc links it at build time
# (-lcuda), so build against a stub: every driver entry point cuda.h declares (macros expanded,
# e.g. cuCtxCreate -> cuCtxCreate_v4) plus every one cudarc's bindings name, each returning
# CUDA_ERROR_STUB_LIBRARY (34) like NVIDIA's own stub. Its soname is libcuda.so.1, so at run
# time the real driver library is the one loaded.
stubs="$cuda_root/lib/stubs"
if [ ! -f "$stubs/libcuda.so" ]; then
  mkdir -p "$stubs"
  names="$(mktemp)"
  echo '#include <cuda.h>' | cc -E -I"$cuda_root/include" -x c - |
    grep -oP '\bCUresult\s+\Kcu\w+(?=\s*\()' >"$names"
  cudarc_dir="$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
    python3 -c 'import json,sys; print(next((p["manifest_path"].rsplit("/",1)[0] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"), ""))')"
  if [ -n "$cudarc_dir" ] && [ -f "$cudarc_dir/src/driver/sys/mod.rs" ]; then
    grep -oP '^\s+fn \Kcu\w+(?=\()' "$cudarc_dir/src/driver/sys/mod.rs" >>"$names"
  fi
  sort -u "$names" | awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$stubs/libcuda_stub.c"
  rm -f "$names"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
fi

if [ "$#" -eq 0 ]; then
  set -- build --release --features cuda --bin percept
fi
echo "build-cuda: CUDA_ROOT=$cuda_root CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP: cargo $*" >&2
cargo "$@"
echo "build-cuda: run with LD_LIBRARY_PATH=$cuda_root/lib (and the NVIDIA driver's libcuda.so.1)" >&2
