"""atheris harness for the record decoders: `python tests/fuzz_decode.py -runs=N`.

Every input must decode to a record or raise ProtocolError, on both paths the engine reads:
a ZeroMQ frame (decode) and a shared-memory ring (read_record). Anything else (a crash, another
exception) is a finding. tests/test_records.py runs it briefly when atheris is installed.
"""
import sys

import atheris

with atheris.instrument_imports():
    from minivllm.transport import protocol, shm

RING = shm.create_ring("fuzz", 1 << 16)
shm.unlink_segment(RING.name)  # libFuzzer exits without unwinding: leave no name behind


def one_input(data: bytes) -> None:
    for read in (lambda: protocol.decode(data), lambda: _through_ring(data)):
        try:
            read()
        except protocol.ProtocolError:
            pass


def _through_ring(data: bytes):
    RING.write(data)
    return protocol.read_record(RING)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
