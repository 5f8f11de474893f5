"""The one resume/reuse/refuse mechanism (`alphadpo_cli.artefacts`): torn tails, identity changes,
--overwrite, and a process killed mid-write, for work logs, identity-claimed files and sealed
directory caches. Every resumable artefact of the package goes through these."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alphadpo_cli.artefacts import (
    FORMAT,
    ArtefactError,
    IdentityMismatch,
    SealedDirCache,
    WorkLog,
    claim_identity,
    describe_changes,
    read_lines,
    save_identity,
)
from alphadpo_cli.config import ConfigError

IDENT = {"model": "m", "decoding": {"temperature": 0.8, "max_new_tokens": 64}}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_worklog_header_records_and_resume(tmp_path):
    path = tmp_path / "log.jsonl"
    with WorkLog(path, IDENT, kind="test log") as log:
        assert log.records == []
        log.append({"key": "a", "v": 1})
        log.extend([{"key": "b", "v": 2}, {"key": "c", "v": 3}])
    header, *records = _lines(path)
    assert header == {"format": FORMAT, "kind": "test log", "identity": IDENT}
    assert [r["key"] for r in records] == ["a", "b", "c"]
    again = WorkLog(path, dict(IDENT), kind="test log")
    assert [r["key"] for r in again.records] == ["a", "b", "c"]
    assert WorkLog.read(path, IDENT, kind="test log") == records
    assert WorkLog.read(path, {**IDENT, "model": "other"}, kind="test log") == []


def test_worklog_opened_but_unused_writes_nothing(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    WorkLog(path, IDENT, kind="k").close()
    assert not path.exists()


def test_torn_tail_is_dropped_and_cut_before_appending(tmp_path):
    path = tmp_path / "log.jsonl"
    with WorkLog(path, IDENT, kind="k") as log:
        log.append({"key": "a"})
    with open(path, "ab") as fh:
        fh.write(b'{"key": "b", "v": [1, 2')  # killed while writing this record
    log = WorkLog(path, IDENT, kind="k")
    assert [r["key"] for r in log.records] == ["a"]
    log.append({"key": "c"})
    log.close()
    assert [r.get("key") for r in _lines(path)[1:]] == ["a", "c"]


def test_damage_before_the_last_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with WorkLog(path, IDENT, kind="k") as log:
        log.extend([{"key": "a"}, {"key": "b"}])
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtefactError, match=rf"{path.name}: line 2 is not valid JSON"):
        WorkLog(path, IDENT, kind="k")
    assert isinstance(ArtefactError("x"), ConfigError)


def test_identity_change_is_refused_with_every_change_listed(tmp_path):
    path = tmp_path / "log.jsonl"
    with WorkLog(path, IDENT, kind="judge log") as log:
        log.append({"key": "a"})
    changed = {"model": "m2", "decoding": {"temperature": 0.5, "max_new_tokens": 64}, "seed": 3}
    with pytest.raises(IdentityMismatch) as err:
        WorkLog(path, changed, kind="judge log")
    msg = str(err.value)
    assert str(path) in msg and "--overwrite" in msg and "judge log" in msg
    assert err.value.changes == ('decoding.temperature: 0.8 there, 0.5 now; model: "m" there, "m2" now; '
                                 "seed: null there, 3 now")
    assert len(_lines(path)) == 2  # refused: nothing touched


def test_overwrite_starts_again(tmp_path):
    path = tmp_path / "log.jsonl"
    with WorkLog(path, IDENT, kind="k") as log:
        log.append({"key": "a"})
    other = {"model": "m2"}
    log = WorkLog(path, other, kind="k", overwrite=True)
    assert log.records == []
    log.append({"key": "z"})
    log.close()
    assert _lines(path) == [{"format": FORMAT, "kind": "k", "identity": other}, {"key": "z"}]


def test_headerless_log_adopted_or_refused(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "tor')
    with pytest.raises(ArtefactError, match="no identity header"):
        WorkLog(path, IDENT, kind="k")
    log = WorkLog(path, IDENT, kind="k", adopt_headerless=True)
    assert [r["key"] for r in log.records] == ["a", "b"]
    log.append({"key": "d"})
    log.close()
    assert _lines(path)[0]["identity"] == IDENT
    assert [r["key"] for r in _lines(path)[1:]] == ["a", "b", "d"]


def test_identity_compared_as_json(tmp_path):
    """A tuple and a list, a Path and its string: the same identity once written."""
    path = tmp_path / "log.jsonl"
    with WorkLog(path, {"dims": (1, 2), "dir": Path("/x")}, kind="k") as log:
        log.append({"key": 1})
    assert len(WorkLog(path, {"dims": [1, 2], "dir": "/x"}, kind="k")) == 1


_WRITER = textwrap.dedent("""
    import sys
    from alphadpo_cli.artefacts import WorkLog
    log = WorkLog(sys.argv[1], {"run": 1}, kind="k")
    i = len(log.records)
    print("ready", flush=True)
    while True:
        log.append({"i": i, "pad": "x" * 20000})
        i += 1
