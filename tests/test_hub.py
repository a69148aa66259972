"""polymodal.hub against a local HTTP server: download and cache, sha256 mismatch, mirror
fallback, the offline error, atomic writes (an exception or a kill mid-download leaves no file),
and reading weight files."""

import hashlib
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from polymodal import hub

BLOB = bytes(range(256)) * 4096  # 1 MiB: more than one read chunk
SHA = hashlib.sha256(BLOB).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/ok/<name>``: BLOB; ``/bad/<name>``: other bytes; ``/stall/<name>``: part of BLOB, then
    hangs; anything else: 404. Every requested path is recorded on the server."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.paths.append(self.path)
        kind = self.path.split("/")[1]
        if kind not in ("ok", "bad", "stall"):
            self.send_error(404)
            return
        body = b"x" * len(BLOB) if kind == "bad" else BLOB
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "stall":
            self.wfile.write(body[:1000])
            self.wfile.flush()
            time.sleep(20)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.paths = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ok/w.bin"  # nothing listens there now


def test_download_caches_and_verifies(server, env):
    srv, base = server
    path = hub.fetch("sub/w.bin", [f"{base}/ok/w.bin"], SHA, progress=False)
    assert path == env / "sub" / "w.bin" and path.read_bytes() == BLOB
    n = len(srv.paths)
    assert hub.fetch("sub/w.bin", [f"{base}/ok/w.bin"], SHA, progress=False) == path and len(srv.paths) == n
    path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="wrong sha256.*delete it"):
        hub.fetch("sub/w.bin", [f"{base}/ok/w.bin"], SHA)


def test_sha256_mismatch_is_an_error_and_leaves_no_file(server, env):
    _, base = server
    with pytest.raises(ValueError, match=f"sha256 mismatch for {base}/bad/w.bin: expected {SHA}"):
        hub.fetch("w.bin", [f"{base}/bad/w.bin"], SHA, progress=False)
    assert list(env.iterdir()) == []


def test_check_hash_takes_the_prefix_from_the_file_name(server, env):
    # torch.hub's convention: '<name>-<first 8+ hex digits of the sha256>.<ext>'.
    _, base = server
    good, wrong = f"w-{SHA[:8]}.bin", f"w-{'0' * 8 if SHA[:8] != '0' * 8 else '1' * 8}.bin"
    path = hub.fetch(good, [f"{base}/ok/w.bin"], progress=False, check_hash=True)
    assert path.read_bytes() == BLOB
    with pytest.raises(ValueError, match=f"sha256 mismatch for {base}/ok/w.bin: expected {wrong[2:10]}\\.\\.\\."):
        hub.fetch(wrong, [f"{base}/ok/w.bin"], progress=False, check_hash=True)
    assert sorted(os.listdir(env)) == [good]  # the refused download left nothing behind
    (env / wrong).write_bytes(BLOB)  # a cached file is checked on every call too
    with pytest.raises(ValueError, match="wrong sha256.*delete it"):
        hub.fetch(wrong, [f"{base}/ok/w.bin"], check_hash=True)
    with pytest.raises(ValueError, match="carries no sha256 prefix"):
        hub.fetch("w.bin", [f"{base}/ok/w.bin"], check_hash=True)
    with pytest.raises(ValueError, match="expected 8 to 64 hex digits"):
        hub.fetch("w.bin", [f"{base}/ok/w.bin"], "abc")
    assert hub.hash_prefix("x/omnivore_swin_t_encoder-b7e39400.pth") == "b7e39400"
    assert hub.hash_prefix("flava_model.pt") is None


