#!/usr/bin/python3
"""End-to-end tests of the RL loop (issue 5, acceptance 3, 4 and 6) with real processes on loopback.

    rl_e2e.py CASE --build BUILD_DIR --src SOURCE_DIR --work WORK_DIR --gen-dir PY_GEN_DIR

quillan-learner, quillan-rollout workers, quillan-reward and the Python reward example are
started as separate processes on free loopback ports; their JSON-line logs (stderr) and a SUB
socket on the log hub are what the assertions read. Cases:

  loop            learner + 2 workers + the C and the Python reward services (weighted): groups
                  from both workers, versions advance, snapshots switch between groups only,
                  deltas applied by the workers, a delta pulled and applied here equal to the
                  full snapshot, checkpoints, learner.step and rollout.group through the hub
  gpt2            the same few steps with the GPT-2 BPE tokenizer and the full 50257 vocabulary
                  (configs/test-gpt2.yaml); exit 77 (skipped) without ../shared/data/gpt2
  kill_worker     SIGKILL a worker holding a lease (its group unscored: the reward service is
                  down): its leases are re-leased, the run finishes, every accepted unit is
                  accepted once (checkpointed lease table)
  reward_restart  SIGKILL the reward service and start it again: workers retry, no group gets
                  a reward the service did not give
  malformed       random bytes, another protocol version, tokens >= vocab, a wrong group size,
                  a wrong frame count and an oversized frame to the dispatcher, weights, hub
                  and reward sockets: each refused and counted, every process stays up
  learner_restart SIGTERM the learner and start it again with --resume auto: same step and
                  version, the same worker processes carry on
  learner_crash   SIGKILL the learner while a worker holds a scored group it has not sent (the
                  reward service is down), send that group to the dead learner, then start the
                  learner again from its last periodic checkpoint: the worker forgets the
                  unacknowledged group and both workers work for the new learner (it once
                  resent such a group to the new learner without end: a livelock)
  lr0             learner.lr 0: every published snapshot has the same tensor bytes as v1
                  (pulled over the weights socket, BLAKE2b checked), ratios stay at 1 and
                  mismatch/kl at its floor
  config          quillan-learner refuses the bad configs of acceptance 6 before binding
                  anything

Only /usr/bin/python3 with Debian's python3-zmq and python3-protobuf is needed. The addition
data set is written here; every process this script starts is stopped on the way out.
"""
import argparse
import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings

SKIP = 77
DISPATCH_V = WEIGHTS_V = REWARD_V = LOG_V = 1  # QUILLAN_*_PROTOCOL_VERSION (proto/wire_codec.h)
G = 4  # group size of every case
LIVENESS_S = 5.0  # network.heartbeat_ivl_s x heartbeat_liveness of configs/tiny.yaml


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


def say(*a):
    print(*a, flush=True)


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def read_records(path):
    """The complete JSON lines of a log file (a line still being written is left out)."""
    out = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n")[:-1]:
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def events(path, name):
    return [r for r in read_records(path) if r.get("event") == name]


def field(r, key, default=None):
    return r.get("fields", {}).get(key, default)


def die_with_parent():
    """In the child: SIGKILL when this driver dies, however it dies (a CTest timeout)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Proc:
    def __init__(self, name, argv, log):
        self.name, self.log = name, log
        self.out = open(log, "ab")
        self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.out,
                                  preexec_fn=die_with_parent)
        self.rc = None

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            self.p.send_signal(sig)

    def wait(self, timeout):
        try:
            self.rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Fail("%s (pid %d) did not exit within %d s" % (self.name, self.p.pid, timeout))
        self.out.close()
        return self.rc


class HubSub:
    """A SUB on the hub's XPUB: counts (sender, event) of every record; garbage is counted."""

    def __init__(self, pb, endpoint):
        import zmq
        self.pb, self.zmq = pb, zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seen, self.garbage, self.stop = {}, 0, False
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        warnings.simplefilter("ignore")  # protobuf's warnings about the garbage it is fed
        while not self.stop:
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart()
            env = self.pb.Envelope()
            try:
                env.ParseFromString(frames[-1 if len(frames) == 1 else 0])
                ok = env.protocol_version == LOG_V and env.WhichOneof("body") == "log_record"
            except Exception:
                ok = False
            with self.lock:
                if not ok:
                    self.garbage += 1
                    continue
                key = (env.sender_id, env.log_record.event)
                self.seen[key] = self.seen.get(key, 0) + 1

    def count(self, event, sender=None):
        with self.lock:
            return sum(n for (s, e), n in self.seen.items()
                       if e == event and (sender is None or s == sender))

    def close(self):
        self.stop = True
        self.t.join()
        self.sock.close()
        self.ctx.term()


