"""Suite-wide collection order: the slow tests first.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist load`), which hand out the
first quarter of the collection round-robin. The slow tests (real SuperLinks, Flower's simulation
engine, SmolLM2) spend much of their time waiting on other processes, so starting them first, one
per worker, overlaps them with each other and with the fast tests instead of leaving them as a
long tail at the end. Without xdist the order changes nothing a test can see.
"""


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept within each
