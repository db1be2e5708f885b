"""Benchmark: reconcile one customer with N users on each side (default 1,000,000) and 2% drift.

Prints a table: building the records, reconcile (median of --repeat runs), and the baseline of a
bare dict join over lower-cased e-mails of the same records, measured in the same process; plus
peak RSS. Usage: python bench/reconcile_1m.py [--users 1000000] [--drift 0.02] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import statistics
import sys
import time
import uuid

from domain import Policy, SafetyGuard, reconcile
from domain.records import SHAREFILE_USER, SM_USER, SharefileUser, SmUser


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(users: int, drift: float, seed: int) -> tuple[list[SmUser], list[SharefileUser]]:
    """Records validated from API-shaped dicts, as the adapters build them from real payloads."""
    rng = random.Random(seed)
    sm: list[SmUser] = []
    sf: list[SharefileUser] = []
    for n in range(users):
        email = f"user{n:07d}@customer.example"
        roll = rng.random()
        in_sharefile = roll >= drift / 2  # drift/2 left ShareFile ...
        provisioned = roll < drift / 2 or roll >= drift  # ... and drift/2 joined it, unprovisioned
        sm.append(
            SM_USER.validate_python(
                {
                    "id": f"u-{n:08d}",
                    "username": email,
                    "email": email.capitalize(),
                    "display_name": f"User {n}",
                    "enabled": True,
                    "sharefile": {
                        "state": "provisioned" if provisioned else "not_provisioned",
                        "updated_at": "2026-11-20T10:00:00Z",
                    },
                }
            )
        )
        if in_sharefile:
            sf.append(
                SHAREFILE_USER.validate_python(
                    {
                        "odata.type": "ShareFile.Api.Models.Contact",
                        "Id": str(uuid.UUID(int=rng.getrandbits(128))),
                        "Email": email,
                        "FirstName": "User",
                        "LastName": f"N{n}",
                        "IsDisabled": False,
                    }
                )
            )
    return sm, sf


def baseline_join(sm: list[SmUser], sf: list[SharefileUser]) -> int:
    """The floor: one dict per side on lower-cased e-mail and two set differences."""
    sm_keys = {(u.email or "").lower(): u for u in sm}
    sf_keys = {(u.email or "").lower(): u for u in sf}
    return len(sm_keys.keys() - sf_keys.keys()) + len(sf_keys.keys() - sm_keys.keys())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--drift", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    print(
        f"building {args.users:,} SM users and ~{args.users:,} ShareFile employees ...",
        file=sys.stderr,
    )
    started = time.perf_counter()
    sm, sf = build(args.users, args.drift, args.seed)
    build_s = time.perf_counter() - started
    rss_records = _rss_mb()

    # The guard would hold a 1% removal of a million users only if told to; lift it so that the
    # benchmark measures the full plan, including every deprovision item.
    policy = Policy(guard=SafetyGuard(max_deprovision=args.users, max_deprovision_ratio=1.0))
    reconcile_times, baseline_times = [], []
    plan = None
    for run in range(args.repeat):
        print(f"run {run + 1}/{args.repeat} ...", file=sys.stderr)
        gc.collect()
        started = time.perf_counter()
        baseline_join(sm, sf)
        baseline_times.append(time.perf_counter() - started)
        plan = None
        gc.collect()
        started = time.perf_counter()
        plan = reconcile(sm, sf, policy, customer_id="bench")
        reconcile_times.append(time.perf_counter() - started)
    assert plan is not None
    counts = plan.counts()
    rec, base = statistics.median(reconcile_times), statistics.median(baseline_times)

    print(
        f"\nreconcile, {args.users:,} users per side, {args.drift:.0%} drift "
        f"(median of {args.repeat})"
    )
    print(f"{'measure':<40}{'value':>14}")
    print(f"{'build records (once)':<40}{build_s:>13.2f}s")
    print(f"{'baseline: bare dict join':<40}{base:>13.2f}s")
    print(f"{'reconcile':<40}{rec:>13.2f}s")
    print(f"{'reconcile / baseline':<40}{rec / base:>13.1f}x")
    print(f"{'peak RSS after building records':<40}{rss_records:>11.0f} MB")
    print(f"{'peak RSS after reconcile':<40}{_rss_mb():>11.0f} MB")
    print(
        f"{'plan: provision / deprovision':<40}"
        f"{counts['provision']:>7,} / {counts['deprovision']:,}"
    )
    print(f"{'plan: in sync':<40}{counts['in_sync']:>14,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
