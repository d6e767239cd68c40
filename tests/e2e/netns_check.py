#!/usr/bin/env python3
"""Holds a finished RL run's books against each other (tests/e2e/netns_test.sh, bench/soak.sh).

    netns_check.py [--steps-per-batch N] LEDGER_JSON LEARNER_LOG [WORKER_LOG...]

N is learner.minibatches x learner.ppo_epochs (default 1): the optimizer steps (learner.step
records) of one batch, each repeating the batch's groups/kept. LEDGER_JSON is netns_ledger's output for the learner's final checkpoint; the logs are the
daemons' stderr JSON lines (the learner's at logging.level debug, so that every grant is
logged). Checks, each printed as "ok" or "FAIL":

  units        every unit the dispatcher handed out is accepted or queued for a re-lease
               (none lost); the accepted set has as many units as accept events (no unit
               accepted twice); every grant is a fresh unit or a re-lease of an expired one
  log vs state leases granted, expired, released, duplicates, unknown, rejected: the learner's
               log records add up to its lease table's counters
  batcher      groups accepted by the dispatcher = groups the batcher took (a group the learner
               refuses is answered REJECTED and its unit leased again, so it is never
               accepted); groups the batcher took = groups in trained batches (learner.step
               groups/kept of each batch's first step) + waiting + filtered (equal, few) +
               stale; N learner.step records per batch (the last batch's may stop early)
  workers      every accepted unit was sent by a worker (rollout.group records); no lease id
               was sent twice

Prints a JSON summary line ("summary: {...}") and exits 1 when any check fails."""
import json
import re
import sys


def records(path):
    """The JSON records of a log file; other lines are counted, not parsed."""
    out, junk = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError:
                junk += 1
                continue
            if isinstance(r, dict) and "event" in r:
                out.append(r)
            else:
                junk += 1
    return out, junk


def field(r, name, default=0.0):
    return (r.get("fields") or {}).get(name, default)


def main(argv):
    spb = 1
    if len(argv) > 2 and argv[1] == "--steps-per-batch":
        spb = int(argv[2])
        argv = argv[:1] + argv[3:]
    if len(argv) < 3 or spb < 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        ledger = json.load(f)
    learner, junk = records(argv[2])
    workers = []
    for p in argv[3:]:
        workers.extend(records(p)[0])

    failures = []

    def check(name, ok, detail):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    d, u, b = ledger["dispatcher"], ledger["units"], ledger["batcher"]

    # Units: the lease table's own consistency.
    check("no unit lost", u["lost"] == 0,
          f"{u['handed_out']} handed out = {u['accepted']} accepted + {u['pending']} pending"
          f" re-lease + {u['lost']} lost {ledger['lost_units'][:10]}")
    check("accepted units unique", u["accepted"] == d["accepted"],
          f"{u['accepted']} units in the accepted set, {d['accepted']} accept events")
    check("pending units queued once", u["pending_listed"] == u["pending"],
          f"{u['pending_listed']} re-leases queued for {u['pending']} pending units")
    check("grants = fresh + re-leases", d["granted"] == u["handed_out"] + d["relet"],
          f"{d['granted']} granted, {u['handed_out']} fresh units + {d['relet']} re-leases")
    check("re-leases follow expiries", d["relet"] <= d["expired"] + d["released"],
          f"{d['relet']} re-leases <= {d['expired']} expired + {d['released']} released")

    # The learner's log against its lease table.
    ev = {}
    for r in learner:
        ev.setdefault(r["event"], []).append(r)

    def count(event, pred=lambda r: True):
        return sum(1 for r in ev.get(event, []) if pred(r))

    granted_log = sum(int(field(r, "leases")) for r in ev.get("dispatch.lease", []))
    check("log: leases granted", granted_log == d["granted"],
          f"{granted_log} in dispatch.lease records, {d['granted']} counted")
    expired_log = 0
    for r in ev.get("dispatch.lease_expired", []):
        m = re.match(r"(\d+) lease", r.get("text", ""))
        expired_log += int(m.group(1)) if m else 0
    check("log: leases expired", expired_log == d["expired"],
          f"{expired_log} in dispatch.lease_expired records, {d['expired']} counted")
    released_log = sum(int(field(r, "leases_released"))
                       for e in ("dispatch.worker_dead", "dispatch.worker_restart")
                       for r in ev.get(e, []))
    check("log: leases released", released_log == d["released"],
          f"{released_log} in dispatch.worker_dead/_restart records, {d['released']} counted")
    refused = count("dispatch.group_refused")
    for verdict, key in (("duplicate", "duplicates"), ("unknown_lease", "unknown"),
                         ("rejected", "rejected")):
        n = count("dispatch.group_dropped", lambda r, v=verdict: f"dropped: {v}" in r.get("text", ""))
        # The table counts the learner's refusals as rejections (dispatch.group_refused).
        n += refused if key == "rejected" else 0
        check(f"log: groups dropped as {verdict}", n == d[key],
              f"{n} dispatch.group_dropped / group_refused records, {d[key]} counted")

    # The batcher: every accepted group trained, waiting, filtered or stale.
    steps = ev.get("learner.step", [])
    kept = sum(int(field(r, "groups/kept")) for r in steps if (int(field(r, "step")) - 1) % spb == 0)
    check("groups accepted = groups the batcher took", d["accepted"] == b["arrived"],
          f"{d['accepted']} accepted, {b['arrived']} to the batcher ({refused} refused and "
          f"leased again)")
    rhs = kept + b["waiting"] + b["filtered_equal"] + b["filtered_few"] + b["stale"]
    check("batcher groups = trained + waiting + filtered + stale", b["arrived"] == rhs,
          f"{b['arrived']} = {kept} trained + {b['waiting']} waiting + {b['filtered_equal']} "
          f"equal + {b['filtered_few']} few + {b['stale']} stale")
    check(f"{spb} learner.step per batch",
          b["batches"] * spb - (spb - 1) <= len(steps) <= b["batches"] * spb,
          f"{len(steps)} learner.step records, {b['batches']} batches")

    # The workers' side.
    if workers:
        sent = [r for r in workers if r["event"] == "rollout.group"]
        leases = [int(field(r, "lease_id")) for r in sent]
        sent_prompts = {int(field(r, "prompt_id")) for r in sent}
        check("no lease sent twice", len(leases) == len(set(leases)),
              f"{len(leases)} groups sent under {len(set(leases))} lease ids")
        missing = [p for p, _ in ledger["accepted_units"] if p not in sent_prompts]
        check("accepted units were sent", not missing,
              f"{len(ledger['accepted_units'])} accepted units, {len(missing)} never sent by a "
              f"worker {missing[:10]}")
        dup_w = sum(1 for r in workers if r["event"] == "rollout.group_dropped"
                    and "duplicate" in r.get("text", ""))
    else:
        sent, dup_w = [], 0

    summary = {
        "steps": len(steps), "granted": d["granted"], "relet": d["relet"],
        "expired": d["expired"], "released": d["released"], "accepted": d["accepted"],
        "duplicates": d["duplicates"], "unknown": d["unknown"], "rejected": d["rejected"],
        "pending": u["pending"], "lost": u["lost"], "trained_groups": kept,
        "waiting": b["waiting"], "filtered_equal": b["filtered_equal"],
        "filtered_few": b["filtered_few"], "stale": b["stale"], "refused": refused,
        "groups_sent": len(sent), "worker_duplicate_acks": dup_w, "log_junk_lines": junk,
        "failures": failures,
    }
    print("summary: " + json.dumps(summary, sort_keys=True))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
