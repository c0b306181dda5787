"""Tests of the pure-Python API types: status codes, checks, descriptors, keys, configs."""

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmdist._check import (
    check_int32,
    check_int64,
    check_int_list,
    check_isinstance,
    check_layer_range,
    check_uint16,
    check_uint32,
    check_uint64,
    require,
)
from llmdist.config import LLMClusterInfo, LLMConfig, LlmConfig
from llmdist.descs import (
    BlocksCacheKey,
    Cache,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    DataType,
    LLMRole,
    Placement,
    RegisterMemStatus,
)
from llmdist.status import LLMException, LLMStatusCode
from llmdist.transfer_types import LayerSynchronizer, TransferConfig, TransferWithCacheKeyConfig

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
U64_MAX = 2**64 - 1


@contextlib.contextmanager
def raises_llm(code=PARAM_INVALID):
    """Expect an LLMException carrying the given status code."""
    with pytest.raises(LLMException) as info:
        yield info
    assert info.value.status_code == code, info.value.status_code


# ---------------------------------------------------------------- status codes

_BASE = 0x5010B000
STATUS_TABLE = {
    "LLM_SUCCESS": 0,
    "LLM_FAILED": 0xFFFFFFFF,
    "LLM_WAIT_PROCESS_TIMEOUT": _BASE + 0x001,
    "LLM_KV_CACHE_NOT_EXIST": _BASE + 0x002,
    "LLM_REPEAT_REQUEST": _BASE + 0x003,
    "LLM_REQUEST_ALREADY_COMPLETED": _BASE + 0x004,
    "LLM_PARAM_INVALID": _BASE + 0x005,
    "LLM_ENGINE_FINALIZED": _BASE + 0x006,
    "LLM_NOT_YET_LINK": _BASE + 0x007,
    "LLM_ALREADY_LINK": _BASE + 0x008,
    "LLM_LINK_FAILED": _BASE + 0x009,
    "LLM_UNLINK_FAILED": _BASE + 0x00A,
    "LLM_NOTIFY_PROMPT_UNLINK_FAILED": _BASE + 0x00B,
    "LLM_CLUSTER_NUM_EXCEED_LIMIT": _BASE + 0x00C,
    "LLM_PROCESSING_LINK": _BASE + 0x00D,
    "LLM_DEVICE_OUT_OF_MEMORY": _BASE + 0x00E,
    "LLM_PREFIX_ALREADY_EXIST": _BASE + 0x00F,
    "LLM_PREFIX_NOT_EXIST": _BASE + 0x010,
    "LLM_SEQ_LENOVERLIMIT": _BASE + 0x011,
    "LLM_NO_FREE_BLOCK": _BASE + 0x012,
    "LLM_BLOCKS_OUT_OF_MEMORY": _BASE + 0x013,
    "LLM_EXIST_LINK": _BASE + 0x018,
    "LLM_FEATURE_NOT_ENABLED": _BASE + 0x019,
    "LLM_TIMEOUT": _BASE + 0x01A,
    "LLM_LINK_BUSY": _BASE + 0x01B,
    "LLM_OUT_OF_MEMORY": _BASE + 0x01C,
    "LLM_DEVICE_MEM_ERROR": 507053,
    "LLM_SUSPECT_REMOTE_ERROR": 507057,
    "LLM_UNKNOWN_ERROR": -1,
}


def test_status_code_names_are_exactly_the_spec_table():
    assert {c.name for c in LLMStatusCode} == set(STATUS_TABLE)
    assert len(LLMStatusCode.__members__) == len(STATUS_TABLE)  # no aliases


@pytest.mark.parametrize("name,value", sorted(STATUS_TABLE.items()))
def test_status_code_value_and_str(name, value):
    code = LLMStatusCode[name]
    assert code.value == value
    assert code == value
    assert LLMStatusCode(value) is code
    assert str(code) == f"LLMStatusCode.{name}"
    assert f"{code}" == f"LLMStatusCode.{name}"
    assert int(code) == value


def test_status_code_numeric_format_spec_still_formats_the_number():
    assert f"{LLMStatusCode.LLM_PARAM_INVALID:x}" == "5010b005"
    assert f"{LLMStatusCode.LLM_SUCCESS:d}" == "0"


def test_llm_exception_basics():
    exc = LLMException("boom")
    assert isinstance(exc, RuntimeError)
    assert exc.status_code is LLMStatusCode.LLM_SUCCESS
    assert "boom" in str(exc)
    exc = LLMException("bad param", status_code=LLMStatusCode.LLM_PARAM_INVALID)
    assert exc.status_code is LLMStatusCode.LLM_PARAM_INVALID
    assert "bad param" in str(exc)
    assert "LLM_PARAM_INVALID" in repr(exc)
    with pytest.raises(AttributeError):
        exc.status_code = LLMStatusCode.LLM_FAILED
    assert exc.status_code is LLMStatusCode.LLM_PARAM_INVALID


def test_llm_exception_int_status_code():
    assert LLMException("x", status_code=_BASE + 0x01A).status_code is LLMStatusCode.LLM_TIMEOUT
    assert LLMException("x", status_code=12345).status_code == 12345


def test_llm_exception_status_code_is_keyword_only():
    exc = LLMException("a", "b")
    assert exc.args == ("a", "b")
    assert exc.status_code is LLMStatusCode.LLM_SUCCESS


# ---------------------------------------------------------------- _check


def test_check_isinstance_message_and_return():
    assert check_isinstance("x", 3, int) == 3
    assert check_isinstance("x", [1], (list, tuple)) == [1]
    with pytest.raises(TypeError) as info:
        check_isinstance("shape", "abc", [list, tuple])
    assert str(info.value) == "shape only support ['list', 'tuple'], but got <class 'str'>"


def test_check_isinstance_none_and_bool():
    with pytest.raises(TypeError):
        check_isinstance("x", None, int)
    assert check_isinstance("x", None, int, allow_none=True) is None
    with pytest.raises(TypeError):
        check_isinstance("x", True, int)
    assert check_isinstance("x", True, bool) is True
    assert check_isinstance("x", False, (int, bool)) is False


