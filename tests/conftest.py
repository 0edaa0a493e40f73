"""Shared settings: every process that starts Ray here stays on loopback (shared/ENVIRONMENT.md),
and durable router state (usage files) goes to a throw-away folder, never into the checkout."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "SERVE_APP_DATA_DIR" not in os.environ:
    os.environ["SERVE_APP_DATA_DIR"] = tempfile.mkdtemp(prefix="serve-app-data-")
    atexit.register(shutil.rmtree, os.environ["SERVE_APP_DATA_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session (tests/redis_server.py); skips where none is installed."""
    from tests.redis_server import RedisServer

    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied for this test."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL server for the session (tests/pg_server.py); skips where none can start."""
    from tests.pg_server import PgServer

    server = PgServer()
    yield server
    server.close()


def pytest_collection_modifyitems(items):
    """End-to-end tests run last, so in one process the session's Ray cluster (started by the first
    of them, torn down at the session's end) is never up while the unit tests run. Among them, the
    modules that use the shared apps (the `shared` fixture, tests/e2e/conftest.py) run after those
    that do not, which run while the shared apps start in the background (tests/e2e/low_priority.py). A module is
    kept whole (its module-scoped apps are deployed once)."""
    module = lambda item: getattr(getattr(item, "module", None), "__name__", "")  # noqa: E731
    shared_modules = {module(item) for item in items if "shared" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: (item.get_closest_marker("e2e") is not None, module(item) in shared_modules))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` (`-n 2`): every e2e test is one unit of work, run on one worker in collection order
    with one session Ray cluster (the largest unit, so it starts first), while the other worker
    takes the unit tests one by one beside it. (xdist's own `xdist_group` marks do nothing under
    pytest 9.2: it keeps node ids in `Node._id`, and xdist 3.8 writes its group suffix to `_nodeid`.)"""
    from xdist.scheduler import LoadScopeScheduling

    class E2EApart(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "e2e" if nodeid.startswith("tests/e2e/") else nodeid

        def _reschedule(self, node) -> None:
            """The e2e worker takes no unit test: xdist gives a worker more once it has <= 2 tests
            left (it holds its last test until more work or its shutdown comes), and a unit test
            there would run beside the session's Ray cluster, which stays up until the session ends.
            So near its end it is told to shut down, while another worker is left for the rest."""
            work = self.assigned_work.get(node, {})
            others = any(n is not node and not n.shutting_down for n in self.nodes)
            if "e2e" not in work or not self.workqueue or node.shutting_down or not others:
                return super()._reschedule(node)
            if self._pending_of(work) <= 2:
                node.shutdown()  # it runs its last e2e tests, then ends

    return E2EApart(config, log)


@pytest.fixture(autouse=True)
def _no_ray_started_by_a_unit_test(request):
    """A unit test that reaches Ray by accident (an unpatched status-board call) starts a whole Ray
    cluster inside the test process, silently (ray.init is implicit), and it stays for every later
    test: slower, and not the isolation a unit test claims. The e2e tests start Ray on purpose."""
    import ray

    was_on = ray.is_initialized()
    yield
    if not was_on and ray.is_initialized() and "e2e" not in request.keywords:
        ray.shutdown()  # so the next test that does it is caught too
        pytest.fail("this unit test started Ray in the test process (patch the call that reached it)")
