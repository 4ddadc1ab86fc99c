"""Suite-wide collection order: the slow tests first.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist load --maxschedchunk 1`),
which hand out the collection in order, a test or two at a time to whichever worker is free
(xdist's default chunking would give one worker a contiguous quarter: every slow test). The slow
tests (real SuperLinks, Flower's simulation engine, SmolLM2) spend much of their time waiting on
other processes, so starting them first overlaps them with each other and with the fast tests
instead of leaving them as a long tail at the end. Without xdist the order changes nothing a test
can see.
"""


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept within each
