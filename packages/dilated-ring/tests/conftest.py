import sys
from pathlib import Path

# The spawned ranks import the worker modules by name from this folder.
sys.path.insert(0, str(Path(__file__).parent))
