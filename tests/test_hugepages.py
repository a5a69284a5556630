"""cli.py's re-exec with glibc's huge-page tunable (sidrec.hugepages)."""

import os
import subprocess
import sys

import pytest

from sidrec import hugepages


@pytest.fixture
def thp_mode(tmp_path, monkeypatch):
    """Point the module at a THP mode file of our own: set_mode("madvise") etc."""
    path = tmp_path / "enabled"
    monkeypatch.setattr(hugepages, "THP_MODE", path)
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 36))

    def set_mode(mode):
        path.write_text(" ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never")) + "\n")
    return set_mode


def test_the_tunable_is_added_only_where_thp_waits_for_madvise(thp_mode):
    thp_mode("madvise")
    assert hugepages.huge_page_env({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # The user's other tunables are kept; their own hugetlb choice and the opt-out win.
    assert hugepages.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert hugepages.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {}
    assert hugepages.huge_page_env({"SIDREC_NO_HUGE_PAGES": "1"}) == {}
    for mode in ("always", "never"):  # already on for every large mapping / off whatever glibc asks
        thp_mode(mode)
        assert hugepages.huge_page_env({}) == {}


def test_old_glibc_or_no_thp_file_adds_nothing(thp_mode, monkeypatch, tmp_path):
    thp_mode("madvise")
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 31))  # before the tunable existed
    assert hugepages.huge_page_env({}) == {}
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "THP_MODE", tmp_path / "absent")
    assert hugepages.huge_page_env({}) == {}


def test_reexec_runs_the_same_command_once_with_the_tunable():
    if not hugepages.huge_page_env(os.environ):
        pytest.skip("this machine needs no tunable (not glibc >= 2.35 with THP in madvise mode)")
    code = ("import os, sys; from sidrec import hugepages; print('start', flush=True); "
            "hugepages.reexec_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, "an", "argument"], capture_output=True, text=True,
                          check=True, env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    assert done.stdout.splitlines() == ["start", "start", "glibc.malloc.hugetlb=1 ['an', 'argument']"]
