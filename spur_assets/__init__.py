"""spur-assets: expose and mitigate spurious object correlations in image-text retrieval."""

import os

# Part of the thread policy (core/threads.py), set before any module of the package loads torch:
# OpenMP threads that spin while waiting collapse when another process takes a core (measured 4x
# slower beside one CPU-bound process on 2 cores; bench/bench_threads.py). PASSIVE makes idle
# threads sleep. OpenMP reads it once, when torch loads it; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
