"""msprior: train MSPrior priors over RAVE latents with Ray, export them for nn~."""

__version__ = "0.1.0"
