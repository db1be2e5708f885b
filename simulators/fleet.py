"""generate_fleet(): a reproducible synthetic fleet of customers, with its ground truth built in."""

from __future__ import annotations

import gc
import math
import random
from typing import Any

from simulators.scenario import Scenario, ScenarioCustomer

# (display first name, e-mail first name); a few accented names exercise Unicode on the wire.
_FIRST = (
    ("James", "james"), ("Mary", "mary"), ("John", "john"), ("Patricia", "patricia"),
    ("Robert", "robert"), ("Jennifer", "jennifer"), ("Michael", "michael"), ("Linda", "linda"),
    ("David", "david"), ("Elizabeth", "elizabeth"), ("William", "william"), ("Barbara", "barbara"),
    ("Richard", "richard"), ("Susan", "susan"), ("Joseph", "joseph"), ("Jessica", "jessica"),
    ("Thomas", "thomas"), ("Sarah", "sarah"), ("Charles", "charles"), ("Karen", "karen"),
    ("Daniel", "daniel"), ("Nancy", "nancy"), ("Matthew", "matthew"), ("Lisa", "lisa"),
    ("Anthony", "anthony"), ("Margaret", "margaret"), ("Mark", "mark"), ("Sandra", "sandra"),
    ("José", "jose"), ("Zoë", "zoe"), ("Renée", "renee"), ("Björn", "bjorn"),
    ("Amélie", "amelie"), ("Søren", "soren"), ("Łukasz", "lukasz"), ("Chloé", "chloe"),
)  # fmt: skip
_LAST = (
    ("Smith", "smith"), ("Johnson", "johnson"), ("Williams", "williams"), ("Brown", "brown"),
    ("Jones", "jones"), ("Garcia", "garcia"), ("Miller", "miller"), ("Davis", "davis"),
    ("Rodriguez", "rodriguez"), ("Martinez", "martinez"), ("Hernandez", "hernandez"),
    ("Lopez", "lopez"), ("Gonzalez", "gonzalez"), ("Wilson", "wilson"), ("Anderson", "anderson"),
    ("Taylor", "taylor"), ("Moore", "moore"), ("Jackson", "jackson"), ("Martin", "martin"),
    ("Lee", "lee"), ("Thompson", "thompson"), ("White", "white"), ("Harris", "harris"),
    ("Clark", "clark"), ("Müller", "muller"), ("Núñez", "nunez"), ("Ødegaard", "odegaard"),
    ("Dubois", "dubois"), ("Kowalski", "kowalski"), ("O'Brien", "obrien"),
)  # fmt: skip
_COMPANY_WORDS = (
    "Acme", "Northwind", "Contoso", "Fabrikam", "Globex", "Initech", "Umbrella", "Stark",
    "Wayne", "Tyrell", "Cyberdyne", "Hooli", "Vandelay", "Wonka", "Soylent", "Aperture",
)  # fmt: skip
_COMPANY_SUFFIXES = ("Ltd", "GmbH", "Inc", "LLP", "S.A.", "BV", "AG", "Pty")

CONTACT_TYPE = "ShareFile.Api.Models.Contact"
_UPDATED_AT = "2026-01-05T09:00:00Z"
_CREATED_DATES = tuple(
    f"20{year:02d}-0{month}-1{month}T09:30:00Z" for year in range(15, 26) for month in range(1, 10)
)

# The lognormal's sigma: median stays median_users, the mean is exp(sigma²/2) ≈ 1.8× it, and
# one customer in a few hundred is 20× the median.
_SIZE_SIGMA = 1.1
_SHAREFILE_DISABLED_SHARE = 0.02  # customers whose ShareFile service is off in SM
_UNMATCHED_SHARE = 0.02  # extra ShareFile employees without an SM user (reported only)
_UNMATCHED_DISABLED_SHARE = 0.3

