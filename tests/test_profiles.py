"""Profiles load, bad ones fail with located errors; device config and family checks."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from drivers.modbus.profiles import SHIPPED_PACKAGE, available_profiles, find_profile, shipped_dir
from drivers.modbus_alarm import AlarmBoxConfig, AlarmBoxFamily, load_profile
from drivers.modbus_alarm.driver import zone_specs
from drivers.modbus_alarm.profile import Table, parse_profile
from drivers.modbus_alarm.zones import LineBand, ZoneType
from gateway.driver import DeviceConfig, DriverContext
from gateway.errors import ConfigError

SHIPPED = ["adam-6050", "generic-16di", "generic-8di", "generic-8di-eol"]  # alarm boxes
SHIPPED_OTHER = ["generic-bollard-plc"]


def good() -> dict[str, Any]:
    return {
        "inputs": {"count": 4},
        "outputs": {"siren": {"address": 1}},
        "zones": [
            {"input": 0, "type": "panic"},
            {"input": 1, "type": "intrusion"},
            {"input": 2, "type": "tamper", "normally_closed": True},
            {"input": 3, "type": "reset"},
        ],
    }


def issues_of(data: Any, source: str = "profiles/x.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_profile(data, source)
    return str(info.value)


def test_shipped_profiles_load() -> None:
    assert available_profiles([]) == sorted(SHIPPED + SHIPPED_OTHER)
    for name in SHIPPED:
        profile = load_profile(name)
        assert {"ack_led", "siren"} <= set(profile.outputs)
        assert sum(z.type is ZoneType.TAMPER for z in profile.zones) == 1


def test_generic_profiles() -> None:
    for name, n in (("generic-8di", 8), ("generic-16di", 16)):
        p = load_profile(name)
        assert (p.inputs.table, p.inputs.address, p.inputs.count) == (Table.DISCRETE_INPUTS, 0, n)
        assert sorted(z.input for z in p.zones) == list(range(n))
        assert p.outputs["ack_led"].table is Table.COILS


def test_adam_6050_map() -> None:
    p = load_profile("adam-6050")
    assert (p.inputs.table, p.inputs.address, p.inputs.count) == (Table.DISCRETE_INPUTS, 0, 12)
    assert p.outputs["ack_led"].address == 16
    assert p.outputs["siren"].address == 17
    assert sorted(o.address for o in p.outputs.values()) == list(range(16, 22))


def test_eol_profile_has_analog_bands() -> None:
    p = load_profile("generic-8di-eol")
    assert p.analog is not None
    assert [b.band for b in p.analog.bands] == [
        LineBand.SHORT,
        LineBand.NORMAL,
        LineBand.ALARM,
        LineBand.OPEN,
    ]
    assert [z.eol_register for z in p.zones[:6]] == list(range(6))


def test_shipped_profiles_are_package_data() -> None:
    """Installed (editable or not), the profiles are the campus_gateway_profiles package."""
    found = shipped_dir()
    assert found.joinpath("generic-8di.yaml").is_file()
    if importlib.util.find_spec(SHIPPED_PACKAGE) is not None:
        assert importlib.resources.files(SHIPPED_PACKAGE).joinpath("adam-6050.yaml").is_file()


def test_profile_dirs_come_first(tmp_path: Path) -> None:
    data = good()
    data["description"] = "site copy"
    (tmp_path / "generic-8di.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "site-box.yaml").write_text(yaml.safe_dump(good()))
    assert load_profile("generic-8di", [tmp_path]).description == "site copy"
    assert load_profile("site-box", [tmp_path]).inputs.count == 4
    assert load_profile("adam-6050", [tmp_path]).inputs.count == 12  # falls through to shipped
    assert "site-box" in available_profiles([tmp_path])


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="not found; known profiles: adam-6050"):
        load_profile("no-such-box")


@pytest.mark.parametrize("name", ["../etc/passwd", "x/y", "generic-8di.yaml", ".hidden", ""])
def test_profile_names_cannot_escape(name: str) -> None:
    assert find_profile(name, []) is None


def test_bad_zone_type_is_located() -> None:
    data = good()
    data["zones"][3]["type"] = "doorbell"
    message = issues_of(data)
    assert message.startswith("profiles/x.yaml: zones[3].type: Input should be 'panic'")


@pytest.mark.parametrize(
    ("change", "where", "text"),
    [
        (lambda d: d.update(colour="red"), "colour", "unknown key"),
        (lambda d: d.pop("inputs"), "inputs", "required"),
        (lambda d: d["zones"][1].update(input=0), "zones[1].input", "already used by zones[0]"),
        (lambda d: d["zones"][2].update(input=9), "zones[2].input", "outside the inputs block"),
        (lambda d: d["zones"][0].update(eol_register=0), "zones[0].eol_register", "needs an 'analog' block"),
        (lambda d: d["inputs"].update(count=0), "inputs.count", "greater than or equal to 1"),
        (lambda d: d["outputs"].update({"Siren!": {"address": 1}}), "outputs", "lower-case words"),
        (lambda d: d.update(zones=[]), "zones", "at least 1"),
        (lambda d: d["zones"][0].update(colour=1), "zones[0].colour", "unknown key"),
        (
            lambda d: d.update(
                analog={"count": 2, "bands": [{"band": "normal", "below": 10}, {"band": "open"}]}
            ),
            None,
            None,
        ),
        (
            lambda d: d.update(
                analog={"count": 2, "bands": [{"band": "normal"}, {"band": "open", "below": 5}]}
            ),
            "analog.bands",
            "needs 'below'",
        ),
        (
            lambda d: d.update(
                analog={
                    "count": 2,
                    "bands": [
                        {"band": "short", "below": 500},
                        {"band": "normal", "below": 100},
                        {"band": "open"},
                    ],
                }
            ),
            "analog.bands",
            "strictly ascend",
        ),
        (
            lambda d: d.update(
                analog={"count": 2, "bands": [{"band": "short", "below": 5}, {"band": "open"}]}
            ),
            "analog.bands",
            "no 'normal' band",
        ),
    ],
)
def test_bad_profiles_are_located(change: Any, where: str | None, text: str | None) -> None:
    data = good()
    change(data)
    if where is None:
        parse_profile(data, "profiles/x.yaml")  # the control case is valid
        return
    message = issues_of(data)
    assert f"profiles/x.yaml: {where}: " in message
    assert text in message


def test_invalid_yaml_is_located(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("inputs:\n  count: 4\nzones: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+ column \d+: invalid YAML"):
        load_profile("broken", [tmp_path])


def test_top_level_must_be_a_mapping() -> None:
    assert "a profile is a mapping" in issues_of(["inputs"])


# ---- device config and family checks -------------------------------------------------


def box(**kw: Any) -> dict[str, Any]:
    return {"id": "gate-box", "driver": "modbus_alarm", "host": "127.0.0.1", "profile": "generic-8di", **kw}


def test_config_defaults() -> None:
    cfg = AlarmBoxConfig.model_validate(box())
    assert (cfg.transport, cfg.port, cfg.unit, cfg.poll_interval, cfg.timeout, cfg.offline_after) == (
        "tcp",
        502,
        1,
        0.2,
        0.3,
        3,
    )
    assert cfg.link.label == "tcp://127.0.0.1:502"
    own = set(AlarmBoxConfig.model_fields) - set(DeviceConfig.model_fields)
    for name in own:
        assert AlarmBoxConfig.model_fields[name].description, f"{name} has no description"


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ({"colour": "red"}, "Extra inputs are not permitted"),
        ({"poll_interval": 0.01}, "greater than or equal to 0.05"),
        ({"transport": "rtu", "serial_port": "/dev/ttyS0"}, "host: only for transport tcp"),
        ({"transport": "rtu", "host": None}, "transport rtu needs 'serial_port'"),
        ({"host": None}, "transport tcp needs 'host'"),
        ({"baudrate": 19200}, "only for transport rtu"),
        ({"profile": "../x"}, "String should match pattern"),
        ({"zones": {"3": {"colour": "red"}}}, "Extra inputs are not permitted"),
        ({"debounce_ms": 50, "debounce_samples": 3}, "not both"),
    ],
)
def test_config_rejects(extra: dict[str, Any], text: str) -> None:
    with pytest.raises(ValidationError, match=text):
        AlarmBoxConfig.model_validate(box(**extra))


def test_rtu_config() -> None:
    cfg = AlarmBoxConfig.model_validate(
        {
            "id": "b",
            "driver": "modbus_alarm",
            "transport": "rtu",
            "serial_port": "/dev/ttyUSB0",
            "profile": "x",
        }
    )
    assert cfg.link.key == ("rtu", "/dev/ttyUSB0")
    with pytest.raises(ValidationError, match=r"1\.\.247"):
        AlarmBoxConfig.model_validate(
            {
                "id": "b",
                "driver": "modbus_alarm",
                "transport": "rtu",
                "serial_port": "/dev/x",
                "profile": "x",
                "unit": 0,
            }
        )


def test_family_check_reports_profiles_units_and_zones() -> None:
    devices = [
        AlarmBoxConfig.model_validate(box(id="a")),
        AlarmBoxConfig.model_validate(box(id="b", unit=5, profile="nope")),
        AlarmBoxConfig.model_validate(box(id="c", host="127.0.0.1", port=502)),  # same link+unit as a
        AlarmBoxConfig.model_validate(box(id="d", unit=2, zones={9: {"name": "x"}})),
        AlarmBoxConfig.model_validate(box(id="e", unit=3, zones={7: {"name": "Key"}})),
    ]
    issues = AlarmBoxFamily.check(devices, DriverContext())
    assert [(i, path) for i, path, _ in issues] == [(1, "profile"), (2, "unit"), (3, "zones.9")]
    assert "unknown" not in issues[0][2]
    assert "not found" in issues[0][2]
    assert "also devices[0]" in issues[1][2]


def test_zone_overrides_apply() -> None:
    cfg = AlarmBoxConfig.model_validate(
        box(zones={0: {"name": "Guard room", "location": "main gate"}, 1: {"type": "intrusion"}})
    )
    specs = {s.index: s for s in zone_specs(load_profile("generic-8di"), cfg.zones)}
    assert (specs[0].name, specs[0].location, specs[0].type) == ("Guard room", "main gate", ZoneType.PANIC)
    assert specs[1].type is ZoneType.INTRUSION
    assert specs[1].name == "Panic button 2"  # the profile's name, since not overridden
    assert specs[6].normally_closed


def test_override_with_type_makes_an_unused_input_a_zone(tmp_path: Path) -> None:
    data = good()
    data["inputs"]["count"] = 6
    (tmp_path / "sparse.yaml").write_text(yaml.safe_dump(data))
    cfg = AlarmBoxConfig.model_validate(box(profile="sparse", zones={5: {"type": "fire", "name": "Kitchen"}}))
    ctx = DriverContext(profile_dirs=(tmp_path,))
    assert AlarmBoxFamily.check([cfg], ctx) == []
    specs = {s.index: s for s in zone_specs(load_profile("sparse", [tmp_path]), cfg.zones)}
    assert specs[5].type is ZoneType.FIRE
    bad = AlarmBoxConfig.model_validate(box(profile="sparse", zones={4: {"name": "no type"}}))
    assert [p for _, p, _ in AlarmBoxFamily.check([bad], ctx)] == ["zones.4"]
