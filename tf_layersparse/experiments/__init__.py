"""The paper's studies (Section 3, Appendix A), fast, as a CLI with plots.

    python -m tf_layersparse.experiments simulation     # Table 1
    python -m tf_layersparse.experiments real-data      # Table 2, Figures 2-3

`BatchedMLP` trains many independent networks at once; the studies use it
together with the library's own proximal step and `fold`.
"""

from tf_layersparse.experiments.batched import BatchedMLP, History
from tf_layersparse.experiments.cli import main

__all__ = ["BatchedMLP", "History", "main"]
