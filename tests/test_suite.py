"""The test suite's own machinery: what the other tests rely on to run correctly in parallel."""
import os

import pytest


@pytest.mark.xdist_group("probe")
def test_xdist_groups_reach_the_scheduler(request):
    """The SLURM tests share one local cluster and the catalogue's run.py cases one batch, each
    through an xdist_group mark: a pytest and pytest-xdist pair that drops the mark would run them
    on both workers at once (one worker's teardown stopping the other's cluster)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not under pytest-xdist (-n0): one process, nothing to group")
    if not request.config.getoption("loadgroup", False):  # what an xdist worker records of --dist loadgroup
        pytest.skip("not --dist loadgroup: groups are its own")
    assert request.node.nodeid.endswith("@probe"), (
        f"xdist_group is ignored with pytest {pytest.__version__}: keep the dev extra's pin (setup.cfg)")
