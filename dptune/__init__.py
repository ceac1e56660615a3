"""dptune: tune differentially private training under a fixed privacy budget."""
__version__ = "0.1.0"
