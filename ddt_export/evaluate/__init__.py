"""Quality and speed: FID and its feature extractors, validate (the gate), bench. Torch only through `export`."""
