# Everything is declared in pyproject.toml; this file exists for tools (and the design card) that expect setup.py.
from setuptools import setup

setup()