INT_CHECKERS = [
    (check_uint16, 0, 2**16 - 1, "uint16"),
    (check_uint32, 0, 2**32 - 1, "uint32"),
    (check_int32, -(2**31), 2**31 - 1, "int32"),
    (check_uint64, 0, 2**64 - 1, "uint64"),
    (check_int64, -(2**63), 2**63 - 1, "int64"),
]


@pytest.mark.parametrize("check,lo,hi,kind", INT_CHECKERS)
def test_int_checkers_bounds(check, lo, hi, kind):
    assert check("v", lo) == lo
    assert check("v", hi) == hi
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError) as info:
            check("my_param", bad)
        msg = str(info.value)
        assert "my_param" in msg and str(lo) in msg and str(hi) in msg and kind in msg


@pytest.mark.parametrize("check,lo,hi,kind", INT_CHECKERS)
@pytest.mark.parametrize("bad", [True, False, 1.0, "1", None, [1]])
def test_int_checkers_reject_non_int_and_bool(check, lo, hi, kind, bad):
    # Deviation: upstream accepts bool where an int is expected; llmdist rejects it.
    with pytest.raises(TypeError) as info:
        check("my_param", bad)
    assert str(info.value).startswith("my_param only support ['int'], but got")


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_check_uint32_accepts_exactly_its_range(v):
    if 0 <= v < 2**32:
        assert check_uint32("v", v) == v
    else:
        with pytest.raises(ValueError):
            check_uint32("v", v)


def test_check_int_list():
    assert check_int_list("a", [1, 2]) == (1, 2)
    assert check_int_list("a", (1, 2)) == (1, 2)
    assert check_int_list("a", []) == ()
    src = [5, 6]
    out = check_int_list("a", src)
    src.append(7)
    assert out == (5, 6)
    assert check_int_list("a", None, allow_none=True) is None
    with pytest.raises(TypeError):
        check_int_list("a", None)
    for bad in ({1, 2}, (x for x in [1]), "12", range(3), 5, {1: 2}):
        with pytest.raises(TypeError):
            check_int_list("a", bad)


def test_check_int_list_names_the_element():
    with pytest.raises(ValueError) as info:
        check_int_list("addrs", [1, -1])
    assert "addrs[1]" in str(info.value)
    with pytest.raises(TypeError) as info:
        check_int_list("addrs", [1, 2, True])
    assert "addrs[2]" in str(info.value)
    with pytest.raises(ValueError):
        check_int_list("dims", [-(2**63) - 1], check_int64)
    assert check_int_list("dims", [-5], check_int64) == (-5,)
    with pytest.raises(ValueError):
        check_int_list("dims", [-5])  # default element check is uint64


def test_require():
    require(True, "never")
    with raises_llm() as info:
        require(False, "the message")
    assert "the message" in str(info.value)
    with raises_llm(LLMStatusCode.LLM_TIMEOUT):
        require(0, "late", LLMStatusCode.LLM_TIMEOUT)


def test_check_layer_range():
    assert check_layer_range("r", None) is None
    assert check_layer_range("r", range(0, 3)) == range(0, 3)
    assert check_layer_range("r", range(2, 3)) == range(2, 3)
    with pytest.raises(TypeError):
        check_layer_range("r", None, allow_none=False)
    for bad in ([0, 1], (0, 1), 3, "0:3"):
        with pytest.raises(TypeError):
            check_layer_range("r", bad)
    for bad in (range(0, 4, 2), range(3, 3), range(3, 1), range(-1, 2), range(3, 0, -1)):
        with raises_llm():
            check_layer_range("r", bad)


# ---------------------------------------------------------------- enums


def test_placement_role_regstatus_values():
    assert (Placement.HOST, Placement.DEVICE) == (0, 1)
    assert str(Placement.HOST) == "Placement.HOST"
    assert (LLMRole.PROMPT, LLMRole.DECODER, LLMRole.MIX) == (1, 2, 3)
    assert str(LLMRole.DECODER) == "LLMRole.DECODER"
    assert [(m.name, m.value) for m in RegisterMemStatus] == [
        ("OK", 0),
        ("PREPARING", 1),
        ("FAILED", 2),
    ]


DTYPES = {
    "DT_FLOAT": (0, 4),
    "DT_FLOAT16": (1, 2),
    "DT_INT8": (2, 1),
    "DT_INT32": (3, 4),
    "DT_UINT8": (4, 1),
    "DT_INT16": (6, 2),
    "DT_UINT16": (7, 2),
    "DT_UINT32": (8, 4),
    "DT_INT64": (9, 8),
    "DT_UINT64": (10, 8),
    "DT_DOUBLE": (11, 8),
    "DT_BOOL": (12, 1),
    "DT_BF16": (27, 2),
}


def test_datatype_members():
    assert {m.name for m in DataType} == set(DTYPES) | {"DT_STRING"}
    assert DataType.DT_STRING.value == 13


@pytest.mark.parametrize("name,value_size", sorted(DTYPES.items()))
def test_datatype_values_and_sizes(name, value_size):
    dt = DataType[name]
    assert (dt.value, dt.element_size) == value_size


def test_datatype_string_has_no_size():
    with raises_llm():
        DataType.DT_STRING.element_size


# ---------------------------------------------------------------- CacheDesc


def test_cache_desc_defaults_and_properties():
    d = CacheDesc(4, [8, 16, 32], DataType.DT_FLOAT16)
    assert d.num_tensors == 4
    assert d.shape == [8, 16, 32]
    assert d.data_type is DataType.DT_FLOAT16
    assert d.placement is Placement.DEVICE
    assert d.batch_dim == 0 and d.batch_dim_index == 0
    assert d.batch_size == 8
    assert d.seq_len_dim_index == -1
    assert d.kv_tensor_format is None
    assert d.size == 8 * 16 * 32 * 2
    assert d.stride == 16 * 32 * 2


