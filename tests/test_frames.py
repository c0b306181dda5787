"""The typed control frames (llmdist/frames.py): the bytes each one puts on the wire are the
protocol's (written out here literally), a frame read back equals the one sent, and every
ill-typed field is refused with ProtocolError."""

from __future__ import annotations

import json

import pytest

from llmdist import BlocksCacheKey, CacheKey, LLMRole
from llmdist.frames import (
    LINK_FRAMES,
    PROTOCOL_VERSION,
    Ack,
    CacheAdd,
    CacheRemove,
    Caches,
    Challenge,
    Hello,
    IpcReady,
    KeyPulled,
    KeyRemove,
    Notify,
    NotifyReply,
    Refuse,
    Unlink,
    VersionMismatch,
    link_frame,
)
from llmdist.wire_checks import ProtocolError

NONCE = bytes(range(16))
UNIX = "llmdist-" + "ab" * 16


def wire(obj: dict) -> str:
    """A frame's JSON as auth.Channel sends it."""
    return json.dumps(obj, separators=(",", ":"))


def back(frame):
    """frame sent and read back: through JSON, then its class's from_wire."""
    return type(frame).from_wire(json.loads(wire(frame.to_wire())))


HELLO = Hello(7, LLMRole.DECODER, 2, "host-a", "host", [], False)

# each frame and the exact JSON it is sent as
ON_THE_WIRE = [
    (
        Challenge(NONCE, True, "host-a", UNIX),
        '{"type":"challenge","version":3,"nonce":"000102030405060708090a0b0c0d0e0f",'
        f'"auth":true,"host":"host-a","unix":"{UNIX}"}}',
    ),
    (
        Challenge(NONCE, False, "host-a"),
        '{"type":"challenge","version":3,"nonce":"000102030405060708090a0b0c0d0e0f",'
        '"auth":false,"host":"host-a"}',
    ),
    (
        HELLO,
        '{"type":"hello","version":3,"cluster_id":7,"role":2,"target":2,"host":"host-a",'
        '"runtime":"host","caches":[],"want_engine":false}',
    ),
    (
        Hello(7, LLMRole.PROMPT, None, "h", "cuda", [], True, mooncake="s", comm="c", nonce=NONCE),
        '{"type":"hello","version":3,"cluster_id":7,"role":1,"target":null,"host":"h",'
        '"runtime":"cuda","caches":[],"want_engine":true,"mooncake":"s","comm":"c",'
        '"nonce":"000102030405060708090a0b0c0d0e0f"}',
    ),
    (Refuse(502, "no", 4), '{"type":"refuse","code":502,"reason":"no","cluster_id":4}'),
    (Refuse(502, "no"), '{"type":"refuse","code":502,"reason":"no"}'),
    (Caches([{"id": 1}]), '{"type":"caches","caches":[{"id":1}]}'),
    (Ack(5), '{"type":"ack","seq":5}'),
    (IpcReady(), '{"type":"ipc_ready"}'),
    (Unlink(3), '{"type":"unlink","seq":3}'),
    (CacheAdd({"id": 1}, 4), '{"type":"cache_add","cache":{"id":1},"seq":4}'),
    (CacheRemove(9, 4), '{"type":"cache_remove","cache_id":9,"seq":4}'),
    (KeyRemove(BlocksCacheKey(1, 2), 4), '{"type":"key_remove","key":["blocks",1,2],"seq":4}'),
    (KeyPulled(CacheKey(1, 2, 3, 4)), '{"type":"key_pulled","key":["cache",1,2,3,4]}'),
    (Notify(6, "aGk="), '{"type":"notify","seq":6,"data":"aGk="}'),
    (NotifyReply(6, 0, ""), '{"type":"notify_reply","seq":6,"code":0,"reason":""}'),
]


@pytest.mark.parametrize("frame,text", ON_THE_WIRE, ids=lambda x: type(x).__name__)
def test_frames_keep_their_bytes_and_read_back_equal(frame, text):
    assert wire(frame.to_wire()) == text
    assert back(frame) == frame


def test_a_welcome_is_a_hello_under_another_type():
    w = HELLO.to_wire(welcome=True)
    assert w["type"] == "welcome" and list(w)[1:] == list(HELLO.to_wire())[1:]
    assert Hello.from_wire(w) == HELLO