# The default SafetyGuard (domain.policy): at most 25 removals, and at most 20% of the
# provisioned users, taken of at least 20 users (so at most 4 below that).
_GUARD_MAX = 25
_GUARD_RATIO_FLOOR = 20
_GUARD_RATIO_DIVISOR = 5  # removals <= provisioned // 5  <=>  removals / provisioned <= 20%

# What one SM user is, by construction. Each kind fixes the initial SM state, what ShareFile
# lists for that person, and the state after one sync cycle.
IN_SYNC = 0  # provisioned, active employee -> provisioned
NEW = 1  # not_provisioned, active employee -> provision -> provisioned
RETRY = 2  # failed, active employee -> provision -> provisioned
LEFT = 3  # provisioned, absent from ShareFile -> deprovision -> not_provisioned
CLIENT = 4  # provisioned, now a ShareFile client user -> deprovision -> not_provisioned
NO_SERVICE = 5  # not_provisioned, not in ShareFile -> not_provisioned
SM_DISABLED = 6  # disabled in SM, not_provisioned, not in ShareFile -> not_provisioned
PENDING_IN = 7  # provisioning (in flight), active employee -> provisioning (left alone)
PENDING_OUT = 8  # deprovisioning (in flight), absent -> deprovisioning (left alone)

_INITIAL = (
    "provisioned", "not_provisioned", "failed", "provisioned", "provisioned",
    "not_provisioned", "not_provisioned", "provisioning", "deprovisioning",
)  # fmt: skip
_FINAL = (
    "provisioned", "provisioned", "provisioned", "not_provisioned", "not_provisioned",
    "not_provisioned", "not_provisioned", "provisioning", "deprovisioning",
)  # fmt: skip
_IS_EMPLOYEE = (True, True, True, False, False, False, False, True, False)
_REMOVAL = frozenset({LEFT, CLIENT})

# Cumulative thresholds for drawing a kind. Drift splits into 40% new, 5% retries, 35% leavers,
# 20% moved to clients; the rest is in sync, or stable without the service, or in flight.
_DRIFT_SPLIT: tuple[tuple[float, int], ...] = (
    (0.40, NEW),
    (0.45, RETRY),
    (0.80, LEFT),
    (1.0, CLIENT),
)
_STABLE_SPLIT: tuple[tuple[float, int], ...] = (
    (0.88, IN_SYNC),
    (0.96, NO_SERVICE),
    (0.98, SM_DISABLED),
    (0.99, PENDING_IN),
    (1.0, PENDING_OUT),
)


def _draw(rng: random.Random, n: int, drift: float) -> list[int]:
    kinds: list[int] = []
    append = kinds.append
    draw = rng.random
    for _ in range(n):
        roll = draw()
        if roll < drift:
            split, roll = _DRIFT_SPLIT, roll / drift
        else:
            split, roll = _STABLE_SPLIT, (roll - drift) / (1.0 - drift)
        for threshold, kind in split:
            if roll < threshold:
                append(kind)
                break
        else:
            append(split[-1][1])
    return kinds