def test_cache_desc_all_arguments():
    d = CacheDesc(2, (3, 5, 7), DataType.DT_FLOAT, Placement.HOST, 1, 2, "ND")
    assert d.shape == [3, 5, 7]
    assert d.placement is Placement.HOST
    assert d.batch_dim == 1 and d.batch_size == 5
    assert d.seq_len_dim_index == 2
    assert d.kv_tensor_format == "ND"
    assert d.size == 3 * 5 * 7 * 4
    assert d.stride == d.size // 5
    kw = CacheDesc(
        num_tensors=2,
        shape=[4],
        data_type=DataType.DT_INT8,
        placement=Placement.HOST,
        batch_dim_index=0,
        seq_len_dim_index=0,
        kv_tensor_format=None,
    )
    assert kw.size == 4 and kw.stride == 1


def test_cache_desc_shape_is_live_and_update_dim():
    """As upstream, shape is the caller's list itself and update_dim changes it; a cache keeps
    a copy of the desc it was made with, which cannot change."""
    shape = [4, 8]
    d = CacheDesc(2, shape, DataType.DT_INT8)
    assert d.shape is shape
    d.update_dim(0, 16)
    assert shape == [16, 8] and d.size == 128 and d.batch_size == 16
    d.update_dim(-1, 2)
    assert d.shape == [16, 2] and d.size == 32
    with raises_llm():
        d.update_dim(2, 1)
    with raises_llm():
        d.update_dim(0, 0)
    with pytest.raises(TypeError):
        d.update_dim("0", 1)
    c = Cache(1, d, [1, 2])
    d.update_dim(0, 1000)
    assert c.cache_desc.shape == [16, 2] and c.cache_desc.size == 32
    c.cache_desc.shape[0] = 5
    assert c.cache_desc.shape == [16, 2]
    with raises_llm():
        c.cache_desc.update_dim(0, 4)


def test_cache_desc_num_tensors_zero_allowed_in_desc():
    assert CacheDesc(0, [1], DataType.DT_INT8).num_tensors == 0


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(num_tensors=-1), ValueError),
        (dict(num_tensors=2**32), ValueError),
        (dict(num_tensors="2"), TypeError),
        (dict(num_tensors=True), TypeError),
        (dict(shape="4,8"), TypeError),
        (dict(shape={4, 8}), TypeError),
        (dict(shape=None), TypeError),
        (dict(shape=[4, 8.0]), TypeError),
        (dict(shape=[4, True]), TypeError),
        (dict(shape=[4, 2**63]), ValueError),
        (dict(data_type=1), TypeError),
        (dict(data_type="DT_FLOAT"), TypeError),
        (dict(placement=1), TypeError),
        (dict(placement=None), TypeError),
        (dict(batch_dim_index=0.0), TypeError),
        (dict(batch_dim_index=False), TypeError),
        (dict(seq_len_dim_index="1"), TypeError),
        (dict(kv_tensor_format=1), TypeError),
    ],
)
def test_cache_desc_type_and_range_errors(kwargs, exc):
    args = dict(num_tensors=2, shape=[4, 8], data_type=DataType.DT_FLOAT)
    args.update(kwargs)
    with pytest.raises(exc):
        CacheDesc(**args)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shape=[]),
        dict(shape=()),
        dict(shape=[4, 0]),
        dict(batch_dim_index=2),
        dict(batch_dim_index=-1),
        dict(seq_len_dim_index=2),
        dict(seq_len_dim_index=-2),
    ],
)
def test_cache_desc_illegal_values(kwargs):
    args = dict(num_tensors=2, shape=[4, 8], data_type=DataType.DT_FLOAT)
    args.update(kwargs)
    with raises_llm():
        CacheDesc(**args)


def test_cache_desc_size_errors():
    with raises_llm():
        CacheDesc(2, [4, 8], DataType.DT_STRING).size
    with raises_llm():
        CacheDesc(2, [4, -1], DataType.DT_FLOAT).size


def test_cache_desc_repr():
    r = repr(CacheDesc(2, [4, 8], DataType.DT_BF16, Placement.HOST, 0, 1, "ND"))
    for part in (
        "num_tensors=2",
        "shape=[4, 8]",
        "DataType.DT_BF16",
        "Placement.HOST",
        "batch_dim_index=0",
        "seq_len_dim_index=1",
        "'ND'",
    ):
        assert part in r


# ---------------------------------------------------------------- keys


def test_cache_key_defaults_and_alias():
    k = CacheKey(1, 2)
    assert (k.cluster_id, k.prompt_cluster_id, k.req_id, k.model_id, k.prefix_id) == (
        1,
        1,
        2,
        0,
        U64_MAX,
    )
    assert CacheKey(prompt_cluster_id=1, req_id=2) == k
    assert CacheKey(cluster_id=1, req_id=2, model_id=0, prefix_id=U64_MAX) == k
    assert CacheKey(1, 2, 3, 4).model_id == 3
    assert CacheKey(1, 2, 3, 4).prefix_id == 4


def test_blocks_and_id_keys_defaults_and_alias():
    b = BlocksCacheKey(7)
    assert (b.cluster_id, b.prompt_cluster_id, b.model_id) == (7, 7, 0)
    assert BlocksCacheKey(prompt_cluster_id=7) == b
    assert BlocksCacheKey(cluster_id=7, model_id=1).model_id == 1
    i = CacheKeyByIdAndIndex(3, 4)
    assert (i.cluster_id, i.cache_id, i.batch_index) == (3, 4, 0)
    assert CacheKeyByIdAndIndex(prompt_cluster_id=3, cache_id=4) == i
    assert CacheKeyByIdAndIndex(3, 4, 5).batch_index == 5


