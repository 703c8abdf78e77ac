"""Independent restatements the tests compare the package against (official code, published definitions), written
from the source they restate and sharing no code with ddt_export: `official` (PyTorch: the forward, the samplers,
the similarity), `sharing_dp` (the DP, plain loops), `adm` (ADM's IS and precision/recall, float64 numpy),
`forecast` (encoder forecasting by Newton's divided differences, float64)."""