def test_link_frames_are_typed_by_their_type():
    assert set(LINK_FRAMES) == {
        "ack",
        "ipc_ready",
        "unlink",
        "cache_add",
        "cache_remove",
        "key_remove",
        "key_pulled",
        "notify",
        "notify_reply",
    }
    assert link_frame({"type": "key_pulled", "key": ["blocks", 1, 2]}) == KeyPulled(
        BlocksCacheKey(1, 2), 0
    )
    assert link_frame({"type": "ack", "seq": 2**64 - 1}) == Ack(2**64 - 1)
    for kind in ("hello", "welcome", "challenge", "caches", "refuse", "fds", "nope"):
        with pytest.raises(ProtocolError, match="unknown message"):
            link_frame({"type": kind})


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "ack", "seq": True},
        {"type": "ack", "seq": -1},
        {"type": "ack", "seq": 1.0},
        {"type": "ack", "seq": 2**64},
        {"type": "unlink", "seq": "1"},
        {"type": "nope", "seq": None},
        {"type": "cache_remove", "seq": 1},
        {"type": "cache_remove", "cache_id": 2**63},
        {"type": "cache_remove", "cache_id": False},
        {"type": "key_remove", "key": ["cache", 1, 2]},
        {"type": "key_remove", "key": "blocks"},
        {"type": "key_pulled"},
        {"type": "key_pulled", "key": ["blocks", 1, True]},
        {"type": "notify", "seq": -2, "data": ""},
        {"type": "notify_reply", "seq": 1, "code": "0", "reason": ""},
        {"type": "notify_reply", "seq": 1, "code": 0, "reason": None},
        {"type": "notify_reply", "seq": 1, "code": True, "reason": ""},
    ],
)
def test_ill_typed_link_frames_are_refused(msg):
    with pytest.raises(ProtocolError):
        link_frame(msg)


def test_notify_without_text_reads_as_no_data():
    """The receiver answers such a notification with a refusal (notifications.py)."""
    assert link_frame({"type": "notify", "seq": 1, "data": 5}) == Notify(1, None)


def test_challenge_checks_version_nonce_and_unix_name():
    good = Challenge(NONCE, True, "h", UNIX).to_wire()
    for field, value, error in [
        ("version", PROTOCOL_VERSION + 1, VersionMismatch),
        ("version", float(PROTOCOL_VERSION), VersionMismatch),
        ("nonce", "00", ProtocolError),
        ("nonce", "zz" * 16, ProtocolError),
        ("unix", "llmdist-../../x", ProtocolError),
        ("unix", 5, ProtocolError),
    ]:
        with pytest.raises(error):
            Challenge.from_wire({**good, field: value})
    # a listener's host that is not text never matches this host's identity
    assert Challenge.from_wire({**good, "host": 5}).host is None
    assert Challenge.from_wire({**good, "auth": 1}).auth is False  # only true is true


@pytest.mark.parametrize(
    "field,value",
    [
        ("version", 2),
        ("cluster_id", "7"),
        ("role", True),
        ("target", -1),
        ("host", 12),
        ("runtime", "tpu"),
        ("caches", {}),
        ("want_engine", 1),
        ("mooncake", 7),
        ("comm", "x" * 5000),
        ("nonce", "00"),
    ],
)
def test_ill_typed_hello_fields_are_refused(field, value):
    with pytest.raises(VersionMismatch if field == "version" else ProtocolError):
        Hello.from_wire({**HELLO.to_wire(), field: value})


def test_a_keyed_hello_nonce_is_read_on_its_own():
    w = HELLO.to_wire()
    with pytest.raises(ProtocolError):
        Hello.nonce_of(w)
    assert Hello.nonce_of({**w, "nonce": NONCE.hex()}) == NONCE


def test_refusals_are_read_leniently():
    assert Refuse.from_wire({"type": "refuse"}) == Refuse(None, "None", None)
    assert Refuse.from_wire({"type": "refuse", "code": "502", "reason": 7, "cluster_id": -1}) == (
        Refuse(None, "7", None)
    )
    assert len(Refuse.from_wire({"type": "refuse", "reason": "x" * 10**5}).reason) == 4096


def test_caches_must_be_a_list():
    with pytest.raises(ProtocolError):
        Caches.from_wire({"type": "caches", "caches": {"id": 1}})
    with pytest.raises(ProtocolError):
        Caches.from_wire({"type": "caches"})
