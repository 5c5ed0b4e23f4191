"""Prediction: the `Predictor` (`crosskd predict`), the sources it reads (files, folders, videos, streams, arrays)
as lazy frames, and the Ultralytics-style `Results`/`Boxes` it returns."""
