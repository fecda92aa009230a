"""The files here are scripts that tests/test_distributed.py runs in subprocesses, not tests."""

collect_ignore_glob = ["*_run.py"]
