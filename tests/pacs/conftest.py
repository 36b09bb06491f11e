"""The producer tests' isolated environment and CLI runner, for commands that screen and publish."""

from tests.producer.conftest import producer_env, run_cli  # noqa: F401 - fixtures, used by name
