"""ddt-export: deploy DDT (Decoupled Diffusion Transformer). See docs/ARCHITECTURE.md for the layout.

Packages, bottom to top (import-linter checks the order, `lint-imports`):
- core:     errors, config, engine I/O specs, the precision table, provenance and manifests, artifact folders,
            sampling numerics, noise, images, FLOP model. Torch-free, framework-free.
- runtime:  backends (ONNX Runtime, TensorRT), the host loop, encoder schedules and the DP, generate. Torch-free.
- export:   the PyTorch side (the one package that imports torch): model, checkpoints, ONNX export, VAE, the
            PyTorch reference sampler, the FID Inception rebuild.
- build:    calibration capture, FP8 quantization, engine builds, graph parity.
- evaluate: FID and feature extractors, validate, bench.
- commands: the CLI's command bodies (cli.py registers them).
"""
