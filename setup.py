"""The C extension only; everything else is in pyproject.toml.

``_fc_sum`` is required, not optional: without a C compiler and the Python
headers (Debian: gcc, python3-dev) the install fails. It is built against
the limited API (``Py_LIMITED_API`` in its source), so it is named and
tagged abi3: one build for every CPython from 3.11 on.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cellos_probed.probes._fc_sum",
            ["cellos_probed/probes/_fc_sum.c"],
            extra_compile_args=["-O2", "-Wall"],
            py_limited_api=True,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