class Cluster:
    def __init__(self, a, case, sets=()):
        self.a = a
        self.w = os.path.join(a.work, case)
        shutil.rmtree(self.w, ignore_errors=True)
        os.makedirs(self.w)
        self.procs = []
        d, wt, li, lo, rc, rp = free_ports(6)
        self.ep = {"dispatcher": "tcp://127.0.0.1:%d" % d, "weights": "tcp://127.0.0.1:%d" % wt,
                   "log_in": "tcp://127.0.0.1:%d" % li, "log_out": "tcp://127.0.0.1:%d" % lo,
                   "reward": "tcp://127.0.0.1:%d" % rc, "pyreward": "tcp://127.0.0.1:%d" % rp}
        self.data = os.path.join(self.w, "train.jsonl")
        rng = random.Random(1234)
        with open(self.data, "w") as f:
            for _ in range(200):
                x, y = rng.randrange(1000), rng.randrange(1000)
                f.write(json.dumps({"prompt": "%d+%d=" % (x, y), "answer": str(x + y)}) + "\n")
        self.ck = os.path.join(self.w, "ck")
        self.config = os.path.join(a.src, "configs", "tiny.yaml")
        # Small and fast: batches of 2 groups of G=4, one optimizer step (and one published
        # version) per batch, 12 new tokens. Rewards of the C service (see reward_sets) lie in
        # [2, 3] and differ within a group, so dynamic sampling rarely filters; overlong shaping
        # is off so the trained rewards are exactly the services' sums.
        self.sets = [
            "network.dispatcher=" + self.ep["dispatcher"], "network.weights=" + self.ep["weights"],
            "network.log_in=" + self.ep["log_in"], "network.log_out=" + self.ep["log_out"],
            "reward.services.0.address=" + self.ep["reward"],
            "reward.builtin.bind=" + self.ep["reward"],
            "data.train=" + self.data, "data.test=", "learner.checkpoint_dir=" + self.ck,
            "learner.batch_groups=2", "learner.minibatches=1", "learner.group_size=%d" % G,
            "learner.warmup_steps=0", "learner.overlong.enabled=false", "learner.threads=1",
            "learner.checkpoint_interval=2", "rollout.max_new_tokens=12", "rollout.credits=2",
        ] + self.reward_sets() + list(sets)
        self.hub = None

    @staticmethod
    def reward_sets():
        # quillan-reward: format "^" (always matches) x 2, minus the length penalty in bytes of
        # the UTF-8 text (a byte policy's invalid bytes become 3-byte U+FFFD, so lengths vary
        # even when every sample runs to max_new_tokens): score in [2, 3], never 0.
        return ["reward.builtin.exact.weight=0", "reward.builtin.format.weight=2",
                "reward.builtin.format.regex=^", "reward.builtin.length.weight=-1",
                "reward.builtin.length.unit=bytes", "reward.builtin.length.target=12",
                "reward.builtin.length.window=24", "reward.builtin.eos_text="]

    def bin(self, name):
        sub = {"quillan-learner": "learner", "quillan-rollout": "rollout",
               "quillan-reward": "reward", "quillan": "common"}[name]
        return os.path.join(self.a.build, sub, name)

    def args(self, extra=()):
        out = ["--config", self.config]
        for s in self.sets + list(extra):
            out += ["--set", s]
        return out

    def path(self, name):
        return os.path.join(self.w, name)

    def start(self, name, argv):
        p = Proc(name, argv, self.path(name + ".log"))
        self.procs.append(p)
        return p

    def learner(self, extra=(), resume=None, log="learner"):
        argv = [self.bin("quillan-learner")] + self.args(extra)
        if resume:
            argv += ["--resume", resume]
        return self.start(log, argv)

    def worker(self, wid, extra=()):
        return self.start(wid, [self.bin("quillan-rollout")] + self.args(extra) +
                          ["--id", wid, "--threads", "1"])

    def reward(self, log="reward", extra=()):
        return self.start(log, [self.bin("quillan-reward")] + self.args(extra) +
                          ["--bind", self.ep["reward"]])

    def py_reward(self, log="pyreward"):
        return self.start(log, ["/usr/bin/python3",
                                os.path.join(self.a.src, "reward/examples/python/reward_service.py"),
                                "--bind", self.ep["pyreward"], "--gen-dir", self.a.gen_dir,
                                "--eos-text", ""])

    def subscribe(self):
        self.hub = HubSub(self.a.pb, self.ep["log_out"])
        return self.hub

    def wait(self, what, pred, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.2)
        raise Fail("timed out after %d s waiting for: %s" % (timeout, what))

    def steps(self, log="learner"):
        return events(self.path(log + ".log"), "learner.step")

    def groups(self, wid):
        return events(self.path(wid + ".log"), "rollout.group")

    def stop_all(self):
        for p in self.procs:
            p.signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except Fail:
                p.signal(signal.SIGKILL)
                p.p.wait()
        if self.hub:
            self.hub.close()
            self.hub = None

    def dump(self):
        for p in self.procs:
            try:
                with open(p.log, "rb") as f:
                    lines = f.read().decode("utf-8", "replace").splitlines()
            except FileNotFoundError:
                continue
            say("--- last lines of %s (exit %s):" % (p.log, p.p.poll()))
            for line in lines[-15:]:
                say("  " + line[:400])


# ---- shared assertions ----

def stop_clean(c, procs):
    for p in procs:
        p.signal(signal.SIGTERM)
    for p in procs:
        rc = p.wait(60)
        check(rc == 0, "%s exited %s after SIGTERM, expected 0" % (p.name, rc))


def check_versions_advance(c, log="learner", first_step=1):
    st = c.steps(log)
    nums = [int(field(r, "step")) for r in st]
    check(nums == list(range(first_step, first_step + len(nums))), "steps not consecutive: %s" % nums)
    vers = [int(field(r, "policy/version")) for r in st]
    check(vers == sorted(vers) and vers[-1] > vers[0], "policy versions do not advance: %s" % vers)
    return st


def check_switch_between_groups(c, wid):
    """Worker `wid` ran each group on one loaded snapshot and switched only between groups:
    its rollout.group versions never decrease, each was loaded (rollout.snapshot) before the
    group was reported, and the learner's old policy saw no sampler drift."""
    loaded, last, versions = set(), 0, []
    for r in read_records(c.path(wid + ".log")):
        if r.get("event") == "rollout.snapshot":
            loaded.add(int(field(r, "snapshot_version")))
        elif r.get("event") == "rollout.group":
            v = int(field(r, "snapshot_version"))
            check(v in loaded, "%s: group of lease %s on version %d it never loaded" %
                  (wid, field(r, "lease_id"), v))
            check(v >= last, "%s: group on version %d after one on %d" % (wid, v, last))
            last = v
            versions.append(v)
    return versions


def check_mismatch(c, log="learner"):
    """A group whose tokens came from two snapshots would disagree with the learner's old-policy
    log-probs: at staleness 0 mismatch/kl stays at its floating-point floor."""
    for r in c.steps(log):
        if field(r, "staleness/mean") == 0:
            check(field(r, "mismatch/kl") < 1e-3,
                  "step %s: mismatch/kl %g" % (field(r, "step"), field(r, "mismatch/kl")))
    alerts = events(c.path(log + ".log"), "learner.alert")
    check(not alerts, "learner alerts: %s" % alerts)


