"""Data: dataset readers, multimodal sample building, batching, the image pipeline and the embedded synthetic task."""
