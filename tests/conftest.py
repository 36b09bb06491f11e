"""Fixtures shared by every test package live in tests/fixtures/ and are loaded here."""

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.databases",
    "tests.fixtures.services",
    "tests.fixtures.faults",
]
