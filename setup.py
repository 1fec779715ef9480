"""The C extension only; everything else is in pyproject.toml.

``_fc_sum`` is required, not optional: without a C compiler and the Python
headers (Debian: gcc, python3-dev) the install fails.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cellos_probed.probes._fc_sum",
            ["cellos_probed/probes/_fc_sum.c"],
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
