"""The test suite mirrors the package: tests/ for the top-level modules, tests/data, tests/integrations
and tests/models for the subpackages, tests/benchmarks for the benchmarks' smallest runs. Shared code
that is not a test (helpers, the S3 server, the multi-process drivers) is in tests/support and is
imported as `tests.support.<module>` (the repository root is on the path: pyproject's `pythonpath`)."""
