"""The engine, one folder per job: training, evaluation, prediction, deployment and tools (imports flow
tools → training → prediction → evaluation → deployment; tests/test_layers.py enforces it)."""
