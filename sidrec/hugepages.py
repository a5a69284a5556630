"""Transparent huge pages for the process's large host allocations (Linux, glibc >= 2.35).

XLA:CPU allocates each execution's temporaries afresh (249 MB for the train bench's largest step) and
glibc maps blocks that large straight from the kernel and unmaps them on free, so every step faults
each 4 KiB page in again (63k page faults a step there, ~12% of the CPU time). With
`glibc.malloc.hugetlb=1` glibc asks for transparent huge pages on those mappings: 2 MiB a fault. On
the 2-core bench machine (AVX-512 EPYC, THP in "madvise" mode) that took the largest configuration's
step from 0.55-0.60 s to 0.51-0.53 s and the second configuration's from 0.94 s to 0.65-0.68 s
(separate processes, alternated). glibc reads the tunable only at process start, so `cli.py`
re-executes itself once with it set (`reexec_with_huge_pages`); `SIDREC_NO_HUGE_PAGES=1` turns that off.
No JAX import here: this runs before anything else.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SIDREC_NO_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return None
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def huge_page_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` for huge-page allocations; empty where they would change
    nothing or are the user's call: not glibc >= 2.35, THP "always" (already on) or "never" (off) or
    absent, GLIBC_TUNABLES already naming the tunable, or SIDREC_NO_HUGE_PAGES set."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) or TUNABLE.partition("=")[0] in tunables or (_glibc_version() or (0,)) < (2, 35):
        return {}
    try:
        madvise_mode = "[madvise]" in THP_MODE.read_text()
    except OSError:
        return {}
    return {"GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE} if madvise_mode else {}


def reexec_with_huge_pages() -> None:
    """Replace this process by itself (same interpreter options and arguments) with `huge_page_env`
    added; a no-op where that is empty, which it is after the re-exec."""
    extra = huge_page_env(os.environ)
    if not extra or not sys.executable:  # an embedded interpreter has no executable to run again
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **extra})
    except OSError:  # run on as we are: huge pages are a speed-up, never a requirement
        pass