""")


def test_kill_mid_write_loses_at_most_the_record_being_written(tmp_path):
    """SIGKILL while a writer appends as fast as it can; the log then resumes with every complete
    record, in order, and a second writer appends after them."""
    path = tmp_path / "log.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.time() + 30
        while (not path.exists() or path.stat().st_size < 400_000) and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log = WorkLog(path, {"run": 1}, kind="k")
        ids = [r["i"] for r in log.records]
        assert len(ids) >= 10 and ids == list(range(len(ids)))
        log.close()
    # after the last kill: the records read back are exactly the complete lines on disk
    values = read_lines(path)
    assert values[0]["format"] == FORMAT and [v["i"] for v in values[1:]] == ids


def test_claim_identity(tmp_path):
    out, meta = tmp_path / "answers.json", tmp_path / "answers.meta.json"
    assert claim_identity(meta, IDENT, artefacts=[out]) is None
    out.write_text("[]")
    save_identity(meta, IDENT, tokens={"a": 3})
    assert claim_identity(meta, IDENT, artefacts=[out])["tokens"] == {"a": 3}
    with pytest.raises(IdentityMismatch, match=r"answers.json \(answers\) was made with other settings "
                                               r"\(model: \"m\" there, \"m2\" now\)"):
        claim_identity(meta, {**IDENT, "model": "m2"}, artefacts=[out], kind="answers")
    assert out.exists()
    assert claim_identity(meta, {**IDENT, "model": "m2"}, artefacts=[out], overwrite=True) is None
    assert not out.exists() and not meta.exists()


def test_describe_changes_nested_and_missing():
    assert describe_changes({"a": {"b": 1}}, {"a": {"b": 2}, "c": "x"}) == 'a.b: 1 there, 2 now; c: null there, "x" now'


def test_sealed_dir_cache_roundtrip_and_damage(tmp_path):
    cache = SealedDirCache(tmp_path / "cache")
    built = []

    def build():
        built.append(1)
        return {"rows": 3}

    def write(value, d):
        (d / "v.json").write_text(json.dumps(value))

    def read(d):
        return json.loads((d / "v.json").read_text())

    assert cache.get_or_build("k1", build, read=read, write=write) == ({"rows": 3}, False)
    assert cache.get_or_build("k1", build, read=read, write=write) == ({"rows": 3}, True)
    assert len(built) == 1
    (cache.path("k1") / "v.json").write_text('{"rows": 4}')  # damaged or edited: not verified
    assert cache.load("k1", read) is None
    assert cache.get_or_build("k1", build, read=read, write=write) == ({"rows": 3}, False)
    # `read` returning None is a miss; `agree` makes every process take the same branch
    assert cache.get_or_build("k1", build, read=lambda d: None, write=write)[1] is False
    assert cache.get_or_build("k1", build, read=read, write=write, agree=lambda hit: False)[1] is False
    assert cache.get_or_build("k2", build, read=read, write=write, save=False) == ({"rows": 3}, False)
    assert not cache.path("k2").exists()


_DIR_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from alphadpo_cli.artefacts import SealedDirCache
    def write(d):
        (d / "part1").write_text("x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
        (d / "part2").write_text("y")
    SealedDirCache(sys.argv[1]).save("key", write)
""")


def test_sealed_dir_cache_kill_mid_write_leaves_no_entry(tmp_path):
    root = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _DIR_WRITER, str(root)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = SealedDirCache(root)
    assert not cache.path("key").exists()
    assert cache.load("key", lambda d: "hit") is None
    cache.save("key", lambda d: (d / "part1").write_text("z"))
    assert cache.load("key", lambda d: (d / "part1").read_text()) == "z"


def test_header_identity(tmp_path):
    path = tmp_path / "log.jsonl"
    assert WorkLog.header_identity(path) is None
    with WorkLog(path, IDENT, kind="k") as log:
        log.append({"key": 1})
    assert WorkLog.header_identity(path) == IDENT
    (tmp_path / "old.jsonl").write_text('{"key": 1}\n')
    assert WorkLog.header_identity(tmp_path / "old.jsonl") is None


def test_a_log_torn_by_a_kill_resumes_twice(tmp_path):
    """kill -> resume -> kill -> resume: the torn record of the first kill must not end up in the
    middle of the log, where reading it is an error."""
    path = tmp_path / "log.jsonl"
    with WorkLog(path, IDENT, kind="k") as log:
        log.append({"key": "a"})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"key": "b", "sco')  # killed while writing b
    with WorkLog(path, IDENT, kind="k") as log:
        assert [r["key"] for r in log.records] == ["a"]
        log.append({"key": "b"})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"key": "c", "sc')  # killed again
    with WorkLog(path, IDENT, kind="k") as log:
        log.append({"key": "c"})
    assert [r["key"] for r in WorkLog(path, IDENT, kind="k").records] == ["a", "b", "c"]
