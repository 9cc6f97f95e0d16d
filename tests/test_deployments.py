"""deployments.yaml deploys with the real `prefect deploy` against a Prefect server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

# Slow tier: the real `prefect deploy` of every deployment in a subprocess (10-30 s, most of it CPU). The slow
# tier's tests/test_worker.py and test_shards.py deploy from the same file and run what they deploy.
pytestmark = pytest.mark.slow


def test_deployments_yaml_deploys_every_flow_with_its_schedule(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.params import CommonOptions

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "GEMBATCH_HOME": str(REPO)}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    subprocess.run(
        [*prefect, "work-pool", "create", "gembatch", "--type", "process"],
        env=env,
        cwd=REPO,
        check=False,
        capture_output=True,
    )
    result = subprocess.run(
        [*prefect, "deploy", "--prefect-file", "deployments.yaml", "--all"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    spec = yaml.safe_load(Path(REPO / "deployments.yaml").read_text())

    async def read():
        async with get_client() as client:
            return {d.name: d for d in await client.read_deployments()}

    deployed = asyncio.run(read())
    for item in spec["deployments"]:
        deployment = deployed[item["name"]]
        assert deployment.parameters == item["parameters"]
        assert [s.schedule.cron for s in deployment.schedules] == [s["cron"] for s in item["schedules"]]
        assert deployment.entrypoint == item["entrypoint"]
        # The common options are one nested parameter, described field by field in the run form.
        schema = deployment.parameter_openapi_schema
        assert schema["properties"]["options"]["$ref"] == "#/definitions/CommonOptions"
        fields = schema["definitions"]["CommonOptions"]["properties"]
        assert sorted(fields) == sorted(CommonOptions.model_fields)
        assert all(fields[name]["description"] == f.description for name, f in CommonOptions.model_fields.items())
