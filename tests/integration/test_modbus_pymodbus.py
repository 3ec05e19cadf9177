#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""The Modbus adapter against pymodbus (python3-pymodbus, Debian bookworm: 3.0.0rc1) as a real
third-party peer: a pymodbus TCP server (and a pymodbus RTU server on a socat pty pair), started
by this test as a subprocess (this very file with --serve) and stopped by pid. Its register
contents are encoded with pymodbus's own BinaryPayloadBuilder, an implementation independent of
the adapter's codecs and of tests/sim/modbus-sim.c. Checked from outside: telemetry (fieldhubctl
monitor-events), the twin, the log, and the server's registers read back through pymodbus's
client.

The server map (unit 3; zero_mode: request address a is register a):
  holding 0 int16 -2 | 1 uint16 51234 | 2 int16 0x0102 byte-swapped (BADC) = 258
  10.. uint32 3000000000 ABCD, 12.. CDAB | 20.. int32 -123456789 ABCD, 22.. CDAB
  30.. float32 -123.456 ABCD, 32.. BADC, 34.. CDAB, 36.. DCBA | 40 1234 (scale 0.1, offset -3)
  41 0xA005 (bits 0, 2, 13, 15) | 50..54 "PYMODBUS-3" | 60 int16 writable setpoint (scale 0.1)
  62.. uint32 CDAB writable (FC16)
  input registers 0 1000, 1.. float32 2.5e-3 DCBA | coils 0..7 10110010, coil 10 writable
  discrete inputs 0..3 0110.
