# The one compiled piece (hv/hw/_sites.c: a code hook for Unicorn); the rest
# of the project's metadata is in pyproject.toml. Optional: without a C
# compiler hv installs and runs, slower (hv.hw.engine falls back).
from setuptools import Extension, setup

setup(ext_modules=[Extension("hv.hw._sites", ["hv/hw/_sites.c"], optional=True)])
