"""Data in: batches and their manifests, COCO-layout ingestion with its validation, the built-in dataset, the inbox, the object vocabulary, image preprocessing and streaming."""
