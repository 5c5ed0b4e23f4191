"""One module per runtime of an exported model (ONNX Runtime, TorchScript, OpenVINO), each a subclass of
`exported.ExportedDetector` that the loader picks through the format table."""
