import pytest

from ingest.events import EngagementEvent
from ingest.kafka_source import RecordBatch
from ingest.parse import parse_batch

pytestmark = pytest.mark.unit

GOOD = (b'{"event_id":"e1","user_id":"u","item_id":"i","event_type":"click",'
        b'"event_time":"2024-01-01T00:00:00Z"}')


def batch(values):
    return RecordBatch("plum.events", 0, 10, 10 + len(values), list(range(10, 10 + len(values))),
                       [b"k"] * len(values), values, [0] * len(values))


@pytest.mark.parametrize("value, reason", [
    (b'{"event_id": ', "Invalid JSON"),
    (b'{"user_id":"u","item_id":"i","event_type":"click","event_time":"2024-01-01T00:00:00Z"}', "event_id: Field required"),
    (GOOD.replace(b'"u"', b"17"), "user_id: Input should be a valid string"),
    (GOOD.replace(b"00:00Z", b"00:00"), "event_time: Input should have timezone info"),
    (GOOD.replace(b"}", b',"watch_seconds":-3}'), "watch_seconds: Input should be greater than or equal to 0"),
    (GOOD.replace(b"click", b"teleport"), "event_type: Input should be"),
    (None, "null value"),
    (b"{" + b" " * 70000 + b"}", "exceeds the limit"),
])
def test_each_bad_record_is_rejected_with_its_reason_and_bytes(value, reason):
    parsed = parse_batch(batch([GOOD, value]), EngagementEvent, max_payload_bytes=65536)
    assert [r.event_id for r in parsed.records] == ["e1"]
    assert parsed.offsets == [10]
    [reject] = parsed.rejects
    assert reason in reject.reason
    assert reject.value == value
    assert reject.offset == 11
    assert (parsed.start_offset, parsed.next_offset) == (10, 12)
