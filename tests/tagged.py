"""Processes a test started, found by a tag in their environment (ADADPIGU_TEST_TAG), so
that a test stops its own processes and nothing else on the machine."""

from __future__ import annotations

import os

from simulations.processes import process_alive


def tagged_processes(tag: str) -> list[int]:
    """PIDs (other than ours) whose environment holds ADADPIGU_TEST_TAG=tag."""
    needle = f"ADADPIGU_TEST_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if needle in env and process_alive(int(entry)):
            found.append(int(entry))
    return found
