"""Fixtures shared by every test package live in tests/fixtures/ and are loaded here."""

import atexit
import os
import shutil
import tempfile

# Scores must not depend on which CPU runs the tests: bf16 is chosen automatically only on CPUs with bf16
# instructions, so tests (and the workers they start) score in fp32 unless a test asks for bf16. Nor on
# whether the optional OpenVINO engine is installed: int8 only where a test asks for it.
os.environ.setdefault("DEEPCOVID_CPU_BF16", "off")
os.environ.setdefault("DEEPCOVID_CPU_INT8", "off")
# The default data directory (and in it the Grad-CAM artifact store) of every test and test worker that
# sets none: a private one, never the real home's ~/.local/share/deepcovid.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="deepcovid-tests-xdg-")
atexit.register(shutil.rmtree, os.environ["XDG_DATA_HOME"], True)

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.databases",
    "tests.fixtures.services",
    "tests.fixtures.faults",
    "tests.fixtures.orthanc",
]
