#!/usr/bin/python3
"""Independent safetensors reader: checks a file against the format's rules using only the
Python standard library (struct + json), so it shares no code with Quillan's C reader.

Usage: safetensors_check.py FILE [EXPECT.json] [--quillan]

Checks every rule of the safetensors format: the 8-byte little-endian header length, a header
that starts with '{' and is a JSON object without duplicate keys, an optional __metadata__
string -> string map, known dtypes, non-negative integer shapes, data_offsets whose span equals
prod(shape) * dtype size, and byte ranges that tile the data section exactly (no overlap, no
hole, no trailing bytes).

--quillan also checks what Quillan's writer promises: a header length that is a multiple of 8,
every tensor aligned to its element size, and tensors laid out by decreasing element size,
then name.

EXPECT.json, when given, is {"metadata": {k: v}, "tensors": {name: {"dtype", "shape",
"values"}}}: the file must hold exactly these tensors and metadata, and each tensor's bytes,
decoded here with struct, must equal "values" (row-major, flattened). F8 values are the raw
bytes as integers.

Exit status 0 when every check passes; 1 with one line per failure on stderr otherwise.
"""
import json
import struct
import sys

MAX_HEADER = 100_000_000

# dtype -> (element size, struct format or None for a custom decoder)
DTYPES = {
    "F64": (8, "<d"), "F32": (4, "<f"), "F16": (2, "<e"), "BF16": (2, None),
    "F8_E4M3": (1, "<B"), "F8_E5M2": (1, "<B"),
    "I64": (8, "<q"), "I32": (4, "<i"), "I16": (2, "<h"), "I8": (1, "<b"),
    "U64": (8, "<Q"), "U32": (4, "<I"), "U16": (2, "<H"), "U8": (1, "<B"),
    "BOOL": (1, "<?"),
}


class Invalid(Exception):
    pass


def no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise Invalid(f"duplicate key {k!r} in header")
        seen[k] = v
    return seen


def is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse(blob):
    if len(blob) < 8:
        raise Invalid(f"file is {len(blob)} bytes, shorter than 8")
    (n,) = struct.unpack_from("<Q", blob, 0)
    if n > MAX_HEADER:
        raise Invalid(f"header length {n} exceeds {MAX_HEADER}")
    if n > len(blob) - 8:
        raise Invalid(f"header length {n} exceeds file size - 8")
    raw = blob[8:8 + n]
    if not raw.startswith(b"{"):
        raise Invalid("header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Invalid(f"header is not valid JSON: {e}")
    if not isinstance(header, dict):
        raise Invalid("header is not an object")
    data = blob[8 + n:]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Invalid("__metadata__ is not a string -> string map")
    tensors = {}
    for name, desc in header.items():
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape", "data_offsets"}:
            raise Invalid(f"tensor {name!r}: needs exactly dtype, shape, data_offsets")
        dtype, shape, offs = desc["dtype"], desc["shape"], desc["data_offsets"]
        if dtype not in DTYPES:
            raise Invalid(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(is_count(d) for d in shape):
            raise Invalid(f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(is_count(o) for o in offs):
            raise Invalid(f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        numel = 1
        for d in shape:
            numel *= d
        if end < begin or end - begin != numel * DTYPES[dtype][0]:
            raise Invalid(f"tensor {name!r}: data_offsets {offs} do not match shape {shape}")
        if end > len(data):
            raise Invalid(f"tensor {name!r}: data_offsets {offs} beyond data ({len(data)})")
        tensors[name] = (dtype, shape, begin, end, numel)
    covered = 0
    for name, (_, _, begin, end, _) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != covered:
            raise Invalid(f"tensor {name!r}: starts at {begin}, expected {covered} (hole or overlap)")
        covered = end
    if covered != len(data):
        raise Invalid(f"tensors cover {covered} of {len(data)} data bytes")
    return n, metadata, tensors, data


def decode(dtype, raw, numel):
    size, fmt = DTYPES[dtype]
    out = []
    for i in range(numel):
        chunk = raw[i * size:(i + 1) * size]
        if dtype == "BF16":
            # bfloat16 is the top half of a float32
            out.append(struct.unpack("<f", b"\x00\x00" + chunk)[0])
        else:
            v = struct.unpack(fmt, chunk)[0]
            out.append(int(v) if dtype == "BOOL" else v)
    return out


def check_quillan(n, tensors, failures):
    if n % 8:
        failures.append(f"header length {n} is not a multiple of 8")
    order = sorted(tensors.items(), key=lambda kv: kv[1][2])
    keys = [(-DTYPES[t[0]][0], name) for name, t in order if t[4] > 0]
    if keys != sorted(keys):
        failures.append("tensors are not laid out by decreasing element size, then name")
    for name, (dtype, _, begin, _, _) in tensors.items():
        if begin % DTYPES[dtype][0]:
            failures.append(f"tensor {name!r}: offset {begin} not aligned to its element size")


def check_expect(expect, metadata, tensors, data, failures):
    if expect.get("metadata", {}) != metadata:
        failures.append(f"metadata {metadata!r} != expected {expect.get('metadata')!r}")
    want = expect["tensors"]
    if set(want) != set(tensors):
        failures.append(f"tensor names {sorted(tensors)} != expected {sorted(want)}")
        return
    for name, w in want.items():
        dtype, shape, begin, end, numel = tensors[name]
        if dtype != w["dtype"] or shape != w["shape"]:
            failures.append(f"tensor {name!r}: {dtype} {shape} != expected {w['dtype']} {w['shape']}")
            continue
        got = decode(dtype, data[begin:end], numel)
        values = [int(v) if isinstance(v, str) else v for v in w["values"]]
        if got != values:
            failures.append(f"tensor {name!r}: values {got[:8]}... != expected {values[:8]}...")


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    if not 1 <= len(args) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0], "rb") as f:
        blob = f.read()
    failures = []
    try:
        n, metadata, tensors, data = parse(blob)
    except Invalid as e:
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 1
    if "--quillan" in argv:
        check_quillan(n, tensors, failures)
    if len(args) == 2:
        with open(args[1]) as f:
            check_expect(json.load(f), metadata, tensors, data, failures)
    for msg in failures:
        print(f"{args[0]}: {msg}", file=sys.stderr)
    if not failures:
        print(f"{args[0]}: ok ({len(tensors)} tensors, {len(metadata)} metadata entries)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
