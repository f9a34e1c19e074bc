"""Fixtures the network test files share (they opt in with `pytestmark = pytest.mark.usefixtures(...)`)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a file: its small networks gain little from two, and on a shared machine two
    threads wait for each other far longer than they compute (30x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded():
    torch.manual_seed(0)  # every test draws the same numbers in every run, whatever ran before it
