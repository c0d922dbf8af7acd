"""The test suite mirrors the package: tests/ for the top-level modules, tests/data, tests/integrations
and tests/models for the subpackages, tests/benchmarks for the benchmarks' smallest runs. Shared code
that is not a test (helpers, the S3 server, the multi-process drivers) is in tests/support and is
imported as `tests.support.<module>` (the repository root is on the path: pyproject's `pythonpath`)."""

import pytest

# shared fixtures: the bad-input matrix's dataset and checkpoint, `reaper` (kills what a failed run leaves),
# `s3_server` / `s3` (a real S3-compatible server per module)
pytest_plugins = ['tests.support.bad_inputs', 'tests.support.processes', 'tests.support.s3_fixtures']


@pytest.fixture(autouse=True)
def _no_process_group_left_behind(request):
    """Every test starts without a torch.distributed process group. A test that starts one in the pytest
    process (DeepSpeed's and Composer's in-process runs do) and leaves it makes every later Composer run
    think it was launched (`MissingEnvironmentError: ... NODE_RANK is not set`): it is destroyed after
    the test, with a warning that names the test, so that the leak can be fixed where it starts."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import warnings

        warnings.warn(f'{request.node.nodeid} left a process group behind; destroyed', stacklevel=1)
        dist.destroy_process_group()
