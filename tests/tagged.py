"""Processes a test started, found by a tag in their environment (ADADPIGU_TEST_TAG), so
that a test stops its own processes and nothing else on the machine."""

from __future__ import annotations

from simulations.processes import processes_with_env


def tagged_processes(tag: str) -> list[int]:
    """PIDs (other than ours) whose environment holds ADADPIGU_TEST_TAG=tag."""
    return processes_with_env("ADADPIGU_TEST_TAG", tag)
