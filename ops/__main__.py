"""`python -m ops [NAME ...]`: build the CUDA ops (or find them in the cache) and import them.

Needs a CUDA compiler but no GPU, so compile and link errors show up on any machine.
"""
import argparse

from .cuda_loader import PLUGIN_SOURCES, build

parser = argparse.ArgumentParser(prog="python -m ops", description=__doc__.splitlines()[0].split(": ", 1)[1])
parser.add_argument("names", nargs="*", default=sorted(PLUGIN_SOURCES), help="plugins to build (default: all)")
for name in parser.parse_args().names:
    print(f"{name}: built and imported {build(name).__file__}")