Needs python3-pymodbus with python3-serial(-asyncio) (pymodbus.server imports serial); skips
(77) without them."""

import math
import os
import signal
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

UNIT = 3
F32 = -123.456
F32_IR = 2.5e-3
ORDERS = {"ABCD": (">", ">"), "BADC": ("<", ">"), "CDAB": (">", "<"), "DCBA": ("<", "<")}


# ---- the pymodbus server (this file run with --serve) ---------------------------------------

def server_map():
    """(holding, input, coils, discrete) lists for unit 3, encoded by pymodbus."""
    from pymodbus.constants import Endian
    from pymodbus.payload import BinaryPayloadBuilder

    def regs(order, add):
        bo, wo = ORDERS[order]
        b = BinaryPayloadBuilder(byteorder=Endian.Big if bo == ">" else Endian.Little,
                                 wordorder=Endian.Big if wo == ">" else Endian.Little)
        add(b)
        return b.to_registers()

    hr = [0] * 100
    ir = [0] * 20

    def put(table, addr, values):
        table[addr:addr + len(values)] = values
    put(hr, 0, regs("ABCD", lambda b: b.add_16bit_int(-2)))
    put(hr, 1, regs("ABCD", lambda b: b.add_16bit_uint(51234)))
    put(hr, 2, regs("BADC", lambda b: b.add_16bit_uint(0x0102)))
    put(hr, 10, regs("ABCD", lambda b: b.add_32bit_uint(3000000000)))
    put(hr, 12, regs("CDAB", lambda b: b.add_32bit_uint(3000000000)))
    put(hr, 20, regs("ABCD", lambda b: b.add_32bit_int(-123456789)))
    put(hr, 22, regs("CDAB", lambda b: b.add_32bit_int(-123456789)))
    for i, order in enumerate(("ABCD", "BADC", "CDAB", "DCBA")):
        put(hr, 30 + 2 * i, regs(order, lambda b: b.add_32bit_float(F32)))
    hr[40] = 1234
    hr[41] = 0xA005
    put(hr, 50, regs("ABCD", lambda b: b.add_string("PYMODBUS-3")))
    hr[60] = 100
    put(hr, 62, regs("CDAB", lambda b: b.add_32bit_uint(7)))
    ir[0] = 1000
    put(ir, 1, regs("DCBA", lambda b: b.add_32bit_float(F32_IR)))
    coils = [True, False, True, True, False, False, True, False] + [False] * 12
    discrete = [False, True, True, False] + [False] * 16
    return hr, ir, coils, discrete


def serve(kind, where, ready):
    """Runs a pymodbus server until SIGTERM: kind "tcp" (where = port, 0 for any) or "rtu"
    (where = serial device path); writes the TCP port (or "rtu") to ready once serving."""
    import asyncio
    from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext, ModbusSlaveContext
    from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer
    from pymodbus.transaction import ModbusRtuFramer

    hr, ir, coils, discrete = server_map()
    slave = ModbusSlaveContext(di=ModbusSequentialDataBlock(0, discrete), co=ModbusSequentialDataBlock(0, coils),
                               hr=ModbusSequentialDataBlock(0, hr), ir=ModbusSequentialDataBlock(0, ir),
                               zero_mode=True)
    context = ModbusServerContext(slaves={UNIT: slave}, single=False)

    async def run():
        if kind == "tcp":
            server = await StartAsyncTcpServer(context=context, address=("127.0.0.1", int(where)),
                                               allow_reuse_address=True, defer_start=True)
            task = asyncio.create_task(server.serve_forever())
            await server.serving
            port = server.server.sockets[0].getsockname()[1]
        else:
            server = await StartAsyncSerialServer(context=context, framer=ModbusRtuFramer, port=where,
                                                  baudrate=19200, parity="N", bytesize=8, stopbits=1,
                                                  defer_start=True)
            await server.start()
            if server.transport is None:
                raise SystemExit(f"pymodbus could not open {where}")
            task = asyncio.create_task(server.serve_forever())
            port = "rtu"
        with open(ready + ".tmp", "w") as f:
            f.write(str(port))
        os.rename(ready + ".tmp", ready)
        await task
    asyncio.run(run())


# ---- the test -------------------------------------------------------------------------------

if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--serve":
    serve(sys.argv[2], sys.argv[3], sys.argv[4])
    sys.exit(0)

from fhlib import Daemon, Skip, at_exit, config_text, ctl, main, pty_pair, tmpdir, write  # noqa: E402
from fhlib import telemetry_events as events, reported, wait_for  # noqa: E402


def need_pymodbus():
    try:
        import pymodbus  # noqa: F401
        from pymodbus.server import StartAsyncTcpServer  # noqa: F401  (imports serial)
    except ImportError as e:
        raise Skip(f"pymodbus server not importable ({e}): apt-get install python3-pymodbus python3-serial-asyncio")


class PyServer:
    """The pymodbus server subprocess, stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, d, kind, where, name="pymodbus"):
        self.d, self.kind, self.where, self.name = d, kind, str(where), name
        self.proc = None
        self.start()
        at_exit(self.stop)

    def start(self):
        ready = os.path.join(self.d, self.name + ".ready")
        if os.path.exists(ready):
            os.unlink(ready)
        err = os.path.join(self.d, self.name + ".err")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", self.kind, self.where, ready],
                                     stdout=subprocess.DEVNULL, stderr=open(err, "a"))
        end = time.monotonic() + 15
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise AssertionError(f"pymodbus server exited ({self.proc.returncode}): {open(err).read()[-2000:]}")
            assert time.monotonic() < end, f"pymodbus server did not start: {open(err).read()[-2000:]}"
            time.sleep(0.05)
        self.port = open(ready).read().strip()
        if self.kind == "tcp":
            self.where = self.port        # a restart listens on the same port

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def read(self, table, address, count):
        """Reads through pymodbus's own client (TCP only)."""
        from pymodbus.client import ModbusTcpClient
        c = ModbusTcpClient("127.0.0.1", port=int(self.port), timeout=2)
        assert c.connect(), "pymodbus client cannot connect"
        try:
            fn = {"holding_register": c.read_holding_registers, "coil": c.read_coils}[table]
            r = fn(address, count, slave=UNIT)
            assert not r.isError(), r
            return list(r.registers) if table == "holding_register" else list(r.bits[:count])
        finally:
            c.close()


def start(d, adapters_yaml):
    cfg = write(os.path.join(d, "fieldhub.yaml"), config_text(d, extra="adapters:\n" + adapters_yaml))
    daemon = Daemon(cfg)
    daemon.wait_log(r"fieldhubd .* started")
    return daemon


