"""MXNet NDArray-list reader/writer: spec-built bytes, round trips in every layout, clear errors."""
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsc_fast.errors import WeightsError
from hsc_fast.models.mxnet_params import read_mxnet_params, write_mxnet_params

LAYOUTS = ("legacy", "v1", "v2", "v3")


# -- byte builders written straight from the format description (independent of the writer) -----
def list_bytes(records: list, keys: list) -> bytes:
    out = struct.pack("<QQQ", 0x112, 0, len(records)) + b"".join(records)
    out += struct.pack("<Q", len(keys))
    for k in keys:
        out += struct.pack("<Q", len(k)) + k.encode()
    return out


def legacy_record(shape, type_flag, data: bytes) -> bytes:
    return (struct.pack("<I", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
            + struct.pack("<iii", 1, 0, type_flag) + data)


def v1_record(shape, type_flag, data: bytes) -> bytes:
    return (struct.pack("<Ii", 0xF993FAC8, len(shape)) + b"".join(struct.pack("<q", d) for d in shape)
            + struct.pack("<iii", 1, 0, type_flag) + data)


def v2_record(shape, type_flag, data: bytes, stype=0, dev=(2, 3)) -> bytes:
    return (struct.pack("<Iii", 0xF993FAC9, stype, len(shape))
            + b"".join(struct.pack("<q", d) for d in shape)
            + struct.pack("<iii", dev[0], dev[1], type_flag) + data)


def sample_arrays() -> dict:
    rng = np.random.default_rng(0)
    return {
        "arg:conv1a_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "aux:bn7_moving_var": rng.random(5).astype(np.float64),
        "half": rng.standard_normal((2, 3)).astype(np.float16),
        "u8": rng.integers(0, 255, (7,), dtype=np.uint8),
        "i32": rng.integers(-1000, 1000, (2, 2, 2), dtype=np.int32),
        "i8": rng.integers(-100, 100, (3,), dtype=np.int8),
        "i64": np.array([2 ** 40, -5], dtype=np.int64),
        "empty_dim": np.zeros((0, 4), dtype=np.float32),
    }


def test_reads_spec_built_legacy_and_v1_and_v2_records(tmp_path):
    a = np.arange(6, dtype="<f4").reshape(2, 3) / 7
    b = np.array([[1.5, -2.25]], dtype="<f8")
    c = np.array([3, -4], dtype="<i4")
    raw = list_bytes([legacy_record((2, 3), 0, a.tobytes()), v1_record((1, 2), 1, b.tobytes()),
                      v2_record((2,), 4, c.tobytes())], ["arg:a", "aux:b", "c"])
    path = tmp_path / "spec.params"
    path.write_bytes(raw)
    out = read_mxnet_params(path)
    assert list(out) == ["arg:a", "aux:b", "c"]
    np.testing.assert_array_equal(out["arg:a"], a)
    assert out["arg:a"].dtype == np.float32
    np.testing.assert_array_equal(out["aux:b"], b)
    assert out["aux:b"].dtype == np.float64
    np.testing.assert_array_equal(out["c"], c)


@pytest.mark.parametrize("version,builder", [("legacy", legacy_record), ("v1", v1_record)])
def test_writer_emits_the_spec_bytes(tmp_path, version, builder):
    a = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    path = tmp_path / "w.params"
    write_mxnet_params(path, {"arg:x": a}, version=version)
    assert path.read_bytes() == list_bytes([builder((1, 3), 0, a.tobytes())], ["arg:x"])


def test_writer_v2_emits_the_spec_bytes(tmp_path):
    a = np.array([7, 8], dtype=np.uint8)
    path = tmp_path / "w.params"
    write_mxnet_params(path, {"k": a}, version="v2")
    assert path.read_bytes() == list_bytes([v2_record((2,), 3, a.tobytes(), dev=(1, 0))], ["k"])


@pytest.mark.parametrize("version", LAYOUTS)
def test_round_trip_every_layout(tmp_path, version):
    arrays = sample_arrays()
    path = tmp_path / f"{version}.params"
    write_mxnet_params(path, arrays, version=version)
    out = read_mxnet_params(path)
    assert list(out) == list(arrays)
    for key, arr in arrays.items():
        assert out[key].dtype == arr.dtype, key
        assert out[key].shape == arr.shape, key
        np.testing.assert_array_equal(out[key], arr)


def test_v3_round_trips_scalars_and_older_layouts_refuse_them(tmp_path):
    path = tmp_path / "s.params"
    write_mxnet_params(path, {"s": np.array(2.5, dtype=np.float32)}, version="v3")
    out = read_mxnet_params(path)["s"]
    assert out.shape == () and out == 2.5
    with pytest.raises(WeightsError, match="'s' is a 0-d scalar"):
        write_mxnet_params(path, {"s": np.array(2.5, dtype=np.float32)}, version="v2")


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
       dtype=st.sampled_from(["<f4", ">f4", "<f8", "<f2", "u1", "<i4", "<i8", ">i4"]),
       version=st.sampled_from(LAYOUTS))
