"""Datasets where they live (shards/remote.py): http(s)://, s3:// and pipe:
against real servers on loopback that the tests start and stop: the stream
from a URL is the local stream batch for batch (2 ranks x 2 workers, resume,
eval), a connection cut in the middle of a shard is read again, a shard that
always fails is counted as corrupt with its URL, a manifest naming anything
outside its dataset is refused, and a missing / forbidden dataset is one
line, exit 2, before training starts."""
from __future__ import annotations

import collections
import functools
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import shards.remote as remote
from dist_train.config import ConfigError
from dist_train.preflight import load_checked_config
from shards.cli import run as shards_run
from shards.manifest import Manifest, UnsafeShardPath
from shards.reading import CorruptDataError, shards_of
from shards.stream import build_eval_loader, build_train_loader
from tests.conftest import PYTHON, REPO, tiny_overrides
from tests.shards.test_stream import batches_equal, make_dataset, tf_noise, tf_plain

FACECOM = REPO / "configs" / "facecom.yaml"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``directory``; ``rules[path]`` = ("cut", times) sends the full
    Content-Length but only half the body on the first ``times`` requests,
    then closes the connection (``cut-ranged``: and honours ``Range: bytes=N-``,
    as real servers do; ``ranges`` records each request's Range); ("status", code) answers that code;
    ("redirect", url) sends the client there."""

    rules: dict[str, tuple[str, int]] = {}
    gets: collections.Counter = collections.Counter()

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        type(self).gets[path] += 1
        kind, arg = self.rules.get(path, ("", 0))
        if kind == "status":
            self.send_error(arg)
            return
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", arg)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind in ("cut", "cut-ranged"):
            data = (Path(self.directory) / path.lstrip("/")).read_bytes()
            type(self).ranges.append((path, self.headers.get("Range")))
            start = 0
            if kind == "cut-ranged" and self.headers.get("Range"):  # bytes=N-
                start = int(self.headers["Range"].split("=", 1)[1].rstrip("-"))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            cut = type(self).gets[path] <= arg
            self.wfile.write(data[start:start + (len(data) - start) // 2] if cut else data[start:])
            self.wfile.flush()
            self.close_connection = cut
            return
        super().do_GET()


class Servers:
    """``servers(folder, rules)`` -> base URL of a loopback HTTP server serving
    ``folder``; ``servers.gets`` counts the last server's requests by path."""

    def __init__(self):
        self.started: list[http.server.ThreadingHTTPServer] = []

    def __call__(self, folder: Path, rules: dict | None = None) -> str:
        handler = type("H", (_Handler,), {"rules": dict(rules or {}), "gets": collections.Counter(), "ranges": []})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        srv.handler = handler
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.started.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    @property
    def gets(self) -> collections.Counter:
        return self.started[-1].handler.gets

    def stop(self) -> None:
        for srv in self.started:
            srv.shutdown()
            srv.server_close()


@pytest.fixture
def serve():
    servers = Servers()
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("uneven") / "ds", [10, 3, 25, 4, 6])


def tf_identity(sample, train):
    return {"identity": sample["json"]["identity"]}


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.001)


# ---------------------------------------------------------------------------
# the same data through HTTP as from the folder
# ---------------------------------------------------------------------------
def test_http_manifest_is_the_folders_and_shards_are_urls(uneven, serve):
    url = serve(uneven)
    m = Manifest.load(url)
    assert m.to_dict() == Manifest.load(uneven).to_dict()
    paths = [s.path for s in shards_of(remote.dataset_root(url), m, "train")]
    assert paths == [f"{url}train/shard-{i:06d}.tar" for i in range(5)]


