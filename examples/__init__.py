"""Examples of dptune on your own model, data and loss (each runs offline, on CPU, in a few minutes)."""
