"""The no-op job function rq imports by name in benchmarks/jobqueue.py."""


def noop(i: int) -> None:
    return None