def test_key_equality_and_hash():
    assert CacheKey(1, 2) == CacheKey(1, 2) and hash(CacheKey(1, 2)) == hash(CacheKey(1, 2))
    assert CacheKey(1, 2) != CacheKey(1, 3)
    assert CacheKey(1, 2) != CacheKey(1, 2, 1)
    assert CacheKey(1, 2) != CacheKey(1, 2, prefix_id=0)
    assert CacheKey(2, 2) != CacheKey(1, 2)
    assert BlocksCacheKey(1) == BlocksCacheKey(1, 0)
    assert BlocksCacheKey(1) != BlocksCacheKey(1, 1)
    assert CacheKeyByIdAndIndex(1, 2, 3) == CacheKeyByIdAndIndex(1, 2, 3)
    assert CacheKeyByIdAndIndex(1, 2, 3) != CacheKeyByIdAndIndex(1, 2, 4)
    # Different key kinds never compare equal, even with the same numbers.
    assert BlocksCacheKey(1, 2) != CacheKey(1, 2, 2)
    assert CacheKeyByIdAndIndex(1, 0, 0) != BlocksCacheKey(1, 0)
    assert CacheKey(1, 2) != (1, 2)
    table = {CacheKey(1, 2): "a", BlocksCacheKey(1): "b", CacheKeyByIdAndIndex(1, 5): "c"}
    assert table[CacheKey(prompt_cluster_id=1, req_id=2)] == "a"
    assert table[BlocksCacheKey(prompt_cluster_id=1)] == "b"
    assert table[CacheKeyByIdAndIndex(1, 5, 0)] == "c"
    assert len({CacheKey(1, 2), CacheKey(1, 2), CacheKey(1, 3)}) == 2


@given(
    st.integers(0, U64_MAX),
    st.integers(0, U64_MAX),
    st.integers(0, U64_MAX),
    st.integers(0, U64_MAX),
)
def test_cache_key_equal_iff_fields_equal(a, b, c, d):
    k1 = CacheKey(a, b)
    k2 = CacheKey(c, d)
    assert (k1 == k2) == ((a, b) == (c, d))
    if k1 == k2:
        assert hash(k1) == hash(k2)


def test_keys_are_immutable():
    for key, attr in (
        (CacheKey(1, 2), "req_id"),
        (BlocksCacheKey(1), "model_id"),
        (CacheKeyByIdAndIndex(1, 2), "cache_id"),
    ):
        with pytest.raises(AttributeError):
            setattr(key, attr, 5)
        with pytest.raises(AttributeError):
            key.cluster_id = 9
        with pytest.raises(AttributeError):
            key.new_field = 1


def test_key_repr_roundtrips():
    for key in (CacheKey(1, 2, 3, 4), BlocksCacheKey(5, 6), CacheKeyByIdAndIndex(7, -8, 9)):
        r = repr(key)
        assert r.startswith(type(key).__name__ + "(")
        assert eval(r, {type(key).__name__: type(key)}) == key
    assert repr(BlocksCacheKey(5, 6)) == "BlocksCacheKey(cluster_id=5, model_id=6)"


@pytest.mark.parametrize(
    "make,exc",
    [
        (lambda: CacheKey(-1, 2), ValueError),
        (lambda: CacheKey(2**64, 2), ValueError),
        (lambda: CacheKey(1, -1), ValueError),
        (lambda: CacheKey(1, 2, -1), ValueError),
        (lambda: CacheKey(1, 2, 0, 2**64), ValueError),
        (lambda: CacheKey("1", 2), TypeError),
        (lambda: CacheKey(True, 2), TypeError),
        (lambda: CacheKey(1, 2.0), TypeError),
        (lambda: CacheKey(1), TypeError),
        (lambda: CacheKey(req_id=1), TypeError),
        (lambda: BlocksCacheKey(-1), ValueError),
        (lambda: BlocksCacheKey(1, 2**64), ValueError),
        (lambda: BlocksCacheKey(1, "0"), TypeError),
        (lambda: BlocksCacheKey(), TypeError),
        (lambda: BlocksCacheKey(None), TypeError),
        (lambda: CacheKeyByIdAndIndex(-1, 0), ValueError),
        (lambda: CacheKeyByIdAndIndex(1, 2**63), ValueError),
        (lambda: CacheKeyByIdAndIndex(1, -(2**63) - 1), ValueError),
        (lambda: CacheKeyByIdAndIndex(1, 0, -1), ValueError),
        (lambda: CacheKeyByIdAndIndex(1, 0, 2**32), ValueError),
        (lambda: CacheKeyByIdAndIndex(1, 0, False), TypeError),
        (lambda: CacheKeyByIdAndIndex(1), TypeError),
        (lambda: CacheKeyByIdAndIndex(1, "2"), TypeError),
    ],
)
def test_key_validation(make, exc):
    with pytest.raises(exc):
        make()


def test_key_int64_cache_id_accepts_negative():
    assert CacheKeyByIdAndIndex(1, -1).cache_id == -1
    assert CacheKeyByIdAndIndex(U64_MAX, 2**63 - 1, 2**32 - 1).batch_index == 2**32 - 1


def test_key_cluster_id_and_alias_together_rejected():
    for make in (
        lambda: CacheKey(1, 2, prompt_cluster_id=1),
        lambda: BlocksCacheKey(1, prompt_cluster_id=2),
        lambda: CacheKeyByIdAndIndex(cluster_id=1, cache_id=2, prompt_cluster_id=1),
    ):
        with raises_llm():
            make()


# ---------------------------------------------------------------- Cache


def _desc(n=2, placement=Placement.DEVICE):
    return CacheDesc(n, [4, 8], DataType.DT_FLOAT16, placement)


def test_cache_properties_and_internals():
    d = _desc()
    addrs = [0x1000, 0x2000]
    c = Cache(5, d, addrs)
    assert c.cache_id == 5
    assert repr(c.cache_desc) == repr(d)  # its own copy (see the shape test)
    assert c.tensor_addrs == [0x1000, 0x2000]
    assert c.is_blocks_cache is False
    assert c._valid is True
    addrs.append(3)
    c.tensor_addrs.append(4)
    assert c.tensor_addrs == [0x1000, 0x2000]
    assert Cache(6, d, (1, 2), is_blocks_cache=True).is_blocks_cache is True
    c._invalidate()
    assert c._valid is False and c.tensor_addrs == []
    assert "released" in repr(c)


