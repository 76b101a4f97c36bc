"""What every Modbus device config has: its link (TCP or RTU), unit id, timing."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from drivers.modbus.links import Link, SerialLink, TcpLink
from gateway.driver import DeviceConfig

_SERIAL_FIELDS = ("serial_port", "baudrate", "parity", "stopbits", "bytesize")


class ModbusDeviceConfig(DeviceConfig):
    """Link and timing fields shared by the Modbus driver families. Unknown keys are rejected."""

    transport: Literal["tcp", "rtu"] = Field(
        default="tcp", description="tcp: Modbus TCP; rtu: Modbus RTU on a serial line (or a pyserial URL)"
    )
    host: str | None = Field(default=None, min_length=1, description="tcp: the device's address")
    port: int = Field(default=502, ge=1, le=65535, description="tcp: the Modbus TCP port")
    serial_port: str | None = Field(
        default=None,
        min_length=1,
        description="rtu: device such as /dev/ttyUSB0, or a pyserial URL such as socket://10.0.0.9:4001",
    )
    baudrate: int = Field(default=9600, ge=1200, le=921600, description="rtu: line speed")
    parity: Literal["N", "E", "O"] = Field(default="N", description="rtu: N, E or O")
    stopbits: Literal[1, 2] = Field(default=1, description="rtu: 1 or 2")
    bytesize: Literal[7, 8] = Field(default=8, description="rtu: data bits")
    unit: int = Field(
        default=1, ge=0, le=255, description="Modbus device id (unit id) of the device on its link"
    )
    # 0.2 s: a press is seen within 0.2 s and accepted after the debounce (one more poll),
    # leaving most of the 2 s alarm budget to the uplink; 5 reads/s is nothing on a LAN.
    # ge 0.05: faster polling adds load on shared RS-485 lines and gains nothing humanly visible.
    poll_interval: float = Field(default=0.2, ge=0.05, le=60, description="seconds between polls")
    # 0.3 s: LAN devices answer in 1-20 ms; a hung box must cost its link little per poll.
    timeout: float = Field(default=0.3, gt=0, le=10, description="seconds to wait for each answer")
    # 3 polls (0.6 s plus timeouts at the defaults): a single lost frame is not an outage,
    # and the center still hears of a dead box within about 2 s.
    offline_after: int = Field(
        default=3, ge=1, le=1000, description="consecutive failed polls before device.offline"
    )
    # 5 s: a box back from a power cut or a replugged cable is found again within seconds,
    # without hammering a link that is down (pymodbus' own default grows to 300 s).
    reconnect_max: float = Field(
        default=5.0, ge=0.1, le=300, description="longest wait between reconnects (s)"
    )

    @model_validator(mode="after")
    def _transport_fields(self) -> Self:
        given = self.model_fields_set
        if self.transport == "tcp":
            if self.host is None:
                raise ValueError("transport tcp needs 'host'")
            wrong = [f for f in _SERIAL_FIELDS if f in given]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: only for transport rtu")
        else:
            if self.serial_port is None:
                raise ValueError("transport rtu needs 'serial_port'")
            wrong = [f for f in ("host", "port") if f in given]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: only for transport tcp")
            if not 1 <= self.unit <= 247:
                raise ValueError("on RTU the unit id is 1..247")
        return self

    @property
    def link(self) -> Link:
        if self.transport == "tcp":
            assert self.host is not None  # the validator guarantees it
            return TcpLink(self.host, self.port)
        assert self.serial_port is not None
        return SerialLink(
            self.serial_port,
            baudrate=self.baudrate,
            parity=self.parity,
            stopbits=self.stopbits,
            bytesize=self.bytesize,
        )
