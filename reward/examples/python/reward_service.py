#!/usr/bin/python3
"""A Quillan reward service in Python: exact match on the `answer` metadata field.

It speaks reward/PROTOCOL.md with Debian's python3-zmq and python3-protobuf. The message
classes are generated at build time by protoc from proto/*.proto (the build puts them in
BUILD/reward/python); point --gen-dir (or $QUILLAN_PY_GEN_DIR) at that directory.

Scoring: the completion, with trailing copies of the EOS text and surrounding whitespace
removed, is compared with the answer (a JSON string, or a number's JSON text). 1.0 when equal,
0.0 when not, and "no reward" (the score field left unset) when the request's metadata has no
`answer` or it is null: a missing answer means the sample cannot be judged, which is not the
same as wrong.

Run:  /usr/bin/python3 reward_service.py --bind tcp://127.0.0.1:5560 --gen-dir build/reward/python
Stop: SIGINT or SIGTERM (it prints its counters as a JSON line on the way out).
"""
import argparse
import json
import os
import random
import signal
import sys
import time

REWARD_PROTOCOL_VERSION = 1  # QUILLAN_REWARD_PROTOCOL_VERSION in proto/wire_codec.h
MAX_SAMPLES = 4096           # REWARD_MAX_SAMPLES in reward/scorers.h
MAX_FRAME_BYTES = 4 << 20    # network.max_msg_bytes default


def log(level, event, text="", **fields):
    rec = {"time": time.time(), "process": "python-reward", "level": level, "event": event}
    if fields:
        rec["fields"] = fields
    if text:
        rec["text"] = text
    print(json.dumps(rec), file=sys.stderr, flush=True)


def normalise(text, eos):
    """Trailing EOS copies and whitespace off the end, whitespace off the start."""
    while True:
        before = text
        text = text.rstrip()
        if eos and text.endswith(eos):
            text = text[: -len(eos)]
        if text == before:
            return text.lstrip()


def answer_of(metadata, key):
    """The answer as text, or None when it is missing. Values are JSON-encoded."""
    raw = metadata.get(key)
    if raw is None:
        return None
    value = json.loads(raw)  # ValueError on bad JSON: the caller answers "no reward"
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return raw.strip()  # the number's text as written ("1.50" stays "1.50")
    raise ValueError("answer is a JSON %s" % type(value).__name__)


def score_request(pb, req, answer_key, eos):
    """One ScoreEntry per sample, in request order."""
    try:
        answer = answer_of(req.metadata, answer_key)
        why = "metadata has no '%s'" % answer_key
    except ValueError as e:
        answer, why = None, "metadata '%s': %s" % (answer_key, e)
    entries = []
    for sample in req.samples:
        entry = pb.reward.ScoreEntry()
        if answer is None:
            entry.detail = "no reward: " + why  # score left unset = no reward
        else:
            same = normalise(sample.completion, eos) == normalise(answer, eos)
            entry.score = 1.0 if same else 0.0
            entry.detail = "exact=%d" % same
        entries.append(entry)
    return entries


class Protos:
    def __init__(self, gen_dir):
        sys.path.insert(0, gen_dir)
        import envelope_pb2
        import reward_pb2
        self.envelope = envelope_pb2
        self.reward = reward_pb2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bind", default="tcp://127.0.0.1:5560", help="ZeroMQ endpoint (ROUTER)")
    ap.add_argument("--gen-dir", default=os.environ.get("QUILLAN_PY_GEN_DIR", ""),
                    help="directory of the protoc-generated *_pb2.py files")
    ap.add_argument("--answer-key", default="answer", help="metadata field with the answer")
    ap.add_argument("--eos-text", default="<|endoftext|>", help="stripped from completions")
    args = ap.parse_args()
    if not args.gen_dir or not os.path.isfile(os.path.join(args.gen_dir, "envelope_pb2.py")):
        ap.error("--gen-dir: no envelope_pb2.py in '%s' (build the project first)" % args.gen_dir)

    import zmq
    from google.protobuf.message import DecodeError

    pb = Protos(args.gen_dir)
    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 500)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.bind(args.bind)
    incarnation = random.getrandbits(64) or 1
    next_id = 0
    counts = {"requests": 0, "samples": 0, "no_reward": 0, "dropped": 0, "reply_failed": 0}
    log("info", "reward.start", "serving on %s" % sock.getsockopt(zmq.LAST_ENDPOINT).decode())

    def drop(why):
        counts["dropped"] += 1
        log("warn", "reward.drop", why, dropped=counts["dropped"])

    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop:
        try:
            if not poller.poll(200):
                continue
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EAGAIN, zmq.EINTR):
                continue
            raise
        # [routing id][Envelope] from a DEALER, [routing id][""][Envelope] from a REQ.
        route, body = frames[:1], frames[1:]
        if len(body) == 2 and body[0] == b"":
            route, body = frames[:2], frames[2:]
        if len(body) != 1:
            drop("%d frames where [Envelope] belongs" % len(body))
            continue
        env = pb.envelope.Envelope()
        try:
            env.ParseFromString(body[0])
        except DecodeError as e:
            drop("not an Envelope: %s" % e)
            continue
        if env.protocol_version != REWARD_PROTOCOL_VERSION:
            drop("reward protocol version %d, this service speaks %d"
                 % (env.protocol_version, REWARD_PROTOCOL_VERSION))
            continue
        if env.WhichOneof("body") != "reward_request":
            drop("a '%s' body; only reward_request is served" % env.WhichOneof("body"))
            continue
        req = env.reward_request
        if not 1 <= len(req.samples) <= MAX_SAMPLES:
            drop("%d samples, expected 1..%d" % (len(req.samples), MAX_SAMPLES))
            continue
        t0 = time.monotonic()
        entries = score_request(pb, req, args.answer_key, args.eos_text)
        next_id += 1
        out = pb.envelope.Envelope(protocol_version=REWARD_PROTOCOL_VERSION,
                                   sender_id="python-reward", incarnation_id=incarnation,
                                   message_id=next_id)
        out.reward_response.request_id = req.request_id
        out.reward_response.scores.extend(entries)
        try:
            sock.send_multipart(route + [out.SerializeToString()], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            counts["reply_failed"] += 1
            log("warn", "reward.reply_failed", str(e))
            continue
        counts["requests"] += 1
        counts["samples"] += len(entries)
        counts["no_reward"] += sum(1 for x in entries if not x.HasField("score"))
        log("debug", "reward.request", "request %d" % req.request_id,
            samples=len(entries), latency_ms=1e3 * (time.monotonic() - t0))
    log("info", "reward.stop", "stopped", **counts)
    sock.close()
    ctx.term()


if __name__ == "__main__":
    main()
