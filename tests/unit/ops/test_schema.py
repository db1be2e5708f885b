"""The committed contracts under docs/ match the models, hold together, and accept real messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from domain.messages import PAYLOAD_TYPES, SCHEMA_VERSION, decode
from sfsync.cli.ops import schema as schema_command
from sfsync.schema import example_messages, render_documents

DOCS = Path(__file__).resolve().parents[3] / "docs"
STALE = "docs/ is out of date with domain/messages.py: run `sfsync schema` and commit docs/"
ASYNCAPI_URI = "urn:sfsync:asyncapi"


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))


def committed_schema(message_type: str) -> dict[str, Any]:
    return json.loads((DOCS / "schemas" / f"{message_type}.json").read_text(encoding="utf-8"))


def test_committed_documents_are_exactly_what_sfsync_schema_generates(tmp_path: Path) -> None:
    result = CliRunner().invoke(schema_command, ["--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(DOCS)
        for p in [DOCS / "asyncapi.yaml", *(DOCS / "schemas").glob("*.json")]
        if p.is_file()
    )
    assert generated == committed, STALE
    for relative in generated:
        assert (tmp_path / relative).read_bytes() == (DOCS / relative).read_bytes(), (
            f"{relative}: {STALE}"
        )


def test_generation_is_deterministic_and_ends_every_file_with_a_newline() -> None:
    first, second = render_documents(), render_documents()
    assert first == second
    assert all(text.endswith("\n") and not text.endswith("\n\n") for text in first.values())


def test_schema_command_removes_files_of_message_types_that_no_longer_exist(
    tmp_path: Path,
) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "sync.retired.json").write_text("{}\n")
    CliRunner().invoke(schema_command, ["--out", str(tmp_path)])
    assert not (tmp_path / "schemas" / "sync.retired.json").exists()
    assert (tmp_path / "schemas" / "sync.command.json").exists()


def test_asyncapi_document_has_the_required_top_level_fields(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "2.6.0"
    assert asyncapi["info"]["title"] and asyncapi["info"]["version"] == str(SCHEMA_VERSION)
    assert isinstance(asyncapi["channels"], dict) and asyncapi["channels"]
    assert asyncapi["servers"]["rabbitmq"]["protocol"] == "amqp"


def test_every_message_type_is_a_channel_on_the_topic_exchange(asyncapi: dict[str, Any]) -> None:
    assert set(asyncapi["channels"]) == set(PAYLOAD_TYPES)
    for name, channel in asyncapi["channels"].items():
        binding = channel["bindings"]["amqp"]
        assert binding["is"] == "routingKey", name
        assert binding["exchange"] == {
            "name": "sfsync",
            "type": "topic",
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        }
        assert "publish" in channel or "subscribe" in channel, name


def test_commands_name_the_work_queue_they_are_delivered_to(asyncapi: dict[str, Any]) -> None:
    queues = {
        name: channel["x-sfsync-queue"]["name"]
        for name, channel in asyncapi["channels"].items()
        if "x-sfsync-queue" in channel
    }
    assert queues == {
        "sync.command": "sfsync.sync",
        "sync.requested": "sfsync.sync",
        "provisioning.requested": "sfsync.provisioning",
    }


def test_every_message_is_referenced_by_a_channel_and_named_by_its_type(
    asyncapi: dict[str, Any],
) -> None:
    messages = asyncapi["components"]["messages"]
    referenced = {
        operation["message"]["$ref"].rsplit("/", 1)[1]
        for channel in asyncapi["channels"].values()
        for key in ("publish", "subscribe")
        if (operation := channel.get(key))
    }
    assert referenced == set(messages)
    assert {message["name"] for message in messages.values()} == set(PAYLOAD_TYPES)
    for channel_name, channel in asyncapi["channels"].items():
        for key in ("publish", "subscribe"):
            if key in channel:
                target = channel[key]["message"]["$ref"].rsplit("/", 1)[1]
                assert messages[target]["name"] == channel_name


def refs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs_in(value)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are expected: {ref}"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def test_every_reference_in_the_asyncapi_document_resolves(asyncapi: dict[str, Any]) -> None:
    refs = set(refs_in(asyncapi))
    assert len(refs) > len(PAYLOAD_TYPES)
    for ref in refs:
        assert isinstance(resolve(asyncapi, ref), dict)


def test_every_reference_in_each_json_schema_file_resolves() -> None:
    for message_type in PAYLOAD_TYPES:
        document = committed_schema(message_type)
        jsonschema.Draft202012Validator.check_schema(document)
        for ref in refs_in(document):
            resolve(document, ref)


def test_there_is_one_example_per_message_type_and_the_decoder_accepts_it() -> None:
    examples = example_messages()
    assert set(examples) == set(PAYLOAD_TYPES)
    for message_type, message in examples.items():
        assert message.type == message_type
        assert decode(message.to_json()) == message


@pytest.mark.parametrize("message_type", sorted(PAYLOAD_TYPES))
def test_example_message_is_valid_against_its_json_schema(message_type: str) -> None:
    instance = json.loads(example_messages()[message_type].to_json())
    validator = jsonschema.Draft202012Validator(
        committed_schema(message_type), format_checker=jsonschema.FormatChecker()
    )
    assert list(validator.iter_errors(instance)) == []


@pytest.mark.parametrize("message_type", sorted(PAYLOAD_TYPES))
def test_example_message_is_valid_against_the_asyncapi_payload(
    asyncapi: dict[str, Any], message_type: str
) -> None:
    registry: Registry[Any] = Registry().with_resource(
        ASYNCAPI_URI, Resource.from_contents(asyncapi, default_specification=DRAFT202012)
    )
    [message] = [
        m for m in asyncapi["components"]["messages"].values() if m["name"] == message_type
    ]
    payload_ref = ASYNCAPI_URI + message["payload"]["$ref"]
    validator = jsonschema.Draft202012Validator({"$ref": payload_ref}, registry=registry)
    instance = json.loads(example_messages()[message_type].to_json())
    assert list(validator.iter_errors(instance)) == []
    # The document's own examples are the same messages.
    assert message["examples"][0]["payload"] == instance


def test_the_schemas_reject_what_the_decoder_rejects() -> None:
    instance = json.loads(example_messages()["sync.command"].to_json())
    validator = jsonschema.Draft202012Validator(committed_schema("sync.command"))
    wrong_type = {**instance, "type": "sync.held"}
    wrong_version = {**instance, "schema_version": SCHEMA_VERSION + 1}
    bad_customer = {**instance, "payload": {**instance["payload"], "customer_id": "../etc"}}
    extra_field = {**instance, "payload": {**instance["payload"], "surprise": 1}}
    for bad in (wrong_type, wrong_version, bad_customer, extra_field):
        assert not validator.is_valid(bad), bad
