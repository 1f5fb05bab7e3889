#!/usr/bin/env bash
# Prints the path of a working Python >= 3.12, or explains on stderr and exits 1.
# pyenv shims (python3.12) fail unless a version is activated, so each candidate is
# actually run, and pyenv's real binaries are tried directly.
set -u
candidates=("${PYTHON:-}" python3.13 python3.12 python3)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for p in "$root"/versions/3.1[2-9]*/bin/python3; do candidates+=("$p"); done
fi
for p in "${candidates[@]}"; do
  [ -n "$p" ] || continue
  if "$p" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
    command -v "$p" 2>/dev/null || echo "$p"
    exit 0
  fi
done
echo "jaxicd needs Python >= 3.12 (jax >= 0.11 does), and none was found." >&2
echo "Tried: \$PYTHON, python3.13, python3.12, python3 and pyenv's versions." >&2
echo "Install one (e.g. 'pyenv install 3.12') or point PYTHON=/path/to/python3.12 at it." >&2
exit 1
