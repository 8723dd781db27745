"""The stream's fast tar member reader (shards.reading.tar_members) against
webdataset's tarfile-based reader: same samples, same failures, on tars in
ustar, GNU and pax formats, long names, directories, meta files, truncation
and garbage."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import webdataset as wds

from shards.reading import Shard, ShardReader

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def write_tar(path: Path, members: list[tuple[str, bytes | None]], fmt: str) -> None:
    with tarfile.open(path, "w", format=FORMATS[fmt]) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            else:
                ti.size = len(data)
                if fmt == "pax" and len(data) % 3 == 0:
                    ti.pax_headers = {"comment": "x" * len(data)}  # an extra pax record
                t.addfile(ti, io.BytesIO(data))


def reference(path: Path, fields=None) -> tuple[list[dict], bool]:
    """webdataset's own reader (tarfile streaming) with the stream's handler logic."""
    err = []

    def handler(exn):
        err.append(exn)
        return False

    select = None if fields is None else (lambda fn: wds.tariterators.base_plus_ext(fn)[1] in fields)
    out = []
    for s in wds.tariterators.tarfile_samples([{"url": str(path)}], handler=handler, select_files=select):
        out.append({k: v for k, v in s.items() if k != "__url__"})
    return out, bool(err)


def ours(path: Path, fields=None) -> tuple[list[dict], bool]:
    r = ShardReader(Shard(str(path), path.name, 0), None if fields is None else frozenset(fields), frozenset())
    out = [{k: v for k, v in s.items() if k != "__url__"} for s in r]
    return out, r.error is not None


names = st.text("abcXYZ09_-", min_size=1, max_size=12)
long_names = st.text("ab", min_size=95, max_size=130)


@st.composite
def tars(draw):
    n = draw(st.integers(1, 6))
    members = []
    for i in range(n):
        key = draw(st.one_of(names, long_names)) if draw(st.booleans()) else f"k{i}"
        d = draw(st.sampled_from(["", "sub/", "a/b/"]))
        if draw(st.integers(0, 9)) == 0:
            members.append((f"{d}dir{i}", None))
        if draw(st.integers(0, 9)) == 0:
            members.append(("__meta__.json", b"{}"))
        for ext in draw(st.lists(st.sampled_from(["json", "png", "x.npy", "cls"]), min_size=1, max_size=3,
                                 unique=True)):
            members.append((f"{d}{key}.{ext}", draw(st.binary(max_size=1500))))
    return members


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=tars(), fmt=st.sampled_from(sorted(FORMATS)), cut=st.one_of(st.none(), st.floats(0, 1)),
       garble=st.one_of(st.none(), st.integers(0, 10 ** 6)), fields=st.sampled_from([None, {"json", "png"}]))
def test_fast_reader_matches_webdataset(tmp_path, members, fmt, cut, garble, fields):
    p = tmp_path / f"t-{fmt}.tar"
    try:
        write_tar(p, members, fmt)
    except ValueError:  # a name the format cannot store (ustar: long names)
        return
    data = bytearray(p.read_bytes())
    if cut is not None:
        data = data[:int(len(data) * cut)]
    if garble is not None and data:
        i = garble % len(data)
        data[i] = (data[i] + 1) % 256
    p.write_bytes(bytes(data))
    ref, ref_err = reference(p, fields)
    got, got_err = ours(p, fields)
    assert got == ref
    assert got_err == ref_err


def test_missing_file_is_an_error(tmp_path):
    r = ShardReader(Shard(str(tmp_path / "nope.tar"), "nope.tar", 3), None)
    assert list(r) == [] and "FileNotFoundError" in r.error


@pytest.mark.parametrize("evil", ["../evil.json", "a/../../evil.json", "/abs/evil.json"])
def test_member_names_leaving_the_shard_are_refused_at_read_time(tmp_path, evil):
    """Shards are untrusted: a member named absolute or with ``..`` is never a
    sample; reading stops there with an error (the shard counts as corrupt)."""
    p = tmp_path / "t.tar"
    write_tar(p, [("a.json", b"{}"), (evil, b'{"x": 1}'), ("b.json", b"{}")], "pax")
    r = ShardReader(Shard(str(p), p.name, 3), None, frozenset({"json"}))
    keys = [s["__key__"] for s in r]
    assert keys == ["a"]
    assert r.error is not None and "unsafe member name" in r.error


def test_a_file_that_is_not_a_tar_is_an_error_without_its_bytes(tmp_path):
    line = "root:x:0:0:root:/root:/bin/bash\n"
    p = tmp_path / "passwd.tar"
    p.write_text(line * 40)
    r = ShardReader(Shard(str(p), p.name, 3), None)
    assert list(r) == [] and r.error is not None
    shown = r.error.replace(str(p), "")
    assert not any((line * 2)[i:i + 5] in shown for i in range(len(line))), r.error  # no 5 bytes of it
