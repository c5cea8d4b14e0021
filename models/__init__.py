"""Dynamic-network models built on dynkernels (installed as dynkernels.models)."""