def _keep_within_guard(rng: random.Random, kinds: list[int], extra_employees: int) -> None:
    """Turn surplus leavers back into in-sync users so the default guard would not hold them."""
    removals = [position for position, kind in enumerate(kinds) if kind in _REMOVAL]
    if not removals:
        return
    provisioned = sum(1 for kind in kinds if _INITIAL[kind] == "provisioned")
    allowed = min(_GUARD_MAX, max(provisioned, _GUARD_RATIO_FLOOR) // _GUARD_RATIO_DIVISOR)
    employees = extra_employees + sum(1 for kind in kinds if _IS_EMPLOYEE[kind])
    if employees == 0:
        # An empty feed with provisioned users is held as "source empty": keep one employee.
        allowed = min(allowed, len(removals) - 1)
    if len(removals) > allowed:
        # Converting a removal to IN_SYNC keeps the provisioned count the ratio is taken of.
        for position in rng.sample(removals, len(removals) - allowed):
            kinds[position] = IN_SYNC


def _customer_size(rng: random.Random, median_users: int, max_users: int) -> int:
    return max(1, min(max_users, round(median_users * math.exp(rng.gauss(0.0, _SIZE_SIGMA)))))


def _build_customer(
    rng: random.Random,
    number: int,
    users: int,
    *,
    drift: float,
    guard_safe: bool,
    sharefile_enabled: bool,
) -> tuple[ScenarioCustomer, dict[str, str]]:
    customer_id = f"cust-{number:05d}"
    word = _COMPANY_WORDS[number % len(_COMPANY_WORDS)]
    company = f"{word} {number:05d} {_COMPANY_SUFFIXES[(number // 7) % len(_COMPANY_SUFFIXES)]}"
    subdomain = f"{word.lower()}{number:05d}"
    domain_lower = f"{subdomain}.example"
    domain_title = f"{word}{number:05d}.example"

    kinds = _draw(rng, users, drift)
    extra = round(users * _UNMATCHED_SHARE)
    if guard_safe:
        _keep_within_guard(rng, kinds, extra)

    sm_users: list[dict[str, Any]] = []
    employees: list[dict[str, Any]] = []
    clients: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    firsts, lasts, created = _FIRST, _LAST, _CREATED_DATES
    draw = rng.random
    n_first, n_last, n_created = len(firsts), len(lasts), len(created)
    id_prefix = f"{number:08x}-5f1e-4a00-8000-"
    # Read-only objects shared by many users: a million-user customer must fit in memory, and
    # the simulator never mutates scenario objects (it keeps changed states aside).
    services = {state: {"state": state, "updated_at": _UPDATED_AT} for state in set(_INITIAL)}
    display_names: dict[tuple[int, int], tuple[str, str]] = {}

    def names(first_index: int, last_index: int) -> tuple[str, str]:
        pair = display_names.get((first_index, last_index))
        if pair is None:
            first, last = firsts[first_index][0], lasts[last_index][0]
            pair = display_names[first_index, last_index] = (f"{first} {last}", f"{last}, {first}")
        return pair

    # Ten keys at most: a dict of up to ten keys is 272 bytes, eleven cost 464.
    def contact(
        position: int, first_index: int, last_index: int, email: str, disabled: bool
    ) -> dict[str, Any]:
        return {
            "odata.type": CONTACT_TYPE,
            "Id": f"{id_prefix}{position:012x}",
            "Email": email,
            "Name": names(first_index, last_index)[1],
            "FirstName": firsts[first_index][0],
            "LastName": lasts[last_index][0],
            "Company": company,
            "IsConfirmed": True,
            "IsDisabled": disabled,
            "CreatedDate": created[position % n_created],
        }

    for position, kind in enumerate(kinds):
        first_index = int(draw() * n_first)
        last_index = (position * 7 + int(draw() * n_last)) % n_last
        first_mail, last_mail = firsts[first_index][1], lasts[last_index][1]
        sharefile_email = f"{first_mail}.{last_mail}{position}@{domain_lower}"
        # A quarter of SM addresses are capitalised: matching must case-fold, not compare bytes.
        if draw() < 0.25:
            sm_email = f"{first_mail.title()}.{last_mail.title()}{position}@{domain_title}"
        else:
            sm_email = sharefile_email
        user_id = f"u{number:05d}-{position:07d}"
        state = _INITIAL[kind]
        sm_users.append(
            {
                "id": user_id,
                "username": sharefile_email,
                "email": sm_email,
                "display_name": names(first_index, last_index)[0],
                "enabled": kind != SM_DISABLED,
                "sharefile": services[state],
            }
        )
        if _IS_EMPLOYEE[kind]:
            employees.append(contact(position, first_index, last_index, sharefile_email, False))
        elif kind == CLIENT:
            clients.append(contact(position, first_index, last_index, sharefile_email, False))
        # A customer that is not synchronised keeps every state it has.
        expected[user_id] = _FINAL[kind] if sharefile_enabled else state

    for extra_position in range(users, users + extra):
        first_index, last_index = int(draw() * n_first), int(draw() * n_last)
        email = (
            f"{firsts[first_index][1]}.{lasts[last_index][1]}.new{extra_position}@{domain_lower}"
        )
        disabled = draw() < _UNMATCHED_DISABLED_SHARE
        employees.append(contact(extra_position, first_index, last_index, email, disabled))

    customer = ScenarioCustomer.model_construct(
        id=customer_id,
        name=company,
        sharefile_enabled=sharefile_enabled,
        subdomain=subdomain,
        sm_users=sm_users,
        sharefile_employees=employees,
        sharefile_clients=clients,
    )
    return customer, expected


def generate_fleet(
    customers: int,
    *,
    median_users: int = 20,
    max_users: int = 5000,
    drift: float = 0.03,
    seed: int = 0,
    guard_safe: bool = True,
    big_customer_users: int | None = None,
    large_share: float = 0.0,
    large_users: tuple[int, int] = (5_000, 15_000),
) -> Scenario:
    """A fleet of `customers`, the same for the same arguments, with `expected` filled in.

    Users per customer follow a lognormal around `median_users`, capped at `max_users`; with
    `big_customer_users` the first customer has exactly that many instead. With `large_share`,
    that share of the customers (drawn at random) has instead between `large_users[0]` and
    `large_users[1]` users (uniformly, above `max_users` if need be): the few very large
    accounts of a real fleet, which a lognormal around 20 almost never draws. A share `drift` of the
    users differs between the two sides: new employees (or failed ones) to provision, leavers and
    employees moved to Clients to deprovision. The rest is in sync, without the service, disabled
    in SM, or in flight; ~2% extra ShareFile employees have no SM user (some disabled), and ~2% of
    customers (never the first) have their ShareFile service off in SM.

    `expected[customer][user]` is, by construction: `provisioned` if the SM user matches an active
    employee, in-flight states unchanged, else `not_provisioned`; for a customer with ShareFile
    off, the initial state (it is never synchronised). With `guard_safe` each customer's removals
    fit the default SafetyGuard, so `expected` holds after one cycle without approvals; without
    it, `expected` is the state once every held removal has been approved.
    """
    if customers < 0:
        raise ValueError("customers must not be negative")
    if not 0.0 <= drift < 1.0:
        raise ValueError("drift must be within [0, 1)")
    if median_users < 1 or max_users < 1:
        raise ValueError("median_users and max_users must be positive")
    if not 0.0 <= large_share <= 1.0 or not 1 <= large_users[0] <= large_users[1]:
        raise ValueError("large_share must be within [0, 1] and large_users a (low, high) range")
    rng = random.Random(seed)
    built: list[ScenarioCustomer] = []
    expected: dict[str, dict[str, str]] = {}
    # Millions of acyclic dicts make the cyclic collector rescan the growing heap over and over
    # (about 40% of the time for a million users); nothing built here can form a cycle.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for number in range(customers):
            if number == 0 and big_customer_users is not None:
                users = big_customer_users
            # Drawn only when asked for, so that fleets without large customers stay the same.
            elif large_share and rng.random() < large_share:
                users = rng.randint(*large_users)
            else:
                users = _customer_size(rng, median_users, max_users)
            enabled = number == 0 or rng.random() >= _SHAREFILE_DISABLED_SHARE
            customer, truth = _build_customer(
                rng, number, users, drift=drift, guard_safe=guard_safe, sharefile_enabled=enabled
            )
            built.append(customer)
            expected[customer.id] = truth
    finally:
        if collecting:
            gc.enable()
    # model_construct: the generator builds valid objects by construction, and validating a
    # million-user fleet again would cost seconds and a second copy of every dict.
    return Scenario.model_construct(customers=built, expected=expected)
