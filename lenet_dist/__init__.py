"""lenet-dist: a vectorized NumPy LeNet-5, trained data-parallel over MPI, validated over ZeroMQ."""

__version__ = "0.1.0"
