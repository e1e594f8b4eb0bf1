import pytest

from tests import mpiutil


@pytest.fixture(params=mpiutil.FLAVOURS)
def mpi_flavour(request):
    """Run the test once under each MPI (tests/mpiutil.py): skipped where a flavour is missing, but in CI."""
    flavour = mpiutil.use_flavour(request.param)
    mpiutil.need_mpirun()
    yield flavour
    mpiutil.use_flavour("mpich")
