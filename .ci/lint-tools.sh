# Sourced by .ci/lint and .ci/format: checks that the pinned formatters and linters
# (.ci/lint-requirements.txt) are installed, and sets CLANG_FORMAT (the binary of the
# clang-format wheel) and CXX_SOURCES (the C++ and CUDA files of csrc/).
_lint_pins="$(dirname "${BASH_SOURCE[0]}")/lint-requirements.txt"
if ! python3 - "$_lint_pins" <<'PY'; then
import sys
from importlib.metadata import PackageNotFoundError, version

wrong = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, pinned = line.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = "none"
    if have != pinned:
        wrong.append(f"{name} {have} (pinned {pinned})")
if wrong:
    sys.exit("lint tools: " + ", ".join(wrong))
PY
  echo "lint tools: install the pinned versions: python3 -m pip install -r $_lint_pins" >&2
  exit 1
fi
CLANG_FORMAT="$(python3 -c 'import clang_format; print(clang_format.get_executable("clang-format"))')"
mapfile -t CXX_SOURCES < <(find csrc -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | sort)
