"""The network and its inputs: backbone builder, pretrained weights, preprocessing, CUDA graphs."""
