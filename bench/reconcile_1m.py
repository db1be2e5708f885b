"""Benchmark: reconcile one customer with N users on each side (default 1,000,000) and 2% drift.

Each measurement runs in a fresh child process, so that peak RSS belongs to it alone:
  * reconcile: build both sides' records (validated from API-shaped dicts, as the adapters do),
    then reconcile them --repeat times (the time of reconcile alone);
  * stream: ShareFile's records in a list, Services Manager's validated one at a time from a
    generator and not kept, as the sync worker streams its pages into reconcile (the memory a
    worker needs; its time includes validating the SM records);
  * baseline: both sides' records, then a bare dict join over lower-cased e-mails (the floor of
    any matching: one dict per side and two set differences).
Prints a table with median times, each process's peak RSS and what the operation added on top of
its records. Usage: python bench/reconcile_1m.py [--users 1000000] [--drift 0.02] [--repeat 3]"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

from common import peak_rss_mb

from domain import Policy, SafetyGuard, reconcile
from domain.records import SHAREFILE_USER, SM_USER, SharefileUser, SmUser

# Real names repeat (many Johns, many Smiths): pools of common first and last names.
FIRST_NAMES = [f"First{n}" for n in range(300)]
LAST_NAMES = [f"Last{n}" for n in range(2000)]


def api_users(users: int, drift: float, seed: int) -> Iterator[tuple[dict, dict | None]]:  # type: ignore[type-arg]
    """Each user as the two APIs return it: (SM user, ShareFile employee or None)."""
    rng = random.Random(seed)
    for n in range(users):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        address = f"{first}.{last}.{n}@customer.example"
        roll = rng.random()
        in_sharefile = roll >= drift / 2  # drift/2 left ShareFile ...
        provisioned = roll < drift / 2 or roll >= drift  # ... and drift/2 joined, unprovisioned
        sm = {
            "id": f"u-{n:08d}",
            "username": f"{first[0]}{last}{n}@customer.example".lower(),
            "email": address,  # mixed case, as Services Manager shows it
            "display_name": f"{first} {last}",
            "enabled": True,
            "sharefile": {
                "state": "provisioned" if provisioned else "not_provisioned",
                "updated_at": "2026-11-20T10:00:00Z",
            },
        }
        sf = None
        if in_sharefile:
            sf = {
                "odata.type": "ShareFile.Api.Models.Contact",
                "Id": str(uuid.UUID(int=rng.getrandbits(128))),
                "Email": address.lower(),  # ShareFile tends to store lower case
                "FirstName": first,
                "LastName": last,
                "IsDisabled": False,
            }
        yield sm, sf


def sharefile_records(users: int, drift: float, seed: int) -> list[SharefileUser]:
    """Records validated from API-shaped dicts, as the adapters build them from real payloads."""
    return [SHAREFILE_USER.validate_python(sf) for _, sf in api_users(users, drift, seed) if sf]


def sm_records(users: int, drift: float, seed: int) -> Iterator[SmUser]:
    """Services Manager's records, one at a time, as the adapter's page stream yields them."""
    return (SM_USER.validate_python(sm) for sm, _ in api_users(users, drift, seed))


def baseline_join(sm: list[SmUser], sf: list[SharefileUser]) -> int:
    sm_keys = {(u.email or "").lower(): u for u in sm}
    sf_keys = {(u.email or "").lower(): u for u in sf}
    return len(sm_keys.keys() - sf_keys.keys()) + len(sf_keys.keys() - sm_keys.keys())


def child(mode: str, args: argparse.Namespace) -> None:
    # Lift the guard: the benchmark measures the full plan, every deprovision item included.
    policy = Policy(guard=SafetyGuard(max_deprovision=args.users, max_deprovision_ratio=1.0))
    started = time.perf_counter()
    sf = sharefile_records(args.users, args.drift, args.seed)
    sm = [] if mode == "stream" else list(sm_records(args.users, args.drift, args.seed))
    build_s = time.perf_counter() - started
    gc.collect()
    rss_records = peak_rss_mb()
    times, counts = [], {}
    for _ in range(args.repeat):
        gc.collect()
        started = time.perf_counter()
        if mode == "baseline":
            baseline_join(sm, sf)
        else:
            users = sm_records(args.users, args.drift, args.seed) if mode == "stream" else sm
            counts = reconcile(users, sf, policy, customer_id="bench").counts()
        times.append(time.perf_counter() - started)
    print(
        json.dumps(
            {
                "build_s": build_s,
                "times": times,
                "rss_records": rss_records,
                "rss_peak": peak_rss_mb(),
                "counts": counts,
            }
        )
    )


def run_child(mode: str, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    print(
        f"{mode}: building {args.users:,} users per side, {args.repeat} runs ...", file=sys.stderr
    )
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--users",
        str(args.users),
        "--drift",
        str(args.drift),
        "--repeat",
        str(args.repeat),
        "--seed",
        str(args.seed),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--drift", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--child", choices=["reconcile", "baseline", "stream"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return 0

    base = run_child("baseline", args)
    rec = run_child("reconcile", args)
    stream = run_child("stream", args)
    base_s, rec_s = statistics.median(base["times"]), statistics.median(rec["times"])
    stream_s = statistics.median(stream["times"])
    counts = rec["counts"]
    if stream["counts"] != counts:
        raise SystemExit(f"streamed plan differs: {stream['counts']} != {counts}")
    rows = [
        ("build both sides' records (once)", f"{rec['build_s']:.2f} s"),
        ("baseline: bare dict join", f"{base_s:.2f} s"),
        ("reconcile", f"{rec_s:.2f} s"),
        ("reconcile / baseline", f"{rec_s / base_s:.1f}x"),
        ("RSS holding both sides' records", f"{rec['rss_records']:.0f} MB"),
        ("peak RSS, reconcile process", f"{rec['rss_peak']:.0f} MB"),
        ("  added by reconcile", f"{rec['rss_peak'] - rec['rss_records']:.0f} MB"),
        ("peak RSS, baseline process", f"{base['rss_peak']:.0f} MB"),
        ("  added by the bare join", f"{base['rss_peak'] - base['rss_records']:.0f} MB"),
        ("streamed SM side (as the worker does):", ""),
        ("  RSS holding ShareFile's records", f"{stream['rss_records']:.0f} MB"),
        ("  reconcile + building SM records", f"{stream_s:.2f} s"),
        ("  peak RSS", f"{stream['rss_peak']:.0f} MB"),
        ("plan: provision / deprovision", f"{counts['provision']:,} / {counts['deprovision']:,}"),
        ("plan: in sync", f"{counts['in_sync']:,}"),
    ]
    print(
        f"\nreconcile, {args.users:,} users per side, {args.drift:.0%} drift, "
        f"median of {args.repeat} runs"
    )
    for name, value in rows:
        print(f"{name:<40}{value:>18}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
