"""Make the flat top-level modules (vitok.py, dit.py, ...) importable from the tests, however pytest is started."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