def f32(x):
    return struct.unpack(">f", struct.pack(">f", x))[0]


POINTS = """
          - {name: i16, table: holding_register, address: 0, type: int16}
          - {name: u16, table: holding_register, address: 1}
          - {name: i16_badc, table: holding_register, address: 2, type: int16, byte_order: BADC}
          - {name: u32_abcd, table: holding_register, address: 10, type: uint32}
          - {name: u32_cdab, table: holding_register, address: 12, type: uint32, byte_order: CDAB}
          - {name: i32_abcd, table: holding_register, address: 20, type: int32}
          - {name: i32_cdab, table: holding_register, address: 22, type: int32, byte_order: CDAB}
          - {name: f32_abcd, table: holding_register, address: 30, type: float32}
          - {name: f32_badc, table: holding_register, address: 32, type: float32, byte_order: BADC}
          - {name: f32_cdab, table: holding_register, address: 34, type: float32, byte_order: CDAB}
          - {name: f32_dcba, table: holding_register, address: 36, type: float32, byte_order: DCBA}
          - {name: scaled, table: holding_register, address: 40, scale: 0.1, offset: -3, unit: degC}
          - {name: bit0, table: holding_register, address: 41, type: bit, bit: 0}
          - {name: bit1, table: holding_register, address: 41, type: bit, bit: 1}
          - {name: bit13, table: holding_register, address: 41, type: bit, bit: 13}
          - {name: bit15, table: holding_register, address: 41, type: bit, bit: 15}
          - {name: label, table: holding_register, address: 50, type: string, length: 5}
          - {name: setpoint, table: holding_register, address: 60, type: int16, scale: 0.1, writable: true}
          - {name: total, table: holding_register, address: 62, type: uint32, byte_order: CDAB, writable: true}
          - {name: ir0, table: input_register, address: 0}
          - {name: ir_f32_dcba, entity: "300002", type: float32, byte_order: DCBA}
          - {name: coil0, table: coil, address: 0}
          - {name: coil1, table: coil, address: 1}
          - {name: coil3, table: coil, address: 3}
          - {name: relay, table: coil, address: 10, writable: true}
          - {name: di0, table: discrete_input, address: 0}
          - {name: di2, table: discrete_input, address: 2}
"""

EXPECTED = {
    "i16": -2, "u16": 51234, "i16_badc": 258, "u32_abcd": 3000000000, "u32_cdab": 3000000000,
    "i32_abcd": -123456789, "i32_cdab": -123456789,
    "f32_abcd": f32(F32), "f32_badc": f32(F32), "f32_cdab": f32(F32), "f32_dcba": f32(F32),
    "scaled": 120.4, "bit0": True, "bit1": False, "bit13": True, "bit15": True, "label": "PYMODBUS-3",
    "setpoint": 10.0, "total": 7, "ir0": 1000, "ir_f32_dcba": f32(F32_IR),
    "coil0": True, "coil1": False, "coil3": True, "relay": False, "di0": False, "di2": True,
}


def check_values(payload, expected=EXPECTED):
    vals, qual = payload["values"], payload["quality"]
    for k, v in expected.items():
        assert qual.get(k) == "good", (k, qual.get(k))
        got = vals[k]
        if isinstance(v, float):
            assert isinstance(got, (int, float)) and math.isclose(got, v, rel_tol=1e-6), f"{k}: {got!r} != {v!r}"
        else:
            assert got == v and type(got) is type(v), f"{k}: {got!r} != {v!r}"


