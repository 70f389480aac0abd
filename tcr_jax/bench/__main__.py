"""python -m tcr_jax.bench (tcr_jax/bench/__init__.py)."""
import sys

from tcr_jax.bench import main

sys.exit(main())
