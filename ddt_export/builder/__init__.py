"""Calibration, FP8 quantization and engine builds: checkpoint -> engine folder (torch only through `export`)."""
