"""pytest plugin: what the GPU machine's non-``gpu`` test phase does with the tests that do
not take the ``device`` fixture, rehearsed on a CPU box.

There ``TRITON_INTERPRET`` is unset: Triton compiles its kernels and the dispatcher refuses CPU
tensors for them, so a test that hands CPU tensors to ``backend="triton"`` (or to a launcher)
fails on the GPU machine while passing here. Run the tests without the interpreter, leaving
out those that take ``device`` (they would run on CUDA there) and the ``gpu`` / ``aot`` ones::

    TRITON_INTERPRET=0 .venv/bin/python -m pytest tests -p tests._no_device -n auto

Every test left must pass (or skip saying why); a failure is a test to move onto ``device``.
"""


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        uses_device = "device" in getattr(item, "fixturenames", ())
        if uses_device or item.get_closest_marker("gpu") or item.get_closest_marker("aot"):
            drop.append(item)
        else:
            keep.append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