def test_cache_properties_are_read_only():
    c = Cache(5, _desc(), [1, 2])
    for attr in ("cache_id", "cache_desc", "tensor_addrs", "is_blocks_cache"):
        with pytest.raises(AttributeError):
            setattr(c, attr, None)


@pytest.mark.parametrize(
    "make,exc",
    [
        (lambda d: Cache("1", d, [1, 2]), TypeError),
        (lambda d: Cache(2**63, d, [1, 2]), ValueError),
        (lambda d: Cache(1, "desc", [1, 2]), TypeError),
        (lambda d: Cache(1, d, 5), TypeError),
        (lambda d: Cache(1, d, [1, -2]), ValueError),
        (lambda d: Cache(1, d, [1, 2], 1), TypeError),
    ],
)
def test_cache_constructor_validation(make, exc):
    with pytest.raises(exc):
        make(_desc())


def test_cache_constructor_address_count():
    with raises_llm():
        Cache(1, _desc(3), [1, 2])


def test_cache_repr():
    r = repr(Cache(9, _desc(), [1, 2], True))
    assert "cache_id=9" in r and "is_blocks_cache=True" in r and "CacheDesc(" in r


def test_create_cpu_cache():
    d = _desc(2, Placement.HOST)
    addrs = [0x10, 0x20]
    c = Cache.create_cpu_cache(d, addrs)
    assert isinstance(c, Cache)
    assert c.cache_id == -1
    assert c.is_blocks_cache is True
    assert repr(c.cache_desc) == repr(d)
    assert c.tensor_addrs == [0x10, 0x20]
    addrs[0] = 0x99
    assert c.tensor_addrs == [0x10, 0x20]
    assert Cache.create_cpu_cache(d, (1, U64_MAX)).tensor_addrs == [1, U64_MAX]


@pytest.mark.parametrize(
    "desc,addrs",
    [
        (_desc(2, Placement.DEVICE), [1, 2]),
        (_desc(2, Placement.HOST), [1]),
        (_desc(2, Placement.HOST), [1, 2, 3]),
        (_desc(2, Placement.HOST), [1, 0]),
        (_desc(0, Placement.HOST), []),
    ],
)
def test_create_cpu_cache_illegal_values(desc, addrs):
    with raises_llm():
        Cache.create_cpu_cache(desc, addrs)


@pytest.mark.parametrize(
    "desc,addrs,exc",
    [
        ("desc", [1, 2], TypeError),
        (_desc(2, Placement.HOST), None, TypeError),
        (_desc(2, Placement.HOST), {1, 2}, TypeError),
        (_desc(2, Placement.HOST), [1, "2"], TypeError),
        (_desc(2, Placement.HOST), [1, -2], ValueError),
        (_desc(2, Placement.HOST), [1, 2**64], ValueError),
    ],
)
def test_create_cpu_cache_type_errors(desc, addrs, exc):
    with pytest.raises(exc):
        Cache.create_cpu_cache(desc, addrs)


# ---------------------------------------------------------------- LLMConfig


def test_llm_config_alias_and_empty():
    assert LlmConfig is LLMConfig
    cfg = LLMConfig()
    assert cfg.generate_options() == {}
    assert cfg.device_id is None
    assert cfg.sync_kv_timeout is None
    assert cfg.listen_ip_info == ""
    assert cfg.enable_cache_manager is False
    assert cfg.enable_remote_cache_accessible is False
    assert cfg.mem_pool_cfg == "" and cfg.host_mem_pool_cfg == ""
    assert cfg.link_total_time == 0 and cfg.link_retry_count == 1
    assert cfg.ge_options == {}


def test_llm_config_generate_all_options():
    cfg = LLMConfig()
    cfg.device_id = 3
    cfg.sync_kv_timeout = 1000
    cfg.listen_ip_info = "127.0.0.1:26000"
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = True
    cfg.mem_pool_cfg = '{"memory_size": 1073741824}'
    cfg.host_mem_pool_cfg = '{"memory_size": 4096, "page_shift": 16}'
    cfg.link_total_time = 30
    cfg.link_retry_count = 5
    assert cfg.generate_options() == {
        "ge.exec.deviceId": "3",
        "llm.SyncKvCacheWaitTime": "1000",
        "llm.listenIpInfo": "127.0.0.1:26000",
        "llm.EnableCacheManager": "1",
        "llm.EnableRemoteCacheAccessible": "1",
        "llm.MemPoolConfig": '{"memory_size": 1073741824}',
        "llm.HostMemPoolConfig": '{"memory_size": 4096, "page_shift": 16}',
        "llm.LinkTotalTime": "30",
        "llm.LinkRetryCount": "5",
    }
    assert (
        cfg.device_id,
        cfg.sync_kv_timeout,
        cfg.listen_ip_info,
        cfg.link_total_time,
        cfg.link_retry_count,
    ) == (3, 1000, "127.0.0.1:26000", 30, 5)
    assert cfg.enable_cache_manager is True and cfg.enable_remote_cache_accessible is True


def test_llm_config_false_booleans_are_emitted_as_zero():
    cfg = LLMConfig()
    cfg.enable_cache_manager = False
    assert cfg.generate_options() == {"llm.EnableCacheManager": "0"}
    cfg.enable_remote_cache_accessible = False
    assert cfg.generate_options()["llm.EnableRemoteCacheAccessible"] == "0"
    cfg.enable_remote_cache_accessible = True
    assert cfg.generate_options()["llm.EnableRemoteCacheAccessible"] == "1"


def test_llm_config_only_set_options_and_fresh_dicts():
    cfg = LLMConfig()
    cfg.device_id = 0
    opts = cfg.generate_options()
    assert opts == {"ge.exec.deviceId": "0"}
    opts["junk"] = "1"
    assert cfg.generate_options() == {"ge.exec.deviceId": "0"}
    cfg.link_total_time = 0
    assert cfg.generate_options()["llm.LinkTotalTime"] == "0"


