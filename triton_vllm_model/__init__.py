"""Code the Triton model runs beside ``1/model.py``.

``prepare_qwen_pt.py`` copies this package into the model's version folder, so
the model folder stays self-contained (it is mounted into the Docker image as is).
"""

# vLLM's worker_extension_cls for the CPU engine: importing it asks for Intel AMX
# (see amx.py). A name, not an import: only vLLM's engine processes import amx.py.
AMX_WORKER_EXTENSION = f"{__name__}.amx.AmxWorkerExtension"
