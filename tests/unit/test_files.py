"""File-system errors as sentences (lorakit.files): the errno behind a write that fails,
found in an OSError or in safetensors' own error, named with the path and what to do; a
failed write leaves the old file or folder and no temporary one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.files import (
    FileError,
    as_os_error,
    atomic_dir,
    check_output,
    file_error,
    read_json,
    write_json,
)

REPO = Path(__file__).resolve().parents[2]


def test_safetensors_io_error_carries_its_errno(tmp_path):
    """safetensors' writer is Rust: its I/O error is no OSError, but says the errno."""
    from safetensors.torch import save_file

    (tmp_path / "f").write_text("x")
    with pytest.raises(Exception) as info:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "f" / "t.safetensors"))
    assert not isinstance(info.value, OSError)
    assert as_os_error(info.value).errno == errno.ENOTDIR
    from safetensors import SafetensorError  # the form of safetensors 0.4

    old = SafetensorError(
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
        'message: "No space left on device" })'
    )
    assert as_os_error(old).errno == errno.ENOSPC
    assert as_os_error(ValueError("no")) is None
    assert as_os_error(SafetensorError("header too large")) is None


def test_sentences_name_the_path_the_reason_and_what_to_do():
    err = file_error(OSError(errno.ENOSPC, "No space left on device"), "write", "/r/adapter")
    assert str(err) == "cannot write /r/adapter: no space left on the disk; free some disk space"
    err = file_error(PermissionError(errno.EACCES, "Permission denied", "/x/f.json"), "read")
    assert str(err) == "cannot read /x/f.json: permission denied; make it readable"
    assert isinstance(err, LorakitError) and err.errno == errno.EACCES
    assert "read-only" in str(file_error(OSError(errno.EROFS, "ro"), "write", "/p"))


def test_check_output_refuses_before_anything_is_written(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LorakitError, match="is an existing file, not a folder"):
        check_output(f, "output_dir")
    with pytest.raises(LorakitError, match=f"cannot be created: {f} is a file"):
        check_output(f / "a" / "b", "output_dir")
    with pytest.raises(LorakitError, match="is a folder, not a file"):
        check_output(tmp_path, "--predictions", folder=False)
    check_output(tmp_path / "new" / "deeper", "output_dir")  # creatable
    check_output(f, "--predictions", folder=False)  # an existing file is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_check_output_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(LorakitError, match="is not writable"):
            check_output(ro / "run", "output_dir")
    finally:
        ro.chmod(0o755)


def test_write_under_a_file_is_a_sentence(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileError, match="a part of the path is a file"):
        write_json(tmp_path / "f" / "x.json", {})
    with pytest.raises(FileError, match="cannot write"):
        with atomic_dir(tmp_path / "f" / "d"):
            pass
    with pytest.raises(FileError, match="it is a folder"):
        read_json(tmp_path)


#: a child process whose files may not grow past 4 KiB (RLIMIT_FSIZE): the kernel fails the
#: write (EFBIG) as it fails one on a full disk (ENOSPC), inside json and inside safetensors'
#: Rust writer alike
_LIMITED = """
import resource, signal, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from lorakit.files import FileError, atomic_dir, write_json
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
root = Path(sys.argv[1])
write_json(root / "state.json", {"step": 1})
with atomic_dir(root / "ckpt") as tmp:
    save_file({"w": torch.ones(4)}, str(tmp / "w.safetensors"))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

def checkpoint():
    with atomic_dir(root / "ckpt") as tmp:
        save_file({"w": torch.zeros(4096)}, str(tmp / "w.safetensors"))

for write in (lambda: write_json(root / "state.json", {"x": "y" * 10000}), checkpoint):
    try:
        write()
    except FileError as e:
        print(e.errno, e)
"""


def test_a_write_the_kernel_refuses_leaves_the_old_files(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(tmp_path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith(f"{errno.EFBIG} cannot write {tmp_path / 'state.json'}: ")
    assert lines[1].startswith(f"{errno.EFBIG} cannot write {tmp_path / 'ckpt'}: ")
    assert read_json(tmp_path / "state.json") == {"step": 1}  # the old file, whole
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "ckpt" / "w.safetensors"))["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "state.json"]
