"""Huge pages for torch's CPU tensors: when the command asks for them, and that torch obeys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rsseg.hugepages import TORCH_THP_ENV, kernel_thp_mode


def _fresh(code: str, *args: str, env_extra: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (torch not imported yet, the switch unset unless
    ``env_extra`` sets it); the code prints one JSON line, returned parsed."""
    env = {k: v for k, v in os.environ.items() if k != TORCH_THP_ENV}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mode_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "enabled"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("garbage\n", None)])
def test_kernel_mode_is_the_bracketed_word(tmp_path, text, mode):
    assert kernel_thp_mode(_mode_file(tmp_path, text)) == mode


def test_no_mode_file_means_no_thp(tmp_path):
    assert kernel_thp_mode(tmp_path / "absent") is None


_ENABLE_THEN_ALLOCATE = """
    import json, os, sys
    from pathlib import Path
    from rsseg.hugepages import enable_torch_huge_pages
    enabled = enable_torch_huge_pages(Path(sys.argv[1]))
    import resource, torch
    faults = []
    for _ in range(3):  # page faults taken to fill a fresh 64 MiB tensor (16,384 pages of 4 KiB)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"enabled": enabled, "env": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                      "faults": min(faults)}))
"""


def _run(tmp_path: Path, mode_text: str, env_extra: dict[str, str] | None = None) -> dict:
    return _fresh(_ENABLE_THEN_ALLOCATE, str(_mode_file(tmp_path, mode_text)), env_extra=env_extra)


PAGES_64_MIB = (64 << 20) // 4096


def test_switched_off_where_the_kernel_has_no_huge_pages(tmp_path):
    off = _run(tmp_path, "always madvise [never]\n")
    assert off["enabled"] is False and off["env"] is None
    assert off["faults"] >= PAGES_64_MIB  # every 4 KiB page faulted in on first touch


@pytest.mark.skipif(kernel_thp_mode() not in ("always", "madvise"),
                    reason="this kernel gives no transparent huge pages (mode file absent or 'never')")
def test_enabled_before_torch_a_large_tensor_takes_huge_pages(tmp_path):
    on = _run(tmp_path, f"always [{kernel_thp_mode()}] never\n")
    assert on["enabled"] is True and on["env"] == "1"
    assert on["faults"] < PAGES_64_MIB / 8  # 2 MiB pages: measured ~550 faults against 16,385


def test_the_users_choice_wins(tmp_path):
    kept = _run(tmp_path, "[always] madvise never\n", {TORCH_THP_ENV: "0"})
    assert kept["enabled"] is False and kept["env"] == "0" and kept["faults"] >= PAGES_64_MIB


def test_after_torch_is_imported_nothing_changes(tmp_path):
    mode = _mode_file(tmp_path, "[always] madvise never\n")
    result = _fresh(f"""
        import json, os, torch
        from pathlib import Path
        from rsseg.hugepages import enable_torch_huge_pages
        print(json.dumps({{"enabled": enable_torch_huge_pages(Path({str(mode)!r})),
                          "env": os.environ.get("THP_MEM_ALLOC_ENABLE")}}))
    """)
    assert result == {"enabled": False, "env": None}


def test_the_rsseg_command_asks_before_anything_imports_torch():
    result = _fresh("""
        import json, os, sys
        import rsseg.cli
        sys.argv = ["rsseg", "--version"]
        try:
            rsseg.cli.run()
        except SystemExit:
            pass
        print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                          "torch_loaded": "torch" in sys.modules}))
    """)
    expected = "1" if kernel_thp_mode() in ("always", "madvise") else None
    assert result == {"env": expected, "torch_loaded": False}
