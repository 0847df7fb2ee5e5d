"""Weights fingerprints (medfocus.lvlm.loading.weights_fingerprint) cover every byte of every file they
include, and the per-file digest memo behind large files (medfocus.io.fingerprint.file_sha256,
persist=True) is trusted only while the file's size, modification and change time, inode and device
are those it was hashed with.

Large files are simulated by lowering the 64 MiB whole-content threshold to 1 MiB (monkeypatch) with
a 3 MiB weight file: the old rule (size + first and last MiB) saw nothing of its middle MiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest

from medfocus.errors import DataWarning
from medfocus.io import fingerprint as F
from medfocus.lvlm import loading
from medfocus.lvlm.loading import weights_fingerprint
from medfocus.lvlm.registry import DEMO_DIR

MIB = 2**20


@pytest.fixture
def big_model(tmp_path, monkeypatch):
    """A model folder whose 3 MiB weight file counts as large (threshold 1 MiB), a private cache
    directory, an empty per-process memo, and a settle time short enough to wait out in a test."""
    monkeypatch.setattr(loading, "_FULL_HASH_BYTES", MIB)
    monkeypatch.setenv("MEDFOCUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(F, "_HASHES", {})
    monkeypatch.setattr(F, "_SETTLE_NS", 50_000_000)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "toy"}')
    (d / "model.safetensors").write_bytes(np.random.default_rng(0).integers(0, 256, 3 * MIB, dtype=np.uint8).tobytes())
    time.sleep(0.06)  # past the settle time: the files may be memoized
    return d


def _flip_middle_byte_keeping_size_and_mtime(f):
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(st.st_size // 2)
        b = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -t would
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _expected(d):
    """The documented rule, computed independently: SHA-1 over name, size and SHA-256 of the whole
    3 MiB weight file, after name, size and bytes of config.json."""
    h = hashlib.sha1()
    cfg = (d / "config.json").read_bytes()
    h.update(f"config.json\0{len(cfg)}\0".encode() + cfg)
    w = (d / "model.safetensors").read_bytes()
    h.update(f"model.safetensors\0{len(w)}\0sha256:{hashlib.sha256(w).hexdigest()}".encode())
    return h.hexdigest()


def _count_reads(monkeypatch):
    reads = []
    real = F._read_sha256
    monkeypatch.setattr(F, "_read_sha256", lambda path, size: reads.append(str(path)) or real(path, size))
    return reads


def test_a_middle_byte_of_a_large_weight_file_changes_the_fingerprint(big_model):
    before = weights_fingerprint(big_model)
    assert before == _expected(big_model)
    _flip_middle_byte_keeping_size_and_mtime(big_model / "model.safetensors")
    after = weights_fingerprint(big_model)
    assert after != before and after == _expected(big_model)


def test_the_digest_memo_serves_later_calls_and_processes_until_the_content_changes(big_model, monkeypatch, tmp_path):
    reads = _count_reads(monkeypatch)
    first = weights_fingerprint(big_model)
    assert len(reads) == 1  # config.json is small: hashed by its bytes, not through the memo
    assert weights_fingerprint(big_model) == first and len(reads) == 1  # per-process memo
    monkeypatch.setattr(F, "_HASHES", {})  # a new process: only the file in the cache directory remains
    assert weights_fingerprint(big_model) == first and len(reads) == 1
    memo = json.loads((tmp_path / "cache" / F.MEMO_NAME).read_text())
    w = big_model / "model.safetensors"
    entry = memo["files"][os.path.realpath(w)]
    assert entry["sha256"] == hashlib.sha256(w.read_bytes()).hexdigest() and entry["size"] == 3 * MIB
    # other bytes with the same size and modification time: the change time differs, so both memos miss
    _flip_middle_byte_keeping_size_and_mtime(w)
    time.sleep(0.06)  # past the settle time again, so the new digest may be memoized
    changed = weights_fingerprint(big_model)
    assert changed != first and changed == _expected(big_model) and len(reads) == 2
    monkeypatch.setattr(F, "_HASHES", {})
    assert weights_fingerprint(big_model) == changed and len(reads) == 2  # the new digest was persisted


def test_a_file_changed_just_before_hashing_is_not_memoized(big_model, monkeypatch):
    """Within the settle time the file's times might not change on a same-tick rewrite: no memo entry."""
    monkeypatch.setattr(F, "_SETTLE_NS", 10**12)
    reads = _count_reads(monkeypatch)
    weights_fingerprint(big_model)
    weights_fingerprint(big_model)
    assert len(reads) == 2 and not (F.cache_root() / F.MEMO_NAME).exists()


