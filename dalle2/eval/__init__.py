"""Evaluation: does the trained system follow its prompts? (``dalle2 eval``)

    shapes_checker  reads shape, color, position... from pixels (no learned model)
    metrics         CLIP retrieval, prior cosine, CLIP score, CLIP-feature Frechet distance
    run             loads a cascade and a dataset's held-out rows, writes report.json and grids
"""
