"""Real programs written the way torch users write them, with only their imports pointing at
shmrpc: they are run by the tests (tests/test_examples.py), the demo and the benchmarks, so the
drop-in claim is checked on whole programs, not on single calls."""
