#!/usr/bin/env bash
# Set up a virtual environment with edge-genarm and everything its tests need.
#   VENV=.venv  EXTRAS=cpu,export,train,serve,ray,eval,test  EDGE_GENARM_CMAKE_ARGS="-DGGML_CUDA=on" for CUDA
# llama-cpp-python is sdist-only on Linux and pip's wheel cache ignores CMAKE_ARGS, so
# the wheel we build is kept in a folder keyed by version + build flags + machine and
# installed from there with --find-links (seconds instead of minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,export,train,serve,ray,eval,test}
CACHE=${EDGE_GENARM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-genarm}
LLAMA_VERSION=0.3.36
# Portable by default (-march=native wheels crash on other CPUs): about 10% slower.
FLAGS=${EDGE_GENARM_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF"}
KEY=$(printf '%s %s' "$LLAMA_VERSION" "$FLAGS" | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheels/llama-$KEY-$(uname -m)"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION (about 3-4 minutes, once per build flags)" >&2
  rm -rf "$WHEELS.partial" && mkdir -p "$WHEELS.partial"
  CMAKE_ARGS="$FLAGS" $PIP wheel -q --no-deps "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS.partial"
  rm -rf "$WHEELS" && mv "$WHEELS.partial" "$WHEELS"
fi
$PIP install -q --find-links "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
case ",$EXTRAS," in
  # torch first, pinned: otherwise a dependency pulls a multi-GB CUDA build (FACTS.md)
  *,export,*|*,train,*) $PIP install -q "torch==2.13.0" ;;
esac
$PIP install -q -e ".[$EXTRAS]"
echo "ready: $VENV/bin/edge-genarm" >&2
