"""tests/conftest.py's xdist scheduler, run for real (pytest -n 2 in a throw-away project holding
that conftest): the e2e tests run on one worker, and no unit test runs there, even when only one
e2e test is selected (xdist then hands a worker with <= 2 tests left more work)."""

from __future__ import annotations

import pathlib

import pytest

pytest_plugins = ["pytester"]

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")
RECORD = """
import os, pathlib
def record(what):
    with open(pathlib.Path(__file__).parents[{up}] / "ran.txt", "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + " " + what + "\\n")
"""


@pytest.mark.parametrize("e2e_selected", [1, 3])
def test_the_e2e_worker_runs_every_e2e_test_and_no_unit_test(pytester, e2e_selected):
    pytester.makepyfile(**{
        "tests/__init__.py": "", "tests/e2e/__init__.py": "",
        "tests/conftest.py": CONFTEST.read_text(),
        "tests/e2e/test_e.py": RECORD.format(up=2) + "\n".join(
            f"def test_e{i}():\n    record('e2e')\n" for i in range(3)),
        "tests/test_u.py": RECORD.format(up=1) + "import time\n" + "\n".join(
            f"def test_u{i}():\n    time.sleep(0.2)\n    record('unit')\n" for i in range(8)),
    })
    e2e = ["tests/e2e/test_e.py"] if e2e_selected == 3 else ["tests/e2e/test_e.py::test_e0"]
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", *e2e, "tests/test_u.py")
    result.assert_outcomes(passed=e2e_selected + 8)
    ran = [line.split() for line in (pytester.path / "ran.txt").read_text().splitlines()]
    e2e_workers = {w for w, what in ran if what == "e2e"}
    assert len(e2e_workers) == 1 and sum(what == "e2e" for _, what in ran) == e2e_selected, ran
    assert not [w for w, what in ran if what == "unit" and w in e2e_workers], ran


def test_e2e_modules_without_the_shared_apps_run_first(pytester):
    """tests/conftest.py's order: unit tests, then e2e modules that use none of the shared apps,
    then those that use them (the `shared` fixture); a module is kept whole, whichever of its tests
    asks for the fixture."""
    fixtures = "import pytest\n@pytest.fixture(scope='session')\ndef shared(): pass\n"
    mark = "import pytest\npytestmark = pytest.mark.e2e\n"
    pytester.makepyfile(**{
        "tests/__init__.py": "", "tests/e2e/__init__.py": "",
        "tests/conftest.py": CONFTEST.read_text(), "tests/e2e/conftest.py": fixtures,
        "tests/e2e/test_a_uses.py": mark + "def test_first(): pass\ndef test_second(shared): pass\n",
        "tests/e2e/test_b_marked.py": mark.replace("pytest.mark.e2e", "[pytest.mark.e2e, pytest.mark.usefixtures('shared')]")
        + "def test_one(): pass\n",
        "tests/e2e/test_c_own.py": mark + "def test_one(): pass\n",
        "tests/test_unit.py": "def test_one(): pass\n",
    })
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", "tests")
    order = [line.split("::")[0].rsplit("/", 1)[-1] for line in result.outlines if "::" in line]
    assert order == ["test_unit.py", "test_c_own.py", "test_a_uses.py", "test_a_uses.py", "test_b_marked.py"], order
