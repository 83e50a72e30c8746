"""What a deployable model is: network builder, OOD scores, preprocessing and the bundle format.

Shared by ``training`` (which writes bundles) and ``service`` (which loads them); depends on torch,
torchvision, numpy, pillow, pydantic and safetensors only.
"""