def test_llm_config_sync_kv_timeout_digit_string():
    cfg = LLMConfig()
    cfg.sync_kv_timeout = "250"
    assert cfg.generate_options() == {"llm.SyncKvCacheWaitTime": "250"}


def test_llm_config_ge_options_passthrough():
    cfg = LLMConfig()
    cfg.ge_options = {"llmdist.runtime": "host", "ge.exec.deviceId": "7"}
    cfg.device_id = 1
    assert cfg.generate_options() == {"llmdist.runtime": "host", "ge.exec.deviceId": "1"}
    with pytest.raises(TypeError):
        cfg.ge_options = {"k": 1}
    with pytest.raises(TypeError):
        cfg.ge_options = {1: "v"}
    with pytest.raises(TypeError):
        cfg.ge_options = [("k", "v")]


@pytest.mark.parametrize(
    "prop,value,exc",
    [
        ("device_id", "0", TypeError),
        ("device_id", True, TypeError),
        ("device_id", 0.0, TypeError),
        ("device_id", 2**31, ValueError),
        ("sync_kv_timeout", 1.5, TypeError),
        ("sync_kv_timeout", None, TypeError),
        ("sync_kv_timeout", True, TypeError),
        ("sync_kv_timeout", 2**31, ValueError),
        ("listen_ip_info", 123, TypeError),
        ("listen_ip_info", None, TypeError),
        ("enable_cache_manager", 1, TypeError),
        ("enable_cache_manager", "1", TypeError),
        ("enable_remote_cache_accessible", 0, TypeError),
        ("mem_pool_cfg", {"memory_size": 1}, TypeError),
        ("host_mem_pool_cfg", 5, TypeError),
        ("link_total_time", -1, ValueError),
        ("link_total_time", 2**32, ValueError),
        ("link_total_time", "5", TypeError),
        ("link_retry_count", "3", TypeError),
        ("link_retry_count", True, TypeError),
    ],
)
def test_llm_config_type_and_range_errors(prop, value, exc):
    cfg = LLMConfig()
    before = cfg.generate_options()
    with pytest.raises(exc):
        setattr(cfg, prop, value)
    assert cfg.generate_options() == before


@pytest.mark.parametrize(
    "prop,value",
    [
        ("device_id", -1),
        ("sync_kv_timeout", 0),
        ("sync_kv_timeout", -5),
        ("sync_kv_timeout", "abc"),
        ("sync_kv_timeout", "-5"),
        ("sync_kv_timeout", "0"),
        ("listen_ip_info", "127.0.0.1"),
        ("listen_ip_info", "127.0.0.1:"),
        ("listen_ip_info", ":26000"),
        ("listen_ip_info", "127.0.0.1:65536"),
        ("listen_ip_info", "127.0.0.1:-1"),
        ("listen_ip_info", "300.0.0.1:26000"),
        ("listen_ip_info", "localhost:26000"),
        ("listen_ip_info", "1.2.3:26000"),
        ("mem_pool_cfg", "not json"),
        ("mem_pool_cfg", "[1, 2]"),
        ("mem_pool_cfg", '{"page_shift": 16}'),
        ("mem_pool_cfg", '{"memory_size": 0}'),
        ("mem_pool_cfg", '{"memory_size": -1}'),
        ("mem_pool_cfg", '{"memory_size": "1024"}'),
        ("mem_pool_cfg", '{"memory_size": true}'),
        ("mem_pool_cfg", '{"memory_size": 1.5}'),
        ("host_mem_pool_cfg", '{"memory_size": 18446744073709551616}'),
        ("link_retry_count", 0),
        ("link_retry_count", 101),
    ],
)
def test_llm_config_illegal_values(prop, value):
    cfg = LLMConfig()
    with raises_llm():
        setattr(cfg, prop, value)
    assert cfg.generate_options() == {}


def test_llm_config_boundaries_accepted():
    cfg = LLMConfig()
    cfg.device_id = 2**31 - 1
    cfg.sync_kv_timeout = 2**31 - 1
    cfg.link_retry_count = 1
    cfg.link_retry_count = 100
    cfg.link_total_time = 2**32 - 1
    cfg.listen_ip_info = "0.0.0.0:65535"
    cfg.mem_pool_cfg = ""  # empty means "not configured"
    opts = cfg.generate_options()
    assert opts["llm.LinkRetryCount"] == "100"
    assert opts["llm.LinkTotalTime"] == str(2**32 - 1)
    assert opts["llm.listenIpInfo"] == "0.0.0.0:65535"
    assert "llm.MemPoolConfig" not in opts


def test_llm_config_failed_set_keeps_old_value():
    cfg = LLMConfig()
    cfg.link_retry_count = 7
    with raises_llm():
        cfg.link_retry_count = 0
    assert cfg.link_retry_count == 7
    cfg.mem_pool_cfg = '{"memory_size": 64}'
    with raises_llm():
        cfg.mem_pool_cfg = "{"
    assert json.loads(cfg.mem_pool_cfg) == {"memory_size": 64}


# ---------------------------------------------------------------- LLMClusterInfo


def test_cluster_info_basics():
    info = LLMClusterInfo()
    assert info.remote_cluster_id is None
    assert info.local_ip_info_list == [] and info.remote_ip_info_list == []
    info.remote_cluster_id = U64_MAX
    assert info.remote_cluster_id == U64_MAX
    info.append_local_ip_info("10.0.0.1", 0)
    info.append_remote_ip_info("192.168.1.20", 26000)
    info.append_remote_ip_info("192.168.1.21", 65535)
    # upstream's form: (in_addr bytes read little-endian, port)
    assert info.local_ip_info_list == [(0x0100000A, 0)]
    assert info.remote_ip_info_list == [(0x1401A8C0, 26000), (0x1501A8C0, 65535)]
    assert info.remote_addresses() == [("192.168.1.20", 26000), ("192.168.1.21", 65535)]
    r = repr(info)
    assert str(U64_MAX) in r and "192.168.1.21" in r


