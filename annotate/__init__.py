"""Annotation backend: the §6 dataset reader/writer, validation, segmentation (SAM 2 or GrabCut), grounding, crops.

Importing this package stays light (no torch); the model-backed modules load their libraries on first use.
"""

from .dataset import DatasetError, DatasetWriter, Sample, Subject, SubjectSpec, load_dataset_samples, sanitize_name
from .validate import Problem, validate_dataset

__all__ = ["DatasetError", "DatasetWriter", "Problem", "Sample", "Subject", "SubjectSpec", "load_dataset_samples",
           "sanitize_name", "validate_dataset"]
