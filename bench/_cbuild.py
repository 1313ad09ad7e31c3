"""Build the C benchmark programs (baseline, pump) into bench/build/ on demand.

A program is rebuilt only when one of its sources, the shared header or this
file (which holds the flags) is newer than the binary. The compiler writes to
a temporary name that is then renamed over the binary, so a concurrent build
or run never sees half a file.

    python -m bench._cbuild        # build both, print their paths
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
PROGRAMS: dict[str, tuple[str, ...]] = {
    "baseline": ("baseline.c", "common.c"),
    "pump": ("pump.c", "common.c"),
}
_HEADERS = ("common.h",)


class CBuildError(RuntimeError):
    """The C compiler failed; the message carries its command and output."""


def build(name: str) -> Path:
    """Return the path of program ``name``, compiling it first if it is stale."""
    sources = [BENCH_DIR / src for src in PROGRAMS[name]]
    deps = [*sources, *(BENCH_DIR / h for h in _HEADERS), Path(__file__).resolve()]
    out = BUILD_DIR / name
    newest = max(dep.stat().st_mtime_ns for dep in deps)
    if out.exists() and out.stat().st_mtime_ns >= newest:
        return out
    BUILD_DIR.mkdir(exist_ok=True)
    tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
    cmd = [os.environ.get("CC", "cc"), *CFLAGS, "-o", str(tmp), *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    os.replace(tmp, out)
    return out


def main() -> int:
    try:
        for name in PROGRAMS:
            print(build(name))
    except CBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
