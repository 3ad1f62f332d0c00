"""Shared experiment code: dataset loaders, the model zoo, and the steps
(fine-tune, strip, export, verify, tables) that `examples/` and
`benchmarks/` both run."""
