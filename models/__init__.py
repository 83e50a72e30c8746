"""What a deployable model is: network builder, OOD scores, preprocessing and the bundle format.

Shared by ``training`` (which writes bundles) and ``service`` (which loads them); depends on torch,
torchvision, numpy, pillow, pydantic and safetensors only.

Grouped by role: ``network`` (backbone, weights, preprocessing, CUDA graphs), ``scoring`` (OOD
scores), ``calibration`` (conformal thresholds and p-values, selective risk, drift), ``contract``
(the bundle: manifest, trust, files, index) and ``runtime`` (a loaded bundle predicting on its
device). Training writes bundles with ``contract.manifest`` and ``contract.bundle`` and never loads
``runtime``.
"""
