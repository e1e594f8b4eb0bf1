"""Fixtures shared by the tests that need a trained model: import them into a test module to use them."""
import pytest
from threadpoolctl import threadpool_limits

from lenet_dist.comm import LocalComm
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_subset
from lenet_dist.parallel.step import DataParallelTrainer


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    # small matrices on a shared 2-core machine: two BLAS threads made these tests many times slower
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def data():
    return load_subset()


@pytest.fixture(scope="module")
def trained(data):
    """A LeNet5 trained for 3 epochs on the shipped subset (~90% on its test images)."""
    t = DataParallelTrainer(TrainConfig(epochs=3, batch_size=32, lr=0.05), LocalComm(), data)
    while not t.done:
        t.train_step()
    return t.model
