"""Credentials in a gateway's base URL stay out of everything Prefect stores: a flow run's parameters
(a Python caller's plain mapping of options, the flow runs `--shards` starts), its name, logs,
artifacts and task runs; and the shards still reach the gateway with them, through a Secret block."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import TEST_KEY, TEST_KEY_ENV, read_output, write_corpus
from test_media_cells import GATEWAY_PASSWORD, GATEWAY_QUERY_KEY, GATEWAY_USER, gateway

from tasks.errors import ConfigError

SECRETS = [GATEWAY_PASSWORD, GATEWAY_QUERY_KEY, TEST_KEY]


def gateway_url(port: int) -> str:
    return f"http://{GATEWAY_USER}:{GATEWAY_PASSWORD}@127.0.0.1:{port}/v1beta/openai/?key={GATEWAY_QUERY_KEY}"


def prefect_records(flow_run_ids: list[str]) -> dict[str, str]:
    """Everything the Prefect server keeps about these flow runs, as text."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    return asyncio.run(_read_records(flow_run_ids))


async def _read_records(flow_run_ids: list[str]) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
    async with get_client() as client:
        flow_runs = [await client.read_flow_run(i) for i in flow_run_ids]
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
        artifacts = await client.read_artifacts(flow_run_filter=runs)
        task_runs = await client.read_task_runs(flow_run_filter=runs)
        # The Secret block's value is kept encrypted, and shown masked unless asked for in full.
        blocks = await client.read_block_documents(include_secrets=False)
    return {
        "flow run parameters": json.dumps([r.parameters for r in flow_runs]),
        "flow run names and labels": json.dumps([[r.name, r.labels, r.tags] for r in flow_runs]),
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(f"{a.description} {a.data}" for a in artifacts),
        "task runs": json.dumps([[t.name, t.task_inputs, t.tags] for t in task_runs], default=str),
        "blocks": json.dumps([b.data for b in blocks], default=str),
    }


def assert_no_secret(records: dict[str, str]) -> None:
    leaks = [(where, s) for where, text in records.items() for s in SECRETS if s in text]
    assert leaks == []


def test_options_given_as_a_mapping_are_stored_redacted(prefect_server, emulator, tmp_path: Path):
    from flows.embed import embed_flow

    src = write_corpus(tmp_path / "in.parquet", [1, 2, 3], ["alpha", "beta", "gamma"])
    upstream = f"http://127.0.0.1:{urlsplit(emulator.base_url).port}"
    with gateway(upstream) as port:
        options = {"provider": "local", "base_url": gateway_url(port), "api_key_env": TEST_KEY_ENV}
        # A Python caller's plain mapping, which Prefect would store as it is.
        doc = asyncio.run(embed_flow(input=str(src), output=str(tmp_path / "out"), options=options))
    assert doc["status"] == "completed"
    assert read_output(tmp_path / "out")["id"].to_list() == [1, 2, 3]
    records = prefect_records([doc["flow_run_id"]])
    stored = json.loads(records["flow run parameters"])[0]
    assert stored["options"]["base_url"] == f"http://***@127.0.0.1:{port}/v1beta/openai/?key=***"
    assert_no_secret(records)
    assert_no_secret({"_runs": (tmp_path / "out" / "_runs").glob("*.json").__next__().read_text()})


async def _run_shards_in_process(flow, parent_run: asyncio.Task, count: int) -> list:
    """Do a worker's part: run each flow run the parent started, with the parameters the server keeps."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.flow_engine import run_flow_async

    shards: list = []
    async with get_client() as client:
        while len(shards) < count:
            assert not parent_run.done(), parent_run.result()
            await asyncio.sleep(0.5)
            shards = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["gembatch-shard"]))
            )
    for shard in shards:
        await run_flow_async(flow, flow_run=shard, parameters=shard.parameters, return_type="state")
    return shards


def test_shards_get_the_url_without_credentials_and_still_reach_the_gateway(prefect_server, emulator, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.embed import embed_flow
    from flows.params import CommonOptions
    from flows.shards import BASE_URL_SECRET_PREFIX

    src = write_corpus(tmp_path / "in.parquet", list(range(1, 9)), [f"text {i}" for i in range(1, 9)])
    out = tmp_path / "out"
    upstream = f"http://127.0.0.1:{urlsplit(emulator.base_url).port}"

    async def scenario(port: int) -> tuple[dict, list]:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("gembatch-embed")
            await client.create_deployment(flow_id=flow_id, name="secrets", entrypoint="flows/embed.py:embed_flow")
        options = CommonOptions(
            provider="local", base_url=gateway_url(port), api_key_env=TEST_KEY_ENV, shards=2, chunk_size=2
        )
        parent = asyncio.create_task(embed_flow(input=str(src), output=str(out), options=options))
        shards = await _run_shards_in_process(embed_flow, parent, 2)
        return await parent, shards

    with gateway(upstream) as port:
        doc, shards = asyncio.run(scenario(port))
    assert doc["status"] == "completed", doc["message"]
    assert doc["counts"]["succeeded"] == 8
    assert sorted(read_output(out)["id"].to_list()) == list(range(1, 9))  # through the gateway, credentials and all
    for shard in shards:
        options = shard.parameters["options"]
        assert options["base_url"] == f"http://***@127.0.0.1:{port}/v1beta/openai/?key=***"
        assert options["base_url_secret"].startswith(BASE_URL_SECRET_PREFIX)
    records = prefect_records([doc["flow_run_id"], *(str(s.id) for s in shards)])
    assert_no_secret(records)
    assert_no_secret({"_runs": "\n".join(p.read_text() for p in (out / "_runs").glob("*.json"))})


def test_a_base_url_secret_that_is_missing_or_no_url_is_one_message(prefect_server):
    from prefect.blocks.system import Secret

    from flows.engine_options import run_options
    from flows.params import CommonOptions

    with pytest.raises(ConfigError, match="no Prefect Secret block named 'nowhere'.*--base-url"):
        run_options("in", "out", CommonOptions(base_url_secret="nowhere"))
    Secret(value="not a url").save("gembatch-test-not-a-url", overwrite=True)
    with pytest.raises(ConfigError, match="holds no http"):
        run_options("in", "out", CommonOptions(base_url_secret="gembatch-test-not-a-url"))


def test_a_url_with_masked_credentials_is_refused_with_the_way_out():
    from flows.engine_options import run_options
    from flows.params import CommonOptions

    masked = "http://***@127.0.0.1:9/v1beta/openai/?key=***"
    with pytest.raises(ConfigError, match=r"credentials masked \(\*\*\*\).*--base-url-secret"):
        run_options("in", "out", CommonOptions(base_url=masked))
    plain = run_options("in", "out", CommonOptions(base_url="http://127.0.0.1:9/v1/?api-version=***"))
    assert plain.provider.base_url == "http://127.0.0.1:9/v1/?api-version=***"
