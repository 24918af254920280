"""Calibration: per-layer, per-head thresholds to an error budget, saved as safetensors.

- `result`: `Calibration` / `LayerCalibration` and the file format (`load_calibration`);
- `runner`: `calibrate` (a patched model or pipeline) and `calibrate_calls` (recorded
  attention calls);
- `passes`: the passes of one calibration over all its layers;
- `search`: the vectorised per-head threshold search of one layer;
- `distributed`: several processes (``accelerate launch``, torchrun).
"""

from .result import CONFIG_NAME, TENSORS_NAME, Calibration, LayerCalibration, as_calibration, load_calibration
from .runner import RecordedCall, calibrate, calibrate_calls
from .search import SearchGrid

__all__ = ["CONFIG_NAME", "TENSORS_NAME", "Calibration", "LayerCalibration", "RecordedCall", "SearchGrid",
           "as_calibration", "calibrate", "calibrate_calls", "load_calibration"]
