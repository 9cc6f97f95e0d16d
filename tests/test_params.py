"""The common options' one declaration (flows/params.py) and everything made from it."""

from __future__ import annotations

import inspect

import pytest
from conftest import REPO
from pydantic import ValidationError

from flows import commands
from flows.params import CommonOptions, flat_parameters, flow_arguments, options_table


def test_the_docs_table_is_the_one_the_declarations_make():
    page = (REPO / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    assert options_table() in page, "the Common options table drifted: run `uv run python -m flows.docgen`"


def test_every_field_has_a_description_and_a_flag_of_every_job_command():
    for job in ("embed", "extract", "caption", "transcribe", "images"):
        command = inspect.signature(getattr(commands, job)).parameters
        for name, field in CommonOptions.model_fields.items():
            assert field.description, name
            flag = field.json_schema_extra["cli"]
            own = flag[2:].replace("-", "_") if flag.startswith("--no-") else name
            assert own in command, (job, name)
            (option,) = command[own].annotation.__metadata__
            assert option.default == flag


def test_a_mapping_validates_into_the_model_and_unknown_names_are_refused():
    options = CommonOptions.model_validate({"provider": "local", "rpm": 600, "chunk_size": "50"})
    assert options == CommonOptions(provider="local", rpm=600.0, chunk_size=50)
    with pytest.raises(ValidationError, match="rmp"):
        CommonOptions.model_validate({"rmp": 600})
    with pytest.raises(ValidationError, match="chunk_size"):
        CommonOptions(chunk_size="many")


def test_flat_and_nested_parameters_go_both_ways():
    flat = {"input": "in.csv", "output": "out", "text_col": "body", "provider": "local", "rpm": 60.0}
    arguments = flow_arguments(flat)
    assert arguments == {
        "input": "in.csv",
        "output": "out",
        "text_col": "body",
        "options": CommonOptions(provider="local", rpm=60.0),
    }
    back = flat_parameters(arguments)
    assert back == flat_parameters({**arguments, "options": {"provider": "local", "rpm": 60}})
    assert back == {**flat, **{k: v for k, v in CommonOptions().model_dump().items() if k not in flat}}
