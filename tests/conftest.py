import os
import sys

# tests import their shared helpers (cases.py) as plain modules
sys.path.insert(0, os.path.dirname(__file__))
