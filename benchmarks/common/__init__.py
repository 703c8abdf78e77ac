"""What several studies share: the generated doc blocks (`doc_blocks`), the digits-model FID helpers (`digits`).
Imports nothing from any study folder, so every study can import it without a circle."""
