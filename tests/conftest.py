"""Fixtures shared by every test package live in tests/fixtures/ and are loaded here."""

import os

# Scores must not depend on which CPU runs the tests: bf16 is chosen automatically only on CPUs with bf16
# instructions, so tests (and the workers they start) score in fp32 unless a test asks for bf16. Nor on
# whether the optional OpenVINO engine is installed: int8 only where a test asks for it.
os.environ.setdefault("DEEPCOVID_CPU_BF16", "off")
os.environ.setdefault("DEEPCOVID_CPU_INT8", "off")

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.databases",
    "tests.fixtures.services",
    "tests.fixtures.faults",
]
