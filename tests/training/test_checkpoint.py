"""Atomic checkpoint writes: a write killed half-way never replaces the file, and the temporary
file it leaves is removed by the next run."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.runs import kill_mid_write
from training.fit.checkpoint import LAST, PARTIAL_SUFFIX, atomic_write, remove_partial_writes


def test_a_killed_write_leaves_the_old_file_and_an_orphan_that_clean_up_removes(tmp_path: Path) -> None:
    atomic_write(tmp_path / LAST, lambda tmp: tmp.write_bytes(b"epoch 0"))
    (tmp_path / ".keep").write_text("someone else's hidden file")
    kill_mid_write(tmp_path / LAST)
    orphans = [path for path in tmp_path.iterdir() if path.name.startswith(f".{LAST}.")]
    assert len(orphans) == 1 and orphans[0].name.endswith(PARTIAL_SUFFIX)
    assert (tmp_path / LAST).read_bytes() == b"epoch 0"

    assert remove_partial_writes(tmp_path) == orphans
    assert sorted(path.name for path in tmp_path.iterdir()) == [".keep", LAST]


def test_clean_up_of_a_directory_not_yet_made_is_a_no_op(tmp_path: Path) -> None:
    assert remove_partial_writes(tmp_path / "new-run") == []