def test_http_stream_equals_local_two_ranks_two_workers_and_resumes_exactly(uneven, serve):
    url = serve(uneven)

    def run(where, rank, skip=0):
        return list(build_train_loader(where, "train", tf_noise, 2, rank, 2, 2, seed=3, epoch=1,
                                       skip_batches=skip, shuffle_buffer=8))

    lengths = []
    for rank in range(2):
        local, remote_ = run(uneven, rank), run(url, rank)
        lengths.append(len(remote_))
        assert len(local) == len(remote_) == 48 // 4
        assert all(batches_equal(a, b) for a, b in zip(local, remote_))
    assert lengths[0] == lengths[1]  # equal batches on every rank
    full = run(url, 0)
    for k in (1, 5, len(full)):
        tail = run(url, 0, skip=k)
        assert len(tail) == len(full) - k and all(batches_equal(a, b) for a, b in zip(full[k:], tail))


def test_http_eval_equals_local(uneven, serve):
    url = serve(uneven)
    for rank in range(2):
        a = list(build_eval_loader(uneven, "train", tf_plain, 4, rank, 2))
        b = list(build_eval_loader(url, "train", tf_plain, 4, rank, 2))
        assert len(a) == len(b) and all(batches_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# dropped connections
# ---------------------------------------------------------------------------
def test_a_connection_cut_mid_shard_is_read_again(uneven, serve, fast_retries):
    url = serve(uneven, {"/train/shard-000002.tar": ("cut", 2)})
    local = list(build_eval_loader(uneven, "train", tf_plain, 4, 0, 1))
    loader = build_eval_loader(url, "train", tf_plain, 4, 0, 1)
    got = list(loader)
    assert len(got) == len(local) and all(batches_equal(a, b) for a, b in zip(local, got))
    assert loader.corrupt_count() == 0
    assert serve.gets["/train/shard-000002.tar"] == 3  # cut twice, the third read completes


def test_a_cut_connection_resumes_with_a_range_request_where_the_server_has_them(uneven, serve, fast_retries):
    shard = "/train/shard-000002.tar"
    url = serve(uneven, {shard: ("cut-ranged", 1)})
    local = list(build_eval_loader(uneven, "train", tf_plain, 4, 0, 1))
    got = list(build_eval_loader(url, "train", tf_plain, 4, 0, 1))
    assert len(got) == len(local) and all(batches_equal(a, b) for a, b in zip(local, got))
    size = (uneven / shard.lstrip("/")).stat().st_size
    # the first read from 0, cut after half; the second asks for the rest only
    assert [r for p, r in serve.started[-1].handler.ranges if p == shard] == [None, f"bytes={size // 2}-"]


def test_a_shard_that_always_breaks_is_corrupt_with_its_url(uneven, serve, fast_retries, caplog):
    url = serve(uneven, {"/train/shard-000001.tar": ("cut", 10 ** 6)})
    shard_url = f"{url}train/shard-000001.tar"
    loader = build_eval_loader(url, "train", tf_plain, 4, 0, 1, max_corrupt_fraction=0.5)
    batches = list(loader)
    lost = loader.corrupt_summary()["shards"]
    assert set(lost) == {"train/shard-000001.tar"} and 1 <= lost["train/shard-000001.tar"] <= 3
    # the samples before the cut are read, the rest of the shard counted, every other shard whole
    assert sum(int(b["_valid"].sum()) for b in batches) == 48 - lost["train/shard-000001.tar"]
    assert any(shard_url in r.getMessage() and f"failed {remote.RETRIES} times" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CorruptDataError) as info:  # under the threshold's rule like a local corrupt shard
        list(build_eval_loader(url, "train", tf_plain, 4, 0, 1, max_corrupt_fraction=0.01))
    assert shard_url in str(info.value)


def test_verify_checksums_holds_over_http(uneven, serve, tmp_path, caplog):
    copy = shutil.copytree(uneven, tmp_path / "ds")
    shard = copy / "train" / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # the tar's end padding: still readable, another sha256
    shard.write_bytes(bytes(data))
    url = serve(copy)
    plain = build_train_loader(url, "train", tf_plain, 2, 0, 1, 0, seed=0, epoch=0, max_corrupt_fraction=0.5)
    list(plain)
    assert plain.corrupt_count() == 0
    checked = build_train_loader(url, "train", tf_plain, 2, 0, 1, 0, seed=0, epoch=0, max_corrupt_fraction=0.5,
                                 verify_checksums=True)
    list(checked)
    assert checked.corrupt_summary()["shards"] == {"train/shard-000003.tar": 4}
    assert any("ChecksumMismatch" in r.getMessage() and f"{url}train/shard-000003.tar" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------
# a manifest stays inside its dataset
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../outside.tar", "train/../../outside.tar", "http://127.0.0.1:1/x.tar",
                                  "/etc/passwd", "train/shard.tar?x=1", "train/a b.tar"])
