"""The docs pages made from the code (flows/docgen.py) are up to date: the command reference and the code layout."""

from __future__ import annotations

from flows import docgen


def test_generated_pages_are_up_to_date():
    stale = [str(path.relative_to(docgen.REPO)) for path in docgen.stale_pages()]
    assert not stale, f"{', '.join(stale)} drifted from the code: run `uv run python -m flows.docgen`"


def test_the_command_reference_names_every_command_and_option():
    import typer.main

    from flows.cli import app

    page = docgen.cli_page()
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="gembatch")
    for name in group.list_commands(ctx):
        assert f"## gembatch {name}\n" in page
        for param in group.get_command(ctx, name).params:
            if param.param_type_name == "option":
                assert f"`{param.opts[0]}" in page, (name, param.opts)