@pytest.mark.parametrize("content", [
    b"\x00\xffnot json",
    b"[]",
    json.dumps({"format": F._MEMO_FORMAT, "version": 1, "files": {"x": {"size": "3"}}}).encode(),
    json.dumps({"format": F._MEMO_FORMAT, "version": 99, "files": {}}).encode(),
])
def test_a_corrupt_memo_is_ignored_with_a_warning_and_rebuilt(big_model, monkeypatch, content):
    truth = _expected(big_model)
    memo = F.cache_root() / F.MEMO_NAME
    memo.parent.mkdir(parents=True)
    memo.write_bytes(content)
    reads = _count_reads(monkeypatch)
    with pytest.warns(DataWarning, match=r"file_sha256\.json: file-digest memo ignored \(.+\); the files are hashed again"):
        assert weights_fingerprint(big_model) == truth
    assert len(reads) == 1
    doc = json.loads(memo.read_text())  # rewritten as a valid memo holding the new digest
    assert F._memo_problem(doc) is None and list(doc["files"]) == [os.path.realpath(big_model / "model.safetensors")]


def test_a_forged_memo_entry_for_other_file_times_is_not_trusted(big_model, monkeypatch):
    """An entry whose stat fields are not the file's (here: another change time) is not used."""
    w = big_model / "model.safetensors"
    st = w.stat()
    memo = F.cache_root() / F.MEMO_NAME
    memo.parent.mkdir(parents=True)
    memo.write_text(json.dumps({"format": F._MEMO_FORMAT, "version": 1, "files": {os.path.realpath(w): {
        "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns - 1, "ino": st.st_ino,
        "dev": st.st_dev, "sha256": "0" * 64}}}))
    assert weights_fingerprint(big_model) == _expected(big_model)


def test_a_large_file_shows_hashing_progress(big_model, monkeypatch, capsys):
    monkeypatch.setattr(F, "PROGRESS_BYTES", 2 * MIB)
    weights_fingerprint(big_model)
    assert "hashing model.safetensors" in capsys.readouterr().err


def test_small_files_keep_their_earlier_fingerprint():
    """Files up to 64 MiB (the shipped demo model) are hashed by their bytes, as before: the fingerprint
    stored in existing records is unchanged (the rule recomputed independently here)."""
    files = sorted(f for f in DEMO_DIR.iterdir() if f.name == "config.json" or f.suffix in loading.WEIGHT_SUFFIXES)
    if not any(f.suffix in loading.WEIGHT_SUFFIXES for f in files):
        pytest.skip("the demo model's weights are not in this checkout")
    assert all(f.stat().st_size <= loading._FULL_HASH_BYTES for f in files)
    h = hashlib.sha1()
    for f in files:
        data = f.read_bytes()
        h.update(f"{f.name}\0{len(data)}\0".encode() + data)
    assert weights_fingerprint(DEMO_DIR) == h.hexdigest()


def test_an_unreadable_weight_file_is_a_model_error_naming_it(big_model, monkeypatch):
    from medfocus.errors import ModelError

    def denied(path, size):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(F, "_read_sha256", denied)  # a chmod 0 file, also when the tests run as root
    with pytest.raises(ModelError, match="cannot fingerprint the weights in .*model.safetensors is not a readable file"):
        weights_fingerprint(big_model)