def test_cluster_info_int_ip_uses_upstream_byte_order():
    # Upstream turns "1.2.3.4" into int.from_bytes(inet_aton(ip), "little") == 0x04030201.
    info = LLMClusterInfo()
    info.append_local_ip_info(0x04030201, 1)
    info.append_remote_ip_info(0x0100007F, 2)
    assert info.local_ip_info_list == [(0x04030201, 1)]
    assert info.remote_ip_info_list == [(0x0100007F, 2)]
    assert info.remote_addresses() == [("127.0.0.1", 2)]


def test_cluster_info_lists_are_read_only_copies():
    info = LLMClusterInfo()
    info.append_local_ip_info("1.1.1.1", 1)
    info.local_ip_info_list.append((2, 2))
    assert info.local_ip_info_list == [(0x01010101, 1)]
    with pytest.raises(AttributeError):
        info.local_ip_info_list = []
    with pytest.raises(AttributeError):
        info.remote_ip_info_list = []


@pytest.mark.parametrize(
    "call,exc",
    [
        (lambda i: setattr(i, "remote_cluster_id", -1), ValueError),
        (lambda i: setattr(i, "remote_cluster_id", 2**64), ValueError),
        (lambda i: setattr(i, "remote_cluster_id", "1"), TypeError),
        (lambda i: setattr(i, "remote_cluster_id", True), TypeError),
        (lambda i: i.append_local_ip_info(1.0, 1), TypeError),
        (lambda i: i.append_local_ip_info(None, 1), TypeError),
        (lambda i: i.append_local_ip_info(True, 1), TypeError),
        (lambda i: i.append_remote_ip_info(2**32, 1), ValueError),
        (lambda i: i.append_remote_ip_info(-1, 1), ValueError),
        (lambda i: i.append_remote_ip_info("1.2.3.4", 65536), ValueError),
        (lambda i: i.append_remote_ip_info("1.2.3.4", -1), ValueError),
        (lambda i: i.append_local_ip_info("1.2.3.4", "80"), TypeError),
        (lambda i: i.append_local_ip_info("1.2.3.4", False), TypeError),
    ],
)
def test_cluster_info_type_and_range_errors(call, exc):
    info = LLMClusterInfo()
    with pytest.raises(exc):
        call(info)
    assert info.local_ip_info_list == [] and info.remote_ip_info_list == []
    assert info.remote_cluster_id is None


@pytest.mark.parametrize("ip", ["", "1.2.3", "256.1.1.1", "a.b.c.d", "::1", "1.2.3.4:5"])
def test_cluster_info_bad_ip_text(ip):
    info = LLMClusterInfo()
    with raises_llm():
        info.append_remote_ip_info(ip, 1)
    assert info.remote_ip_info_list == []


# ---------------------------------------------------------------- LayerSynchronizer


def test_layer_synchronizer_is_abstract():
    with pytest.raises(TypeError):
        LayerSynchronizer()

    class Incomplete(LayerSynchronizer):
        pass

    with pytest.raises(TypeError):
        Incomplete()

    class Sync(LayerSynchronizer):
        def synchronize_layer(self, layer_index, timeout_in_millis):
            return layer_index < 2

    s = Sync()
    assert s.synchronize_layer(1, None) is True
    assert s.synchronize_layer(2, 10) is False


# ---------------------------------------------------------------- TransferConfig


def test_transfer_config_defaults_and_properties():
    t = TransferConfig(5, [0x10, 0x20])
    assert t.dst_cluster_id == 5
    assert t.dst_addrs == [0x10, 0x20]
    assert t.src_layer_range is None
    assert t.src_batch_index == 0
    t2 = TransferConfig(
        dst_cluster_id=U64_MAX,
        dst_addrs=(1, 2, 3, 4),
        src_layer_range=range(3, 5),
        src_batch_index=2**32 - 1,
    )
    assert t2.dst_addrs == [1, 2, 3, 4]
    assert t2.src_layer_range == range(3, 5)
    assert t2.src_batch_index == 2**32 - 1
    assert TransferConfig(1, []).dst_addrs == []


def test_transfer_config_addresses_are_snapshotted():
    addrs = [1, 2]
    t = TransferConfig(1, addrs)
    addrs[0] = 999
    addrs.append(3)
    assert t.dst_addrs == [1, 2]
    t.dst_addrs.append(7)
    assert t.dst_addrs == [1, 2]
    assert isinstance(t._dst_addrs, tuple)
    new = [4, 5]
    t.dst_addrs = new
    new.clear()
    assert t.dst_addrs == [4, 5]


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(dst_cluster_id=-1), ValueError),
        (dict(dst_cluster_id=2**64), ValueError),
        (dict(dst_cluster_id="1"), TypeError),
        (dict(dst_cluster_id=True), TypeError),
        (dict(dst_addrs=None), TypeError),
        (dict(dst_addrs={1, 2}), TypeError),
        (dict(dst_addrs=5), TypeError),
        (dict(dst_addrs=[1, "2"]), TypeError),
        (dict(dst_addrs=[1, True]), TypeError),
        (dict(dst_addrs=[1, -2]), ValueError),
        (dict(dst_addrs=[2**64]), ValueError),
        (dict(src_layer_range=[0, 1]), TypeError),
        (dict(src_layer_range=(0, 2)), TypeError),
        (dict(src_layer_range=2), TypeError),
        (dict(src_batch_index=-1), ValueError),
        (dict(src_batch_index=2**32), ValueError),
        (dict(src_batch_index=None), TypeError),
        (dict(src_batch_index=False), TypeError),
    ],
)
def test_transfer_config_type_and_range_errors(kwargs, exc):
    args = dict(dst_cluster_id=1, dst_addrs=[1, 2])
    args.update(kwargs)
    with pytest.raises(exc):
        TransferConfig(**args)


@pytest.mark.parametrize(
    "rng", [range(0, 4, 2), range(2, 2), range(3, 1), range(-1, 2), range(2, 0, -1)]
)
def test_transfer_config_bad_layer_range(rng):
    with raises_llm():
        TransferConfig(1, [1, 2], rng)


