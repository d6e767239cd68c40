"""Independent reader of TensorBoard event files (issue 6, acceptance 3).

    tb_read.py GEN_DIR EVENT_DIR LOG.jsonl [MIN_STEPS]

GEN_DIR holds tensorboard_pb2 (protoc --python_out of proto/tensorboard.proto). Reads every
event file of EVENT_DIR record by record, checks both masked CRC-32C of every record (computed
here, bit by bit, from the CRC-32C definition), that the first event is file_version
"brain.Event:2", and that every scalar equals the float32 rounding of the same field of the
learner.step / eval record of the same step in LOG.jsonl (the learner's JSON log). Exits 1 on
any mismatch."""
import glob
import json
import math
import os
import struct
import sys

sys.path.insert(0, sys.argv[1])
import tensorboard_pb2  # noqa: E402


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def masked(crc):
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def records(path):
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        assert pos + 12 <= len(data), f"{path}: truncated header at {pos}"
        head = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", head)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert hcrc == masked(crc32c(head)), f"{path}: bad length CRC at {pos}"
        body = data[pos + 12:pos + 12 + n]
        assert len(body) == n, f"{path}: truncated record at {pos}"
        (dcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        assert dcrc == masked(crc32c(body)), f"{path}: bad data CRC at {pos}"
        yield body
        pos += 16 + n


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    event_dir, log = sys.argv[2], sys.argv[3]
    min_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    want = {}  # (step, tag) -> value from the JSON log
    with open(log) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not isinstance(r, dict) or r.get("event") not in ("learner.step", "eval"):
                continue
            fields = r.get("fields", {})
            if not isinstance(fields.get("step"), (int, float)):
                continue
            for k, v in fields.items():
                if k != "step":
                    want[(int(fields["step"]), k)] = v
    files = sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*")))
    assert files, f"no event files in {event_dir}"
    n_records = n_scalars = 0
    steps = set()
    for path in files:
        for i, body in enumerate(records(path)):
            ev = tensorboard_pb2.Event()
            ev.ParseFromString(body)
            n_records += 1
            if i == 0:
                assert ev.WhichOneof("what") == "file_version", f"{path}: first event"
                assert ev.file_version == "brain.Event:2", ev.file_version
                continue
            assert ev.WhichOneof("what") == "summary", f"{path}: record {i} has no summary"
            assert ev.wall_time > 1e9, ev.wall_time
            steps.add(ev.step)
            for v in ev.summary.value:
                key = (ev.step, v.tag)
                assert key in want, f"{path}: step {ev.step} tag {v.tag} is not in {log}"
                w = want[key]
                if w is None:  # the log writes NaN and infinities as null
                    assert not math.isfinite(v.simple_value), (key, v.simple_value)
                else:
                    assert v.simple_value == f32(w), (key, v.simple_value, w)
                n_scalars += 1
    assert len(steps) >= min_steps, f"only {len(steps)} steps in the event files"
    print(f"tb_read: {len(files)} files, {n_records} records with valid CRCs, "
          f"{n_scalars} scalars over {len(steps)} steps equal to {log}")


main()
