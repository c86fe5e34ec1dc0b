"""Code the Triton model runs beside ``1/model.py``.

``prepare_qwen_pt.py`` copies this package into the model's version folder, so
the model folder stays self-contained (it is mounted into the Docker image as is).
"""
