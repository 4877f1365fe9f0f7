"""One server for the contract tests (schemathesis and the fuzzer): answers of at most 8 tokens, since
both are about shapes and statuses, not about long answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.app.conftest import Server, start_server, stop_server


@pytest.fixture(scope="package")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("contract"), "--max-tokens-limit", "8")
    yield running
    stop_server(running)
