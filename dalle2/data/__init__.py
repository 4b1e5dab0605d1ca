"""Image-caption data: the Parquet format (:mod:`.schema`), files at local/``file://``/
``s3://`` locations (:mod:`.storage`), the synthetic shapes (:mod:`.shapes`), the
importer (:mod:`.importer`), the per-batch preprocessing (:mod:`.preprocess`), the Ray
Data pipeline (:mod:`.pipeline`) and the CLIP embeddings job (:mod:`.embed`).

Nothing is imported here, so ``import dalle2.data.storage`` stays light (no Ray, no torch).
"""
