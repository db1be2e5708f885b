"""A sync command handled twice (at-least-once delivery) after its first handling's removal was
sent and done: the audit commands still show the removal, next to the re-plan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from click.testing import CliRunner

from adapters.audit_store import AuditStore
from consumers.submitter import SubmitHandler
from consumers.sync_worker import SyncHandler
from domain.messages import SyncCommand
from domain.policy import Policy
from domain.records import SharefileState
from sfsync.cli import main
from tests.fakes import FakeServicesManager, FakeShareFile, employee, fixed_stamper, sm_user


def test_a_removal_stays_on_record_when_the_command_is_handled_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore.open(url)
    sm, sharefile = FakeServicesManager(), FakeShareFile()
    sm.add_customer(
        "c1",
        [
            sm_user("alice-id", "alice@x.example", "provisioned"),
            sm_user("bob-id", "bob@x.example", "provisioned"),
        ],
    )
    sharefile.set_employees("c1", [employee("sf-alice", "alice@x.example")])
    stamp = fixed_stamper()
    worker = SyncHandler(sm=sm, sharefile=sharefile, policy=Policy(), stamp=stamp)
    submitter = SubmitHandler(sm=sm, stamp=stamp)
    command = stamp(SyncCommand(customer_id="c1", run_id="r1"), correlation_id="r1")

    first = worker.handle(command)
    [request] = [m for m in first if m.type == "provisioning.requested"]
    for message in [*first, *submitter.handle(request)]:
        store.record(message)
    # Services Manager has removed bob; then the command is delivered again (its ack was lost).
    sm.users["c1"][1] = dataclasses.replace(sm.users["c1"][1], state=SharefileState.NOT_PROVISIONED)
    second = worker.handle(command)
    assert [m.type for m in second] == ["sync.completed"]  # nothing left to request
    for message in second:
        store.record(message)
    store.close()

    env = {"SFSYNC_DATABASE_URL": url}
    why = CliRunner().invoke(
        main, ["why", "--customer", "c1", "--user", "bob-id", "--format", "json"], env=env
    )
    assert why.exit_code == 0, why.output
    [decision] = json.loads(why.stdout)
    assert (decision["decision"], decision["run_id"]) == ("deprovision", "r1")
    assert decision["answer"]["status"] == "accepted"

    report = CliRunner().invoke(main, ["report", "--customer", "c1", "--format", "json"], env=env)
    rows = json.loads(report.stdout)
    assert [(r["run_id"], r["counts"]["deprovision"], r["answers"]) for r in rows] == [
        ("r1", 1, {}),
        ("r1", 0, {"accepted": 1}),  # the run's answers, on its last row
    ]
