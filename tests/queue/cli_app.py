"""A processor for the CLI tests: records processed payloads in a file."""

from __future__ import annotations

import os

from hardening.queue import Job, QueueProcessor


class Echo(QueueProcessor):
    queue = "cli"
    poll_interval = 0.05

    def process(self, job: Job) -> None:
        if isinstance(job.payload, dict) and job.payload.get("fail"):
            raise ValueError("asked to fail")
        with open(os.environ["ECHO_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{job.payload}\n")