def test_round_trip_property(tmp_path_factory, shape, dtype, version):
    rng = np.random.default_rng(len(shape))
    arr = (rng.standard_normal(shape) * 50).astype(dtype)
    path = tmp_path_factory.mktemp("p") / "x.params"
    write_mxnet_params(path, {"x": arr}, version=version)
    out = read_mxnet_params(path)["x"]
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")


def test_unnamed_list_gets_index_keys(tmp_path):
    a = np.ones(2, dtype="<f4")
    path = tmp_path / "list.params"
    path.write_bytes(list_bytes([legacy_record((2,), 0, a.tobytes())] * 2, []))
    assert list(read_mxnet_params(path)) == ["0", "1"]


def test_bfloat16_is_widened_exactly(tmp_path):
    want = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bf16 = (want.view(np.uint32) >> 16).astype("<u2")
    path = tmp_path / "bf.params"
    path.write_bytes(list_bytes([v2_record((3,), 12, bf16.tobytes())], ["w"]))
    out = read_mxnet_params(path)["w"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, want)


def test_none_array_has_no_payload(tmp_path):
    a = np.arange(3, dtype="<f4")
    path = tmp_path / "none.params"
    path.write_bytes(list_bytes([struct.pack("<I", 0), legacy_record((3,), 0, a.tobytes())], ["n", "a"]))
    out = read_mxnet_params(path)
    assert out["n"].size == 0
    np.testing.assert_array_equal(out["a"], a)


@pytest.mark.parametrize("stype,name", [(1, "row_sparse"), (2, "csr")])
def test_sparse_storage_is_refused_clearly(tmp_path, stype, name):
    path = tmp_path / "sparse.params"
    path.write_bytes(list_bytes([v2_record((2,), 0, b"\0" * 8, stype=stype)], ["s"]))
    with pytest.raises(WeightsError, match=f"storage type {name}: only dense") as e:
        read_mxnet_params(path)
    assert "sparse.params" in str(e.value) and "offset 24" in str(e.value)


def test_every_truncation_is_a_weights_error(tmp_path):
    path = tmp_path / "full.params"
    write_mxnet_params(path, {"arg:a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.int64)},
                       version="v2")
    raw = path.read_bytes()
    cut = tmp_path / "cut.params"
    for n in range(len(raw)):
        cut.write_bytes(raw[:n])
        with pytest.raises(WeightsError) as e:
            read_mxnet_params(cut)
        msg = str(e.value)
        assert "cut.params" in msg
        if n:  # the reported position lies inside what is there
            offset = int(re.search(r"byte offset (\d+)", msg).group(1))
            assert offset <= n and ("truncated" in msg or "cannot fit" in msg), msg


@pytest.mark.parametrize("mutate,expect", [
    (lambda raw: struct.pack("<Q", 0x113) + raw[8:], "expected 0x112"),
    (lambda raw: raw + b"\0", "1 unexpected trailing bytes"),
    (lambda raw: raw[:24] + struct.pack("<I", 1000) + raw[28:], "implausible ndim 1000"),
])
def test_garbled_headers(tmp_path, mutate, expect):
    a = np.ones(2, dtype="<f4")
    path = tmp_path / "bad.params"
    path.write_bytes(mutate(list_bytes([legacy_record((2,), 0, a.tobytes())], ["k"])))
    with pytest.raises(WeightsError, match=expect) as e:
        read_mxnet_params(path)
    assert "bad.params" in str(e.value)


def test_unknown_type_flag_and_key_count_mismatch(tmp_path):
    a = np.ones(2, dtype="<f4")
    path = tmp_path / "bad.params"
    path.write_bytes(list_bytes([legacy_record((2,), 42, a.tobytes())], ["k"]))
    with pytest.raises(WeightsError, match="unknown type flag 42.*offset 40"):
        read_mxnet_params(path)
    path.write_bytes(list_bytes([legacy_record((2,), 0, a.tobytes())], ["k", "extra"]))
    with pytest.raises(WeightsError, match="key count 2 does not match array count 1"):
        read_mxnet_params(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(WeightsError, match="nope.params"):
        read_mxnet_params(tmp_path / "nope.params")
    (tmp_path / "empty.params").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_mxnet_params(tmp_path / "empty.params")


def test_writer_rejects_bad_version_and_dtype(tmp_path):
    with pytest.raises(WeightsError, match="version 'v9'"):
        write_mxnet_params(tmp_path / "x.params", {}, version="v9")
    with pytest.raises(WeightsError, match="complex128"):
        write_mxnet_params(tmp_path / "x.params", {"c": np.ones(2, np.complex128)})
