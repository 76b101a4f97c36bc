"""ONVIF topic table: one captured (or reconstructed, see tests/data/onvif/README.md) reply per row.

Each reply is parsed the way onvif-zeep-async parses a PullMessages answer: zeep's SOAP
binding of the bundled events WSDL, with the hardened settings, ``import onvif`` applied.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import zeep
from lxml import etree
from requests import Response
from requests.structures import CaseInsensitiveDict
from structlog.testing import capture_logs

from drivers.onvif import topics
from drivers.onvif.topics import TABLE, CameraSignal, canonical_topic, decode, decode_all, match, parse_bool
from drivers.onvif.xmlsafe import import_onvif, safe_settings
from gateway.events import EventState, Severity

DATA = Path(__file__).parent / "data" / "onvif"
_PULLPOINT = "{http://www.onvif.org/ver10/events/wsdl}PullPointSubscriptionBinding"


@pytest.fixture(scope="module")
def events_client() -> zeep.Client:
    onvif = import_onvif()
    from onvif.transport import ASYNC_TRANSPORT  # the loader onvif-zeep-async reads its WSDLs with

    wsdl = Path(onvif.__file__).parent / "wsdl" / "events.wsdl"
    return zeep.Client(str(wsdl), transport=ASYNC_TRANSPORT, settings=safe_settings())


def pull_reply(client: zeep.Client, name: str) -> list[Any]:
    """The NotificationMessage list of a stored reply, as ``await PullMessages(...)`` returns it."""
    response = Response()
    response._content = (DATA / name).read_bytes()
    response.status_code = 200
    response.headers = CaseInsensitiveDict({"Content-Type": "application/soap+xml; charset=utf-8"})
    binding = client.wsdl.bindings[_PULLPOINT]
    result = binding.process_reply(client, binding.get("PullMessages"), response)
    messages: list[Any] = result.NotificationMessage
    return messages


@pytest.fixture(autouse=True)
def _fresh_counters() -> None:
    topics.UNKNOWN_TOPICS.clear()
    topics.UNPARSEABLE.clear()


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


# (file, table row topic, expected signal): one row per table row.
ROWS = [
    (
        "hikvision_motion_alarm.xml",
        "VideoSource/MotionAlarm",
        CameraSignal(
            "camera.motion",
            True,
            "VideoSource_1",
            None,
            {},
            Severity.INFO,
            "VideoSource/MotionAlarm",
            "Changed",
            ts("2025-03-13T22:58:02"),
        ),
    ),
    (
        "generic_cell_motion.xml",
        "RuleEngine/CellMotionDetector/Motion",
        CameraSignal(
            "camera.motion",
            True,
            "VideoSourceConfig_1",
            "MyMotionDetectorRule",
            {},
            Severity.INFO,
            "RuleEngine/CellMotionDetector/Motion",
            "Changed",
            ts("2024-05-02T08:15:41"),
        ),
    ),
    (
        "dahua_motion_region.xml",
        "RuleEngine/MotionRegionDetector/Motion",
        CameraSignal(
            "camera.motion",
            True,
            "VideoSourceConfigToken0",
            "MotionDetection-0",
            {},
            Severity.INFO,
            "RuleEngine/MotionRegionDetector/Motion",
            "Changed",
            ts("2024-09-10T06:41:03"),
        ),
    ),
    (
        "generic_tamper.xml",
        "RuleEngine/TamperDetector/Tamper",
        CameraSignal(
            "camera.tamper",
            False,
            "VideoSourceConfig_1",
            "MyTamperDetectorRule",
            {},
            Severity.MAJOR,
            "RuleEngine/TamperDetector/Tamper",
            "Changed",
            ts("2024-05-02T08:20:00"),
        ),
    ),
    (
        "axis_global_scene_change.xml",
        "VideoSource/GlobalSceneChange",
        CameraSignal(
            "camera.tamper",
            False,
            "0",
            None,
            {"cause": "scene_change"},
            Severity.MAJOR,
            "VideoSource/GlobalSceneChange/ImagingService",
            "Initialized",
            ts("2020-09-05T04:45:30.199233"),
        ),
    ),
    (
        "generic_image_too_blurry.xml",
        "VideoSource/ImageTooBlurry",
        CameraSignal(
            "camera.image_quality",
            True,
            "ONFVideoSource_001",
            None,
            {"problem": "too_blurry"},
            Severity.MINOR,
            "VideoSource/ImageTooBlurry/ImagingService",
            "Changed",
            ts("2024-11-20T23:02:11"),
        ),
    ),
    (
        "generic_image_too_dark.xml",
        "VideoSource/ImageTooDark",
        CameraSignal(
            "camera.image_quality",
            True,
            "VideoSource_1",
            None,
            {"problem": "too_dark"},
            Severity.MINOR,
            "VideoSource/ImageTooDark/AnalyticsService",
            "Changed",
            ts("2024-11-20T23:05:00"),
        ),
    ),
    (
        "generic_image_too_bright.xml",
        "VideoSource/ImageTooBright",
        CameraSignal(
            "camera.image_quality",
            False,
            "VideoSource_1",
            None,
            {"problem": "too_bright"},
            Severity.MINOR,
            "VideoSource/ImageTooBright/RecordingService",
            "Changed",
            ts("2024-11-21T07:30:00"),
        ),
    ),
    (
        "generic_line_crossed.xml",
        "RuleEngine/LineDetector/Crossed",
        CameraSignal(
            "camera.line_crossing",
            None,
            "video_source_config1",
            "MyLineDetectorRule",
            {"object_id": "0"},
            Severity.MINOR,
            "RuleEngine/LineDetector/Crossed",
            "Initialized",
            ts("2020-05-24T07:24:47"),
        ),
    ),
    (
        "generic_field_detector.xml",
        "RuleEngine/FieldDetector/ObjectsInside",
        CameraSignal(
            "camera.field_intrusion",
            True,
            "VideoSourceConfig_1",
            "MyFieldDetectorRule",
            {},
            Severity.MINOR,
            "RuleEngine/FieldDetector/ObjectsInside",
            "Changed",
            ts("2024-06-14T21:47:09"),
        ),
    ),
    (
        "generic_digital_input.xml",
        "Device/Trigger/DigitalInput",
        CameraSignal(
            "camera.digital_input",
            True,
            "DigitalInputToken_0",
            None,
            {},
            Severity.MINOR,
            "Device/Trigger/DigitalInput",
            "Changed",
            ts("2024-06-14T22:00:00"),
        ),
    ),
    (
        "hikvision_alarm_in.xml",
        "Device/Trigger/AlarmIn",
        CameraSignal(
            "camera.digital_input",
            True,
            "AlarmIn_1",
            None,
            {},
            Severity.MINOR,
            "Device/Trigger/AlarmIn",
            "Initialized",
            ts("2025-03-13T22:57:26"),
        ),
    ),
    (
        "axis_io_port.xml",
        "Device/IO",
        CameraSignal(
            "camera.digital_input",
            False,
            "1",
            None,
            {},
            Severity.MINOR,
            "Device/IO/Port",
            "Initialized",
            ts("2019-01-15T07:50:45.206264"),
        ),
    ),
    (
        "generic_signal_loss.xml",
        "VideoSource/SignalLoss",
        CameraSignal(
            "camera.video_loss",
            True,
            "ONFVideoSource_001",
            None,
            {},
            Severity.MAJOR,
            "VideoSource/SignalLoss",
            "Changed",
            ts("2024-11-20T23:10:00"),
        ),
    ),
]


@pytest.mark.parametrize(("name", "row_topic", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_captured_reply_decodes(
    events_client: zeep.Client, name: str, row_topic: str, expected: CameraSignal
) -> None:
    [message] = pull_reply(events_client, name)
    row = match(message.Topic._value_1)
    assert row is not None
    assert row.topic == row_topic
    signal = decode(message)
    assert signal == expected
    assert signal.data == expected.data  # data is left out of hash, not of equality
    assert topics.UNKNOWN_TOPICS.total == topics.UNPARSEABLE.total == 0


def test_every_table_row_has_a_captured_reply() -> None:
    assert sorted(r[1] for r in ROWS) == sorted(row.topic for row in TABLE)


def test_event_state_follows_state() -> None:
    signals = {r[0]: r[2] for r in ROWS}
    assert signals["dahua_motion_region.xml"].event_state is EventState.ACTIVE
    assert signals["generic_tamper.xml"].event_state is EventState.CLEARED
    assert signals["generic_line_crossed.xml"].event_state is None


def test_unparseable_value_is_counted_not_raised(events_client: zeep.Client) -> None:
    [message] = pull_reply(events_client, "oem_signal_loss_ture.xml")
    with capture_logs() as logs:
        assert decode(message) is None
        assert decode(message) is None
    assert topics.UNPARSEABLE.snapshot() == {"tns1:VideoSource/SignalLoss": 2}
    assert [e["event"] for e in logs] == ["onvif_unparseable_message"]  # logged once
    assert logs[0]["value"] == "ture"


def test_unknown_topic_is_counted_and_logged_once(events_client: zeep.Client) -> None:
    [message] = pull_reply(events_client, "axis_pir_unknown.xml")
    with capture_logs() as logs:
        for _ in range(3):
            assert decode(message) is None
    assert topics.UNKNOWN_TOPICS.snapshot() == {"tns1:Device/tnsaxis:Sensor/PIR": 3}
    assert logs == [
        {"event": "onvif_unknown_topic", "topic": "tns1:Device/tnsaxis:Sensor/PIR", "log_level": "warning"}
    ]


def test_unknown_topics_are_bounded() -> None:
    counter = topics.TopicCounter("t", max_topics=2)
    with capture_logs():
        for i in range(5):
            counter.add(f"tns1:X/{i}")
    assert counter.snapshot() == {"tns1:X/0": 1, "tns1:X/1": 1, "<other>": 3}


def test_decode_all_skips_what_it_cannot_decode(events_client: zeep.Client) -> None:
    messages = [
        *pull_reply(events_client, "axis_pir_unknown.xml"),
        *pull_reply(events_client, "dahua_motion_region.xml"),
    ]
    with capture_logs():
        assert [s.type for s in decode_all(messages)] == ["camera.motion"]
    assert decode_all(None) == []


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("tns1:RuleEngine/CellMotionDetector/Motion", ("RuleEngine", "CellMotionDetector", "Motion")),
        ("tt:RuleEngine/CellMotionDetector/Motion", ("RuleEngine", "CellMotionDetector", "Motion")),
        ("tns1:RuleEngine/CellMotionDetector/Motion//.", ("RuleEngine", "CellMotionDetector", "Motion")),
        ("tns1:RuleEngine/CellMotionDetector/Motion/", ("RuleEngine", "CellMotionDetector", "Motion")),
        ("http://www.onvif.org/ver10/topics/VideoSource/MotionAlarm", ("VideoSource", "MotionAlarm")),
        ("{http://www.onvif.org/ver10/topics}VideoSource/MotionAlarm", ("VideoSource", "MotionAlarm")),
        ("tns1:Device/Trigger/tnshik:AlarmIn", ("Device", "Trigger", "AlarmIn")),
        ("  tns1:Device/tnsaxis:IO/Port \n", ("Device", "IO", "Port")),
    ],
)
def test_canonical_topic_tolerates_prefixes(text: str, canonical: tuple[str, ...]) -> None:
    assert canonical_topic(text) == canonical


@pytest.mark.parametrize(
    ("text", "row_topic"),
    [
        ("ns0:VideoSource/ImageTooDark/ImagingService", "VideoSource/ImageTooDark"),
        ("tns1:VideoSource/GlobalSceneChange/AnalyticsService", "VideoSource/GlobalSceneChange"),
        ("tns1:ruleengine/celldetector/motion", None),  # a different detector: no partial match
        ("tns1:RuleEngine/CellMotionDetector/People", None),  # Tapo person detection: not ours
        ("tns1:RuleEngine/cellmotiondetector/MOTION", "RuleEngine/CellMotionDetector/Motion"),
        ("tns1:VideoSource", None),
        ("", None),
    ],
)
def test_match(text: str, row_topic: str | None) -> None:
    row = match(text)
    assert (row.topic if row else None) == row_topic


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("Active", True),
        (" true ", True),
        ("false", False),
        ("0", False),
        ("inactive", False),
        ("False", False),
        ("ture", None),
        ("", None),
        ("2", None),
        ("on", None),
        (None, None),
        (1, None),
    ],
)
def test_parse_bool(value: object, parsed: bool | None) -> None:
    assert parse_bool(value) is parsed


def test_decode_reads_an_untyped_message_element() -> None:
    """zeep leaves xsd:any content it cannot type (a tt:Message in a wrong namespace) as lxml."""
    element = etree.fromstring(
        b'<Message xmlns="urn:vendor" UtcTime="2024-01-01T00:00:00Z" PropertyOperation="Changed">'
        b'<Source><SimpleItem Name="Source" Value="vs0"/></Source>'
        b'<Data><SimpleItem Name="State" Value="1"/></Data></Message>'
    )
    message = {"Topic": {"_value_1": "tns1:VideoSource/MotionAlarm"}, "Message": {"_value_1": element}}
    signal = decode(message)
    assert signal is not None
    assert (signal.type, signal.state, signal.source, signal.operation) == (
        "camera.motion",
        True,
        "vs0",
        "Changed",
    )
    assert signal.occurred_at == ts("2024-01-01T00:00:00")


def test_decode_counts_structural_garbage() -> None:
    with capture_logs():
        assert decode({"Topic": None}) is None
        assert decode({"Topic": {"_value_1": "tns1:VideoSource/MotionAlarm"}, "Message": None}) is None
        assert (
            decode(
                {
                    "Topic": {"_value_1": "tns1:VideoSource/MotionAlarm"},
                    "Message": {"_value_1": {"Data": {"SimpleItem": []}}},
                }
            )
            is None
        )
    assert topics.UNPARSEABLE.total == 3


def test_unset_camera_clock_gives_no_time() -> None:
    message = {
        "Topic": {"_value_1": "tns1:VideoSource/MotionAlarm"},
        "Message": {
            "_value_1": {
                "UtcTime": "0000-00-00T00:00:00Z",
                "Data": {"SimpleItem": [{"Name": "State", "Value": "true"}]},
            }
        },
    }
    signal = decode(message)
    assert signal is not None
    assert signal.occurred_at is None
