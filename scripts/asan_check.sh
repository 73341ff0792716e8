#!/usr/bin/env bash
# Run tests against the compiled kernels built with AddressSanitizer, to catch out-of-bounds
# accesses in _kernels.c / _chain_step.c and pointers Python hands to them after the memory was
# freed (how a use-after-free of a memoized size array was found). Linux + gcc only; needs the
# project's .venv (`make venv`). Not part of `make test`: slow, and only useful after touching the
# C kernels or the Python code that passes them addresses.
#
# Usage: bash scripts/asan_check.sh [pytest args]   (default: the whole suite)
# Exit status: pytest's; an ASan report is printed from $work/asan.* and makes it non-zero.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$repo/.venv/bin/python"
libasan="$(gcc -print-file-name=libasan.so)"
libstdcxx="$(gcc -print-file-name=libstdc++.so.6)"  # before torch's C++ exceptions pass through ASan
[[ -x "$python" && -f "$libasan" ]] || { echo "needs $python (make venv) and gcc's libasan" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf -- "$work"' EXIT
# A copy of the tracked sources with the kernels rebuilt instrumented; tests import it first.
git -C "$repo" ls-files -z torch_modularity tests examples benchmarks conftest.py setup.cfg pyproject.toml 2>/dev/null \
    | (cd "$repo" && xargs -0 cp --parents -t "$work")
ext="$("$python" -c 'import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])')"
gcc -shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address -ffp-contract=off \
    -o "$work/torch_modularity/_kernels$ext" "$work/torch_modularity/_kernels.c" "$work/torch_modularity/_chain_step.c"
[[ -d "$repo/data" ]] && ln -s "$repo/data" "$work/data"

cd "$work"
set +e
LD_PRELOAD="$libasan $libstdcxx" ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$work/asan" \
    PYTHONPATH="$work" "$python" -m pytest -q -p no:cacheprovider "${@:-tests}"
status=$?
set -e
if compgen -G "$work/asan.*" > /dev/null; then
    cat "$work"/asan.*
    [[ $status -ne 0 ]] || status=1
fi
exit $status
