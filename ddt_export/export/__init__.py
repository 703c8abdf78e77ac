"""The PyTorch side: the only package that imports torch (the `[export]` extra). Nothing below it may import it."""