def test_transfer_config_setters_revalidate():
    t = TransferConfig(1, [1, 2], range(0, 1), 0)
    t.dst_cluster_id = 9
    t.dst_addrs = (7, 8, 9, 10)
    t.src_layer_range = range(1, 3)
    t.src_batch_index = 4
    assert (t.dst_cluster_id, t.dst_addrs, t.src_layer_range, t.src_batch_index) == (
        9,
        [7, 8, 9, 10],
        range(1, 3),
        4,
    )
    t.src_layer_range = None
    assert t.src_layer_range is None
    with pytest.raises(ValueError):
        t.dst_cluster_id = -1
    with pytest.raises(TypeError):
        t.dst_addrs = None
    with pytest.raises(ValueError):
        t.dst_addrs = [1, -1]
    with pytest.raises(TypeError):
        t.src_layer_range = [0, 1]
    with raises_llm():
        t.src_layer_range = range(0, 4, 2)
    with pytest.raises(ValueError):
        t.src_batch_index = 2**32
    assert (t.dst_cluster_id, t.dst_addrs, t.src_layer_range, t.src_batch_index) == (
        9,
        [7, 8, 9, 10],
        None,
        4,
    )


def test_transfer_config_repr_shows_all_fields():
    r = repr(TransferConfig(42, [0x1000, 0x2000], range(1, 2), 3))
    assert r == (
        "TransferConfig(dst_cluster_id=42, dst_addrs=[4096, 8192], "
        "src_layer_range=range(1, 2), src_batch_index=3)"
    )


# ---------------------------------------------------------------- TransferWithCacheKeyConfig


def test_key_config_properties():
    key = CacheKeyByIdAndIndex(11, 3, 1)
    t = TransferWithCacheKeyConfig(key, range(2, 4), range(0, 2), 5)
    assert t.cache_key is key
    assert t.src_layer_range == range(2, 4)
    assert t.dst_layer_range == range(0, 2)
    assert t.src_batch_index == 5
    assert t.dst_cluster_id == 11
    b = TransferWithCacheKeyConfig(BlocksCacheKey(prompt_cluster_id=8), range(0, 3), range(1, 4))
    assert b.dst_cluster_id == 8 and b.src_batch_index == 0
    with pytest.raises(AttributeError):
        b.dst_cluster_id = 1


@pytest.mark.parametrize(
    "args,exc",
    [
        ((None, range(0, 1), range(0, 1)), TypeError),
        ((CacheKey(1, 2), range(0, 1), range(0, 1)), TypeError),
        ((1, range(0, 1), range(0, 1)), TypeError),
        ((BlocksCacheKey(1), None, range(0, 1)), TypeError),
        ((BlocksCacheKey(1), range(0, 1), None), TypeError),
        ((BlocksCacheKey(1),), TypeError),
        ((BlocksCacheKey(1), [0], range(0, 1)), TypeError),
        ((BlocksCacheKey(1), range(0, 1), (0, 1)), TypeError),
        ((CacheKeyByIdAndIndex(1, 1), range(0, 1), range(0, 1), -1), ValueError),
        ((CacheKeyByIdAndIndex(1, 1), range(0, 1), range(0, 1), 2**32), ValueError),
        ((CacheKeyByIdAndIndex(1, 1), range(0, 1), range(0, 1), "0"), TypeError),
        ((CacheKeyByIdAndIndex(1, 1), range(0, 1), range(0, 1), True), TypeError),
    ],
)
def test_key_config_type_and_range_errors(args, exc):
    with pytest.raises(exc):
        TransferWithCacheKeyConfig(*args)


@pytest.mark.parametrize(
    "args",
    [
        (BlocksCacheKey(1), range(0, 2), range(0, 3)),
        (BlocksCacheKey(1), range(1, 5), range(1, 2)),  # upstream's length check misses this one
        (BlocksCacheKey(1), range(0, 2, 2), range(0, 1)),
        (BlocksCacheKey(1), range(0, 1), range(1, 1)),
        (BlocksCacheKey(1), range(-1, 1), range(0, 2)),
        (BlocksCacheKey(1), range(0, 1), range(0, 1), 1),
    ],
)
def test_key_config_illegal_values(args):
    with raises_llm():
        TransferWithCacheKeyConfig(*args)


def test_key_config_setters_revalidate():
    t = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(1, 2), range(0, 2), range(2, 4), 3)
    # Switching to a BlocksCacheKey while src_batch_index != 0 is illegal.
    with raises_llm():
        t.cache_key = BlocksCacheKey(1)
    assert isinstance(t.cache_key, CacheKeyByIdAndIndex)
    with pytest.raises(TypeError):
        t.cache_key = CacheKey(1, 2)
    with pytest.raises(TypeError):
        t.cache_key = None
    t.src_batch_index = 0
    t.cache_key = BlocksCacheKey(6)
    assert t.dst_cluster_id == 6
    with raises_llm():
        t.src_batch_index = 1
    assert t.src_batch_index == 0
    with pytest.raises(ValueError):
        t.src_batch_index = -1
    with pytest.raises(TypeError):
        t.src_layer_range = None
    with pytest.raises(TypeError):
        t.dst_layer_range = None
    with raises_llm():
        t.src_layer_range = range(0, 3)  # length differs from dst_layer_range
    with raises_llm():
        t.dst_layer_range = range(0, 4, 2)
    t.src_layer_range = range(5, 7)
    t.dst_layer_range = range(0, 2)
    assert (t.src_layer_range, t.dst_layer_range) == (range(5, 7), range(0, 2))


def test_key_config_repr_shows_all_fields():
    r = repr(TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(1, 2, 3), range(0, 2), range(4, 6), 7))
    assert r == (
        "TransferWithCacheKeyConfig(cache_key=CacheKeyByIdAndIndex(cluster_id=1, "
        "cache_id=2, batch_index=3), src_layer_range=range(0, 2), "
        "dst_layer_range=range(4, 6), src_batch_index=7)"
    )
