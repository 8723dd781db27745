"""Fixtures of the launch tests: ``two_hosts`` (tests/netns.py), two network namespaces joined by a veth link."""
from tests.netns import two_hosts  # noqa: F401  (a fixture, found by name)