def check_copies_bounded(c, log):
    """A worker resends a group only when its Ack is a liveness interval overdue, and forgets
    it when it notices a restarted learner (rollout/worker.h). So the new learner (`log`) gets
    a group that a worker sent before noticing it at most 1 + (time from the first send to the
    notice) / liveness times; a resend loop (the old livelock) sends it without end."""
    drops = {}
    for r in events(c.path(log + ".log"), "dispatch.group_dropped"):
        wid = r["text"].split(" from ")[1].split(" ")[0]
        key = (wid, int(field(r, "lease")))
        drops[key] = drops.get(key, 0) + 1
    for (wid, lease), n in sorted(drops.items()):
        recs = read_records(c.path(wid + ".log"))
        sent = [r["time"] for r in recs if r.get("event") == "rollout.group" and
                int(field(r, "lease_id")) == lease]
        seen = [r["time"] for r in recs if r.get("event") == "rollout.restart"]
        if sent and seen and sent[0] < seen[0]:
            most = 1 + int((seen[0] - sent[0]) // LIVENESS_S)
            check(n <= most, "%s dropped %d copies of %s's group of lease %d, sent %.1f s before "
                  "%s noticed the restart (at most %d)" % (log, n, wid, lease, seen[0] - sent[0],
                                                            wid, most))
    return sum(drops.values())


def groups_after_restart(c, wid):
    """Groups worker wid sent after it noticed the new learner."""
    recs = read_records(c.path(wid + ".log"))
    at = [i for i, r in enumerate(recs) if r.get("event") == "rollout.restart"]
    return at and [r for r in recs[at[0]:] if r.get("event") == "rollout.group"]


def check_workers_carry_on(c, learner2, workers):
    """The same worker processes carry on after a learner restart: they notice the new
    incarnation, re-register, fetch its weights and return groups to it, and no group reaches
    the new learner more often than resends allow. Returns the groups the new learner dropped."""
    c.wait("both workers working for the new learner",
           lambda: all(groups_after_restart(c, w.name) for w in workers) and
           len(events(learner2.log, "learner.step")) >= 2, 150)
    for p in workers:
        check(p.alive(), "%s is not running" % p.name)
    return check_copies_bounded(c, learner2.name)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def lease_state(ckdir):
    """(counters, accepted units) of the dispatcher state in a checkpoint (learner/dispatcher.c
    lease_table_save: 21 header words, then the accepted bits of each open epoch)."""
    h, body = read_safetensors(os.path.join(ckdir, "learner.safetensors"))
    b, e = h["dispatcher"]["data_offsets"]
    words = struct.unpack("<%dQ" % ((e - b) // 8), body[b:e])
    names = ["magic", "format", "n_prompts", "shuffle", "seed", "fingerprint", "next_lease",
             "epoch", "position", "done_epochs", "n_open", "n_entries", "n_queue", "granted",
             "relet", "expired", "released", "accepted", "duplicates", "unknown", "rejected"]
    hd = dict(zip(names, words))
    per_epoch = (hd["n_prompts"] + 63) // 64
    bits = words[len(names):len(names) + hd["n_open"] * per_epoch]
    ones = sum(bin(x).count("1") for x in bits)
    return hd, ones, h["__metadata__"]


def latest_checkpoint(c):
    with open(os.path.join(c.ck, "latest")) as f:
        return os.path.join(c.ck, f.read().strip())


# ---- cases ----

def check_delta_equals_full(c, v):
    """Pulls snapshot v in full and as a delta against v - 1 from the running learner: the
    delta, applied here to v - 1, gives exactly v's bytes and full digest."""
    pb, ep = c.a.pb, c.ep["weights"]
    _, base = pull_snapshot(pb, ep, v - 1)
    info_full, full = pull_snapshot(pb, ep, v)
    info, delta = pull_snapshot(pb, ep, v, have=v - 1)
    check(info.base_version == v - 1, "the learner offered no delta for v%d against v%d" % (v, v - 1))
    applied = delta_apply(base, delta)
    check(applied == full and hashlib.blake2b(applied, digest_size=32).digest() ==
          info.full_digest == info_full.full_digest, "delta v%d-v%d applied != full v%d" %
          (v - 1, v, v))
    return len(delta), len(full)


def run_loop(c, steps, with_python=True):
    """The learner runs until stopped: until `steps` steps are trained and a worker has run
    groups on two snapshot versions (else every group of a short run can come from v1), and
    the test has pulled a delta from it."""
    hub = c.subscribe()
    reward = c.reward()
    procs = [reward]
    if with_python:
        procs.append(c.py_reward())
    c.sets += ["learner.snapshots_kept=%d" % (steps + 4)]
    learner = c.learner()
    c.wait("learner up", lambda: events(learner.log, "learner.start"), 120)
    w1, w2 = c.worker("w1"), c.worker("w2")

    def switched():
        return any(len({field(r, "snapshot_version") for r in c.groups(w)}) >= 2
                   for w in ("w1", "w2"))
    def delta_applied():
        return any(field(r, "delta") == 1 for w in ("w1", "w2")
                   for r in events(c.path(w + ".log"), "rollout.snapshot"))
    # A worker applies a delta only when it loads two consecutive versions; while the learner
    # publishes faster than a worker finishes groups it may skip versions for a while, so wait
    # for one rather than expect it within the first `steps` steps.
    c.wait("%d steps, a snapshot switch and a delta applied by a worker" % steps,
           lambda: (len(c.steps()) >= steps and switched() and delta_applied())
           or not learner.alive(), 150)
    # the latest version and its predecessor are kept (snapshots_kept >= 3) while they are pulled
    dv = max(int(field(r, "policy/version")) for r in c.steps())
    dsize = check_delta_equals_full(c, dv)
    stop_clean(c, [learner])
    # groups arrived from both workers and were accepted (an Ack other than ACCEPTED is logged)
    for wid in ("w1", "w2"):
        check(c.groups(wid), "%s returned no group" % wid)
    joined = {r["text"] for r in events(learner.log, "dispatch.worker_new")}
    check(joined >= {"worker w1 joined", "worker w2 joined"}, "workers joined: %s" % joined)
    st = check_versions_advance(c)
    for r in st:  # one batch per step, one published version per batch
        check(int(field(r, "policy/version")) == int(field(r, "step")) + 1,
              "version %s after step %s" % (field(r, "policy/version"), field(r, "step")))
    # rewards: quillan-reward's [2, 3] (+ 0.5 x the Python service's 0 or 1, when it runs)
    hi = 3.5 if with_python else 3
    for r in st:
        check(2 <= field(r, "reward/min") <= field(r, "reward/max") <= hi,
              "step %s: rewards outside [2, %g]: %s" % (field(r, "step"), hi, r["fields"]))
    kept = sum(int(field(r, "groups/kept")) for r in st)
    check(kept >= 2 * len(st), "groups trained: %d in %d steps" % (kept, len(st)))
    # snapshots: switched between groups only, deltas applied (the worker verifies the full
    # digest after applying a delta; byte equality of delta and full: e2e.snapshot_transfer)
    seen = {}
    for wid in ("w1", "w2"):
        seen[wid] = check_switch_between_groups(c, wid)
    check(any(len(set(v)) >= 2 for v in seen.values()),
          "no worker ran groups on two versions: %s" % {k: sorted(set(v)) for k, v in seen.items()})
    check_mismatch(c)
    deltas = [r for wid in ("w1", "w2") for r in events(c.path(wid + ".log"), "rollout.snapshot")
              if field(r, "delta") == 1]
    check(deltas, "no worker applied a delta snapshot")
    # "loaded ... (delta)" comes only after the applied buffer matched the full snapshot's
    # BLAKE2b digest (rollout/snapshot_client.c); a mismatch would be retried and logged
    for wid in ("w1", "w2"):
        for ev in ("rollout.snapshot_failed", "snapshot.retry"):
            check(not events(c.path(wid + ".log"), ev), "%s: %s" % (wid, ev))
    for r in deltas:
        check(field(r, "transfer_bytes") < field(r, "bytes"), "delta as large as full: %s" % r)
    pubs = events(learner.log, "snapshot.publish")
    check(any("delta kept" in r["text"] for r in pubs), "learner published no delta")
    # checkpoints
    ck = latest_checkpoint(c)
    hd, ones, meta = lease_state(ck)
    last = events(learner.log, "learner.step")[-1]
    check(int(meta["step"]) == int(field(last, "step")) and
          int(meta["version"]) == int(field(last, "policy/version")),
          "checkpoint metadata %s, last step %s" % (meta, last["fields"]))
    check(hd["accepted"] == ones and hd["duplicates"] == 0, "lease table %s, %d bits" % (hd, ones))
    check(os.path.isfile(os.path.join(ck, "model.safetensors")), "no model.safetensors")
    # metrics through the hub, from the learner and both workers (senders are the worker ids)
    c.wait("hub records", lambda: hub.count("learner.step") >= len(st) and
           hub.count("rollout.group", "w1") and hub.count("rollout.group", "w2"), 20)
    # both reward services were called
    stop_clean(c, [w1, w2] + procs)
    rs = events(reward.log, "reward.stop")
    check(rs and field(rs[-1], "requests") > 0, "quillan-reward served nothing: %s" % rs)
    if with_python:
        ps = events(c.path("pyreward.log"), "reward.stop")
        check(ps and field(ps[-1], "requests") > 0, "the Python service served nothing: %s" % ps)
    for wid in ("w1", "w2"):
        for r in c.groups(wid):
            check(int(field(r, "rewarded")) == G, "%s: group without rewards: %s" % (wid, r))
    say("steps %d, versions %s, groups trained %d, w1 %d groups on versions %s, w2 %d on %s, "
        "%d deltas applied, hub: learner.step %d, rollout.group w1 %d w2 %d" %
        (len(st), [int(field(r, "policy/version")) for r in st], kept, len(seen["w1"]),
         sorted(set(seen["w1"])), len(seen["w2"]), sorted(set(seen["w2"])), len(deltas),
         hub.count("learner.step"), hub.count("rollout.group", "w1"),
         hub.count("rollout.group", "w2")))
    say("delta v%d-v%d pulled and applied here: %d of %d bytes, equal to the full v%d" %
        (dv - 1, dv, dsize[0], dsize[1], dv))


def case_loop(c):
    # weighted services: quillan-reward x 1 + the Python exact-match example x 0.5
    c.sets += ["reward.services.0.weight=1", "reward.services.0.name=builtin",
               "reward.services.1.address=" + c.ep["pyreward"], "reward.services.1.weight=0.5",
               "reward.services.1.name=python"]
    run_loop(c, 5)


def case_gpt2(c):
    gpt2 = os.path.join(c.a.src, "..", "shared", "data", "gpt2")
    if not (os.path.isfile(os.path.join(gpt2, "vocab.json")) and
            os.path.isfile(os.path.join(gpt2, "merges.txt"))):
        say("SKIP: no GPT-2 tokenizer files in %s" % os.path.abspath(gpt2))
        sys.exit(SKIP)
    c.config = os.path.join(c.a.src, "configs", "test-gpt2.yaml")
    # 12 random GPT-2 tokens are ~50-110 bytes: the length penalty's window moves there
    c.sets += ["model.tokenizer.vocab=" + os.path.join(gpt2, "vocab.json"),
               "model.tokenizer.merges=" + os.path.join(gpt2, "merges.txt"),
               "reward.builtin.length.target=24", "reward.builtin.length.window=120"]
    run_loop(c, 3, with_python=False)
    # the real vocabulary: tokens beyond the byte range were sampled and trained on
    snaps = events(c.path("w1.log"), "rollout.snapshot") + events(c.path("w2.log"), "rollout.snapshot")
    check(snaps and snaps[0]["fields"]["bytes"] > 50257 * 64 * 4,
          "snapshot of %s bytes is too small for a 50257 x 64 FP32 embedding" %
          (snaps[0]["fields"]["bytes"] if snaps else None))


def stop_learner_after(c, learner, more):
    """Lets the learner train `more` further steps, then stops it with SIGTERM (exit 0, with a
    checkpoint): the runs below never depend on how fast training is against the fault."""
    n = len(c.steps())
    c.wait("%d more steps" % more, lambda: len(c.steps()) >= n + more or not learner.alive(), 150)
    stop_clean(c, [learner])
    return len(c.steps())


def case_kill_worker(c):
    # a dead worker is noticed after heartbeat_liveness silent heartbeats; its leases go back
    c.sets += ["network.heartbeat_liveness=3", "reward.timeout_s=2", "reward.retries=1",
               "reward.backoff_min_s=0.2", "reward.backoff_max_s=0.5"]
    reward = c.reward("reward1")
    learner = c.learner()  # runs until stopped
    c.wait("learner up", lambda: events(learner.log, "learner.start"), 120)
    w1, w2 = c.worker("w1"), c.worker("w2")
    c.wait("w1 busy", lambda: len(c.groups("w1")) >= 2, 120)
    # Workers outpace this learner and often wait with no lease: w1 is killed while it surely
    # holds one, a group it cannot score with the reward service down.
    reward.signal(signal.SIGKILL)
    reward.wait(10)
    c.wait("w1 holding a lease", lambda: events(w1.log, "rollout.reward_failed"), 90)
    w1.signal(signal.SIGKILL)
    w1.wait(10)
    reward2 = c.reward("reward2")
    c.wait("w1 declared dead", lambda: events(learner.log, "dispatch.worker_dead"), 60)
    steps = stop_learner_after(c, learner, 3)
    stop_clean(c, [w2, reward2])
    dead = events(learner.log, "dispatch.worker_dead")
    say("dead: " + dead[0]["text"])
    hd, ones, meta = lease_state(latest_checkpoint(c))
    say("lease table: granted %d relet %d expired %d accepted %d duplicates %d unknown %d, %d "
        "accepted bits" % (hd["granted"], hd["relet"], hd["expired"], hd["accepted"],
                           hd["duplicates"], hd["unknown"], ones))
    check(hd["relet"] >= 1, "no lease re-leased after the kill: %s" % hd)
    check(hd["accepted"] == ones, "accepted %d units but %d accepted bits: a unit was accepted "
          "twice" % (hd["accepted"], ones))
    # the groups the workers report sent and the learner did not drop: each prompt once
    # (w1 may have sent a last group the learner never received: left out)
    prompts = {}
    dropped = {int(r["text"].split()[1].rstrip(":"))
               for r in events(c.path("w2.log"), "rollout.group_dropped")}
    for r in c.groups("w2"):
        if int(field(r, "lease_id")) not in dropped:
            prompts[int(field(r, "prompt_id"))] = prompts.get(int(field(r, "prompt_id")), 0) + 1
    twice = [p for p, n in prompts.items() if n > 1]
    check(not twice, "prompts accepted twice from w2: %s" % twice)
    trained = sum(int(field(r, k)) for r in c.steps() for k in
                  ("groups/kept", "groups/filtered_equal", "groups/filtered_few", "groups/stale"))
    check(trained <= hd["accepted"], "%d groups consumed by the batcher, %d accepted" %
          (trained, hd["accepted"]))
    check(len(c.steps()) == steps, "steps: %d" % len(c.steps()))


def case_reward_restart(c):
    c.sets += ["reward.timeout_s=2", "reward.retries=1", "reward.backoff_min_s=0.2",
               "reward.backoff_max_s=0.5"]
    reward = c.reward("reward1")
    learner = c.learner()  # runs until stopped
    c.wait("learner up", lambda: events(learner.log, "learner.start"), 120)
    w1, w2 = c.worker("w1"), c.worker("w2")
    c.wait("first step", lambda: c.steps(), 180)
    reward.signal(signal.SIGKILL)
    reward.wait(10)
    t_kill = time.time()
    steps_kill = len(c.steps())
    c.wait("a worker noticing the outage",
           lambda: events(w1.log, "rollout.reward_failed") or
           events(w2.log, "rollout.reward_failed"), 90)
    steps_during = len(c.steps())
    reward2 = c.reward("reward2")
    t_back = time.time()
    c.wait("groups scored by the restarted service",
           lambda: events(reward2.log, "reward.start") and
           sum(1 for w in ("w1", "w2") for r in c.groups(w) if r["time"] > t_back) >= 2, 120)
    stop_learner_after(c, learner, 2)
    stop_clean(c, [w1, w2, reward2])
    # every trained reward came from the service: its scores lie in [2, 3]; a fabricated one
    # (0, or a missing one turned into a number) would show in reward/min or no_reward_samples
    for r in c.steps():
        lo, hi = field(r, "reward/min"), field(r, "reward/max")
        check(2 <= lo <= hi <= 3, "step %s: rewards in [%g, %g], the service gives [2, 3]" %
              (field(r, "step"), lo, hi))
        check(field(r, "groups/no_reward_samples") == 0, "step %s: samples without reward" %
              field(r, "step"))
    for wid in ("w1", "w2"):
        for r in c.groups(wid):
            check(int(field(r, "rewarded")) == G and 2 <= field(r, "reward_mean") <= 3,
                  "%s: group %s" % (wid, r))
            # no group was scored while no service was there to score it
            if t_kill + 0.5 < r["time"] < t_back and int(field(r, "rewarded")):
                raise Fail("%s reported a rewarded group during the outage: %s" % (wid, r))
    fails = events(w1.log, "rollout.reward_failed") + events(w2.log, "rollout.reward_failed")
    # a group whose scoring failed was kept and scored again once the service was back
    for f in fails:
        lease = int(field(f, "lease_id"))
        later = [r for wid in ("w1", "w2") for r in c.groups(wid)
                 if int(field(r, "lease_id")) == lease and r["time"] > f["time"]]
        check(later and int(field(later[0], "rewarded")) == G,
              "lease %d failed its scoring and was never sent scored: %s" % (lease, later))
    served = events(reward2.log, "reward.stop")
    check(served and field(served[-1], "requests") > 0, "the restarted service served nothing")
    say("outage of %.1f s: %d reward failures logged (each group kept and scored later), steps "
        "%d at the kill, %d at the restart, %d requests served after it" %
        (t_back - t_kill, len(fails), steps_kill, steps_during, field(served[-1], "requests")))


class Garbage:
    """DEALER/PUB sockets that send malformed frames to the sockets of a run."""

    def __init__(self, pb):
        import zmq
        self.zmq, self.pb = zmq, pb
        self.ctx = zmq.Context()
        self.n = 0
        self.socks = []  # kept open: pyzmq closes a collected socket, dropping what it queued

    def dealer(self, ep):
        s = self.ctx.socket(self.zmq.DEALER)
        self.socks.append(s)
        s.setsockopt(self.zmq.LINGER, 0)
        s.setsockopt_string(self.zmq.IDENTITY, "evil-%d" % random.getrandbits(32))
        s.connect(ep)
        return s

    def env(self, version, **body):
        self.n += 1
        e = self.pb.Envelope(protocol_version=version, sender_id="evil", incarnation_id=7,
                             message_id=self.n)
        for k, v in body.items():
            getattr(e, k).CopyFrom(v)
        return e.SerializeToString()

    def acks(self, s, n, timeout):
        out, end = [], time.monotonic() + timeout
        while time.monotonic() < end and len(out) < n:
            if s.poll(100):
                e = self.pb.Envelope()
                e.ParseFromString(s.recv_multipart()[-1])
                if e.WhichOneof("body") == "ack":
                    out.append((e.ack.lease_id, e.ack.status))
        return out


def lease_some(g, pb, ep, timeout):
    """A DEALER that registers as worker 'evil' and takes two real leases (RolloutRequests),
    in one Lease or several: while the real worker holds most of the learner's lease room, the
    dispatcher may grant them one at a time."""
    s = g.dealer(ep)
    got = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s.send(g.env(DISPATCH_V, work_request=pb.dispatch.WorkRequest(
            worker_id="evil", credits=2 - len(got), snapshot_version=1)))
        if not s.poll(1000):
            continue
        e = pb.Envelope()
        e.ParseFromString(s.recv_multipart()[-1])
        if e.WhichOneof("body") == "lease":
            got += list(e.lease.requests)
            if len(got) >= 2:
                return s, got
    raise Fail("the dispatcher leased %d of 2 units to a registered worker within %d s"
               % (len(got), timeout))


def bad_group(pb, rq, n_traj, token):
    g = pb.dispatch.TrajectoryGroup(lease_id=rq.lease_id, prompt_id=rq.prompt_id, epoch=rq.epoch,
                                    prompt_tokens=rq.prompt_tokens, policy_version=1,
                                    worker_id="evil")
    g.sampling.CopyFrom(rq.sampling)
    for _ in range(n_traj):
        t = g.trajectories.add()
        t.completion_tokens.extend([token, 50])
        t.behaviour_logprobs.extend([-1.0, -1.0])
        t.reward = 1.0
        t.finish_reason = pb.common.FINISH_REASON_LENGTH
    return g


def case_malformed(c):
    c.sets += ["reward.services.1.address=" + c.ep["pyreward"], "reward.services.1.weight=0.5"]
    hub = c.subscribe()
    reward, pyr = c.reward(), c.py_reward()
    learner = c.learner()  # runs until stopped
    c.wait("learner up", lambda: events(learner.log, "learner.start"), 120)
    w1 = c.worker("w1")
    c.wait("first step", lambda: c.steps(), 180)
    pb = c.a.pb
    g = Garbage(pb)
    rnd = random.Random(5)
    junk = lambda: bytes(rnd.getrandbits(8) for _ in range(64))
    # dispatcher: two real leases answered with a token >= vocab and with G - 1 samples
    disp, leased = lease_some(g, pb, c.ep["dispatcher"], 60)
    rq1, rq2 = leased[:2]
    disp.send(g.env(DISPATCH_V, trajectory_group=bad_group(pb, rq1, G, 259)))
    disp.send(g.env(DISPATCH_V, trajectory_group=bad_group(pb, rq2, G - 1, 50)))
    acks = g.acks(disp, 2, 10)
    wreq = pb.dispatch.WorkRequest(worker_id="evil", credits=1)
    bad = g.dealer(c.ep["dispatcher"])
    bad.send(junk())                                                   # not an Envelope
    bad.send(g.env(99, work_request=wreq))                             # another version
    bad.send_multipart([b"a", b"b", b"c"])                             # three frames
    bad.send(g.env(DISPATCH_V, reward_request=pb.reward.RewardRequest(request_id=1)))  # body
    wts = g.dealer(c.ep["weights"])
    wts.send(junk())
    wts.send(g.env(99, info_request=pb.weights.InfoRequest()))
    wts.send_multipart([b"a", b"b", b"c"])
    wts.send(g.env(WEIGHTS_V, chunk_request=pb.weights.ChunkRequest(version=1, index=10 ** 6)))
    wts.send(g.env(WEIGHTS_V, work_request=wreq))
    for rw in (c.ep["reward"], c.ep["pyreward"]):
        s = g.dealer(rw)
        s.send(junk())
        s.send(g.env(99, reward_request=pb.reward.RewardRequest(request_id=1)))
        s.send(g.env(REWARD_V, reward_request=pb.reward.RewardRequest(request_id=2)))  # 0 samples
        s.send_multipart([b"x", b"y", b"z"])
    pub = g.ctx.socket(g.zmq.PUB)
    g.socks.append(pub)
    pub.setsockopt(g.zmq.LINGER, 0)
    pub.connect(c.ep["log_in"])
    time.sleep(1)  # the PUB's connection to the hub's XSUB; the garbage above handled
    garbage0 = hub.garbage
    for _ in range(5):
        pub.send(junk())
        pub.send(g.env(99, log_record=pb.log.LogRecord(event="evil")))
    # oversized frames last, on connections of their own: libzmq cuts a connection over a frame
    # above ZMQ_MAXMSGSIZE and drops what it still queued from it
    big = b"\0" * (5 << 20)  # above network.max_msg_bytes (4 MiB) and the weights limit
    for ep in (c.ep["dispatcher"], c.ep["weights"], c.ep["reward"], c.ep["pyreward"]):
        g.dealer(ep).send(big)
    n0 = len(c.steps())
    c.wait("training after the garbage", lambda: len(c.steps()) >= n0 + 2 or not learner.alive(),
           240)
    for p in (learner, reward, pyr, w1):
        check(p.alive(), "%s died after the garbage" % p.name)

    def cut(log, names):
        return {n for n in names for r in events(log, "net.disconnect")
                if r["text"].startswith(n + ":")}
    c.wait("oversized frames cutting connections",
           lambda: cut(learner.log, ("dispatcher", "weights")) == {"dispatcher", "weights"} and
           cut(reward.log, ("reward",)), 30)
    check(hub.count("learner.step") >= n0 + 2, "the hub stopped forwarding")
    stop_clean(c, [learner])
    # the learner: each refused and counted
    recs = read_records(learner.log)
    drops = {}
    for r in recs:
        if r.get("event") == "net.drop":
            sock, why = r["text"].split(":")[0], r["text"].split("(")[1].split(")")[0]
            drops[(sock, why)] = max(drops.get((sock, why), 0), int(field(r, "count")))
    say("learner drops: %s" % drops)
    for key in (("dispatcher", "decode"), ("dispatcher", "version"), ("dispatcher", "frames"),
                ("dispatcher", "body"), ("weights", "decode"), ("weights", "version"),
                ("weights", "frames"), ("weights", "body")):
        check(drops.get(key, 0) >= 1, "no net.drop %s on the learner" % (key,))
    why = {int(field(r, "lease")): r["text"] for r in recs
           if r.get("event") == "dispatch.group_dropped"}
    say("bad groups: %s" % why)
    check("not below vocab_size" in why.get(rq1.lease_id, "") and
          "rejected" in why.get(rq1.lease_id, ""), "token >= vocab: %s" % why)
    check("group size" in why.get(rq2.lease_id, "") and "rejected" in why.get(rq2.lease_id, ""),
          "G - 1 samples: %s" % why)
    rej = pb.dispatch.ACK_STATUS_REJECTED
    check(sorted(acks) == sorted([(rq1.lease_id, rej), (rq2.lease_id, rej)]),
          "Acks to the bad groups: %s" % acks)
    # the hub forwarded the garbage (monitors drop it: e2e.monitor_robust) and kept forwarding
    check(hub.garbage - garbage0 >= 1, "no garbage came through the hub")
    stop_clean(c, [w1, reward, pyr])
    rs = events(reward.log, "reward.stop")[-1]["fields"]
    say("quillan-reward: %s" % rs)
    for k in ("dropped_decode", "dropped_version", "dropped_frames"):
        check(rs[k] >= 1, "quillan-reward %s = %s" % (k, rs[k]))
    check(rs["failed"] + rs["unexpected"] + rs.get("dropped_invalid", 0) +
          rs.get("dropped_body", 0) >= 1, "quillan-reward took a request of 0 samples: %s" % rs)
    ps = events(pyr.log, "reward.stop")[-1]["fields"]
    check(ps["dropped"] >= 4, "the Python service dropped %s" % ps["dropped"])
    check(rs["requests"] > 0 and ps["requests"] > 0, "services did not keep serving")


def case_learner_restart(c):
    reward = c.reward()
    learner = c.learner(["learner.checkpoint_interval=100"])  # runs until stopped
    c.wait("learner up", lambda: events(learner.log, "learner.start"), 120)
    w1, w2 = c.worker("w1"), c.worker("w2")
    c.wait("step 3", lambda: len(c.steps()) >= 3, 240)
    learner.signal(signal.SIGTERM)
    check(learner.wait(120) == 0, "the learner exited %s after SIGTERM" % learner.rc)
    stop = events(learner.log, "learner.stop")[-1]
    s_stop, v_stop = int(field(stop, "step")), int(field(stop, "policy/version"))
    ck = events(learner.log, "learner.checkpoint")
    check(ck and int(field(ck[-1], "step")) == s_stop, "no checkpoint at step %d" % s_stop)
    check(w1.alive() and w2.alive(), "a worker stopped with the learner")
    learner2 = c.learner(resume="auto", log="learner2")
    c.wait("learner resumed", lambda: events(learner2.log, "learner.start"), 120)
    st = events(learner2.log, "learner.start")[0]
    check(st["text"].startswith("resumed") and int(field(st, "step")) == s_stop and
          int(field(st, "policy/version")) == v_stop,
          "resumed at step %s version %s, stopped at %d / %d" %
          (field(st, "step"), field(st, "policy/version"), s_stop, v_stop))

    check_workers_carry_on(c, learner2, (w1, w2))
    stop_clean(c, [learner2])
    s2 = check_versions_advance(c, "learner2", s_stop + 1)
    joined = {r["text"] for r in events(learner2.log, "dispatch.worker_new")}
    check(joined >= {"worker w1 joined", "worker w2 joined"}, "rejoined: %s" % joined)
    stop_clean(c, [w1, w2, reward])
    say("stopped at step %d version %d; resumed there; went on to step %s version %s with the "
        "same workers (%d and %d groups after the restart)" %
        (s_stop, v_stop, field(s2[-1], "step"), field(s2[-1], "policy/version"),
         len(groups_after_restart(c, "w1")), len(groups_after_restart(c, "w2"))))


def case_learner_crash(c):
    c.sets += ["reward.timeout_s=2", "reward.retries=1", "reward.backoff_min_s=0.2",
               "reward.backoff_max_s=0.5"]
    reward = c.reward("reward1")
    learner = c.learner()  # a checkpoint every 2 steps (Cluster)
    c.wait("learner up", lambda: events(learner.log, "learner.start"), 120)
    w1, w2 = c.worker("w1"), c.worker("w2")
    c.wait("step 3", lambda: len(c.steps()) >= 3, 240)
    # with the reward service down, a worker keeps its generated group until it can score it
    reward.signal(signal.SIGKILL)
    reward.wait(10)
    held = c.wait("a worker holding a group it cannot score",
                  lambda: [w for w in ("w1", "w2") if events(c.path(w + ".log"),
                                                             "rollout.reward_failed")], 90)
    learner.signal(signal.SIGKILL)
    learner.wait(10)
    s_kill = len(c.steps())
    sent = {w: len(c.groups(w)) for w in held}
    reward2 = c.reward("reward2")
    # scored now and sent to the dead learner: it waits for an Ack that never comes
    late = c.wait("a group sent to the dead learner",
                  lambda: [w for w in held if len(c.groups(w)) > sent[w]], 90)
    learner2 = c.learner(resume="auto", log="learner2")
    c.wait("learner resumed", lambda: events(learner2.log, "learner.start"), 120)
    st = events(learner2.log, "learner.start")[0]
    s_resume = int(field(st, "step"))
    check(st["text"].startswith("resumed") and 2 <= s_resume <= s_kill,
          "learner2 started at step %d: %s (killed after step %d)" % (s_resume, st["text"],
                                                                       s_kill))
    dropped = check_workers_carry_on(c, learner2, (w1, w2))
    stop_clean(c, [learner2])
    check_versions_advance(c, "learner2", s_resume + 1)
    hd, ones, _ = lease_state(latest_checkpoint(c))
    check(hd["accepted"] == ones, "accepted %d units but %d accepted bits: a unit was accepted "
          "twice" % (hd["accepted"], ones))
    stop_clean(c, [w1, w2, reward2])
    say("killed after step %d with %s's group unacknowledged; resumed at step %d; %d and %d "
        "groups after the restart; the new learner dropped %d groups" %
        (s_kill, late[0], s_resume, len(groups_after_restart(c, "w1")),
         len(groups_after_restart(c, "w2")), dropped))


def pull_snapshot(pb, ep, version, have=0):
    """Snapshot `version` over the weights socket: its full bytes (have = 0), or the delta
    payload against version `have` when the server offers one. Returns (SnapshotInfo, bytes)
    with the transfer's BLAKE2b-256 checked against the info's digest."""
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ep)
    try:
        def ask(body, timeout=30):
            e = pb.Envelope(protocol_version=WEIGHTS_V, sender_id="rl-e2e", incarnation_id=9)
            for k, v in body.items():
                getattr(e, k).CopyFrom(v)
            s.send(e.SerializeToString())
            check(s.poll(timeout * 1000), "no answer from the weights server")
            frames = s.recv_multipart()
            r = pb.Envelope()
            r.ParseFromString(frames[0])
            return r, frames[1] if len(frames) > 1 else b""
        info, _ = ask({"info_request": pb.weights.InfoRequest(version=version, have_version=have)})
        check(info.WhichOneof("body") == "snapshot_info", "InfoRequest(%d): %s" % (version, info))
        si = info.snapshot_info
        check(si.base_version in (0, have), "delta against %d, asked %d" % (si.base_version, have))
        buf = bytearray()
        for i in range(si.chunk_count):
            rep, payload = ask({"chunk_request": pb.weights.ChunkRequest(
                version=version, index=i, base_version=si.base_version)})
            check(rep.WhichOneof("body") == "chunk_reply" and rep.chunk_reply.index == i,
                  "chunk %d: %s" % (i, rep))
            buf += payload
        d = hashlib.blake2b(bytes(buf), digest_size=32).digest()
        check(len(buf) == si.total_bytes and d == si.digest, "snapshot %d: digest mismatch" % version)
        if si.base_version == 0:
            check(d == si.full_digest, "snapshot %d: digest and full_digest differ" % version)
        return si, bytes(buf)
    finally:
        s.close()
        ctx.term()


def leb128(b, i):
    v = shift = 0
    while True:
        x = b[i]
        i += 1
        v |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return v, i


def delta_apply(base, delta):
    """learner/snapshot_store.h's delta format (QSD1), decoded independently of the C code."""
    check(delta[:4] == b"QSD1", "delta magic %r" % delta[:4])
    block, full, n_runs = struct.unpack("<IQQ", delta[4:24])
    check(full == len(base), "delta for %d bytes, base has %d" % (full, len(base)))
    i, at, runs = 24, 0, []
    for _ in range(n_runs):
        gap, i = leb128(delta, i)
        count, i = leb128(delta, i)
        runs.append((at + gap, count))
        at += gap + count
    out = bytearray(base)
    for first, count in runs:
        for k in range(first, first + count):
            n = min(block, full - k * block)
            out[k * block:k * block + n] = delta[i:i + n]
            i += n
    check(i == len(delta), "delta payload: %d bytes left over" % (len(delta) - i))
    return bytes(out)


def case_lr0(c):
    steps = 3
    c.sets += ["learner.lr=0", "learner.snapshots_kept=8"]
    reward = c.reward()
    # the learner must still serve snapshot 1 when the run ends: pull while it runs
    learner = c.learner(["learner.max_steps=%d" % (steps + 100)])
    c.wait("learner up", lambda: events(learner.log, "learner.start"), 120)
    w1 = c.worker("w1")
    c.wait("%d steps" % steps, lambda: len(c.steps()) >= steps, 240)
    snaps = {v: pull_snapshot(c.a.pb, c.ep["weights"], v)[1] for v in range(1, steps + 2)}
    stop_clean(c, [learner, w1, reward])

    def tensors(buf):
        n = struct.unpack("<Q", buf[:8])[0]
        return buf[8 + n:]
    base = hashlib.blake2b(tensors(snaps[1]), digest_size=32).hexdigest()
    for v, buf in snaps.items():
        d = hashlib.blake2b(tensors(buf), digest_size=32).hexdigest()
        say("snapshot v%d: %d bytes, full digest %s, tensor bytes digest %s" %
            (v, len(buf), hashlib.blake2b(buf, digest_size=32).hexdigest()[:16], d[:16]))
        check(d == base, "snapshot v%d's tensor bytes differ from v1's at lr 0" % v)
    # the learner's own diff: only the header (it names the version) may differ
    header = struct.unpack("<Q", snaps[1][:8])[0] + 8
    for r in events(learner.log, "snapshot.publish"):
        if field(r, "policy/version") > 1:
            changed = field(r, "snapshot/changed_bytes_frac") * field(r, "sync/full_bytes")
            check(changed <= header, "publish at lr 0 changed %.0f bytes, the header is %d: %s" %
                  (changed, header, r))
    st = c.steps()[:steps]
    for r in st:
        check(field(r, "lr") == 0, "lr %s" % field(r, "lr"))
        check(field(r, "policy/ratio_mean") == 1 and field(r, "policy/approx_kl") == 0,
              "step %s: ratio_mean %.17g approx_kl %g after lr-0 steps" %
              (field(r, "step"), field(r, "policy/ratio_mean"), field(r, "policy/approx_kl")))
    # mismatch/kl: the batch after lr-0 steps sits at the same floor as the first batch (the
    # exact equality on one batch with and without the step is unit.test_learner lr0_step)
    floor = max(field(r, "mismatch/kl") for r in st if field(r, "staleness/mean") == 0)
    check(floor < 1e-6, "mismatch/kl %g at lr 0" % floor)
    say("%d steps at lr 0: ratio_mean 1, approx_kl 0, mismatch/kl <= %.3g" % (len(st), floor))


def case_config(c):
    # the run's settings without its reward service, so that the files below decide
    base = [s for s in c.sets if not s.startswith("reward.services.")]

    def refused(name, extra, *subs, cfg=None, worker=True):
        """quillan-learner (and quillan-rollout: the keys it reads) exit 1 naming the key, with
        nothing bound or written."""
        for b in ["quillan-learner"] + (["quillan-rollout"] if worker else []):
            argv = [c.bin(b), "--config", cfg or c.config]
            for s in base + list(extra):
                argv += ["--set", s]
            t0 = time.monotonic()
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            check(p.returncode == 1, "%s, %s: exit %d, expected 1\n%s" %
                  (name, b, p.returncode, p.stderr))
            for s in subs:
                check(s in p.stderr, "%s, %s: no '%s' in:\n%s" % (name, b, s, p.stderr))
            for ev in ("dispatch.listen", "weights.listen", "loghub.listen", "learner.start",
                       "rollout.start"):
                check(ev not in p.stderr, "%s, %s: %s although the config is bad" % (name, b, ev))
            check(not os.path.exists(c.ck), "%s, %s: %s was created" % (name, b, c.ck))
            # nothing bound: the dispatcher's port is still free
            s = socket.socket()
            s.bind(("127.0.0.1", int(c.ep["dispatcher"].rsplit(":", 1)[1])))
            s.close()
            say("%s: %s refused in %.1f s: %s" % (name, b, time.monotonic() - t0,
                                                  p.stderr.strip().splitlines()[-1]))

    refused("group size 1", ["learner.group_size=1"], "learner.group_size", "at least 2")
    nosvc = c.path("nosvc.yaml")
    with open(nosvc, "w") as f:
        f.write("reward:\n  services:\n    - weight: 1\n      name: judge\n")
    refused("no reward address", [], "nosvc.yaml:3", "reward.services[0]", "'address' is required",
            cfg=nosvc)
    nosvc2 = c.path("nosvc2.yaml")
    with open(nosvc2, "w") as f:
        f.write("reward:\n  services: []\n")
    refused("no reward service", [], "nosvc2.yaml:2", "reward.services", cfg=nosvc2)
    small = c.path("small.jsonl")
    with open(c.data) as f, open(small, "w") as g:
        g.writelines(f.readlines()[:5])
    refused("batch > data set", ["data.train=" + small, "learner.batch_groups=8"],
            "learner.batch_groups", "8 groups", "5 prompts", small, worker=False)
    refused("missing data set", ["data.train=" + c.path("none.jsonl")], "none.jsonl",
            worker=False)
    refused("GPT-2 tokenizer without its files", ["model.tokenizer.kind=gpt2",
                                                  "model.vocab_size=50257"],
            "model.tokenizer", "vocab + merges", worker=False)  # workers use the snapshot's


CASES = {k[5:]: v for k, v in globals().items() if k.startswith("case_")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--build", required=True)
    ap.add_argument("--src", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--gen-dir", required=True)
    a = ap.parse_args()
    for b in ("learner/quillan-learner", "rollout/quillan-rollout", "reward/quillan-reward"):
        if not os.access(os.path.join(a.build, b), os.X_OK):
            say("SKIP: %s is not built" % b)
            return SKIP
    sys.path.insert(0, a.gen_dir)
    import envelope_pb2
    import common_pb2
    import dispatch_pb2
    import log_pb2
    import reward_pb2
    import weights_pb2

    class PB:
        Envelope = envelope_pb2.Envelope
        common, dispatch, log, reward, weights = (common_pb2, dispatch_pb2, log_pb2, reward_pb2,
                                                  weights_pb2)
    a.pb = PB
    c = Cluster(a, a.case)
    t0 = time.monotonic()
    try:
        CASES[a.case](c)
    except Fail as e:
        say("FAIL (%s): %s" % (a.case, e))
        c.dump()
        c.stop_all()
        return 1
    except BaseException:
        c.dump()
        c.stop_all()
        raise
    c.stop_all()
    say("PASS: rl %s in %.0f s" % (a.case, time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
