"""The producer tests' isolated environment, CLI runner and PostgreSQL database, for commands that screen
and publish."""

from tests.producer.conftest import producer_env, producer_pg_url, run_cli  # noqa: F401 - fixtures, by name
from tests.producer.test_enqueue_worker import worker_env  # noqa: F401 - a fixture, used by name