def test_tcp_values_writes_and_peer_restart():
    need_pymodbus()
    d = tmpdir()
    srv = PyServer(d, "tcp", 0)
    daemon = start(d, f"""  - type: modbus
    name: py
    devices:
      - name: py-tcp
        tcp: {{host: 127.0.0.1, port: {srv.port}}}
        unit: {UNIT}
        poll_interval: 300ms
        timeout: 500ms
        backoff: {{min: 200ms, max: 1s}}
        points:{POINTS}""")
    evs = events(d, "py-tcp", 2)
    assert evs, f"no telemetry from py-tcp:\n{daemon.log()[-3000:]}"
    payload, props = evs[-1]
    assert payload["unit"] == UNIT, payload
    check_values(payload)
    assert props["application"]["adapter"] == "py" and props["application"]["pollGroup"] == "300ms", props

    # A desired-property patch writes to pymodbus: FC6 with the scale undone, FC16 in CDAB order,
    # FC5 for a coil; the reported properties follow from the read-back.
    ctl(d, "twin", "update", "py-tcp", "--desired", '{"setpoint": -21.5, "total": 3000000001, "relay": true}')
    wait_for(lambda: (lambda r: r.get("setpoint") == -21.5 and r.get("total") == 3000000001 and r.get("relay") is True)(
        reported(d, "py-tcp")), what="reported read-back of the desired writes")
    assert srv.read("holding_register", 60, 1) == [(-215) & 0xFFFF]
    assert srv.read("holding_register", 62, 2) == [0x5E01, 0xB2D0]     # 3000000001, low word first
    assert srv.read("coil", 10, 1) == [True]
    # ... and the next polls read them back from the server.
    evs = events(d, "py-tcp", 1)
    assert evs, "no telemetry after the writes"
    check_values(evs[-1][0], dict(EXPECTED, setpoint=-21.5, total=3000000001, relay=True))

    # The peer goes away: the device goes offline (log line naming it, twin state), no good
    # values are reported meanwhile; it comes back: online again, good values.
    assert wait_for(lambda: reported(d, "py-tcp")["modbus"]["state"] == "online", what="state online")
    srv.stop()
    daemon.wait_log(r"Adapter device py-tcp is offline: \S", timeout=10)
    assert wait_for(lambda: reported(d, "py-tcp")["modbus"]["state"] == "offline", what="state offline in the twin")
    for payload, _ in events(d, "py-tcp", 1):
        assert all(q != "good" for q in payload["quality"].values()), payload
    srv.start()
    daemon.wait_log(r"(?s)is offline.*Adapter device py-tcp is online", timeout=10)
    assert wait_for(lambda: reported(d, "py-tcp")["modbus"]["state"] == "online", what="state online again")
    evs = events(d, "py-tcp", 1)
    assert evs, "no telemetry after the peer restarted"
    check_values(evs[-1][0])     # a fresh server: its initial values again
    assert daemon.alive()
    rc, _ = daemon.stop()
    assert rc == 0


def test_rtu_over_pty():
    need_pymodbus()
    d = tmpdir()
    gw, slave = pty_pair(d, "rtu")
    # Parity none: pyserial 3.5 cannot set even parity on a pseudo-terminal (tcsetattr answers
    # EINVAL), and a pty ignores line settings anyway.
    PyServer(d, "rtu", slave)
    daemon = start(d, f"""  - type: modbus
    name: pyrtu
    devices:
      - name: py-rtu
        rtu: {{device: {gw}, baud: 19200, parity: none}}
        unit: {UNIT}
        poll_interval: 300ms
        timeout: 1s
        points:
          - {{name: i32_cdab, table: holding_register, address: 22, type: int32, byte_order: CDAB}}
          - {{name: f32_badc, table: holding_register, address: 32, type: float32, byte_order: BADC}}
          - {{name: label, table: holding_register, address: 50, type: string, length: 5}}
          - {{name: coil3, table: coil, address: 3}}
          - {{name: setpoint, table: holding_register, address: 60, type: int16, scale: 0.1, writable: true}}
""")
    expected = {k: EXPECTED[k] for k in ("i32_cdab", "f32_badc", "label", "coil3", "setpoint")}
    evs = events(d, "py-rtu", 2)
    assert evs, f"no telemetry from py-rtu over RTU:\n{daemon.log()[-3000:]}"
    check_values(evs[-1][0], expected)
    ctl(d, "twin", "update", "py-rtu", "--desired", '{"setpoint": 4.2}')
    wait_for(lambda: reported(d, "py-rtu").get("setpoint") == 4.2, what="RTU write read back")
    rc, _ = daemon.stop()
    assert rc == 0


if __name__ == "__main__":
    main([test_tcp_values_writes_and_peer_restart, test_rtu_over_pty])
