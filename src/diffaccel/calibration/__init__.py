"""The calibration layer, shared by the methods and the search: the workload (what to run), the
reference run and its profile (what the model does step by step), and the DP over key steps."""

from diffaccel.calibration.workload import Call, Workload, as_workload, images_of

__all__ = ["Call", "Workload", "as_workload", "images_of"]
