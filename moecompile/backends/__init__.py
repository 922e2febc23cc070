"""Lowerings of a described model: eager module swap (optimize); the dynamo backend and ONNX export come later."""
