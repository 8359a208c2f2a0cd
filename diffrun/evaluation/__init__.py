"""Sample quality: FID and KID through torch-fidelity, with Inception weights found offline."""
from diffrun.evaluation.fid import SampledImages, compute_fid_kid, compute_fid_kid_from_sampler
from diffrun.evaluation.inception import (HeadlessInceptionError, InceptionWeights, InceptionWeightsUnavailable,
                                          resolve_inception_weights)

__all__ = ["HeadlessInceptionError", "InceptionWeights", "InceptionWeightsUnavailable", "SampledImages",
           "compute_fid_kid", "compute_fid_kid_from_sampler", "resolve_inception_weights"]