def test_mirrors_are_tried_in_order(server, env, monkeypatch, tmp_path):
    srv, base = server
    del srv.paths[:]
    # The env mirror first (404 there), then a wrong file, then a dead host, then the good URL.
    monkeypatch.setenv(hub.MIRROR_ENV, f"{base}/missing, {base}/nothere/")
    path = hub.fetch("w.bin", [f"{base}/bad/w.bin", _closed_port_url(), f"{base}/ok/w.bin"], SHA, progress=False)
    assert path.read_bytes() == BLOB
    assert srv.paths == ["/missing/w.bin", "/nothere/w.bin", "/bad/w.bin", "/ok/w.bin"]
    assert sorted(os.listdir(env)) == ["w.bin"]
    local = tmp_path / "mirror"  # a file:// mirror (a folder holding the file) needs no network
    local.mkdir()
    (local / "v.bin").write_bytes(BLOB)
    monkeypatch.setenv(hub.MIRROR_ENV, local.as_uri())
    assert hub.fetch("v.bin", [_closed_port_url()], SHA, progress=False).read_bytes() == BLOB


def test_offline_error_names_the_file_the_urls_and_where_to_put_it(env):
    urls = [_closed_port_url(), _closed_port_url().replace("w.bin", "x/w.bin")]
    with pytest.raises(RuntimeError) as e:
        hub.fetch("clip/w.bin", urls, SHA, hint="or pass path=...")
    msg = str(e.value)
    assert "'w.bin'" in msg and all(u in msg for u in urls) and "tried 2 URL(s)" in msg
    assert f"put it at '{env / 'clip' / 'w.bin'}'" in msg and SHA in msg and "or pass path=..." in msg
    assert hub.MIRROR_ENV in msg and "Connection refused" in msg
    assert list((env / "clip").iterdir()) == []


def test_an_exception_mid_download_leaves_no_file(env, monkeypatch):
    class Broken(io.BytesIO):
        headers = {"Content-Length": str(len(BLOB))}

        def read(self, n=-1):
            if self.tell() > 0:
                raise KeyboardInterrupt  # e.g. Ctrl-C after the first chunk
            return super().read(n)

    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout: Broken(BLOB))
    with pytest.raises(KeyboardInterrupt):
        hub.fetch("w.bin", ["http://example.invalid/w.bin"], SHA, progress=False)
    assert list(env.iterdir()) == []


def test_a_truncated_response_is_not_accepted_without_a_checksum(env, monkeypatch):
    class Short(io.BytesIO):
        headers = {"Content-Length": str(len(BLOB) + 10)}

    monkeypatch.setattr(hub.urllib.request, "urlopen", lambda url, timeout: Short(BLOB))
    with pytest.raises(RuntimeError, match=f"incomplete download: got {len(BLOB)} of {len(BLOB) + 10} bytes"):
        hub.download("http://example.invalid/w.bin", env / "w.bin", progress=False)
    assert list(env.iterdir()) == []


def test_a_killed_download_leaves_nothing_at_the_destination(server, env):
    srv, base = server
    dest = env / "w.bin"
    code = f"from polymodal import hub; hub.download({base + '/stall/w.bin'!r}, {str(dest)!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while "/stall/w.bin" not in srv.paths or not any(p.name.endswith(".part") for p in env.glob(".*")):
            assert time.time() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.05)
        time.sleep(0.2)  # mid-body: the server has sent part of it and hangs
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not dest.exists()  # only the hidden temporary file may remain
    assert hub.fetch("w.bin", [f"{base}/ok/w.bin"], SHA, progress=False).read_bytes() == BLOB


def test_read_state_dict_formats(tmp_path):
    from safetensors.torch import save_file

    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pt")
    ts = torch.jit.script(torch.nn.Linear(3, 2))
    torch.jit.save(ts, tmp_path / "ts.pt")
    for name in ("w.safetensors", "ckpt.pt"):
        got = hub.read_state_dict(tmp_path / name)
        assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name
    got = hub.read_state_dict(tmp_path / "ts.pt")
    assert sorted(got) == ["bias", "weight"] and torch.equal(got["weight"], ts.weight.detach())
    (tmp_path / "obj.pt").write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(ValueError, match="not a safetensors, TorchScript or weights-only torch file"):
        hub.read_state_dict(tmp_path / "obj.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        hub.read_state_dict(tmp_path / "nope.pt")
