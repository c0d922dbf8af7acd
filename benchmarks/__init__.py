"""The benchmarks. Run each from the repository root as a module, e.g. `python -m benchmarks.overhead`;
`benchmarks._common` holds what they share (the machine description, the atomic JSON write)."""
