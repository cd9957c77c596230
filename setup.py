"""Build script. Pure-Python install for now; the C++/CUDA extension joins here (issue 4)."""
from setuptools import setup

setup()
