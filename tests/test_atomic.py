"""Atomic writes: permissions as a plain write, nothing left behind on error."""

import os

import pytest

from napari_tae._atomic import atomic_path, write_text_atomic


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "table.csv", "a,b\n")
    finally:
        os.umask(old)
    assert path.read_text() == "a,b\n"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert os.listdir(tmp_path) == ["table.csv"]


def test_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "mask.nii.gz"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["mask.nii.gz"]


def _set(folder):
    from napari_tae._atomic import FileSet

    return FileSet({k: folder / f"case_{k}.txt" for k in ("mask", "table", "record")})


def test_file_set_commits_all_or_leaves_targets_untouched(tmp_path):
    for name in ("mask", "table", "record"):
        (tmp_path / f"case_{name}.txt").write_text("old")
    with pytest.raises(RuntimeError), _set(tmp_path) as files:
        files.temporary("mask").write_text("new")
        assert files.temporary("mask").name.startswith(".case_mask.txt.")
        raise RuntimeError("model failed")
    assert sorted(os.listdir(tmp_path)) == ["case_mask.txt", "case_record.txt", "case_table.txt"]
    assert {p.read_text() for p in tmp_path.iterdir()} == {"old"}
    (tmp_path / "case_extra.txt").write_text("old kind this set lacks")
    with _set(tmp_path) as files:
        for kind in ("mask", "table", "record"):
            files.temporary(kind).write_text(f"new {kind}")
        final = files.commit(last="record", remove=[tmp_path / "case_extra.txt"])
    assert list(final) == ["mask", "table", "record"]  # the record goes in last
    assert sorted(os.listdir(tmp_path)) == ["case_mask.txt", "case_record.txt", "case_table.txt"]
    assert (tmp_path / "case_table.txt").read_text() == "new table"


def test_file_set_failing_half_way_never_looks_complete(tmp_path, monkeypatch):
    for name in ("mask", "table", "record"):
        (tmp_path / f"case_{name}.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("case_table.txt"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), _set(tmp_path) as files:
        for kind in ("mask", "table", "record"):
            files.temporary(kind).write_text(f"new {kind}")
        files.commit(last="record")
    # the old record went first: a reader sees an incomplete set, never old and new mixed
    assert sorted(os.listdir(tmp_path)) == ["case_mask.txt", "case_table.txt"]
    assert (tmp_path / "case_mask.txt").read_text() == "new mask"


def test_interrupt_waits_for_the_end_of_the_commit(sigint_raises):
    import signal

    from napari_tae._atomic import deferred_interrupts

    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        signal.raise_signal(signal.SIGINT)
        done.append("renamed after the signal")
    assert done == ["renamed after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("writer", ["atomic_path", "file_set"])
def test_interrupt_while_making_a_temporary_leaves_none(tmp_path, monkeypatch, writer, sigint_raises):
    # Ctrl-C arriving just after mkstemp made the file, before its caller holds the name: seen
    # as a leftover temporary of a --jobs worker stopped mid-case
    import signal
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_interrupt(*args, **kwargs):
        made = real_mkstemp(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        if writer == "atomic_path":
            with atomic_path(tmp_path / "mask.nii.gz") as tmp:
                tmp.write_text("new")
        else:
            with _set(tmp_path) as files:
                files.temporary("mask").write_text("new")
    assert os.listdir(tmp_path) == []
