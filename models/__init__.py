"""What a deployable model is: network builder, OOD scores, preprocessing and the bundle format.

Shared by ``training`` (which writes bundles) and ``service`` (which loads them); depends on torch,
torchvision, numpy, pillow, pydantic and safetensors only.

A bundle is four modules, each importing only those before it: ``manifest`` (the contract: file
layout and schema), ``bundle`` (writing and verified reading of the files), ``index`` (which
bundles a repository holds) and ``runtime`` (a loaded bundle predicting on its device). Training
needs the first two only.
"""