def test_a_manifest_naming_a_file_outside_the_dataset_is_refused(uneven, serve, tmp_path, name):
    copy = shutil.copytree(uneven, tmp_path / "ds")
    d = json.loads((copy / "manifest.json").read_text())
    d["splits"]["train"][0]["file"] = name
    (copy / "manifest.json").write_text(json.dumps(d))
    url = serve(copy)
    with pytest.raises(UnsafeShardPath) as info:
        Manifest.load(url)
    assert repr(name)[:40] in str(info.value) and len(str(info.value).splitlines()) == 1
    assert set(serve.gets) == {"/manifest.json"}  # nothing else was fetched


def test_a_redirect_to_another_host_is_refused(uneven, serve, capsys):
    other = serve(uneven)  # another origin (port) that would serve the data
    url = serve(uneven, {"/manifest.json": ("redirect", f"{other}manifest.json")})
    assert shards_run(["info", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "redirected to another host" in err[0] and f"{url}manifest.json" in err[0], err
    assert not serve.started[0].handler.gets  # the other server was never asked
    same = serve(uneven, {"/moved/manifest.json": ("redirect", "/manifest.json")})
    assert Manifest.load(f"{same}moved").to_dict()["splits"] == Manifest.load(uneven).to_dict()["splits"]


# ---------------------------------------------------------------------------
# bad input: one line naming the URL, exit 2
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def created(tmp_path_factory) -> Path:
    """A shard folder made by ``biomtl shards create`` (synthetic faces)."""
    out = tmp_path_factory.mktemp("created") / "syn"
    assert shards_run(["create", "--format", "synthetic", "--output", str(out), "--identities", "6", "--samples",
                       "4", "--size", "32", "--split-by", "sample", "--workers", "0", "--no-progress"]) == 0
    return out


def test_shards_info_and_verify_read_a_url(created, serve, capsys):
    url = serve(created)
    assert shards_run(["info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["train"]["samples"] == Manifest.load(created).split_size("train")
    assert shards_run(["verify", url, "--no-progress"]) == 0
    assert "OK:" in capsys.readouterr().out


def test_shards_verify_names_a_missing_shard_of_a_url(created, serve, capsys):
    url = serve(created, {"/train/shard-000000.tar": ("status", 404)})
    assert shards_run(["verify", url, "--no-progress"]) == 1
    assert "train/shard-000000.tar: missing" in capsys.readouterr().out


@pytest.mark.parametrize("rule, fragment", [(("status", 404), "no manifest.json at"),
                                            (("status", 403), "access denied (HTTP 403)")])
def test_missing_or_forbidden_manifest_is_one_line_exit_2(created, serve, capsys, rule, fragment):
    url = serve(created, {"/manifest.json": rule})
    for cmd in (["info", url], ["verify", url, "--no-progress"]):
        assert shards_run(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and f"{url}manifest.json" in err[0], err


def test_nothing_listening_is_one_line_after_retries(fast_retries, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert shards_run(["info", f"http://127.0.0.1:{port}/data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"http://127.0.0.1:{port}/data/manifest.json: failed {remote.RETRIES} times" in err[0]


@pytest.mark.parametrize("rule, fragment", [(("status", 404), "no manifest.json at"),
                                            (("status", 403), "access denied (HTTP 403)")])
def test_data_shards_url_is_checked_in_preflight(created, serve, tmp_path, rule, fragment):
    url = serve(created, {"/manifest.json": rule})
    with pytest.raises(ConfigError) as info:
        load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.source=shards", f"data.shards={url}"])
    assert str(info.value).startswith("data.shards:") and f"{url}manifest.json" in str(info.value)
    assert fragment in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_data_shards_url_loads_and_pk_batching_is_refused(created, serve, tmp_path):
    url = serve(created)
    cfg = load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.source=shards", f"data.shards={url}"])
    assert cfg.data.shards == url
    with pytest.raises(ConfigError, match="data.batching: pk reads samples by random access"):
        load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.source=shards", f"data.shards={url}",
                                                                 "data.batching=pk"])


# ---------------------------------------------------------------------------
# pipe:
# ---------------------------------------------------------------------------
def test_pipe_command_streams_like_the_folder(uneven):
    where = f"pipe:cat {uneven}/{{}}"
    assert Manifest.load(where).to_dict() == Manifest.load(uneven).to_dict()
    a = list(build_train_loader(uneven, "train", tf_noise, 2, 1, 2, 0, seed=1, epoch=0))
    b = list(build_train_loader(where, "train", tf_noise, 2, 1, 2, 0, seed=1, epoch=0))
    assert len(a) == len(b) and all(batches_equal(x, y) for x, y in zip(a, b))


def test_a_failing_pipe_command_is_one_line(tmp_path, fast_retries, capsys):
    assert shards_run(["info", f"pipe:cat {tmp_path}/nothing/{{}}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exit status 1" in err[0] and f"{tmp_path}/nothing/manifest.json" in err[0], err


def test_pipe_without_placeholder_is_refused(capsys):
    assert shards_run(["info", "pipe:cat manifest.json"]) == 2
    assert "needs '{}'" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# s3:// against moto's S3 server on loopback (the way s3fs tests itself)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(uneven, created):
    """A moto S3 server on 127.0.0.1 with ``uneven`` at s3://data/sets/uneven and
    ``created`` at s3://data/sets/created; AWS_ENDPOINT_URL points at it."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import boto3
    import s3fs

    srv = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(k, v)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        for name, folder in (("uneven", uneven), ("created", created)):
            for f in folder.rglob("*"):
                if f.is_file():
                    client.upload_file(str(f), "data", f"sets/{name}/{f.relative_to(folder)}")
        s3fs.S3FileSystem.clear_instance_cache()
        yield "s3://data/sets"
        s3fs.S3FileSystem.clear_instance_cache()
    srv.stop()


def test_s3_stream_equals_local_two_ranks_two_workers_and_resumes_exactly(uneven, s3):
    url = f"{s3}/uneven"
    assert Manifest.load(url).to_dict() == Manifest.load(uneven).to_dict()

    def run(where, rank, skip=0):
        return list(build_train_loader(where, "train", tf_noise, 2, rank, 2, 2, seed=4, epoch=0,
                                       skip_batches=skip, shuffle_buffer=8))

    full = {}
    for rank in range(2):
        local, full[rank] = run(uneven, rank), run(url, rank)
        assert len(local) == len(full[rank]) == 48 // 4
        assert all(batches_equal(a, b) for a, b in zip(local, full[rank]))
    tail = run(url, 1, skip=7)
    assert len(tail) == len(full[1]) - 7 and all(batches_equal(a, b) for a, b in zip(full[1][7:], tail))


def test_s3_info_verify_and_eval(created, s3, capsys):
    url = f"{s3}/created"
    assert shards_run(["verify", url, "--no-progress"]) == 0
    assert "OK:" in capsys.readouterr().out
    a = list(build_eval_loader(created, "val", tf_identity, 3, 0, 1))
    b = list(build_eval_loader(url, "val", tf_identity, 3, 0, 1))
    assert len(a) > 0
    assert len(a) == len(b) and all(batches_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("where", ["s3://data/sets/nothing", "s3://no-such-bucket/sets/created"])
def test_s3_missing_manifest_is_one_line_exit_2(s3, capsys, where):
    assert shards_run(["info", where]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no manifest.json at {where}/manifest.json" in err[0], err


def test_s3_wrong_credentials_are_one_line_exit_2_and_caught_in_preflight(s3, monkeypatch, capsys, tmp_path):
    import s3fs
    from moto.core.authorization import enable_iam_authentication

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem keeps the credentials it was made with
    url = f"{s3}/created"
    try:
        with enable_iam_authentication():  # moto checks keys from here on: ours is unknown
            assert shards_run(["info", url]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{url}/manifest.json: access denied" in err[0], err
            with pytest.raises(ConfigError) as info:
                load_checked_config(FACECOM, tiny_overrides(tmp_path) + ["data.source=shards", f"data.shards={url}"])
            assert "access denied" in str(info.value) and len(str(info.value).splitlines()) == 1
            assert not (tmp_path / "runs").exists()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------
# training from a URL (dist_train/main.py), and its bad input before training
# ---------------------------------------------------------------------------
def _main(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "dist_train/main.py", "--config", str(FACECOM), *tiny_overrides(tmp_path),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_training_streams_from_a_url(created, serve, tmp_path):
    url = serve(created)
    proc = _main(tmp_path, "data.source=shards", f"data.shards={url}", "data.num_workers=1", "train.max_steps=2",
                 "data.verify_checksums=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] and serve.gets["/manifest.json"] >= 1
    assert any(path.startswith("/train/shard-") for path in serve.gets)


def test_training_from_a_missing_url_is_one_line_exit_2_before_anything(created, serve, tmp_path):
    url = serve(created, {"/manifest.json": ("status", 404)})
    proc = _main(tmp_path, "data.source=shards", f"data.shards={url}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data.shards:") and f"{url}manifest.json" in lines[0]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------
# biomtl shards upload DIR s3://...
# ---------------------------------------------------------------------------
def _s3_keys(prefix: str) -> set[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return {p.split(prefix.removeprefix("s3://") + "/", 1)[1] for p in fs.find(prefix)}


def test_upload_puts_what_biomtl_wrote_and_refuses_to_replace(created, s3, tmp_path, capsys):
    dest = f"{s3}/uploaded"
    local = {p.relative_to(created).as_posix() for p in created.rglob("*") if p.is_file()}
    created = shutil.copytree(created, tmp_path / "with-foreign")
    (created / "notes.txt").write_text("not biomtl's: stays here")
    assert shards_run(["upload", str(created), dest]) == 0
    assert Manifest.load(dest).to_dict() == Manifest.load(created).to_dict()
    assert _s3_keys(dest) == local and "manifest.json" in local  # notes.txt stays local
    assert shards_run(["verify", dest, "--no-progress"]) == 0
    capsys.readouterr()
    assert shards_run(["upload", str(created), dest]) == 2  # a dataset is there
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a dataset" in err[0] and "--overwrite" in err[0]
    assert shards_run(["upload", str(created), dest, "--overwrite"]) == 0


@pytest.mark.parametrize("case", ["not a dataset", "http destination", "missing shard"])
def test_upload_bad_input_is_one_line_and_writes_nothing(created, s3, tmp_path, capsys, case):
    src, dest = created, f"{s3}/bad-{case.replace(' ', '-')}"
    if case == "not a dataset":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "http destination":
        dest = "http://127.0.0.1:1/x"
    else:
        src = shutil.copytree(created, tmp_path / "copy")
        (src / "train" / "shard-000000.tar").unlink()
    assert shards_run(["upload", str(src), dest]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("biomtl shards upload: error:"), err
    if dest.startswith("s3://"):
        assert not _s3_keys(dest)
