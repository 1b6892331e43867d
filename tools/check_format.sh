#!/usr/bin/env bash
# Checks that ffi/**/*.{cc,h,cuh} follow ffi/.clang-format (ffi/kernels/ disables formatting: its
# bytes are rendered into kernel.cu). Exit 0 when formatted, 1 when not (clang-format names the
# lines), 0 with a message when clang-format is not installed.
#   tools/check_format.sh          check
#   tools/check_format.sh --fix    reformat in place
# Install (Debian/Ubuntu): sudo apt-get install -y clang-format   (CLANG_FORMAT=... picks another binary)
set -euo pipefail
cd "$(dirname "$0")/.."
CF="${CLANG_FORMAT:-clang-format}"
if ! command -v "$CF" >/dev/null 2>&1; then
  echo "check_format: $CF not found, skipping (install: sudo apt-get install -y clang-format)"
  exit 0
fi
mapfile -t files < <(find ffi -type f \( -name '*.cc' -o -name '*.h' -o -name '*.cuh' \) | sort)
if [ "${1:-}" = "--fix" ]; then
  "$CF" -i --style=file "${files[@]}"
  echo "check_format: formatted ${#files[@]} files with $("$CF" --version)"
  exit 0
fi
if "$CF" --dry-run -Werror --style=file "${files[@]}"; then
  echo "check_format: ${#files[@]} files formatted ($("$CF" --version))"
else
  echo "check_format: run tools/check_format.sh --fix" >&2
  exit 1
fi
